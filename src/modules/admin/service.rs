use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use shaku::{Component, Interface};
use std::sync::Arc;
use subtle::ConstantTimeEq;
use utoipa::{IntoParams, ToSchema};

use crate::error::{AppError, AppResult};
use crate::infra::cache::{CacheService, CacheStatus, NamespaceStats};
use crate::infra::jobs::{DeadJob, JobQueue, QueueCount};
use crate::infra::redis::keys::Namespace;
use crate::infra::redis::{info_field, Redis, RedisFailure, RedisService, ScanCursor};
use crate::modules::auth::dto::EndedSessions;
use crate::modules::auth::extractor::MISSING_TOKEN;
use crate::modules::auth::service::AuthService;
use crate::modules::projects::model::Project;
use crate::modules::projects::service::ProjectService;
use crate::modules::tasks::dto::TaskQuery;
use crate::modules::tasks::service::TaskService;
use crate::modules::users::repository::UserRepository;
use crate::modules::workspaces::model::Role;
use crate::modules::workspaces::repository::WorkspaceRepository;
use crate::modules::workspaces::service::WorkspaceService;

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
    /// `false`: stop caching in Redis now (memory, or memory-synced with `REDIS_URL` set);
    /// `true`: cache in it again.
    pub redis: bool,
    #[serde(default)]
    pub scope: SwitchScope,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SwitchScope {
    /// This instance only.
    #[default]
    Instance,
    /// Every instance that hears the fleet through Redis (redis and memory-synced modes), by
    /// one pub/sub message. Instances in strict memory mode do not hear it.
    Fleet,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CacheModeResponse {
    /// This instance, after the switch.
    #[serde(flatten)]
    pub status: CacheStatus,
    /// With `"scope": "fleet"`: the instances the switch reached, this one included.
    pub instances_reached: Option<u64>,
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

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedisHealth {
    pub latency_ms: Option<f64>,
    pub error: Option<String>,
    pub breaker: crate::infra::redis::breaker::BreakerState,
    pub subscriber_connected: bool,
    pub pool_connections: u32,
    pub pool_idle: u32,
    pub pool_gets_waited: u64,
    pub pool_gets_timed_out: u64,
}

/// Selected `INFO` fields.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedisMetrics {
    pub redis_version: String,
    pub used_memory_bytes: u64,
    pub used_memory_human: String,
    pub connected_clients: u64,
    pub ops_per_sec: u64,
    pub keyspace_hits: u64,
    pub keyspace_misses: u64,
    pub keyspace_hit_rate: f64,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SlowlogEntry {
    pub id: u64,
    pub timestamp: u64,
    pub duration_micros: u64,
    pub command: Vec<String>,
}

/// Keys under the prefix per namespace, from a sampling SCAN (`complete` when it saw them all).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyDistribution {
    pub sampled: u64,
    pub complete: bool,
    /// Cache namespaces, then `rate-limits`, `versions` (fill versions) and `other`.
    pub namespaces: Vec<NamespaceKeys>,
    pub memory: RedisMemory,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceKeys {
    pub namespace: String,
    pub keys: u64,
    /// Of the sampled keys.
    pub share: f64,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedisMemory {
    pub used_bytes: u64,
    /// `maxmemory`; 0 when Redis has no limit.
    pub max_bytes: u64,
    /// `used / max`; null without a limit.
    pub share: Option<f64>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WarmRequest {
    pub workspace_id: uuid::Uuid,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WarmResponse {
    /// Entries loaded or confirmed: the workspace, its members, project list, projects and the
    /// first page of each project's tasks.
    pub entries: u64,
}

/// The job queue as operators see it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobsOverview {
    /// Jobs by queue and state (`queued`, `running`, `done` until purged, `dead`).
    pub queues: Vec<QueueCount>,
    /// The most recent dead jobs (at most 100), newest first, each with its error.
    pub dead: Vec<DeadJob>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetriedJob {
    pub retried: bool,
}

/// Dead jobs `GET /admin/jobs` lists.
pub const DEAD_JOBS_SHOWN: i64 = 100;

#[async_trait]
pub trait AdminService: Interface {
    /// Lets `ADMIN_TOKEN` (compared in constant time) or a signed-in user with the admin role in:
    /// 401 without a token or with one that is neither, 403 for a user without the role.
    async fn authorize(&self, token: Option<&str>) -> AppResult<()>;
    async fn cache_stats(&self) -> CacheStatsResponse;
    async fn set_cache_mode(&self, request: CacheModeRequest) -> AppResult<CacheModeResponse>;
    async fn flush(&self, query: FlushQuery) -> AppResult<FlushResponse>;
    async fn redis_health(&self) -> AppResult<RedisHealth>;
    async fn redis_metrics(&self) -> AppResult<RedisMetrics>;
    async fn redis_slowlog(&self) -> AppResult<Vec<SlowlogEntry>>;
    async fn redis_keys(&self) -> AppResult<KeyDistribution>;
    async fn warm(&self, request: WarmRequest) -> AppResult<WarmResponse>;
    /// Ends every session of the user on every instance; 404 for an unknown user.
    async fn end_user_sessions(&self, user_id: uuid::Uuid) -> AppResult<EndedSessions>;
    /// The same, for the user with this email (`nestling admin end-sessions`).
    async fn end_sessions_by_email(&self, email: &str) -> AppResult<EndedSessions>;
    async fn jobs(&self) -> AppResult<JobsOverview>;
    /// Queues a dead job again, its attempts reset; 404 when no dead job has this id (or a queued
    /// job of its kind holds its unique key: that one will do the work).
    async fn retry_job(&self, id: i64) -> AppResult<RetriedJob>;
}

fn redis_unavailable(err: RedisFailure) -> AppError {
    AppError::conflict("redis_unavailable", format!("Redis did not answer: {err}"))
}

#[derive(Component)]
#[shaku(interface = AdminService)]
pub struct Admin {
    #[shaku(inject)]
    cache: Arc<dyn CacheService>,
    #[shaku(inject)]
    redis: Arc<dyn RedisService>,
    #[shaku(inject)]
    workspaces: Arc<dyn WorkspaceService>,
    #[shaku(inject)]
    workspace_repository: Arc<dyn WorkspaceRepository>,
    #[shaku(inject)]
    projects: Arc<dyn ProjectService>,
    #[shaku(inject)]
    tasks: Arc<dyn TaskService>,
    #[shaku(inject)]
    auth: Arc<dyn AuthService>,
    #[shaku(inject)]
    users: Arc<dyn UserRepository>,
    #[shaku(inject)]
    job_queue: Arc<dyn JobQueue>,
    admin_token: Option<String>,
}

impl Admin {
    fn active_redis(&self) -> AppResult<&Redis> {
        if !self.redis.is_enabled() {
            return Err(AppError::conflict("redis_disabled", "Redis is disabled (memory mode)"));
        }
        self.redis.active().ok_or_else(|| {
            let failure = self.redis.status().failure.map(|(_, message)| message);
            redis_unavailable(RedisFailure::Config(failure.unwrap_or_default()))
        })
    }
}

/// Keys a distribution samples at most: enough for shares, bounded for a Redis of millions.
const KEY_SAMPLE: u64 = 100_000;

#[async_trait]
impl AdminService for Admin {
    async fn authorize(&self, token: Option<&str>) -> AppResult<()> {
        let token = token.ok_or(MISSING_TOKEN)?;
        if let Some(expected) = &self.admin_token {
            if bool::from(token.as_bytes().ct_eq(expected.as_bytes())) {
                return Ok(());
            }
        }
        let user_id = self.auth.authenticate(token).await.map_err(|err| match err {
            AppError::Unauthorized { .. } => AppError::Unauthorized {
                code: "invalid_admin_token",
                message: "the token is neither ADMIN_TOKEN nor a signed-in user's",
            },
            other => other,
        })?;
        if self.users.is_admin(user_id).await? {
            Ok(())
        } else {
            Err(AppError::Forbidden("the admin role is required"))
        }
    }

    async fn cache_stats(&self) -> CacheStatsResponse {
        CacheStatsResponse {
            namespaces: self.cache.stats().await,
            status: self.cache.status(),
        }
    }

    async fn set_cache_mode(&self, request: CacheModeRequest) -> AppResult<CacheModeResponse> {
        let instances_reached = match request.scope {
            SwitchScope::Instance => {
                self.cache.set_redis_enabled(request.redis);
                None
            }
            SwitchScope::Fleet => Some(self.cache.set_fleet_redis_enabled(request.redis).await.map_err(
                |err| match err {
                    RedisFailure::Disabled => AppError::conflict(
                        "fleet_unreachable",
                        "this instance is in strict memory mode (no REDIS_URL): it cannot reach the fleet",
                    ),
                    err => redis_unavailable(err),
                },
            )?),
        };
        Ok(CacheModeResponse {
            status: self.cache.status(),
            instances_reached,
        })
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
                // Confined to our prefix and one cache namespace, named literally: never
                // "everything", never the fill versions (deleting them would let a stale fill in)
                // nor the rate limits. Character classes are refused: L1 follows `*` and `?` only.
                let names_a_namespace = pattern
                    .strip_prefix(&prefix)
                    .and_then(|rest| rest.split_once(':'))
                    .is_some_and(|(namespace, _)| Namespace::parse(namespace).is_some());
                if !names_a_namespace || pattern.contains('[') {
                    return Err(AppError::invalid_field(
                        "pattern",
                        "must start with the key prefix and a cache namespace, e.g. nestling:tasks:*",
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
        let deleted = self.cache.flush(&pattern).await.map_err(redis_unavailable)?;
        Ok(FlushResponse { pattern, deleted })
    }

    async fn redis_health(&self) -> AppResult<RedisHealth> {
        let redis = self.active_redis()?;
        let ping = self.redis.ping().await;
        let (connections, idle, stats) = redis.pool_statistics();
        Ok(RedisHealth {
            latency_ms: ping.as_ref().ok().map(|d| d.as_secs_f64() * 1000.0),
            error: ping.err().map(|e| e.to_string()),
            breaker: redis.breaker_state(),
            subscriber_connected: self.cache.status().subscriber_connected,
            pool_connections: connections,
            pool_idle: idle,
            pool_gets_waited: stats.get_waited,
            pool_gets_timed_out: stats.get_timed_out,
        })
    }

    async fn redis_metrics(&self) -> AppResult<RedisMetrics> {
        let redis = self.active_redis()?;
        let info = redis.info("default").await.map_err(redis_unavailable)?;
        let number = |name: &str| info_field(&info, name).and_then(|v| v.parse().ok()).unwrap_or(0u64);
        let (hits, misses) = (number("keyspace_hits"), number("keyspace_misses"));
        Ok(RedisMetrics {
            redis_version: info_field(&info, "redis_version").unwrap_or_default().to_owned(),
            used_memory_bytes: number("used_memory"),
            used_memory_human: info_field(&info, "used_memory_human").unwrap_or_default().to_owned(),
            connected_clients: number("connected_clients"),
            ops_per_sec: number("instantaneous_ops_per_sec"),
            keyspace_hits: hits,
            keyspace_misses: misses,
            keyspace_hit_rate: if hits + misses == 0 {
                0.0
            } else {
                hits as f64 / (hits + misses) as f64
            },
        })
    }

    async fn redis_keys(&self) -> AppResult<KeyDistribution> {
        let redis = self.active_redis()?;
        let keys = self.cache.keys();
        let pattern = format!("{}*", keys.prefix());
        let mut counts: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
        let (mut cursor, mut sampled) = (ScanCursor::default(), 0u64);
        // SCAN until the sample is big enough.
        while !cursor.done() && sampled < KEY_SAMPLE {
            for key in redis.scan(&mut cursor, &pattern).await.map_err(redis_unavailable)? {
                sampled += 1;
                *counts.entry(keys.kind_of(&key).to_owned()).or_default() += 1;
            }
        }
        let info = redis.info("memory").await.map_err(redis_unavailable)?;
        let number = |name: &str| info_field(&info, name).and_then(|v| v.parse().ok()).unwrap_or(0u64);
        let (used_bytes, max_bytes) = (number("used_memory"), number("maxmemory"));
        Ok(KeyDistribution {
            sampled,
            complete: cursor.done(),
            namespaces: counts
                .into_iter()
                .map(|(namespace, keys)| NamespaceKeys {
                    namespace,
                    keys,
                    share: keys as f64 / sampled.max(1) as f64,
                })
                .collect(),
            memory: RedisMemory {
                used_bytes,
                max_bytes,
                share: (max_bytes > 0).then(|| used_bytes as f64 / max_bytes as f64),
            },
        })
    }

    async fn redis_slowlog(&self) -> AppResult<Vec<SlowlogEntry>> {
        let redis = self.active_redis()?;
        type Raw = Vec<(u64, u64, u64, Vec<String>)>;
        let raw: Vec<bb8_redis::redis::Value> = redis
            .call(|mut c| async move {
                bb8_redis::redis::cmd("SLOWLOG")
                    .arg("GET")
                    .arg(25)
                    .query_async(&mut c)
                    .await
            })
            .await
            .map_err(redis_unavailable)?;
        // Entries have 4 fields (6 since Redis 4: client address and name follow); keep the first 4.
        let entries: Raw = raw
            .into_iter()
            .filter_map(|entry| match entry {
                bb8_redis::redis::Value::Array(fields) if fields.len() >= 4 => {
                    let fields: Vec<_> = fields.into_iter().take(4).collect();
                    bb8_redis::redis::FromRedisValue::from_redis_value(bb8_redis::redis::Value::Array(fields)).ok()
                }
                _ => None,
            })
            .collect();
        Ok(entries
            .into_iter()
            .map(|(id, timestamp, duration_micros, command)| SlowlogEntry {
                id,
                timestamp,
                duration_micros,
                command,
            })
            .collect())
    }

    async fn warm(&self, request: WarmRequest) -> AppResult<WarmResponse> {
        let workspace_id = request.workspace_id;
        // Load through the services, as the workspace's first owner would: the same keys, the same bytes.
        let owner = self
            .workspace_repository
            .members(workspace_id)
            .await?
            .into_iter()
            .find(|m| m.role == Role::Owner)
            .ok_or(AppError::not_found("workspace"))?;
        let user = owner.user_id;
        self.workspaces.get(user, workspace_id).await?;
        self.workspaces.members(user, workspace_id).await?;
        let list = self.projects.list(user, workspace_id).await?;
        let projects: Vec<Project> = crate::modules::from_json_bytes(&list.bytes)?;
        let mut entries = 3;
        for project in &projects {
            self.projects.get(user, project.id).await?;
            self.tasks.list(user, project.id, TaskQuery::default()).await?;
            entries += 2;
        }
        Ok(WarmResponse { entries })
    }

    async fn end_user_sessions(&self, user_id: uuid::Uuid) -> AppResult<EndedSessions> {
        self.users.find(user_id).await?.ok_or(AppError::not_found("user"))?;
        let ended = self.auth.end_sessions(user_id, None).await?;
        log::info!("admin: ended {ended} session(s) of user {user_id}");
        Ok(EndedSessions { ended })
    }

    async fn end_sessions_by_email(&self, email: &str) -> AppResult<EndedSessions> {
        let user = self.users.find_by_email(email).await?;
        let user = user.ok_or(AppError::not_found("user"))?;
        self.end_user_sessions(user.id).await
    }

    async fn jobs(&self) -> AppResult<JobsOverview> {
        Ok(JobsOverview {
            queues: self.job_queue.counts().await?,
            dead: self.job_queue.dead(DEAD_JOBS_SHOWN).await?,
        })
    }

    async fn retry_job(&self, id: i64) -> AppResult<RetriedJob> {
        if !self.job_queue.retry(id).await? {
            return Err(AppError::not_found("job"));
        }
        log::info!("admin: dead job {id} queued again");
        Ok(RetriedJob { retried: true })
    }
}
