//! Epochs and stamps: every invalidation bumps its key's epoch (sharded), every flush the
//! generation; an L1 entry, a fill or a derived value is current only while the epochs it saw
//! are.

use super::*;

/// What a value derived from cached entries depends on: the epochs of their keys, and when it
/// was made. Derived values follow the rules of the L1 entries they come from, without looking
/// those entries up (nor formatting their keys) again.
#[derive(Clone, Debug)]
pub struct Stamp {
    pub(super) generation: u64,
    pub(super) epochs: smallvec::SmallVec<[(u32, u64); 2]>,
    pub(super) filled_at: Instant,
    pub(super) expires_at: Instant,
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

impl Inner {
    pub(super) fn epoch_shard(&self, redis_key: &str) -> &AtomicU64 {
        &self.epochs[self.epoch_shard_index(redis_key)]
    }

    pub(super) fn epoch_shard_index(&self, redis_key: &str) -> usize {
        use std::hash::BuildHasher;
        self.epoch_hasher.hash_one(redis_key) as usize % self.epochs.len()
    }

    pub(super) fn stamp(&self, key: &CacheKey) -> Option<Stamp> {
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

    pub(super) fn is_current(&self, stamp: &Stamp) -> bool {
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
    pub(super) fn epoch_of(&self, key: &CacheKey) -> (u64, u64) {
        (
            self.generation.load(Ordering::Acquire),
            self.epoch_shard(key.redis_key()).load(Ordering::Acquire),
        )
    }
}
