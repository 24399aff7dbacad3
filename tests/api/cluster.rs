//! The cache and the rate limiter on a Redis Cluster: three masters and three replicas the
//! harness starts (`helpers::cluster`). The same suites as on one server, then what only a
//! cluster has: keys spread over every master, a flush on every master, and a master killed
//! under load while its replica takes over.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use reqwest::Method;
use serde_json::json;

use crate::cache::{
    a_member_removed_on_one_instance_loses_the_task_list_on_every_instance_on,
    a_second_instance_reads_from_redis_and_sees_the_first_instances_writes_on,
    every_entity_is_cached_and_fresh_after_writes_on, every_entity_read_on_b_is_fresh_after_a_write_on_a,
    logout_on_one_instance_revokes_the_token_on_every_instance_on,
    switching_redis_off_and_on_quickly_serves_from_l2_again_within_2_s_on,
    the_runtime_switch_flips_a_live_instance_both_ways_without_failed_requests_on,
};
use crate::helpers::{private_cluster, Backend, TestApp, World};
use crate::rate_limit::{
    a_new_x_forwarded_for_per_request_does_not_reset_the_limit_unless_a_proxy_is_trusted_on,
    a_route_with_several_quotas_lists_them_all_and_the_tightest_answers_on,
    a_thousand_concurrent_logins_let_exactly_5_through,
    limited_responses_carry_the_headers_and_retry_after_is_honoured_on,
    the_rate_limit_policy_endpoint_shows_every_policy_in_force_on,
};

const ADMIN: &str = "cluster-admin";

fn per_hour(limit: u64) -> Vec<nestling::config::Quota> {
    vec![nestling::config::Quota {
        limit,
        period: Duration::from_secs(3600),
    }]
}

#[tokio::test]
async fn on_a_cluster_every_entity_is_cached_and_fresh_after_writes() {
    every_entity_is_cached_and_fresh_after_writes_on(Backend::cluster().await).await;
}

#[tokio::test]
async fn on_a_cluster_every_entity_read_on_b_is_fresh_after_a_write_on_a_subscribed_on_another_node() {
    every_entity_read_on_b_is_fresh_after_a_write_on_a(Backend::cluster().await).await;
}

#[tokio::test]
async fn on_a_cluster_logout_on_one_instance_revokes_the_token_on_every_instance() {
    logout_on_one_instance_revokes_the_token_on_every_instance_on(Backend::cluster().await).await;
}

#[tokio::test]
async fn on_a_cluster_a_member_removed_on_one_instance_loses_the_task_list_on_every_instance() {
    a_member_removed_on_one_instance_loses_the_task_list_on_every_instance_on(Backend::cluster().await).await;
}

#[tokio::test]
async fn on_a_cluster_a_second_instance_reads_from_redis_and_sees_the_first_instances_writes() {
    a_second_instance_reads_from_redis_and_sees_the_first_instances_writes_on(Backend::cluster().await).await;
}

#[tokio::test]
async fn on_a_cluster_the_runtime_switch_flips_a_live_instance_both_ways_without_failed_requests() {
    the_runtime_switch_flips_a_live_instance_both_ways_without_failed_requests_on(Backend::cluster().await).await;
}

#[tokio::test]
async fn on_a_cluster_switching_redis_off_and_on_quickly_serves_from_l2_again_within_2_s() {
    switching_redis_off_and_on_quickly_serves_from_l2_again_within_2_s_on(Backend::cluster().await).await;
}

#[tokio::test]
async fn on_a_cluster_a_new_x_forwarded_for_per_request_does_not_reset_the_limit_unless_a_proxy_is_trusted() {
    a_new_x_forwarded_for_per_request_does_not_reset_the_limit_unless_a_proxy_is_trusted_on(Backend::cluster().await)
        .await;
}

#[tokio::test]
async fn on_a_cluster_the_rate_limit_policy_endpoint_shows_every_policy_in_force() {
    the_rate_limit_policy_endpoint_shows_every_policy_in_force_on(Backend::cluster().await).await;
}

#[tokio::test]
async fn on_a_cluster_a_thousand_concurrent_logins_against_an_ip_limit_of_5_let_exactly_5_through() {
    a_thousand_concurrent_logins_let_exactly_5_through(Backend::cluster().await, |s| {
        s.rate_limit.auth_ip = per_hour(5)
    })
    .await;
}

#[tokio::test]
async fn on_a_cluster_a_thousand_concurrent_logins_against_an_email_limit_of_5_let_exactly_5_through() {
    // The email policy is decided by a second script call (another slot than the IP's).
    a_thousand_concurrent_logins_let_exactly_5_through(Backend::cluster().await, |s| {
        s.rate_limit.auth_email = per_hour(5)
    })
    .await;
}

#[tokio::test]
async fn on_a_cluster_limited_responses_carry_the_headers_and_retry_after_is_honoured() {
    limited_responses_carry_the_headers_and_retry_after_is_honoured_on(Backend::cluster().await).await;
}

#[tokio::test]
async fn on_a_cluster_a_route_with_several_quotas_lists_them_all_and_the_tightest_answers() {
    a_route_with_several_quotas_lists_them_all_and_the_tightest_answers_on(Backend::cluster().await).await;
}

#[tokio::test]
async fn on_a_cluster_entries_spread_over_every_master_and_a_second_instance_reads_them_from_l2() {
    let Backend::Cluster(cluster) = Backend::cluster().await else {
        unreachable!()
    };
    let backend = Backend::Cluster(cluster);
    let a = TestApp::builder().backend(backend).spawn().await;
    let b = backend.sibling(&a).await;
    let (user, _, project) = a.user_with_project().await;
    let project = project["id"].as_str().unwrap().to_owned();
    let mut paths = Vec::new();
    for n in 0..30 {
        let task = a
            .create_task(&user, &project, json!({ "title": format!("t{n}") }))
            .await;
        paths.push(format!("/api/tasks/{}", task["id"].as_str().unwrap()));
    }
    for path in &paths {
        a.get(path, &user.token).await.assert_status(200);
    }
    for path in &paths {
        let read = b.get(path, &user.token).await;
        assert_eq!(read.header("x-cache"), Some("HIT-L2"), "{path}: {}", read.text);
    }
    let prefix = a.settings.redis.key_prefix.clone();
    let mut connection = cluster.connection().await;
    let mut masters_holding = std::collections::HashSet::new();
    for path in &paths {
        let id = path.rsplit('/').next().unwrap();
        let key = format!("{prefix}tasks:{{{id}}}");
        let exists: bool = connection.exists(&key).await.unwrap();
        assert!(exists, "{key} is in Redis");
        masters_holding.insert(cluster.master_of(&key));
    }
    assert_eq!(
        masters_holding.len(),
        3,
        "30 tasks on {} of 3 masters",
        masters_holding.len()
    );
}

#[tokio::test]
async fn on_a_cluster_flushing_a_namespace_deletes_its_keys_on_every_master() {
    let Backend::Cluster(cluster) = Backend::cluster().await else {
        unreachable!()
    };
    let app = TestApp::builder()
        .cluster(cluster)
        .settings(|s| s.app.admin_token = Some(ADMIN.into()))
        .spawn()
        .await;
    let prefix = app.settings.redis.key_prefix.clone();
    let mut connection = cluster.connection().await;
    for n in 0..300 {
        let _: () = connection
            .set(format!("{prefix}tasks:{{bulk-{n}}}"), "{}")
            .await
            .unwrap();
    }
    let survivor = format!("{prefix}projects:{{survivor}}");
    let _: () = connection.set(&survivor, "{}").await.unwrap();
    let flushed = app
        .request(Method::DELETE, "/admin/cache?namespace=tasks", Some(ADMIN), None)
        .await;
    flushed.assert_status(200);
    assert_eq!(flushed.body["deleted"], 300, "{}", flushed.text);
    let left: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}tasks:*"))
        .query_async(&mut connection)
        .await
        .unwrap();
    assert!(left.is_empty(), "left behind: {left:?}");
    let kept: bool = connection.exists(&survivor).await.unwrap();
    assert!(kept, "other namespaces are untouched");
    let distribution = app.request(Method::GET, "/admin/redis/keys", Some(ADMIN), None).await;
    distribution.assert_status(200);
    assert_eq!(distribution.body["complete"], true, "{}", distribution.text);
}

#[tokio::test]
async fn on_a_cluster_redis_check_passes_and_health_and_the_admin_endpoints_answer() {
    let Backend::Cluster(cluster) = Backend::cluster().await else {
        unreachable!()
    };
    let (code, stdout, took) =
        crate::cli::redis_check_with("REDIS_CLUSTER_NODES", &cluster.nodes_from(0).join(",")).await;
    assert_eq!(code, Some(0), "{stdout}");
    for line in ["ok   ping", "(cluster)", "ok   round trip"] {
        assert!(stdout.contains(line), "no {line:?} in:\n{stdout}");
    }
    assert!(took < Duration::from_secs(5), "{took:?}");

    let app = TestApp::builder()
        .cluster(cluster)
        .settings(|s| s.app.admin_token = Some(ADMIN.into()))
        .spawn()
        .await;
    let health = app.request(Method::GET, "/health", None, None).await;
    health.assert_status(200);
    assert_eq!(health.body["details"]["redis"]["status"], "up", "{}", health.text);
    assert_eq!(health.body["details"]["cache"]["mode"], "redis", "{}", health.text);
    let metrics = app
        .request(Method::GET, "/admin/redis/metrics", Some(ADMIN), None)
        .await;
    metrics.assert_status(200);
    assert!(
        metrics.body["usedMemoryBytes"].as_u64().unwrap() > 0,
        "{}",
        metrics.text
    );
    let exported = app.request(Method::GET, "/metrics", None, None).await;
    assert!(exported.text.contains("nestling_redis_up 1"), "{}", exported.text);
}

#[tokio::test]
async fn a_master_killed_under_load_fails_no_request_and_its_promoted_replica_serves_l2_and_limits_again() {
    let run = kill_a_master_under_load(|_| {}).await;
    assert_eq!(run.failed, 0, "failed reads during the failover");
    assert!(run.reads > 20, "{} reads", run.reads);
    assert!(
        run.slowest_ms < 1000,
        "a read waited {} ms on the failover",
        run.slowest_ms
    );

    // The rate limits are decided in Redis again: 3 an hour per email, then 429.
    let app = &run.app;
    let email = format!("failover-{}@example.com", uuid::Uuid::new_v4().simple());
    let login = || {
        app.request(
            Method::POST,
            "/api/auth/login",
            None,
            Some(json!({ "email": email, "password": "wrong password" })),
        )
    };
    for _ in 0..3 {
        login().await.assert_status(401);
    }
    login().await.assert_error(429, "rate_limited");
    let policy = app.get("/api/rate-limit/policy", &run.token).await;
    assert_eq!(policy.body["mode"], "redis", "{}", policy.text);
}

#[tokio::test]
async fn without_short_redis_timeouts_a_read_waits_seconds_on_a_failover() {
    // The control: the same failover with 30 s waits (what bb8 and an unbounded client give).
    let run = kill_a_master_under_load(|s| {
        s.redis.command_timeout = Duration::from_secs(30);
        s.redis.pool_timeout = Duration::from_secs(30);
    })
    .await;
    assert!(run.slowest_ms >= 1000, "the slowest read took {} ms", run.slowest_ms);
}

struct FailoverRun {
    app: TestApp,
    token: String,
    failed: u64,
    reads: u64,
    slowest_ms: u64,
    /// Keeps the cluster up while the test looks at the app.
    _cluster: crate::helpers::TestCluster,
}

/// Reads a task in a loop (L1 off: every read asks Redis) while the master of its slot is
/// killed, a write lands during the failover, and the replica takes over; returns once L2 serves
/// the written title again.
async fn kill_a_master_under_load(tweak: impl FnOnce(&mut nestling::config::Settings) + 'static) -> FailoverRun {
    let cluster = private_cluster().await;
    let app = TestApp::builder()
        .cluster(&cluster)
        .settings(|s| {
            s.cache.l1_enabled = false;
            s.rate_limit.auth_email = per_hour(3);
            tweak(s);
        })
        .spawn()
        .await;
    let world = World::create(&app).await;
    let token = world.user.token.clone();
    let path = world.fill("/api/tasks/{task}");
    app.get(&path, &token).await.assert_status(200);
    assert_eq!(app.get(&path, &token).await.header("x-cache"), Some("HIT-L2"));
    let key = format!("{}tasks:{{{}}}", app.settings.redis.key_prefix, world.task);
    let doomed = cluster.master_of(&key);

    let stop = AtomicBool::new(false);
    let (failed, slowest_ms, reads) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let load = async {
        while !stop.load(Ordering::Acquire) {
            let started = Instant::now();
            let read = app.get(&path, &token).await;
            slowest_ms.fetch_max(started.elapsed().as_millis() as u64, Ordering::Relaxed);
            reads.fetch_add(1, Ordering::Relaxed);
            if read.status != 200 {
                failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    };
    let failover = async {
        cluster.kill(doomed);
        // A write while the slot has no master: its invalidation waits in the queue.
        app.patch(&path, &token, json!({ "title": "written during the failover" }))
            .await
            .assert_status(200);
        cluster.healed(3).await;
        assert_ne!(cluster.master_of(&key), doomed, "the replica took over the slot");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let read = app.get(&path, &token).await;
            read.assert_status(200);
            assert_eq!(read.body["title"], "written during the failover", "{}", read.text);
            if read.header("x-cache") == Some("HIT-L2") {
                break;
            }
            assert!(Instant::now() < deadline, "L2 does not serve again: {:?}", read.headers);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop.store(true, Ordering::Release);
    };
    tokio::join!(load, failover);
    FailoverRun {
        failed: failed.into_inner(),
        reads: reads.into_inner(),
        slowest_ms: slowest_ms.into_inner(),
        app,
        token,
        _cluster: cluster,
    }
}
