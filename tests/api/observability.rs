//! What operators look at: Prometheus metrics, Redis admin endpoints, cache warm-up, the TTL policy.

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{sample, shared_redis, TestApp, World};

const ADMIN: &str = "observability-admin";

async fn admin_app(redis: bool) -> TestApp {
    let mut builder = TestApp::builder().settings(|s| s.app.admin_token = Some(ADMIN.into()));
    if redis {
        builder = builder.redis(tokio::task::spawn_blocking(shared_redis).await.unwrap());
    }
    builder.spawn().await
}

fn metric(text: &str, series: &str) -> f64 {
    sample(text, series).unwrap_or_else(|| panic!("no {series} in /metrics"))
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_cache_results_by_tier_and_namespace() {
    let app = admin_app(true).await;
    let (user, _, project) = app.user_with_project().await;
    let path = format!("/api/projects/{}/tasks", project["id"].as_str().unwrap());
    for _ in 0..3 {
        app.get(&path, &user.token).await.assert_status(200);
    }
    let response = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = response.text().await.unwrap();
    let route = r#"method="GET",route="/api/projects/{id}/tasks",status="200""#;
    assert_eq!(metric(&text, &format!("nestling_http_requests_total{{{route}}}")), 3.0);
    assert!(
        text.contains(r#"nestling_http_request_duration_seconds_bucket{method="GET",route="/api/projects/{id}/tasks""#)
    );
    assert_eq!(
        metric(
            &text,
            r#"nestling_cache_requests_total{namespace="task-lists",result="miss"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            r#"nestling_cache_requests_total{namespace="task-lists",result="hit_l1"}"#
        ),
        2.0
    );
    assert!(
        metric(
            &text,
            r#"nestling_cache_loader_duration_seconds_count{namespace="task-lists"}"#
        ) >= 1.0
    );
    assert!(metric(&text, r#"nestling_redis_command_duration_seconds_count{outcome="ok"}"#) >= 1.0);
    assert_eq!(metric(&text, "nestling_redis_breaker_state"), 0.0);
    assert!(metric(&text, r#"nestling_redis_pool{stat="connections"}"#) >= 1.0);
    for series in [
        "nestling_pubsub_messages_total",
        "nestling_cache_invalidations_queued_total",
        "nestling_cache_invalidations_replayed_total",
    ] {
        metric(&text, series);
    }
}

#[tokio::test]
async fn redis_admin_endpoints_report_health_info_and_slowlog() {
    let app = admin_app(true).await;
    let health = app.request(Method::GET, "/admin/redis/health", Some(ADMIN), None).await;
    health.assert_status(200);
    assert!(health.body["latencyMs"].as_f64().unwrap() >= 0.0);
    assert_eq!(health.body["breaker"], "closed");
    assert_eq!(health.body["subscriberConnected"], true);

    let metrics = app
        .request(Method::GET, "/admin/redis/metrics", Some(ADMIN), None)
        .await;
    metrics.assert_status(200);
    assert!(metrics.body["usedMemoryBytes"].as_u64().unwrap() > 0);
    assert!(metrics.body["connectedClients"].as_u64().unwrap() >= 1);
    assert!(metrics.body["redisVersion"].as_str().unwrap().contains('.'));
    let rate = metrics.body["keyspaceHitRate"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&rate));

    let slowlog = app
        .request(Method::GET, "/admin/redis/slowlog", Some(ADMIN), None)
        .await;
    slowlog.assert_status(200);
    assert!(slowlog.body.is_array());
}

#[tokio::test]
async fn redis_admin_endpoints_say_when_redis_is_disabled() {
    let app = admin_app(false).await;
    for path in [
        "/admin/redis/health",
        "/admin/redis/metrics",
        "/admin/redis/slowlog",
        "/admin/redis/keys",
    ] {
        app.request(Method::GET, path, Some(ADMIN), None)
            .await
            .assert_error(409, "redis_disabled");
    }
}

#[tokio::test]
async fn warming_a_workspace_makes_its_hot_reads_hits() {
    let app = admin_app(false).await;
    let (user, workspace, project) = app.user_with_project().await;
    let workspace_id = workspace["id"].as_str().unwrap();
    let project_id = project["id"].as_str().unwrap();
    // Writes invalidate; start from a cold cache for these entries.
    app.create_task(&user, project_id, json!({ "title": "hot" })).await;
    let warmed = app
        .request(
            Method::POST,
            "/admin/cache/warm",
            Some(ADMIN),
            Some(json!({ "workspaceId": workspace_id })),
        )
        .await;
    warmed.assert_status(200);
    assert_eq!(warmed.body["entries"], 5);
    for path in [
        format!("/api/workspaces/{workspace_id}"),
        format!("/api/workspaces/{workspace_id}/members"),
        format!("/api/workspaces/{workspace_id}/projects"),
        format!("/api/projects/{project_id}"),
        format!("/api/projects/{project_id}/tasks"),
    ] {
        let read = app.get(&path, &user.token).await;
        assert_eq!(read.header("x-cache"), Some("HIT-L1"), "{path} after warm-up");
    }
    let unknown = json!({ "workspaceId": uuid::Uuid::new_v4() });
    app.request(Method::POST, "/admin/cache/warm", Some(ADMIN), Some(unknown))
        .await
        .assert_error(404, "workspace_not_found");
}

#[tokio::test]
async fn the_cache_policy_shows_the_ttl_table_in_force() {
    let app = TestApp::builder()
        .settings(|s| s.ttl.tasks = std::time::Duration::from_secs(42))
        .spawn()
        .await;
    let user = app.register_user().await;
    let policy = app.get("/api/cache/policy", &user.token).await;
    policy.assert_status(200);
    assert_eq!(policy.body["mode"], "memory");
    let ttl = |namespace: &str| -> Value {
        policy.body["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["namespace"] == namespace)
            .unwrap()["ttlSeconds"]
            .clone()
    };
    #[rustfmt::skip]
    let expected = [("tasks", 42), ("task-lists", 42), ("projects", 600), ("workspaces", 1800),
                    ("daily-metrics", 900), ("users", 3600), ("auth-tokens", 7200)];
    for (namespace, seconds) in expected {
        assert_eq!(ttl(namespace), seconds, "{namespace}");
    }
}

/// Label values come from a fixed set: any method string a client invents, and any path that
/// matches no route, must not become a new series each (issue [4/6], item 4).
#[tokio::test]
async fn invented_methods_and_unknown_paths_do_not_grow_the_metric_series() {
    let app = TestApp::spawn().await;
    for n in 0..50 {
        let method = Method::from_bytes(format!("M{n}").as_bytes()).unwrap();
        app.request(method, "/health", None, None).await;
        app.request(Method::GET, &format!("/no/such/path/{n}"), None, None)
            .await;
        app.request(Method::GET, &format!("/api/tasks/{n}/nested/{n}"), None, None)
            .await;
    }
    let metrics = app.request(Method::GET, "/metrics", None, None).await.text;
    let label_values = |label: &str| -> std::collections::BTreeSet<String> {
        metrics
            .lines()
            .filter(|line| line.starts_with("nestling_http_requests_total{"))
            .filter_map(|line| {
                line.split(&format!("{label}=\""))
                    .nth(1)?
                    .split('"')
                    .next()
                    .map(str::to_owned)
            })
            .collect()
    };
    let methods = label_values("method");
    assert_eq!(
        methods,
        ["GET", "other"].map(String::from).into(),
        "method labels: {methods:?}"
    );
    let routes = label_values("route");
    assert!(routes.len() <= 3, "route labels: {routes:?}");
}

/// Registers a job kind on the app's queue, as the app registers its own at start-up: the job
/// metrics labelled by kind or queue have their series (at zero) from then on.
fn with_a_job_kind(app: &TestApp) {
    let kind = crate::jobs::kind("test.observed", 1, crate::jobs::SECOND);
    crate::jobs::queue(app).register(kind, crate::jobs::recording(Default::default(), |_| Ok(())));
}

/// The metric names a PromQL expression refers to (`nestling_…`, histogram suffixes kept).
/// Every one of `names` has a sample in the `/metrics` text `exported`.
fn assert_exported(exported: &str, names: &[String], by: &str) {
    for name in names {
        assert!(
            exported
                .lines()
                .any(|line| line.starts_with(&format!("{name} ")) || line.starts_with(&format!("{name}{{"))),
            "{name} is {by} but not exported"
        );
    }
}

fn metric_names(expression: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expression;
    while let Some(at) = rest.find("nestling_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.push(name);
    }
    names
}

/// `docs/alerts.yml` names only metrics an instance exports (a Redis-mode instance after some
/// traffic, so every family has samples), and `promtool check rules` accepts it where installed.
#[tokio::test]
async fn every_metric_the_alert_rules_name_is_exported() {
    let rules = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/alerts.yml")).unwrap();
    let app = TestApp::builder().redis(shared_redis()).spawn().await;
    with_a_job_kind(&app);
    let world = World::create(&app).await;
    for _ in 0..2 {
        app.get(&world.fill("/api/projects/{project}/tasks"), &world.user.token)
            .await
            .assert_status(200);
    }
    let exported = app.request(Method::GET, "/metrics", None, None).await.text;
    let mut named = Vec::new();
    for line in rules.lines().filter(|line| !line.trim_start().starts_with('#')) {
        named.extend(metric_names(line));
    }
    named.sort();
    named.dedup();
    assert!(named.len() >= 7, "the rules name only {named:?}");
    assert_exported(&exported, &named, "named by docs/alerts.yml");
    // "Redis down" must not fire in memory mode, nor stay silent in redis mode.
    assert!(
        exported.lines().any(|l| l == "nestling_redis_enabled 1")
            && exported.lines().any(|l| l == "nestling_redis_up 1")
    );
    let memory_mode = TestApp::spawn().await;
    let exported = memory_mode.request(Method::GET, "/metrics", None, None).await.text;
    assert!(exported.lines().any(|l| l == "nestling_redis_enabled 0"), "{exported}");
    let alerts = rules.matches("- alert:").count();
    assert_eq!(
        alerts, 8,
        "down, breaker, hit rate, p99, error rate, memory, dead jobs, lagging queue"
    );
    if let Ok(output) = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/alerts.yml"))
        .output()
    {
        assert!(
            output.status.success(),
            "promtool: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// The key distribution per namespace, by a sampling SCAN under the prefix (never KEYS), and
/// Redis memory against maxmemory. On a Redis of the test's own, the sample covers every key.
#[tokio::test]
async fn admin_redis_keys_counts_keys_per_namespace_by_scan_and_shows_memory_against_maxmemory() {
    let redis = crate::helpers::private_redis().await;
    redis.config_set("maxmemory", "100mb").await;
    let mut connection = redis.connection().await;
    let app = TestApp::builder()
        .redis(&redis)
        .settings(|s| s.app.admin_token = Some(ADMIN.into()))
        .spawn()
        .await;
    let world = World::create(&app).await;
    app.get(&world.fill("/api/tasks/{task}"), &world.user.token)
        .await
        .assert_status(200);
    app.get(&world.fill("/api/projects/{project}/tasks"), &world.user.token)
        .await
        .assert_status(200);

    let response = app.request(Method::GET, "/admin/redis/keys", Some(ADMIN), None).await;
    response.assert_status(200);
    let body = &response.body;
    assert_eq!(body["complete"], true, "{body}");
    let count = |namespace: &str| {
        body["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .find(|ns| ns["namespace"] == namespace)
            .map_or(0, |ns| ns["keys"].as_u64().unwrap())
    };
    // Exactly what is in Redis under the prefix, namespace by namespace.
    let prefix = app.settings.redis.key_prefix.clone();
    for namespace in ["tasks", "task-lists", "auth-tokens"] {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}{namespace}:*"))
            .query_async(&mut connection)
            .await
            .unwrap();
        assert!(!keys.is_empty(), "{namespace}: nothing cached");
        assert_eq!(count(namespace), keys.len() as u64, "{namespace}: {body}");
    }
    assert_eq!(body["memory"]["maxBytes"], 100 * 1024 * 1024, "{body}");
    let share = body["memory"]["share"].as_f64().unwrap();
    assert!(share > 0.0 && share < 1.0, "{body}");
    // The endpoint itself never ran KEYS (the test's own KEYS calls come after it in the stats).
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut connection)
        .await
        .unwrap();
    let keys_calls = info
        .lines()
        .find_map(|l| {
            l.strip_prefix("cmdstat_keys:calls=")?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(0);
    assert_eq!(keys_calls, 3, "only this test's three KEYS calls");
}

/// Every expression of the provisioned Grafana dashboard, and the Prometheus config, name only
/// metrics an instance exports; the dashboard covers what the migration plan says to watch.
#[tokio::test]
async fn every_metric_the_dashboard_queries_is_exported() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/monitoring/grafana/dashboards/nestling.json"
    );
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut named = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            named.extend(metric_names(target["expr"].as_str().unwrap()));
        }
    }
    named.sort();
    named.dedup();
    #[rustfmt::skip]
    let watched = [
        "nestling_http_requests_total", "nestling_http_request_duration_seconds_bucket",
        "nestling_cache_requests_total", "nestling_redis_command_duration_seconds_bucket",
        "nestling_redis_errors_total", "nestling_redis_breaker_state",
        "nestling_rate_limit_decisions_total", "nestling_db_pool_connections",
        "nestling_lock_wait_seconds_bucket", "nestling_idempotency_requests_total",
        "nestling_jobs_waiting", "nestling_job_oldest_waiting_seconds", "nestling_jobs_dead",
        "nestling_job_runs_total", "nestling_job_duration_seconds_bucket", "nestling_scheduler_lag_seconds_bucket",
    ];
    for metric in watched {
        assert!(
            named.iter().any(|n| n == metric),
            "the dashboard does not show {metric}"
        );
    }
    let app = TestApp::builder().redis(shared_redis()).spawn().await;
    with_a_job_kind(&app);
    let world = World::create(&app).await;
    app.get(&world.fill("/api/projects/{project}/tasks"), &world.user.token)
        .await
        .assert_status(200);
    let exported = app.request(Method::GET, "/metrics", None, None).await.text;
    assert_exported(&exported, &named, "queried by the dashboard");
}
