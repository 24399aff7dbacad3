use async_trait::async_trait;
use chrono::NaiveDate;
use shaku::{Component, Interface};
use std::sync::Arc;
use uuid::Uuid;

use super::dto::DailyMetric;
use crate::infra::database::Database;

#[async_trait]
pub trait MetricsRepository: Interface {
    /// One row per day from `from` to `to` inclusive, zeros included.
    async fn daily(&self, workspace_id: Uuid, from: NaiveDate, to: NaiveDate) -> Result<Vec<DailyMetric>, sqlx::Error>;
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
        // Day boundaries are UTC midnights, whatever the session time zone.
        let query = sqlx::query_as(
            "WITH days AS (
                SELECT d::date AS date,
                       (d::date::timestamp AT TIME ZONE 'UTC') AS starts,
                       ((d::date + 1)::timestamp AT TIME ZONE 'UTC') AS ends
                FROM generate_series($2::date, $3::date, interval '1 day') AS d
             ), ws AS (
                SELECT created_at, completed_at FROM tasks WHERE workspace_id = $1
             )
             SELECT days.date,
                    (SELECT count(*) FROM ws WHERE ws.created_at >= days.starts AND ws.created_at < days.ends) AS created,
                    (SELECT count(*) FROM ws WHERE ws.completed_at >= days.starts AND ws.completed_at < days.ends) AS completed,
                    (SELECT count(*) FROM ws WHERE ws.created_at < days.ends
                        AND (ws.completed_at IS NULL OR ws.completed_at >= days.ends)) AS open_at_end_of_day
             FROM days ORDER BY days.date",
        )
        .bind(workspace_id)
        .bind(from)
        .bind(to);
        self.db.run(query.fetch_all(self.db.pool())).await
    }
}
