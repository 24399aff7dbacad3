//! GCRA (the generic cell rate algorithm), the limiter's one decision rule, as a pure function of
//! the stored state and a clock reading. The in-process limiter runs it as is; `SCRIPT` in the
//! parent module is the same rule in Lua, run by Redis with Redis' own clock.
//!
//! A quota of `limit` per `period` emits one token every `interval = period / limit` and holds at
//! most `limit` of them: a client may spend them all at once, then one per interval. The state
//! is the theoretical arrival time (TAT): when the bucket would be full again.

/// One quota's state and shape, all in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cell {
    /// When this quota is full again (0 or anything in the past: full now).
    pub tat: u64,
    pub interval: u64,
    pub period: u64,
}

/// What one quota looks like after a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CellState {
    pub remaining: u64,
    /// Until this quota is full again.
    pub reset: u64,
}

/// One entry per quota; the hot path decides one to four of them without allocating.
pub type CellStates = smallvec::SmallVec<[CellState; 4]>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Tokens granted: up to the number asked for, 0 when denied.
    pub granted: u64,
    /// When denied: how long until one token is available in every quota.
    pub retry_after: u64,
    pub cells: CellStates,
}

/// Grants up to `wanted` tokens from every cell at once (all or none move), at time `now`.
/// Cells are updated in place when tokens are granted.
pub fn decide(cells: &mut [Cell], now: u64, wanted: u64) -> Outcome {
    let mut granted = wanted;
    let mut retry_after = 0;
    for cell in cells.iter_mut() {
        cell.tat = cell.tat.max(now);
        let available = (now + cell.period - cell.tat) / cell.interval;
        granted = granted.min(available);
        if available == 0 {
            retry_after = retry_after.max(cell.tat + cell.interval - cell.period - now);
        }
    }
    let states = cells
        .iter_mut()
        .map(|cell| {
            let available = (now + cell.period - cell.tat) / cell.interval;
            cell.tat += granted * cell.interval;
            CellState {
                remaining: available - granted,
                reset: cell.tat - now,
            }
        })
        .collect();
    Outcome {
        granted,
        retry_after: if granted == 0 { retry_after } else { 0 },
        cells: states,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1000;
    const S: u64 = 1_000_000;

    /// 10 per second: one token every 100 ms, 10 at most.
    fn ten_per_second() -> Cell {
        Cell {
            tat: 0,
            interval: 100 * MS,
            period: S,
        }
    }

    /// (what, cells before, now, wanted) → (granted, retry_after, remaining of each cell).
    type Case = (&'static str, Vec<Cell>, u64, u64, u64, u64, Vec<u64>);

    #[test]
    fn exact_cases() {
        let start = 1_000 * S;
        let full = ten_per_second();
        let empty = Cell { tat: start + S, ..full };
        let half = Cell {
            tat: start + S / 2,
            ..full
        };
        let daily = Cell {
            tat: 0,
            interval: 86_400 * S / 100,
            period: 86_400 * S,
        };
        let cases: Vec<Case> = vec![
            ("a fresh quota grants one", vec![full], start, 1, 1, 0, vec![9]),
            (
                "a fresh quota grants its whole burst",
                vec![full],
                start,
                10,
                10,
                0,
                vec![0],
            ),
            (
                "a lease asks for more than the burst: grants the burst",
                vec![full],
                start,
                25,
                10,
                0,
                vec![0],
            ),
            (
                "an exhausted quota denies, retry in one interval",
                vec![empty],
                start,
                1,
                0,
                100 * MS,
                vec![0],
            ),
            (
                "refilled one token after one interval",
                vec![empty],
                start + 100 * MS,
                1,
                1,
                0,
                vec![0],
            ),
            (
                "one µs before the interval: still denied",
                vec![empty],
                start + 100 * MS - 1,
                1,
                0,
                1,
                vec![0],
            ),
            (
                "half refilled after half the period",
                vec![empty],
                start + S / 2,
                1,
                1,
                0,
                vec![4],
            ),
            (
                "partial refill: half-used quota grants 5 of 8 asked",
                vec![half],
                start,
                8,
                5,
                0,
                vec![0],
            ),
            ("a cost of 3 takes 3 tokens", vec![full], start, 3, 3, 0, vec![7]),
            (
                "several quotas: the tightest decides, all move together",
                vec![half, daily],
                start,
                8,
                5,
                0,
                vec![0, 95],
            ),
            (
                "several quotas: one exhausted denies all, the others keep their tokens",
                vec![
                    full,
                    Cell {
                        tat: start + 86_400 * S,
                        ..daily
                    },
                ],
                start,
                1,
                0,
                86_400 * S / 100,
                vec![10, 0],
            ),
        ];
        for (what, mut cells, now, wanted, granted, retry_after, remaining) in cases {
            let before = cells.clone();
            let outcome = decide(&mut cells, now, wanted);
            assert_eq!(outcome.granted, granted, "{what}: granted");
            assert_eq!(outcome.retry_after, retry_after, "{what}: retry_after");
            let left: Vec<u64> = outcome.cells.iter().map(|c| c.remaining).collect();
            assert_eq!(left, remaining, "{what}: remaining");
            if granted == 0 {
                let unchanged: Vec<u64> = before.iter().map(|c| c.tat.max(now)).collect();
                assert_eq!(
                    cells.iter().map(|c| c.tat).collect::<Vec<_>>(),
                    unchanged,
                    "{what}: state"
                );
            }
        }
    }

    #[test]
    fn after_exhaustion_a_request_at_retry_after_passes_and_one_ms_earlier_does_not() {
        let start = 5 * S;
        let mut cells = [ten_per_second()];
        for n in 0..10 {
            assert_eq!(decide(&mut cells, start, 1).granted, 1, "burst request {n}");
        }
        let denied = decide(&mut cells, start, 1);
        assert_eq!(denied.granted, 0);
        let retry = denied.retry_after;
        assert_eq!(retry, 100 * MS);
        assert_eq!(
            decide(&mut cells.clone(), start + retry - MS, 1).granted,
            0,
            "1 ms early"
        );
        assert_eq!(decide(&mut cells, start + retry, 1).granted, 1, "at retry_after");
    }

    #[test]
    fn reset_is_the_time_until_the_quota_is_full_again() {
        let mut cells = [ten_per_second()];
        let outcome = decide(&mut cells, 7 * S, 4);
        assert_eq!(outcome.cells[0].reset, 400 * MS);
    }
}
