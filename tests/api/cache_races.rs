//! The cache's race rules, driven step by step: a fill that started before an invalidation is
//! not kept (delete-then-fill), in L1 and in Redis, and a failed load does not poison its key.
//! The loader here is a future the test releases by hand: the interleaving is what a real server
//! cannot be made to produce on demand; the cache, moka and Redis are the real ones.

use std::sync::Arc;

use bytes::Bytes;
use nestling::error::AppError;
use nestling::infra::cache::{json, CacheService, CacheTier, Decodes, Inner, TieredCache};
use nestling::infra::redis::keys::KeyRegistry;
use nestling::infra::redis::RedisModule;
use nestling::infra::telemetry::Telemetry;
use tokio::sync::oneshot;

use crate::helpers::{shared_redis, test_settings};

fn cache(redis_url: Option<String>) -> TieredCache {
    let mut settings = test_settings();
    settings.redis.key_prefix = format!("race-{}:", uuid::Uuid::new_v4().simple());
    if let Some(url) = redis_url {
        settings.redis.enabled = true;
        settings.redis.url = url;
    }
    let keys = KeyRegistry::new(settings.redis.key_prefix.clone(), settings.ttl.clone());
    let telemetry = Telemetry::new();
    let redis = Arc::new(RedisModule::new(settings.redis.clone(), keys, telemetry.clone()));
    TieredCache::new(Inner::new(redis, &settings.cache, telemetry))
}

/// These loaders return any JSON.
const JSON: Decodes = json::<serde_json::Value>;

/// Starts a read whose loader returns `old` only when released, invalidates the key meanwhile,
/// releases the loader, and returns what the next read sees.
async fn fill_racing_an_invalidation(cache: &TieredCache) -> (String, CacheTier) {
    let key = cache.keys().task(uuid::Uuid::new_v4());
    let (release, released) = oneshot::channel::<()>();
    let (started, loader_started) = oneshot::channel::<()>();
    let slow_read = cache.get_or_load(
        key.clone(),
        Box::pin(async move {
            let _ = started.send(());
            released.await.ok();
            Ok(Bytes::from_static(b"\"old\""))
        }),
        JSON,
    );
    let write = async {
        loader_started.await.unwrap();
        // The write commits "new" and invalidates, while the read still holds "old".
        cache.invalidate(vec![key.clone()]).await;
        release.send(()).unwrap();
    };
    let (served, ()) = tokio::join!(slow_read, write);
    assert_eq!(
        served.unwrap().bytes,
        "\"old\"",
        "the racing read itself gets what it loaded"
    );
    let next = cache
        .get_or_load(key, Box::pin(async { Ok(Bytes::from_static(b"\"new\"")) }), JSON)
        .await
        .unwrap();
    (String::from_utf8(next.bytes.to_vec()).unwrap(), next.tier)
}

#[tokio::test]
async fn in_memory_a_fill_older_than_the_last_invalidation_is_dropped() {
    let cache = cache(None);
    let (next, tier) = fill_racing_an_invalidation(&cache).await;
    assert_eq!((next.as_str(), tier), ("\"new\"", CacheTier::Miss));
}

#[tokio::test]
async fn with_redis_a_fill_older_than_the_last_invalidation_is_dropped_from_both_tiers() {
    let redis = tokio::task::spawn_blocking(shared_redis).await.unwrap();
    let cache = cache(Some(redis.url()));
    let (next, tier) = fill_racing_an_invalidation(&cache).await;
    assert_eq!(
        (next.as_str(), tier),
        ("\"new\"", CacheTier::Miss),
        "L2 kept the stale fill"
    );
}

#[tokio::test]
async fn a_failing_loader_does_not_poison_the_key() {
    let cache = Arc::new(cache(None));
    let key = cache.keys().project(uuid::Uuid::new_v4());
    let failed = cache
        .get_or_load(
            key.clone(),
            Box::pin(async { Err(AppError::not_found("project")) }),
            JSON,
        )
        .await;
    assert!(matches!(failed, Err(AppError::NotFound { entity: "project" })));
    let next = cache
        .get_or_load(key.clone(), Box::pin(async { Ok(Bytes::from_static(b"{}")) }), JSON)
        .await
        .unwrap();
    assert_eq!(next.tier, CacheTier::Miss, "the failure was not cached");
    let again = cache
        .get_or_load(key, Box::pin(async { Ok(Bytes::from_static(b"[]")) }), JSON)
        .await
        .unwrap();
    assert_eq!((again.tier, again.bytes.as_ref()), (CacheTier::HitL1, b"{}".as_ref()));
}
