//! What ordinary requests may make the cache hold: L1 is capped in bytes, grouped Redis hashes
//! in variants, and misses (a random workspace id, a random token) are remembered only briefly
//! and in a bounded number.

use futures_util::StreamExt;
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

fn namespace<'a>(stats: &'a Value, name: &str) -> &'a Value {
    stats["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|ns| ns["namespace"] == name)
        .unwrap()
}

/// Keys under the test's prefix in one namespace, by SCAN (the test's own prefix only).
async fn redis_keys(app: &TestApp, namespace: &str) -> usize {
    use redis::AsyncCommands;
    let mut connection = shared_redis().connection().await;
    let pattern = format!("{}{namespace}:*", app.settings.redis.key_prefix);
    let keys: redis::AsyncIter<String> = connection.scan_match(pattern).await.unwrap();
    let keys: Vec<_> = keys.collect().await;
    keys.len()
}

fn with_small_negative_cache(s: &mut nestling::config::Settings) {
    s.app.admin_token = Some(ADMIN.into());
    s.cache.negative_max_entries = 50;
}

#[tokio::test]
async fn random_workspace_ids_leave_a_bounded_trace_in_process_and_none_in_redis() {
    let app = TestApp::builder()
        .redis(shared_redis())
        .settings(with_small_negative_cache)
        .spawn()
        .await;
    let user = app.register_user().await;
    for _ in 0..200 {
        let path = format!("/api/workspaces/{}", uuid::Uuid::new_v4());
        app.get(&path, &user.token)
            .await
            .assert_error(404, "workspace_not_found");
    }
    let stats = cache_stats(&app).await;
    assert_eq!(namespace(&stats, "members")["l1Entries"], 0, "{stats}");
    assert_eq!(redis_keys(&app, "members").await, 0, "member hashes in Redis");
    let remembered = stats["negativeEntries"].as_u64().unwrap();
    assert!(remembered <= 50, "{remembered} misses remembered with a cap of 50");
}

#[tokio::test]
async fn a_random_token_costs_one_postgres_lookup_while_it_is_remembered() {
    let app = TestApp::builder().settings(with_small_negative_cache).spawn().await;
    let token = "ab".repeat(32);
    for _ in 0..5 {
        app.get("/api/users/me", &token)
            .await
            .assert_error(401, "invalid_token");
    }
    let stats = cache_stats(&app).await;
    let tokens = namespace(&stats, "auth-tokens");
    assert_eq!(
        (tokens["misses"].as_u64(), tokens["hitsL1"].as_u64()),
        (Some(1), Some(4)),
        "{tokens}"
    );

    for _ in 0..200 {
        let random = format!("{:064x}", rand::random::<u128>());
        app.get("/api/users/me", &random)
            .await
            .assert_error(401, "invalid_token");
    }
    let remembered = cache_stats(&app).await["negativeEntries"].as_u64().unwrap();
    assert!(remembered <= 50, "{remembered} misses remembered with a cap of 50");
}

#[tokio::test]
async fn a_user_added_to_a_workspace_they_were_refused_sees_it_at_once_on_every_instance() {
    let a = TestApp::builder().redis(shared_redis()).spawn().await;
    let b = TestApp::builder().sibling_of(&a).spawn().await;
    let owner = a.register_user().await;
    let user = a.register_user().await;
    let workspace = a.create_workspace(&owner).await;
    let path = format!("/api/workspaces/{}", workspace["id"].as_str().unwrap());
    for app in [&a, &b] {
        app.get(&path, &user.token)
            .await
            .assert_error(404, "workspace_not_found");
    }
    a.add_member(&owner, workspace["id"].as_str().unwrap(), &user).await;
    a.get(&path, &user.token).await.assert_status(200);
    // B hears of it through pub/sub: within a second.
    let started = std::time::Instant::now();
    while b.get(&path, &user.token).await.status != 200 {
        assert!(started.elapsed() < std::time::Duration::from_secs(1), "B still refuses");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
