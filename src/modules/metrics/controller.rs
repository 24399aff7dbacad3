use actix_web::{web, HttpResponse};
use uuid::Uuid;

use super::dto::{DailyMetrics, DailyMetricsQuery};
use super::service::MetricsService;
use crate::container::Inject;
use crate::error::{AppResult, ErrorBody};
use crate::modules::auth::AuthUser;
use crate::modules::cached_response;
use crate::modules::resource;

/// Mounted under `/api/workspaces`.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/{id}/metrics/daily").route(web::get().to(get_daily_metrics)));
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
) -> AppResult<HttpResponse> {
    Ok(cached_response(metrics.daily(me.id, *id, query.into_inner()).await?))
}
