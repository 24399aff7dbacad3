use actix_web::dev::Payload;
use actix_web::{web, FromRequest, HttpRequest, HttpResponse};
use futures_util::future::LocalBoxFuture;
use shaku::HasComponent;
use std::sync::Arc;

use super::service::{
    AdminService, CacheModeRequest, CacheModeResponse, CacheStatsResponse, FlushQuery, FlushResponse, JobsOverview,
    KeyDistribution, RedisHealth, RedisMetrics, RetriedJob, SlowlogEntry, WarmRequest, WarmResponse,
};
use crate::container::{AppModule, Inject};
use crate::error::{AppError, AppResult, ErrorBody, JsonBody};
use crate::modules::auth::dto::EndedSessions;
use crate::modules::auth::extractor::bearer_token;
use crate::modules::resource;

/// Mounted under `/admin`.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/cache").route(web::delete().to(flush_cache)))
        .service(resource("/cache/stats").route(web::get().to(get_cache_stats)))
        .service(resource("/cache/mode").route(web::post().to(set_cache_mode)))
        .service(resource("/cache/warm").route(web::post().to(warm_cache)))
        .service(resource("/redis/health").route(web::get().to(get_redis_health)))
        .service(resource("/redis/metrics").route(web::get().to(get_redis_metrics)))
        .service(resource("/redis/slowlog").route(web::get().to(get_redis_slowlog)))
        .service(resource("/redis/keys").route(web::get().to(get_redis_keys)))
        .service(resource("/users/{id}/sessions").route(web::delete().to(delete_user_sessions)))
        .service(resource("/jobs").route(web::get().to(list_jobs)))
        .service(resource("/jobs/{id}/retry").route(web::post().to(retry_job)));
}

/// Put it in a handler's arguments and the route needs `Authorization: Bearer <ADMIN_TOKEN>`, or
/// the bearer token of a user with the admin role.
pub struct AdminAuth;

impl FromRequest for AdminAuth {
    type Error = AppError;
    type Future = LocalBoxFuture<'static, Result<Self, AppError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let token = bearer_token(req).map(str::to_owned);
        let admin: Option<Arc<dyn AdminService>> = req.app_data::<Arc<AppModule>>().map(|m| m.resolve());
        Box::pin(async move {
            let admin = admin.ok_or_else(|| AppError::internal("AppModule missing from app data"))?;
            admin.authorize(token.as_deref()).await.map(|()| AdminAuth)
        })
    }
}

/// Cache mode, breaker, subscriber, and per namespace: hits, misses, hit rate, L1 entries.
#[utoipa::path(
    get, path = "/admin/cache/stats", tag = "admin", operation_id = "get_cache_stats", security(("admin" = [])),
    responses(
        (status = 200, body = CacheStatsResponse), (status = 401, body = ErrorBody),
        (status = 403, description = "A user without the admin role", body = ErrorBody),
    )
)]
pub async fn get_cache_stats(_admin: AdminAuth, admin: Inject<dyn AdminService>) -> HttpResponse {
    HttpResponse::Ok().json(admin.cache_stats().await)
}

/// Switch caching in Redis off or on without a restart: on this instance, or (`"scope": "fleet"`)
/// on every instance that hears the fleet through Redis.
#[utoipa::path(
    post, path = "/admin/cache/mode", tag = "admin", operation_id = "set_cache_mode", security(("admin" = [])),
    request_body = CacheModeRequest,
    responses((status = 200, body = CacheModeResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody))
)]
pub async fn set_cache_mode(
    _admin: AdminAuth,
    admin: Inject<dyn AdminService>,
    body: JsonBody<CacheModeRequest>,
) -> AppResult<HttpResponse> {
    Ok(HttpResponse::Ok().json(admin.set_cache_mode(body.into_inner()).await?))
}

/// Delete a namespace (or a pattern under the key prefix) with SCAN + UNLINK; never KEYS or FLUSHDB.
#[utoipa::path(
    delete, path = "/admin/cache", tag = "admin", operation_id = "flush_cache", security(("admin" = [])),
    params(FlushQuery),
    responses(
        (status = 200, body = FlushResponse),
        (status = 400, description = "Unknown namespace, or a pattern outside the prefix", body = ErrorBody),
        (status = 409, description = "Redis did not answer (nothing or part deleted)", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
    )
)]
pub async fn flush_cache(
    _admin: AdminAuth,
    admin: Inject<dyn AdminService>,
    query: web::Query<FlushQuery>,
) -> AppResult<HttpResponse> {
    Ok(HttpResponse::Ok().json(admin.flush(query.into_inner()).await?))
}

/// Load the hot entries of a workspace: it, its members, its projects and their first task pages.
#[utoipa::path(
    post, path = "/admin/cache/warm", tag = "admin", operation_id = "warm_cache", security(("admin" = [])),
    request_body = WarmRequest,
    responses(
        (status = 200, body = WarmResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
    )
)]
pub async fn warm_cache(
    _admin: AdminAuth,
    admin: Inject<dyn AdminService>,
    body: JsonBody<WarmRequest>,
) -> AppResult<HttpResponse> {
    Ok(HttpResponse::Ok().json(admin.warm(body.into_inner()).await?))
}

/// PING latency, breaker, subscriber and pool of this instance's Redis connection.
#[utoipa::path(
    get, path = "/admin/redis/health", tag = "admin", operation_id = "get_redis_health", security(("admin" = [])),
    responses(
        (status = 200, body = RedisHealth), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, description = "Redis is disabled (memory mode)", body = ErrorBody),
    )
)]
pub async fn get_redis_health(_admin: AdminAuth, admin: Inject<dyn AdminService>) -> AppResult<HttpResponse> {
    Ok(HttpResponse::Ok().json(admin.redis_health().await?))
}

/// Selected INFO fields: memory, clients, ops/s, keyspace hit rate.
#[utoipa::path(
    get, path = "/admin/redis/metrics", tag = "admin", operation_id = "get_redis_metrics", security(("admin" = [])),
    responses(
        (status = 200, body = RedisMetrics), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, description = "Redis is disabled or did not answer", body = ErrorBody),
    )
)]
pub async fn get_redis_metrics(_admin: AdminAuth, admin: Inject<dyn AdminService>) -> AppResult<HttpResponse> {
    Ok(HttpResponse::Ok().json(admin.redis_metrics().await?))
}

/// Keys per namespace from a sampling SCAN under the prefix (never KEYS), and memory against
/// `maxmemory`.
#[utoipa::path(
    get, path = "/admin/redis/keys", tag = "admin", operation_id = "get_redis_keys", security(("admin" = [])),
    responses(
        (status = 200, body = KeyDistribution), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, description = "Redis is disabled or did not answer", body = ErrorBody),
    )
)]
pub async fn get_redis_keys(_admin: AdminAuth, admin: Inject<dyn AdminService>) -> AppResult<HttpResponse> {
    Ok(HttpResponse::Ok().json(admin.redis_keys().await?))
}

/// The 25 most recent slow commands (SLOWLOG GET).
#[utoipa::path(
    get, path = "/admin/redis/slowlog", tag = "admin", operation_id = "get_redis_slowlog", security(("admin" = [])),
    responses(
        (status = 200, body = Vec<SlowlogEntry>), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, description = "Redis is disabled or did not answer", body = ErrorBody),
    )
)]
pub async fn get_redis_slowlog(_admin: AdminAuth, admin: Inject<dyn AdminService>) -> AppResult<HttpResponse> {
    Ok(HttpResponse::Ok().json(admin.redis_slowlog().await?))
}

/// End every session of a user (a lost laptop, a compromised account): each of their tokens
/// stops working on every instance. `nestling admin end-sessions <email>` does the same.
#[utoipa::path(
    delete, path = "/admin/users/{id}/sessions", tag = "admin", operation_id = "delete_user_sessions", security(("admin" = [])),
    params(("id" = uuid::Uuid, Path, description = "User id")),
    responses(
        (status = 200, body = EndedSessions), (status = 400, description = "Bad id", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, description = "No such user", body = ErrorBody),
    )
)]
pub async fn delete_user_sessions(
    _admin: AdminAuth,
    admin: Inject<dyn AdminService>,
    id: web::Path<uuid::Uuid>,
) -> AppResult<HttpResponse> {
    Ok(HttpResponse::Ok().json(admin.end_user_sessions(*id).await?))
}

/// The job queue: jobs by queue and state (with the due backlog and its oldest job's wait), and
/// the 100 most recent dead jobs with their errors. `nestling jobs list` shows the same.
#[utoipa::path(
    get, path = "/admin/jobs", tag = "admin", operation_id = "list_jobs", security(("admin" = [])),
    responses((status = 200, body = JobsOverview), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody))
)]
pub async fn list_jobs(_admin: AdminAuth, admin: Inject<dyn AdminService>) -> AppResult<HttpResponse> {
    Ok(HttpResponse::Ok().json(admin.jobs().await?))
}

/// Queue a dead job again, its attempts reset: this instance runs it at once if it serves the job's
/// queue, the others take it at their next poll. `nestling jobs retry <id>` does the same.
#[utoipa::path(
    post, path = "/admin/jobs/{id}/retry", tag = "admin", operation_id = "retry_job", security(("admin" = [])),
    params(("id" = i64, Path, description = "Job id")),
    responses(
        (status = 200, body = RetriedJob), (status = 400, description = "Bad id", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, description = "No dead job has this id (`job_not_found`), or a queued job of its kind holds its unique key", body = ErrorBody),
    )
)]
pub async fn retry_job(
    _admin: AdminAuth,
    admin: Inject<dyn AdminService>,
    id: web::Path<i64>,
) -> AppResult<HttpResponse> {
    Ok(HttpResponse::Ok().json(admin.retry_job(*id).await?))
}
