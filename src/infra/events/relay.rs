//! The relay: one pass at a time across the fleet (a transaction's advisory lock) takes the
//! unpublished events in order, publishes them, runs the in-app subscribers, and marks them
//! published in the same transaction. A crash anywhere before the commit leaves them unpublished
//! for the next pass: at least once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgConnection;

use super::{outbox, Event, Inner, HANDLER_ATTEMPTS, NOTIFY_CHANNEL, NOTIFY_MAX_PAYLOAD, PRUNE_EVERY};
use crate::infra::database::within;

/// While another instance's pass holds the lock: how often, and how many times, to try again
/// before waiting for the next wake-up.
const BUSY_RETRY: Duration = Duration::from_millis(50);
const BUSY_TRIES: u32 = 10;

enum Pass {
    /// Published a full batch: there may be more.
    Full,
    Done,
    /// Another relay holds the lock.
    Busy,
}

pub(super) async fn run(inner: Arc<Inner>) {
    let mut pruned_at: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = inner.relay_wake.notified() => {}
            _ = tokio::time::sleep(inner.settings.relay_every) => {}
        }
        let mut busy = 0;
        loop {
            match pass(&inner).await {
                Ok(Pass::Full) => continue,
                Ok(Pass::Done) => break,
                Ok(Pass::Busy) if busy < BUSY_TRIES => {
                    busy += 1;
                    tokio::time::sleep(BUSY_RETRY).await;
                }
                Ok(Pass::Busy) => break,
                Err(err) => {
                    log::warn!("events: relay pass failed (the events stay queued): {err}");
                    break;
                }
            }
        }
        if pruned_at.is_none_or(|at| at.elapsed() >= PRUNE_EVERY) {
            pruned_at = Some(Instant::now());
            match outbox::prune(&*inner.db, inner.settings.retention).await {
                Ok(0) => {}
                Ok(pruned) => log::debug!("events: pruned {pruned} events older than the retention"),
                Err(err) => log::warn!("events: prune failed: {err}"),
            }
        }
    }
}

async fn pass(inner: &Inner) -> Result<Pass, sqlx::Error> {
    let deadline = inner.db.statement_timeout();
    // Postgres ends the transaction (and frees the lock) if this instance stops answering for
    // longer than a pass may take: the subscribers' attempts plus one statement.
    let idle = inner.settings.handler_timeout * HANDLER_ATTEMPTS + deadline;
    let mut tx = within(deadline, inner.db.pool().begin()).await?;
    if !within(deadline, outbox::lock_relay(&mut tx, idle)).await? {
        return Ok(Pass::Busy);
    }
    let events = within(deadline, outbox::unpublished(&mut tx)).await?;
    if events.is_empty() {
        within(deadline, tx.commit()).await?;
        return Ok(Pass::Done);
    }
    let via = publish(inner, &mut tx, &events).await?;
    for event in &events {
        run_subscribers(inner, event).await;
    }
    within(deadline, outbox::mark_published(&mut tx, &events)).await?;
    within(deadline, tx.commit()).await?;
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
    Ok(if events.len() as i64 == super::BATCH {
        Pass::Full
    } else {
        Pass::Done
    })
}

pub(super) fn seconds_since(event: &Event, now: chrono::DateTime<chrono::Utc>) -> f64 {
    (now - event.occurred_at).num_microseconds().unwrap_or(0).max(0) as f64 / 1e6
}

/// On Redis while this instance keeps the fleet in sync through it; with NOTIFY (sent when the
/// pass commits) otherwise, or when Redis fails.
async fn publish(inner: &Inner, tx: &mut PgConnection, events: &[Event]) -> Result<&'static str, sqlx::Error> {
    let payloads: Vec<String> = events
        .iter()
        .map(|event| serde_json::to_string(event).expect("an event serialises"))
        .collect();
    if let Some(redis) = inner.redis.synced() {
        let channel = inner.redis.keys().event_channel();
        let mut pipe = bb8_redis::redis::pipe();
        for payload in &payloads {
            pipe.cmd("PUBLISH").arg(&channel).arg(payload).ignore();
        }
        let published = redis
            .call(|mut c| async move { pipe.query_async::<()>(&mut c).await })
            .await;
        match published {
            Ok(()) => return Ok("redis"),
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
    within(
        inner.db.statement_timeout(),
        outbox::notify(tx, NOTIFY_CHANNEL, &payloads),
    )
    .await?;
    Ok("postgres")
}

async fn run_subscribers(inner: &Inner, event: &Event) {
    let handlers = inner.subscribers_of(&event.event_type);
    if handlers.is_empty() {
        return;
    }
    let event = Arc::new(event.clone());
    for handler in handlers {
        let mut failure = None;
        for attempt in 1..=HANDLER_ATTEMPTS {
            failure = match tokio::time::timeout(inner.settings.handler_timeout, handler(event.clone())).await {
                Ok(Ok(())) => None,
                Ok(Err(err)) => Some(err),
                Err(_) => Some(format!("timed out after {:?}", inner.settings.handler_timeout)),
            };
            if failure.is_none() {
                break;
            }
            if attempt < HANDLER_ATTEMPTS {
                tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
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
