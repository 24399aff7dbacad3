//! What locks and semaphores share: waiting for a lease, keeping one renewed while work runs,
//! and the wait metric.

use std::future::Future;
use std::time::{Duration, Instant};

use rand::Rng;

use super::LockError;
use crate::infra::telemetry::Telemetry;

/// The first pause between two attempts; it doubles up to `LAST_PAUSE`. Short enough that a
/// lease freed by its TTL is taken within a few milliseconds of it, long enough that a hundred
/// waiters cost the store a few thousand cheap attempts per second, not a flood.
const FIRST_PAUSE: Duration = Duration::from_millis(2);
const LAST_PAUSE: Duration = Duration::from_millis(50);

/// Calls `attempt` until it gets the lease (`Some`), `wait` has passed (`Busy`), or the store
/// fails (at once: a store that cannot answer is not waited for).
pub(super) async fn waiting<T, F, Fut>(wait: Duration, mut attempt: F) -> Result<T, LockError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>, LockError>>,
{
    let started = Instant::now();
    let mut pause = FIRST_PAUSE;
    loop {
        if let Some(held) = attempt().await? {
            return Ok(held);
        }
        let waited = started.elapsed();
        if waited >= wait {
            return Err(LockError::Busy);
        }
        // Jitter, so that waiters freed together do not all come back together.
        let jittered = pause.mul_f64(rand::thread_rng().gen_range(0.5..=1.0));
        tokio::time::sleep(jittered.min(wait - waited)).await;
        pause = (pause * 2).min(LAST_PAUSE);
    }
}

/// Runs `work` while `extend` renews its lease every `ttl / 3`. A renewal that fails is tried
/// again at the next tick while the lease may still run; once it is known lost (taken over, or
/// ended without a successful renewal), renewing stops and `work` goes on to its end.
pub(super) async fn renewing<T, E, Ext>(what: &str, ttl: Duration, work: impl Future<Output = T>, extend: E) -> T
where
    E: Fn() -> Ext,
    Ext: Future<Output = Result<(), LockError>>,
{
    let renew = async {
        // As seen from here, a little after it really ends: that only delays giving up renewals.
        let mut lease_ends = Instant::now() + ttl;
        loop {
            tokio::time::sleep(ttl / 3).await;
            let asked = Instant::now();
            match extend().await {
                Ok(()) => lease_ends = asked + ttl,
                Err(LockError::NotHeld) => return "it ended or another owner has it".to_owned(),
                Err(err) if Instant::now() >= lease_ends => return format!("renewals failed until it ended: {err}"),
                Err(err) => log::warn!("{what}: lease renewal failed ({err}); trying again"),
            }
        }
    };
    tokio::pin!(work);
    let lost = tokio::select! {
        output = &mut work => return output,
        lost = renew => lost,
    };
    log::warn!("{what}: lease lost while working ({lost}); the work goes on, fenced writes decide");
    work.await
}

/// `lock_wait_seconds{kind, outcome}`.
pub(super) fn observe<T>(telemetry: &Telemetry, kind: &str, started: Instant, outcome: &Result<T, LockError>) {
    let outcome = match outcome {
        Ok(_) => "acquired",
        Err(LockError::Busy) => "busy",
        Err(_) => "error",
    };
    telemetry
        .lock_wait
        .with_label_values(&[kind, outcome])
        .observe(started.elapsed().as_secs_f64());
}
