//! The Redis module, a container component (`dyn RedisService`): a bb8 pool of multiplexed
//! connections where every wait is explicit (connect, pool checkout, each command), a circuit
//! breaker in front of it, TLS (`rediss://`, optionally with a private CA) and ACL users, the key
//! registry, and a small typed surface for application code. The cache, the rate limiter and
//! anything a user adds inject it. Nothing here ever fails start-up: connections are made lazily
//! and retried by later calls; what went wrong last is kept for `/health`.

pub mod breaker;
pub mod check;
mod cluster;
pub mod keys;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bb8_redis::bb8;
use bb8_redis::redis::aio::{ConnectionLike, MultiplexedConnection, PubSub};
use bb8_redis::redis::cluster_async::ClusterConnection;
use bb8_redis::redis::{
    self, AsyncConnectionConfig, Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Script, Value,
};
use serde::Serialize;
use shaku::{Component, Interface};
use utoipa::ToSchema;

use crate::config::RedisSettings;
use crate::infra::telemetry::Telemetry;
use breaker::{BreakerState, CircuitBreaker};
use keys::{KeyRegistry, RedisKey};

/// Every command nestling sends (scripts' own calls included): a least-privilege ACL user needs
/// these and no others, on keys and channels under `REDIS_KEY_PREFIX` (README, "Redis").
/// The sorted-set commands keep semaphores (`infra::locks`). `scan`, `info` and `slowlog` serve
/// the admin endpoints only; `cluster|slots` is how the cluster client learns the slot map, on
/// connect and after a failover. (The client also sends `CLIENT SETINFO` when it connects; its
/// answer is ignored, so it need not be allowed.)
pub const ACL_COMMANDS: &[&str] = &[
    "ping",
    "get",
    "set",
    "unlink",
    "hget",
    "hset",
    "hexists",
    "hlen",
    "pttl",
    "pexpire",
    "incr",
    "incrby",
    "zadd",
    "zrem",
    "zscore",
    "zcard",
    "zremrangebyscore",
    "time",
    "multi",
    "exec",
    "evalsha",
    "script|load",
    "publish",
    "subscribe",
    "unsubscribe",
    "scan",
    "info",
    "slowlog",
    "cluster|slots",
];

/// Why a Redis call did not happen or did not succeed; callers degrade, they never fail a request.
#[derive(Debug, thiserror::Error)]
pub enum RedisFailure {
    #[error("Redis is disabled (memory mode)")]
    Disabled,
    #[error("Redis is misconfigured: {0}")]
    Config(String),
    #[error("circuit breaker open")]
    CircuitOpen,
    #[error("no pooled connection within the pool timeout")]
    PoolTimeout,
    #[error("command timed out after {0:?}")]
    Timeout(Duration),
    #[error("redis error: {0}")]
    Command(#[from] RedisError),
}

/// What kind of trouble Redis is in, as `/health` and the logs name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FailureClass {
    /// `REDIS_URL` or `REDIS_TLS_CA_FILE` cannot be used.
    Config,
    /// The host name does not resolve.
    Dns,
    /// Nothing listens on the port.
    Refused,
    /// The TLS handshake failed (wrong CA, plain-text server, expired certificate, ...).
    Tls,
    /// The password or ACL user was refused.
    Auth,
    /// The ACL user may not run a command the app needs.
    Permission,
    /// No answer within the connect, pool or command timeout.
    Timeout,
    /// Not called: the breaker is open after repeated failures.
    CircuitOpen,
    Error,
}

impl RedisFailure {
    pub fn class(&self) -> FailureClass {
        match self {
            Self::Disabled | Self::Config(_) => FailureClass::Config,
            Self::CircuitOpen => FailureClass::CircuitOpen,
            Self::PoolTimeout | Self::Timeout(_) => FailureClass::Timeout,
            Self::Command(err) => classify(err),
        }
    }
}

fn classify(err: &RedisError) -> FailureClass {
    use redis::ErrorKind;
    match err.kind() {
        ErrorKind::AuthenticationFailed => return FailureClass::Auth,
        ErrorKind::InvalidClientConfig => return FailureClass::Config,
        _ => {}
    }
    match err.code() {
        Some("WRONGPASS" | "NOAUTH") => return FailureClass::Auth,
        Some("NOPERM") => return FailureClass::Permission,
        _ => {}
    }
    // Connection errors arrive as I/O errors; their text is the only stable mark of some causes.
    let text = error_chain_text(err).to_lowercase();
    if is_tls_error(err)
        || ["certificate", "handshake", "tls"]
            .iter()
            .any(|mark| text.contains(mark))
    {
        FailureClass::Tls
    } else if ["lookup", "resolve", "name or service"]
        .iter()
        .any(|mark| text.contains(mark))
    {
        FailureClass::Dns
    } else if err.is_timeout() {
        FailureClass::Timeout
    } else if err.is_connection_refusal() {
        FailureClass::Refused
    } else {
        FailureClass::Error
    }
}

/// Whether a rustls error is somewhere in the cause chain.
fn is_tls_error(err: &RedisError) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(cause) = source {
        if cause.is::<rustls::Error>() {
            return true;
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            if io.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()) {
                return true;
            }
        }
        source = cause.source();
    }
    false
}

fn error_chain_text(err: &RedisError) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A pooled connection that remembers whether it saw an I/O error, so the pool discards it.
/// (bb8-redis' own manager reports connections as never broken and connects with the client's
/// default timeouts, so a connection that died with Redis would stay in the pool.)
/// What one call runs on: a pooled connection to a standalone server, or the cluster connection
/// (which sends each command to the node that owns its slot).
#[derive(Clone)]
pub enum Connection {
    Standalone(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Standalone(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Standalone(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Standalone(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

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

/// Keeps the last error of the pool's own connection attempts: bb8 makes them in the background
/// and a waiting caller only sees its timeout, while `/health` needs the cause (TLS, auth, DNS).
#[derive(Debug, Clone, Default)]
struct ConnectErrors(Arc<Mutex<Option<(Instant, RedisError)>>>);

impl bb8::ErrorSink<RedisError> for ConnectErrors {
    fn sink(&self, error: RedisError) {
        self.record(error);
    }

    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<RedisError>> {
        Box::new(self.clone())
    }
}

impl ConnectErrors {
    fn record(&self, error: RedisError) {
        *self.0.lock().unwrap() = Some((Instant::now(), error));
    }

    /// The last connection error, if it is more recent than `within`.
    fn recent(&self, within: Duration) -> Option<RedisError> {
        let last = self.0.lock().unwrap();
        last.as_ref()
            .filter(|(at, _)| at.elapsed() <= within)
            .map(|(_, err)| err.clone())
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

/// Where the commands go: one server through a pool, or a Redis Cluster.
// One per process: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Backend {
    Standalone {
        pool: bb8::Pool<RedisManager>,
        client: redis::Client,
    },
    Cluster(cluster::Cluster),
}

/// Redis (one server, a TLS endpoint, or a cluster): connections, breaker, timeouts.
pub struct Redis {
    telemetry: Arc<Telemetry>,
    /// `redis_errors_total{kind="circuit_open"}`, resolved once: counted on every refused call.
    circuit_open_refusals: prometheus::IntCounter,
    backend: Backend,
    connect_errors: ConnectErrors,
    connect_timeout: Duration,
    command_timeout: Duration,
    breaker: CircuitBreaker,
    last_failure: Mutex<Option<(FailureClass, String)>>,
}

/// The private CA of `REDIS_TLS_CA_FILE`, when set (the system roots are used otherwise).
fn root_cert(settings: &RedisSettings) -> Result<Option<Vec<u8>>, RedisFailure> {
    settings
        .tls_ca_file
        .as_ref()
        .map(|path| {
            std::fs::read(path)
                .map_err(|err| RedisFailure::Config(format!("REDIS_TLS_CA_FILE {}: {err}", path.display())))
        })
        .transpose()
}

/// The client for `REDIS_URL`: TLS for `rediss://` (with the private CA of `REDIS_TLS_CA_FILE`
/// when set); an ACL user comes from the URL (`user:password@`).
fn client(settings: &RedisSettings) -> Result<redis::Client, RedisFailure> {
    let config = |err: RedisError| RedisFailure::Config(format!("REDIS_URL: {err}"));
    match root_cert(settings)? {
        Some(root_cert) if settings.url.starts_with("rediss://") => {
            let certificates = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root_cert),
            };
            redis::Client::build_with_tls(settings.url.as_str(), certificates).map_err(config)
        }
        _ => redis::Client::open(settings.url.as_str()).map_err(config),
    }
}

/// One `name:value` field of an `INFO` answer.
pub fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

/// Where a `SCAN` over every node stands: the cursor on the current node (one node for a
/// standalone server, each master in turn on a cluster).
#[derive(Debug, Clone, Default)]
pub struct ScanCursor {
    cursor: u64,
    node: usize,
    /// The cluster's masters, listed by the first step.
    masters: Option<Vec<(String, u16)>>,
    done: bool,
}

impl ScanCursor {
    pub fn done(&self) -> bool {
        self.done
    }
}

impl Redis {
    /// Builds the pool without connecting.
    pub fn new(settings: &RedisSettings, telemetry: Arc<Telemetry>) -> Result<Self, RedisFailure> {
        let connect_errors = ConnectErrors::default();
        let backend = if settings.cluster_nodes.is_empty() {
            let client = client(settings)?;
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(settings.connect_timeout))
                .set_response_timeout(Some(settings.command_timeout));
            let pool = bb8::Pool::builder()
                .max_size(settings.pool_size.max(1))
                .error_sink(Box::new(connect_errors.clone()))
                .connection_timeout(settings.pool_timeout)
                // No PING per checkout on the hot path: broken connections are flagged by `call`.
                .test_on_check_out(false)
                .retry_connection(false)
                .build_unchecked(RedisManager {
                    client: client.clone(),
                    config,
                });
            Backend::Standalone { pool, client }
        } else {
            Backend::Cluster(cluster::Cluster::new(settings, root_cert(settings)?)?)
        };
        Ok(Self {
            circuit_open_refusals: telemetry.redis_errors.with_label_values(&["circuit_open"]),
            telemetry,
            backend,
            connect_errors,
            connect_timeout: settings.connect_timeout,
            command_timeout: settings.command_timeout,
            breaker: CircuitBreaker::new(settings.breaker_threshold, settings.breaker_cooldown),
            last_failure: Mutex::new(None),
        })
    }

    /// Runs one command (or pipeline) under the breaker: at most the pool timeout for a
    /// connection, then the command timeout.
    pub async fn call<T, F, Fut>(&self, command: F) -> Result<T, RedisFailure>
    where
        F: FnOnce(Connection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        self.call_within(None, command).await
    }

    /// `call`, with the connection wait and the command together bounded by `total`: a caller
    /// that must answer in time (the rate limiter) gets a timeout the breaker counts, rather than
    /// dropping the call, which the breaker could not count.
    pub async fn call_within<T, F, Fut>(&self, total: Option<Duration>, command: F) -> Result<T, RedisFailure>
    where
        F: FnOnce(Connection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        if !self.breaker.allow() {
            self.circuit_open_refusals.inc();
            return Err(RedisFailure::CircuitOpen);
        }
        let started = Instant::now();
        let pending = AbandonGuard(Some(&self.breaker));
        let outcome = match total {
            None => self.call_unguarded(command).await,
            Some(total) => match tokio::time::timeout(total, self.call_unguarded(command)).await {
                Ok(outcome) => outcome,
                Err(_) => Err(self.no_connection_because().unwrap_or(RedisFailure::Timeout(total))),
            },
        };
        pending.settle();
        self.telemetry.observe_redis(started, outcome.is_ok());
        match &outcome {
            Ok(_) => self.breaker.record_success(),
            Err(failure) => {
                let kind = match failure {
                    RedisFailure::Timeout(_) => "timeout",
                    RedisFailure::PoolTimeout => "pool",
                    _ => "error",
                };
                self.telemetry.redis_errors.with_label_values(&[kind]).inc();
                self.remember(failure);
                // A command the ACL user may not run says nothing about Redis' health.
                if failure.class() != FailureClass::Permission {
                    self.breaker.record_failure();
                }
            }
        }
        outcome
    }

    async fn call_unguarded<T, F, Fut>(&self, command: F) -> Result<T, RedisFailure>
    where
        F: FnOnce(Connection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let (connection, broken_flag) = match &self.backend {
            Backend::Standalone { pool, .. } => {
                // The connection goes back to the pool at once: it is multiplexed, so concurrent
                // calls share it and their commands leave in one write (one connection held per
                // call cost L2 reads a syscall each way, BENCHMARKS.md [6/6]).
                let (connection, broken) = loop {
                    let pooled = pool.get().await.map_err(|err| match err {
                        bb8::RunError::User(err) => RedisFailure::Command(err),
                        // No connection could be made meanwhile: say why, if the pool's attempts failed.
                        bb8::RunError::TimedOut => self.no_connection_because().unwrap_or(RedisFailure::PoolTimeout),
                    })?;
                    // A connection another call found broken is dropped here, as it is returned.
                    if !pooled.broken.load(Ordering::Relaxed) {
                        break (pooled.connection.clone(), pooled.broken.clone());
                    }
                };
                (Connection::Standalone(connection), Some(broken))
            }
            Backend::Cluster(cluster) => (
                Connection::Cluster(cluster.connection(&self.connect_errors).await?),
                None,
            ),
        };
        let result = tokio::time::timeout(self.command_timeout, command(connection)).await;
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => {
                let broken = err.is_io_error() || err.is_connection_dropped() || err.is_unrecoverable_error();
                if let Some(flag) = broken_flag.filter(|_| broken) {
                    flag.store(true, Ordering::Relaxed);
                }
                Err(RedisFailure::Command(err))
            }
            Err(_) => Err(RedisFailure::Timeout(self.command_timeout)),
        }
    }

    /// Whether this is a Redis Cluster (`REDIS_CLUSTER_NODES`).
    pub fn is_cluster(&self) -> bool {
        matches!(self.backend, Backend::Cluster(_))
    }

    /// Why there is no connection, if the recent attempts to make one failed.
    fn no_connection_because(&self) -> Option<RedisFailure> {
        let connected = match &self.backend {
            Backend::Standalone { pool, .. } => pool.state().connections > 0,
            Backend::Cluster(cluster) => cluster.is_connected(),
        };
        if connected {
            return None;
        }
        self.connect_errors
            .recent(self.connect_timeout * 2)
            .map(RedisFailure::Command)
    }

    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }

    /// False while the breaker is open (no call would be made): cheap, for callers on every
    /// request that would otherwise prepare a call for nothing.
    pub fn accepting(&self) -> bool {
        self.breaker.accepting()
    }

    fn remember(&self, failure: &RedisFailure) {
        *self.last_failure.lock().unwrap() = Some((failure.class(), failure.to_string()));
    }

    /// The class and text of the most recent failure (cleared by nothing: read it with the breaker).
    pub fn last_failure(&self) -> Option<(FailureClass, String)> {
        self.last_failure.lock().unwrap().clone()
    }

    /// One `SCAN` step over keys matching `pattern` (1,000 at a time), on every master of a
    /// cluster in turn; `cursor.done()` after the last. Never `KEYS`: a step is cheap for Redis
    /// however many keys it holds.
    pub async fn scan(&self, cursor: &mut ScanCursor, pattern: &str) -> Result<Vec<String>, RedisFailure> {
        let command = redis::cmd("SCAN")
            .arg(cursor.cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .to_owned();
        let masters = cursor.masters.clone();
        let node = cursor.node;
        type Step = (u64, Vec<String>, Option<Vec<(String, u16)>>);
        let (next, keys, masters): Step = self
            .call(|c| async move {
                match c {
                    Connection::Standalone(mut c) => {
                        let (next, keys) = command.query_async(&mut c).await?;
                        Ok((next, keys, None))
                    }
                    Connection::Cluster(mut c) => {
                        let masters = match masters {
                            Some(masters) => masters,
                            None => cluster::masters(&mut c).await?,
                        };
                        let Some(master) = masters.get(node) else {
                            return Ok((0, Vec::new(), Some(masters)));
                        };
                        let value = cluster::on_node(&mut c, master, command).await?;
                        let (next, keys) = redis::from_redis_value(value)?;
                        Ok((next, keys, Some(masters)))
                    }
                }
            })
            .await?;
        cursor.cursor = next;
        if next == 0 {
            cursor.node += 1;
        }
        cursor.done = next == 0 && cursor.node >= masters.as_ref().map_or(1, Vec::len);
        cursor.masters = masters;
        Ok(keys)
    }

    /// `INFO <section>`. On a cluster, of the master nearest its `maxmemory` (the one that
    /// decides whether Redis runs out of memory), with `cluster_masters:<n>` added.
    pub async fn info(&self, section: &str) -> Result<String, RedisFailure> {
        let section = section.to_owned();
        self.call(|c| async move {
            match c {
                Connection::Standalone(mut c) => redis::cmd("INFO").arg(section).query_async(&mut c).await,
                Connection::Cluster(mut c) => {
                    let nodes = cluster::info_of_masters(&mut c, &section).await?;
                    let share = |text: &str| {
                        let field = |name| info_field(text, name).and_then(|v| v.parse().ok()).unwrap_or(0.0);
                        field("used_memory") / f64::max(field("maxmemory"), 1.0)
                    };
                    let count = nodes.len();
                    let fullest = nodes
                        .into_iter()
                        .map(|(_, text)| text)
                        .max_by(|a, b| share(a).total_cmp(&share(b)))
                        .unwrap_or_default();
                    Ok(format!("{fullest}\r\ncluster_masters:{count}\r\n"))
                }
            }
        })
        .await
    }

    /// The server's clock (`TIME`; on a cluster, the node the command lands on), as seconds and
    /// microseconds since the Unix epoch.
    pub async fn server_time(&self) -> Result<(u64, u64), RedisFailure> {
        self.call(|mut c| async move { redis::cmd("TIME").query_async(&mut c).await })
            .await
    }

    /// Connections open and idle in the pool, and its counters (a cluster: its one connection).
    pub fn pool_statistics(&self) -> (u32, u32, bb8::Statistics) {
        match &self.backend {
            Backend::Standalone { pool, .. } => {
                let state = pool.state();
                (state.connections, state.idle_connections, state.statistics)
            }
            Backend::Cluster(cluster) => {
                let connected = u32::from(cluster.is_connected());
                (connected, connected, bb8::Statistics::default())
            }
        }
    }

    /// A dedicated pub/sub connection (TLS and ACL as configured), within the connect timeout:
    /// on a cluster, to one of the seed nodes (a PUBLISH anywhere reaches it).
    pub async fn pubsub(&self) -> Result<PubSub, RedisFailure> {
        let outcome = match &self.backend {
            Backend::Standalone { client, .. } => {
                match tokio::time::timeout(self.connect_timeout, client.get_async_pubsub()).await {
                    Ok(outcome) => outcome.map_err(RedisFailure::Command),
                    Err(_) => Err(RedisFailure::Timeout(self.connect_timeout)),
                }
            }
            Backend::Cluster(cluster) => cluster.pubsub().await,
        };
        if let Err(failure @ RedisFailure::Command(_)) = &outcome {
            self.remember(failure);
        }
        outcome
    }
}

/// What `/health` and the admin endpoints show of Redis.
#[derive(Debug, Clone)]
pub struct RedisStatus {
    pub enabled: bool,
    pub breaker: Option<BreakerState>,
    /// Set while Redis cannot be used: the class and message of the last failure.
    pub failure: Option<(FailureClass, String)>,
}

impl RedisStatus {
    /// Switched on and answering (the breaker closed): what "redis mode" means for the cache and
    /// the rate limiter alike.
    pub fn usable(&self) -> bool {
        self.enabled && self.breaker == Some(BreakerState::Closed)
    }
}

/// The Redis module. Everything that talks to Redis injects this.
#[async_trait]
pub trait RedisService: Interface {
    /// The Redis handle for pipelines and scripts of the infrastructure (cache, limiter), when
    /// Redis is switched on and configured. Created on first use: memory mode opens no connection.
    fn active(&self) -> Option<&Redis>;
    /// The Redis handle that keeps the fleet in sync (invalidations, the fleet-wide switch): while
    /// caching in Redis, and in memory-synced mode (`REDIS_URL` set, caching off).
    fn synced(&self) -> Option<&Redis>;
    /// Caching in Redis (`REDIS_ENABLED`, or the runtime switch).
    fn is_enabled(&self) -> bool;
    /// Caching in Redis, or in memory-synced mode: the instance hears and tells the fleet.
    fn is_syncing(&self) -> bool;
    /// The runtime switch (`false`: nothing reads or writes data in Redis any more, at once; a
    /// memory-synced instance goes on publishing and hearing invalidations).
    fn set_enabled(&self, enabled: bool);
    fn keys(&self) -> &KeyRegistry;
    fn status(&self) -> RedisStatus;
    /// The connect timeout, for callers that open connections of their own (pub/sub).
    fn settings(&self) -> &RedisSettings;
    /// PING round-trip time.
    async fn ping(&self) -> Result<Duration, RedisFailure>;

    // The typed surface for application code: keys come from the registry; each call runs under
    // the breaker and never takes longer than the command timeout (connection wait included),
    // and fails fast (`Disabled`) in memory mode.
    async fn get(&self, key: &RedisKey) -> Result<Option<Vec<u8>>, RedisFailure>;
    async fn set(&self, key: &RedisKey, value: &[u8], ttl: Duration) -> Result<(), RedisFailure>;
    /// Deletes (UNLINK) the keys; returns how many existed.
    async fn delete(&self, keys: &[RedisKey]) -> Result<u64, RedisFailure>;
    /// Adds `by` and returns the new value; a counter created by this call expires after `ttl`.
    async fn incr(&self, key: &RedisKey, by: i64, ttl: Duration) -> Result<i64, RedisFailure>;
    /// EVALSHA, loading the script when Redis answers NOSCRIPT. User data goes in `args` only.
    async fn run_script(&self, script: &Script, keys: &[RedisKey], args: &[Vec<u8>]) -> Result<Value, RedisFailure>;
    /// Several runs of one script in one round trip (a pipeline), answers in order; a run that
    /// failed answers with its error value. Not on a Redis Cluster, where the keys of one
    /// pipeline may live on different nodes (`Disabled` there).
    async fn run_scripts(&self, script: &Script, runs: &[ScriptRun]) -> Result<Vec<Value>, RedisFailure>;
    async fn publish(&self, channel: &RedisKey, message: &[u8]) -> Result<(), RedisFailure>;
}

/// A call of `script` with these keys and arguments.
fn invocation<'a>(script: &'a Script, keys: &[RedisKey], args: &[Vec<u8>]) -> redis::ScriptInvocation<'a> {
    let mut invocation = script.prepare_invoke();
    for key in keys {
        invocation.key(key.as_str());
    }
    for arg in args {
        invocation.arg(arg.as_slice());
    }
    invocation
}

/// One run of a script in `RedisService::run_scripts`.
pub struct ScriptRun {
    pub keys: Vec<RedisKey>,
    pub args: Vec<Vec<u8>>,
}

pub struct RedisModule {
    settings: RedisSettings,
    keys: KeyRegistry,
    telemetry: Arc<Telemetry>,
    enabled: AtomicBool,
    /// Built on first use; a configuration error is kept (and reported) instead.
    redis: OnceLock<Result<Redis, String>>,
}

pub struct RedisModuleParameters {
    pub settings: RedisSettings,
    pub keys: KeyRegistry,
    pub telemetry: Arc<Telemetry>,
}

crate::container::set_by_the_container!(RedisModuleParameters);

impl<M: shaku::Module> Component<M> for RedisModule {
    type Interface = dyn RedisService;
    type Parameters = RedisModuleParameters;

    fn build(_: &mut shaku::ModuleBuildContext<M>, params: RedisModuleParameters) -> Box<dyn RedisService> {
        Box::new(RedisModule::new(params.settings, params.keys, params.telemetry))
    }
}

impl RedisModule {
    /// The module outside the container (the container builds it from `RedisModuleParameters`).
    pub fn new(settings: RedisSettings, keys: KeyRegistry, telemetry: Arc<Telemetry>) -> Self {
        Self {
            enabled: AtomicBool::new(settings.enabled),
            settings,
            keys,
            telemetry,
            redis: OnceLock::new(),
        }
    }

    fn require(&self) -> Result<&Redis, RedisFailure> {
        if !self.is_enabled() {
            return Err(RedisFailure::Disabled);
        }
        self.handle()
    }

    fn handle(&self) -> Result<&Redis, RedisFailure> {
        match self.connect() {
            Ok(redis) => Ok(redis),
            Err(message) => Err(RedisFailure::Config(message.clone())),
        }
    }

    /// One command of the typed surface: under the breaker, bounded by the command timeout.
    async fn query<T: redis::FromRedisValue>(&self, command: redis::Cmd) -> Result<T, RedisFailure> {
        self.require()?
            .call_within(Some(self.settings.command_timeout), |mut c| async move {
                command.query_async(&mut c).await
            })
            .await
    }

    fn connect(&self) -> &Result<Redis, String> {
        self.redis.get_or_init(|| {
            Redis::new(&self.settings, self.telemetry.clone()).map_err(|err| {
                log::error!("redis: {err}; serving without Redis");
                err.to_string()
            })
        })
    }
}

#[async_trait]
impl RedisService for RedisModule {
    fn active(&self) -> Option<&Redis> {
        self.require().ok()
    }

    fn synced(&self) -> Option<&Redis> {
        self.is_syncing().then(|| self.handle().ok()).flatten()
    }

    fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    fn is_syncing(&self) -> bool {
        self.settings.fleet_sync || self.is_enabled()
    }

    fn set_enabled(&self, enabled: bool) {
        self.enabled.store(enabled, Ordering::Release);
    }

    fn keys(&self) -> &KeyRegistry {
        &self.keys
    }

    fn status(&self) -> RedisStatus {
        let enabled = self.is_enabled();
        if !self.is_syncing() {
            return RedisStatus {
                enabled,
                breaker: None,
                failure: None,
            };
        }
        match self.connect() {
            Err(message) => RedisStatus {
                enabled,
                breaker: None,
                failure: Some((FailureClass::Config, message.clone())),
            },
            Ok(redis) => {
                let breaker = redis.breaker_state();
                RedisStatus {
                    enabled,
                    breaker: Some(breaker),
                    failure: (breaker != BreakerState::Closed)
                        .then(|| redis.last_failure())
                        .flatten(),
                }
            }
        }
    }

    fn settings(&self) -> &RedisSettings {
        &self.settings
    }

    /// Also in memory-synced mode: the fleet's link is worth checking there too.
    async fn ping(&self) -> Result<Duration, RedisFailure> {
        let redis = match self.synced() {
            Some(redis) => redis,
            None => self.require()?,
        };
        let started = Instant::now();
        redis
            .call_within(Some(self.settings.command_timeout), |mut c| async move {
                redis::cmd("PING").query_async::<()>(&mut c).await
            })
            .await?;
        Ok(started.elapsed())
    }

    async fn get(&self, key: &RedisKey) -> Result<Option<Vec<u8>>, RedisFailure> {
        let command = redis::cmd("GET").arg(key.as_str()).to_owned();
        self.query(command).await
    }

    async fn set(&self, key: &RedisKey, value: &[u8], ttl: Duration) -> Result<(), RedisFailure> {
        let command = redis::cmd("SET")
            .arg(key.as_str())
            .arg(value)
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64)
            .to_owned();
        self.query(command).await
    }

    async fn delete(&self, keys: &[RedisKey]) -> Result<u64, RedisFailure> {
        if keys.is_empty() {
            return Ok(0);
        }
        let command = redis::cmd("UNLINK")
            .arg(keys.iter().map(RedisKey::as_str).collect::<Vec<_>>())
            .to_owned();
        self.query(command).await
    }

    async fn incr(&self, key: &RedisKey, by: i64, ttl: Duration) -> Result<i64, RedisFailure> {
        // A script, not MULTI/EXEC: on a cluster, a MOVED inside a transaction (after a failover)
        // aborts it without the client learning where the slot went.
        static INCR: OnceLock<Script> = OnceLock::new();
        let script = INCR.get_or_init(|| {
            Script::new(
                r"
                local value = redis.call('INCRBY', KEYS[1], ARGV[1])
                redis.call('PEXPIRE', KEYS[1], ARGV[2], 'NX')
                return value",
            )
        });
        let ttl_ms = ttl.as_millis().max(1).to_string().into_bytes();
        let value = self
            .run_script(
                script,
                std::slice::from_ref(key),
                &[by.to_string().into_bytes(), ttl_ms],
            )
            .await?;
        Ok(redis::from_redis_value(value).map_err(|err| RedisFailure::Command(err.into()))?)
    }

    async fn run_script(&self, script: &Script, keys: &[RedisKey], args: &[Vec<u8>]) -> Result<Value, RedisFailure> {
        let invocation = invocation(script, keys, args);
        self.require()?
            .call_within(Some(self.settings.command_timeout), |mut c| async move {
                invocation.invoke_async(&mut c).await
            })
            .await
    }

    async fn run_scripts(&self, script: &Script, runs: &[ScriptRun]) -> Result<Vec<Value>, RedisFailure> {
        let server = self.require()?;
        if server.is_cluster() {
            return Err(RedisFailure::Disabled);
        }
        // The load first: a pipelined EVALSHA does not load the script itself, and a load of a
        // script Redis has is a lookup.
        let mut pipeline = redis::pipe();
        pipeline.load_script(script).ignore();
        for run in runs {
            pipeline.invoke_script(&invocation(script, &run.keys, &run.args));
        }
        server
            .call_within(Some(self.settings.command_timeout), |mut c| async move {
                pipeline.query_async(&mut c).await
            })
            .await
    }

    async fn publish(&self, channel: &RedisKey, message: &[u8]) -> Result<(), RedisFailure> {
        let command = redis::cmd("PUBLISH").arg(channel.as_str()).arg(message).to_owned();
        self.query(command).await
    }
}
