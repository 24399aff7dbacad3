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
//!
//! Here: identities, route groups and policies, decisions, the limiter's state and how it
//! decides (`decide`: a lease, else Redis, else in process). Its rooms: `lease` (leases and their
//! top-ups), `script` (the GCRA script in Redis), `gcra` (the same rule in process), `service`
//! (the `RateLimiter` implementation), `middleware` (`RateLimit`).

pub mod gcra;
mod lease;
pub mod middleware;
mod script;
mod service;

use lease::*;
use script::*;

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

type IdentityCache<V> = Cache<Identity, V, foldhash::fast::RandomState>;

/// Bounded by count only: per-entry expiry would cost every lookup its bookkeeping, and an
/// evicted identity only starts again from a full quota (or takes a new lease).
fn identity_cache<V: Clone + Send + Sync + 'static>(capacity: u64) -> IdentityCache<V> {
    Cache::builder()
        .max_capacity(capacity)
        .build_with_hasher(foldhash::fast::RandomState::default())
}

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
