//! The Redis module as a component: TLS with a private CA (made by openssl at test time) against
//! `redis-server --tls-port`, a wrong CA and a wrong password reported by `/health` as `down` with
//! their reason, a least-privilege ACL user running the cache and the limiter, and the typed
//! surface application code injects.

use std::sync::Arc;
use std::time::Duration;

use nestling::infra::redis::keys::KeyRegistry;
use nestling::infra::redis::{RedisFailure, RedisModule, RedisService, ACL_COMMANDS};
use nestling::infra::telemetry::Telemetry;
use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::redis::{make_test_ca, private_redis_with, RedisOptions};
use crate::helpers::{shared_cluster, test_settings, TestApp, TestRedis, World};

async fn health(app: &TestApp) -> Value {
    app.request(Method::GET, "/health", None, None).await.body
}

/// Reads a task twice on `a` and once on a second instance: MISS, HIT-L1, then HIT-L2 on `b`.
async fn assert_cached_through_redis(a: &TestApp) {
    let world = World::create(a).await;
    let path = world.fill("/api/tasks/{task}");
    let first = a.get(&path, &world.user.token).await;
    first.assert_status(200);
    assert_eq!(first.header("x-cache"), Some("MISS"));
    assert_eq!(a.get(&path, &world.user.token).await.header("x-cache"), Some("HIT-L1"));
    let b = TestApp::builder().sibling_of(a).spawn().await;
    assert_eq!(b.get(&path, &world.user.token).await.header("x-cache"), Some("HIT-L2"));
    // A write on b reaches a through Redis: pub/sub, so a moment after b answers (a few
    // milliseconds; the bound still fails if a waited for its L1 entry to age out, 500 ms).
    b.patch(&path, &world.user.token, json!({ "title": "renamed on b" }))
        .await
        .assert_status(200);
    let written = std::time::Instant::now();
    while a.get(&path, &world.user.token).await.body["title"] != "renamed on b" {
        assert!(
            written.elapsed() < Duration::from_millis(400),
            "a still serves the old title after {:?}",
            written.elapsed()
        );
    }
}

#[tokio::test]
async fn rediss_with_a_private_ca_serves_the_cache_and_health_says_up() {
    let redis = private_redis_with(RedisOptions {
        tls: true,
        ..Default::default()
    })
    .await;
    let ca = redis.ca_file();
    let app = TestApp::builder()
        .redis(&redis)
        .settings(move |s| s.redis.tls_ca_file = Some(ca))
        .spawn()
        .await;
    assert!(app.settings.redis.url.starts_with("rediss://"));
    let report = health(&app).await;
    assert_eq!(report["details"]["redis"]["status"], "up", "{report}");
    assert_eq!(report["details"]["cache"]["mode"], "redis", "{report}");
    assert_cached_through_redis(&app).await;
}

#[tokio::test]
async fn a_wrong_ca_is_refused_and_health_says_redis_down_because_of_tls() {
    let redis = private_redis_with(RedisOptions {
        tls: true,
        ..Default::default()
    })
    .await;
    let other = tempfile::tempdir().unwrap();
    let wrong_ca = make_test_ca(other.path(), "other");
    let url = redis.url();
    let app = TestApp::builder()
        .redis_url(url)
        .settings(move |s| {
            s.redis.tls_ca_file = Some(wrong_ca);
        })
        .spawn()
        .await;
    let world = World::create(&app).await;
    // The app serves on without Redis.
    app.get(&world.fill("/api/tasks/{task}"), &world.user.token)
        .await
        .assert_status(200);
    let response = app.request(Method::GET, "/health", None, None).await;
    response.assert_status(503);
    let redis_health = &response.body["error"]["redis"];
    assert_eq!(redis_health["status"], "down", "{}", response.text);
    assert_eq!(redis_health["reason"], "tls", "{}", response.text);
    assert_eq!(
        response.body["details"]["cache"]["mode"], "degraded",
        "{}",
        response.text
    );
    app.request(Method::GET, "/health/ready", None, None)
        .await
        .assert_status(200);
}

#[tokio::test]
async fn rediss_without_the_tls_feature_would_say_disabled_but_now_never_does() {
    // A URL the client cannot use at all: the mode must not say redis next to a disabled Redis.
    let app = TestApp::builder().redis_url("rediss://").spawn().await;
    let report = health(&app).await;
    assert_eq!(report["details"]["redis"]["status"], "down", "{report}");
    assert_eq!(report["details"]["redis"]["reason"], "config", "{report}");
    assert_eq!(report["details"]["cache"]["mode"], "degraded", "{report}");
}

/// `user <name> on ><password> ~<prefix>* &<prefix>* -@all +<each command the app uses>`.
pub(crate) fn least_privilege_user(prefix: &str) -> String {
    let commands: Vec<String> = ACL_COMMANDS.iter().map(|c| format!("+{c}")).collect();
    format!(
        "nestling on >app-secret resetkeys ~{prefix}* resetchannels &{prefix}* -@all {}",
        commands.join(" ")
    )
}

#[tokio::test]
async fn an_acl_user_with_only_the_commands_the_app_uses_runs_the_cache_and_the_limiter() {
    let prefix = format!("acl-{}:", uuid::Uuid::new_v4().simple());
    let redis = private_redis_with(RedisOptions {
        acl_users: vec![least_privilege_user(&prefix)],
        ..Default::default()
    })
    .await;
    let url = format!("redis://nestling:app-secret@127.0.0.1:{}", redis.port);
    let key_prefix = prefix.clone();
    let app = TestApp::builder()
        .redis(&redis)
        .settings(move |s| {
            s.redis.url = url;
            s.redis.key_prefix = key_prefix;
            s.rate_limit.auth_email = vec![nestling::config::Quota {
                limit: 2,
                period: Duration::from_secs(3600),
            }];
        })
        .spawn()
        .await;
    assert_cached_through_redis(&app).await;
    // The credentials policy runs its script as this user: the third login for one email is 429.
    let body = json!({ "email": "acl@example.com", "password": "wrong password" });
    for expected in [401, 401, 429] {
        let response = app
            .request(Method::POST, "/api/auth/login", None, Some(body.clone()))
            .await;
        assert_eq!(response.status.as_u16(), expected, "{}", response.text);
    }
    let status = app
        .get("/api/rate-limit/policy", &World::create(&app).await.user.token)
        .await;
    assert_eq!(status.body["mode"], "redis", "{}", status.text);
    let admin_token = "acl-admin-token";
    let admin = TestApp::builder()
        .sibling_of(&app)
        .settings(move |s| s.app.admin_token = Some(admin_token.into()))
        .spawn()
        .await;
    for path in ["/admin/redis/health", "/admin/redis/metrics", "/admin/redis/slowlog"] {
        admin.get(path, admin_token).await.assert_status(200);
    }
    admin
        .request(
            Method::DELETE,
            &format!("/admin/cache?pattern={prefix}tasks:*"),
            Some(admin_token),
            None,
        )
        .await
        .assert_status(200);
    // Nothing the app did was refused by the ACL.
    let metrics = app.request(Method::GET, "/metrics", None, None).await.text;
    assert!(
        !metrics.contains("nestling_redis_errors_total{kind=\"error\"}"),
        "some Redis calls failed:\n{metrics}"
    );
    // And the user really is limited: it cannot flush, or touch keys outside its prefix.
    let client = redis::Client::open(format!("redis://nestling:app-secret@127.0.0.1:{}", redis.port)).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let flush: redis::RedisResult<()> = redis::cmd("FLUSHDB").query_async(&mut connection).await;
    assert_eq!(flush.unwrap_err().code(), Some("NOPERM"));
    let outside: redis::RedisResult<Option<String>> =
        redis::cmd("GET").arg("other:key").query_async(&mut connection).await;
    assert_eq!(outside.unwrap_err().code(), Some("NOPERM"));
}

#[tokio::test]
async fn a_wrong_password_shows_redis_down_because_of_auth() {
    let redis = private_redis_with(RedisOptions {
        acl_users: vec![least_privilege_user("x:")],
        ..Default::default()
    })
    .await;
    let url = format!("redis://nestling:not-the-password@127.0.0.1:{}", redis.port);
    let app = TestApp::builder().redis_url(url).spawn().await;
    let report = health(&app).await;
    assert_eq!(report["details"]["redis"]["status"], "down", "{report}");
    assert_eq!(report["details"]["redis"]["reason"], "auth", "{report}");
}

fn module_on(redis: &TestRedis) -> RedisModule {
    let mut settings = test_settings();
    settings.redis.enabled = true;
    settings.redis.url = redis.url();
    let prefix = format!("typed-{}:", uuid::Uuid::new_v4().simple());
    let keys = KeyRegistry::new(prefix, settings.ttl.clone());
    RedisModule::new(settings.redis, keys, Telemetry::new())
}

#[tokio::test]
async fn the_typed_surface_gets_sets_counts_deletes_publishes_and_reloads_scripts() {
    let server = private_redis_with(RedisOptions::default()).await;
    let redis: Arc<dyn RedisService> = Arc::new(module_on(&server));
    let keys = redis.keys().clone();
    let key = keys.counter("visits", "home");
    assert_eq!(redis.get(&key).await.unwrap(), None);
    redis.set(&key, b"hello", Duration::from_secs(30)).await.unwrap();
    assert_eq!(redis.get(&key).await.unwrap().as_deref(), Some(&b"hello"[..]));
    let mut raw = server.connection().await;
    let pttl: i64 = redis::cmd("PTTL")
        .arg(key.as_str())
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!((29_000..=30_000).contains(&pttl), "PTTL {pttl}");
    assert_eq!(redis.delete(std::slice::from_ref(&key)).await.unwrap(), 1);

    let counter = keys.counter("logins", 42);
    assert_eq!(redis.incr(&counter, 1, Duration::from_secs(60)).await.unwrap(), 1);
    assert_eq!(redis.incr(&counter, 5, Duration::from_secs(1)).await.unwrap(), 6);
    let pttl: i64 = redis::cmd("PTTL")
        .arg(counter.as_str())
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!(
        pttl > 50_000,
        "the expiry is set once, when the counter is created: {pttl}"
    );

    let script = redis::Script::new("return redis.call('INCRBY', KEYS[1], ARGV[1])");
    let value = redis
        .run_script(&script, std::slice::from_ref(&counter), &[b"4".to_vec()])
        .await
        .unwrap();
    assert_eq!(redis::from_redis_value::<i64>(value).unwrap(), 10);
    // SCRIPT FLUSH on this test's own server: the next EVALSHA meets NOSCRIPT and loads it again.
    let _: () = redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut raw).await.unwrap();
    let value = redis
        .run_script(&script, std::slice::from_ref(&counter), &[b"1".to_vec()])
        .await
        .unwrap();
    assert_eq!(redis::from_redis_value::<i64>(value).unwrap(), 11);

    let mut pubsub = server.pubsub().await;
    pubsub.subscribe(keys.invalidations().as_str()).await.unwrap();
    redis.publish(&keys.invalidations(), b"ping").await.unwrap();
    let message = tokio::time::timeout(
        Duration::from_secs(2),
        futures_util::StreamExt::next(&mut pubsub.on_message()),
    )
    .await
    .expect("message within 2 s")
    .unwrap();
    assert_eq!(message.get_payload::<String>().unwrap(), "ping");
}

#[tokio::test]
async fn in_memory_mode_the_typed_surface_fails_fast_without_connecting() {
    let server = private_redis_with(RedisOptions::default()).await;
    let module = module_on(&server);
    module.set_enabled(false);
    let key = module.keys().counter("c", 1);
    assert!(matches!(module.get(&key).await, Err(RedisFailure::Disabled)));
    assert!(matches!(
        module.incr(&key, 1, Duration::from_secs(1)).await,
        Err(RedisFailure::Disabled)
    ));
    assert_eq!(
        server.connections_received().await,
        1,
        "only this test's own connection"
    );
}

#[test]
fn the_readme_acl_user_lists_exactly_the_commands_the_app_uses() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let block = readme
        .split("<!-- acl:start -->")
        .nth(1)
        .and_then(|rest| rest.split("<!-- acl:end -->").next())
        .expect("the README has an ACL block");
    let listed: Vec<&str> = block
        .split_whitespace()
        .filter_map(|word| word.strip_prefix('+'))
        .collect();
    assert_eq!(listed, ACL_COMMANDS, "README ACL block vs ACL_COMMANDS");
}

/// The README's `ACL SETUSER` line, as written.
fn readme_acl_line() -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let line = readme
        .lines()
        .skip_while(|line| !line.contains("<!-- acl:start -->"))
        .find(|line| line.starts_with("ACL SETUSER "))
        .expect("the README's ACL block has an ACL SETUSER line");
    line.to_owned()
}

/// A cluster client sends more on connect than a single server's (`CLUSTER SLOTS`, for the slot
/// map), and the admin endpoints go to each master: the README's line, applied to every node
/// (ACL users are per node), with only the user, password and prefix changed.
#[tokio::test]
async fn the_readme_acl_user_runs_the_cache_the_limiter_and_the_admin_endpoints_on_a_cluster() {
    let cluster = tokio::task::spawn_blocking(shared_cluster).await.unwrap();
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (user, password, prefix) = (format!("nestling-{id}"), format!("secret-{id}"), format!("acl-{id}:"));
    let line = readme_acl_line()
        .replace("nestling:", &prefix)
        .replace(">CHANGE-ME", &format!(">{password}"))
        .replacen("ACL SETUSER nestling ", &format!("ACL SETUSER {user} "), 1);
    tokio::task::spawn_blocking(move || cluster.on_every_node(&line.split_whitespace().collect::<Vec<_>>()))
        .await
        .unwrap();
    let nodes: Vec<String> = cluster
        .ports()
        .iter()
        .map(|port| format!("redis://{user}:{password}@127.0.0.1:{port}"))
        .collect();
    let (key_prefix, admin_token) = (prefix.clone(), "acl-cluster-admin");
    let app = TestApp::builder()
        .cluster(cluster)
        .settings(move |s| {
            s.redis.cluster_nodes = nodes;
            s.redis.key_prefix = key_prefix;
            s.app.admin_token = Some(admin_token.into());
        })
        .spawn()
        .await;
    let report = health(&app).await;
    assert_eq!(report["details"]["redis"]["status"], "up", "{report}");
    assert_cached_through_redis(&app).await;
    let world = World::create(&app).await;
    let status = app.get("/api/rate-limit/policy", &world.user.token).await;
    assert_eq!(status.body["mode"], "redis", "{}", status.text);
    // The credentials policy's script, as this user.
    let body = json!({ "email": world.user.email, "password": "wrong password" });
    app.request(Method::POST, "/api/auth/login", None, Some(body))
        .await
        .assert_status(401);
    for path in ["/admin/redis/health", "/admin/redis/metrics", "/admin/redis/slowlog"] {
        app.get(path, admin_token).await.assert_status(200);
    }
    // A SCAN on each master, found with CLUSTER SLOTS.
    let flush = format!("/admin/cache?pattern={prefix}tasks:*");
    app.request(Method::DELETE, &flush, Some(admin_token), None)
        .await
        .assert_status(200);
    let metrics = app.request(Method::GET, "/metrics", None, None).await.text;
    assert!(
        !metrics.contains("nestling_redis_errors_total{kind=\"error\"}"),
        "some Redis calls failed:\n{metrics}"
    );
}

#[tokio::test]
async fn a_host_that_does_not_resolve_shows_redis_down_because_of_dns() {
    let app = TestApp::builder()
        // RFC 6761: `.invalid` never resolves.
        .redis_url("redis://nestling-redis.invalid:6379")
        .spawn()
        .await;
    let report = health(&app).await;
    assert_eq!(report["details"]["redis"]["status"], "down", "{report}");
    assert_eq!(report["details"]["redis"]["reason"], "dns", "{report}");
}
