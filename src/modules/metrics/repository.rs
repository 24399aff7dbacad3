use async_trait::async_trait;
use chrono::NaiveDate;
use shaku::{Component, Interface};
use std::sync::Arc;
use uuid::Uuid;

use super::dto::DailyMetric;
use crate::infra::database::Database;
use crate::infra::locks::Fence;

/// What a rebuild did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rebuild {
    /// The workspace's rows were replaced: days `from..=to` (none when it has no tasks).
    Written {
        from: Option<NaiveDate>,
        to: Option<NaiveDate>,
        days: i64,
    },
    /// Refused: a rebuild with a higher fence has written (this one's holder lost its lease).
    Superseded,
    WorkspaceGone,
}

#[async_trait]
pub trait MetricsRepository: Interface {
    /// One row per day from `from` to `to` inclusive, zeros included: stored rows where the table
    /// has them, the others computed from the tasks.
    async fn daily(&self, workspace_id: Uuid, from: NaiveDate, to: NaiveDate) -> Result<Vec<DailyMetric>, sqlx::Error>;
    /// Replaces the workspace's stored rows with its days from the first task's to today (UTC),
    /// if `fence` is higher than the last rebuild's.
    async fn rebuild(&self, workspace_id: Uuid, fence: Fence) -> Result<Rebuild, sqlx::Error>;
}

#[derive(Component)]
#[shaku(interface = MetricsRepository)]
pub struct PgMetricsRepository {
    #[shaku(inject)]
    db: Arc<dyn Database>,
}

#[async_trait]
impl MetricsRepository for PgMetricsRepository {
    async fn daily(&self, workspace_id: Uuid, from: NaiveDate, to: NaiveDate) -> Result<Vec<DailyMetric>, sqlx::Error> {
        // One statement, one snapshot: a day is read from the table or counted from the tasks, as
        // the table stands. Day boundaries are UTC midnights, whatever the session time zone.
        // `ws` is read only if some day has no row.
        let query = sqlx::query_as(
            "WITH days AS (
                SELECT d::date AS date,
                       (d::date::timestamp AT TIME ZONE 'UTC') AS starts,
                       ((d::date + 1)::timestamp AT TIME ZONE 'UTC') AS ends
                FROM generate_series($2::date, $3::date, interval '1 day') AS d
             ), stored AS (
                SELECT date, created, completed, open_at_end_of_day FROM daily_metrics
                WHERE workspace_id = $1 AND date BETWEEN $2::date AND $3::date
             ), ws AS (
                SELECT created_at, completed_at FROM tasks WHERE workspace_id = $1
             )
             SELECT date, created, completed, open_at_end_of_day FROM stored
             UNION ALL
             SELECT days.date,
                    (SELECT count(*) FROM ws WHERE ws.created_at >= days.starts AND ws.created_at < days.ends),
                    (SELECT count(*) FROM ws WHERE ws.completed_at >= days.starts AND ws.completed_at < days.ends),
                    (SELECT count(*) FROM ws WHERE ws.created_at < days.ends
                        AND (ws.completed_at IS NULL OR ws.completed_at >= days.ends))
             FROM days WHERE days.date NOT IN (SELECT date FROM stored)
             ORDER BY date",
        )
        .bind(workspace_id)
        .bind(from)
        .bind(to);
        self.db.run(query.fetch_all(self.db.pool())).await
    }

    async fn rebuild(&self, workspace_id: Uuid, fence: Fence) -> Result<Rebuild, sqlx::Error> {
        let pool = self.db.pool();
        let rebuild = async {
            let mut tx = pool.begin().await?;
            // Before the advisory lock: deleting the workspace holds this row and then, through
            // its tasks' trigger, wants the advisory lock; taken the other way round, the two
            // would deadlock.
            let found = sqlx::query("SELECT 1 FROM workspaces WHERE id = $1 FOR KEY SHARE")
                .bind(workspace_id)
                .fetch_optional(&mut *tx)
                .await?;
            if found.is_none() {
                return Ok(Rebuild::WorkspaceGone);
            }
            // Task changes wait from here to the commit; the counts below see every one before.
            sqlx::query("SELECT pg_advisory_xact_lock(daily_metrics_lock_key($1))")
                .bind(workspace_id)
                .execute(&mut *tx)
                .await?;
            let fenced = sqlx::query(
                "INSERT INTO daily_metrics_rebuilds (workspace_id, fence, rebuilt_at) VALUES ($1, $2, now())
                 ON CONFLICT (workspace_id) DO UPDATE SET fence = EXCLUDED.fence, rebuilt_at = EXCLUDED.rebuilt_at
                 WHERE daily_metrics_rebuilds.fence < EXCLUDED.fence",
            )
            .bind(workspace_id)
            .bind(fence.get())
            .execute(&mut *tx)
            .await?;
            if fenced.rows_affected() == 0 {
                return Ok(Rebuild::Superseded);
            }
            sqlx::query("DELETE FROM daily_metrics WHERE workspace_id = $1")
                .bind(workspace_id)
                .execute(&mut *tx)
                .await?;
            // Per day, a task adds one to `created` on its creation day and to `completed` on its
            // completion day; it is open from its creation day up to the day it is both created
            // and completed, so the open count is a running sum of +1s and -1s (O(tasks), where
            // counting per day as `daily` does is O(days × tasks)).
            let (from, to, days) = sqlx::query_as(
                "WITH ws AS (
                    SELECT (created_at AT TIME ZONE 'UTC')::date AS created_on,
                           (completed_at AT TIME ZONE 'UTC')::date AS completed_on,
                           (greatest(created_at, completed_at) AT TIME ZONE 'UTC')::date AS closed_on
                    FROM tasks WHERE workspace_id = $1
                 ), moves AS (
                    SELECT created_on AS date, 1 AS created, 0 AS completed, 1 AS opened FROM ws
                    UNION ALL SELECT completed_on, 0, 1, 0 FROM ws WHERE completed_on IS NOT NULL
                    UNION ALL SELECT closed_on, 0, 0, -1 FROM ws WHERE completed_on IS NOT NULL
                 ), per_day AS (
                    SELECT date, sum(created) AS created, sum(completed) AS completed, sum(opened) AS opened
                    FROM moves GROUP BY date
                 ), days AS (
                    SELECT d::date AS date
                    FROM generate_series((SELECT min(date) FROM per_day), (now() AT TIME ZONE 'UTC')::date,
                                         interval '1 day') AS d
                 ), written AS (
                    INSERT INTO daily_metrics (workspace_id, date, created, completed, open_at_end_of_day)
                    SELECT $1, days.date, coalesce(per_day.created, 0), coalesce(per_day.completed, 0),
                           sum(coalesce(per_day.opened, 0)) OVER (ORDER BY days.date)
                    FROM days LEFT JOIN per_day USING (date)
                    RETURNING date
                 )
                 SELECT min(date), max(date), count(*) FROM written",
            )
            .bind(workspace_id)
            .fetch_one(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(Rebuild::Written { from, to, days })
        };
        self.db.run(rebuild).await
    }
}
