use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use shaku::{Component, Interface};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;
use utoipa::ToSchema;

use crate::infra::database::Database;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ComponentStatus {
    Up,
    Down,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
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

#[async_trait]
pub trait HealthService: Interface {
    /// Database only: what a load balancer needs to route traffic here.
    async fn readiness(&self) -> HealthReport;
    /// Every component.
    async fn report(&self) -> HealthReport;
}

#[derive(Component)]
#[shaku(interface = HealthService)]
pub struct HealthChecks {
    #[shaku(inject)]
    db: Arc<dyn Database>,
    started: Instant,
}

impl HealthChecks {
    async fn database(&self) -> ComponentHealth {
        match self.db.ping().await {
            Ok(latency) => ComponentHealth {
                status: ComponentStatus::Up,
                latency_ms: Some(latency.as_secs_f64() * 1000.0),
                mode: None,
                message: None,
            },
            Err(err) => {
                log::warn!("health: database check failed: {err}");
                ComponentHealth {
                    status: ComponentStatus::Down,
                    latency_ms: None,
                    mode: None,
                    message: Some("database did not answer".into()),
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
        self.assemble(vec![("database", self.database().await)])
    }

    async fn report(&self) -> HealthReport {
        let disabled = |mode: Option<&str>| ComponentHealth {
            status: ComponentStatus::Disabled,
            latency_ms: None,
            mode: mode.map(str::to_owned),
            message: None,
        };
        self.assemble(vec![
            ("database", self.database().await),
            ("redis", disabled(None)),
            ("cache", disabled(Some("off"))),
        ])
    }
}
