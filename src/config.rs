//! The one `Settings` struct, read from the environment (a `.env` file is loaded by `main`).
//! Every variable has a development default; a bad value stops start-up with a line naming the variable.

use std::cell::RefCell;
use std::fmt::Display;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres:postgres@localhost:5432/nestling";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppEnv {
    Development,
    Production,
    Test,
}

impl FromStr for AppEnv {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "development" | "dev" => Ok(Self::Development),
            "production" | "prod" => Ok(Self::Production),
            "test" => Ok(Self::Test),
            _ => Err(()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub app: AppSettings,
    pub database: DatabaseSettings,
    pub redis: RedisSettings,
    pub cache: CacheSettings,
    pub ttl: TtlTable,
    pub rate_limit: RateLimitSettings,
    pub passwords: PasswordSettings,
    pub cors: CorsSettings,
    pub idempotency: IdempotencySettings,
    pub locks: LockSettings,
    pub events: EventSettings,
    pub jobs: JobSettings,
}

/// `Idempotency-Key` (README, "Idempotency keys").
#[derive(Debug, Clone)]
pub struct IdempotencySettings {
    /// `IDEMPOTENCY_TTL`: how long a key's first answer is kept and replayed.
    pub ttl: Duration,
}

#[derive(Debug, Clone)]
pub struct AppSettings {
    pub env: AppEnv,
    pub host: String,
    pub port: u16,
    pub workers: usize,
    pub shutdown_timeout: Duration,
    /// `APP_SHUTDOWN_DELAY`: how long a SIGTERM'd instance keeps serving, not ready, before it
    /// drains (load balancers polling readiness notice meanwhile).
    pub shutdown_delay: Duration,
    /// Bearer credential for `/admin/*`; admin routes answer 403 while it is unset.
    pub admin_token: Option<String>,
    /// `AUTH_TOKEN_SLIDING`: a token used in the last half of its life is extended to a whole
    /// `AUTH_TOKEN_TTL` from then (at most once a minute).
    pub auth_token_sliding: bool,
}

#[derive(Debug, Clone)]
pub struct DatabaseSettings {
    pub url: String,
    /// True when `DATABASE_URL` was not set: only then may development start a private Postgres.
    pub url_is_default: bool,
    pub max_connections: u32,
    pub connect_timeout: Duration,
    pub acquire_timeout: Duration,
    /// Client-side deadline for every statement (or transaction); sqlx has none of its own.
    pub statement_timeout: Duration,
    pub health_timeout: Duration,
    /// Deadline for applying migrations at start (or `nestling migrate`).
    pub migration_timeout: Duration,
    pub migrate_on_start: bool,
}

#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `REDIS_ENABLED`: cache entries (L2) and rate-limit counters live in Redis.
    pub enabled: bool,
    pub url: String,
    /// `REDIS_CLUSTER_NODES`: seed nodes of a Redis Cluster (`redis://` or `rediss://` URLs,
    /// comma-separated). When set, the cluster client is used and `REDIS_URL` is not.
    pub cluster_nodes: Vec<String>,
    /// `REDIS_URL` (or `REDIS_CLUSTER_NODES`) is set: with Redis caching off, the instance still
    /// keeps the fleet in sync through it (mode `memory-synced`: it publishes and hears
    /// invalidations, deletes L2 keys its writes replace, and follows the fleet-wide switch).
    /// Unset, memory mode is strict: no connection at all.
    pub fleet_sync: bool,
    /// PEM file of the CA that signed the server's certificate, for `rediss://` with a private CA
    /// (the system roots are used otherwise).
    pub tls_ca_file: Option<PathBuf>,
    /// Every key the app writes starts with this (see `infra::redis::keys`).
    pub key_prefix: String,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    /// Longest wait for a pooled connection.
    pub pool_timeout: Duration,
    pub pool_size: u32,
    /// Consecutive failures or timeouts that open the circuit breaker.
    pub breaker_threshold: u32,
    /// How long the breaker stays open before one probe may try Redis again.
    pub breaker_cooldown: Duration,
}

/// The in-process tier (L1).
#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// `false` skips the in-process tier (for measurements; production keeps it on).
    pub l1_enabled: bool,
    /// Keys, values and per-entry bookkeeping together (one entry can be a page of long tasks).
    pub l1_max_bytes: u64,
    /// Most variants (filters, pages, date ranges) one owner's grouped Redis hash caches; more
    /// are answered from Postgres, uncached, so a client cannot grow a hash without bound.
    pub max_variants: u32,
    /// Lookups that found nothing (a random workspace id, an unknown token) are remembered in
    /// process only, for at most `negative_ttl` and in at most this many entries.
    pub negative_max_entries: u64,
    pub negative_ttl: Duration,
    /// Most invalidations kept for replay while Redis cannot be reached; past that, whole
    /// namespaces are flushed when it answers again.
    pub max_pending_invalidations: usize,
    /// L1 never keeps an entry longer than this, whatever its TTL: it bounds staleness should an
    /// invalidation message from another instance be lost.
    pub l1_max_ttl: Duration,
    /// While Redis is on but this instance cannot hear other instances' invalidations (its
    /// subscriber is down, or has not confirmed it is up to date for this long), an L1 entry is
    /// served only if it is younger than this: it bounds how long another instance's write,
    /// a logout or a removed member included, can go unseen here.
    pub l1_unsynced_ttl: Duration,
    /// Random shortening of a lifetime, in percent of the TTL, so entries written together expire
    /// apart; the TTL table stays an upper bound.
    pub ttl_jitter_percent: u8,
}

/// One limit of a policy: `limit` requests per `period`, in a burst or spread out (GCRA).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub limit: u64,
    pub period: Duration,
}

/// Rate-limit policies (see `infra::rate_limit`). Each is a list of quotas, all enforced at once:
/// `"5, 100/1d"` is 5 per `RATE_LIMIT_WINDOW` and 100 per day.
#[derive(Debug, Clone)]
pub struct RateLimitSettings {
    /// `false` turns the `/api` policy off; login and register stay limited.
    pub enabled: bool,
    /// Every `/api` route but login and register: per user when authenticated, else per client IP.
    pub api: Vec<Quota>,
    /// Login and register, per client IP.
    pub auth_ip: Vec<Quota>,
    /// Login and register, per email.
    pub auth_email: Vec<Quota>,
    /// Most tokens of the `/api` policy an instance takes from Redis at a time (and never more
    /// than 1 % of its tightest quota; 1 = exact).
    pub lease: u64,
    /// How long an instance may spend a lease's tokens; what is left then goes back to Redis
    /// with the identity's next call.
    pub lease_lifetime: Duration,
    /// `TRUST_PROXY`: the proxies (addresses and CIDRs) whose `X-Forwarded-For` is believed
    /// (empty: none; the peer address is the client). See `middleware::client_ip`.
    pub trust_proxy: Vec<ipnet::IpNet>,
    /// Instances of the app: without Redis, each enforces 1/`instances` of every quota.
    pub instances: u64,
}

/// Password hashing (argon2id, about 19 MiB and tens of milliseconds each).
#[derive(Debug, Clone)]
pub struct PasswordSettings {
    /// Hashes that may run at once: the memory they take is bounded by this.
    pub concurrency: usize,
    /// How long a login or register waits for a free slot before it answers 503.
    pub wait: Duration,
}

/// Cross-origin requests from browsers (see `infra::cors`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorsSettings {
    /// `CORS_ALLOWED_ORIGINS`: the exact origins (`https://app.example.com`) whose pages may call
    /// the API. Empty (the default): no CORS headers at all, so browsers refuse other origins.
    pub allowed_origins: Vec<String>,
    /// `CORS_ALLOWED_ORIGINS=*`: any origin, answered with `*` (never with credentials).
    pub any_origin: bool,
    /// `Access-Control-Allow-Credentials: true`: pages may send cookies or HTTP auth with requests.
    pub allow_credentials: bool,
    /// How long a browser may keep a preflight's answer.
    pub max_age: Duration,
}

impl CorsSettings {
    pub fn enabled(&self) -> bool {
        self.any_origin || !self.allowed_origins.is_empty()
    }
}

/// Locks and semaphores (see `infra::locks`), and what uses them.
#[derive(Debug, Clone)]
pub struct LockSettings {
    /// Deadline of one Postgres round trip of a lock or a permit (Redis calls keep
    /// `REDIS_COMMAND_TIMEOUT_MS`): below 1 s, so that `acquire` fails within a second when its
    /// store cannot answer, where the statement deadline would wait 3.
    pub store_timeout: Duration,
    /// Daily-metrics rebuilds that may run at once across the fleet (a semaphore).
    pub metrics_rebuild_concurrency: u32,
}

/// Durable events and their streams (see `infra::events`).
#[derive(Debug, Clone)]
pub struct EventSettings {
    /// How long event rows are kept: how far back a reconnecting client can catch up.
    pub retention: Duration,
    /// The relay looks for unpublished events this often (and at once after a local commit).
    pub relay_every: Duration,
    /// Each instance reads what its streams may have missed from the table this often, whatever
    /// pub/sub delivered: the bound on delivery when a message is lost.
    pub catch_up_every: Duration,
    /// A comment line on idle streams, so proxies keep them open.
    pub heartbeat: Duration,
    /// How often a stream checks its token and its membership again.
    pub recheck_every: Duration,
    /// Open streams per instance, and per user on an instance.
    pub max_streams: usize,
    pub max_streams_per_user: usize,
    /// Events a stream may have waiting for a slow client before it is ended (it resumes with
    /// `Last-Event-ID`).
    pub stream_buffer: usize,
    /// Deadline of one attempt of an in-app subscriber.
    pub handler_timeout: Duration,
}

/// Background jobs (see `infra::jobs`).
#[derive(Debug, Clone)]
pub struct JobSettings {
    /// Jobs this instance runs at once (0: it runs none, only enqueues).
    pub workers: usize,
    /// Jobs of one queue this instance runs at once.
    pub queue_concurrency: usize,
    /// How often idle workers look for due jobs (an enqueue on this instance wakes them at once).
    pub poll_every: Duration,
    /// How long a claimed job is held without a renewal: after a worker dies, its jobs run again
    /// within this.
    pub lease: Duration,
    /// Task writes enqueue their workspace's `metrics.rebuild` (`METRICS_REBUILD_ON_WRITE`); off,
    /// the stored days change only through `POST …/metrics/rebuild` (and the benchmark measures
    /// a create without its enqueue).
    pub metrics_rebuild_on_write: bool,
    /// Cron expressions (six fields, seconds first, UTC) of the app's schedules.
    pub purge_schedule: String,
    pub due_reminders_schedule: String,
}

/// How long each kind of entry lives: the one table the README, `/health` and the tests refer to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TtlTable {
    pub tasks: Duration,
    pub projects: Duration,
    pub workspaces: Duration,
    pub daily_metrics: Duration,
    pub user: Duration,
    pub rate_limit_window: Duration,
    pub auth_token: Duration,
    // @generate: ttl-fields
}

impl TtlTable {
    /// (environment variable, default seconds, value) for every entry, in README order.
    pub fn entries(&self) -> Vec<(&'static str, u64, Duration)> {
        vec![
            ("CACHE_TTL_TASKS", 300, self.tasks),
            ("CACHE_TTL_PROJECTS", 600, self.projects),
            ("CACHE_TTL_WORKSPACES", 1800, self.workspaces),
            ("CACHE_TTL_DAILY_METRICS", 900, self.daily_metrics),
            ("CACHE_TTL_USER", 3600, self.user),
            ("RATE_LIMIT_WINDOW", 60, self.rate_limit_window),
            ("AUTH_TOKEN_TTL", 7200, self.auth_token),
            // @generate: ttl-entries
        ]
    }
}

/// One environment variable as the configuration read it: its value when set, and its default.
#[derive(Debug, Clone)]
pub struct Variable {
    pub name: &'static str,
    pub set: Option<String>,
    pub default: String,
}

impl Variable {
    /// The value in force, fit to print: a token is hidden, and so are a URL's credentials.
    pub fn shown(&self) -> String {
        let value = self.set.as_deref().unwrap_or(&self.default);
        if self.name.ends_with("_TOKEN") && !value.is_empty() {
            return "***".to_owned();
        }
        value.split(',').map(redacted).collect::<Vec<_>>().join(",")
    }
}

/// A URL with its user and password replaced by `***` (anything else as it is).
pub fn redacted(url: &str) -> String {
    match url
        .split_once("://")
        .and_then(|(scheme, rest)| Some((scheme, rest.rsplit_once('@')?.1)))
    {
        Some((scheme, host)) => format!("{scheme}://***@{host}"),
        None => url.to_owned(),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid value for {name}: expected {expected}, got {value:?}")]
pub struct ConfigError {
    pub name: &'static str,
    pub expected: &'static str,
    pub value: String,
}

impl Settings {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads settings through `lookup`, so tests can build them without touching the process environment.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        Self::described(lookup).map(|(settings, _)| settings)
    }

    /// `from_lookup`, with every variable it read: set or not, and its default (`nestling doctor`).
    pub fn described(lookup: impl Fn(&str) -> Option<String>) -> Result<(Self, Vec<Variable>), ConfigError> {
        let vars = Vars {
            lookup: &lookup,
            read: RefCell::new(Vec::new()),
        };
        let settings = Self::from_vars(&vars)?;
        Ok((settings, vars.read.into_inner()))
    }

    fn from_vars(vars: &Vars<'_, impl Fn(&str) -> Option<String>>) -> Result<Self, ConfigError> {
        let lookup = vars.lookup;
        let database_url = vars.get("DATABASE_URL", DEFAULT_DATABASE_URL);
        let window = vars.secs("RATE_LIMIT_WINDOW", 60)?;
        Ok(Settings {
            app: AppSettings {
                env: vars.parse("APP_ENV", AppEnv::Development, "development, production or test")?,
                host: vars.string("APP_HOST", "127.0.0.1"),
                port: vars.parse("APP_PORT", 8080, "a port number (0-65535)")?,
                workers: vars.parse("APP_WORKERS", 0, "a number of worker threads (0 = one per core)")?,
                shutdown_timeout: vars.secs("APP_SHUTDOWN_TIMEOUT", 10)?,
                shutdown_delay: Duration::from_secs(vars.parse(
                    "APP_SHUTDOWN_DELAY",
                    5,
                    "a whole number of seconds (0: drain at once)",
                )?),
                admin_token: vars.get("ADMIN_TOKEN", "").filter(|token| !token.is_empty()),
                auth_token_sliding: vars.parse("AUTH_TOKEN_SLIDING", false, "true or false")?,
            },
            database: DatabaseSettings {
                url_is_default: database_url.is_none(),
                url: database_url.unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned()),
                max_connections: vars.positive("DATABASE_MAX_CONNECTIONS", 10, "a positive number")?,
                connect_timeout: vars.millis("DATABASE_CONNECT_TIMEOUT_MS", 2000)?,
                acquire_timeout: vars.millis("DATABASE_ACQUIRE_TIMEOUT_MS", 1000)?,
                statement_timeout: vars.millis("DATABASE_STATEMENT_TIMEOUT_MS", 3000)?,
                health_timeout: vars.millis("DATABASE_HEALTH_TIMEOUT_MS", 1000)?,
                migration_timeout: vars.millis("DATABASE_MIGRATION_TIMEOUT_MS", 60_000)?,
                migrate_on_start: vars.parse("APP_MIGRATE_ON_START", true, "true or false")?,
            },
            redis: RedisSettings {
                enabled: vars.parse("REDIS_ENABLED", false, "true or false")?,
                url: vars.string("REDIS_URL", "redis://127.0.0.1:6379"),
                cluster_nodes: vars
                    .get("REDIS_CLUSTER_NODES", "")
                    .unwrap_or_default()
                    .split(',')
                    .map(str::trim)
                    .filter(|node| !node.is_empty())
                    .map(str::to_owned)
                    .collect(),
                fleet_sync: ["REDIS_URL", "REDIS_CLUSTER_NODES"]
                    .into_iter()
                    .any(|name| lookup(name).is_some_and(|value| !value.trim().is_empty())),
                tls_ca_file: vars
                    .get("REDIS_TLS_CA_FILE", "")
                    .filter(|path| !path.is_empty())
                    .map(PathBuf::from),
                key_prefix: vars.non_empty("REDIS_KEY_PREFIX", "nestling:")?,
                connect_timeout: vars.millis("REDIS_CONNECT_TIMEOUT_MS", 500)?,
                command_timeout: vars.millis("REDIS_COMMAND_TIMEOUT_MS", 250)?,
                pool_timeout: vars.millis("REDIS_POOL_TIMEOUT_MS", 300)?,
                pool_size: vars.positive("REDIS_POOL_SIZE", 8, "a positive number")?,
                breaker_threshold: vars.positive("REDIS_BREAKER_THRESHOLD", 3, "a positive number")?,
                breaker_cooldown: vars.millis("REDIS_BREAKER_COOLDOWN_MS", 1000)?,
            },
            cache: CacheSettings {
                l1_enabled: vars.parse("CACHE_L1_ENABLED", true, "true or false")?,
                l1_max_bytes: vars.bytes("CACHE_L1_MAX_BYTES", "128MiB")?,
                max_variants: vars.parse("CACHE_MAX_VARIANTS", 64, "a number of variants")?,
                negative_max_entries: vars.positive("CACHE_NEGATIVE_MAX_ENTRIES", 10_000, "a number of entries > 0")?,
                negative_ttl: vars.millis("CACHE_NEGATIVE_TTL_MS", 5000)?,
                max_pending_invalidations: vars.parse("CACHE_MAX_PENDING_INVALIDATIONS", 10_000, "a number of keys")?,
                l1_max_ttl: vars.secs("CACHE_L1_MAX_TTL", 60)?,
                l1_unsynced_ttl: vars.millis("CACHE_L1_UNSYNCED_TTL_MS", 500)?,
                ttl_jitter_percent: vars.parse("CACHE_TTL_JITTER_PERCENT", 5, "a percentage (0-100)")?,
            },
            ttl: TtlTable {
                tasks: vars.secs("CACHE_TTL_TASKS", 300)?,
                projects: vars.secs("CACHE_TTL_PROJECTS", 600)?,
                workspaces: vars.secs("CACHE_TTL_WORKSPACES", 1800)?,
                daily_metrics: vars.secs("CACHE_TTL_DAILY_METRICS", 900)?,
                user: vars.secs("CACHE_TTL_USER", 3600)?,
                rate_limit_window: window,
                auth_token: vars.secs("AUTH_TOKEN_TTL", 7200)?,
                // @generate: ttl-variables
            },
            rate_limit: RateLimitSettings {
                enabled: vars.parse("RATE_LIMIT_ENABLED", true, "true or false")?,
                api: vars.quotas("RATE_LIMIT_API", "600", window)?,
                auth_ip: vars.quotas("RATE_LIMIT_AUTH_IP", "20, 1000/1d", window)?,
                auth_email: vars.quotas("RATE_LIMIT_AUTH_EMAIL", "5, 100/1d", window)?,
                lease: vars.positive("RATE_LIMIT_LEASE", 1000, "a number of tokens > 0")?,
                lease_lifetime: vars.millis("RATE_LIMIT_LEASE_LIFETIME_MS", 5000)?,
                trust_proxy: vars.networks("TRUST_PROXY")?,
                instances: vars.positive("APP_INSTANCES", 1, "a number of instances > 0")?,
            },
            passwords: PasswordSettings {
                concurrency: match vars.parse("PASSWORD_HASH_CONCURRENCY", 0usize, "a number (0 = one per core)")? {
                    0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
                    n => n,
                },
                wait: vars.millis("PASSWORD_HASH_WAIT_MS", 500)?,
            },
            cors: vars.cors()?,
            idempotency: IdempotencySettings {
                ttl: vars.secs("IDEMPOTENCY_TTL", 86_400)?,
            },
            locks: LockSettings {
                store_timeout: vars.millis("LOCK_STORE_TIMEOUT_MS", 500)?,
                metrics_rebuild_concurrency: vars.positive(
                    "METRICS_REBUILD_CONCURRENCY",
                    2,
                    "a number of concurrent rebuilds > 0",
                )?,
            },
            events: EventSettings {
                retention: vars.secs("EVENTS_RETENTION", 86_400)?,
                relay_every: vars.millis("EVENTS_RELAY_EVERY_MS", 500)?,
                catch_up_every: vars.millis("EVENTS_CATCH_UP_MS", 1000)?,
                heartbeat: vars.secs("EVENTS_HEARTBEAT", 15)?,
                recheck_every: vars.millis("EVENTS_RECHECK_MS", 500)?,
                max_streams: vars.positive("EVENTS_MAX_STREAMS", 10_000, "a number of streams > 0")?,
                max_streams_per_user: vars.positive("EVENTS_MAX_STREAMS_PER_USER", 8, "a number of streams > 0")?,
                stream_buffer: vars.positive("EVENTS_STREAM_BUFFER", 256, "a number of events > 0")?,
                handler_timeout: vars.millis("EVENTS_HANDLER_TIMEOUT_MS", 2000)?,
            },
            jobs: JobSettings {
                workers: vars.parse("JOBS_WORKERS", 2, "a number of jobs at once (0 = none)")?,
                queue_concurrency: vars.positive("JOBS_QUEUE_CONCURRENCY", 2, "a number of jobs at once > 0")?,
                poll_every: vars.millis("JOBS_POLL_MS", 500)?,
                lease: vars.millis("JOBS_LEASE_MS", 30_000)?,
                purge_schedule: vars.cron("JOBS_PURGE_SCHEDULE", "0 0 * * * *")?,
                metrics_rebuild_on_write: vars.parse("METRICS_REBUILD_ON_WRITE", true, "true or false")?,
                due_reminders_schedule: vars.cron("JOBS_DUE_REMINDERS_SCHEDULE", "0 0 8 * * *")?,
            },
        })
    }
}

/// The environment as the configuration reads it: every read is recorded with its default, so
/// `nestling doctor` can show each variable, set or not.
struct Vars<'a, F: Fn(&str) -> Option<String>> {
    lookup: &'a F,
    read: RefCell<Vec<Variable>>,
}

impl<F: Fn(&str) -> Option<String>> Vars<'_, F> {
    fn get(&self, name: &'static str, default: impl Display) -> Option<String> {
        let value = (self.lookup)(name);
        self.read.borrow_mut().push(Variable {
            name,
            set: value.clone(),
            default: default.to_string(),
        });
        value
    }

    fn string(&self, name: &'static str, default: &str) -> String {
        self.get(name, default).unwrap_or_else(|| default.to_owned())
    }

    /// A string that must not be empty (an empty key prefix would put the app's keys, and its
    /// admin flush, across a whole shared Redis).
    fn non_empty(&self, name: &'static str, default: &str) -> Result<String, ConfigError> {
        let value = self.string(name, default);
        if value.is_empty() {
            return Err(ConfigError {
                name,
                expected: "a non-empty prefix, e.g. nestling:",
                value,
            });
        }
        Ok(value)
    }

    fn parse<T: FromStr + Display>(
        &self,
        name: &'static str,
        default: T,
        expected: &'static str,
    ) -> Result<T, ConfigError> {
        match self.get(name, &default) {
            None => Ok(default),
            Some(value) => value.trim().parse().map_err(|_| ConfigError { name, expected, value }),
        }
    }

    /// A cron expression of six fields, seconds first (`0 0 * * * *`: hourly).
    fn cron(&self, name: &'static str, default: &str) -> Result<String, ConfigError> {
        let value = self.string(name, default);
        match <cron::Schedule as std::str::FromStr>::from_str(&value) {
            Ok(_) => Ok(value),
            Err(_) => Err(ConfigError {
                name,
                expected: "a cron expression of six fields, seconds first (0 0 * * * * is hourly)",
                value,
            }),
        }
    }

    fn millis(&self, name: &'static str, default: u64) -> Result<Duration, ConfigError> {
        self.positive(name, default, "a whole number of milliseconds > 0")
            .map(Duration::from_millis)
    }

    fn secs(&self, name: &'static str, default: u64) -> Result<Duration, ConfigError> {
        self.positive(name, default, "a whole number of seconds > 0")
            .map(Duration::from_secs)
    }

    /// A quota list: `"5, 100/1d"`; a bare number is per `window`; units `s`, `m`, `h`, `d`.
    fn quotas(&self, name: &'static str, default: &str, window: Duration) -> Result<Vec<Quota>, ConfigError> {
        let value = self.string(name, default);
        let error = || ConfigError {
            name,
            expected: "quotas like 5, 100/1d (per RATE_LIMIT_WINDOW, or per s/m/h/d)",
            value: value.clone(),
        };
        let quotas: Option<Vec<Quota>> = value.split(',').map(|item| parse_quota(item.trim(), window)).collect();
        quotas.filter(|q| !q.is_empty()).ok_or_else(error)
    }

    /// Addresses and CIDRs, comma-separated: `10.0.0.0/8, 127.0.0.1` (a bare address is one host).
    /// A bare number was once a hop count, which trusts whoever connects: it is refused, not read
    /// as something else.
    fn networks(&self, name: &'static str) -> Result<Vec<ipnet::IpNet>, ConfigError> {
        let value = self.string(name, "");
        let network = |item: &str| {
            item.parse::<ipnet::IpNet>()
                .or_else(|_| item.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .ok()
                .map(|network| network.trunc())
        };
        let networks: Option<Vec<ipnet::IpNet>> = value
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(network)
            .collect();
        networks.ok_or(ConfigError {
            name,
            expected: "addresses or CIDRs of the trusted proxies, like 10.0.0.0/8,127.0.0.1 (empty: trust none; a \
                       hop count is no longer accepted)",
            value,
        })
    }

    /// A size: `65536`, `512KiB`, `128MiB`, `2GiB`.
    fn bytes(&self, name: &'static str, default: &str) -> Result<u64, ConfigError> {
        let value = self.string(name, default);
        let trimmed = value.trim();
        let (number, unit) = trimmed.split_at(trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len()));
        let shift = match unit.trim() {
            "" | "B" => Some(0),
            "KiB" => Some(10),
            "MiB" => Some(20),
            "GiB" => Some(30),
            _ => None,
        };
        let size = shift
            .zip(number.parse::<u64>().ok())
            .and_then(|(shift, n)| n.checked_mul(1 << shift));
        size.filter(|size| *size > 0).ok_or(ConfigError {
            name,
            expected: "a size > 0 like 65536, 512KiB, 128MiB or 2GiB",
            value,
        })
    }

    /// `CORS_ALLOWED_ORIGINS` (exact origins, or `*`), `CORS_ALLOW_CREDENTIALS`, `CORS_MAX_AGE`.
    fn cors(&self) -> Result<CorsSettings, ConfigError> {
        const ORIGINS: &str = "CORS_ALLOWED_ORIGINS";
        let value = self.string(ORIGINS, "");
        let origins: Vec<&str> = value.split(',').map(str::trim).filter(|o| !o.is_empty()).collect();
        let any_origin = origins == ["*"];
        // A browser sends `Origin` as scheme://host[:port] in lower case, compared byte for byte:
        // `https://app.example.com/` or `*` among others would never match, silently.
        if !any_origin && !origins.iter().all(|origin| is_exact_origin(origin)) {
            return Err(ConfigError {
                name: ORIGINS,
                expected: "exact origins like https://app.example.com (scheme://host[:port], lower case, no path), comma-separated, or * alone",
                value,
            });
        }
        let allow_credentials = self.parse("CORS_ALLOW_CREDENTIALS", false, "true or false")?;
        // Any site could then act with its visitors' credentials; browsers refuse `*` with them anyway.
        if any_origin && allow_credentials {
            return Err(ConfigError {
                name: ORIGINS,
                expected: "exact origins, not *, while CORS_ALLOW_CREDENTIALS=true",
                value,
            });
        }
        Ok(CorsSettings {
            allowed_origins: if any_origin {
                Vec::new()
            } else {
                origins.into_iter().map(str::to_owned).collect()
            },
            any_origin,
            allow_credentials,
            max_age: Duration::from_secs(self.parse("CORS_MAX_AGE", 600, "a whole number of seconds")?),
        })
    }

    fn positive<T: FromStr + Display + Default + PartialEq>(
        &self,
        name: &'static str,
        default: T,
        expected: &'static str,
    ) -> Result<T, ConfigError> {
        let value: T = self.parse(name, default, expected)?;
        if value == T::default() {
            return Err(ConfigError {
                name,
                expected,
                value: "0".into(),
            });
        }
        Ok(value)
    }
}

/// `scheme://host[:port]` as a browser serialises it in `Origin`: lower case, no path, no slash.
fn is_exact_origin(origin: &str) -> bool {
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false;
    };
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_lowercase())
        && scheme
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c));
    // host[:port]; the host a name (`app.example.com`), an IPv4 address or a bracketed IPv6 one.
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((address, port)) if !address.contains(|c: char| c.is_ascii_uppercase()) => {
                match address.parse::<std::net::Ipv6Addr>() {
                    Ok(_) => (None, port),
                    Err(_) => return false,
                }
            }
            _ => return false,
        },
        None => authority
            .find(':')
            .map_or((Some(authority), ""), |at| (Some(&authority[..at]), &authority[at..])),
    };
    let host_ok = host.is_none_or(|host| {
        host.split('.').all(|label| {
            !label.is_empty()
                && label
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        })
    });
    let port_ok = port.is_empty()
        || port.strip_prefix(':').is_some_and(|port| {
            port.len() <= 5 && port.chars().all(|c| c.is_ascii_digit()) && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
    scheme_ok && host_ok && port_ok
}

fn parse_quota(item: &str, window: Duration) -> Option<Quota> {
    let (limit, period) = match item.split_once('/') {
        None => (item, window),
        Some((limit, period)) => {
            let period = period.trim();
            let split = period.find(|c: char| !c.is_ascii_digit()).unwrap_or(period.len());
            let (count, unit) = period.split_at(split);
            let count: u64 = if count.is_empty() { 1 } else { count.parse().ok()? };
            let unit_secs = match unit {
                "" | "s" => 1,
                "m" => 60,
                "h" => 3600,
                "d" => 86_400,
                _ => return None,
            };
            (limit, Duration::from_secs(count.checked_mul(unit_secs)?))
        }
    };
    let limit: u64 = limit.trim().parse().ok()?;
    // A billion per period is plenty; and at most one request per microsecond, since the GCRA works
    // in whole microseconds and a smaller interval would be zero (a division by zero per decision).
    let fits = limit > 0 && limit <= 1_000_000_000 && u128::from(limit) <= period.as_micros();
    fits.then_some(Quota { limit, period })
}

impl Display for AppEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Development => "development",
            Self::Production => "production",
            Self::Test => "test",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn settings(vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Settings::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_match_the_documented_ttl_table() {
        let s = settings(&[]).unwrap();
        for (name, default, value) in s.ttl.entries() {
            assert_eq!(value, Duration::from_secs(default), "{name}");
        }
        assert!(s.database.url_is_default);
        assert!(!s.redis.enabled);
        assert_eq!(s.app.port, 8080);
    }

    #[test]
    fn an_invalid_value_names_the_variable() {
        let cases = [
            ("APP_PORT", "eighty"),
            ("APP_PORT", "70000"),
            ("REDIS_ENABLED", "yes please"),
            ("CACHE_TTL_TASKS", "0"),
            ("DATABASE_STATEMENT_TIMEOUT_MS", "-1"),
            ("APP_ENV", "staging"),
            ("RATE_LIMIT_AUTH_EMAIL", "off"),
            ("RATE_LIMIT_API", "10/1y"),
            ("RATE_LIMIT_API", "0"),
            ("RATE_LIMIT_AUTH_IP", ""),
            ("RATE_LIMIT_LEASE", "0"),
            // More than one per microsecond: the GCRA interval would be zero.
            ("RATE_LIMIT_API", "2000000/1s"),
            ("REDIS_KEY_PREFIX", ""),
            ("CACHE_L1_MAX_BYTES", "0"),
            ("CACHE_L1_MAX_BYTES", "12MB"),
            ("CACHE_L1_MAX_BYTES", "MiB"),
            // A hop count trusts whoever connects directly; refused rather than misread.
            ("TRUST_PROXY", "1"),
            ("TRUST_PROXY", "0"),
            ("TRUST_PROXY", "10.0.0.0/33"),
            ("TRUST_PROXY", "10.0.0.0/8,proxy"),
            ("LOCK_STORE_TIMEOUT_MS", "0"),
            ("METRICS_REBUILD_CONCURRENCY", "0"),
        ];
        for (name, value) in cases {
            let err = settings(&[(name, value)]).expect_err(name);
            assert_eq!(err.name, name);
            assert!(
                err.to_string()
                    .starts_with(&format!("invalid value for {name}: expected ")),
                "{err}"
            );
        }
    }

    #[test]
    fn sizes_accept_plain_bytes_and_binary_units() {
        for (value, bytes) in [
            ("65536", 65536),
            ("512KiB", 512 << 10),
            ("128MiB", 128 << 20),
            (" 2GiB ", 2 << 30),
        ] {
            let s = settings(&[("CACHE_L1_MAX_BYTES", value)]).expect(value);
            assert_eq!(s.cache.l1_max_bytes, bytes, "{value}");
        }
    }

    #[test]
    fn quotas_read_bare_numbers_as_per_window_and_accept_units() {
        let s = settings(&[
            ("RATE_LIMIT_WINDOW", "30"),
            ("RATE_LIMIT_AUTH_IP", "5, 100/1d,7/90s , 2/h"),
        ])
        .unwrap();
        let per = |limit, secs| Quota {
            limit,
            period: Duration::from_secs(secs),
        };
        assert_eq!(
            s.rate_limit.auth_ip,
            vec![per(5, 30), per(100, 86_400), per(7, 90), per(2, 3600)]
        );
        assert_eq!(s.rate_limit.api, vec![per(600, 30)]);
    }

    #[test]
    fn a_pool_size_of_zero_is_refused_naming_the_variable() {
        // Each would start and then panic in its pool (or be quietly taken as 1).
        for name in ["DATABASE_MAX_CONNECTIONS", "REDIS_POOL_SIZE", "REDIS_BREAKER_THRESHOLD"] {
            let err = settings(&[(name, "0")]).expect_err(name);
            assert_eq!(err.name, name);
            assert_eq!(
                err.to_string(),
                format!("invalid value for {name}: expected a positive number, got \"0\"")
            );
        }
    }

    #[test]
    fn cors_is_off_by_default_and_reads_exact_origins() {
        let off = settings(&[]).unwrap().cors;
        assert!(!off.enabled());
        assert!(!off.allow_credentials);
        assert_eq!(off.max_age, Duration::from_secs(600));
        let on = settings(&[
            (
                "CORS_ALLOWED_ORIGINS",
                " https://app.example.com, http://localhost:5173 ,",
            ),
            ("CORS_ALLOW_CREDENTIALS", "true"),
            ("CORS_MAX_AGE", "0"),
        ])
        .unwrap()
        .cors;
        assert!(on.enabled() && !on.any_origin && on.allow_credentials);
        assert_eq!(on.allowed_origins, ["https://app.example.com", "http://localhost:5173"]);
        assert_eq!(on.max_age, Duration::ZERO);
        for origin in ["http://[::1]:3000", "http://127.0.0.1:8080", "capacitor://localhost"] {
            let read = settings(&[("CORS_ALLOWED_ORIGINS", origin)]).expect(origin).cors;
            assert_eq!(read.allowed_origins, [origin]);
        }
        let any = settings(&[("CORS_ALLOWED_ORIGINS", "*")]).unwrap().cors;
        assert!(any.enabled() && any.any_origin && any.allowed_origins.is_empty());
    }

    #[test]
    fn an_origin_a_browser_would_never_send_is_refused_naming_the_variable() {
        for (name, value) in [
            ("CORS_ALLOWED_ORIGINS", "https://app.example.com/"),
            ("CORS_ALLOWED_ORIGINS", "app.example.com"),
            ("CORS_ALLOWED_ORIGINS", "https://App.example.com"),
            ("CORS_ALLOWED_ORIGINS", "https://app.example.com/path"),
            ("CORS_ALLOWED_ORIGINS", "null"),
            ("CORS_ALLOWED_ORIGINS", "*, https://app.example.com"),
            ("CORS_ALLOWED_ORIGINS", "https://app.example.com:"),
            ("CORS_ALLOWED_ORIGINS", "https://app.example.com:99999"),
            ("CORS_ALLOWED_ORIGINS", "https://app..example.com"),
            ("CORS_ALLOWED_ORIGINS", "http://[zz]:3000"),
            ("CORS_ALLOWED_ORIGINS", "https://user@app.example.com"),
            ("CORS_ALLOW_CREDENTIALS", "yes"),
            ("CORS_MAX_AGE", "-1"),
        ] {
            let err = settings(&[(name, value)]).expect_err(value);
            assert_eq!(err.name, name, "{value}");
        }
    }

    #[test]
    fn any_origin_with_credentials_is_refused_in_one_line_naming_the_variable() {
        let err = settings(&[("CORS_ALLOWED_ORIGINS", "*"), ("CORS_ALLOW_CREDENTIALS", "true")]).unwrap_err();
        assert_eq!(err.name, "CORS_ALLOWED_ORIGINS");
        let line = err.to_string();
        assert!(
            !line.contains('\n') && line.contains("CORS_ALLOW_CREDENTIALS=true"),
            "{line}"
        );
    }

    #[test]
    fn an_explicit_database_url_is_not_the_default() {
        let s = settings(&[("DATABASE_URL", DEFAULT_DATABASE_URL)]).unwrap();
        assert!(!s.database.url_is_default);
    }

    #[test]
    fn trusted_proxies_are_addresses_and_cidrs_and_none_by_default() {
        assert!(settings(&[]).unwrap().rate_limit.trust_proxy.is_empty());
        assert!(settings(&[("TRUST_PROXY", " ")])
            .unwrap()
            .rate_limit
            .trust_proxy
            .is_empty());
        let s = settings(&[("TRUST_PROXY", "10.0.0.0/8, 127.0.0.1,fd00::/8, 172.29.80.9/24")]).unwrap();
        let shown: Vec<String> = s.rate_limit.trust_proxy.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["10.0.0.0/8", "127.0.0.1/32", "fd00::/8", "172.29.80.0/24"]);
    }
}
