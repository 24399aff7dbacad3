use actix_web::{web, HttpResponse};

use super::service::{HealthReport, HealthService};
use crate::container::Inject;
use crate::infra::telemetry::MetricsRegistry;
use crate::modules::resource;

/// Mounted at the root.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/health").route(web::get().to(health)))
        .service(resource("/health/live").route(web::get().to(live)))
        .service(resource("/health/ready").route(web::get().to(ready)))
        .service(resource("/metrics").route(web::get().to(metrics)));
}

fn respond(report: HealthReport) -> HttpResponse {
    if report.is_ok() {
        HttpResponse::Ok().json(report)
    } else {
        HttpResponse::ServiceUnavailable().json(report)
    }
}

/// 200 while the process runs.
#[utoipa::path(get, path = "/health/live", tag = "health", operation_id = "get_liveness", responses((status = 200, description = "Alive")))]
pub async fn live() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

/// 200 when Postgres answers within `DATABASE_HEALTH_TIMEOUT_MS`, 503 otherwise (a ping's answer
/// is reused for a second), and 503 from the moment the instance is told to stop (SIGTERM).
#[utoipa::path(
    get, path = "/health/ready", tag = "health", operation_id = "get_readiness",
    responses((status = 200, body = HealthReport), (status = 503, description = "Database down, or the instance is stopping", body = HealthReport))
)]
pub async fn ready(checks: Inject<dyn HealthService>) -> HttpResponse {
    respond(checks.readiness().await)
}

/// Every component with its status and latency, plus version and uptime (a ping's answer is reused
/// for a second; breaker, subscriber and cache mode are live).
#[utoipa::path(
    get, path = "/health", tag = "health", operation_id = "get_health",
    responses((status = 200, body = HealthReport), (status = 503, description = "A component is down", body = HealthReport))
)]
pub async fn health(checks: Inject<dyn HealthService>) -> HttpResponse {
    respond(checks.report().await)
}

/// Prometheus metrics of this instance (text exposition format).
#[utoipa::path(
    get, path = "/metrics", tag = "health", operation_id = "get_metrics",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String))
)]
pub async fn metrics(registry: Inject<dyn MetricsRegistry>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(registry.render().await)
}
