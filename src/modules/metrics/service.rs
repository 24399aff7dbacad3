use async_trait::async_trait;
use shaku::{Component, Interface};
use std::sync::Arc;
use uuid::Uuid;

use super::dto::{DailyMetrics, DailyMetricsQuery};
use super::repository::MetricsRepository;
use crate::error::{AppError, AppResult};
use crate::infra::cache::{json, CacheService, Cached};
use crate::modules::to_json_bytes;
use crate::modules::workspaces::service::WorkspaceService;

pub const MAX_DAYS: i64 = 366;

#[async_trait]
pub trait MetricsService: Interface {
    /// Daily metrics as cached JSON; every task write in the workspace invalidates them.
    async fn daily(&self, user_id: Uuid, workspace_id: Uuid, query: DailyMetricsQuery) -> AppResult<Cached>;
}

#[derive(Component)]
#[shaku(interface = MetricsService)]
pub struct Metrics {
    #[shaku(inject)]
    metrics: Arc<dyn MetricsRepository>,
    #[shaku(inject)]
    workspaces: Arc<dyn WorkspaceService>,
    #[shaku(inject)]
    cache: Arc<dyn CacheService>,
}

#[async_trait]
impl MetricsService for Metrics {
    async fn daily(&self, user_id: Uuid, workspace_id: Uuid, query: DailyMetricsQuery) -> AppResult<Cached> {
        let DailyMetricsQuery { from, to } = query;
        if from > to {
            return Err(AppError::invalid_field("from", "must not be after `to`"));
        }
        if (to - from).num_days() + 1 > MAX_DAYS {
            return Err(AppError::invalid_field("to", "the range may span at most 366 days"));
        }
        self.workspaces.require_member(user_id, workspace_id).await?;
        let key = self.cache.keys().daily_metrics(workspace_id, format!("{from}..{to}"));
        let load = async {
            let days = self.metrics.daily(workspace_id, from, to).await?;
            to_json_bytes(&DailyMetrics {
                workspace_id,
                from,
                to,
                days,
            })
        };
        self.cache.get_or_load(key, Box::pin(load), json::<DailyMetrics>).await
    }
}
