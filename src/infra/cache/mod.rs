//! `CacheService`: cache-aside over two tiers, L1 in process (moka) and L2 in Redis, holding the
//! JSON bytes responses need. Modes: `redis` (L1 + L2), `memory` (L1 only, no Redis connection at
//! all) and `degraded` (Redis failing: the breaker is open, requests never wait on Redis).
//!
//! Correctness rules:
//! - single-flight per key inside an instance (moka `try_get_with`): N concurrent misses load once;
//! - a fill that started before an invalidation is dropped: L1 through per-key epochs, L2
//!   through a version key checked atomically by the fill script;
//! - every invalidation is published; other instances drop the key from L1, and a subscriber that
//!   lost its connection flushes L1 (pub/sub is at-most-once);
//! - invalidations that could not reach Redis are queued and replayed when it answers again.

pub mod compressed;
mod subscriber;

tokio::task_local! {
    /// Set for requests that asked not to be served from the cache (`Cache-Control: no-cache`).
    static BYPASS: bool;
    /// L2 reads made ahead, together (see `with_prefetched`): taken by the lookups they serve.
    static PREFETCHED: std::cell::RefCell<Vec<Prefetched>>;
}

/// Runs a request as one that asked not to be served from the cache (see `infra::edge`).
pub async fn bypassing_cache<F: std::future::Future>(request: F) -> F::Output {
    BYPASS.scope(true, request).await
}

/// Whether the current request runs under `bypassing_cache`.
fn bypassing() -> bool {
    BYPASS.try_with(|bypass| *bypass).unwrap_or(false)
}

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use actix_web::http::header::HeaderValue;
use async_trait::async_trait;
use bb8_redis::redis::{self, Script};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use moka::future::Cache;
use rand::Rng;
use serde::Serialize;
use shaku::{Component, Interface};
use utoipa::ToSchema;

use crate::config::CacheSettings;
use crate::error::{AppError, AppResult};
use crate::infra::redis::breaker::BreakerState;
use crate::infra::redis::keys::{CacheKey, KeyRegistry, Namespace};
use crate::infra::redis::{Redis, RedisFailure, RedisService, RedisStatus, ScanCursor};
use crate::infra::telemetry::Telemetry;
use compressed::Compressed;

/// Where a response came from: the `X-Cache` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheTier {
    HitL1,
    HitL2,
    Miss,
    Bypass,
}

impl CacheTier {
    pub fn header_value(self) -> &'static str {
        match self {
            Self::HitL1 => "HIT-L1",
            Self::HitL2 => "HIT-L2",
            Self::Miss => "MISS",
            Self::Bypass => "BYPASS",
        }
    }
}

/// Serialized JSON plus what the response headers need.
#[derive(Debug, Clone)]
pub struct Cached {
    pub bytes: Bytes,
    pub tier: CacheTier,
    /// Remaining lifetime (`Cache-Status: ...; ttl=<secs>`).
    pub ttl: Duration,
    /// A strong validator of `bytes`, the same on every instance (`ETag`).
    pub etag: HeaderValue,
    /// Its gzip and brotli forms, kept with the entry once made.
    pub compressed: Arc<Compressed>,
}

/// `"<16 hex digits>"`: the first 64 bits of the body's SHA-256. Computed once per fill, so a hit
/// (or a 304) costs nothing more.
pub fn etag_of(bytes: &[u8]) -> HeaderValue {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(bytes);
    let mut quoted = [b'"'; 18];
    hex::encode_to_slice(&digest[..8], &mut quoted[1..17]).expect("8 bytes fill 16 hex digits");
    HeaderValue::from_bytes(&quoted).expect("hex is a valid header value")
}

/// How this instance caches (README, "Cache modes").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum CacheMode {
    /// L1 and Redis (L2); invalidations through Redis.
    Redis,
    /// L1 only, and no connection at all: `REDIS_ENABLED=false` with no `REDIS_URL`.
    Memory,
    /// L1 only, yet in step with the fleet through Redis: it publishes and hears invalidations
    /// and deletes the L2 entries its writes replace (`REDIS_ENABLED=false` with `REDIS_URL`).
    /// Instances in this mode and in `redis` mode can serve side by side.
    MemorySynced,
    /// Redis caching on but Redis unusable: serving from L1 and Postgres until it answers.
    Degraded,
}

impl CacheMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Redis => "redis",
            Self::Memory => "memory",
            Self::MemorySynced => "memory-synced",
            Self::Degraded => "degraded",
        }
    }
}

/// Counters of one namespace since start.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceStats {
    pub namespace: Namespace,
    pub hits_l1: u64,
    pub hits_l2: u64,
    /// Loader runs (misses in both tiers).
    pub misses: u64,
    pub hit_rate: f64,
    pub l1_entries: u64,
    /// Bytes of keys and values this namespace holds in L1.
    pub l1_bytes: u64,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CacheStatus {
    pub mode: CacheMode,
    pub breaker: Option<BreakerState>,
    pub subscriber_connected: bool,
    pub l1_entries: u64,
    /// Lookups that found nothing, remembered briefly (see `get_or_load_found`).
    pub negative_entries: u64,
    pub pending_invalidations: usize,
}

#[async_trait]
pub trait CacheService: Interface {
    /// The cached bytes for `key`, or the loader's (stored in both tiers). An entry from Redis
    /// that `decodes` refuses (written by another deploy in another shape) is dropped and loaded
    /// again: pass `json::<T>` with the type the loader serializes.
    async fn get_or_load<'a>(
        &'a self,
        key: CacheKey,
        loader: BoxFuture<'a, AppResult<Bytes>>,
        decodes: Decodes,
    ) -> AppResult<Cached>;
    /// `get_or_load` for a lookup that may find nothing (a membership, a token). What is found is
    /// cached as usual; "nothing" is remembered only in process, for `CACHE_NEGATIVE_TTL_MS`, in
    /// at most `CACHE_NEGATIVE_MAX_ENTRIES` entries, and never in Redis: random ids cannot grow
    /// the cache, and each costs Postgres one lookup while it is remembered.
    async fn get_or_load_found<'a>(
        &'a self,
        key: CacheKey,
        loader: BoxFuture<'a, AppResult<Option<Bytes>>>,
        decodes: Decodes,
    ) -> AppResult<Option<Cached>>;
    /// Whether lookups read Redis one by one, so that reading their keys ahead together saves
    /// round trips: L1 off, Redis active and not a cluster, the request not bypassing the cache.
    fn reads_ahead(&self) -> bool;
    /// Reads `keys` from L2 in one round trip. See `with_prefetched`.
    async fn prefetch(&self, keys: &[CacheKey]) -> Vec<Prefetched>;
    /// Whether nothing this request reads can come from a cache (`Cache-Control: no-cache`, or L1
    /// off without Redis): a service may then ask Postgres once for what it would otherwise look
    /// up piece by piece.
    fn is_pass_through(&self) -> bool;
    /// Drops the keys (whole groups for keys without a field) everywhere, on every instance.
    async fn invalidate(&self, keys: Vec<CacheKey>);
    /// `key` as L1 sees it now, taken before looking it up: a service may keep what it derives
    /// from lookups in process while `is_current` holds for their stamps (see `Stamp`). `None`
    /// when nothing may be kept: L1 off, or the request bypasses the cache.
    fn stamp(&self, key: &CacheKey) -> Option<Stamp>;
    /// Whether a value derived under `stamp` may still be served: none of its keys invalidated
    /// here or across the fleet, no flush, within their TTL, and heard from the fleet as an L1
    /// entry must be. Always `false` for a request that bypasses the cache.
    fn is_current(&self, stamp: &Stamp) -> bool;
    fn keys(&self) -> &KeyRegistry;
    fn ttl_jitter_percent(&self) -> u8;
    fn status(&self) -> CacheStatus;
    /// The runtime switch of this instance: `false` stops caching in Redis at once (memory, or
    /// memory-synced with `REDIS_URL` set), `true` starts again.
    fn set_redis_enabled(&self, enabled: bool);
    /// The fleet-wide switch: this instance, and every instance that hears the fleet (redis and
    /// memory-synced modes), through pub/sub. Returns how many instances it reached (this one
    /// included); fails, changing nothing, when the message cannot be published.
    async fn set_fleet_redis_enabled(&self, enabled: bool) -> Result<u64, RedisFailure>;
    /// Deletes every key matching `pattern` (a full Redis pattern under the key prefix) with
    /// SCAN + UNLINK, drops matching L1 entries here and tells the other instances to flush L1.
    /// Returns how many keys were deleted (from Redis; from L1 in memory mode).
    async fn flush(&self, pattern: &str) -> Result<u64, RedisFailure>;
    /// Hits, misses and L1 entries and bytes per namespace.
    async fn stats(&self) -> Vec<NamespaceStats>;
    /// Starts the invalidation subscriber: once, on a runtime that lives as long as the app.
    fn start(&self);
}

/// Whether cached bytes are in the shape this build reads (see `get_or_load`).
pub type Decodes = fn(&[u8]) -> bool;

/// `Decodes` for entries stored as the JSON of `T`.
pub fn json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> bool {
    serde_json::from_slice::<T>(bytes).is_ok()
}

impl dyn CacheService {
    /// Runs `work` with the keys it will look up read from L2 ahead, together, where that saves
    /// round trips (`reads_ahead`): lookups that would each wait for Redis in turn (a project,
    /// then the membership, then the task list) make one between them. A read that an
    /// invalidation overtook before its lookup is not used; a key read ahead that `work` does
    /// not look up costs nothing more.
    pub async fn with_prefetched<T>(
        &self,
        keys: impl FnOnce() -> Vec<CacheKey>,
        work: impl std::future::Future<Output = T>,
    ) -> T {
        if !self.reads_ahead() {
            return work.await;
        }
        let reads = self.prefetch(&keys()).await;
        if reads.is_empty() {
            return work.await;
        }
        PREFETCHED.scope(std::cell::RefCell::new(reads), work).await
    }

    /// Runs a write and then invalidates, whatever its outcome, `stale` (known before the write)
    /// and what the write itself reports (`stale_after`, on success). An error proves nothing:
    /// the deadline may pass while the COMMIT is on the wire, and a retry may find the work done.
    /// Every write goes through here.
    pub async fn write<T, E>(
        &self,
        mut stale: Vec<CacheKey>,
        write: impl std::future::Future<Output = Result<T, E>>,
        stale_after: impl FnOnce(&T) -> Vec<CacheKey>,
    ) -> Result<T, E> {
        let outcome = write.await;
        if let Ok(done) = &outcome {
            stale.extend(stale_after(done));
        }
        stale.sort_unstable_by(|a, b| a.l1_key().cmp(b.l1_key()));
        stale.dedup();
        // Inside an open transaction the write is not committed yet: invalidating now would not
        // stop a read before the commit from caching the old row, so the owner invalidates once
        // it has committed (or rolled back), and nothing waits on Redis while the transaction
        // holds its row locks.
        let deferred = AFTER_COMMIT.try_with(|after| after.borrow_mut().extend(stale.iter().cloned()));
        if deferred.is_err() {
            self.invalidate(stale).await;
        }
        outcome
    }
}

tokio::task_local! {
    /// The keys writes made stale inside an open transaction (`invalidating_after_commit`).
    static AFTER_COMMIT: std::cell::RefCell<Vec<CacheKey>>;
}

/// Runs `work` (writes that join an open transaction, see `infra::database::transaction`) and
/// returns, with its output, the keys its writes made stale: the transaction's owner invalidates
/// them once it has committed or rolled back.
pub async fn invalidating_after_commit<F: std::future::Future>(work: F) -> (F::Output, Vec<CacheKey>) {
    AFTER_COMMIT
        .scope(std::cell::RefCell::new(Vec::new()), async {
            let output = work.await;
            (output, AFTER_COMMIT.with(|after| after.take()))
        })
        .await
}

#[derive(Clone)]
struct L1Entry {
    bytes: Bytes,
    expires_at: Instant,
    origin: CacheTier,
    /// The key's epoch when the fill started: a hit is served only while it is still current.
    epoch: (u64, u64),
    filled_at: Instant,
    etag: HeaderValue,
    compressed: Arc<Compressed>,
}

impl L1Entry {
    fn new(bytes: Bytes, origin: CacheTier, ttl: Duration, epoch: (u64, u64)) -> Self {
        let etag = etag_of(&bytes);
        Self::with_etag(bytes, etag, origin, ttl, epoch)
    }

    fn with_etag(bytes: Bytes, etag: HeaderValue, origin: CacheTier, ttl: Duration, epoch: (u64, u64)) -> Self {
        let now = Instant::now();
        L1Entry {
            etag,
            compressed: Arc::default(),
            bytes,
            expires_at: now + ttl,
            origin,
            epoch,
            filled_at: now,
        }
    }

    fn served_as(self, tier: CacheTier, now: Instant) -> Cached {
        Cached {
            ttl: self.expires_at.saturating_duration_since(now),
            bytes: self.bytes,
            tier,
            etag: self.etag,
            compressed: self.compressed,
        }
    }
}

/// What a value derived from cached entries depends on: the epochs of their keys, and when it
/// was made. Derived values follow the rules of the L1 entries they come from, without looking
/// those entries up (nor formatting their keys) again.
#[derive(Clone, Debug)]
pub struct Stamp {
    generation: u64,
    epochs: smallvec::SmallVec<[(u32, u64); 2]>,
    filled_at: Instant,
    expires_at: Instant,
}

impl Stamp {
    /// Current only while both are (a flush between the two makes it never current).
    pub fn and(mut self, other: Stamp) -> Stamp {
        self.generation = self.generation.min(other.generation);
        self.epochs.extend(other.epochs);
        self.filled_at = self.filled_at.min(other.filled_at);
        self.expires_at = self.expires_at.min(other.expires_at);
        self
    }
}

/// Values a service derives from cached entries (a token's session, a member's access to a
/// project), kept in process under the stamps of those entries and served while
/// `CacheService::is_current` holds: they end when the entries do, here and across the fleet.
/// One lookup by a typed key instead of the lookups, key formatting and decoding behind it.
pub struct Derived<K, V>(moka::sync::Cache<K, (V, Stamp), FastHash>);

impl<K, V> Default for Derived<K, V>
where
    K: std::hash::Hash + Eq + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn default() -> Self {
        Self(
            moka::sync::Cache::builder()
                .max_capacity(DERIVED_ENTRIES)
                .build_with_hasher(FastHash::default()),
        )
    }
}

impl<K, V> Derived<K, V>
where
    K: std::hash::Hash + Eq + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// The value kept for `key`, if its entries are still current.
    pub fn get(&self, cache: &dyn CacheService, key: &K) -> Option<V> {
        let (value, stamp) = self.0.get(key)?;
        cache.is_current(&stamp).then_some(value)
    }

    /// Keeps `value` under `stamp`; nothing without one (L1 off, or a bypassing request).
    pub fn keep(&self, key: K, value: V, stamp: Option<Stamp>) {
        if let Some(stamp) = stamp {
            self.0.insert(key, (value, stamp));
        }
    }
}

/// Per kind of derived value: about 100–150 bytes each.
const DERIVED_ENTRIES: u64 = 10_000;

/// A lookup that found nothing; like an L1 entry, it counts only while its epoch is current.
#[derive(Clone)]
struct NegativeEntry {
    epoch: (u64, u64),
    filled_at: Instant,
}

/// The error a "found nothing" load travels as through the single-flight (never returned).
const ABSENT: AppError = AppError::NotFound { entity: "cache-absent" };

fn is_absent(err: &AppError) -> bool {
    matches!(err, AppError::NotFound { entity: "cache-absent" })
}

struct PerEntryExpiry {
    max_ttl: Duration,
}

impl moka::Expiry<String, L1Entry> for PerEntryExpiry {
    fn expire_after_create(&self, _key: &String, value: &L1Entry, now: Instant) -> Option<Duration> {
        Some(value.expires_at.saturating_duration_since(now).min(self.max_ttl))
    }
}

/// The cache's state; `TieredCache` is its DI face.
pub struct Inner {
    keys: KeyRegistry,
    /// foldhash, not SipHash: keys are ours (prefix + UUIDs), not attacker-chosen, and every
    /// request hashes several of them.
    l1: Cache<String, L1Entry, FastHash>,
    /// Invalidation epochs: a fill that saw another epoch of its key at its start is not kept in
    /// L1. One counter per shard of Redis keys (collisions only drop a fill, never keep a stale
    /// one), plus a generation that every full flush bumps.
    epochs: Box<[AtomicU64]>,
    epoch_hasher: FastHash,
    generation: AtomicU64,
    /// Lookups that found nothing, by L1 key (see `get_or_load_found`).
    negative: Cache<String, NegativeEntry, FastHash>,
    /// (namespace, ETag) of L2 entries whose shape was checked already: the check decodes the
    /// whole entry (a page of tasks: tens of µs), and Redis serves the same bytes again and again.
    shape_checked: moka::sync::Cache<(u8, HeaderValue), (), FastHash>,
    /// L2 entries written before this moment (Redis clock, ms) are ignored: set when this
    /// instance reconnects after losing Redis, since invalidations may have been lost meanwhile.
    pub(crate) l2_trusted_since_ms: AtomicU64,
    /// The Redis module (injected): L2, pub/sub, and the runtime switch.
    redis: Arc<dyn RedisService>,
    subscriber_connected: AtomicBool,
    /// When (ms after `clock_base`) this instance last knew it had heard every invalidation
    /// published until then: the send time of the last PING its subscriber got an answer to.
    synced_at_ms: AtomicU64,
    clock_base: Instant,
    unsynced_ttl: Duration,
    /// `CACHE_L1_MAX_TTL`: derived values are kept no longer than L1 entries.
    l1_max_ttl: Duration,
    max_variants: u32,
    pending: Mutex<Pending>,
    /// One replay at a time (the subscriber's; a second caller finds it taken and goes on).
    replaying: tokio::sync::Mutex<()>,
    max_pending: usize,
    jitter_percent: u8,
    l1_enabled: bool,
    /// Identifies this instance in invalidation messages, so it skips its own.
    instance: String,
    pub(crate) telemetry: Arc<Telemetry>,
    /// `cache_requests_total` children, resolved once: a label lookup per cache access costs more
    /// than the L1 hit itself.
    counters: Vec<[prometheus::IntCounter; 4]>,
}

/// Index into a namespace's counters: hit_l1, hit_l2, miss, bypass.
fn tier_index(tier: CacheTier) -> usize {
    match tier {
        CacheTier::HitL1 => 0,
        CacheTier::HitL2 => 1,
        CacheTier::Miss => 2,
        CacheTier::Bypass => 3,
    }
}

pub struct TieredCache {
    inner: Arc<Inner>,
}

impl TieredCache {
    /// A cache outside the container (the container builds it from `TieredCacheParameters`).
    pub fn new(inner: Arc<Inner>) -> Self {
        Self { inner }
    }
}

pub struct TieredCacheParameters {
    pub settings: CacheSettings,
    pub telemetry: Arc<Telemetry>,
}

crate::container::set_by_the_container!(TieredCacheParameters);

/// Built by hand rather than derived: the cache's state needs the injected Redis module.
impl<M: shaku::Module + shaku::HasComponent<dyn RedisService>> Component<M> for TieredCache {
    type Interface = dyn CacheService;
    type Parameters = TieredCacheParameters;

    fn build(context: &mut shaku::ModuleBuildContext<M>, params: TieredCacheParameters) -> Box<dyn CacheService> {
        let redis = M::build_component(context);
        Box::new(TieredCache::new(Inner::new(redis, &params.settings, params.telemetry)))
    }
}

impl Inner {
    pub fn new(redis: Arc<dyn RedisService>, cache: &CacheSettings, telemetry: Arc<Telemetry>) -> Arc<Self> {
        let l1 = Cache::builder()
            .max_capacity(cache.l1_max_bytes)
            .weigher(|key: &String, entry: &L1Entry| {
                u32::try_from(key.len() + entry.bytes.len() + L1_ENTRY_OVERHEAD).unwrap_or(u32::MAX)
            })
            .expire_after(PerEntryExpiry {
                max_ttl: cache.l1_max_ttl,
            })
            .support_invalidation_closures()
            .build_with_hasher(FastHash::default());
        let negative = Cache::builder()
            .max_capacity(cache.negative_max_entries)
            .time_to_live(cache.negative_ttl)
            .build_with_hasher(FastHash::default());
        Arc::new(Inner {
            keys: redis.keys().clone(),
            l1,
            negative,
            shape_checked: moka::sync::Cache::builder()
                .max_capacity(SHAPE_CHECKED_ENTRIES)
                .build_with_hasher(FastHash::default()),
            epochs: (0..EPOCH_SHARDS).map(|_| AtomicU64::new(0)).collect(),
            epoch_hasher: FastHash::default(),
            generation: AtomicU64::new(0),
            l2_trusted_since_ms: AtomicU64::new(0),
            redis,
            subscriber_connected: AtomicBool::new(false),
            synced_at_ms: AtomicU64::new(0),
            clock_base: Instant::now(),
            unsynced_ttl: cache.l1_unsynced_ttl,
            l1_max_ttl: cache.l1_max_ttl,
            max_variants: cache.max_variants,
            pending: Mutex::new(Pending::default()),
            replaying: tokio::sync::Mutex::new(()),
            max_pending: cache.max_pending_invalidations,
            jitter_percent: cache.ttl_jitter_percent.min(100),
            l1_enabled: cache.l1_enabled,
            instance: uuid::Uuid::new_v4().simple().to_string(),
            counters: Namespace::ALL
                .into_iter()
                .map(|ns| {
                    ["hit_l1", "hit_l2", "miss", "bypass"]
                        .map(|result| telemetry.cache_requests.with_label_values(&[ns.as_str(), result]))
                })
                .collect(),
            telemetry,
        })
    }

    /// Redis if it is switched on (created on first use: no connection in memory mode).
    fn active_redis(&self) -> Option<&Redis> {
        self.redis.active()
    }

    /// Redis for keeping the fleet in sync: in redis and memory-synced modes.
    fn sync_redis(&self) -> Option<&Redis> {
        self.redis.synced()
    }

    fn count(&self, namespace: Namespace, tier: CacheTier) {
        self.counters[namespace as usize][tier_index(tier)].inc();
    }

    fn counted(&self, namespace: Namespace, tier: CacheTier) -> u64 {
        self.counters[namespace as usize][tier_index(tier)].get()
    }

    /// The TTL table's lifetime, shortened by up to `jitter_percent`: the table is an upper bound.
    fn ttl_with_jitter(&self, key: &CacheKey) -> Duration {
        let ttl = self.keys.ttl(key.namespace);
        let jitter_ms = ttl.as_millis() as u64 * self.jitter_percent as u64 / 100;
        ttl - Duration::from_millis(rand::thread_rng().gen_range(0..=jitter_ms))
    }

    /// Loads through L2 and the loader; returns the entry to keep in L1.
    async fn fill(
        &self,
        key: &CacheKey,
        loader: BoxFuture<'_, AppResult<Bytes>>,
        decodes: Decodes,
    ) -> AppResult<L1Entry> {
        let epoch = self.epoch_of(key);
        let mut redis = self.active_redis();
        let mut version = None;
        if let Some(active) = redis {
            // While our own invalidations wait for Redis (the subscriber replays them), L2 may
            // still hold what they drop: it is neither read nor written.
            if !self.pending.lock().unwrap().is_empty() {
                redis = None;
            } else {
                let trusted_since = self.l2_trusted_since_ms.load(Ordering::Acquire);
                let read = match self.take_prefetched(key, epoch) {
                    Some(read) => Ok(read),
                    None => read_l2(active, &self.keys, key, trusted_since).await,
                };
                match read.map(|read| (self.in_shape(key, read.value.as_ref(), decodes), read)) {
                    Ok((
                        Some(etag),
                        L2Read {
                            value: Some(bytes),
                            pttl_ms,
                            ..
                        },
                    )) => {
                        self.count(key.namespace, CacheTier::HitL2);
                        let remaining = Duration::from_millis(pttl_ms.max(1000) as u64);
                        return Ok(L1Entry::with_etag(bytes, etag, CacheTier::HitL2, remaining, epoch));
                    }
                    Ok((_, read)) => {
                        if read.value.is_some() {
                            // Loaded again below, and the load overwrites it.
                            log::warn!("cache: {} does not decode (another deploy's shape?)", key.l1_key());
                        }
                        version = Some(read.version);
                    }
                    Err(err) => log::debug!("cache: L2 read of {} failed: {err}", key.redis_key()),
                }
            }
        }
        self.count(key.namespace, CacheTier::Miss);
        let started = Instant::now();
        let bytes = loader.await?;
        self.telemetry.observe_loader(key.namespace.as_str(), started.elapsed());
        let ttl = self.ttl_with_jitter(key);
        if let (Some(redis), Some(version)) = (redis, version) {
            let entry = (&bytes, ttl);
            let max_fields = if key.namespace.has_variants() {
                self.max_variants
            } else {
                u32::MAX
            };
            if let Err(err) = write_l2(redis, &self.keys, key, entry, version, max_fields).await {
                log::debug!("cache: L2 write of {} failed: {err}", key.redis_key());
            }
        }
        Ok(L1Entry::new(bytes, CacheTier::Miss, ttl, epoch))
    }

    /// The ETag of an L2 entry that decodes as its reader expects; `None` if there is no entry or
    /// it does not decode. Each distinct entry is decoded once, not on every hit.
    fn in_shape(&self, key: &CacheKey, value: Option<&Bytes>, decodes: Decodes) -> Option<HeaderValue> {
        let bytes = value?;
        let etag = etag_of(bytes);
        let checked = (key.namespace as u8, etag.clone());
        if self.shape_checked.contains_key(&checked) {
            return Some(etag);
        }
        decodes(bytes).then(|| {
            self.shape_checked.insert(checked, ());
            etag
        })
    }

    /// The read of `key` made ahead for this request, if the key's epoch is still the one it was
    /// read at.
    fn take_prefetched(&self, key: &CacheKey, epoch: (u64, u64)) -> Option<L2Read> {
        PREFETCHED
            .try_with(|reads| {
                let mut reads = reads.borrow_mut();
                let at = reads.iter().position(|read| read.l1_key == key.l1_key())?;
                let read = reads.swap_remove(at);
                (read.epoch == epoch).then_some(read.read)
            })
            .ok()
            .flatten()
    }

    fn reads_ahead(&self) -> bool {
        // With L1 on, lookups rarely reach Redis; on a cluster the keys live on different nodes.
        !self.l1_enabled && !bypassing() && self.active_redis().is_some_and(|redis| !redis.is_cluster())
    }

    async fn prefetch(&self, keys: &[CacheKey]) -> Vec<Prefetched> {
        let Some(redis) = self.active_redis() else {
            return Vec::new();
        };
        // Invalidations waiting to be replayed: lookups read Redis themselves (see `fill`).
        if keys.is_empty() || !self.pending.lock().unwrap().is_empty() {
            return Vec::new();
        }
        let epochs: Vec<(u64, u64)> = keys.iter().map(|key| self.epoch_of(key)).collect();
        let trusted_since = self.l2_trusted_since_ms.load(Ordering::Acquire);
        match read_l2_many(redis, &self.keys, keys, trusted_since).await {
            Ok(reads) => keys
                .iter()
                .zip(epochs)
                .zip(reads)
                .map(|((key, epoch), read)| Prefetched {
                    l1_key: key.l1_key().to_owned(),
                    epoch,
                    read,
                })
                .collect(),
            Err(err) => {
                log::debug!("cache: L2 prefetch failed: {err}");
                Vec::new()
            }
        }
    }

    /// `get_or_load`, borrowing the key.
    async fn lookup<'a>(
        &'a self,
        key: &'a CacheKey,
        loader: BoxFuture<'a, AppResult<Bytes>>,
        decodes: Decodes,
    ) -> AppResult<Cached> {
        if bypassing() {
            self.count(key.namespace, CacheTier::Bypass);
            let bytes = loader.await?;
            return Ok(Cached {
                etag: etag_of(&bytes),
                compressed: Arc::default(),
                bytes,
                tier: CacheTier::Bypass,
                ttl: Duration::ZERO,
            });
        }
        if !self.l1_enabled {
            let entry = Box::pin(self.fill(key, loader, decodes)).await?;
            let origin = entry.origin;
            return Ok(entry.served_as(origin, Instant::now()));
        }
        if let Some(hit) = self.l1_hit(key).await {
            return Ok(hit);
        }
        // Boxed: the miss path's state (single-flight, L2, loader) would otherwise be part of, and
        // copied with, every hit's future.
        self.load_into_l1(key, loader, decodes).await
    }

    /// The key's L1 entry, if it may be served (L1 on, not bypassing).
    async fn l1_hit(&self, key: &CacheKey) -> Option<Cached> {
        let entry = self.l1.get(key.l1_key()).await?;
        let now = Instant::now();
        if entry.expires_at > now && entry.epoch == self.epoch_of(key) && self.in_sync(entry.filled_at, now) {
            self.count(key.namespace, CacheTier::HitL1);
            return Some(entry.served_as(CacheTier::HitL1, now));
        }
        // Out of date but still there (its epoch shard was bumped by another key, it expired, or
        // it is too old to trust while invalidations go unheard): `try_get_with` would hand this
        // same entry back instead of loading, every time. Drop it so that a load replaces it.
        self.l1.invalidate(key.l1_key()).await;
        None
    }

    /// An L1 miss: single-flight through `fill`, kept in L1 unless invalidated meanwhile.
    fn load_into_l1<'a>(
        &'a self,
        key: &'a CacheKey,
        loader: BoxFuture<'a, AppResult<Bytes>>,
        decodes: Decodes,
    ) -> BoxFuture<'a, AppResult<Cached>> {
        Box::pin(async move {
            let epoch = self.epoch_of(key);
            let entry = self
                .l1
                .try_get_with(key.l1_key().to_owned(), self.fill(key, loader, decodes))
                .await
                .map_err(|shared: Arc<AppError>| shared_error(&shared))?;
            if self.epoch_of(key) != epoch {
                // An invalidation ran while we loaded: serve this answer, but do not keep it.
                self.l1.invalidate(key.l1_key()).await;
            }
            let origin = entry.origin;
            Ok(entry.served_as(origin, Instant::now()))
        })
    }

    fn epoch_shard(&self, redis_key: &str) -> &AtomicU64 {
        &self.epochs[self.epoch_shard_index(redis_key)]
    }

    fn epoch_shard_index(&self, redis_key: &str) -> usize {
        use std::hash::BuildHasher;
        self.epoch_hasher.hash_one(redis_key) as usize % self.epochs.len()
    }

    fn stamp(&self, key: &CacheKey) -> Option<Stamp> {
        if !self.l1_enabled || bypassing() {
            return None;
        }
        let shard = self.epoch_shard_index(key.redis_key());
        let now = Instant::now();
        Some(Stamp {
            generation: self.generation.load(Ordering::Acquire),
            epochs: smallvec::smallvec![(shard as u32, self.epochs[shard].load(Ordering::Acquire))],
            filled_at: now,
            // Like an L1 entry: a lost invalidation (or a change made behind the app's back)
            // is served at most this long, not for the namespace's TTL.
            expires_at: now + self.keys.ttl(key.namespace).min(self.l1_max_ttl),
        })
    }

    fn is_current(&self, stamp: &Stamp) -> bool {
        let now = Instant::now();
        !bypassing()
            && stamp.expires_at > now
            && stamp.generation == self.generation.load(Ordering::Acquire)
            && stamp
                .epochs
                .iter()
                .all(|&(shard, epoch)| self.epochs[shard as usize].load(Ordering::Acquire) == epoch)
            && self.in_sync(stamp.filled_at, now)
    }

    /// (generation, key epoch): changes whenever the key, or everything, is invalidated.
    fn epoch_of(&self, key: &CacheKey) -> (u64, u64) {
        (
            self.generation.load(Ordering::Acquire),
            self.epoch_shard(key.redis_key()).load(Ordering::Acquire),
        )
    }

    /// Bumps the key's epoch (a group's, for a grouped key: all its variants share it), so that
    /// L1 no longer serves it and fills that started before are not kept, and drops a single
    /// entry from L1. A group's entries are not looked for: that would scan all of L1 on every
    /// write (moka's `invalidate_entries_if`). They are replaced when read again, or leave with
    /// their TTL or the size bound.
    async fn drop_from_l1(&self, key: &CacheKey) {
        self.epoch_shard(key.redis_key()).fetch_add(1, Ordering::AcqRel);
        if key.field().is_some() || !key.namespace.is_grouped() {
            self.l1.invalidate(key.l1_key()).await;
        }
    }

    /// The runtime switch (see `CacheService::set_redis_enabled`).
    pub(crate) fn set_redis_enabled(&self, enabled: bool) {
        let was = self.redis.is_enabled();
        self.redis.set_enabled(enabled);
        if was == enabled {
            return;
        }
        if !self.redis.settings().fleet_sync {
            // In and out of strict memory mode. Our writes there do not reach Redis: until the
            // subscriber is back (and sets a new trust point), nothing in L2 may be believed.
            // And L1 missed, or will miss, whatever the fleet published.
            if !enabled {
                self.l2_trusted_since_ms.store(u64::MAX, Ordering::Release);
            }
            self.flush_l1();
        }
        // Memory-synced and back: the subscriber heard the fleet throughout and our writes
        // invalidated L2, so both tiers stay as they are (no burst of misses mid-rollout).
        log::info!("cache: mode {}", self.mode(&self.redis.status()).as_str());
    }

    fn mode(&self, redis: &RedisStatus) -> CacheMode {
        if !redis.enabled {
            if self.redis.is_syncing() {
                CacheMode::MemorySynced
            } else {
                CacheMode::Memory
            }
        } else if redis.usable() {
            CacheMode::Redis
        } else {
            // Switched on but unusable (misconfigured, or the breaker is open): serving without it.
            CacheMode::Degraded
        }
    }

    /// Records that every invalidation published before `sent_at` has been applied.
    pub(crate) fn mark_synced(&self, sent_at: Instant) {
        let ms = sent_at.saturating_duration_since(self.clock_base).as_millis() as u64;
        self.synced_at_ms.fetch_max(ms, Ordering::AcqRel);
    }

    /// How often the subscriber confirms it is up to date: often enough that a healthy instance
    /// never comes near `unsynced_ttl`.
    pub(crate) fn sync_every(&self) -> Duration {
        (self.unsynced_ttl / 4).clamp(Duration::from_millis(10), Duration::from_millis(500))
    }

    /// Whether an L1 entry may be served. In strict memory mode always (nothing to hear). Hearing
    /// the fleet (redis and memory-synced modes), only if this instance heard every invalidation
    /// until less than `unsynced_ttl` ago, or the entry is younger than that: another instance's
    /// write goes unseen here for at most that long, even while the subscriber is down.
    fn in_sync(&self, filled_at: Instant, now: Instant) -> bool {
        if !self.redis.is_syncing() {
            return true;
        }
        let synced_at = self.clock_base + Duration::from_millis(self.synced_at_ms.load(Ordering::Acquire));
        now.saturating_duration_since(synced_at.max(filled_at)) <= self.unsynced_ttl
    }

    /// Flushes L1: after a lost subscription we cannot know what we missed.
    pub(crate) fn flush_l1(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.l1.invalidate_all();
    }

    /// Deletes keys in Redis (bumping their fill versions) and publishes them; what fails is
    /// queued. Returns whether Redis took them.
    async fn invalidate_l2(&self, redis_keys: Vec<String>) -> bool {
        // Nothing to send (a write that made nothing stale): an empty pipeline is an error on a
        // cluster.
        if redis_keys.is_empty() {
            return true;
        }
        let Some(redis) = self.sync_redis() else {
            return false;
        };
        match self.send_invalidations(redis, &redis_keys).await {
            Ok(()) => true,
            Err(err) => {
                log::warn!(
                    "cache: {} invalidation(s) queued until Redis answers: {err}",
                    redis_keys.len()
                );
                self.telemetry.invalidations_queued.inc_by(redis_keys.len() as u64);
                self.pending
                    .lock()
                    .unwrap()
                    .add(redis_keys, self.max_pending, &self.keys);
                false
            }
        }
    }

    /// `<instance>|<body>`: what the subscribers hear (they skip their own instance's).
    fn fleet_message(&self, body: &str) -> String {
        format!("{}|{body}", self.instance)
    }

    /// Publishes `body` (a key, or one of the subscriber's commands) on the invalidation channel;
    /// returns how many subscribers received it.
    async fn tell_fleet(&self, redis: &Redis, body: &str) -> Result<u64, RedisFailure> {
        let channel = self.keys.invalidation_channel();
        let message = self.fleet_message(body);
        redis
            .call(|mut c| async move {
                redis::cmd("PUBLISH")
                    .arg(channel)
                    .arg(message)
                    .query_async::<u64>(&mut c)
                    .await
            })
            .await
    }

    async fn send_invalidations(&self, redis: &Redis, redis_keys: &[String]) -> Result<(), RedisFailure> {
        let channel = self.keys.invalidation_channel();
        let bump_and_delete = |pipe: &mut redis::Pipeline, redis_key: &str| {
            let version_key = self.keys.version_of(redis_key);
            pipe.cmd("INCR").arg(&version_key).ignore();
            // Versions outlive any entry they guard (the longest TTL is the auth token's).
            pipe.cmd("PEXPIRE").arg(&version_key).arg(VERSION_TTL_MS).ignore();
            pipe.cmd("UNLINK").arg(redis_key).ignore();
        };
        let mut publish = redis::pipe();
        for redis_key in redis_keys {
            publish
                .cmd("PUBLISH")
                .arg(&channel)
                .arg(self.fleet_message(redis_key))
                .ignore();
        }
        if !redis.is_cluster() {
            // One transaction, version first: no fill script can run between the bump and the
            // delete; the messages go with it.
            let mut pipe = redis::pipe();
            pipe.atomic();
            for redis_key in redis_keys {
                bump_and_delete(&mut pipe, redis_key);
            }
            for message in publish.cmd_iter() {
                pipe.add_command(message.clone()).ignore();
            }
            return redis
                .call(|mut c| async move { pipe.query_async::<()>(&mut c).await })
                .await;
        }
        // A cluster: one script per key (its entry and version share a hash tag, so a slot), all
        // at once over the multiplexed connection; then the messages (one channel: one slot).
        // Not MULTI/EXEC: a MOVED inside a transaction after a failover aborts it without the
        // client learning the new owner of the slot, so it would fail on and on.
        let scripts = redis_keys.iter().map(|redis_key| {
            let mut invocation = invalidate_script().prepare_invoke();
            invocation
                .key(self.keys.version_of(redis_key))
                .key(redis_key)
                .arg(VERSION_TTL_MS);
            redis.call(|mut c| async move { invocation.invoke_async::<()>(&mut c).await })
        });
        futures_util::future::try_join_all(scripts).await?;
        redis
            .call(|mut c| async move { publish.query_async::<()>(&mut c).await })
            .await
    }

    /// See `CacheService::flush`.
    async fn flush(&self, pattern: &str) -> Result<u64, RedisFailure> {
        // L1 follows the same pattern as Redis, applied to the Redis key an entry belongs to.
        let glob = pattern.as_bytes().to_vec();
        let matches = move |k: &String| {
            let redis_key = k.split_once('#').map_or(k.as_str(), |(key, _)| key);
            glob_matches(&glob, redis_key.as_bytes())
        };
        let l1_count = self.l1.iter().filter(|(k, _)| matches(k)).count() as u64;
        self.generation.fetch_add(1, Ordering::AcqRel);
        let _ = self.l1.invalidate_entries_if(move |k, _| matches(k));
        let Some(redis) = self.sync_redis() else {
            return Ok(l1_count);
        };
        // Each SCAN and UNLINK is bounded by the command timeout, the whole flush by FLUSH_DEADLINE.
        let scan_and_unlink = async {
            let mut deleted = 0u64;
            let mut cursor = ScanCursor::default();
            while !cursor.done() {
                let keys = redis.scan(&mut cursor, pattern).await?;
                if !keys.is_empty() {
                    // On a cluster the client splits a multi-key UNLINK by slot.
                    deleted += redis
                        .call(|mut c| async move { redis::cmd("UNLINK").arg(keys).query_async::<u64>(&mut c).await })
                        .await?;
                }
            }
            Ok(deleted)
        };
        let outcome = tokio::time::timeout(FLUSH_DEADLINE, scan_and_unlink)
            .await
            .unwrap_or(Err(RedisFailure::Timeout(FLUSH_DEADLINE)));
        // Even a partial flush deleted keys other instances may hold in L1.
        let _ = self.tell_fleet(redis, subscriber::FLUSH_ALL).await;
        outcome
    }

    /// Replays queued invalidations, when Redis answers again: overflowed namespaces are flushed
    /// whole, then keys go in batches of `REPLAY_BATCH`, each in one transaction under the
    /// command timeout. A key leaves the queue only once Redis has taken it (and was not queued
    /// again meanwhile), so until then fills keep off L2.
    pub(crate) async fn replay_pending(&self) {
        let Ok(_only_replay) = self.replaying.try_lock() else {
            return;
        };
        let Some(redis) = self.sync_redis() else {
            return;
        };
        let overflowed: Vec<Namespace> = self.pending.lock().unwrap().namespaces.iter().copied().collect();
        for namespace in overflowed {
            let pattern = self.keys.namespace_pattern(namespace);
            if let Err(err) = self.flush(&pattern).await {
                log::debug!("cache: flushing {pattern} for the overflowed queue failed: {err}");
                return;
            }
            log::info!("cache: flushed {pattern}: more invalidations were queued than kept");
            self.pending.lock().unwrap().namespaces.remove(&namespace);
        }
        loop {
            let batch = self.pending.lock().unwrap().batch(REPLAY_BATCH);
            if batch.is_empty() {
                return;
            }
            let keys: Vec<String> = batch.iter().map(|(key, _)| key.clone()).collect();
            if let Err(err) = self.send_invalidations(redis, &keys).await {
                log::debug!("cache: replaying {} invalidation(s) failed: {err}", keys.len());
                return;
            }
            self.pending.lock().unwrap().acknowledge(&batch);
            log::info!("cache: replayed {} queued invalidation(s)", keys.len());
            self.telemetry.invalidations_replayed.inc_by(keys.len() as u64);
            // What L1 filled meanwhile may have come from the entries just deleted.
            for key in keys.iter().filter_map(|k| self.keys.parse(k)) {
                self.drop_from_l1(&key).await;
            }
        }
    }
}

/// Invalidations that could not reach Redis. Each key carries the sequence number of its latest
/// queuing, so a replay acknowledges only what it sent. Past `max` keys, the namespace of each
/// further key is flushed whole instead.
#[derive(Default)]
struct Pending {
    keys: HashMap<String, u64>,
    namespaces: HashSet<Namespace>,
    sequence: u64,
}

impl Pending {
    fn add(&mut self, redis_keys: Vec<String>, max: usize, registry: &KeyRegistry) {
        let namespace_of = |redis_key: &str| registry.parse(redis_key).map(|key| key.namespace);
        for redis_key in redis_keys {
            self.sequence += 1;
            let namespace = namespace_of(&redis_key);
            if namespace.is_some_and(|namespace| self.namespaces.contains(&namespace)) {
                continue; // the namespace's flush covers it
            }
            match namespace {
                Some(namespace) if self.keys.len() >= max && !self.keys.contains_key(&redis_key) => {
                    self.namespaces.insert(namespace);
                    self.keys.retain(|queued, _| namespace_of(queued) != Some(namespace));
                }
                _ => {
                    self.keys.insert(redis_key, self.sequence);
                }
            }
        }
    }

    fn batch(&self, size: usize) -> Vec<(String, u64)> {
        self.keys
            .iter()
            .take(size)
            .map(|(key, sequence)| (key.clone(), *sequence))
            .collect()
    }

    fn acknowledge(&mut self, batch: &[(String, u64)]) {
        for (key, sent) in batch {
            if self.keys.get(key) == Some(sent) {
                self.keys.remove(key);
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.namespaces.is_empty()
    }

    /// Queued keys, plus one per namespace to flush.
    fn len(&self) -> usize {
        self.keys.len() + self.namespaces.len()
    }
}

/// Keys per replayed transaction: four commands each, well inside one command timeout.
const REPLAY_BATCH: usize = 100;

const EPOCH_SHARDS: usize = 1024;
/// L2 entries whose shape check is remembered (a few hundred KB at most).
const SHAPE_CHECKED_ENTRIES: u64 = 10_000;

/// What an L1 entry costs beyond its key and value (the entry itself, moka's node and indexes),
/// so that many small entries count too.
const L1_ENTRY_OVERHEAD: usize = 160;

type FastHash = foldhash::fast::RandomState;

/// Longest an admin flush may run (a namespace of millions of keys).
const FLUSH_DEADLINE: Duration = Duration::from_secs(60);

const VERSION_TTL_MS: u64 = 4 * 3600 * 1000;

struct L2Read {
    value: Option<Bytes>,
    pttl_ms: i64,
    version: String,
}

/// An L2 read made ahead of its lookup, and the key's epoch when it was made.
pub struct Prefetched {
    l1_key: String,
    epoch: (u64, u64),
    read: L2Read,
}

/// Reads an entry, its remaining TTL and its fill version. Entries are stored as
/// `<written at, Redis ms>:<format>:<bytes>`; one written before `trusted_since_ms`, or in
/// another format than its namespace's, reads as a miss.
async fn read_l2(
    redis: &Redis,
    keys: &KeyRegistry,
    key: &CacheKey,
    trusted_since_ms: u64,
) -> Result<L2Read, RedisFailure> {
    let mut reads = read_l2_many(redis, keys, std::slice::from_ref(key), trusted_since_ms).await?;
    Ok(reads.pop().expect("one read per key"))
}

/// `read_l2` for several keys, in one pipeline.
async fn read_l2_many(
    redis: &Redis,
    keys: &KeyRegistry,
    wanted: &[CacheKey],
    trusted_since_ms: u64,
) -> Result<Vec<L2Read>, RedisFailure> {
    let mut pipe = redis::pipe();
    for key in wanted {
        match key.field() {
            Some(field) => pipe.cmd("HGET").arg(key.redis_key()).arg(field),
            None => pipe.cmd("GET").arg(key.redis_key()),
        };
        pipe.cmd("PTTL")
            .arg(key.redis_key())
            .cmd("GET")
            .arg(keys.version_of(key.redis_key()));
    }
    let replies: Vec<redis::Value> = redis
        .call(|mut c| async move { pipe.query_async(&mut c).await })
        .await?;
    let mut replies = replies.into_iter();
    let mut reads = Vec::with_capacity(wanted.len());
    for key in wanted {
        let value: Option<Vec<u8>> = next_reply(&mut replies)?;
        let pttl_ms: i64 = next_reply(&mut replies)?;
        let version: Option<String> = next_reply(&mut replies)?;
        reads.push(L2Read {
            value: value.and_then(|stored| current_payload(stored, key, trusted_since_ms)),
            pttl_ms,
            version: version.unwrap_or_default(),
        });
    }
    Ok(reads)
}

/// The next reply of a pipeline, as `T`.
fn next_reply<T: redis::FromRedisValue>(replies: &mut impl Iterator<Item = redis::Value>) -> Result<T, RedisFailure> {
    let reply = replies.next().unwrap_or(redis::Value::Nil);
    redis::from_redis_value(reply).map_err(|err| RedisFailure::Command(err.into()))
}

/// The payload of a stored entry, if it was written since `trusted_since_ms` in its namespace's
/// current format.
fn current_payload(stored: Vec<u8>, key: &CacheKey, trusted_since_ms: u64) -> Option<Bytes> {
    let field = |from: usize| {
        let colon = from + stored[from..].iter().position(|b| *b == b':')?;
        let number: u64 = std::str::from_utf8(&stored[from..colon]).ok()?.parse().ok()?;
        Some((number, colon + 1))
    };
    let (written_ms, format_at) = field(0)?;
    let (format, payload_at) = field(format_at)?;
    let current = written_ms >= trusted_since_ms && format == u64::from(key.namespace.format());
    current.then(|| Bytes::from(stored).slice(payload_at..))
}

/// On a cluster, what one invalidation does in one step: bump the version, then drop the entry.
fn invalidate_script() -> &'static Script {
    static SCRIPT: OnceLock<Script> = OnceLock::new();
    SCRIPT.get_or_init(|| {
        Script::new(
            r"
            redis.call('INCR', KEYS[1])
            redis.call('PEXPIRE', KEYS[1], ARGV[1])
            redis.call('UNLINK', KEYS[2])
            return 1",
        )
    })
}

/// Writes only if the key's version is still the one read before loading (no invalidation since),
/// and a grouped entry only while its hash holds fewer than `max_fields` other fields.
fn fill_script() -> &'static Script {
    static SCRIPT: OnceLock<Script> = OnceLock::new();
    SCRIPT.get_or_init(|| {
        Script::new(
            r"
            local current = redis.call('GET', KEYS[2]) or ''
            if current ~= ARGV[1] then return 0 end
            local now = redis.call('TIME')
            local stamped = (now[1] * 1000 + math.floor(now[2] / 1000)) .. ':' .. ARGV[2]
            if ARGV[4] == '' then
                redis.call('SET', KEYS[1], stamped, 'PX', ARGV[3])
            else
                if redis.call('HEXISTS', KEYS[1], ARGV[4]) == 0
                    and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[5]) then return 0 end
                redis.call('HSET', KEYS[1], ARGV[4], stamped)
                if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
            end
            return 1",
        )
    })
}

async fn write_l2(
    redis: &Redis,
    keys: &KeyRegistry,
    key: &CacheKey,
    entry: (&Bytes, Duration),
    version: String,
    max_fields: u32,
) -> Result<(), RedisFailure> {
    let (bytes, ttl) = entry;
    let mut formatted = format!("{}:", key.namespace.format()).into_bytes();
    formatted.extend_from_slice(bytes);
    let mut invocation = fill_script().key(key.redis_key());
    invocation
        .key(keys.version_of(key.redis_key()))
        .arg(version)
        .arg(formatted)
        .arg(ttl.as_millis() as u64)
        .arg(key.field().unwrap_or(""))
        .arg(max_fields);
    redis
        .call(|mut c| async move { invocation.invoke_async::<i64>(&mut c).await.map(|_| ()) })
        .await
}

#[async_trait]
impl CacheService for TieredCache {
    async fn get_or_load<'a>(
        &'a self,
        key: CacheKey,
        loader: BoxFuture<'a, AppResult<Bytes>>,
        decodes: Decodes,
    ) -> AppResult<Cached> {
        self.inner.lookup(&key, loader, decodes).await
    }

    async fn get_or_load_found<'a>(
        &'a self,
        key: CacheKey,
        loader: BoxFuture<'a, AppResult<Option<Bytes>>>,
        decodes: Decodes,
    ) -> AppResult<Option<Cached>> {
        let inner = &self.inner;
        let bypass = bypassing();
        let l1_in_use = !bypass && inner.l1_enabled;
        // Found first: most lookups find what they look for (a valid session). A key is never
        // current both ways: whatever makes it found or absent invalidates it.
        if l1_in_use {
            if let Some(hit) = inner.l1_hit(&key).await {
                return Ok(Some(hit));
            }
        }
        if let Some(absent) = inner.negative.get(key.l1_key()).await.filter(|_| !bypass) {
            let now = Instant::now();
            // Any invalidation of the key (or its group, or a flush) moved its epoch on.
            if absent.epoch == inner.epoch_of(&key) && inner.in_sync(absent.filled_at, now) {
                inner.count(key.namespace, CacheTier::HitL1);
                return Ok(None);
            }
        }
        let epoch = inner.epoch_of(&key);
        let found = Box::pin(async move { loader.await?.ok_or(ABSENT) });
        // L1 was looked up above: a miss goes straight to the load.
        let looked_up = if l1_in_use {
            inner.load_into_l1(&key, found, decodes).await
        } else {
            inner.lookup(&key, found, decodes).await
        };
        match looked_up {
            Ok(cached) => Ok(Some(cached)),
            Err(err) if is_absent(&err) => {
                if !bypass && inner.epoch_of(&key) == epoch {
                    let filled_at = Instant::now();
                    let absent = NegativeEntry { epoch, filled_at };
                    inner.negative.insert(key.l1_key().to_owned(), absent).await;
                }
                Ok(None)
            }
            Err(err) => Err(err),
        }
    }

    fn reads_ahead(&self) -> bool {
        self.inner.reads_ahead()
    }

    async fn prefetch(&self, keys: &[CacheKey]) -> Vec<Prefetched> {
        self.inner.prefetch(keys).await
    }

    fn is_pass_through(&self) -> bool {
        bypassing() || (!self.inner.l1_enabled && self.inner.active_redis().is_none())
    }

    async fn invalidate(&self, keys: Vec<CacheKey>) {
        for key in &keys {
            self.inner.drop_from_l1(key).await;
        }
        let redis_keys: Vec<String> = keys.iter().map(|k| k.redis_key().to_owned()).collect();
        self.inner.invalidate_l2(redis_keys).await;
        // Again after the Redis round trip: a read in between may have refilled L1 from the L2
        // entry that was just deleted (its epoch was already the bumped one).
        for key in &keys {
            self.inner.drop_from_l1(key).await;
        }
    }

    fn stamp(&self, key: &CacheKey) -> Option<Stamp> {
        self.inner.stamp(key)
    }

    fn is_current(&self, stamp: &Stamp) -> bool {
        self.inner.is_current(stamp)
    }

    fn keys(&self) -> &KeyRegistry {
        &self.inner.keys
    }

    fn ttl_jitter_percent(&self) -> u8 {
        self.inner.jitter_percent
    }

    fn status(&self) -> CacheStatus {
        let inner = &self.inner;
        let redis = inner.redis.status();
        CacheStatus {
            mode: inner.mode(&redis),
            breaker: redis.breaker,
            subscriber_connected: inner.subscriber_connected.load(Ordering::Acquire),
            l1_entries: inner.l1.entry_count(),
            negative_entries: inner.negative.entry_count(),
            pending_invalidations: inner.pending.lock().unwrap().len(),
        }
    }

    async fn flush(&self, pattern: &str) -> Result<u64, RedisFailure> {
        self.inner.flush(pattern).await
    }

    async fn stats(&self) -> Vec<NamespaceStats> {
        let inner = &self.inner;
        // Evictions are applied lazily: apply them, so the figures are what L1 really keeps.
        inner.l1.run_pending_tasks().await;
        inner.negative.run_pending_tasks().await;
        // One pass over L1, counting entries and bytes by the namespace their key names.
        let mut l1_entries = [0u64; Namespace::ALL.len()];
        let mut l1_bytes = [0u64; Namespace::ALL.len()];
        for (key, entry) in inner.l1.iter() {
            if let Some(parsed) = inner.keys.parse(&key) {
                l1_entries[parsed.namespace as usize] += 1;
                l1_bytes[parsed.namespace as usize] += (key.len() + entry.bytes.len()) as u64;
            }
        }
        Namespace::ALL
            .into_iter()
            .map(|namespace| {
                let hits_l1 = inner.counted(namespace, CacheTier::HitL1);
                let hits_l2 = inner.counted(namespace, CacheTier::HitL2);
                let misses = inner.counted(namespace, CacheTier::Miss);
                let total = hits_l1 + hits_l2 + misses;
                let hit_rate = if total == 0 {
                    0.0
                } else {
                    (hits_l1 + hits_l2) as f64 / total as f64
                };
                NamespaceStats {
                    namespace,
                    hits_l1,
                    hits_l2,
                    misses,
                    hit_rate,
                    l1_entries: l1_entries[namespace as usize],
                    l1_bytes: l1_bytes[namespace as usize],
                }
            })
            .collect()
    }

    fn set_redis_enabled(&self, enabled: bool) {
        self.inner.set_redis_enabled(enabled);
    }

    async fn set_fleet_redis_enabled(&self, enabled: bool) -> Result<u64, RedisFailure> {
        let inner = &self.inner;
        let redis = inner.sync_redis().ok_or(RedisFailure::Disabled)?;
        let switch = if enabled {
            subscriber::FLEET_REDIS_ON
        } else {
            subscriber::FLEET_REDIS_OFF
        };
        let reached = inner.tell_fleet(redis, switch).await?;
        // Our own subscriber skips our messages: switch here.
        inner.set_redis_enabled(enabled);
        Ok(reached)
    }

    fn start(&self) {
        tokio::spawn(subscriber::run(self.inner.clone()));
    }
}

/// Redis' glob rule for keys (`*`, `?` and `\` escapes; character classes are refused before a
/// flush gets here), so that L1 drops exactly what SCAN MATCH finds.
fn glob_matches(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(b'?') => {
                p += 1;
                t += 1;
            }
            Some(b'\\') if pattern.get(p + 1) == Some(&text[t]) => {
                p += 2;
                t += 1;
            }
            Some(&c) if c != b'\\' && c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                // Let the last `*` take one more character and try again from there.
                Some((star_at, taken)) => {
                    star = Some((star_at, taken + 1));
                    p = star_at + 1;
                    t = taken + 1;
                }
                None => return false,
            },
        }
    }
    pattern[p.min(pattern.len())..].iter().all(|c| *c == b'*')
}

/// Single-flight shares one error between all waiters; they each get an equivalent one.
fn shared_error(err: &AppError) -> AppError {
    match err {
        AppError::NotFound { entity } => AppError::NotFound { entity },
        AppError::Forbidden(message) => AppError::Forbidden(message),
        AppError::Unauthorized { code, message } => AppError::Unauthorized { code, message },
        AppError::Conflict { code, message } => AppError::Conflict {
            code,
            message: message.clone(),
        },
        AppError::DatabaseUnavailable(_) => AppError::DatabaseUnavailable(sqlx::Error::PoolTimedOut),
        AppError::BadRequest { code, message } => AppError::BadRequest {
            code,
            message: message.clone(),
        },
        AppError::Validation(fields) => AppError::Validation(fields.clone()),
        other => AppError::internal(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;
    use crate::infra::redis::RedisModule;

    /// An invalidation of another key in the same epoch shard makes an L1 entry out of date: the
    /// next read must load it again and keep it, not get the old entry back from the
    /// single-flight every time (seen as a flaky "second read: MISS" in the suite).
    #[tokio::test]
    async fn an_entry_outdated_by_another_keys_invalidation_is_loaded_again_and_kept() {
        let settings = Settings::from_lookup(|_| None).unwrap();
        let telemetry = Telemetry::new();
        let keys = KeyRegistry::new("t:", settings.ttl.clone());
        let redis = Arc::new(RedisModule::new(settings.redis.clone(), keys, telemetry.clone()));
        let cache = TieredCache::new(Inner::new(redis, &settings.cache, telemetry));
        let read = |key: CacheKey| {
            let load = Box::pin(async { Ok(Bytes::from_static(b"{}")) });
            cache.get_or_load(key, load, json::<serde_json::Value>)
        };
        let key = cache.keys().task(uuid::Uuid::new_v4());
        read(key.clone()).await.unwrap();
        assert_eq!(read(key.clone()).await.unwrap().tier, CacheTier::HitL1);
        let shard = cache.inner.epoch_shard(key.redis_key()) as *const AtomicU64;
        let neighbour = std::iter::repeat_with(|| cache.keys().task(uuid::Uuid::new_v4()))
            .find(|other| std::ptr::eq(cache.inner.epoch_shard(other.redis_key()), shard))
            .expect("1,024 shards: a neighbour turns up");
        cache.invalidate(vec![neighbour]).await;
        assert_eq!(
            read(key.clone()).await.unwrap().tier,
            CacheTier::Miss,
            "out of date: loaded again"
        );
        assert_eq!(read(key).await.unwrap().tier, CacheTier::HitL1, "and kept");
    }

    #[test]
    fn glob_matches_as_redis_does() {
        let cases = [
            ("p:tasks:*", "p:tasks:123", true),
            ("p:tasks:*", "p:task-lists:1", false),
            ("p:tasks:*23", "p:tasks:123", true),
            ("p:tasks:*23", "p:tasks:1234", false),
            ("p:tasks:*2*", "p:tasks:123", true),
            ("p:tasks:1?3", "p:tasks:123", true),
            ("p:tasks:1?3", "p:tasks:13", false),
            ("p:tasks:\\*", "p:tasks:*", true),
            ("p:tasks:\\*", "p:tasks:1", false),
            ("p:tasks:123", "p:tasks:123", true),
            ("p:tasks:12", "p:tasks:123", false),
            ("**", "", true),
        ];
        for (pattern, key, expected) in cases {
            assert_eq!(
                glob_matches(pattern.as_bytes(), key.as_bytes()),
                expected,
                "{pattern} ~ {key}"
            );
        }
    }
}
