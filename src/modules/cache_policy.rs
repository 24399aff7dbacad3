//! `GET /api/cache/policy` and `GET /api/rate-limit/policy`: the TTL table and the rate-limit
//! policies in force, as clients and operators see them.

use actix_web::{web, HttpResponse};
use serde::Serialize;
use utoipa::ToSchema;

use crate::container::Inject;
use crate::error::ErrorBody;
use crate::infra::cache::CacheService;
use crate::infra::rate_limit::middleware::RateLimit;
use crate::infra::rate_limit::{RateLimitStatus, RateLimiter};
use crate::infra::redis::keys::Namespace;
use crate::modules::auth::AuthUser;
use crate::modules::resource;

/// Mounted at the root.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        resource("/api/cache/policy")
            .wrap(RateLimit::api())
            .route(web::get().to(get_cache_policy)),
    )
    .service(
        resource("/api/rate-limit/policy")
            .wrap(RateLimit::api())
            .route(web::get().to(get_rate_limit_policy)),
    );
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CachePolicyEntry {
    pub namespace: Namespace,
    pub ttl_seconds: u64,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CachePolicy {
    /// `memory`, `redis` or `degraded`.
    pub mode: crate::infra::cache::CacheMode,
    pub key_prefix: String,
    pub ttl_jitter_percent: u8,
    pub namespaces: Vec<CachePolicyEntry>,
}

/// The TTL of every cache namespace (from the TTL table) and the cache mode in force.
#[utoipa::path(
    get, path = "/api/cache/policy", tag = "cache", operation_id = "get_cache_policy", security(("bearer" = [])),
    responses((status = 200, body = CachePolicy), (status = 401, body = ErrorBody))
)]
pub async fn get_cache_policy(_me: AuthUser, cache: Inject<dyn CacheService>) -> HttpResponse {
    let keys = cache.keys();
    HttpResponse::Ok().json(CachePolicy {
        mode: cache.status().mode,
        key_prefix: keys.prefix().to_owned(),
        ttl_jitter_percent: cache.ttl_jitter_percent(),
        namespaces: Namespace::ALL
            .iter()
            .copied()
            .map(|namespace| CachePolicyEntry {
                namespace,
                ttl_seconds: keys.ttl(namespace).as_secs(),
            })
            .collect(),
    })
}

/// The rate-limit policies in force: per route group, each quota with its window, and what an
/// instance enforces alone when Redis is not used.
#[utoipa::path(
    get, path = "/api/rate-limit/policy", tag = "cache", operation_id = "get_rate_limit_policy", security(("bearer" = [])),
    responses((status = 200, body = RateLimitStatus), (status = 401, body = ErrorBody))
)]
pub async fn get_rate_limit_policy(_me: AuthUser, limiter: Inject<dyn RateLimiter>) -> HttpResponse {
    HttpResponse::Ok().json(limiter.status())
}
