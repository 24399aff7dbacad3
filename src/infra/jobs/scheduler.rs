//! The scheduler: cron schedules whose every tick runs once across the fleet. Each instance wakes
//! at each fire time and tries to insert (schedule, fire time) into `job_ticks`; the one insert
//! that succeeds enqueues the tick's job in the same transaction, the others conflict and do
//! nothing. Instances' clocks may differ: the key is the fire time, not the moment of waking.
//!
//! Ticks missed while no instance ran: on start, each schedule runs once for the latest fire time
//! it missed since its last recorded tick, and skips the older ones (a purge or a reminder run
//! twice in a row would only repeat itself).

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{Inner, NewJob};
use crate::infra::database::within;

/// A job kind enqueued at each fire time of a cron expression (six fields: seconds first).
#[derive(Clone)]
pub struct Schedule {
    pub kind: &'static str,
    pub cron: cron::Schedule,
}

/// The longest the scheduler sleeps: it checks for new schedules and a stop this often.
const LONGEST_SLEEP: Duration = Duration::from_secs(1);

pub(super) async fn run(inner: Arc<Inner>) {
    let mut checked: std::collections::HashMap<&'static str, DateTime<Utc>> = Default::default();
    loop {
        if inner.stopping.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let now = Utc::now();
        let schedules = inner.schedules();
        for schedule in &schedules {
            let since = match checked.get(schedule.kind) {
                Some(since) => *since,
                None => last_tick(&inner, schedule.kind).await.unwrap_or(now),
            };
            // The latest fire time in (since, now]: older ones in that range were missed.
            if let Some(due) = schedule.cron.after(&since).take_while(|at| *at <= now).last() {
                if let Err(err) = fire(&inner, schedule, due).await {
                    log::warn!("jobs: scheduling {} at {due} failed: {err}", schedule.kind);
                    // Tried again on the next round.
                    continue;
                }
            }
            checked.insert(schedule.kind, now);
        }
        let next = schedules
            .iter()
            .filter_map(|schedule| schedule.cron.after(&now).next())
            .min()
            .map(|at| (at - Utc::now()).to_std().unwrap_or_default())
            .unwrap_or(LONGEST_SLEEP)
            .min(LONGEST_SLEEP);
        tokio::time::sleep(next).await;
    }
}

async fn last_tick(inner: &Inner, schedule: &str) -> Option<DateTime<Utc>> {
    let query = sqlx::query_scalar("SELECT max(fire_at) FROM job_ticks WHERE schedule = $1").bind(schedule);
    inner.db.run(query.fetch_one(inner.db.pool())).await.ok().flatten()
}

/// Records the tick and enqueues its job in one transaction, if no other instance did.
async fn fire(inner: &Inner, schedule: &Schedule, at: DateTime<Utc>) -> Result<(), super::JobError> {
    let kind = inner
        .kind(schedule.kind)
        .ok_or_else(|| super::JobError::UnknownKind(schedule.kind.to_owned()))?;
    let deadline = inner.db.statement_timeout();
    let mut tx = within(deadline, inner.db.pool().begin()).await?;
    let won = sqlx::query("INSERT INTO job_ticks (schedule, fire_at) VALUES ($1, $2) ON CONFLICT DO NOTHING")
        .bind(schedule.kind)
        .bind(at);
    if within(deadline, won.execute(&mut *tx)).await?.rows_affected() == 0 {
        return Ok(());
    }
    let job = NewJob::new(schedule.kind, serde_json::json!({ "firedAt": at }));
    let insert = super::store::insert_on(&mut tx, &kind, &job);
    within(deadline, insert).await?;
    within(deadline, tx.commit()).await?;
    inner
        .telemetry
        .scheduler_lag
        .observe((Utc::now() - at).num_microseconds().unwrap_or(0).max(0) as f64 / 1e6);
    inner.wake.notify_one();
    Ok(())
}
