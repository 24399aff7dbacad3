//! What ordinary requests may make the cache hold: L1 is capped in bytes, grouped Redis hashes
//! in variants, and misses (a random workspace id, a random token) are remembered only briefly
//! and in a bounded number.

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{shared_redis, TestApp, World};

const ADMIN: &str = "test-admin-token";

async fn cache_stats(app: &TestApp) -> Value {
    let response = app.request(Method::GET, "/admin/cache/stats", Some(ADMIN), None).await;
    response.assert_status(200);
    response.body
}

fn l1_bytes(stats: &Value) -> u64 {
    stats["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|ns| ns["l1Bytes"].as_u64().unwrap())
        .sum()
}

#[tokio::test]
async fn l1_keeps_no_more_bytes_than_cache_l1_max_bytes_however_large_the_entries() {
    const CAP: u64 = 1 << 20;
    let app = TestApp::builder()
        .settings(|s| {
            s.app.admin_token = Some(ADMIN.into());
            s.cache.l1_max_bytes = CAP;
        })
        .spawn()
        .await;
    let world = World::create(&app).await;
    let long = "x".repeat(10_000);
    for n in 0..30 {
        app.create_task(
            &world.user,
            &world.project,
            json!({ "title": format!("t{n}"), "description": long }),
        )
        .await;
    }
    // Twenty pages of up to 30 long tasks: about 4 MB of distinct entries.
    for offset in 0..20 {
        let page = app
            .get(
                &world.fill(&format!("/api/projects/{{project}}/tasks?limit=30&offset={offset}")),
                &world.user.token,
            )
            .await;
        page.assert_status(200);
        assert!(page.text.len() > (30 - offset) * 10_000, "a page of long tasks");
    }
    let held = l1_bytes(&cache_stats(&app).await);
    assert!(held <= CAP, "L1 holds {held} bytes with a cap of {CAP}");
    assert!(held > CAP / 4, "L1 still caches within its cap (holds {held} bytes)");
}

#[tokio::test]
async fn a_grouped_redis_hash_caches_at_most_cache_max_variants_per_owner() {
    use nestling::infra::redis::keys::KeyRegistry;
    use redis::AsyncCommands;

    let redis = shared_redis();
    let app = TestApp::builder().redis(redis).spawn().await;
    let world = World::create(&app).await;
    let max = app.settings.cache.max_variants;
    let today = chrono::Utc::now().date_naive();
    // Distinct `from` dates: each is a variant of the workspace's one metrics hash.
    for days_back in 0..(max as i64 + 16) {
        let from = today - chrono::Duration::days(days_back);
        let path = format!(
            "/api/workspaces/{}/metrics/daily?from={from}&to={today}",
            world.workspace
        );
        app.get(&path, &world.user.token).await.assert_status(200);
    }
    let registry = KeyRegistry::new(app.settings.redis.key_prefix.clone(), app.settings.ttl.clone());
    let hash = registry.all_daily_metrics(world.workspace.parse().unwrap());
    let fields: u64 = redis.connection().await.hlen(hash.redis_key()).await.unwrap();
    assert_eq!(fields, max as u64, "variants cached in {}", hash.redis_key());
    // A variant beyond the cap is still answered, from Postgres.
    let from = today - chrono::Duration::days(max as i64 + 20);
    let path = format!(
        "/api/workspaces/{}/metrics/daily?from={from}&to={today}",
        world.workspace
    );
    let beyond = app.get(&path, &world.user.token).await;
    beyond.assert_status(200);
}
