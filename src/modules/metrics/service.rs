use async_trait::async_trait;
use shaku::{Component, Interface};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

use super::dto::{DailyMetrics, DailyMetricsQuery, MetricsRebuild};
use super::repository::{MetricsRepository, Rebuild};
use crate::error::{AppError, AppResult};
use crate::infra::cache::{json, CacheService, Cached};
use crate::infra::locks::{LockError, LockService, Semaphore};
use crate::modules::to_json_bytes;
use crate::modules::workspaces::service::WorkspaceService;

pub const MAX_DAYS: i64 = 366;

/// The semaphore that caps rebuilds running at once across the fleet (`METRICS_REBUILD_CONCURRENCY`).
pub const REBUILDS: &str = "daily-metrics-rebuilds";

/// The lock one workspace's rebuild holds.
pub fn rebuild_lock(workspace_id: Uuid) -> String {
    format!("daily-metrics:{workspace_id}")
}

/// Leases of the lock and the permit: renewed every third of it while the rebuild runs, so this
/// bounds only how long a crashed instance keeps them.
const LEASE: Duration = Duration::from_secs(10);
/// How long a rebuild waits for one of the same workspace to finish, before answering 409.
const LOCK_WAIT: Duration = Duration::from_secs(2);

#[async_trait]
pub trait MetricsService: Interface {
    /// Daily metrics as cached JSON; every task write in the workspace invalidates them.
    async fn daily(&self, user_id: Uuid, workspace_id: Uuid, query: DailyMetricsQuery) -> AppResult<Cached>;
    /// Recomputes the workspace's stored days (owners only), under the workspace's lock and one of
    /// the fleet's rebuild permits, with a fenced write; the answers of `daily` do not change.
    async fn rebuild(&self, user_id: Uuid, workspace_id: Uuid) -> AppResult<MetricsRebuild>;
    /// `rebuild`, for the app itself (the `metrics.rebuild` job): no caller to authorize.
    async fn rebuild_workspace(&self, workspace_id: Uuid) -> AppResult<MetricsRebuild>;
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
    #[shaku(inject)]
    locks: Arc<dyn LockService>,
    #[shaku(inject)]
    semaphore: Arc<dyn Semaphore>,
    /// `METRICS_REBUILD_CONCURRENCY`.
    rebuild_concurrency: u32,
}

/// A lock or semaphore that could not be had: its store is down, or it stayed taken.
fn not_acquired(err: LockError, busy: AppError) -> AppError {
    match err {
        LockError::Busy => busy,
        other => AppError::LocksUnavailable(other.into()),
    }
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

    async fn rebuild(&self, user_id: Uuid, workspace_id: Uuid) -> AppResult<MetricsRebuild> {
        self.workspaces.require_owner(user_id, workspace_id).await?;
        self.rebuild_workspace(workspace_id).await
    }

    async fn rebuild_workspace(&self, workspace_id: Uuid) -> AppResult<MetricsRebuild> {
        // The workspace's lock first, then a permit: waiting for another rebuild of the same
        // workspace holds none of the fleet's permits.
        let lock = rebuild_lock(workspace_id);
        let locked = self.locks.with_lock(&lock, LEASE, LOCK_WAIT, |fence| async move {
            let permitted = self
                .semaphore
                .with_permit(REBUILDS, self.rebuild_concurrency, LEASE, Duration::ZERO, || async {
                    let stale = vec![self.cache.keys().all_daily_metrics(workspace_id)];
                    let write = self.metrics.rebuild(workspace_id, fence);
                    self.cache.write(stale, write, |_| Vec::new()).await
                })
                .await;
            let busy = AppError::AtCapacity {
                code: "too_many_rebuilds",
                message: "as many metrics rebuilds as allowed are running",
                retry_after_secs: 1,
            };
            match permitted.map_err(|err| not_acquired(err, busy))?? {
                Rebuild::Written { from, to, days } => Ok(MetricsRebuild {
                    workspace_id,
                    from,
                    to,
                    days,
                    fence: fence.get(),
                }),
                Rebuild::Superseded => Err(AppError::conflict(
                    "rebuild_superseded",
                    "a newer rebuild of these metrics has written first",
                )),
                Rebuild::WorkspaceGone => Err(AppError::not_found("workspace")),
            }
        });
        let busy = AppError::conflict("rebuild_in_progress", "these metrics are being rebuilt");
        locked.await.map_err(|err| not_acquired(err, busy))?
    }
}
