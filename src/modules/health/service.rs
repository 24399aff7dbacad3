use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use shaku::{Component, Interface};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use utoipa::ToSchema;

use crate::infra::cache::{CacheMode, CacheService};
use crate::infra::database::Database;
use crate::infra::redis::breaker::BreakerState;
use crate::infra::redis::{FailureClass, RedisFailure, RedisService};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ComponentStatus {
    Up,
    Down,
    /// Working around a failing dependency (the cache while Redis is down: memory and Postgres).
    Degraded,
    Disabled,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ComponentHealth {
    pub status: ComponentStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// For a component that is down: what kind of failure (`refused`, `timeout`, `tls`, `auth`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<FailureClass>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub breaker: Option<BreakerState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscriber: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub l1_entries: Option<u64>,
}

impl ComponentHealth {
    fn new(status: ComponentStatus) -> Self {
        Self {
            status,
            latency_ms: None,
            mode: None,
            reason: None,
            message: None,
            breaker: None,
            subscriber: None,
            l1_entries: None,
        }
    }
}

/// `status` is `ok` when every component is up or disabled, `error` otherwise; `info` holds the
/// healthy components, `error` the failing ones, `details` all of them.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthReport {
    #[schema(example = "ok")]
    pub status: String,
    pub info: BTreeMap<String, ComponentHealth>,
    pub error: BTreeMap<String, ComponentHealth>,
    pub details: BTreeMap<String, ComponentHealth>,
    pub version: String,
    pub uptime_seconds: u64,
}

impl HealthReport {
    pub fn is_ok(&self) -> bool {
        self.error.is_empty()
    }
}

/// How long the answer of a round trip (a Postgres or a Redis ping) is reused: `/health` and
/// `/health/ready` then cost at most one round trip per server per second, however often they
/// are called. What the instance knows without asking (breaker, subscriber, cache mode) is live.
pub const PROBE_TTL: Duration = Duration::from_secs(1);

/// The last answer of one probe, reused for `PROBE_TTL`. One probe runs at a time: callers
/// arriving meanwhile wait for its answer instead of asking the server again.
#[derive(Default)]
struct Probe {
    last: tokio::sync::Mutex<Option<(Instant, ComponentHealth)>>,
}

impl Probe {
    async fn answer(&self, ask: impl Future<Output = ComponentHealth>) -> ComponentHealth {
        let mut last = self.last.lock().await;
        if let Some((answered, health)) = last.as_ref() {
            if answered.elapsed() < PROBE_TTL {
                return health.clone();
            }
        }
        let health = ask.await;
        // Timed from the answer: a probe that waited out its timeout is reused for a whole
        // second too, so a dead server is asked once a second, not once per call.
        *last = Some((Instant::now(), health.clone()));
        health
    }
}

#[async_trait]
pub trait HealthService: Interface {
    /// Database only: what a load balancer needs to route traffic here. Not ready from the
    /// moment the instance is told to stop (`begin_stopping`).
    async fn readiness(&self) -> HealthReport;
    /// Every component.
    async fn report(&self) -> HealthReport;
    /// The instance is going away (SIGTERM): readiness answers 503 from now on, so that load
    /// balancers stop routing here while it still serves.
    fn begin_stopping(&self);
}

#[derive(Component)]
#[shaku(interface = HealthService)]
pub struct HealthChecks {
    #[shaku(inject)]
    db: Arc<dyn Database>,
    #[shaku(inject)]
    cache: Arc<dyn CacheService>,
    #[shaku(inject)]
    redis: Arc<dyn RedisService>,
    started: Instant,
    #[shaku(force_default)]
    database_probe: Probe,
    #[shaku(force_default)]
    redis_probe: Probe,
    #[shaku(force_default)]
    stopping: AtomicBool,
}

impl HealthChecks {
    async fn database(&self) -> ComponentHealth {
        self.database_probe.answer(self.ping_database()).await
    }

    async fn ping_database(&self) -> ComponentHealth {
        match self.db.ping().await {
            Ok(latency) => ComponentHealth {
                latency_ms: Some(latency.as_secs_f64() * 1000.0),
                ..ComponentHealth::new(ComponentStatus::Up)
            },
            Err(err) => {
                log::warn!("health: database check failed: {err}");
                ComponentHealth {
                    message: Some("database did not answer".into()),
                    ..ComponentHealth::new(ComponentStatus::Down)
                }
            }
        }
    }

    /// Redis switched on but unusable is `down`, with the class of the failure; the app goes on
    /// without it (the cache is `degraded`) and stays ready.
    async fn redis_and_cache(&self) -> (ComponentHealth, ComponentHealth) {
        let status = self.cache.status();
        // Memory-synced mode uses Redis too (to keep the fleet in sync): checked the same way.
        let redis = match self.redis.is_syncing() {
            false => ComponentHealth::new(ComponentStatus::Disabled),
            true => {
                let mut health = self.redis_probe.answer(self.ping_redis()).await;
                health.breaker = self.redis.status().breaker;
                health.subscriber = Some(
                    if status.subscriber_connected {
                        "connected"
                    } else {
                        "disconnected"
                    }
                    .into(),
                );
                health
            }
        };
        let mode = status.mode;
        let cache = ComponentHealth {
            mode: Some(mode.as_str().to_owned()),
            l1_entries: Some(status.l1_entries),
            ..ComponentHealth::new(if mode == CacheMode::Degraded {
                ComponentStatus::Degraded
            } else {
                ComponentStatus::Up
            })
        };
        (redis, cache)
    }

    async fn ping_redis(&self) -> ComponentHealth {
        let ping = self.redis.ping().await;
        match ping {
            Ok(latency) => ComponentHealth {
                latency_ms: Some(latency.as_secs_f64() * 1000.0),
                ..ComponentHealth::new(ComponentStatus::Up)
            },
            Err(err) => {
                // When the breaker refused the ping, the last real failure tells why.
                let (class, message) = match err {
                    RedisFailure::CircuitOpen => self
                        .redis
                        .status()
                        .failure
                        .unwrap_or((FailureClass::CircuitOpen, err.to_string())),
                    err => (err.class(), err.to_string()),
                };
                ComponentHealth {
                    reason: Some(class),
                    message: Some(format!("serving without Redis: {message}")),
                    ..ComponentHealth::new(ComponentStatus::Down)
                }
            }
        }
    }

    fn assemble(&self, components: Vec<(&str, ComponentHealth)>) -> HealthReport {
        let mut report = HealthReport {
            status: String::new(),
            info: BTreeMap::new(),
            error: BTreeMap::new(),
            details: BTreeMap::new(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_seconds: self.started.elapsed().as_secs(),
        };
        for (name, health) in components {
            let bucket = if health.status == ComponentStatus::Down {
                &mut report.error
            } else {
                &mut report.info
            };
            bucket.insert(name.to_owned(), health.clone());
            report.details.insert(name.to_owned(), health);
        }
        report.status = if report.is_ok() { "ok" } else { "error" }.to_owned();
        report
    }
}

#[async_trait]
impl HealthService for HealthChecks {
    async fn readiness(&self) -> HealthReport {
        let mut components = vec![("database", self.database().await)];
        if self.stopping.load(Ordering::Relaxed) {
            components.push((
                "instance",
                ComponentHealth {
                    message: Some("stopping: finishing the requests in flight".into()),
                    ..ComponentHealth::new(ComponentStatus::Down)
                },
            ));
        }
        self.assemble(components)
    }

    async fn report(&self) -> HealthReport {
        let ((redis, cache), database) = tokio::join!(self.redis_and_cache(), self.database());
        self.assemble(vec![("database", database), ("redis", redis), ("cache", cache)])
    }

    fn begin_stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }
}
