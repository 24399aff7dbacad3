//! Redis failures, each on a `redis-server` the test owns (killed or frozen by PID): the API keeps
//! answering from memory and Postgres, with no 5xx and no request over 1 s, and picks Redis up
//! again when it returns. A control run with library-like timeouts shows the same fault hanging.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use reqwest::Method;
use serde_json::json;

use crate::helpers::partition::Partition;
use crate::helpers::{private_redis, TestApp, TestRedis, TestUser};

struct Sample {
    started: Duration,
    took: Duration,
    status: u16,
}

struct Load {
    samples: Mutex<Vec<Sample>>,
    origin: Instant,
}

/// Four workers reading a task list (one write in ten) until `stop` resolves; bounded by count.
async fn steady_load(
    app: &TestApp,
    user: &TestUser,
    project: &str,
    task: &str,
    stop: impl std::future::Future,
) -> Load {
    let load = Load {
        samples: Mutex::new(Vec::new()),
        origin: Instant::now(),
    };
    let done = std::sync::atomic::AtomicBool::new(false);
    let worker = |id: usize| {
        let (load, done) = (&load, &done);
        async move {
            let mut n = 0usize;
            while !done.load(std::sync::atomic::Ordering::Acquire) && n < 5_000 {
                n += 1;
                let started = Instant::now();
                let status = if (n + id).is_multiple_of(10) {
                    let body = json!({ "title": format!("write {id}-{n}") });
                    app.patch(&format!("/api/tasks/{task}"), &user.token, body).await.status
                } else {
                    app.get(&format!("/api/projects/{project}/tasks"), &user.token)
                        .await
                        .status
                };
                load.samples.lock().unwrap().push(Sample {
                    started: started - load.origin,
                    took: started.elapsed(),
                    status: status.as_u16(),
                });
            }
        }
    };
    let stopper = async {
        stop.await;
        done.store(true, std::sync::atomic::Ordering::Release);
    };
    tokio::join!(join_all((0..4).map(worker)), stopper);
    load
}

impl Load {
    fn assert_no_5xx_and_nothing_over_a_second(&self) {
        let samples = self.samples.lock().unwrap();
        assert!(samples.len() > 100, "only {} requests ran", samples.len());
        let server_errors = samples.iter().filter(|s| s.status >= 500).count();
        assert_eq!(
            server_errors,
            0,
            "{server_errors} of {} requests failed with 5xx",
            samples.len()
        );
        let slowest = samples.iter().map(|s| s.took).max().unwrap();
        assert!(slowest < Duration::from_secs(1), "slowest request took {slowest:?}");
    }

    /// p99 latency of requests started in [from, to) after the load began.
    fn p99_between(&self, from: Duration, to: Duration) -> (Duration, usize) {
        let samples = self.samples.lock().unwrap();
        let mut took: Vec<Duration> = samples
            .iter()
            .filter(|s| s.started >= from && s.started < to)
            .map(|s| s.took)
            .collect();
        assert!(took.len() >= 20, "only {} requests in the window", took.len());
        took.sort();
        (took[(took.len() * 99).div_ceil(100) - 1], took.len())
    }
}

async fn spawn_with_redis(redis: &TestRedis) -> TestApp {
    TestApp::builder().redis(redis).spawn().await
}

async fn world(app: &TestApp) -> (TestUser, String, String) {
    let (user, _, project) = app.user_with_project().await;
    let project = project["id"].as_str().unwrap().to_owned();
    let task = app.create_task(&user, &project, json!({ "title": "before" })).await;
    (user, project, task["id"].as_str().unwrap().to_owned())
}

/// Waits until /health shows the breaker closed and the subscriber connected: both are read live,
/// while its `status` comes from a PING reused for up to `PROBE_TTL`, which would be measured too.
async fn time_until_redis_is_used_again(app: &TestApp) -> Duration {
    let started = Instant::now();
    loop {
        let health = app.request(Method::GET, "/health", None, None).await;
        let redis = &health.body["details"]["redis"];
        if redis["breaker"] == "closed" && redis["subscriber"] == "connected" {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "Redis not used again: {}",
            health.text
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_redis_under_load_causes_no_errors_and_is_used_again_after_restart() {
    let redis = private_redis().await;
    let app = spawn_with_redis(&redis).await;
    let (user, project, task) = world(&app).await;
    let marks = Mutex::new((Duration::ZERO, Duration::ZERO));
    let origin = Instant::now();
    let faults = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        redis.kill();
        let killed = origin.elapsed();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        tokio::task::block_in_place(|| redis.restart());
        *marks.lock().unwrap() = (killed, origin.elapsed());
        let back = time_until_redis_is_used_again(&app).await;
        assert!(
            back <= Duration::from_secs(2),
            "Redis used again {back:?} after restart"
        );
    };
    let load = steady_load(&app, &user, &project, &task, faults).await;
    let (killed, restarted) = *marks.lock().unwrap();
    load.assert_no_5xx_and_nothing_over_a_second();
    let skew = load.origin.duration_since(origin.min(load.origin));
    let (p99, n) = load.p99_between(killed + Duration::from_millis(500) - skew, restarted - skew);
    assert!(
        p99 <= Duration::from_millis(100),
        "p99 {p99:?} over {n} requests while Redis was dead"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_under_load_causes_no_errors_and_is_used_again_after_sigcont() {
    let redis = private_redis().await;
    let app = spawn_with_redis(&redis).await;
    let (user, project, task) = world(&app).await;
    let marks = Mutex::new((Duration::ZERO, Duration::ZERO));
    let origin = Instant::now();
    let faults = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        redis.freeze();
        let frozen = origin.elapsed();
        tokio::time::sleep(Duration::from_millis(2500)).await;
        redis.thaw();
        *marks.lock().unwrap() = (frozen, origin.elapsed());
        let back = time_until_redis_is_used_again(&app).await;
        assert!(
            back <= Duration::from_secs(2),
            "Redis used again {back:?} after SIGCONT"
        );
    };
    let load = steady_load(&app, &user, &project, &task, faults).await;
    let (frozen, thawed) = *marks.lock().unwrap();
    load.assert_no_5xx_and_nothing_over_a_second();
    let skew = load.origin.duration_since(origin.min(load.origin));
    // The breaker opens after three timed-out commands; measure from a second in.
    let (p99, n) = load.p99_between(frozen + Duration::from_secs(1) - skew, thawed - skew);
    assert!(
        p99 <= Duration::from_millis(100),
        "p99 {p99:?} over {n} requests while Redis was frozen"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_made_while_redis_was_frozen_is_not_served_stale_by_any_instance_after() {
    let redis = private_redis().await;
    let a = spawn_with_redis(&redis).await;
    let b = TestApp::builder().sibling_of(&a).spawn().await;
    let (user, _, task) = world(&a).await;
    let path = format!("/api/tasks/{task}");
    // Both instances hold the old title (L2 and B's L1).
    assert_eq!(a.get(&path, &user.token).await.body["title"], "before");
    assert_eq!(b.get(&path, &user.token).await.body["title"], "before");
    b.read_until_l1_hit(&path, &user.token, "before the freeze").await;

    redis.freeze();
    let write = a.patch(&path, &user.token, json!({ "title": "during" })).await;
    write.assert_status(200);
    // B cannot learn about the write while Redis is frozen; it notices the outage itself.
    wait_for_subscriber(&b, "disconnected").await;
    redis.thaw();
    wait_for_subscriber(&b, "connected").await;

    let from_b = b.get(&path, &user.token).await;
    assert_eq!(
        from_b.body["title"],
        "during",
        "B served a stale task ({:?})",
        from_b.header("x-cache")
    );
    assert_eq!(a.get(&path, &user.token).await.body["title"], "during");
}

async fn wait_for_subscriber(app: &TestApp, state: &str) {
    let started = Instant::now();
    loop {
        let health = app.request(Method::GET, "/health", None, None).await;
        if health.body["details"]["redis"]["subscriber"] == state {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "subscriber never {state}: {}",
            health.text
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_absent_at_startup_does_not_delay_the_app_which_connects_when_it_appears() {
    let redis = private_redis().await;
    redis.kill();
    let started = Instant::now();
    let url = redis.url();
    let app = TestApp::builder().redis_url(url).spawn().await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "start-up took {:?}",
        started.elapsed()
    );
    let (user, project, _) = world(&app).await;
    for _ in 0..20 {
        app.get(&format!("/api/projects/{project}/tasks"), &user.token)
            .await
            .assert_status(200);
    }
    let health = app.request(Method::GET, "/health", None, None).await;
    health.assert_status(503);
    assert_eq!(health.body["error"]["redis"]["status"], "down", "{}", health.text);
    assert_eq!(health.body["error"]["redis"]["reason"], "refused", "{}", health.text);
    assert_eq!(health.body["details"]["cache"]["mode"], "degraded", "{}", health.text);
    app.request(Method::GET, "/health/ready", None, None)
        .await
        .assert_status(200);

    tokio::task::block_in_place(|| redis.restart());
    let connected = time_until_redis_is_used_again(&app).await;
    assert!(
        connected <= Duration::from_secs(2),
        "connected {connected:?} after Redis appeared"
    );
}

#[tokio::test]
async fn a_killed_subscriber_resubscribes_and_flushes_l1() {
    let redis = private_redis().await;
    let app = spawn_with_redis(&redis).await;
    let (user, _, task) = world(&app).await;
    let path = format!("/api/tasks/{task}");
    app.get(&path, &user.token).await;
    assert_eq!(app.get(&path, &user.token).await.header("x-cache"), Some("HIT-L1"));

    let mut admin = redis.connection().await;
    let killed: u64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut admin)
        .await
        .unwrap();
    // The cache's invalidation subscriber and the event relay's listener.
    assert_eq!(killed, 2);
    let started = Instant::now();
    loop {
        let read = app.get(&path, &user.token).await;
        if read.header("x-cache") != Some("HIT-L1") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "L1 was not flushed within 2 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let resubscribed = time_until_redis_is_used_again(&app).await + started.elapsed();
    assert!(
        resubscribed <= Duration::from_secs(2),
        "resubscribed after {resubscribed:?}"
    );
}

/// The control: with a command timeout like a client without one (and a breaker that never opens),
/// a frozen Redis hangs requests, which is what the tests above would catch without the mitigation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_timeouts_and_breaker_a_frozen_redis_hangs_requests() {
    let redis = private_redis().await;
    let url = redis.url();
    let app = TestApp::builder()
        .redis_url(url)
        .settings(move |s| {
            s.redis.command_timeout = Duration::from_secs(30);
            s.redis.pool_timeout = Duration::from_secs(30);
            s.redis.breaker_threshold = u32::MAX;
        })
        .spawn()
        .await;
    let (user, project, _) = world(&app).await;
    redis.freeze();
    let path = format!("/api/projects/{project}/tasks?limit=7");
    let read = app.get(&path, &user.token);
    let hung = tokio::time::timeout(Duration::from_millis(1500), read).await;
    assert!(hung.is_err(), "the request should still be waiting on the frozen Redis");
    redis.thaw();
}

/// Instances A and B share a Redis. Redis freezes, so B can hear no invalidation; B notices,
/// flushes its L1, and refills it with the user's session from Postgres. Then the user logs out
/// on A. Returns how long after the logout B first answered 401, or `None` if it still served
/// the token after `give_up`.
async fn logout_on_one_instance_while_redis_is_frozen(unsynced_ttl: Duration, give_up: Duration) -> Option<Duration> {
    let redis = private_redis().await;
    let a = TestApp::builder()
        .redis(&redis)
        .settings(move |s| s.cache.l1_unsynced_ttl = unsynced_ttl)
        .spawn()
        .await;
    let b = TestApp::builder().sibling_of(&a).spawn().await;
    let user = a.register_user().await;
    b.get("/api/users/me", &user.token).await.assert_status(200);

    redis.freeze();
    b.wait_for_lost_subscription().await;
    b.get("/api/users/me", &user.token).await.assert_status(200);
    let logout = a
        .request(Method::POST, "/api/auth/logout", Some(&user.token), None)
        .await;
    logout.assert_status(204);
    let answer = b.refused_after(&user.token, give_up).await;
    redis.thaw();
    answer
}

#[tokio::test]
async fn a_token_logged_out_while_redis_is_frozen_stops_working_on_the_other_instance_within_the_bound() {
    let bound = Duration::from_secs(1);
    let took = logout_on_one_instance_while_redis_is_frozen(bound, Duration::from_secs(10))
        .await
        .expect("B stopped serving the logged-out token");
    // The bound, plus one Redis command timeout for B's own (failing) L2 read, plus slack.
    assert!(took <= bound + Duration::from_secs(1), "B answered 401 after {took:?}");
}

/// The control: with the bound as long as the L1 TTL, B keeps serving the logged-out token.
#[tokio::test]
async fn without_the_unsynced_bound_the_other_instance_serves_a_logged_out_token_on() {
    let took = logout_on_one_instance_while_redis_is_frozen(Duration::from_secs(60), Duration::from_secs(3)).await;
    assert_eq!(took, None, "B refused the token although nothing told it to");
}

const ADMIN: &str = "test-admin-token";

/// Instance A reaches the shared Redis through a link the test can cut; instance B directly.
/// Returns (A, B, the link, a user, their project).
async fn a_behind_a_link_and_b_direct(
    tweak: impl FnOnce(&mut nestling::config::Settings) + 'static,
) -> (TestApp, TestApp, Partition, TestUser, String) {
    let redis = crate::helpers::shared_redis();
    let link = Partition::new(format!("127.0.0.1:{}", redis.port)).await;
    let through_link = format!("redis://127.0.0.1:{}", link.port);
    let a = TestApp::builder()
        .redis(redis)
        .settings(move |s| {
            s.redis.url = through_link;
            s.app.admin_token = Some(ADMIN.into());
            tweak(s);
        })
        .spawn()
        .await;
    let direct = redis.url();
    let b = TestApp::builder()
        .sibling_of(&a)
        .settings(move |s| s.redis.url = direct)
        .spawn()
        .await;
    let (user, _, project) = a.user_with_project().await;
    let project = project["id"].as_str().unwrap().to_owned();
    (a, b, link, user, project)
}

async fn pending_invalidations(app: &TestApp) -> u64 {
    let stats = app.request(Method::GET, "/admin/cache/stats", Some(ADMIN), None).await;
    stats.body["pendingInvalidations"]
        .as_u64()
        .expect("pendingInvalidations")
}

/// Cuts A off, renames every task on A, heals, and checks that B (which cached every task in L1
/// and L2 before) serves every new title within a second of A's queue emptying.
async fn writes_made_while_cut_off_reach_the_other_instance(tasks: usize, max_pending: usize) {
    let (a, b, link, user, project) = a_behind_a_link_and_b_direct(move |s| {
        s.cache.max_pending_invalidations = max_pending;
    })
    .await;
    let mut ids = Vec::new();
    for n in 0..tasks {
        let task = a
            .create_task(&user, &project, json!({ "title": format!("task {n}") }))
            .await;
        ids.push(task["id"].as_str().unwrap().to_owned());
    }
    for id in &ids {
        b.get(&format!("/api/tasks/{id}"), &user.token).await.assert_status(200);
    }

    link.cut();
    for (n, id) in ids.iter().enumerate() {
        let renamed = a
            .patch(
                &format!("/api/tasks/{id}"),
                &user.token,
                json!({ "title": format!("renamed {n}") }),
            )
            .await;
        renamed.assert_status(200);
    }
    let queued = pending_invalidations(&a).await;
    assert!(
        queued <= max_pending as u64,
        "{queued} invalidations queued with a cap of {max_pending}"
    );

    link.heal();
    let started = Instant::now();
    while pending_invalidations(&a).await > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "A's queue was never replayed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let replayed = Instant::now();
    for (n, id) in ids.iter().enumerate() {
        loop {
            let task = b.get(&format!("/api/tasks/{id}"), &user.token).await;
            if task.body["title"] == format!("renamed {n}") {
                break;
            }
            assert!(
                replayed.elapsed() < Duration::from_secs(1),
                "B still serves {}",
                task.text
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[tokio::test]
async fn invalidations_queued_past_the_cap_flush_their_namespaces_when_redis_answers_again() {
    writes_made_while_cut_off_reach_the_other_instance(10, 8).await;
}

#[tokio::test]
async fn a_queue_of_several_batches_is_replayed_whole() {
    writes_made_while_cut_off_reach_the_other_instance(150, 10_000).await;
}
