//! The SQL of the outbox: record an event, read a workspace's events, take the relay's batch,
//! prune.

use std::time::Duration;

use sqlx::PgConnection;
use uuid::Uuid;

use super::{Event, BATCH};
use crate::infra::database::Database;

const COLUMNS: &str = "workspace_id, seq, type, data, occurred_at";

/// Inserts the event in the current transaction, unnumbered: the relay numbers it. Nothing is
/// locked, so writes to one workspace do not wait for each other's commits.
/// `subscribed`: whether in-app subscribers must handle it (otherwise it is recorded as handled).
pub(super) async fn insert(
    db: &dyn Database,
    workspace_id: Uuid,
    event_type: &str,
    data: &serde_json::Value,
    subscribed: bool,
) -> Result<(), sqlx::Error> {
    let query = sqlx::query(
        "INSERT INTO events (workspace_id, type, data, handled_at) VALUES ($1, $2, $3, CASE WHEN NOT $4 THEN now() END)",
    )
    .bind(workspace_id)
    .bind(event_type)
    .bind(data)
    .bind(subscribed);
    let write = async {
        let mut write = db.writer().await?;
        query.execute(write.conn()).await?;
        write.commit().await
    };
    db.run(write).await
}

/// The workspace's last number (0 before its first event).
pub(super) async fn head(db: &dyn Database, workspace_id: Uuid) -> Result<i64, sqlx::Error> {
    let query = sqlx::query_scalar("SELECT head FROM event_streams WHERE workspace_id = $1").bind(workspace_id);
    Ok(db.run(query.fetch_optional(db.pool())).await?.unwrap_or(0))
}

/// The newest matching event: `Some(None)` while it waits for the relay to number it.
pub(super) async fn latest(
    db: &dyn Database,
    workspace_id: Uuid,
    event_type: &str,
    data: &serde_json::Value,
) -> Result<Option<Option<i64>>, sqlx::Error> {
    let query = sqlx::query_scalar(
        "SELECT seq FROM events WHERE workspace_id = $1 AND type = $2 AND data @> $3 ORDER BY id DESC LIMIT 1",
    )
    .bind(workspace_id)
    .bind(event_type)
    .bind(data);
    db.run(query.fetch_optional(db.pool())).await
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

    /// Which rows wait in the queue, and in what order they are taken.
    fn waiting(self) -> (&'static str, &'static str) {
        match self {
            Queue::Unpublished => ("published_at IS NULL", "id"),
            Queue::Unhandled => ("handled_at IS NULL AND published_at IS NOT NULL", "workspace_id, seq"),
        }
    }
}

/// Whether any event waits in `queue`: one index probe, so an idle queue costs one round trip per
/// pass and no transaction.
pub(super) async fn any_waiting(db: &dyn Database, queue: Queue) -> Result<bool, sqlx::Error> {
    let sql = format!("SELECT EXISTS (SELECT 1 FROM events WHERE {})", queue.waiting().0);
    db.run(sqlx::query_scalar(&sql).fetch_one(db.pool())).await
}

/// The subscribers' queue: numbered events not handled yet, in order per workspace.
pub(super) async fn unhandled(conn: &mut PgConnection, limit: i64) -> Result<Vec<Event>, sqlx::Error> {
    let (condition, order) = Queue::Unhandled.waiting();
    let sql = format!("SELECT {COLUMNS} FROM events WHERE {condition} ORDER BY {order} LIMIT $1");
    sqlx::query_as(&sql).bind(limit).fetch_all(conn).await
}

/// Numbers the oldest unpublished events (at most `limit`) and marks them published, in the
/// caller's transaction, which holds the relay's lock: each workspace's counter is raised by its
/// count of rows, and its rows take the numbers in the order they were inserted. Returns them
/// numbered, in order per workspace.
pub(super) async fn number(conn: &mut PgConnection, limit: i64) -> Result<Vec<Event>, sqlx::Error> {
    let (condition, order) = Queue::Unpublished.waiting();
    let sql = format!(
        "WITH taken AS (
            SELECT id, workspace_id, row_number() OVER (PARTITION BY workspace_id ORDER BY id) AS n
            FROM (SELECT id, workspace_id FROM events WHERE {condition} ORDER BY {order} LIMIT $1) AS oldest),
         counts AS (SELECT workspace_id, count(*) AS taken FROM taken GROUP BY workspace_id),
         heads AS (
            INSERT INTO event_streams AS s (workspace_id, head) SELECT workspace_id, taken FROM counts
            ON CONFLICT (workspace_id) DO UPDATE SET head = s.head + EXCLUDED.head
            RETURNING workspace_id, head)
         UPDATE events e SET seq = heads.head - counts.taken + taken.n, published_at = now()
         FROM taken JOIN counts USING (workspace_id) JOIN heads USING (workspace_id)
         WHERE e.id = taken.id
         RETURNING e.workspace_id, e.seq, e.type, e.data, e.occurred_at"
    );
    let mut numbered: Vec<Event> = sqlx::query_as(&sql).bind(limit).fetch_all(conn).await?;
    numbered.sort_unstable_by_key(|event| (event.workspace_id, event.seq));
    Ok(numbered)
}

/// NOTIFYs each payload on `channel`, in order, in one statement (autocommitted).
pub(super) async fn notify(db: &dyn Database, channel: &str, payloads: &[String]) -> Result<(), sqlx::Error> {
    let query = sqlx::query(
        "SELECT pg_notify($1, payload) FROM unnest($2::text[]) WITH ORDINALITY AS p (payload, n) ORDER BY n",
    )
    .bind(channel)
    .bind(payloads);
    db.run(query.execute(db.pool())).await.map(|_| ())
}

/// Takes the event out of the subscribers' queue.
pub(super) async fn mark_handled(conn: &mut PgConnection, event: &Event) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE events SET handled_at = now() WHERE workspace_id = $1 AND seq = $2")
        .bind(event.workspace_id)
        .bind(event.seq)
        .execute(conn)
        .await
        .map(|_| ())
}

/// Deletes up to `PRUNE_BATCH` numbered rows older than `retention`, never one with an earlier
/// row of its workspace still waiting for its subscribers (so a stream never finds a hole: what is gone is a prefix), and the
/// counters of deleted workspaces whose last rows went. Returns how many rows it deleted; in the
/// caller's transaction, which holds the prune's lock.
pub(super) async fn prune(conn: &mut PgConnection, retention: Duration) -> Result<u64, sqlx::Error> {
    let pruned: Vec<Uuid> = sqlx::query_scalar(
        "WITH doomed AS (
            SELECT e.workspace_id, e.seq FROM events e
            WHERE e.occurred_at < now() - make_interval(secs => $1)
              AND e.published_at IS NOT NULL AND e.handled_at IS NOT NULL
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
