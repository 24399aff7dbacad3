//! Rate limiting against real Redis (the shared server, or a private one for faults) and real
//! Postgres: atomic across two instances, exact over time, headers and `Retry-After`, hostile
//! identities, Redis killed and frozen, memory mode, and the lease's error bound.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use nestling::config::{Quota, Settings};
use nestling::infra::rate_limit::gcra::{self, Cell};
use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{private_redis, shared_redis, Backend, TestApp, TestRedis, TestResponse};

fn per(limit: u64, secs: u64) -> Vec<Quota> {
    vec![Quota {
        limit,
        period: Duration::from_secs(secs),
    }]
}

async fn login(app: &TestApp, email: &str) -> TestResponse {
    let body = json!({ "email": email, "password": "not the password" });
    app.request(Method::POST, "/api/auth/login", None, Some(body)).await
}

async fn login_from(app: &TestApp, email: &str, forwarded_for: &str) -> TestResponse {
    let response = app
        .client
        .post(app.url("/api/auth/login"))
        .header("x-forwarded-for", forwarded_for)
        .json(&json!({ "email": email, "password": "not the password" }))
        .send()
        .await
        .unwrap();
    crate::helpers::into_test_response(response).await
}

fn email() -> String {
    format!("rl-{}@example.com", uuid::Uuid::new_v4().simple())
}

async fn with_redis(redis: &TestRedis, tweak: impl FnOnce(&mut Settings) + 'static) -> TestApp {
    TestApp::builder().redis(redis).settings(tweak).spawn().await
}

async fn on(backend: Backend, tweak: impl FnOnce(&mut Settings) + 'static) -> TestApp {
    TestApp::builder().backend(backend).settings(tweak).spawn().await
}

#[tokio::test]
async fn a_thousand_concurrent_logins_over_two_instances_against_a_limit_of_5_let_exactly_5_through() {
    a_thousand_concurrent_logins_let_exactly_5_through(Backend::redis().await, |s| s.rate_limit.auth_ip = per(5, 3600))
        .await;
}

/// `limit` sets one of the login policies to 5 an hour.
pub(crate) async fn a_thousand_concurrent_logins_let_exactly_5_through(
    backend: Backend,
    limit: impl FnOnce(&mut Settings) + 'static,
) {
    let a = TestApp::builder()
        .backend(backend)
        .settings(|s| {
            limit(s);
            // A thousand requests at once queue on one debug-build worker for longer than the
            // 250 ms default: this test is about atomicity, the fault tests below about the timeout.
            s.redis.command_timeout = Duration::from_secs(5);
            s.redis.pool_timeout = Duration::from_secs(5);
        })
        .spawn()
        .await;
    let b = backend.sibling(&a).await;
    let email = email();
    let requests = (0..1000).map(|n| {
        let app = if n % 2 == 0 { &a } else { &b };
        login(app, &email)
    });
    let responses = join_all(requests).await;
    let passed = responses.iter().filter(|r| r.status != 429).count();
    let mut statuses: Vec<(u16, String)> = responses
        .iter()
        .map(|r| (r.status.as_u16(), r.body["code"].to_string()))
        .collect();
    statuses.sort();
    statuses.dedup();
    assert_eq!(passed, 5, "requests past the limiter: {statuses:?}");
    for response in &responses {
        assert!(
            response.status == 401 || response.status == 429 || response.status == 503,
            "{}: {}",
            response.status,
            response.text
        );
    }
}

#[tokio::test]
async fn sustained_20_per_second_against_10_per_second_is_accepted_as_the_exact_gcra_says() {
    let app = with_redis(shared_redis(), |s| {
        s.rate_limit.api = per(10, 1);
        s.rate_limit.lease = 1;
    })
    .await;
    let user = app.register_user().await;
    let (rate, seconds) = (20u64, 20u64);
    let started = tokio::time::Instant::now();
    let requests = (0..rate * seconds).map(|n| {
        let (app, token) = (&app, &user.token);
        async move {
            tokio::time::sleep_until(started + Duration::from_millis(n * 1000 / rate)).await;
            app.get("/api/users/me", token).await.status.as_u16()
        }
    });
    let statuses = join_all(requests).await;
    let accepted = statuses.iter().filter(|s| **s == 200).count() as i64;
    assert!(statuses.iter().all(|s| *s == 200 || *s == 429), "{statuses:?}");
    // The exact figure: the same schedule through the rule itself.
    let mut cells = [Cell {
        tat: 0,
        interval: 100_000,
        period: 1_000_000,
    }];
    let exact = (0..rate * seconds)
        .filter(|n| gcra::decide(&mut cells, 1_000_000 + n * 1_000_000 / rate, 1).granted == 1)
        .count() as i64;
    assert_eq!(
        exact, 209,
        "10 at once, then one per 100 ms until the last request at 19.95 s"
    );
    assert!((accepted - exact).abs() <= 2, "accepted {accepted}, exact {exact}");
}

#[tokio::test]
async fn limited_responses_carry_the_headers_and_retry_after_is_honoured() {
    limited_responses_carry_the_headers_and_retry_after_is_honoured_on(Backend::redis().await).await;
}

pub(crate) async fn limited_responses_carry_the_headers_and_retry_after_is_honoured_on(backend: Backend) {
    let app = TestApp::builder()
        .backend(backend)
        .settings(|s| {
            s.rate_limit.api = per(2, 2);
            s.rate_limit.lease = 1;
        })
        .spawn()
        .await;
    let user = app.register_user().await;
    let first = app.get("/api/users/me", &user.token).await;
    first.assert_status(200);
    assert_eq!(first.header("ratelimit-policy"), Some("\"api-2s\";q=2;w=2"));
    assert_eq!(
        first.header("ratelimit").map(|v| v.starts_with("\"api-2s\";r=1;t=")),
        Some(true)
    );
    assert_eq!(first.header("x-ratelimit-limit"), Some("2"));
    assert_eq!(first.header("x-ratelimit-remaining"), Some("1"));
    app.get("/api/users/me", &user.token).await.assert_status(200);
    let denied = app.get("/api/users/me", &user.token).await;
    denied.assert_error(429, "rate_limited");
    assert_eq!(denied.header("x-ratelimit-remaining"), Some("0"));
    let retry_after: u64 = denied.header("retry-after").expect("Retry-After").parse().unwrap();
    assert_eq!(retry_after, 1, "one token a second");
    // Waiting what the server said is enough.
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    app.get("/api/users/me", &user.token).await.assert_status(200);
}

#[tokio::test]
async fn a_route_with_several_quotas_lists_them_all_and_the_tightest_answers() {
    a_route_with_several_quotas_lists_them_all_and_the_tightest_answers_on(Backend::redis().await).await;
}

pub(crate) async fn a_route_with_several_quotas_lists_them_all_and_the_tightest_answers_on(backend: Backend) {
    let app = TestApp::builder()
        .backend(backend)
        .settings(|s| {
            s.rate_limit.auth_ip = vec![
                Quota {
                    limit: 50,
                    period: Duration::from_secs(60),
                },
                Quota {
                    limit: 1000,
                    period: Duration::from_secs(86_400),
                },
            ];
            s.rate_limit.auth_email = vec![
                Quota {
                    limit: 3,
                    period: Duration::from_secs(60),
                },
                Quota {
                    limit: 5,
                    period: Duration::from_secs(86_400),
                },
            ];
        })
        .spawn()
        .await;
    let email = email();
    let first = login(&app, &email).await;
    first.assert_status(401);
    assert_eq!(
        first.header("ratelimit-policy"),
        Some("\"auth-ip-1m\";q=50;w=60, \"auth-ip-1d\";q=1000;w=86400, \"auth-email-1m\";q=3;w=60, \"auth-email-1d\";q=5;w=86400")
    );
    assert!(
        first.header("ratelimit").unwrap().starts_with("\"auth-email-1m\";r=2;"),
        "{:?}",
        first.headers
    );
    login(&app, &email).await.assert_status(401);
    login(&app, &email).await.assert_status(401);
    let denied = login(&app, &email).await;
    denied.assert_error(429, "rate_limited");
    // Another email from the same address is still let through: the IP quota has room.
    login(&app, &self::email()).await.assert_status(401);
}

#[tokio::test]
async fn hostile_identities_make_bounded_keys_and_neither_5xx_nor_a_bypass() {
    let app = with_redis(shared_redis(), |s| {
        s.rate_limit.auth_ip = per(1000, 3600);
        s.rate_limit.auth_email = per(1, 3600);
    })
    .await;
    let long = "x".repeat(10_000);
    let hostile = [
        "a:b@example.com",
        "*",
        "rl:*",
        "nul\u{0}@example.com",
        "ünïcödé@例え.jp",
        long.as_str(),
        "",
    ];
    for email in hostile {
        let first = login(&app, email).await;
        assert!(first.status.as_u16() < 500, "{email:.20}: {}", first.text);
        let second = login(&app, email).await;
        assert_eq!(
            second.status, 429,
            "{email:.20}: the second attempt is limited: {}",
            second.text
        );
    }
    // Case and spaces do not make a new identity.
    let email = email();
    login(&app, &email).await;
    login(&app, &format!("  {}  ", email.to_uppercase()))
        .await
        .assert_status(429);
    let mut redis = shared_redis().connection().await;
    let pattern = format!("{}rl:*", app.settings.redis.key_prefix);
    let keys: Vec<String> = redis::cmd("KEYS").arg(&pattern).query_async(&mut redis).await.unwrap();
    assert!(keys.len() >= hostile.len(), "{keys:?}");
    for key in keys {
        let unprefixed = key.strip_prefix(&app.settings.redis.key_prefix).unwrap();
        assert!(unprefixed.len() <= "rl:auth-email:{}".len() + 64, "{key}");
    }
}

#[tokio::test]
async fn a_new_x_forwarded_for_per_request_does_not_reset_the_limit_unless_a_proxy_is_trusted() {
    a_new_x_forwarded_for_per_request_does_not_reset_the_limit_unless_a_proxy_is_trusted_on(Backend::redis().await)
        .await;
}

pub(crate) async fn a_new_x_forwarded_for_per_request_does_not_reset_the_limit_unless_a_proxy_is_trusted_on(
    backend: Backend,
) {
    let app = on(backend, |s| s.rate_limit.auth_ip = per(3, 3600)).await;
    let statuses: Vec<u16> = join_all((0..6).map(|n| {
        let app = &app;
        async move {
            login_from(app, &email(), &format!("203.0.113.{n}"))
                .await
                .status
                .as_u16()
        }
    }))
    .await;
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 3, "{statuses:?}");

    let behind_proxy = on(backend, |s| {
        s.rate_limit.auth_ip = per(3, 3600);
        // The test client connects from loopback: that is the proxy here.
        s.rate_limit.trust_proxy = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    for n in 0..6 {
        let response = login_from(&behind_proxy, &email(), &format!("198.51.100.{n}")).await;
        response.assert_status(401);
    }
    for expected in [401, 401, 401, 429] {
        let response = login_from(&behind_proxy, &email(), "198.51.100.77").await;
        assert_eq!(response.status, expected, "{}", response.text);
    }
}

/// A quota of more tokens than an hour has microseconds' worth of room (10^9 an hour: one every
/// 3.6 µs, counted in whole microseconds) never shows more tokens left than it has, in Redis or
/// in memory: a client would read "1,199,999,999 of 1,000,000,000 left".
#[tokio::test]
async fn remaining_never_exceeds_the_limit_whatever_the_quota() {
    const LIMIT: u64 = 1_000_000_000;
    let quota = |s: &mut Settings| s.rate_limit.api = per(LIMIT, 3600);
    let redis_mode = on(Backend::redis().await, quota).await;
    let memory_mode = TestApp::builder()
        .settings(move |s| {
            s.redis.enabled = false;
            quota(s);
        })
        .spawn()
        .await;
    for (mode, app) in [("redis", &redis_mode), ("memory", &memory_mode)] {
        let user = app.register_user().await;
        let read = app.get("/api/users/me", &user.token).await;
        read.assert_status(200);
        let remaining: u64 = read.header("x-ratelimit-remaining").unwrap().parse().unwrap();
        assert!(remaining < LIMIT, "{mode}: {remaining} left of {LIMIT}");
        let current = read.header("ratelimit").unwrap();
        assert!(current.contains(&format!(";r={remaining};")), "{mode}: {current}");
    }
}

#[tokio::test]
async fn in_memory_mode_the_same_policies_hold_and_redis_sees_no_connection() {
    let redis = private_redis().await;
    let url = redis.url();
    let app = TestApp::builder()
        .settings(move |s| {
            s.redis.enabled = false;
            s.redis.url = url;
            s.rate_limit.auth_email = per(2, 3600);
            s.rate_limit.api = per(3, 3600);
        })
        .spawn()
        .await;
    let user = app.register_user().await;
    let email = email();
    for expected in [401, 401, 429] {
        assert_eq!(login(&app, &email).await.status, expected);
    }
    // Login is not under the /api policy: three reads pass, the fourth is limited.
    for expected in [200, 200, 200, 429] {
        assert_eq!(app.get("/api/users/me", &user.token).await.status, expected);
    }
    let policy = app.request(Method::GET, "/health", None, None).await;
    assert_eq!(policy.body["details"]["redis"]["status"], "disabled");
    assert_eq!(redis.connections_received().await, 1, "only this test's own connection");
}

#[tokio::test]
async fn app_instances_divides_each_quota_when_redis_is_not_used() {
    let app = TestApp::builder()
        .settings(|s| {
            s.rate_limit.auth_email = per(6, 3600);
            s.rate_limit.instances = 3;
        })
        .spawn()
        .await;
    let email = email();
    for expected in [401, 401, 429] {
        assert_eq!(login(&app, &email).await.status, expected, "6 / 3 instances = 2 here");
    }
    let user = app.register_user().await;
    let policy = app.get("/api/rate-limit/policy", &user.token).await;
    policy.assert_status(200);
    assert_eq!(policy.body["mode"], "local");
    let email_policy = policy.body["policies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "auth-email")
        .unwrap()
        .clone();
    assert_eq!(email_policy["quotas"][0]["localLimit"], 2, "{email_policy}");
    assert_eq!(email_policy["quotas"][0]["limit"], 6);
}

/// p99 of `n` reads, four at a time, and their statuses.
async fn read_latencies(app: &TestApp, token: &str, n: usize) -> (Duration, Vec<u16>) {
    let mut took = Vec::with_capacity(n);
    let mut statuses = Vec::with_capacity(n);
    for _ in 0..n / 4 {
        let batch = join_all((0..4).map(|_| async {
            let started = Instant::now();
            let status = app.get("/api/users/me", token).await.status.as_u16();
            (started.elapsed(), status)
        }))
        .await;
        for (duration, status) in batch {
            took.push(duration);
            statuses.push(status);
        }
    }
    took.sort();
    (took[took.len() * 99 / 100], statuses)
}

async fn wait_for_redis_up(app: &TestApp) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let health = app.request(Method::GET, "/health", None, None).await;
        if health.body["details"]["redis"]["status"] == "up" && health.body["details"]["redis"]["breaker"] == "closed" {
            return;
        }
        assert!(Instant::now() < deadline, "Redis not used again: {}", health.text);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Breaks Redis with `fault`: reads keep a fast p99 and login stays limited (locally); then
/// `recover`s it, and the next login shows what Redis holds: `remaining_after` says whether the
/// local attempts were replayed into it (they must not be).
async fn redis_fault_keeps_decisions_fast_and_login_limited(
    fault: fn(&TestRedis),
    recover: fn(&TestRedis),
    remaining_after: &str,
) {
    let redis = private_redis().await;
    let app = with_redis(&redis, |s| {
        s.rate_limit.auth_email = per(3, 3600);
        s.rate_limit.lease = 1;
    })
    .await;
    let user = app.register_user().await;
    let email = email();
    let before = login(&app, &email).await;
    assert_eq!(before.header("x-ratelimit-remaining"), Some("2"), "decided in Redis");

    tokio::task::block_in_place(|| fault(&redis));
    let (p99, statuses) = read_latencies(&app, &user.token, 1000).await;
    let failed: Vec<&u16> = statuses.iter().filter(|s| **s != 200).collect();
    assert!(failed.is_empty(), "{failed:?}");
    assert!(p99 <= Duration::from_millis(50), "decision p99 {p99:?} with Redis down");
    // Locally, with a fresh state: 3 more attempts pass, the fourth does not.
    for expected in [401, 401, 401, 429] {
        assert_eq!(login(&app, &email).await.status, expected, "login stays limited");
    }

    tokio::task::block_in_place(|| recover(&redis));
    wait_for_redis_up(&app).await;
    let after = login(&app, &email).await;
    after.assert_status(401);
    assert_eq!(
        after.header("x-ratelimit-remaining"),
        Some(remaining_after),
        "{:?}",
        after.headers
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_frozen_decisions_stay_fast_login_stays_limited_and_nothing_is_replayed() {
    // Redis still holds the one attempt made before the freeze, and only that one.
    redis_fault_keeps_decisions_fast_and_login_limited(TestRedis::freeze, TestRedis::thaw, "1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_killed_decisions_stay_fast_login_stays_limited_and_nothing_is_replayed() {
    // The restarted Redis is empty (nothing persisted): a fresh count, not a replay.
    redis_fault_keeps_decisions_fast_and_login_limited(TestRedis::kill, TestRedis::restart, "2").await;
}

/// The control: with a client-default command timeout and a breaker that never opens, a limiter
/// decision waits on the frozen Redis, which the fault tests above would catch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_command_timeout_a_frozen_redis_holds_login_decisions() {
    let redis = private_redis().await;
    let app = with_redis(&redis, |s| {
        s.redis.command_timeout = Duration::from_secs(30);
        s.redis.pool_timeout = Duration::from_secs(30);
        s.redis.breaker_threshold = u32::MAX;
    })
    .await;
    login(&app, &email()).await.assert_status(401);
    redis.freeze();
    let pending = tokio::time::timeout(Duration::from_secs(1), login(&app, &email())).await;
    redis.thaw();
    assert!(pending.is_err(), "the decision did not wait on Redis");
}

#[tokio::test]
async fn a_leased_policy_is_off_by_at_most_instances_times_lease_and_calls_redis_once_per_lease() {
    // A lease is at most 5 % of the quota: 500 allows the lease of 5 asked for.
    const LIMIT: u64 = 500;
    const LEASE: u64 = 5;
    let redis = private_redis().await;
    let a = with_redis(&redis, |s| {
        s.rate_limit.api = per(LIMIT, 3600);
        s.rate_limit.lease = LEASE;
    })
    .await;
    let b = TestApp::builder().sibling_of(&a).spawn().await;
    let user = a.register_user().await;
    // Eight clients, four per instance, eighty requests each: more than the limit.
    let clients = (0..8).map(|n| {
        let (app, token) = (if n % 2 == 0 { &a } else { &b }, &user.token);
        async move {
            let mut accepted = 0u64;
            for _ in 0..80 {
                accepted += u64::from(app.get("/api/users/me", token).await.status == 200);
            }
            accepted
        }
    });
    let accepted: u64 = join_all(clients).await.into_iter().sum();
    let bound = 2 * LEASE;
    assert!(
        accepted + bound >= LIMIT && accepted <= LIMIT + bound,
        "accepted {accepted} of a limit of {LIMIT} (bound ±{bound})"
    );

    // One script call per lease, and none per request while the answer is no.
    let other = a.register_user().await;
    // Once first, so the cache's own fill scripts (session, user) are not counted.
    a.get("/api/users/me", &other.token).await.assert_status(200);
    let calls_before = redis.evalsha_calls().await;
    for _ in 0..100 {
        a.get("/api/users/me", &other.token).await;
    }
    let calls = redis.evalsha_calls().await - calls_before;
    // A lease is topped up when under a quarter of it is left, by what it lacks: at most one
    // call per half a lease.
    assert!(
        calls <= 100 * 2 / LEASE + 1,
        "{calls} script calls for 100 requests with a lease of {LEASE}"
    );
}

#[tokio::test]
async fn the_rate_limit_policy_endpoint_shows_every_policy_in_force() {
    the_rate_limit_policy_endpoint_shows_every_policy_in_force_on(Backend::redis().await).await;
}

pub(crate) async fn the_rate_limit_policy_endpoint_shows_every_policy_in_force_on(backend: Backend) {
    let app = on(backend, |_| {}).await;
    let user = app.register_user().await;
    let response = app.get("/api/rate-limit/policy", &user.token).await;
    response.assert_status(200);
    let body: &Value = &response.body;
    assert_eq!(body["mode"], "redis");
    let names: Vec<&str> = body["policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["api", "auth-ip", "auth-email"]);
    assert_eq!(body["policies"][0]["identity"], "user-or-ip");
    assert_eq!(body["policies"][0]["lease"], app.settings.rate_limit.lease);
    assert_eq!(body["policies"][2]["identity"], "email");
    assert_eq!(
        body["trustedProxies"],
        json!([]),
        "TRUST_PROXY trusts nothing by default"
    );
}

#[tokio::test]
async fn health_metrics_and_docs_are_never_limited() {
    let app = TestApp::builder()
        .settings(|s| {
            s.rate_limit.api = per(1, 3600);
            s.rate_limit.auth_ip = per(1, 3600);
        })
        .spawn()
        .await;
    for path in [
        "/health",
        "/health/live",
        "/health/ready",
        "/metrics",
        "/api-docs/openapi.json",
    ] {
        for _ in 0..5 {
            let response = app.request(Method::GET, path, None, None).await;
            assert!(response.status.is_success(), "{path}: {}", response.status);
            assert!(response.header("ratelimit-policy").is_none(), "{path}");
        }
    }
}

#[tokio::test]
async fn switching_the_api_policy_off_keeps_login_limited() {
    let app = TestApp::builder()
        .settings(|s| {
            s.rate_limit.enabled = false;
            s.rate_limit.api = per(1, 3600);
            // register_user registers and logs in: two attempts for its email.
            s.rate_limit.auth_email = per(2, 3600);
        })
        .spawn()
        .await;
    let user = app.register_user().await;
    for _ in 0..3 {
        let me = app.get("/api/users/me", &user.token).await;
        me.assert_status(200);
        assert!(me.header("ratelimit").is_none());
    }
    let email = email();
    login(&app, &email).await.assert_status(401);
    login(&app, &email).await.assert_status(401);
    login(&app, &email).await.assert_error(429, "rate_limited");
    let metrics = app.request(Method::GET, "/metrics", None, None).await.text;
    assert!(
        metrics.contains(r#"nestling_rate_limit_decisions_total{by="local",group="credentials",outcome="denied"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn rate_limit_window_is_the_window_of_every_quota_given_as_a_bare_number() {
    let configured = Settings::from_lookup(|name| match name {
        "RATE_LIMIT_WINDOW" => Some("30".into()),
        "RATE_LIMIT_API" => Some("40".into()),
        _ => None,
    })
    .unwrap();
    let app = TestApp::builder()
        .settings(move |s| s.rate_limit.api = configured.rate_limit.api)
        .spawn()
        .await;
    let user = app.register_user().await;
    let me = app.get("/api/users/me", &user.token).await;
    assert_eq!(me.header("ratelimit-policy"), Some("\"api-30s\";q=40;w=30"));
    let policy = app.get("/api/rate-limit/policy", &user.token).await;
    assert_eq!(policy.body["policies"][0]["quotas"][0]["windowSeconds"], 30);
}
