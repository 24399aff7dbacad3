//! The SQL of the queue: enqueue, claim, renew, finish, reap, hand back, and the operators' view.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgConnection;
use uuid::Uuid;

use super::{JobKind, NewJob};
use crate::infra::database::Database;

/// A job a worker holds: what it runs, and what proves it still holds it (`worker`, `attempt`).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Claimed {
    pub id: i64,
    pub kind: String,
    pub payload: serde_json::Value,
    /// 1 on the first run.
    pub attempt: i32,
    pub max_attempts: i32,
}

/// What an enqueue did: the new job's id (`None`: coalesced with the queued job holding its key),
/// and when the queued job holding the key is due (the new one, or the one it met; unknown when
/// that one was not committed yet).
#[derive(Debug, sqlx::FromRow)]
pub(super) struct Inserted {
    pub id: Option<i64>,
    pub due: Option<DateTime<Utc>>,
}

/// Inserts the job of `kind` in the current transaction.
pub(super) async fn insert(db: &dyn Database, kind: &JobKind, job: &NewJob) -> Result<Inserted, sqlx::Error> {
    let write = async {
        let mut write = db.writer().await?;
        let id = insert_on(write.conn(), kind, job).await?;
        write.commit().await?;
        Ok(id)
    };
    db.run(write).await
}

/// `insert`, on a connection the caller holds (the scheduler's transaction).
pub(super) async fn insert_on(conn: &mut PgConnection, kind: &JobKind, job: &NewJob) -> Result<Inserted, sqlx::Error> {
    let found = sqlx::query_as(
        "WITH inserted AS (
             INSERT INTO jobs (queue, kind, payload, max_attempts, run_at, unique_key)
             VALUES ($1, $2, $3, $4, coalesce($5, now()), $6)
             ON CONFLICT (kind, unique_key) WHERE state = 'queued' AND unique_key IS NOT NULL DO NOTHING
             RETURNING id, run_at)
         SELECT id, run_at AS due FROM inserted
         UNION ALL
         SELECT NULL, run_at FROM jobs
         WHERE kind = $2 AND unique_key = $6 AND state = 'queued' AND NOT EXISTS (SELECT 1 FROM inserted)",
    )
    .bind(kind.queue)
    .bind(kind.name)
    .bind(&job.payload)
    .bind(kind.max_attempts as i32)
    .bind(job.run_at)
    .bind(job.unique_key.as_deref())
    .fetch_optional(conn)
    .await?;
    Ok(found.unwrap_or(Inserted { id: None, due: None }))
}

/// What a worker's round trip returns: the jobs it now holds, and which of the finished jobs it
/// reported were recorded done (a missing one had its lease taken over).
#[derive(Debug, Default)]
pub(super) struct Round {
    pub claimed: Vec<Claimed>,
    pub completed: Vec<i64>,
}

/// A job that ran to success on this worker, to be recorded done with the next claim.
#[derive(Debug, Clone, Copy)]
pub(super) struct Finished {
    pub id: i64,
    pub attempt: i32,
}

/// One statement, one commit per worker round: records the `finished` jobs done (fenced by this
/// worker and their attempt) and takes up to `limit` due jobs of `queue`, leased for `lease`.
/// Folding the completions into the next claim halves the round trips per job.
///
/// The statement commits asynchronously (`synchronous_commit` off for its own transaction: no
/// wait for the WAL flush). A Postgres crash can lose the last moment of it, and that only makes
/// jobs run again, as at least once allows: a lost claim leaves the job queued, a lost
/// completion leaves it to the lease. Enqueues commit with the write that makes them.
pub(super) async fn complete_and_claim(
    db: &dyn Database,
    worker: Uuid,
    finished: &[Finished],
    queue: &str,
    lease: Duration,
    limit: i64,
) -> Result<Round, sqlx::Error> {
    let ids: Vec<i64> = finished.iter().map(|job| job.id).collect();
    let attempts: Vec<i32> = finished.iter().map(|job| job.attempt).collect();
    let query = sqlx::query_as::<
        _,
        (
            Vec<i64>,
            Option<i64>,
            Option<String>,
            Option<serde_json::Value>,
            Option<i32>,
            Option<i32>,
        ),
    >(
        "WITH quick AS (SELECT set_config('synchronous_commit', 'off', true)),
         done AS (
             UPDATE jobs SET state = 'done', finished_at = now(), lease_until = NULL
             FROM unnest($5::bigint[], $6::int[]) AS finished (id, attempt)
             WHERE jobs.id = finished.id AND jobs.attempts = finished.attempt
               AND jobs.worker = $2 AND jobs.state = 'running'
             RETURNING jobs.id),
         claimed AS (
             UPDATE jobs SET state = 'running', attempts = attempts + 1, worker = $2,
                    lease_until = now() + make_interval(secs => $3), started_at = now()
             WHERE id IN (SELECT id FROM jobs WHERE queue = $1 AND state = 'queued' AND run_at <= now()
                          ORDER BY run_at, id LIMIT $4 FOR UPDATE SKIP LOCKED)
             RETURNING id, kind, payload, attempts, max_attempts)
         SELECT (SELECT coalesce(array_agg(id), '{}') FROM done),
                claimed.id, claimed.kind, claimed.payload, claimed.attempts, claimed.max_attempts
         FROM quick LEFT JOIN claimed ON true",
    )
    .bind(queue)
    .bind(worker.to_string())
    .bind(lease.as_secs_f64())
    .bind(limit)
    .bind(ids)
    .bind(attempts);
    let rows = db.run(query.fetch_all(db.pool())).await?;
    let mut round = Round::default();
    for (completed, id, kind, payload, attempt, max_attempts) in rows {
        round.completed = completed;
        if let (Some(id), Some(kind), Some(payload), Some(attempt), Some(max_attempts)) =
            (id, kind, payload, attempt, max_attempts)
        {
            round.claimed.push(Claimed {
                id,
                kind,
                payload,
                attempt,
                max_attempts,
            });
        }
    }
    Ok(round)
}

/// Extends the lease of a job this worker holds; `false` when it no longer holds it.
pub(super) async fn renew(
    db: &dyn Database,
    job: &Claimed,
    worker: Uuid,
    lease: Duration,
) -> Result<bool, sqlx::Error> {
    let query = sqlx::query(
        "UPDATE jobs SET lease_until = now() + make_interval(secs => $4)
         WHERE id = $1 AND worker = $2 AND attempts = $3 AND state = 'running'",
    )
    .bind(job.id)
    .bind(worker.to_string())
    .bind(job.attempt)
    .bind(lease.as_secs_f64());
    Ok(db.run(query.execute(db.pool())).await?.rows_affected() == 1)
}

/// Records a failed attempt: queued again after `retry_in`, or dead after its last attempt. A
/// job whose key another queued job holds now is done instead of queued twice (that one runs).
pub(super) async fn fail(
    db: &dyn Database,
    job: &Claimed,
    worker: Uuid,
    error: &str,
    retry_in: Duration,
) -> Result<bool, sqlx::Error> {
    let sql = format!(
        "UPDATE jobs SET {AFTER_FAILURE}, run_at = now() + make_interval(secs => $5), last_error = $4
         WHERE id = $1 AND worker = $2 AND attempts = $3 AND state = 'running'"
    );
    let query = sqlx::query(&sql)
        .bind(job.id)
        .bind(worker.to_string())
        .bind(job.attempt)
        .bind(error)
        .bind(retry_in.as_secs_f64());
    Ok(db.run(query.execute(db.pool())).await?.rows_affected() == 1)
}

/// The next state of a job whose attempt ended without success.
const AFTER_FAILURE: &str = "state = CASE
        WHEN attempts >= max_attempts THEN 'dead'
        WHEN unique_key IS NOT NULL AND EXISTS (SELECT 1 FROM jobs q WHERE q.kind = jobs.kind
             AND q.unique_key = jobs.unique_key AND q.state = 'queued') THEN 'done'
        ELSE 'queued' END,
    finished_at = CASE WHEN attempts >= max_attempts THEN now() END,
    worker = NULL, lease_until = NULL";

/// Jobs whose worker stopped renewing its lease (it died or froze) count the attempt as failed:
/// queued again at once, or dead after the last one. Returns how many.
pub(super) async fn reap(db: &dyn Database) -> Result<u64, sqlx::Error> {
    let sql = format!(
        "UPDATE jobs SET {AFTER_FAILURE}, run_at = now(),
                last_error = 'its worker stopped renewing the lease (died or froze)'
         WHERE state = 'running' AND lease_until < now()"
    );
    Ok(db.run(sqlx::query(&sql).execute(db.pool())).await?.rows_affected())
}

/// Gives jobs this worker holds back to the queue, due now, without counting the attempt (the
/// worker is stopping).
pub(super) async fn hand_back(db: &dyn Database, jobs: &[Claimed], worker: Uuid) -> Result<u64, sqlx::Error> {
    let ids: Vec<i64> = jobs.iter().map(|job| job.id).collect();
    let query = sqlx::query(
        "UPDATE jobs SET state = 'queued', attempts = attempts - 1, worker = NULL, lease_until = NULL, run_at = now()
         WHERE id = ANY($1) AND worker = $2 AND state = 'running'",
    )
    .bind(ids)
    .bind(worker.to_string());
    Ok(db.run(query.execute(db.pool())).await?.rows_affected())
}

/// Jobs by queue and state.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct QueueCount {
    pub queue: String,
    pub state: String,
    pub jobs: i64,
    /// Of `jobs`, those due now: the backlog workers have not taken yet (queued jobs only; 0 in
    /// other states).
    pub due: i64,
    /// Seconds the oldest due job of the queue has waited (queued jobs only).
    pub oldest_due_seconds: Option<f64>,
}

pub(super) async fn counts(db: &dyn Database) -> Result<Vec<QueueCount>, sqlx::Error> {
    let query = sqlx::query_as(
        "SELECT queue, state, count(*) AS jobs,
                CASE WHEN state = 'queued' THEN count(*) FILTER (WHERE run_at <= now()) ELSE 0 END AS due,
                CASE WHEN state = 'queued' THEN
                     extract(epoch FROM now() - min(run_at) FILTER (WHERE run_at <= now()))::float8 END
                  AS oldest_due_seconds
         FROM jobs GROUP BY queue, state ORDER BY queue, state",
    );
    db.run(query.fetch_all(db.pool())).await
}

/// A job that failed its last attempt.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadJob {
    pub id: i64,
    pub queue: String,
    pub kind: String,
    pub payload: serde_json::Value,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

pub(super) async fn dead(db: &dyn Database, limit: i64) -> Result<Vec<DeadJob>, sqlx::Error> {
    let query = sqlx::query_as(
        "SELECT id, queue, kind, payload, attempts, last_error, created_at, finished_at
         FROM jobs WHERE state = 'dead' ORDER BY id DESC LIMIT $1",
    )
    .bind(limit);
    db.run(query.fetch_all(db.pool())).await
}

/// Queues a dead job again with its attempts reset; `false` when there is no such dead job.
pub(super) async fn retry(db: &dyn Database, id: i64) -> Result<bool, sqlx::Error> {
    let query = sqlx::query(
        "UPDATE jobs SET state = 'queued', attempts = 0, run_at = now(), finished_at = NULL
         WHERE id = $1 AND state = 'dead'",
    )
    .bind(id);
    Ok(db.run(query.execute(db.pool())).await?.rows_affected() == 1)
}
