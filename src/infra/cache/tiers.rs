//! The tiers: L1 entries (moka, per-entry expiry, negative entries) and the path a lookup takes
//! through them, L1 then L2 then the loader, with single flight per key; the mode (redis, memory,
//! degraded) and whether L1 may be trusted.

use super::*;

#[derive(Clone)]
pub(super) struct L1Entry {
    pub(super) bytes: Bytes,
    pub(super) expires_at: Instant,
    pub(super) origin: CacheTier,
    /// The key's epoch when the fill started: a hit is served only while it is still current.
    pub(super) epoch: (u64, u64),
    pub(super) filled_at: Instant,
    pub(super) etag: HeaderValue,
    pub(super) compressed: Arc<Compressed>,
}

impl L1Entry {
    pub(super) fn new(bytes: Bytes, origin: CacheTier, ttl: Duration, epoch: (u64, u64)) -> Self {
        let etag = etag_of(&bytes);
        Self::with_etag(bytes, etag, origin, ttl, epoch)
    }

    pub(super) fn with_etag(
        bytes: Bytes,
        etag: HeaderValue,
        origin: CacheTier,
        ttl: Duration,
        epoch: (u64, u64),
    ) -> Self {
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

    pub(super) fn served_as(self, tier: CacheTier, now: Instant) -> Cached {
        Cached {
            ttl: self.expires_at.saturating_duration_since(now),
            bytes: self.bytes,
            tier,
            etag: self.etag,
            compressed: self.compressed,
        }
    }
}

/// A lookup that found nothing; like an L1 entry, it counts only while its epoch is current.
#[derive(Clone)]
pub(super) struct NegativeEntry {
    pub(super) epoch: (u64, u64),
    pub(super) filled_at: Instant,
}

/// The error a "found nothing" load travels as through the single-flight (never returned).
pub(super) const ABSENT: AppError = AppError::NotFound { entity: "cache-absent" };

pub(super) fn is_absent(err: &AppError) -> bool {
    matches!(err, AppError::NotFound { entity: "cache-absent" })
}

pub(super) struct PerEntryExpiry {
    pub(super) max_ttl: Duration,
}

impl moka::Expiry<String, L1Entry> for PerEntryExpiry {
    fn expire_after_create(&self, _key: &String, value: &L1Entry, now: Instant) -> Option<Duration> {
        Some(value.expires_at.saturating_duration_since(now).min(self.max_ttl))
    }
}

/// Single-flight shares one error between all waiters; they each get an equivalent one.
pub(super) fn shared_error(err: &AppError) -> AppError {
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
                .iter()
                .copied()
                .map(|ns| {
                    ["hit_l1", "hit_l2", "miss", "bypass"]
                        .map(|result| telemetry.cache_requests.with_label_values(&[ns.as_str(), result]))
                })
                .collect(),
            telemetry,
        })
    }

    /// Redis if it is switched on (created on first use: no connection in memory mode).
    pub(super) fn active_redis(&self) -> Option<&Redis> {
        self.redis.active()
    }

    /// Redis for keeping the fleet in sync: in redis and memory-synced modes.
    pub(super) fn sync_redis(&self) -> Option<&Redis> {
        self.redis.synced()
    }

    pub(super) fn count(&self, namespace: Namespace, tier: CacheTier) {
        self.counters[namespace as usize][tier_index(tier)].inc();
    }

    pub(super) fn counted(&self, namespace: Namespace, tier: CacheTier) -> u64 {
        self.counters[namespace as usize][tier_index(tier)].get()
    }

    /// The TTL table's lifetime, shortened by up to `jitter_percent`: the table is an upper bound.
    pub(super) fn ttl_with_jitter(&self, key: &CacheKey) -> Duration {
        let ttl = self.keys.ttl(key.namespace);
        let jitter_ms = ttl.as_millis() as u64 * self.jitter_percent as u64 / 100;
        ttl - Duration::from_millis(rand::thread_rng().gen_range(0..=jitter_ms))
    }

    /// Loads through L2 and the loader; returns the entry to keep in L1.
    pub(super) async fn fill(
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
    pub(super) fn in_shape(&self, key: &CacheKey, value: Option<&Bytes>, decodes: Decodes) -> Option<HeaderValue> {
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
    pub(super) fn take_prefetched(&self, key: &CacheKey, epoch: (u64, u64)) -> Option<L2Read> {
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

    pub(super) fn reads_ahead(&self) -> bool {
        // With L1 on, lookups rarely reach Redis; on a cluster the keys live on different nodes.
        !self.l1_enabled && !bypassing() && self.active_redis().is_some_and(|redis| !redis.is_cluster())
    }

    pub(super) async fn prefetch(&self, keys: &[CacheKey]) -> Vec<Prefetched> {
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
    pub(super) async fn lookup<'a>(
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
    pub(super) async fn l1_hit(&self, key: &CacheKey) -> Option<Cached> {
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
    pub(super) fn load_into_l1<'a>(
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

    pub(super) fn mode(&self, redis: &RedisStatus) -> CacheMode {
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

    /// Whether an L1 entry may be served. In strict memory mode always (nothing to hear). Hearing
    /// the fleet (redis and memory-synced modes), only if this instance heard every invalidation
    /// until less than `unsynced_ttl` ago, or the entry is younger than that: another instance's
    /// write goes unseen here for at most that long, even while the subscriber is down.
    pub(super) fn in_sync(&self, filled_at: Instant, now: Instant) -> bool {
        if !self.redis.is_syncing() {
            return true;
        }
        let synced_at = self.clock_base + Duration::from_millis(self.synced_at_ms.load(Ordering::Acquire));
        now.saturating_duration_since(synced_at.max(filled_at)) <= self.unsynced_ttl
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
}
