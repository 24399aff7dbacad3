use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use shaku::{Component, Interface};
use std::sync::Arc;
use subtle::ConstantTimeEq;
use utoipa::{IntoParams, ToSchema};

use crate::error::{AppError, AppResult};
use crate::infra::cache::{CacheService, CacheStatus, NamespaceStats};
use crate::infra::redis::keys::Namespace;

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CacheStatsResponse {
    #[serde(flatten)]
    pub status: CacheStatus,
    pub namespaces: Vec<NamespaceStats>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CacheModeRequest {
    /// `false`: stop using Redis now (memory mode); `true`: use it again.
    pub redis: bool,
}

/// Exactly one of the two: a namespace (`tasks`, `task-lists`, ...) or a pattern under the prefix.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct FlushQuery {
    pub namespace: Option<String>,
    /// A Redis glob under `REDIS_KEY_PREFIX`, e.g. `nestling:tasks:*`.
    pub pattern: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FlushResponse {
    pub pattern: String,
    pub deleted: u64,
}

#[async_trait]
pub trait AdminService: Interface {
    /// 403 while `ADMIN_TOKEN` is unset, 401 for a wrong token (compared in constant time).
    fn authorize(&self, token: Option<&str>) -> AppResult<()>;
    fn cache_stats(&self) -> CacheStatsResponse;
    fn set_cache_mode(&self, request: CacheModeRequest) -> CacheStatus;
    async fn flush(&self, query: FlushQuery) -> AppResult<FlushResponse>;
}

#[derive(Component)]
#[shaku(interface = AdminService)]
pub struct Admin {
    #[shaku(inject)]
    cache: Arc<dyn CacheService>,
    admin_token: Option<String>,
}

#[async_trait]
impl AdminService for Admin {
    fn authorize(&self, token: Option<&str>) -> AppResult<()> {
        let Some(expected) = &self.admin_token else {
            return Err(AppError::Forbidden("admin endpoints are disabled: set ADMIN_TOKEN"));
        };
        match token {
            Some(token) if bool::from(token.as_bytes().ct_eq(expected.as_bytes())) => Ok(()),
            Some(_) => Err(AppError::Unauthorized {
                code: "invalid_admin_token",
                message: "admin token is wrong",
            }),
            None => Err(AppError::Unauthorized {
                code: "missing_token",
                message: "an Authorization: Bearer token is required",
            }),
        }
    }

    fn cache_stats(&self) -> CacheStatsResponse {
        CacheStatsResponse {
            status: self.cache.status(),
            namespaces: self.cache.stats(),
        }
    }

    fn set_cache_mode(&self, request: CacheModeRequest) -> CacheStatus {
        self.cache.set_redis_enabled(request.redis);
        self.cache.status()
    }

    async fn flush(&self, query: FlushQuery) -> AppResult<FlushResponse> {
        let prefix = self.cache.keys().prefix().to_owned();
        let pattern = match (query.namespace, query.pattern) {
            (Some(name), None) => {
                let namespace = Namespace::parse(&name)
                    .ok_or_else(|| AppError::invalid_field("namespace", "is not a cache namespace"))?;
                self.cache.keys().namespace_pattern(namespace)
            }
            (None, Some(pattern)) => {
                // Confined to our prefix, and naming at least a namespace: never "everything".
                let rest = pattern.strip_prefix(&prefix).unwrap_or("");
                if !pattern.starts_with(&prefix) || rest.is_empty() || rest.starts_with(['*', '?', '[']) {
                    return Err(AppError::invalid_field(
                        "pattern",
                        "must start with the key prefix and a namespace",
                    ));
                }
                pattern
            }
            _ => {
                return Err(AppError::bad_request(
                    "invalid_query",
                    "give exactly one of namespace or pattern",
                ))
            }
        };
        let deleted = self
            .cache
            .flush(&pattern)
            .await
            .map_err(|err| AppError::internal(format!("cache flush failed: {err}")))?;
        Ok(FlushResponse { pattern, deleted })
    }
}
