//! The hourly purge (`maintenance.purge`, `JOBS_PURGE_SCHEDULE`): expired tokens and idempotency
//! records, finished jobs and scheduler ticks older than a week, in batches, each statement under
//! the database deadline. Event rows are pruned by the event relay itself (`EVENTS_RETENTION`).

use std::sync::Arc;
use std::time::Duration;

use crate::infra::database::Database;
use crate::infra::jobs::{Claimed, JobHandler, JobKind};

pub const PURGE: &str = "maintenance.purge";

pub fn purge_kind() -> JobKind {
    JobKind {
        name: PURGE,
        queue: "maintenance",
        max_attempts: 3,
        backoff: Duration::from_secs(30),
        backoff_max: Duration::from_secs(600),
        timeout: Duration::from_secs(300),
    }
}

/// What goes, table by table: rows that can no longer be used or are past keeping.
const PURGES: [(&str, &str); 4] = [
    ("auth_tokens", "expires_at < now()"),
    ("idempotency_keys", "expires_at <= now()"),
    ("jobs", "state = 'done' AND finished_at < now() - interval '7 days'"),
    ("job_ticks", "fire_at < now() - interval '7 days'"),
];

/// Rows one statement deletes at most: short statements, short locks.
const BATCH: i64 = 10_000;

pub fn purge_handler(db: Arc<dyn Database>) -> JobHandler {
    Arc::new(move |_job: Claimed| {
        let db = db.clone();
        Box::pin(async move {
            let mut purged = Vec::new();
            for (table, condition) in PURGES {
                let sql = format!(
                    "DELETE FROM {table} WHERE ctid = ANY (ARRAY(SELECT ctid FROM {table} WHERE {condition} LIMIT $1))"
                );
                let mut total = 0;
                loop {
                    let deleted = db
                        .run(sqlx::query(&sql).bind(BATCH).execute(db.pool()))
                        .await
                        .map_err(|err| format!("purging {table}: {err}"))?
                        .rows_affected();
                    total += deleted;
                    if deleted < BATCH as u64 {
                        break;
                    }
                }
                purged.push(format!("{table} {total}"));
            }
            log::info!("purge: deleted {}", purged.join(", "));
            Ok(())
        })
    })
}
