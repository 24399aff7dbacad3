//! Rate limiting: policies from config, decided by GCRA (`gcra`) in one atomic Redis script per
//! decision (timed by Redis `TIME`), or in process when Redis is off or failing, and applied per
//! route group by the `RateLimit` middleware (`middleware`).
//!
//! - `/api` (every route but login and register): per user when the bearer token is valid, else
//!   per client IP. It sits on every request, so an instance takes a lease of tokens from Redis
//!   per identity and spends them locally. A lease is what the identity spent in the last lease
//!   lifetime, capped (`RATE_LIMIT_LEASE`, 5 % of the quota), and is topped up in the background
//!   when under a quarter is left; what a lease did not spend goes back with the next call.
//!   Across the fleet the policy admits at most the exact figure and at least that less
//!   instances × the cap (README, "Rate limiting").
//! - login and register: per client IP and per email, exact across instances (one script call
//!   decides both identities and every quota); a success gives its email token back.
//! - Without Redis (memory mode, breaker open, or a call that exceeds the command timeout) the
//!   same policies are enforced per instance at 1/`APP_INSTANCES` of each quota; the state lives
//!   in bounded moka caches, so a flood of new identities cannot grow memory without bound.

pub mod gcra;
pub mod middleware;

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use actix_web::http::header::HeaderValue;
use async_trait::async_trait;
use bb8_redis::redis::{self, Script};
use ipnet::IpNet;
use moka::sync::Cache;
use serde::Serialize;
use shaku::{Component, Interface};
use smallvec::SmallVec;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::config::{Quota, RateLimitSettings};
use crate::infra::redis::{RedisService, ScriptRun};
use crate::infra::telemetry::Telemetry;
use gcra::Cell;

/// Who a decision is about. Fixed-size, so local state per identity is bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Identity {
    User(Uuid),
    Ip(IpAddr),
    /// The SHA-256 of the email's one matching form (`users::model::email_key`), so two
    /// spellings of one account share one bucket.
    Email([u8; 32]),
}

impl Identity {
    /// What the Redis key hashes (the registry turns it into `rl:<policy>:<sha256>`).
    fn key_material(&self) -> Vec<u8> {
        match self {
            Self::User(id) => [b"user:".as_slice(), id.as_bytes()].concat(),
            Self::Ip(ip) => format!("ip:{ip}").into_bytes(),
            Self::Email(digest) => [b"email:".as_slice(), digest].concat(),
        }
    }

    /// An account's email as seen from one address that logged in to it before: it has the email
    /// quota to itself, so strangers elsewhere cannot spend it.
    pub fn email_at(email: &Identity, ip: &Identity) -> Self {
        Self::Email(known_address(email, ip))
    }

    pub fn email(email: &str) -> Self {
        use sha2::{Digest, Sha256};
        Self::Email(Sha256::digest(crate::modules::users::model::email_key(email).as_bytes()).into())
    }
}

/// The digest an (email, address) pair is known by.
fn known_address(email: &Identity, ip: &Identity) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::new()
        .chain_update(email.key_material())
        .chain_update(ip.key_material())
        .finalize()
        .into()
}

/// The route groups that carry policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RouteGroup {
    /// Every `/api` route but login and register; identity: the user, else the client IP.
    Api,
    /// `POST /api/auth/login` and `/api/auth/register`; identities: client IP and email.
    Credentials,
}

impl RouteGroup {
    fn as_str(self) -> &'static str {
        match self {
            Self::Api => "api",
            Self::Credentials => "credentials",
        }
    }
}

/// A named list of quotas for one kind of identity.
#[derive(Debug, Clone)]
struct Policy {
    name: &'static str,
    quotas: Vec<Quota>,
    /// Per quota: its name in the headers (`api-1m`, `auth-email-1d`, ...).
    quota_names: Vec<String>,
    /// Per quota: `X-RateLimit-Limit`.
    limit_headers: Vec<HeaderValue>,
}

impl Policy {
    fn new(name: &'static str, quotas: Vec<Quota>) -> Self {
        let quota_names = quotas
            .iter()
            .map(|q| format!("{name}-{}", period_name(q.period)))
            .collect();
        let limit_headers = quotas.iter().map(|q| static_header(q.limit.to_string())).collect();
        Self {
            name,
            quotas,
            quota_names,
            limit_headers,
        }
    }
}

/// A header value built once and sent with every response: static, so cloning it per request
/// touches no shared reference count (two workers would otherwise contend for its cache line).
/// Made once per limiter, i.e. once per app instance.
fn static_header(value: String) -> HeaderValue {
    HeaderValue::from_static(Box::leak(value.into_boxed_str()))
}

fn period_name(period: Duration) -> String {
    let secs = period.as_secs();
    match secs {
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// The policies of one route group, with the `RateLimit-Policy` header they all share.
#[derive(Debug, Clone)]
struct Group {
    policies: Vec<Policy>,
    policy_header: HeaderValue,
    /// The most tokens a lease holds (1: every request is decided in Redis, exactly).
    lease: u64,
}

impl Group {
    fn new(policies: Vec<Policy>, lease: u64) -> Self {
        let items: Vec<String> = policies
            .iter()
            .flat_map(|p| {
                p.quotas
                    .iter()
                    .zip(&p.quota_names)
                    .map(|(q, name)| format!("\"{name}\";q={};w={}", q.limit, q.period.as_secs()))
            })
            .collect();
        Self {
            policy_header: static_header(items.join(", ")),
            policies,
            lease,
        }
    }
}

/// A decision, with what the response headers say about the tightest quota.
#[derive(Debug, Clone)]
pub struct Decision {
    pub allowed: bool,
    /// The quota with the fewest tokens left: (policy index, quota index) in the group.
    tightest: (usize, usize),
    pub remaining: u64,
    /// Until the tightest quota is full again.
    pub reset: Duration,
    /// When denied: how long to wait (never zero).
    pub retry_after: Duration,
    pub decided_by: DecidedBy,
}

impl Decision {
    /// `Retry-After`: whole seconds, rounded up, so a client never retries too early.
    pub fn retry_after_secs(&self) -> u64 {
        whole_seconds(self.retry_after)
    }
}

/// Where a decision was made (a label of `rate_limit_decisions_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecidedBy {
    /// One script call.
    Redis,
    /// Tokens this instance took from Redis before, or the denial Redis gave.
    Lease,
    /// The in-process rule (no Redis).
    Local,
}

impl DecidedBy {
    const ALL: [DecidedBy; 3] = [Self::Redis, Self::Lease, Self::Local];

    fn as_str(self) -> &'static str {
        match self {
            Self::Redis => "redis",
            Self::Lease => "lease",
            Self::Local => "local",
        }
    }
}

/// A duration in whole seconds, rounded up.
fn whole_seconds(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

/// What `/api/rate-limit/policy` shows.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyView {
    pub group: RouteGroup,
    pub name: &'static str,
    /// `user-or-ip`, `ip` or `email`.
    pub identity: &'static str,
    pub quotas: Vec<QuotaView>,
    /// The most tokens an instance takes from Redis at a time for one identity (1 = exact
    /// across instances).
    pub lease: u64,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct QuotaView {
    pub name: String,
    pub limit: u64,
    pub window_seconds: u64,
    /// What this instance enforces on its own when Redis is not used (limit / `APP_INSTANCES`).
    pub local_limit: u64,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitStatus {
    pub enabled: bool,
    /// `redis` (decided in Redis) or `local` (memory mode, or Redis failing).
    pub mode: &'static str,
    pub instances: u64,
    /// `TRUST_PROXY`: the proxies whose `X-Forwarded-For` is believed (empty: none).
    #[schema(example = json!(["172.29.80.10/32"]))]
    pub trusted_proxies: Vec<String>,
    pub policies: Vec<PolicyView>,
}

#[async_trait]
pub trait RateLimiter: Interface {
    fn enabled(&self) -> bool;
    /// `TRUST_PROXY`: the proxies whose `X-Forwarded-For` entries are believed for the client IP.
    fn trusted_proxies(&self) -> &[IpNet];
    /// Decides one request of `group` for these identities (one per policy, in policy order).
    async fn check(&self, group: RouteGroup, identities: &[Identity]) -> Decision;
    /// Gives back the token `decision` took from the policy at `policy` (a login that succeeded:
    /// only failures count against an account), where it was taken.
    async fn give_back(&self, group: RouteGroup, decision: &Decision, identities: &[Identity], policy: usize);
    /// Remembers that `ip` logged in to the account behind `email` (`KNOWN_ADDRESS_TTL`).
    async fn remember_address(&self, email: &Identity, ip: &Identity);
    /// Whether `ip` logged in to the account behind `email` before: then it is judged by
    /// `Identity::email_at`, not by the email's quota that anyone can spend.
    async fn is_known_address(&self, email: &Identity, ip: &Identity) -> bool;
    /// Writes the RateLimit headers of a decision (`Retry-After` comes with the 429 itself).
    fn headers(&self, group: RouteGroup, decision: &Decision, headers: &mut actix_web::http::header::HeaderMap);
    fn status(&self) -> RateLimitStatus;
}

/// Tokens this instance took from Redis for one identity, spent locally until used up or stale;
/// and, after Redis said no, the time until which the answer stays no (no Redis call per denied
/// request). Times are microseconds on the limiter's clock. `repr(C)`, what a request reads
/// first: with thousands of identities a lease is rarely in the CPU's cache, and the fields a
/// spent token touches then come in one cache line.
#[derive(Default)]
#[repr(C)]
struct Lease {
    tokens: AtomicU64,
    /// Tokens may be spent until then.
    expires: AtomicU64,
    /// What Redis said was left after its grant, when the tightest quota is full again, and which
    /// quota that is.
    remaining: AtomicU64,
    reset_at: AtomicU64,
    tightest: AtomicU64,
    /// The size of the lease now: what the identity spent in a lease lifetime lately.
    size: AtomicU64,
    /// The tokens spent since the last grant (with `granted_at`: the identity's recent rate).
    spent: AtomicU64,
    /// Set while one request takes or tops up the lease: the others keep spending what is left,
    /// and those that find nothing wait for it (`refilled`) instead of each asking Redis.
    refilling: AtomicBool,
    granted_at: AtomicU64,
    denied_until: AtomicU64,
    refill_done: tokio::sync::Notify,
}

impl Lease {
    /// Returns once the request taking or topping up this lease has recorded what Redis granted
    /// (at once if none is). That fetch is bounded by the Redis command timeout; `REFILL_WAIT`
    /// only guards against a missed wake-up.
    async fn refilled(&self) {
        let done = self.refill_done.notified();
        tokio::pin!(done);
        done.as_mut().enable();
        if self.refilling.load(Ordering::Acquire) {
            let _ = tokio::time::timeout(REFILL_WAIT, done).await;
        }
    }

    fn finish_refill(&self) {
        self.refilling.store(false, Ordering::Release);
        self.refill_done.notify_waiters();
    }
}

const REFILL_WAIT: Duration = Duration::from_secs(1);

/// A lease is at most 1/`LEASE_SHARE` of the tightest quota (5 %).
const LEASE_SHARE: u64 = 20;

/// A lease this request is to top up, how many tokens it lacks, and whether what is left lasts
/// until the next top-up tick (else the top-up goes at once).
type TopUp = (Arc<Lease>, u64, bool);

/// A top-up waiting for the next tick: its identities, lease and the tokens it lacks.
struct WaitingTopUp {
    group: RouteGroup,
    identities: SmallVec<[Identity; 2]>,
    lease: Arc<Lease>,
    lacking: u64,
}

type IdentityCache<V> = Cache<Identity, V, foldhash::fast::RandomState>;

/// Bounded by count only: per-entry expiry would cost every lookup its bookkeeping, and an
/// evicted identity only starts again from a full quota (or takes a new lease).
fn identity_cache<V: Clone + Send + Sync + 'static>(capacity: u64) -> IdentityCache<V> {
    Cache::builder()
        .max_capacity(capacity)
        .build_with_hasher(foldhash::fast::RandomState::default())
}

/// This instance's leases by identity. A plain concurrent map: read on every request, where a
/// moka lookup's bookkeeping (recording the read, its frequency sketch, the upkeep it sets off)
/// cost the many-users benchmark about 1.5 µs a request. Bounded all the same: when full, the
/// leases that lapsed go, and if none did, all of them (a flood of new identities; each lease
/// dropped holds at most its cap of charged tokens, as a moka eviction would).
struct Leases {
    map: dashmap::DashMap<Identity, Arc<Lease>, foldhash::fast::RandomState>,
    capacity: usize,
}

impl Leases {
    fn new(capacity: usize) -> Self {
        Self {
            // Many shards: a read takes its shard's lock, whose cache line the workers otherwise
            // pass back and forth on nearly every request (a few shards, thousands of identities).
            map: dashmap::DashMap::with_hasher_and_shard_amount(foldhash::fast::RandomState::default(), LEASE_SHARDS),
            capacity,
        }
    }

    fn get(&self, identity: &Identity) -> Option<Arc<Lease>> {
        self.map.get(identity).map(|lease| lease.clone())
    }

    /// `spend` on the identity's lease, in place: no reference count touched on the way.
    fn with<T>(&self, identity: &Identity, spend: impl FnOnce(&Arc<Lease>) -> Option<T>) -> Option<T> {
        spend(self.map.get(identity)?.value())
    }

    fn get_or_insert(&self, identity: Identity, now: u64) -> Arc<Lease> {
        if let Some(lease) = self.get(&identity) {
            return lease;
        }
        if self.map.len() >= self.capacity {
            self.map.retain(|_, lease| lease.expires.load(Ordering::Acquire) > now);
            if self.map.len() >= self.capacity {
                self.map.clear();
            }
        }
        self.map.entry(identity).or_default().clone()
    }
}

const LEASE_SHARDS: usize = 256;

/// Top-ups wait for the next tick of this clock and go to Redis together (`next_top_up_tick`),
/// when what is left of the lease lasts four ticks at the rate it is spent; those of identities
/// faster than that go at once.
const TOP_UP_TICK: Duration = Duration::from_millis(5);

/// Identities whose state one policy keeps in process at most.
const LOCAL_CAPACITY: u64 = 100_000;
/// How long an address an account logged in from stays known (let through that account's email
/// quota).
const KNOWN_ADDRESS_TTL: Duration = Duration::from_secs(30 * 86_400);

/// The component: the limiter behind an `Arc`, so a lease's top-up can go on in a task of its own
/// while the request that set it off is answered.
pub struct RedisRateLimiter {
    inner: Arc<Limiter>,
}

impl std::ops::Deref for RedisRateLimiter {
    type Target = Limiter;

    fn deref(&self) -> &Limiter {
        &self.inner
    }
}

pub struct Limiter {
    redis: Arc<dyn RedisService>,
    settings: RateLimitSettings,
    api: Group,
    credentials: Group,
    /// In-process GCRA state per (group, policy index): identity → TATs of its quotas.
    local: Vec<IdentityCache<Arc<Mutex<Vec<u64>>>>>,
    leases: Leases,
    /// Top-ups waiting for the next tick, sent to Redis in one round trip (`top_up_together`).
    waiting_top_ups: Mutex<Vec<WaitingTopUp>>,
    /// (email, address) pairs that logged in, by digest; Redis holds the fleet's copy.
    known_addresses: Cache<[u8; 32], (), foldhash::fast::RandomState>,
    /// The local clock's zero, so TATs are microseconds since start.
    epoch: Instant,
    /// `rate_limit_decisions_total` children, resolved once: [group][allowed, denied][by].
    decisions: [[[prometheus::IntCounter; 3]; 2]; 2],
}

pub struct RedisRateLimiterParameters {
    pub settings: RateLimitSettings,
    pub telemetry: Arc<Telemetry>,
}

crate::container::set_by_the_container!(RedisRateLimiterParameters);

impl<M: shaku::Module + shaku::HasComponent<dyn RedisService>> Component<M> for RedisRateLimiter {
    type Interface = dyn RateLimiter;
    type Parameters = RedisRateLimiterParameters;

    fn build(context: &mut shaku::ModuleBuildContext<M>, params: RedisRateLimiterParameters) -> Box<dyn RateLimiter> {
        Box::new(RedisRateLimiter::new(
            M::build_component(context),
            params.settings,
            &params.telemetry,
        ))
    }
}

/// GCRA over several quotas in one atomic step, timed by Redis. KEYS: one hash per (policy,
/// identity); ARGV[1]: tokens wanted; ARGV[2]: tokens given back first (a lease's unspent ones, a
/// login that succeeded); then per quota: key index, field (the quota's index in its policy),
/// interval and period (µs). Returns granted, retry-after (µs), then remaining and reset (µs) per
/// quota. Same rule as `gcra::decide`.
const SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local wanted, returned = tonumber(ARGV[1]), tonumber(ARGV[2])
local n = (#ARGV - 2) / 4
local granted, retry = wanted, 0
local tats, available = {}, {}
for i = 1, n do
  local b = 2 + (i - 1) * 4
  local interval, period = tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
  local tat = tonumber(redis.call('HGET', KEYS[tonumber(ARGV[b + 1])], ARGV[b + 2]) or 0) - returned * interval
  if tat < now then tat = now end
  tats[i] = tat
  available[i] = math.floor((now + period - tat) / interval)
  if available[i] < granted then granted = available[i] end
  if available[i] < 1 then retry = math.max(retry, tat + interval - period - now) end
end
if granted > 0 then retry = 0 end
local result, expiry = {granted, retry}, {}
for i = 1, n do
  local b = 2 + (i - 1) * 4
  local key = KEYS[tonumber(ARGV[b + 1])]
  local tat = tats[i] + granted * tonumber(ARGV[b + 3])
  if granted > 0 or returned > 0 then
    redis.call('HSET', key, ARGV[b + 2], tat)
    expiry[key] = math.max(expiry[key] or 0, tat - now)
  end
  result[#result + 1] = available[i] - granted
  result[#result + 1] = tat - now
end
for key, us in pairs(expiry) do redis.call('PEXPIRE', key, math.floor(us / 1000) + 1) end
return result
";

fn script() -> &'static Script {
    static SCRIPT_ONCE: OnceLock<Script> = OnceLock::new();
    SCRIPT_ONCE.get_or_init(|| Script::new(SCRIPT))
}

/// The tokens spent from a lease since its last grant, and the microseconds since that grant:
/// the identity's recent rate, which sizes its next lease and times its top-up.
fn spending_since_grant(lease: &Lease, now: u64) -> (u64, u64) {
    (
        lease.spent.load(Ordering::Relaxed),
        now.saturating_sub(lease.granted_at.load(Ordering::Relaxed)),
    )
}

/// The script's answer: granted, retry-after, then remaining and reset per quota.
fn outcome_of(value: redis::Value) -> Option<gcra::Outcome> {
    let numbers: Vec<i64> = redis::from_redis_value(value).ok()?;
    let (head, cells) = numbers.split_at_checked(2)?;
    Some(gcra::Outcome {
        granted: head[0].max(0) as u64,
        retry_after: head[1].max(0) as u64,
        cells: cells
            .chunks_exact(2)
            .map(|pair| gcra::CellState {
                remaining: pair[0].max(0) as u64,
                reset: pair[1].max(0) as u64,
            })
            .collect(),
    })
}

fn micros(duration: Duration) -> u64 {
    duration.as_micros() as u64
}

impl RedisRateLimiter {
    pub fn new(redis: Arc<dyn RedisService>, settings: RateLimitSettings, telemetry: &Telemetry) -> Self {
        Self::with_capacity(redis, settings, telemetry, LOCAL_CAPACITY)
    }

    /// `new`, keeping in-process state for at most `capacity` identities per policy.
    fn with_capacity(
        redis: Arc<dyn RedisService>,
        settings: RateLimitSettings,
        telemetry: &Telemetry,
        capacity: u64,
    ) -> Self {
        // A lease is at most 5 % of the policy's tightest quota: what other instances' leases
        // hold back stays within instances × 5 % of it, however large RATE_LIMIT_LEASE is.
        let tightest = settings.api.iter().map(|q| q.limit).min().unwrap_or(1);
        let lease = settings.lease.min(tightest / LEASE_SHARE).max(1);
        let api = Group::new(vec![Policy::new("api", settings.api.clone())], lease);
        let credentials = Group::new(
            vec![
                Policy::new("auth-ip", settings.auth_ip.clone()),
                Policy::new("auth-email", settings.auth_email.clone()),
            ],
            1,
        );
        let local = api
            .policies
            .iter()
            .chain(&credentials.policies)
            .map(|_| identity_cache(capacity))
            .collect();
        let inner = Limiter {
            redis,
            leases: Leases::new(capacity as usize),
            waiting_top_ups: Mutex::new(Vec::new()),
            known_addresses: Cache::builder()
                .max_capacity(capacity)
                .time_to_live(KNOWN_ADDRESS_TTL)
                .build_with_hasher(foldhash::fast::RandomState::default()),
            settings,
            api,
            credentials,
            local,
            epoch: Instant::now(),
            decisions: [RouteGroup::Api, RouteGroup::Credentials].map(|group| {
                ["allowed", "denied"].map(|outcome| {
                    DecidedBy::ALL.map(|by| {
                        telemetry
                            .rate_limit_decisions
                            .with_label_values(&[group.as_str(), outcome, by.as_str()])
                    })
                })
            }),
        };
        Self { inner: Arc::new(inner) }
    }
}

impl Limiter {
    fn group(&self, group: RouteGroup) -> &Group {
        match group {
            RouteGroup::Api => &self.api,
            RouteGroup::Credentials => &self.credentials,
        }
    }

    /// Index of a policy's local state.
    fn local_index(&self, group: RouteGroup, policy: usize) -> usize {
        match group {
            RouteGroup::Api => policy,
            RouteGroup::Credentials => self.api.policies.len() + policy,
        }
    }

    fn now(&self) -> u64 {
        micros(self.epoch.elapsed()) + 1
    }

    /// When the top-ups set off now go to Redis: together, on the next `TOP_UP_TICK` of the
    /// limiter's clock, so that Redis wakes once for them all rather than once for each (with
    /// thousands of busy identities, each waking Redis cost more than its script).
    fn next_top_up_tick(&self) -> tokio::time::Instant {
        let tick = micros(TOP_UP_TICK);
        let next = (micros(self.epoch.elapsed()) / tick + 1) * tick;
        tokio::time::Instant::from_std(self.epoch + Duration::from_micros(next))
    }

    /// Answers from this instance's lease: a token of it, or the denial Redis gave until it
    /// expires. `None`: ask Redis. With the decision come the lease and the tokens it lacks when
    /// this request is the one to top it up (under a quarter of the lease left, nobody else at it).
    fn spend_lease(&self, identity: &Identity, cap: u64) -> Option<(Decision, Option<TopUp>)> {
        self.leases.with(identity, |lease| self.spend(lease, cap))
    }

    fn spend(&self, lease: &Arc<Lease>, cap: u64) -> Option<(Decision, Option<TopUp>)> {
        let now = self.now();
        let reset = Duration::from_micros(lease.reset_at.load(Ordering::Relaxed).saturating_sub(now));
        let tightest = (0, lease.tightest.load(Ordering::Relaxed) as usize);
        let spent = (now < lease.expires.load(Ordering::Acquire))
            .then(|| {
                lease
                    .tokens
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| t.checked_sub(1))
                    .ok()
            })
            .flatten();
        if let Some(before) = spent {
            lease.spent.fetch_add(1, Ordering::Relaxed);
            let decision = Decision {
                allowed: true,
                tightest,
                remaining: lease.remaining.load(Ordering::Relaxed) + before - 1,
                reset,
                retry_after: Duration::ZERO,
                decided_by: DecidedBy::Lease,
            };
            let left = before - 1;
            // Under a quarter of the lease left: a top-up sets off, in the background, while a
            // quarter of a lifetime's requests still find tokens.
            let top_up = left * 4 < lease.size.load(Ordering::Relaxed)
                && lease
                    .refilling
                    .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok();
            if !top_up {
                return Some((decision, None));
            }
            let next = self.next_size(lease, now, cap);
            // At the rate the lease is spent, do the tokens left last a few ticks?
            let (spent, since_grant) = spending_since_grant(lease, now);
            let can_wait = u128::from(left) * u128::from(since_grant) / u128::from(spent.max(1))
                > u128::from(micros(TOP_UP_TICK) * 4);
            return Some((
                decision,
                Some((lease.clone(), next.saturating_sub(left).max(1), can_wait)),
            ));
        }
        if lease.tokens.load(Ordering::Acquire) > 0 {
            // Lapsed tokens: ask Redis, which takes them back first.
            return None;
        }
        let denied_until = lease.denied_until.load(Ordering::Acquire);
        (now < denied_until).then(|| {
            let decision = Decision {
                allowed: false,
                tightest,
                remaining: 0,
                reset,
                retry_after: Duration::from_micros(denied_until - now),
                decided_by: DecidedBy::Lease,
            };
            (decision, None)
        })
    }

    /// The size of an identity's next lease: the tokens it spent since its last grant, scaled to
    /// a lease lifetime, at least 1 and at most `cap`. A client calling now and then gets 1 (it
    /// is charged what it uses), a busy one a lifetime's worth (one Redis call per lease). It
    /// becomes the lease's size, which the next top-up mark is judged by.
    fn next_size(&self, lease: &Lease, now: u64, cap: u64) -> u64 {
        let (spent, since_grant) = spending_since_grant(lease, now);
        let elapsed = since_grant.max(1_000);
        let per_lifetime = u128::from(spent) * u128::from(micros(self.settings.lease_lifetime)) / u128::from(elapsed);
        let size = u64::try_from(per_lifetime).unwrap_or(u64::MAX).clamp(1, cap);
        lease.size.store(size, Ordering::Relaxed);
        size
    }

    /// Takes the tokens of a lease that lapsed unspent, to give them back to Redis.
    fn reclaim_lapsed(&self, lease: &Lease) -> u64 {
        if self.now() >= lease.expires.load(Ordering::Acquire) {
            lease.tokens.swap(0, Ordering::AcqRel)
        } else {
            0
        }
    }

    /// Keeps what Redis granted beyond the `used` tokens of this request (or its denial) for the
    /// next requests.
    fn record_lease(&self, identity: &Identity, granted: u64, used: u64, decision: &Decision) {
        let lease = self.leases.get_or_insert(*identity, self.now());
        let now = self.now();
        if granted == 0 {
            lease
                .denied_until
                .store(now + micros(decision.retry_after), Ordering::Release);
            return;
        }
        lease.denied_until.store(0, Ordering::Release);
        lease.remaining.store(decision.remaining, Ordering::Relaxed);
        lease.reset_at.store(now + micros(decision.reset), Ordering::Relaxed);
        lease.tightest.store(decision.tightest.1 as u64, Ordering::Relaxed);
        // Tokens that lapsed while this call was out are lent on with the new ones: each was
        // granted once, and dropping them would charge the client for nothing.
        lease.tokens.fetch_add(granted - used, Ordering::AcqRel);
        lease.granted_at.store(now, Ordering::Relaxed);
        lease.spent.store(used, Ordering::Relaxed);
        lease
            .expires
            .store(now + micros(self.settings.lease_lifetime), Ordering::Release);
    }

    /// One script call for every quota of every identity, after giving `returned` tokens back to
    /// each; `None` when Redis could not decide. On a Redis Cluster, identities live on different
    /// slots: each policy is decided by its own call, in order, and a denial stops there (the
    /// policies decided before it have spent).
    async fn in_redis(
        &self,
        group: RouteGroup,
        identities: &[Identity],
        wanted: u64,
        returned: u64,
    ) -> Option<gcra::Outcome> {
        let on_cluster = self.redis.active().is_some_and(|redis| redis.is_cluster());
        if !on_cluster || identities.len() < 2 {
            let all: SmallVec<[usize; 2]> = (0..identities.len()).collect();
            return self.run_script(group, identities, &all, wanted, returned).await;
        }
        let spec = self.group(group);
        let mut merged = gcra::Outcome {
            granted: wanted,
            retry_after: 0,
            cells: Default::default(),
        };
        for index in 0..identities.len() {
            if merged.granted == 0 {
                // Not asked: shown as full.
                for quota in &spec.policies[index].quotas {
                    merged.cells.push(gcra::CellState {
                        remaining: quota.limit,
                        reset: 0,
                    });
                }
                continue;
            }
            let outcome = self
                .run_script(group, identities, &[index], merged.granted, returned)
                .await?;
            merged.granted = merged.granted.min(outcome.granted);
            merged.retry_after = merged.retry_after.max(outcome.retry_after);
            merged.cells.extend(outcome.cells);
        }
        Some(merged)
    }

    /// The GCRA script over the policies at `indices` (`script_run`); `None` when Redis could not
    /// decide.
    async fn run_script(
        &self,
        group: RouteGroup,
        identities: &[Identity],
        indices: &[usize],
        wanted: u64,
        returned: u64,
    ) -> Option<gcra::Outcome> {
        let run = self.script_run(group, identities, indices, wanted, returned);
        // `run_script` bounds the connection wait and the command together by the command timeout.
        match self.redis.run_script(script(), &run.keys, &run.args).await {
            Ok(value) => outcome_of(value),
            Err(err) => {
                log::debug!("rate limit: deciding locally, Redis failed: {err}");
                None
            }
        }
    }

    /// The script's keys and arguments for the policies at `indices` (each one key: the policy's
    /// state for its identity). Each quota is a field named by its index, so two quotas with the
    /// same period (`"5, 50/1m"`) are two states, as they are in process.
    fn script_run(
        &self,
        group: RouteGroup,
        identities: &[Identity],
        indices: &[usize],
        wanted: u64,
        returned: u64,
    ) -> ScriptRun {
        let spec = self.group(group);
        let registry = self.redis.keys();
        let mut keys = Vec::with_capacity(indices.len());
        let mut args: Vec<Vec<u8>> = vec![wanted.to_string().into_bytes(), returned.to_string().into_bytes()];
        for (position, &index) in indices.iter().enumerate() {
            let policy = &spec.policies[index];
            keys.push(registry.rate_limit(policy.name, &identities[index].key_material()));
            for (field, quota) in policy.quotas.iter().enumerate() {
                let period = micros(quota.period);
                args.push((position + 1).to_string().into_bytes());
                args.push(field.to_string().into_bytes());
                args.push((period / quota.limit).to_string().into_bytes());
                args.push(period.to_string().into_bytes());
            }
        }
        ScriptRun { keys, args }
    }

    /// The same rule in process, at 1/`APP_INSTANCES` of each quota.
    fn in_process(&self, group: RouteGroup, identities: &[Identity]) -> gcra::Outcome {
        let spec = self.group(group);
        let now = self.now();
        let instances = self.settings.instances.max(1);
        // Lock every identity's state (in policy order, so two requests cannot deadlock), decide
        // for all quotas at once, write back.
        let states: SmallVec<[Arc<Mutex<Vec<u64>>>; 2]> = spec
            .policies
            .iter()
            .zip(identities)
            .enumerate()
            .map(|(index, (policy, identity))| {
                self.local[self.local_index(group, index)]
                    .get_with(*identity, || Arc::new(Mutex::new(vec![0; policy.quotas.len()])))
            })
            .collect();
        let mut guards: SmallVec<[_; 2]> = states.iter().map(|s| s.lock().unwrap()).collect();
        let mut cells: SmallVec<[Cell; 4]> = SmallVec::new();
        for (policy, guard) in spec.policies.iter().zip(&guards) {
            for (quota, tat) in policy.quotas.iter().zip(guard.iter()) {
                let limit = (quota.limit / instances).max(1);
                let period = micros(quota.period);
                cells.push(Cell {
                    tat: *tat,
                    interval: period / limit,
                    period,
                });
            }
        }
        let outcome = gcra::decide(&mut cells, now, 1);
        let mut updated = cells.iter();
        for guard in guards.iter_mut() {
            for tat in guard.iter_mut() {
                *tat = updated.next().expect("one cell per quota").tat;
            }
        }
        outcome
    }

    /// Redis first (a lease, or one script call), else the in-process rule.
    async fn decide(self: &Arc<Self>, group: RouteGroup, identities: &[Identity]) -> Decision {
        let identities = &identities[..identities.len().min(self.group(group).policies.len())];
        if self.redis.active().is_some_and(|redis| redis.accepting()) {
            let lease = self.group(group).lease;
            if lease > 1 {
                if let Some(decision) = self.decide_by_lease(group, identities, lease).await {
                    return decision;
                }
            }
            // One request per identity at a time takes a lease, so an instance never holds more
            // than one; the others wait for it, as long as a call of their own would take, rather
            // than each asking Redis (and take their own token if it brought none). A lease that
            // lapsed with tokens left gives them back in the same call: a client calling now and
            // then is charged for what it used, not a lease per request.
            let mut taking = None;
            if lease > 1 {
                let state = self.leases.get_or_insert(identities[0], self.now());
                if state
                    .refilling
                    .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    taking = Some(state);
                } else {
                    state.refilled().await;
                    if let Some(decision) = self.decide_by_lease(group, identities, lease).await {
                        return decision;
                    }
                }
            }
            let returned = taking.as_ref().map_or(0, |state| self.reclaim_lapsed(state));
            let wanted = taking
                .as_ref()
                .map_or(1, |state| self.next_size(state, self.now(), lease));
            let decided = self.in_redis(group, identities, wanted, returned).await.map(|outcome| {
                let mut decision = self.decision(group, &outcome, DecidedBy::Redis);
                if lease > 1 {
                    self.record_lease(&identities[0], outcome.granted, 1, &decision);
                    decision.remaining += outcome.granted.saturating_sub(1);
                }
                decision
            });
            if let Some(state) = taking {
                state.finish_refill();
            }
            if let Some(decision) = decided {
                return decision;
            }
        }
        let outcome = self.in_process(group, identities);
        self.decision(group, &outcome, DecidedBy::Local)
    }

    /// A decision from this instance's lease (`spend_lease`); the one request whose token left
    /// it under a quarter full sets off its top-up and is answered at once: on the next top-up
    /// tick, with the others of that tick (`top_up_together`), unless the lease would run out
    /// first; then (and on a Redis Cluster) in a task of its own. The lease never holds more than
    /// its size.
    async fn decide_by_lease(
        self: &Arc<Self>,
        group: RouteGroup,
        identities: &[Identity],
        lease: u64,
    ) -> Option<Decision> {
        let (decision, top_up) = self.spend_lease(&identities[0], lease)?;
        let Some((state, lacking, can_wait)) = top_up else {
            return Some(decision);
        };
        let identities = SmallVec::<[Identity; 2]>::from_slice(identities);
        let on_cluster = self.redis.active().is_some_and(|redis| redis.is_cluster());
        if can_wait && !on_cluster {
            let waiting = WaitingTopUp {
                group,
                identities,
                lease: state,
                lacking,
            };
            let first_of_tick = {
                let mut queue = self.waiting_top_ups.lock().unwrap();
                queue.push(waiting);
                queue.len() == 1
            };
            if first_of_tick {
                let limiter = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep_until(limiter.next_top_up_tick()).await;
                    limiter.top_up_together().await;
                });
            }
            return Some(decision);
        }
        let limiter = self.clone();
        tokio::spawn(async move {
            if let Some(outcome) = limiter.in_redis(group, &identities, lacking, 0).await {
                let topped = limiter.decision(group, &outcome, DecidedBy::Redis);
                limiter.record_lease(&identities[0], outcome.granted, 0, &topped);
            }
            state.finish_refill();
        });
        Some(decision)
    }

    /// The top-ups that waited for this tick, in one round trip (a pipeline of script runs):
    /// with thousands of busy identities, a round trip each cost Redis and this instance more than
    /// the scripts themselves. A top-up Redis could not decide is left for the next request.
    async fn top_up_together(&self) {
        let waiting = std::mem::take(&mut *self.waiting_top_ups.lock().unwrap());
        let runs: Vec<ScriptRun> = waiting
            .iter()
            .map(|top_up| {
                let all: SmallVec<[usize; 2]> = (0..top_up.identities.len()).collect();
                self.script_run(top_up.group, &top_up.identities, &all, top_up.lacking, 0)
            })
            .collect();
        let answers = match self.redis.run_scripts(script(), &runs).await {
            Ok(answers) => answers,
            Err(err) => {
                log::debug!("rate limit: top-ups not taken, Redis failed: {err}");
                Vec::new()
            }
        };
        let mut answers = answers.into_iter();
        for top_up in waiting {
            if let Some(outcome) = answers.next().and_then(outcome_of) {
                let topped = self.decision(top_up.group, &outcome, DecidedBy::Redis);
                self.record_lease(&top_up.identities[0], outcome.granted, 0, &topped);
            }
            top_up.lease.finish_refill();
        }
    }

    fn decision(&self, group: RouteGroup, outcome: &gcra::Outcome, decided_by: DecidedBy) -> Decision {
        let spec = self.group(group);
        let positions = spec
            .policies
            .iter()
            .enumerate()
            .flat_map(|(p, policy)| (0..policy.quotas.len()).map(move |q| (p, q)));
        // The tightest quota: fewest tokens left, then the longest wait until it is full.
        let (tightest, state) = positions
            .zip(&outcome.cells)
            .min_by_key(|(_, cell)| (cell.remaining, std::cmp::Reverse(cell.reset)))
            .map(|(position, cell)| (position, *cell))
            .unwrap_or(((0, 0), gcra::CellState { remaining: 0, reset: 0 }));
        Decision {
            allowed: outcome.granted > 0,
            tightest,
            remaining: state.remaining,
            reset: Duration::from_micros(state.reset),
            // Never zero for a denial: `Retry-After` rounds it up to at least a second.
            retry_after: Duration::from_micros(outcome.retry_after.max(1)),
            decided_by,
        }
    }
}

#[async_trait]
impl RateLimiter for RedisRateLimiter {
    fn enabled(&self) -> bool {
        self.settings.enabled
    }

    fn trusted_proxies(&self) -> &[IpNet] {
        &self.settings.trust_proxy
    }

    async fn check(&self, group: RouteGroup, identities: &[Identity]) -> Decision {
        let decision = self.inner.decide(group, identities).await;
        self.decisions[group as usize][usize::from(!decision.allowed)][decision.decided_by as usize].inc();
        decision
    }

    async fn give_back(&self, group: RouteGroup, decision: &Decision, identities: &[Identity], policy: usize) {
        match decision.decided_by {
            DecidedBy::Redis => {
                self.run_script(group, identities, &[policy], 0, 1).await;
            }
            DecidedBy::Local => {
                let spec = &self.group(group).policies[policy];
                let instances = self.settings.instances.max(1);
                if let Some(state) = self.local[self.local_index(group, policy)].get(&identities[policy]) {
                    let mut tats = state.lock().unwrap();
                    for (tat, quota) in tats.iter_mut().zip(&spec.quotas) {
                        let limit = (quota.limit / instances).max(1);
                        *tat = tat.saturating_sub(micros(quota.period) / limit);
                    }
                }
            }
            // Leases are for the `/api` policy, which gives nothing back.
            DecidedBy::Lease => {}
        }
    }

    async fn remember_address(&self, email: &Identity, ip: &Identity) {
        let digest = known_address(email, ip);
        self.known_addresses.insert(digest, ());
        if self.redis.active().is_some_and(|redis| redis.accepting()) {
            let key = self.redis.keys().rate_limit("known-address", &digest);
            if let Err(err) = self.redis.set(&key, b"1", KNOWN_ADDRESS_TTL).await {
                log::debug!("rate limit: known address kept in process only, Redis failed: {err}");
            }
        }
    }

    async fn is_known_address(&self, email: &Identity, ip: &Identity) -> bool {
        let digest = known_address(email, ip);
        if self.known_addresses.contains_key(&digest) {
            return true;
        }
        if !self.redis.active().is_some_and(|redis| redis.accepting()) {
            return false;
        }
        let key = self.redis.keys().rate_limit("known-address", &digest);
        matches!(self.redis.get(&key).await, Ok(Some(_)))
    }

    fn headers(&self, group: RouteGroup, decision: &Decision, headers: &mut actix_web::http::header::HeaderMap) {
        use actix_web::http::header::HeaderName;
        // Constants: `from_static` checks the name each time it runs.
        const POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
        const CURRENT: HeaderName = HeaderName::from_static("ratelimit");
        const LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
        const REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
        const RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
        let spec = self.group(group);
        let (p, q) = decision.tightest;
        let policy = &spec.policies[p];
        let reset = whole_seconds(decision.reset);
        // GCRA counts whole microseconds per token, rounded down: a quota of a few microseconds
        // per token counts more tokens than it has (10^9 an hour: 3.6 µs -> 3, 20 % more; from a
        // millisecond per token on, under 0.1 %). Never show more than the limit less the token
        // this request took (a denial shows 0 anyway).
        let remaining = decision.remaining.min(policy.quotas[q].limit.saturating_sub(1));
        headers.insert(POLICY, spec.policy_header.clone());
        let current = format!("\"{}\";r={remaining};t={reset}", policy.quota_names[q]);
        if let Ok(value) = HeaderValue::from_str(&current) {
            headers.insert(CURRENT, value);
        }
        headers.insert(LIMIT, policy.limit_headers[q].clone());
        headers.insert(REMAINING, HeaderValue::from(remaining));
        headers.insert(RESET, HeaderValue::from(reset));
    }

    fn status(&self) -> RateLimitStatus {
        let instances = self.settings.instances.max(1);
        let view = |group: RouteGroup, policy: &Policy, identity: &'static str, lease: u64| PolicyView {
            group,
            name: policy.name,
            identity,
            lease,
            quotas: policy
                .quotas
                .iter()
                .zip(&policy.quota_names)
                .map(|(q, name)| QuotaView {
                    name: name.clone(),
                    limit: q.limit,
                    window_seconds: q.period.as_secs(),
                    local_limit: (q.limit / instances).max(1),
                })
                .collect(),
        };
        RateLimitStatus {
            enabled: self.settings.enabled,
            mode: if self.redis.status().usable() { "redis" } else { "local" },
            instances,
            trusted_proxies: self.settings.trust_proxy.iter().map(ToString::to_string).collect(),
            policies: vec![
                view(RouteGroup::Api, &self.api.policies[0], "user-or-ip", self.api.lease),
                view(RouteGroup::Credentials, &self.credentials.policies[0], "ip", 1),
                view(RouteGroup::Credentials, &self.credentials.policies[1], "email", 1),
            ],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;
    use crate::infra::redis::keys::KeyRegistry;
    use crate::infra::redis::RedisModule;

    /// A limiter without Redis (memory mode: nothing is connected).
    fn local_limiter(capacity: u64) -> RedisRateLimiter {
        let settings = Settings::from_lookup(|_| None).unwrap();
        let telemetry = Telemetry::new();
        let keys = KeyRegistry::new("t:", settings.ttl.clone());
        let redis = Arc::new(RedisModule::new(settings.redis.clone(), keys, telemetry.clone()));
        RedisRateLimiter::with_capacity(redis, settings.rate_limit, &telemetry, capacity)
    }

    #[tokio::test]
    async fn a_flood_of_new_identities_keeps_the_in_process_state_bounded() {
        let limiter = local_limiter(1_000);
        for n in 0..20_000u32 {
            let ip = Identity::Ip(IpAddr::from(n.to_be_bytes()));
            let email = Identity::email(&format!("flood-{n}@example.com"));
            assert!(limiter.check(RouteGroup::Credentials, &[ip, email]).await.allowed);
        }
        for cache in &limiter.local {
            cache.run_pending_tasks();
            assert!(cache.entry_count() <= 1_000, "{} identities kept", cache.entry_count());
        }
    }

    #[test]
    fn a_flood_of_new_identities_keeps_the_leases_bounded_and_live_leases_are_kept_first() {
        let leases = Leases::new(1_000);
        let live = Identity::Ip(IpAddr::from([198, 51, 100, 1]));
        leases.get_or_insert(live, 0).expires.store(u64::MAX, Ordering::Release);
        for n in 0..999u32 {
            leases.get_or_insert(Identity::Ip(IpAddr::from(n.to_be_bytes())), 10);
        }
        // Full: the next identity drops the lapsed leases, not the live one.
        leases.get_or_insert(Identity::Ip(IpAddr::from([203, 0, 113, 1])), 10);
        assert!(leases.get(&live).is_some(), "the live lease was dropped");
        for n in 0..20_000u32 {
            leases.get_or_insert(Identity::Ip(IpAddr::from((n + 1_000_000).to_be_bytes())), 10);
            assert!(leases.map.len() <= 1_000, "{} leases kept", leases.map.len());
        }
    }

    #[tokio::test]
    async fn without_redis_the_default_login_quotas_hold_per_email() {
        let limiter = local_limiter(1_000);
        let (ip, email) = (
            Identity::Ip(IpAddr::from([192, 0, 2, 1])),
            Identity::email("a@example.com"),
        );
        let allowed = {
            let mut allowed = 0;
            for _ in 0..10 {
                allowed += u32::from(limiter.check(RouteGroup::Credentials, &[ip, email]).await.allowed);
            }
            allowed
        };
        assert_eq!(allowed, 5, "RATE_LIMIT_AUTH_EMAIL defaults to 5 per window");
        let denied = limiter.check(RouteGroup::Credentials, &[ip, email]).await;
        assert_eq!(denied.decided_by, DecidedBy::Local);
        let retry = denied.retry_after;
        assert!(
            retry > Duration::from_secs(11) && retry <= Duration::from_secs(12),
            "{retry:?}: one attempt every 60 s / 5"
        );
    }
}
