//! A fleet where some instances cache in Redis and some do not (a gradual rollout, a rollback):
//! every instance serves another's write within 1 s, whatever the mix of modes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{shared_redis, TestApp, World};

const ADMIN: &str = "rollout-admin";
/// How long another instance may serve what a write replaced.
const BOUND: Duration = Duration::from_secs(1);

/// A fleet of two on the shared Redis: `a` with Redis caching `a_redis`, `b` with `b_redis`, both
/// with `REDIS_URL` set (so a memory-mode instance is "memory-synced").
async fn fleet(a_redis: bool, b_redis: bool) -> (TestApp, TestApp) {
    let redis = tokio::task::spawn_blocking(shared_redis).await.unwrap();
    let a = TestApp::builder()
        .redis(redis)
        .settings(move |s| {
            s.app.admin_token = Some(ADMIN.into());
            s.redis.enabled = a_redis;
        })
        .spawn()
        .await;
    let b = TestApp::builder()
        .sibling_of(&a)
        .settings(move |s| s.redis.enabled = b_redis)
        .spawn()
        .await;
    a.wait_for_subscription().await;
    b.wait_for_subscription().await;
    (a, b)
}

async fn cache_mode(app: &TestApp) -> Value {
    let health = app.request(Method::GET, "/health", None, None).await;
    health.body["details"]["cache"]["mode"].clone()
}

/// Reads `path` on `reader` until it shows `expected` at `/title`; fails past `BOUND`.
async fn until_title(reader: &TestApp, path: &str, token: &str, expected: &str) {
    let started = Instant::now();
    loop {
        let seen = reader.get(path, token).await;
        seen.assert_status(200);
        if seen.body["title"] == expected {
            return;
        }
        assert!(
            started.elapsed() <= BOUND,
            "still served past {BOUND:?} after the write: {}",
            seen.text
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `reader` holds the task in L1, `writer` changes it: the reader serves the change within 1 s.
async fn write_on_one_read_on_the_other(writer: &TestApp, reader: &TestApp, world: &World, title: &str) {
    let token = &world.user.token;
    let path = world.fill("/api/tasks/{task}");
    reader.get(&path, token).await.assert_status(200);
    assert_eq!(reader.get(&path, token).await.header("x-cache"), Some("HIT-L1"));
    writer
        .patch(&path, token, json!({ "title": title }))
        .await
        .assert_status(200);
    until_title(reader, &path, token, title).await;
}

#[tokio::test]
async fn a_memory_synced_instance_and_a_redis_instance_serve_each_others_writes_within_1_s() {
    let (memory, redis) = fleet(false, true).await;
    assert_eq!(cache_mode(&memory).await, "memory-synced");
    assert_eq!(cache_mode(&redis).await, "redis");
    let world = World::create(&memory).await;
    write_on_one_read_on_the_other(&memory, &redis, &world, "written in memory mode").await;
    write_on_one_read_on_the_other(&redis, &memory, &world, "written in redis mode").await;
}

#[tokio::test]
async fn without_redis_url_memory_mode_is_strict_and_another_instance_keeps_serving_what_it_replaced() {
    // The control: a memory-mode instance with no Redis configured hears nothing and tells
    // nobody, so a mixed fleet serves stale data (this is why the rollout needs REDIS_URL set).
    let (redis, _) = fleet(true, true).await;
    let strict = TestApp::builder()
        .sibling_of(&redis)
        .settings(|s| {
            s.redis.enabled = false;
            s.redis.fleet_sync = false;
        })
        .spawn()
        .await;
    assert_eq!(cache_mode(&strict).await, "memory");
    let world = World::create(&strict).await;
    let token = &world.user.token;
    let path = world.fill("/api/tasks/{task}");
    redis.get(&path, token).await.assert_status(200);
    strict
        .patch(&path, token, json!({ "title": "unseen" }))
        .await
        .assert_status(200);
    tokio::time::sleep(BOUND + Duration::from_millis(500)).await;
    let seen = redis.get(&path, token).await;
    assert_eq!(seen.body["title"], "original", "{}", seen.text);
}

async fn switch(app: &TestApp, body: Value) -> crate::helpers::TestResponse {
    let response = app
        .request(Method::POST, "/admin/cache/mode", Some(ADMIN), Some(body))
        .await;
    response.assert_status(200);
    response
}

/// One write per task at a time, each a higher version than the last.
struct Written {
    version: AtomicU64,
    /// (version, when its write was answered)
    log: Mutex<Vec<(u64, Instant)>>,
}

impl Written {
    /// The highest version whose write was answered before `at`.
    fn answered_before(&self, at: Instant) -> u64 {
        let log = self.log.lock().unwrap();
        log.iter()
            .filter(|(_, when)| *when < at)
            .map(|(v, _)| *v)
            .max()
            .unwrap_or(0)
    }
}

#[tokio::test]
async fn a_gradual_rollout_and_a_fleet_wide_rollback_under_load_fail_no_request_and_serve_nothing_stale_past_1_s() {
    let (a, b) = fleet(false, false).await;
    // One task written only through A, one only through B; both read on both instances, so
    // each instance must hear the other's writes (its own drop its L1 copy anyway).
    let mut tasks = Vec::new();
    for (name, writer) in [("a", &a), ("b", &b)] {
        let world = World::create(writer).await;
        let path = world.fill("/api/tasks/{task}");
        writer
            .patch(&path, &world.user.token, json!({ "title": "v0" }))
            .await
            .assert_status(200);
        let written = Arc::new(Written {
            version: AtomicU64::new(0),
            log: Mutex::new(vec![(0, Instant::now())]),
        });
        tasks.push((name, writer, path, world.user.token.clone(), written));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let stale = Arc::new(Mutex::new(Vec::<String>::new()));
    let reads = Arc::new(AtomicU64::new(0));

    let writers = futures_util::future::join_all(tasks.iter().map(|(_, app, path, token, written)| {
        let (stop, failures) = (stop.clone(), failures.clone());
        async move {
            while !stop.load(Ordering::Acquire) {
                let version = written.version.load(Ordering::Acquire) + 1;
                let response = app.patch(path, token, json!({ "title": format!("v{version}") })).await;
                if response.status != 200 {
                    failures.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                written.version.store(version, Ordering::Release);
                written.log.lock().unwrap().push((version, Instant::now()));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }));
    let readers =
        futures_util::future::join_all([("a", &a), ("b", &b), ("a", &a), ("b", &b)].map(|(name, instance)| {
            let (tasks, stop, failures, stale, reads) = (&tasks, &stop, &failures, &stale, &reads);
            async move {
                while !stop.load(Ordering::Acquire) {
                    for (writer, _, path, token, written) in tasks {
                        let started = Instant::now();
                        let response = instance.get(path, token).await;
                        reads.fetch_add(1, Ordering::Relaxed);
                        if response.status != 200 {
                            failures.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        let title = response.body["title"].as_str().unwrap_or_default();
                        let served: u64 = title.trim_start_matches('v').parse().unwrap_or(0);
                        // Every write answered more than BOUND before this read began must show.
                        let due = written.answered_before(started - BOUND);
                        if served < due {
                            stale.lock().unwrap().push(format!(
                                "{name} served v{served} of {writer}'s task while v{due} was due ({:?})",
                                response.header("x-cache")
                            ));
                        }
                    }
                }
            }
        }));
    let steps = async {
        let phase = Duration::from_millis(1500);
        tokio::time::sleep(phase).await;
        // Phase 3's rollout: instance by instance.
        switch(&a, json!({ "redis": true })).await;
        assert_eq!(cache_mode(&a).await, "redis");
        assert_eq!(cache_mode(&b).await, "memory-synced");
        tokio::time::sleep(phase).await;
        switch(&b, json!({ "redis": true })).await;
        assert_eq!(cache_mode(&b).await, "redis");
        tokio::time::sleep(phase).await;
        // Phase 4: one call rolls back the whole fleet.
        let rollback = switch(&a, json!({ "redis": false, "scope": "fleet" })).await;
        assert_eq!(rollback.body["instancesReached"], 2, "{}", rollback.text);
        for app in [&a, &b] {
            let deadline = Instant::now() + BOUND;
            while cache_mode(app).await != "memory-synced" {
                assert!(Instant::now() < deadline, "not rolled back within {BOUND:?}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        tokio::time::sleep(phase).await;
        stop.store(true, Ordering::Release);
    };
    tokio::join!(steps, writers, readers);

    let stale = stale.lock().unwrap();
    assert_eq!(failures.load(Ordering::Relaxed), 0, "failed requests");
    assert!(
        stale.is_empty(),
        "{} stale reads, e.g. {:?}",
        stale.len(),
        &stale[..stale.len().min(5)]
    );
    let writes: u64 = tasks.iter().map(|task| task.4.version.load(Ordering::Relaxed)).sum();
    let reads = reads.load(Ordering::Relaxed);
    assert!(
        writes > 50 && reads > 200,
        "too little load to tell: {writes} writes, {reads} reads"
    );
}
