//! The `metrics.rebuild` job: task writes enqueue it for their workspace, coalesced and a moment
//! later, so a burst of writes causes one rebuild (two when writes go on while it runs) and the
//! stored days stay fresh without a rebuild per write.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde_json::json;
use uuid::Uuid;

use super::service::MetricsService;
use crate::error::AppError;
use crate::infra::jobs::{Claimed, JobHandler, JobKind, NewJob};

pub const REBUILD: &str = "metrics.rebuild";

/// How long after a task write its workspace's rebuild runs: the writes of that moment share it.
pub const REBUILD_AFTER: Duration = Duration::from_secs(2);

pub fn rebuild_kind() -> JobKind {
    JobKind {
        name: REBUILD,
        queue: "metrics",
        max_attempts: 5,
        backoff: Duration::from_secs(1),
        backoff_max: Duration::from_secs(60),
        timeout: Duration::from_secs(60),
    }
}

/// The rebuild of a workspace's stored days, due `REBUILD_AFTER` from now, one queued per workspace.
pub fn rebuild_soon(workspace_id: Uuid) -> NewJob {
    let due = Utc::now() + chrono::Duration::from_std(REBUILD_AFTER).expect("a short delay");
    NewJob::new(REBUILD, json!({ "workspaceId": workspace_id }))
        .unique(workspace_id.to_string())
        .at(due)
}

pub fn rebuild_handler(metrics: Arc<dyn MetricsService>) -> JobHandler {
    Arc::new(move |job: Claimed| {
        let metrics = metrics.clone();
        Box::pin(async move {
            let workspace_id: Uuid = job.payload["workspaceId"]
                .as_str()
                .and_then(|id| id.parse().ok())
                .ok_or_else(|| format!("no workspaceId in {}", job.payload))?;
            match metrics.rebuild_workspace(workspace_id).await {
                // Deleted meanwhile: nothing to keep fresh.
                Ok(_) | Err(AppError::NotFound { .. }) => Ok(()),
                // Busy (another rebuild of it, or the fleet's cap), superseded or unavailable: retried.
                Err(err) => Err(err.to_string()),
            }
        })
    })
}
