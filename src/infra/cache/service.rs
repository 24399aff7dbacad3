//! `CacheService` for `TieredCache`: the container's face of the cache, over `Inner`.

use super::*;

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
            .iter()
            .copied()
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
