//! The Redis module: a bb8 pool of multiplexed connections where every wait is explicit
//! (connect, pool checkout, each command), a circuit breaker in front of it, and the key registry.
//! Nothing here ever fails start-up: connections are made lazily and retried by later calls.

pub mod breaker;
pub mod keys;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bb8_redis::bb8;
use bb8_redis::redis::aio::MultiplexedConnection;
use bb8_redis::redis::{self, AsyncConnectionConfig, RedisError, RedisResult};

use crate::config::RedisSettings;
use crate::infra::telemetry::Telemetry;
use breaker::{BreakerState, CircuitBreaker};

/// Why a Redis call did not happen or did not succeed; callers degrade, they never fail a request.
#[derive(Debug, thiserror::Error)]
pub enum RedisFailure {
    #[error("circuit breaker open")]
    CircuitOpen,
    #[error("no pooled connection within the pool timeout: {0}")]
    Pool(String),
    #[error("command timed out after {0:?}")]
    Timeout(Duration),
    #[error("redis error: {0}")]
    Command(#[from] RedisError),
}

/// A pooled connection that remembers whether it saw an I/O error, so the pool discards it.
/// (bb8-redis' own manager reports connections as never broken and connects with the client's
/// default timeouts, so a connection that died with Redis would stay in the pool.)
pub struct TrackedConnection {
    pub connection: MultiplexedConnection,
    broken: Arc<AtomicBool>,
}

pub struct RedisManager {
    client: redis::Client,
    config: AsyncConnectionConfig,
}

impl bb8::ManageConnection for RedisManager {
    type Connection = TrackedConnection;
    type Error = RedisError;

    async fn connect(&self) -> Result<TrackedConnection, RedisError> {
        let connection = self
            .client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await?;
        Ok(TrackedConnection {
            connection,
            broken: Arc::new(AtomicBool::new(false)),
        })
    }

    async fn is_valid(&self, conn: &mut TrackedConnection) -> Result<(), RedisError> {
        redis::cmd("PING").query_async::<()>(&mut conn.connection).await
    }

    fn has_broken(&self, conn: &mut TrackedConnection) -> bool {
        conn.broken.load(Ordering::Relaxed)
    }
}

/// Tells the breaker when a call it allowed is dropped unfinished (the request future went away).
struct AbandonGuard<'a>(Option<&'a CircuitBreaker>);

impl AbandonGuard<'_> {
    fn settle(mut self) {
        self.0 = None;
    }
}

impl Drop for AbandonGuard<'_> {
    fn drop(&mut self) {
        if let Some(breaker) = self.0 {
            breaker.record_abandoned();
        }
    }
}

pub struct Redis {
    telemetry: Arc<Telemetry>,
    pool: bb8::Pool<RedisManager>,
    client: redis::Client,
    command_timeout: Duration,
    breaker: CircuitBreaker,
}

impl Redis {
    /// Builds the pool without connecting.
    pub fn new(settings: &RedisSettings, telemetry: Arc<Telemetry>) -> Result<Self, RedisError> {
        let client = redis::Client::open(settings.url.as_str())?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(settings.connect_timeout))
            .set_response_timeout(Some(settings.command_timeout));
        let pool = bb8::Pool::builder()
            .max_size(settings.pool_size.max(1))
            .connection_timeout(settings.pool_timeout)
            // No PING per checkout on the hot path: broken connections are flagged by `call`.
            .test_on_check_out(false)
            .retry_connection(false)
            .build_unchecked(RedisManager {
                client: client.clone(),
                config,
            });
        Ok(Self {
            telemetry,
            pool,
            client,
            command_timeout: settings.command_timeout,
            breaker: CircuitBreaker::new(settings.breaker_threshold, settings.breaker_cooldown),
        })
    }

    /// Runs one command (or pipeline) under the breaker and the command timeout.
    pub async fn call<T, F, Fut>(&self, command: F) -> Result<T, RedisFailure>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        if !self.breaker.allow() {
            self.telemetry.redis_errors.with_label_values(&["circuit_open"]).inc();
            return Err(RedisFailure::CircuitOpen);
        }
        let started = Instant::now();
        let pending = AbandonGuard(Some(&self.breaker));
        let outcome = self.call_unguarded(command).await;
        pending.settle();
        self.telemetry.observe_redis(started, outcome.is_ok());
        match &outcome {
            Ok(_) => self.breaker.record_success(),
            Err(failure) => {
                let kind = match failure {
                    RedisFailure::Timeout(_) => "timeout",
                    RedisFailure::Pool(_) => "pool",
                    RedisFailure::Command(_) => "error",
                    RedisFailure::CircuitOpen => "circuit_open",
                };
                self.telemetry.redis_errors.with_label_values(&[kind]).inc();
                self.breaker.record_failure();
            }
        }
        outcome
    }

    async fn call_unguarded<T, F, Fut>(&self, command: F) -> Result<T, RedisFailure>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let pooled = self.pool.get().await.map_err(|e| RedisFailure::Pool(e.to_string()))?;
        let connection = pooled.connection.clone();
        let result = tokio::time::timeout(self.command_timeout, command(connection)).await;
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => {
                if err.is_io_error() || err.is_connection_dropped() || err.is_unrecoverable_error() {
                    pooled.broken.store(true, Ordering::Relaxed);
                }
                Err(RedisFailure::Command(err))
            }
            Err(_) => Err(RedisFailure::Timeout(self.command_timeout)),
        }
    }

    /// PING round-trip time.
    pub async fn ping(&self) -> Result<Duration, RedisFailure> {
        let started = Instant::now();
        self.call(|mut c| async move { redis::cmd("PING").query_async::<()>(&mut c).await })
            .await?;
        Ok(started.elapsed())
    }

    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }

    /// Connections open and idle in the pool, and its counters.
    pub fn pool_statistics(&self) -> (u32, u32, bb8::Statistics) {
        let state = self.pool.state();
        (state.connections, state.idle_connections, state.statistics)
    }

    /// The client, for the dedicated pub/sub connection.
    pub fn client(&self) -> &redis::Client {
        &self.client
    }
}
