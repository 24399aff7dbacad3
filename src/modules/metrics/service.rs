use async_trait::async_trait;
use shaku::{Component, Interface};
use std::sync::Arc;
use uuid::Uuid;

use super::dto::{DailyMetrics, DailyMetricsQuery};
use super::repository::MetricsRepository;
use crate::error::{AppError, AppResult};
use crate::modules::workspaces::service::WorkspaceService;

pub const MAX_DAYS: i64 = 366;

#[async_trait]
pub trait MetricsService: Interface {
    async fn daily(
        &self,
        user_id: Uuid,
        workspace_id: Uuid,
        query: DailyMetricsQuery,
    ) -> AppResult<DailyMetrics>;
}

#[derive(Component)]
#[shaku(interface = MetricsService)]
pub struct Metrics {
    #[shaku(inject)]
    metrics: Arc<dyn MetricsRepository>,
    #[shaku(inject)]
    workspaces: Arc<dyn WorkspaceService>,
}

#[async_trait]
impl MetricsService for Metrics {
    async fn daily(
        &self,
        user_id: Uuid,
        workspace_id: Uuid,
        query: DailyMetricsQuery,
    ) -> AppResult<DailyMetrics> {
        let DailyMetricsQuery { from, to } = query;
        if from > to {
            return Err(AppError::invalid_field("from", "must not be after `to`"));
        }
        if (to - from).num_days() + 1 > MAX_DAYS {
            return Err(AppError::invalid_field(
                "to",
                "the range may span at most 366 days",
            ));
        }
        self.workspaces
            .require_member(user_id, workspace_id)
            .await?;
        let days = self.metrics.daily(workspace_id, from, to).await?;
        Ok(DailyMetrics {
            workspace_id,
            from,
            to,
            days,
        })
    }
}
