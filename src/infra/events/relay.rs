//! The two queues of the event table, each worked by one pass at a time across the fleet (a
//! transaction's advisory lock):
//! - the relay takes unpublished events in the order they were inserted, numbers them per
//!   workspace and marks them published in one transaction, then sends them on pub/sub;
//! - the subscriber pass takes the events in-app subscribers have not handled, one per
//!   transaction, runs their subscribers in order, and marks it handled in that transaction.
//!
//! A crash before a commit leaves the events in their queue for the next pass; a message lost
//! after it is read from the table by every instance's catch-up: at least once. The queues are
//! apart so that a slow or failing subscriber never delays what clients see.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::outbox::{self, Lock, Queue};
use super::{Event, Inner, BATCH, HANDLER_ATTEMPTS, NOTIFY_CHANNEL, NOTIFY_MAX_PAYLOAD, PRUNE_EVERY};
use crate::infra::database::within;

/// While another instance's pass holds the lock: how often, and how many times, to try again
/// before waiting for the next wake-up.
const BUSY_RETRY: Duration = Duration::from_millis(50);
const BUSY_TRIES: u32 = 10;
/// PUBLISH commands per Redis round trip: a backlog goes out in several, each under the command
/// deadline, rather than in one that could outlast it (and count against the shared breaker).
const PUBLISH_CHUNK: usize = 50;
/// How long the relay waits after a commit woke it, gathering the commits that follow into one
/// pass: under load one pass (six statements) numbers many events instead of one each.
const RELAY_LINGER: Duration = Duration::from_millis(5);
/// How long one prune may go on deleting batches (every `PRUNE_EVERY`).
const PRUNE_BUDGET: Duration = Duration::from_secs(5);
/// The pause before a subscriber's second and third attempts: 100 ms, then 200 ms.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

enum Pass {
    /// Took a full batch: there may be more.
    Full,
    Done,
    /// Another instance holds the queue's lock.
    Busy,
}

pub(super) async fn run(inner: Arc<Inner>) {
    let mut pruned_at: Option<Instant> = None;
    loop {
        tokio::select! {
            // Woken by a commit: the commits of the next few milliseconds go in the same pass.
            _ = inner.relay_wake.notified() => tokio::time::sleep(RELAY_LINGER).await,
            _ = tokio::time::sleep(inner.settings.relay_every) => {}
        }
        work_queue("relay", || publish_pass(&inner)).await;
        if pruned_at.is_none_or(|at| at.elapsed() >= PRUNE_EVERY) {
            pruned_at = Some(Instant::now());
            prune(&inner).await;
        }
    }
}

/// Prunes in batches while there is more (within `PRUNE_BUDGET`), one instance at a time.
async fn prune(inner: &Inner) {
    let started = Instant::now();
    let deadline = inner.db.statement_timeout();
    let mut pruned = 0;
    while started.elapsed() < PRUNE_BUDGET {
        let batch = async {
            let Some(mut tx) = begin_locked(inner, Lock::Prune, deadline).await? else {
                return Ok(0);
            };
            let deleted = within(deadline, outbox::prune(&mut tx, inner.settings.retention)).await?;
            within(deadline, tx.commit()).await?;
            Ok::<_, sqlx::Error>(deleted)
        };
        match batch.await {
            Ok(deleted) => {
                pruned += deleted;
                if deleted < outbox::PRUNE_BATCH as u64 {
                    break;
                }
            }
            Err(err) => {
                log::warn!("events: prune failed: {err}");
                break;
            }
        }
    }
    if pruned > 0 {
        log::debug!("events: pruned {pruned} events older than the retention");
    }
}

pub(super) async fn run_subscribers(inner: Arc<Inner>) {
    loop {
        tokio::select! {
            _ = inner.handlers_wake.notified() => {}
            _ = tokio::time::sleep(inner.settings.relay_every) => {}
        }
        if inner.has_subscribers() {
            work_queue("subscriber", || handler_pass(&inner)).await;
        }
    }
}

/// Passes until the queue is empty, another instance holds it, or a pass fails.
async fn work_queue<F: std::future::Future<Output = Result<Pass, sqlx::Error>>>(what: &str, pass: impl Fn() -> F) {
    let mut busy = 0;
    loop {
        match pass().await {
            Ok(Pass::Full) => continue,
            Ok(Pass::Done) => return,
            Ok(Pass::Busy) if busy < BUSY_TRIES => {
                busy += 1;
                tokio::time::sleep(BUSY_RETRY).await;
            }
            Ok(Pass::Busy) => return,
            Err(err) => {
                log::warn!("events: {what} pass failed (the events stay queued): {err}");
                return;
            }
        }
    }
}

async fn publish_pass(inner: &Inner) -> Result<Pass, sqlx::Error> {
    if !outbox::any_waiting(&*inner.db, Queue::Unpublished).await? {
        return Ok(Pass::Done);
    }
    let deadline = inner.db.statement_timeout();
    // Idle no longer than a statement may take.
    let Some(mut tx) = begin_locked(inner, Queue::Unpublished.lock(), deadline).await? else {
        return Ok(Pass::Busy);
    };
    let events = within(deadline, outbox::number(&mut tx, BATCH)).await?;
    within(deadline, tx.commit()).await?;
    if events.is_empty() {
        return Ok(Pass::Done);
    }
    // Numbered and committed: readable from the table from here on, whatever becomes of the
    // messages below (a lost one is read by each instance's catch-up).
    let via = publish(inner, &events).await;
    inner.handlers_wake.notify_one();
    let now = chrono::Utc::now();
    let lag = inner.telemetry.event_lag.with_label_values(&["relayed"]);
    for event in &events {
        lag.observe(seconds_since(event, now));
    }
    inner
        .telemetry
        .events_published
        .with_label_values(&[via])
        .inc_by(events.len() as u64);
    Ok(full_if(events.len(), BATCH))
}

/// A transaction holding one of the fleet-wide passes' locks, or `None` while another instance
/// holds it. Postgres ends the transaction, and frees the lock, once it has been idle for longer
/// than `idle` (this instance froze or lost its connection).
async fn begin_locked(
    inner: &Inner,
    lock: Lock,
    idle: Duration,
) -> Result<Option<sqlx::Transaction<'static, sqlx::Postgres>>, sqlx::Error> {
    let deadline = inner.db.statement_timeout();
    let mut tx = within(deadline, inner.db.pool().begin()).await?;
    let locked = within(deadline, outbox::lock(&mut tx, lock, idle)).await?;
    Ok(locked.then_some(tx))
}

fn full_if(taken: usize, batch: i64) -> Pass {
    if taken as i64 == batch {
        Pass::Full
    } else {
        Pass::Done
    }
}

pub(super) fn seconds_since(event: &Event, now: chrono::DateTime<chrono::Utc>) -> f64 {
    (now - event.occurred_at).num_microseconds().unwrap_or(0).max(0) as f64 / 1e6
}

/// On Redis while this instance keeps the fleet in sync through it; with NOTIFY otherwise, or when
/// Redis fails. Sent after the commit that numbered the events, so no message ever carries a
/// number the table does not hold; a message that is lost costs only its latency.
async fn publish(inner: &Inner, events: &[Event]) -> &'static str {
    let payloads: Vec<String> = events
        .iter()
        .map(|event| serde_json::to_string(event).expect("an event serialises"))
        .collect();
    if let Some(redis) = inner.redis.synced() {
        let channel = inner.redis.keys().event_channel();
        let mut published = Ok(());
        for chunk in payloads.chunks(PUBLISH_CHUNK) {
            let mut pipe = bb8_redis::redis::pipe();
            for payload in chunk {
                pipe.cmd("PUBLISH").arg(&channel).arg(payload).ignore();
            }
            published = redis
                .call(|mut c| async move { pipe.query_async::<()>(&mut c).await })
                .await;
            if published.is_err() {
                break;
            }
        }
        // Those published before a failure go out again with NOTIFY: listeners skip them.
        match published {
            Ok(()) => return "redis",
            Err(err) => log::debug!("events: publishing on Redis failed, using NOTIFY: {err}"),
        }
    }
    let payloads: Vec<String> = events
        .iter()
        .zip(payloads)
        .map(|(event, payload)| {
            if payload.len() <= NOTIFY_MAX_PAYLOAD {
                payload
            } else {
                // Listeners read the event from the table.
                serde_json::json!({ "workspaceId": event.workspace_id, "seq": event.seq }).to_string()
            }
        })
        .collect();
    if let Err(err) = outbox::notify(&*inner.db, NOTIFY_CHANNEL, &payloads).await {
        log::debug!("events: NOTIFY failed (the catch-up reads them from the table): {err}");
    }
    "postgres"
}

/// One event per transaction: its mark is durable as soon as its subscribers ran, and the
/// transaction is idle only while they run.
async fn handler_pass(inner: &Inner) -> Result<Pass, sqlx::Error> {
    if !outbox::any_waiting(&*inner.db, Queue::Unhandled).await? {
        return Ok(Pass::Done);
    }
    let deadline = inner.db.statement_timeout();
    // Idle while one event's subscribers run, every attempt included.
    let attempts = inner.settings.handler_timeout * HANDLER_ATTEMPTS + RETRY_PAUSE * 3;
    let idle = attempts * inner.subscriber_count() as u32 + deadline;
    let Some(mut tx) = begin_locked(inner, Queue::Unhandled.lock(), idle).await? else {
        return Ok(Pass::Busy);
    };
    let Some(event) = within(deadline, outbox::unhandled(&mut tx, 1)).await?.pop() else {
        within(deadline, tx.commit()).await?;
        return Ok(Pass::Done);
    };
    handle(inner, &event).await;
    within(deadline, outbox::mark_handled(&mut tx, &event)).await?;
    within(deadline, tx.commit()).await?;
    Ok(Pass::Full)
}

/// Runs the event's subscribers in turn, each up to `HANDLER_ATTEMPTS` times.
async fn handle(inner: &Inner, event: &Event) {
    let handlers = inner.subscribers_of(&event.event_type);
    if handlers.is_empty() {
        return;
    }
    let event = Arc::new(event.clone());
    for handler in handlers {
        let mut failure = None;
        for attempt in 1..=HANDLER_ATTEMPTS {
            // A task of its own: a subscriber that panics fails this attempt, not the pass.
            let mut attempt_task = tokio::spawn(handler(event.clone()));
            failure = match tokio::time::timeout(inner.settings.handler_timeout, &mut attempt_task).await {
                Ok(Ok(Ok(()))) => None,
                Ok(Ok(Err(err))) => Some(err),
                Ok(Err(panicked)) => Some(format!("panicked: {panicked}")),
                Err(_) => {
                    attempt_task.abort();
                    Some(format!("timed out after {:?}", inner.settings.handler_timeout))
                }
            };
            if failure.is_none() {
                break;
            }
            if attempt < HANDLER_ATTEMPTS {
                tokio::time::sleep(RETRY_PAUSE * attempt).await;
            }
        }
        if let Some(failure) = failure {
            log::error!(
                "events: a subscriber of {} failed {HANDLER_ATTEMPTS} times on event {} of workspace {}: {failure}",
                event.event_type,
                event.seq,
                event.workspace_id
            );
            inner.telemetry.event_handler_failures.inc();
        }
    }
}
