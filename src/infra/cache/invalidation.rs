//! Invalidation: dropping keys from L1, deleting them from L2 with their versions bumped,
//! telling the fleet (pub/sub), queuing what could not reach Redis and replaying it, and the
//! admin flush.

use super::*;

impl Inner {
    /// Bumps the key's epoch (a group's, for a grouped key: all its variants share it), so that
    /// L1 no longer serves it and fills that started before are not kept, and drops a single
    /// entry from L1. A group's entries are not looked for: that would scan all of L1 on every
    /// write (moka's `invalidate_entries_if`). They are replaced when read again, or leave with
    /// their TTL or the size bound.
    pub(super) async fn drop_from_l1(&self, key: &CacheKey) {
        self.epoch_shard(key.redis_key()).fetch_add(1, Ordering::AcqRel);
        if key.field().is_some() || !key.namespace.is_grouped() {
            self.l1.invalidate(key.l1_key()).await;
        }
    }

    /// Deletes keys in Redis (bumping their fill versions) and publishes them; what fails is
    /// queued. Returns whether Redis took them.
    pub(super) async fn invalidate_l2(&self, redis_keys: Vec<String>) -> bool {
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
    pub(super) fn fleet_message(&self, body: &str) -> String {
        format!("{}|{body}", self.instance)
    }

    /// Publishes `body` (a key, or one of the subscriber's commands) on the invalidation channel;
    /// returns how many subscribers received it.
    pub(super) async fn tell_fleet(&self, redis: &Redis, body: &str) -> Result<u64, RedisFailure> {
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

    pub(super) async fn send_invalidations(&self, redis: &Redis, redis_keys: &[String]) -> Result<(), RedisFailure> {
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
    pub(super) async fn flush(&self, pattern: &str) -> Result<u64, RedisFailure> {
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

    /// Flushes L1: after a lost subscription we cannot know what we missed.
    pub(crate) fn flush_l1(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.l1.invalidate_all();
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
pub(super) struct Pending {
    pub(super) keys: HashMap<String, u64>,
    pub(super) namespaces: HashSet<Namespace>,
    pub(super) sequence: u64,
}

impl Pending {
    pub(super) fn add(&mut self, redis_keys: Vec<String>, max: usize, registry: &KeyRegistry) {
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

    pub(super) fn batch(&self, size: usize) -> Vec<(String, u64)> {
        self.keys
            .iter()
            .take(size)
            .map(|(key, sequence)| (key.clone(), *sequence))
            .collect()
    }

    pub(super) fn acknowledge(&mut self, batch: &[(String, u64)]) {
        for (key, sent) in batch {
            if self.keys.get(key) == Some(sent) {
                self.keys.remove(key);
            }
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.namespaces.is_empty()
    }

    /// Queued keys, plus one per namespace to flush.
    pub(super) fn len(&self) -> usize {
        self.keys.len() + self.namespaces.len()
    }
}

/// Keys per replayed transaction: four commands each, well inside one command timeout.
pub(super) const REPLAY_BATCH: usize = 100;

/// Longest an admin flush may run (a namespace of millions of keys).
pub(super) const FLUSH_DEADLINE: Duration = Duration::from_secs(60);

/// On a cluster, what one invalidation does in one step: bump the version, then drop the entry.
pub(super) fn invalidate_script() -> &'static Script {
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

/// Redis' glob rule for keys (`*`, `?` and `\` escapes; character classes are refused before a
/// flush gets here), so that L1 drops exactly what SCAN MATCH finds.
pub(super) fn glob_matches(pattern: &[u8], text: &[u8]) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

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
