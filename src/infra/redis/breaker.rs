//! A circuit breaker: after `threshold` consecutive failures Redis is not called at all for
//! `cooldown`; then one probe may try, and its outcome closes or re-opens the breaker.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

#[derive(Debug)]
pub struct CircuitBreaker {
    threshold: u32,
    cooldown: Duration,
    state: Mutex<Inner>,
    /// Until when (µs after `epoch`) the breaker is open for sure: while Redis is down every
    /// request asks, and this answers without taking the lock.
    closed_from: AtomicU64,
    epoch: Instant,
}

#[derive(Debug)]
struct Inner {
    failures: u32,
    opened_at: Option<Instant>,
    probing: bool,
}

impl CircuitBreaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            cooldown,
            state: Mutex::new(Inner {
                failures: 0,
                opened_at: None,
                probing: false,
            }),
            closed_from: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    fn micros_since_epoch(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_micros() as u64
    }

    /// Whether a call may be tried at all (lock-free; `allow` still decides, and picks the probe).
    pub fn accepting(&self) -> bool {
        self.micros_since_epoch(Instant::now()) >= self.closed_from.load(Ordering::Acquire)
    }

    /// Whether a call may go to Redis now. While open, only one caller per cooldown gets `true`.
    pub fn allow(&self) -> bool {
        if !self.accepting() {
            return false;
        }
        let mut inner = self.state.lock().unwrap();
        match inner.opened_at {
            None => true,
            Some(opened) if !inner.probing && opened.elapsed() >= self.cooldown => {
                inner.probing = true;
                true
            }
            Some(_) => false,
        }
    }

    pub fn record_success(&self) {
        let mut inner = self.state.lock().unwrap();
        if inner.opened_at.is_some() {
            log::info!("redis: circuit breaker closed, Redis answers again");
        }
        *inner = Inner {
            failures: 0,
            opened_at: None,
            probing: false,
        };
        self.closed_from.store(0, Ordering::Release);
    }

    pub fn record_failure(&self) {
        let mut inner = self.state.lock().unwrap();
        inner.failures = inner.failures.saturating_add(1);
        if inner.probing || (inner.opened_at.is_none() && inner.failures >= self.threshold) {
            if inner.opened_at.is_none() {
                log::warn!(
                    "redis: circuit breaker open after {} failures; serving without Redis",
                    inner.failures
                );
            }
            let now = Instant::now();
            inner.opened_at = Some(now);
            inner.probing = false;
            self.closed_from
                .store(self.micros_since_epoch(now + self.cooldown), Ordering::Release);
        }
    }

    /// A call that `allow`ed was dropped before it finished (its request went away): it proves
    /// nothing either way, but if it was the probe, the next caller may probe instead.
    pub fn record_abandoned(&self) {
        self.state.lock().unwrap().probing = false;
    }

    pub fn state(&self) -> BreakerState {
        let inner = self.state.lock().unwrap();
        match (inner.opened_at, inner.probing) {
            (None, _) => BreakerState::Closed,
            (Some(_), true) => BreakerState::HalfOpen,
            (Some(opened), false) if opened.elapsed() >= self.cooldown => BreakerState::HalfOpen,
            (Some(_), false) => BreakerState::Open,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_the_threshold_and_lets_one_probe_through_after_the_cooldown() {
        let breaker = CircuitBreaker::new(3, Duration::ZERO);
        breaker.record_failure();
        breaker.record_failure();
        assert_eq!(breaker.state(), BreakerState::Closed);
        breaker.record_failure();
        assert!(breaker.allow(), "cooldown of zero: the probe may go");
        assert!(!breaker.allow(), "only one probe at a time");
        breaker.record_failure();
        assert!(
            breaker.allow(),
            "a failed probe re-opens; the next cooldown allows another"
        );
        breaker.record_success();
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert!(breaker.allow() && breaker.allow());
    }

    #[test]
    fn an_abandoned_probe_lets_the_next_caller_probe() {
        let breaker = CircuitBreaker::new(1, Duration::ZERO);
        breaker.record_failure();
        assert!(breaker.allow(), "the probe");
        assert!(!breaker.allow(), "one probe at a time");
        breaker.record_abandoned();
        assert!(breaker.allow(), "without this the breaker would stay open for good");
    }

    #[test]
    fn stays_open_during_the_cooldown() {
        let breaker = CircuitBreaker::new(1, Duration::from_secs(3600));
        breaker.record_failure();
        assert_eq!(breaker.state(), BreakerState::Open);
        assert!(!breaker.allow());
    }
}
