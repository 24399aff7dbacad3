//! Derived values: what a service computes from cached entries (a token's session, a member's
//! access), kept under the entries' stamps and gone when they are.

use super::*;

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
pub(super) const DERIVED_ENTRIES: u64 = 10_000;
