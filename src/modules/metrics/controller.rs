use actix_web::{web, HttpResponse};
use uuid::Uuid;

use super::dto::{DailyMetrics, DailyMetricsQuery, MetricsRebuild};
use super::service::MetricsService;
use crate::container::Inject;
use crate::error::{AppResult, ErrorBody};
use crate::modules::auth::AuthUser;
use crate::modules::resource;
use crate::modules::{cached_response, CachedResponse};

/// Mounted under `/api/workspaces`.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/{id}/metrics/daily").route(web::get().to(get_daily_metrics)))
        .service(resource("/{id}/metrics/rebuild").route(web::post().to(rebuild_metrics)));
}

/// Per-day counts of created, completed and open tasks in a workspace.
#[utoipa::path(
    get, path = "/api/workspaces/{id}/metrics/daily", tag = "metrics", operation_id = "get_daily_metrics", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Workspace id"), DailyMetricsQuery),
    responses(
        (status = 200, body = DailyMetrics), (status = 400, description = "Bad dates or range", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
    )
)]
pub async fn get_daily_metrics(
    me: AuthUser,
    metrics: Inject<dyn MetricsService>,
    id: web::Path<Uuid>,
    query: web::Query<DailyMetricsQuery>,
) -> AppResult<CachedResponse> {
    Ok(cached_response(metrics.daily(me.id, *id, query.into_inner()).await?))
}

/// Recompute the workspace's stored daily metrics (owners only). Runs under the workspace's lock
/// with a fenced write, at most `METRICS_REBUILD_CONCURRENCY` at once across the fleet (`429`
/// with `Retry-After` beyond that). The answers of `GET …/metrics/daily` do not change.
#[utoipa::path(
    post, path = "/api/workspaces/{id}/metrics/rebuild", tag = "metrics", operation_id = "rebuild_metrics", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Workspace id")),
    responses(
        (status = 200, body = MetricsRebuild), (status = 401, body = ErrorBody),
        (status = 403, description = "Not an owner", body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "Another rebuild of the workspace is running (`rebuild_in_progress`), or a newer one wrote first (`rebuild_superseded`)", body = ErrorBody),
        (status = 503, description = "Locks are unavailable (`locks_unavailable`): retry after `Retry-After` seconds", body = ErrorBody),
    )
)]
pub async fn rebuild_metrics(
    me: AuthUser,
    metrics: Inject<dyn MetricsService>,
    id: web::Path<Uuid>,
) -> AppResult<HttpResponse> {
    Ok(HttpResponse::Ok().json(metrics.rebuild(me.id, *id).await?))
}
