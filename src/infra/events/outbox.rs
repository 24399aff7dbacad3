//! The SQL of the outbox: record an event, read a workspace's events, take the relay's batch,
//! prune.

use std::time::Duration;

use sqlx::PgConnection;
use uuid::Uuid;

use super::{Event, BATCH};
use crate::infra::database::Database;

const COLUMNS: &str = "workspace_id, seq, type, data, occurred_at";

/// Takes the workspace's next number and inserts the event, in one statement in the current
/// transaction: the counter's row stays locked until it ends, so numbers follow commit order.
/// `subscribed`: whether in-app subscribers must handle it (otherwise it is recorded as handled).
pub(super) async fn insert(
    db: &dyn Database,
    workspace_id: Uuid,
    event_type: &str,
    data: &serde_json::Value,
    subscribed: bool,
) -> Result<i64, sqlx::Error> {
    let query = sqlx::query_scalar(
        "WITH next AS (
            INSERT INTO event_streams AS s (workspace_id, head) VALUES ($1, 1)
            ON CONFLICT (workspace_id) DO UPDATE SET head = s.head + 1
            RETURNING head)
         INSERT INTO events (workspace_id, seq, type, data, handled_at)
         SELECT $1, head, $2, $3, CASE WHEN NOT $4 THEN now() END FROM next RETURNING seq",
    )
    .bind(workspace_id)
    .bind(event_type)
    .bind(data)
    .bind(subscribed);
    let write = async {
        let mut write = db.writer().await?;
        let seq = query.fetch_one(write.conn()).await?;
        write.commit().await?;
        Ok(seq)
    };
    db.run(write).await
}

/// The workspace's last number (0 before its first event).
pub(super) async fn head(db: &dyn Database, workspace_id: Uuid) -> Result<i64, sqlx::Error> {
    let query = sqlx::query_scalar("SELECT head FROM event_streams WHERE workspace_id = $1").bind(workspace_id);
    Ok(db.run(query.fetch_optional(db.pool())).await?.unwrap_or(0))
}

pub(super) async fn latest(
    db: &dyn Database,
    workspace_id: Uuid,
    event_type: &str,
    data: &serde_json::Value,
) -> Result<Option<i64>, sqlx::Error> {
    let query = sqlx::query_scalar("SELECT max(seq) FROM events WHERE workspace_id = $1 AND type = $2 AND data @> $3")
        .bind(workspace_id)
        .bind(event_type)
        .bind(data);
    db.run(query.fetch_one(db.pool())).await
}

pub(super) async fn read(
    db: &dyn Database,
    workspace_id: Uuid,
    after: i64,
    upto: i64,
    limit: i64,
) -> Result<Vec<Event>, sqlx::Error> {
    let sql = format!(
        "SELECT {COLUMNS} FROM events WHERE workspace_id = $1 AND seq > $2 AND seq <= $3 ORDER BY seq LIMIT $4"
    );
    let query = sqlx::query_as(&sql)
        .bind(workspace_id)
        .bind(after)
        .bind(upto)
        .bind(limit);
    db.run(query.fetch_all(db.pool())).await
}

/// Every followed workspace's events after its cursor, in one statement (at most `BATCH`).
pub(super) async fn read_many(db: &dyn Database, cursors: &[(Uuid, i64)]) -> Result<Vec<Event>, sqlx::Error> {
    let (workspaces, afters): (Vec<Uuid>, Vec<i64>) = cursors.iter().copied().unzip();
    let sql = format!(
        "SELECT {COLUMNS} FROM events e
         JOIN unnest($1::uuid[], $2::bigint[]) AS c (workspace_id, after) USING (workspace_id)
         WHERE e.seq > c.after ORDER BY workspace_id, seq LIMIT $3"
    );
    let query = sqlx::query_as(&sql).bind(workspaces).bind(afters).bind(BATCH);
    db.run(query.fetch_all(db.pool())).await
}

/// One of the fleet-wide passes' locks, as a transaction's advisory lock: released by COMMIT,
/// ROLLBACK, or Postgres ending the transaction once it has been idle for longer than `idle`.
pub(super) async fn lock(conn: &mut PgConnection, lock: Lock, idle: Duration) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))
         FROM set_config('idle_in_transaction_session_timeout', $2, true)",
    )
    .bind(lock.name())
    .bind(idle.as_millis().to_string())
    .fetch_one(conn)
    .await
}

/// The passes that run one at a time across the fleet.
#[derive(Clone, Copy)]
pub(super) enum Lock {
    Relay,
    Subscribers,
    Prune,
}

impl Lock {
    fn name(self) -> &'static str {
        match self {
            Lock::Relay => "events-relay",
            Lock::Subscribers => "events-subscribers",
            Lock::Prune => "events-prune",
        }
    }
}

/// The two queues of the table: events to publish, and events for the in-app subscribers.
#[derive(Clone, Copy)]
pub(super) enum Queue {
    Unpublished,
    Unhandled,
}

impl Queue {
    pub(super) fn lock(self) -> Lock {
        match self {
            Queue::Unpublished => Lock::Relay,
            Queue::Unhandled => Lock::Subscribers,
        }
    }

    fn column(self) -> &'static str {
        match self {
            Queue::Unpublished => "published_at",
            Queue::Unhandled => "handled_at",
        }
    }
}

/// Whether any event waits in `queue`: one index probe, so an idle queue costs one round trip per
/// pass and no transaction.
pub(super) async fn any_waiting(db: &dyn Database, queue: Queue) -> Result<bool, sqlx::Error> {
    let sql = format!("SELECT EXISTS (SELECT 1 FROM events WHERE {} IS NULL)", queue.column());
    db.run(sqlx::query_scalar(&sql).fetch_one(db.pool())).await
}

/// Events waiting in `queue`, in order per workspace, at most `limit`.
pub(super) async fn waiting(conn: &mut PgConnection, queue: Queue, limit: i64) -> Result<Vec<Event>, sqlx::Error> {
    let sql = format!(
        "SELECT {COLUMNS} FROM events WHERE {} IS NULL ORDER BY workspace_id, seq LIMIT $1",
        queue.column()
    );
    sqlx::query_as(&sql).bind(limit).fetch_all(conn).await
}

pub(super) async fn notify(conn: &mut PgConnection, channel: &str, payloads: &[String]) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($1, payload) FROM unnest($2::text[]) WITH ORDINALITY AS p (payload, n) ORDER BY n")
        .bind(channel)
        .bind(payloads)
        .execute(conn)
        .await
        .map(|_| ())
}

/// Takes `events` out of `queue`.
pub(super) async fn mark(conn: &mut PgConnection, queue: Queue, events: &[Event]) -> Result<(), sqlx::Error> {
    let workspaces: Vec<Uuid> = events.iter().map(|e| e.workspace_id).collect();
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    let sql = format!(
        "UPDATE events e SET {} = now() FROM unnest($1::uuid[], $2::bigint[]) AS p (workspace_id, seq)
         WHERE e.workspace_id = p.workspace_id AND e.seq = p.seq",
        queue.column()
    );
    sqlx::query(&sql)
        .bind(workspaces)
        .bind(seqs)
        .execute(conn)
        .await
        .map(|_| ())
}

/// Deletes up to `PRUNE_BATCH` rows older than `retention`, never one with an earlier row of its
/// workspace still queued (so a stream never finds a hole: what is gone is a prefix), and the
/// counters of deleted workspaces whose last rows went. Returns how many rows it deleted; in the
/// caller's transaction, which holds the prune's lock.
pub(super) async fn prune(conn: &mut PgConnection, retention: Duration) -> Result<u64, sqlx::Error> {
    let pruned: Vec<Uuid> = sqlx::query_scalar(
        "WITH doomed AS (
            SELECT e.workspace_id, e.seq FROM events e
            WHERE e.occurred_at < now() - make_interval(secs => $1)
              AND e.published_at IS NOT NULL AND e.handled_at IS NOT NULL
              AND NOT EXISTS (SELECT 1 FROM events u WHERE u.workspace_id = e.workspace_id
                              AND u.seq < e.seq AND u.published_at IS NULL)
              AND NOT EXISTS (SELECT 1 FROM events u WHERE u.workspace_id = e.workspace_id
                              AND u.seq < e.seq AND u.handled_at IS NULL)
            LIMIT $2)
         DELETE FROM events e USING doomed
         WHERE e.workspace_id = doomed.workspace_id AND e.seq = doomed.seq
         RETURNING e.workspace_id",
    )
    .bind(retention.as_secs_f64())
    .bind(PRUNE_BATCH)
    .fetch_all(&mut *conn)
    .await?;
    let mut touched = pruned.clone();
    touched.sort_unstable();
    touched.dedup();
    sqlx::query(
        "DELETE FROM event_streams s WHERE s.workspace_id = ANY($1)
           AND NOT EXISTS (SELECT 1 FROM workspaces w WHERE w.id = s.workspace_id)
           AND NOT EXISTS (SELECT 1 FROM events e WHERE e.workspace_id = s.workspace_id)",
    )
    .bind(touched)
    .execute(conn)
    .await?;
    Ok(pruned.len() as u64)
}

/// Rows one prune statement deletes at most.
pub(super) const PRUNE_BATCH: i64 = 10_000;
