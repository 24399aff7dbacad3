//! THE composition root: every component, listed once, in dependency order. Pools are created
//! before the module (async set-up) and passed in as component parameters.

use std::time::Instant;

use shaku::module;
use sqlx::PgPool;

use crate::config::Settings;
use crate::infra::cache::{TieredCache, TieredCacheParameters};
use crate::infra::database::{PgDatabase, PgDatabaseParameters};
use crate::infra::events::{OutboxEventBus, OutboxEventBusParameters};
use crate::infra::idempotency::{PgIdempotencyStore, PgIdempotencyStoreParameters};
use crate::infra::jobs::{PgJobQueue, PgJobQueueParameters};
use crate::infra::locks::{FencedLocks, FencedLocksParameters, LeasedSemaphore, LeasedSemaphoreParameters};
use crate::infra::rate_limit::{RedisRateLimiter, RedisRateLimiterParameters};
use crate::infra::redis::keys::KeyRegistry;
use crate::infra::redis::{RedisModule, RedisModuleParameters};
use crate::infra::telemetry::{PrometheusMetrics, PrometheusMetricsParameters, Telemetry};
use crate::modules::admin::service::{Admin, AdminParameters};
use crate::modules::auth::caller::BearerCaller;
use crate::modules::auth::password::{Argon2Hasher, Argon2HasherParameters};
use crate::modules::auth::repository::PgTokenRepository;
use crate::modules::auth::service::{Auth, AuthParameters};
use crate::modules::health::service::{HealthChecks, HealthChecksParameters};
use crate::modules::metrics::repository::PgMetricsRepository;
use crate::modules::metrics::service::{Metrics, MetricsParameters};
use crate::modules::projects::repository::PgProjectRepository;
use crate::modules::projects::service::Projects;
use crate::modules::tasks::repository::PgTaskRepository;
use crate::modules::tasks::service::{Tasks, TasksParameters};
use crate::modules::users::repository::PgUserRepository;
use crate::modules::users::service::Users;
use crate::modules::workspaces::repository::PgWorkspaceRepository;
use crate::modules::workspaces::service::Workspaces;
// @generate: imports

module! {
    pub AppModule {
        components = [
            // infrastructure
            PgDatabase, RedisModule, TieredCache, RedisRateLimiter, Argon2Hasher,
            PgIdempotencyStore,
            FencedLocks, LeasedSemaphore, OutboxEventBus, PgJobQueue, PrometheusMetrics,
            // repositories: all SQL
            PgUserRepository, PgTokenRepository, PgWorkspaceRepository, PgProjectRepository,
            PgTaskRepository, PgMetricsRepository,
            // services: rules
            Auth, BearerCaller, Users, Workspaces, Projects, Tasks, Metrics, HealthChecks,
            Admin,
            // @generate: components
        ],
        providers = []
    }
}

/// shaku wants component parameters to have a `Default`; those of the hand-built components
/// (which construct state, threads or pools) have none that makes sense: `builder` sets them all.
macro_rules! set_by_the_container {
    ($parameters:ty) => {
        impl Default for $parameters {
            fn default() -> Self {
                panic!(concat!("container::builder sets ", stringify!($parameters)))
            }
        }
    };
}
pub(crate) use set_by_the_container;

/// What handlers take to get a service: `tasks: Inject<dyn TaskService>`.
pub type Inject<I> = shaku_actix::Inject<AppModule, I>;

/// The module builder with every parameter set; tests add `with_component_override` before `build`.
pub fn builder(settings: &Settings, pool: PgPool) -> shaku::ModuleBuilder<AppModule> {
    let telemetry = Telemetry::new();
    AppModule::builder()
        .with_component_parameters::<PrometheusMetrics>(PrometheusMetricsParameters {
            telemetry: telemetry.clone(),
        })
        .with_component_parameters::<PgDatabase>(PgDatabaseParameters {
            pool,
            statement_timeout: settings.database.statement_timeout,
            health_timeout: settings.database.health_timeout,
        })
        .with_component_parameters::<PgIdempotencyStore>(PgIdempotencyStoreParameters {
            ttl: settings.idempotency.ttl,
            // Half the pool: the other half serves the reads these requests make meanwhile.
            turns: std::sync::Arc::new(tokio::sync::Semaphore::new(
                (settings.database.max_connections as usize / 2).max(1),
            )),
            turn_wait: settings.database.acquire_timeout,
            last_prune: Default::default(),
            telemetry: telemetry.clone(),
        })
        .with_component_parameters::<RedisModule>(RedisModuleParameters {
            settings: settings.redis.clone(),
            keys: KeyRegistry::new(settings.redis.key_prefix.clone(), settings.ttl.clone()),
            telemetry: telemetry.clone(),
        })
        .with_component_parameters::<TieredCache>(TieredCacheParameters {
            settings: settings.cache.clone(),
            telemetry: telemetry.clone(),
        })
        .with_component_parameters::<RedisRateLimiter>(RedisRateLimiterParameters {
            settings: settings.rate_limit.clone(),
            telemetry: telemetry.clone(),
        })
        .with_component_parameters::<FencedLocks>(FencedLocksParameters {
            telemetry: telemetry.clone(),
            store_timeout: settings.locks.store_timeout,
        })
        .with_component_parameters::<PgJobQueue>(PgJobQueueParameters {
            settings: settings.jobs.clone(),
            telemetry: telemetry.clone(),
        })
        .with_component_parameters::<OutboxEventBus>(OutboxEventBusParameters {
            settings: settings.events.clone(),
            telemetry: telemetry.clone(),
        })
        .with_component_parameters::<LeasedSemaphore>(LeasedSemaphoreParameters {
            telemetry,
            store_timeout: settings.locks.store_timeout,
        })
        .with_component_parameters::<Argon2Hasher>(Argon2HasherParameters {
            settings: settings.passwords.clone(),
        })
        .with_component_parameters::<Admin>(AdminParameters {
            admin_token: settings.app.admin_token.clone(),
        })
        .with_component_parameters::<Auth>(AuthParameters {
            token_ttl: settings.ttl.auth_token,
            sessions: Default::default(),
            sliding: settings.app.auth_token_sliding,
            last_use: Default::default(),
        })
        .with_component_parameters::<Metrics>(MetricsParameters {
            rebuild_concurrency: settings.locks.metrics_rebuild_concurrency,
        })
        .with_component_parameters::<Tasks>(TasksParameters {
            skip_metrics_rebuild: !settings.jobs.metrics_rebuild_on_write,
        })
        .with_component_parameters::<HealthChecks>(HealthChecksParameters {
            started: Instant::now(),
        })
}
