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
//!
//! Here: the public surface (`CacheService`, `Cached`, the modes and statuses) and the state,
//! `Inner`. Its rooms: `tiers` (L1 entries and a lookup's path through the tiers), `l2` (the
//! Redis side of it), `stamps` (epochs: when an entry or a fill is current), `derived` (values
//! kept under stamps), `invalidation` (L1, L2, the fleet, the queue, the flush), `service` (the
//! `CacheService` implementation), `subscriber` (the fleet's invalidations), `compressed`.

pub mod compressed;
mod derived;
mod invalidation;
mod l2;
mod service;
mod stamps;
mod subscriber;
mod tiers;

pub use derived::Derived;
use invalidation::*;
pub use l2::Prefetched;
use l2::*;
pub use stamps::Stamp;
use tiers::*;

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

const EPOCH_SHARDS: usize = 1024;
/// L2 entries whose shape check is remembered (a few hundred KB at most).
const SHAPE_CHECKED_ENTRIES: u64 = 10_000;

/// What an L1 entry costs beyond its key and value (the entry itself, moka's node and indexes),
/// so that many small entries count too.
const L1_ENTRY_OVERHEAD: usize = 160;

type FastHash = foldhash::fast::RandomState;

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
}
