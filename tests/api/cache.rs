//! The two-tier cache as users see it: `X-Cache` / `Cache-Control` on every cacheable read,
//! fresh data after every write (one instance and two), TTLs from the TTL table, memory mode
//! without a single Redis connection, single-flight, admin stats, flush and the runtime switch.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use nestling::config::Settings;
use nestling::modules::users::repository::set_admin;
use redis::AsyncCommands;
use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{private_redis, shared_redis, Backend, TestApp, TestResponse, TestUser, World};

const ADMIN: &str = "test-admin-token";

fn with_admin(s: &mut Settings) {
    s.app.admin_token = Some(ADMIN.into());
}

/// (method, path, JSON body) of a write.
type Write = (&'static str, &'static str, &'static str);

/// (entity, read path, TTL-table seconds, write that changes it, JSON pointer, expected value after).
type EntityRow = (&'static str, &'static str, u64, Write, &'static str, &'static str);

#[rustfmt::skip]
const ENTITIES: [EntityRow; 10] = [
    ("task",           "/api/tasks/{task}",               300,  ("PATCH", "/api/tasks/{task}", r#"{"title":"changed"}"#),           "/title",          "changed"),
    ("task list",      "/api/projects/{project}/tasks",   300,  ("PATCH", "/api/tasks/{task}", r#"{"title":"changed"}"#),           "/items/0/title",  "changed"),
    ("my tasks",       "/api/users/me/tasks",             300,  ("PATCH", "/api/tasks/{task}", r#"{"title":"changed"}"#),           "/items/0/title",  "changed"),
    ("project",        "/api/projects/{project}",         600,  ("PATCH", "/api/projects/{project}", r#"{"name":"changed"}"#),      "/name",           "changed"),
    ("project list",   "/api/workspaces/{workspace}/projects", 600, ("PATCH", "/api/projects/{project}", r#"{"name":"changed"}"#), "/0/name",       "changed"),
    ("workspace",      "/api/workspaces/{workspace}",     1800, ("PATCH", "/api/workspaces/{workspace}", r#"{"name":"changed"}"#), "/name",          "changed"),
    ("workspace list", "/api/workspaces",                 1800, ("PATCH", "/api/workspaces/{workspace}", r#"{"name":"changed"}"#), "/0/name",        "changed"),
    ("members",        "/api/workspaces/{workspace}/members", 1800, ("PATCH", "/api/users/me", r#"{"name":"changed"}"#),        "/0/name",         "changed"),
    ("user",           "/api/users/me",                   3600, ("PATCH", "/api/users/me", r#"{"name":"changed"}"#),            "/name",           "changed"),
    ("daily metrics",  "/api/workspaces/{workspace}/metrics/daily?from={today}&to={today}", 900, ("PATCH", "/api/tasks/{task}", r#"{"status":"done"}"#), "/days/0/completed", "1"),
];

/// The remaining lifetime a hit reports in `Cache-Status: nestling; hit; ttl=<seconds>`.
fn hit_ttl(response: &crate::helpers::TestResponse) -> u64 {
    let header = response.header("cache-status").unwrap_or_default();
    header
        .strip_prefix("nestling; hit; ttl=")
        .and_then(|rest| rest.split(';').next())
        .and_then(|secs| secs.parse().ok())
        .unwrap_or_else(|| panic!("Cache-Status is {header:?}"))
}

fn pointer_text(body: &Value, pointer: &str) -> String {
    match body.pointer(pointer) {
        Some(Value::String(text)) => text.clone(),
        Some(other) => other.to_string(),
        None => panic!("{pointer} missing in {body}"),
    }
}

/// Every entity: a miss, then an L1 hit with the same body, a TTL from the TTL table (an upper
/// bound: jitter only shortens it) and an ETag that revalidates to 304; after a write, the next
/// read is fresh and the old ETag no longer matches.
async fn every_entity_is_cached_and_fresh_after_writes(app: &TestApp) {
    for (entity, read, ttl, (method, write_path, write_body), pointer, expected) in ENTITIES {
        let world = World::create(app).await;
        let token = &world.user.token;
        let path = world.fill(read);
        // The first read may already hit: setting up the world reads some entities.
        let first = app.get(&path, token).await;
        first.assert_status(200);
        let second = app.get(&path, token).await;
        assert_eq!(second.header("x-cache"), Some("HIT-L1"), "{entity}: second read");
        assert_eq!(second.body, first.body, "{entity}: a hit serves the same body");
        let age = hit_ttl(&second);
        assert!(
            age <= ttl && age + 5 + ttl * 5 / 100 >= ttl,
            "{entity}: ttl {age} for a TTL of {ttl}"
        );
        assert_eq!(second.header("cache-control"), Some("private, no-cache"), "{entity}");
        let etag = second
            .header("etag")
            .unwrap_or_else(|| panic!("{entity}: no ETag"))
            .to_owned();
        assert_eq!(
            first.header("etag"),
            Some(etag.as_str()),
            "{entity}: same body, same ETag"
        );
        let revalidated = app.conditional_get(&path, token, &etag).await;
        revalidated.assert_status(304);
        assert_eq!(
            (revalidated.text.as_str(), revalidated.header("etag")),
            ("", Some(etag.as_str())),
            "{entity}: 304"
        );

        let method: Method = method.parse().unwrap();
        let body: Value = serde_json::from_str(write_body).unwrap();
        app.request(method, &world.fill(write_path), Some(token), Some(body))
            .await
            .assert_status(200);
        let after = app.get(&path, token).await;
        assert_eq!(
            pointer_text(&after.body, pointer),
            expected,
            "{entity}: fresh after the write: {}",
            after.text
        );
        assert_eq!(
            after.header("x-cache"),
            Some("MISS"),
            "{entity}: the write invalidated it"
        );
        assert_eq!(
            after.header("cache-status"),
            Some("nestling; fwd=miss; stored"),
            "{entity}"
        );
        let changed = app.conditional_get(&path, token, &etag).await;
        changed.assert_status(200);
        assert_ne!(
            changed.header("etag"),
            Some(etag.as_str()),
            "{entity}: new body, new ETag"
        );
    }
}

#[tokio::test]
async fn in_memory_mode_every_entity_is_cached_and_fresh_after_writes() {
    let app = TestApp::spawn().await;
    every_entity_is_cached_and_fresh_after_writes(&app).await;
}

#[tokio::test]
async fn with_redis_every_entity_is_cached_and_fresh_after_writes() {
    every_entity_is_cached_and_fresh_after_writes_on(Backend::redis().await).await;
}

pub(crate) async fn every_entity_is_cached_and_fresh_after_writes_on(backend: Backend) {
    let app = TestApp::builder().backend(backend).spawn().await;
    every_entity_is_cached_and_fresh_after_writes(&app).await;
}

#[tokio::test]
async fn a_second_instance_reads_from_redis_and_sees_the_first_instances_writes() {
    a_second_instance_reads_from_redis_and_sees_the_first_instances_writes_on(Backend::redis().await).await;
}

pub(crate) async fn a_second_instance_reads_from_redis_and_sees_the_first_instances_writes_on(backend: Backend) {
    let a = TestApp::builder().backend(backend).spawn().await;
    let b = backend.sibling(&a).await;
    let world = World::create(&a).await;
    let token = &world.user.token;
    let path = world.fill("/api/tasks/{task}");

    assert_eq!(a.get(&path, token).await.header("x-cache"), Some("MISS"));
    let from_b = b.get(&path, token).await;
    assert_eq!(
        from_b.header("x-cache"),
        Some("HIT-L2"),
        "B finds what A loaded: {}",
        from_b.text
    );
    b.read_until_l1_hit(&path, token, "after B's first read").await;

    // Propagation: after A's write returns, how long until B (which holds the task in L1) serves it?
    let mut delays = Vec::new();
    for trial in 0..200 {
        let title = format!("title {trial}");
        a.patch(&path, token, json!({ "title": title }))
            .await
            .assert_status(200);
        let written = Instant::now();
        loop {
            let seen = b.get(&path, token).await;
            if seen.body["title"] == title.as_str() {
                delays.push(written.elapsed());
                break;
            }
            assert!(written.elapsed() < Duration::from_secs(2), "B never saw trial {trial}");
        }
        // Warm B's L1 again so the next trial measures invalidation, not a miss.
        b.read_until_l1_hit(&path, token, &format!("trial {trial}")).await;
    }
    delays.sort();
    let (p50, p99) = (delays[delays.len() / 2], delays[delays.len() * 99 / 100 - 1]);
    // Invalidation travels by pub/sub: typically a few milliseconds. The bounds leave room for a
    // loaded machine (the whole suite runs beside this) and still fail if B waited for its L1
    // entry to age out instead (CACHE_L1_UNSYNCED_TTL_MS, 500 ms, or the TTL itself).
    assert!(
        p50 <= Duration::from_millis(50),
        "median propagation {p50:?} (p99 {p99:?})"
    );
    assert!(
        p99 < Duration::from_millis(400),
        "p99 propagation {p99:?} (median {p50:?})"
    );
}

#[tokio::test]
async fn redis_pttl_of_every_key_kind_follows_the_ttl_table() {
    let redis = tokio::task::spawn_blocking(shared_redis).await.unwrap();
    let app = TestApp::builder()
        .redis(redis)
        .settings(|s| s.ttl.tasks = Duration::from_secs(120))
        .spawn()
        .await;
    let world = World::create(&app).await;
    for (_, read, ..) in ENTITIES {
        app.get(&world.fill(read), &world.user.token).await.assert_status(200);
    }
    let mut conn = redis.connection().await;
    let prefix = app.settings.redis.key_prefix.clone();
    let keys = keys_under(&mut conn, &prefix).await;
    let ttl = &app.settings.ttl;
    #[rustfmt::skip]
    let expected = [
        ("tasks:", ttl.tasks), ("task-lists:", ttl.tasks), ("projects:", ttl.projects),
        ("project-lists:", ttl.projects), ("workspaces:", ttl.workspaces), ("workspace-lists:", ttl.workspaces),
        ("members:", ttl.workspaces), ("users:", ttl.user), ("auth-tokens:", ttl.auth_token),
        ("daily-metrics:", ttl.daily_metrics),
    ];
    for (kind, ttl) in expected {
        let key = keys
            .iter()
            .find(|k| k.strip_prefix(&prefix).is_some_and(|rest| rest.starts_with(kind)))
            .unwrap_or_else(|| panic!("no {kind} key among {keys:?}"));
        let pttl: i64 = conn.pttl(key).await.unwrap();
        let ttl_ms = ttl.as_millis() as i64;
        let jitter = ttl_ms * app.settings.cache.ttl_jitter_percent as i64 / 100;
        // The table is an upper bound: jitter only shortens a lifetime.
        assert!(
            pttl <= ttl_ms && pttl >= ttl_ms - jitter - 5_000,
            "{key}: PTTL {pttl} ms, TTL {ttl_ms} ms"
        );
    }
    assert_eq!(
        app.settings.ttl.tasks,
        Duration::from_secs(120),
        "CACHE_TTL_TASKS override in use"
    );
}

#[tokio::test]
async fn with_redis_disabled_the_domain_works_and_redis_receives_no_connection() {
    let redis = private_redis().await;
    let connections_before = redis.connections_received().await;
    let url = redis.url();
    let app = TestApp::builder()
        .settings(move |s| {
            s.redis.enabled = false;
            s.redis.url = url;
        })
        .spawn()
        .await;
    every_entity_is_cached_and_fresh_after_writes(&app).await;
    let health = app.request(Method::GET, "/health", None, None).await;
    assert_eq!(health.body["details"]["redis"]["status"], "disabled");
    assert_eq!(health.body["details"]["cache"]["mode"], "memory");
    assert_eq!(
        redis.connections_received().await,
        connections_before + 1,
        "memory mode opened a Redis connection (the one more is this check's own)"
    );
}

#[tokio::test]
async fn with_l1_off_a_task_list_waits_for_two_redis_round_trips() {
    // The session, then the project, the membership and the page in one pipeline. Counted by the
    // server itself, on a Redis of this test's own.
    let redis = private_redis().await;
    let url = redis.url();
    let app = TestApp::builder()
        .settings(move |s| {
            s.redis.enabled = true;
            s.redis.url = url;
            s.cache.l1_enabled = false;
            // The limiter's own calls are another matter (see rate_limit.rs).
            s.rate_limit.enabled = false;
        })
        .spawn()
        .await;
    let world = World::create(&app).await;
    let path = world.fill("/api/projects/{project}/tasks?limit=20");
    for _ in 0..2 {
        app.get(&path, &world.user.token).await.assert_status(200);
    }
    const READS: u64 = 20;
    let before = redis.reads_processed().await;
    for _ in 0..READS {
        let read = app.get(&path, &world.user.token).await;
        read.assert_status(200);
        assert_eq!(read.header("x-cache"), Some("HIT-L2"));
    }
    // Slack for the two counting connections' own reads and a health ping.
    let round_trips = redis.reads_processed().await - before;
    assert!(
        round_trips <= 2 * READS + 5,
        "{round_trips} Redis round trips for {READS} list reads"
    );
}

async fn cache_stats(app: &TestApp) -> Value {
    let response = app.request(Method::GET, "/admin/cache/stats", Some(ADMIN), None).await;
    response.assert_status(200);
    response.body
}

fn misses(stats: &Value, namespace: &str) -> u64 {
    stats["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|ns| ns["namespace"] == namespace)
        .and_then(|ns| ns["misses"].as_u64())
        .unwrap_or_else(|| panic!("no {namespace} in {stats}"))
}

#[tokio::test]
async fn a_thousand_concurrent_cold_reads_run_the_loader_once() {
    let app = TestApp::builder().settings(with_admin).spawn().await;
    let world = World::create(&app).await;
    let path = world.fill("/api/tasks/{task}");
    let before = misses(&cache_stats(&app).await, "tasks");
    let responses = join_all((0..1000).map(|_| app.get(&path, &world.user.token))).await;
    assert!(responses.iter().all(|r| r.status == 200), "every read succeeds");
    let stats = cache_stats(&app).await;
    let after = misses(&stats, "tasks");
    assert_eq!(after - before, 1, "the task loader ran {} times", after - before);
    let tasks = stats["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|ns| ns["namespace"] == "tasks")
        .unwrap();
    assert_eq!(tasks["l1Entries"], 1, "one task held in L1: {tasks}");
}

#[tokio::test]
async fn admin_routes_need_the_admin_token_or_a_user_with_the_admin_role() {
    let app = TestApp::builder().settings(with_admin).spawn().await;
    let stats = |token: Option<String>| {
        let app = &app;
        async move {
            app.request(Method::GET, "/admin/cache/stats", token.as_deref(), None)
                .await
        }
    };
    stats(None).await.assert_error(401, "missing_token");
    stats(Some("wrong".into()))
        .await
        .assert_error(401, "invalid_admin_token");
    stats(Some(ADMIN.into())).await.assert_status(200);
    let user = app.register_user().await;
    stats(Some(user.token.clone())).await.assert_error(403, "forbidden");

    let deadline = Duration::from_secs(1);
    assert!(set_admin(&app.db, &user.email, true, deadline).await.unwrap());
    stats(Some(user.token.clone())).await.assert_status(200);
    // Read fresh on every admin request: a revoke applies to the very next one.
    assert!(set_admin(&app.db, &user.email, false, deadline).await.unwrap());
    stats(Some(user.token.clone())).await.assert_error(403, "forbidden");
    assert!(!set_admin(&app.db, "nobody@example.com", true, deadline).await.unwrap());
}

#[tokio::test]
async fn without_admin_token_only_users_with_the_admin_role_reach_admin_routes() {
    let app = TestApp::spawn().await;
    app.request(Method::GET, "/admin/cache/stats", Some(ADMIN), None)
        .await
        .assert_error(401, "invalid_admin_token");
    let user = app.register_user().await;
    app.request(Method::GET, "/admin/cache/stats", Some(&user.token), None)
        .await
        .assert_error(403, "forbidden");
    set_admin(&app.db, &user.email, true, Duration::from_secs(1))
        .await
        .unwrap();
    app.request(Method::GET, "/admin/cache/stats", Some(&user.token), None)
        .await
        .assert_status(200);
}

#[tokio::test]
async fn flushing_a_namespace_deletes_exactly_its_keys_with_scan_and_unlink() {
    let redis = tokio::task::spawn_blocking(shared_redis).await.unwrap();
    let app = TestApp::builder().redis(redis).settings(with_admin).spawn().await;
    let prefix = app.settings.redis.key_prefix.clone();
    let mut conn = redis.connection().await;
    // 100,000 keys in the tasks namespace (written directly: the API would take minutes), and one
    // key of another namespace that must survive.
    for chunk in 0..100 {
        let mut pipe = redis::pipe();
        for i in 0..1000 {
            pipe.cmd("SET")
                .arg(format!("{prefix}tasks:bulk-{chunk}-{i}"))
                .arg("{}")
                .ignore();
        }
        pipe.query_async::<()>(&mut conn).await.unwrap();
    }
    let _: () = conn.set(format!("{prefix}projects:survivor"), "{}").await.unwrap();
    let keys_calls_before = command_calls(&mut conn, "keys").await;

    let world = World::create(&app).await;
    let reads = async {
        let mut served = 0;
        for _ in 0..50 {
            app.get(&world.fill("/api/tasks/{task}"), &world.user.token)
                .await
                .assert_status(200);
            served += 1;
        }
        served
    };
    let flush = app.request(Method::DELETE, "/admin/cache?namespace=tasks", Some(ADMIN), None);
    let (flushed, served) = tokio::join!(flush, reads);
    flushed.assert_status(200);
    assert_eq!(served, 50, "reads were served during the flush");
    let deleted = flushed.body["deleted"].as_u64().unwrap();
    // The 100,000 bulk keys, plus the task key if a concurrent read had cached it.
    assert!((100_000..=100_001).contains(&deleted), "deleted {deleted}");
    let left: Option<String> = conn.get(format!("{prefix}tasks:bulk-0-0")).await.unwrap();
    assert!(left.is_none());
    let survivor: Option<String> = conn.get(format!("{prefix}projects:survivor")).await.unwrap();
    assert!(survivor.is_some(), "other namespaces are untouched");
    assert_eq!(
        command_calls(&mut conn, "keys").await,
        keys_calls_before,
        "KEYS was used"
    );
}

async fn command_calls(conn: &mut redis::aio::MultiplexedConnection, command: &str) -> u64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(conn).await.unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn flush_refuses_patterns_outside_the_prefix_and_unknown_namespaces() {
    let app = TestApp::builder().settings(with_admin).spawn().await;
    let prefix = app.settings.redis.key_prefix.clone();
    #[rustfmt::skip]
    let cases = [
        ("a bare star", "pattern=*".to_owned()),
        ("the prefix and a star", format!("pattern={prefix}*")),
        ("the fill-version keys", format!("pattern={prefix}version:*")),
        ("the rate-limit keys", format!("pattern={prefix}rl:*")),
        ("a namespace without its colon", format!("pattern={prefix}task*")),
        ("a character class", format!("pattern={prefix}tasks:[ab]*")),
        ("another prefix", "pattern=other:tasks:*".to_owned()),
        ("an unknown namespace", "namespace=everything".to_owned()),
        ("both namespace and pattern", format!("namespace=tasks&pattern={prefix}tasks:*")),
        ("neither", String::new()),
    ];
    for (case, query) in cases {
        let response = app
            .request(Method::DELETE, &format!("/admin/cache?{query}"), Some(ADMIN), None)
            .await;
        assert_eq!(response.status, 400, "{case}: {}", response.text);
    }
}

#[tokio::test]
async fn the_runtime_switch_flips_a_live_instance_both_ways_without_failed_requests() {
    the_runtime_switch_flips_a_live_instance_both_ways_without_failed_requests_on(Backend::redis().await).await;
}

pub(crate) async fn the_runtime_switch_flips_a_live_instance_both_ways_without_failed_requests_on(backend: Backend) {
    let app = TestApp::builder().backend(backend).settings(with_admin).spawn().await;
    let world = World::create(&app).await;
    let path = world.fill("/api/projects/{project}/tasks");
    let mode = |app: &TestApp| {
        let app_address = app.url("/health");
        let client = app.client.clone();
        async move {
            client
                .get(app_address)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    assert_eq!(mode(&app).await["details"]["cache"]["mode"], "redis");

    let reads = async {
        let mut failures = 0;
        for _ in 0..200 {
            if app.get(&path, &world.user.token).await.status != 200 {
                failures += 1;
            }
        }
        failures
    };
    let switches = async {
        for redis_on in [false, true, false, true] {
            let switched = app
                .request(
                    Method::POST,
                    "/admin/cache/mode",
                    Some(ADMIN),
                    Some(json!({ "redis": redis_on })),
                )
                .await;
            switched.assert_status(200);
            // REDIS_URL is set (the harness sets it): off means memory-synced, not strict memory.
            assert_eq!(switched.body["mode"], if redis_on { "redis" } else { "memory-synced" });
        }
    };
    let (failures, ()) = tokio::join!(reads, switches);
    assert_eq!(failures, 0);
    assert_eq!(mode(&app).await["details"]["cache"]["mode"], "redis");
}

#[tokio::test]
async fn across_two_instances_every_entity_read_on_b_is_fresh_after_a_write_on_a() {
    every_entity_read_on_b_is_fresh_after_a_write_on_a(Backend::redis().await).await;
}

pub(crate) async fn every_entity_read_on_b_is_fresh_after_a_write_on_a(backend: Backend) {
    let a = TestApp::builder().backend(backend).spawn().await;
    let b = backend.sibling(&a).await;
    for (entity, read, _, (method, write_path, write_body), pointer, expected) in ENTITIES {
        let world = World::create(&a).await;
        let token = &world.user.token;
        let path = world.fill(read);
        // The invalidations of the world's own creation may reach B after its first read (on a
        // cluster they travel through the cluster bus).
        b.read_until_l1_hit(&path, token, entity).await;

        let method: Method = method.parse().unwrap();
        let body: Value = serde_json::from_str(write_body).unwrap();
        a.request(method, &world.fill(write_path), Some(token), Some(body))
            .await
            .assert_status(200);
        // Propagation is asynchronous (pub/sub): wait for B to drop its copy, at most 2 s.
        let fresh = |seen: &TestResponse| pointer_text(&seen.body, pointer) == expected;
        b.read_until(&path, token, &format!("{entity}: B serves the write"), fresh)
            .await;
    }
}

#[tokio::test]
async fn logout_on_one_instance_revokes_the_token_on_every_instance() {
    logout_on_one_instance_revokes_the_token_on_every_instance_on(Backend::redis().await).await;
}

pub(crate) async fn logout_on_one_instance_revokes_the_token_on_every_instance_on(backend: Backend) {
    let a = TestApp::builder().backend(backend).spawn().await;
    let b = backend.sibling(&a).await;
    let user = a.register_user().await;
    b.get("/api/users/me", &user.token).await.assert_status(200);
    b.get("/api/users/me", &user.token).await.assert_status(200);
    a.request(Method::POST, "/api/auth/logout", Some(&user.token), None)
        .await
        .assert_status(204);
    b.read_until("/api/users/me", &user.token, "B refuses the revoked token", |me| {
        me.status == 401
    })
    .await
    .assert_error(401, "invalid_token");
}

/// An owner's project with a plain member in its workspace: the two users, the project's path,
/// its task list's and the member's removal path.
async fn a_project_with_a_member(app: &TestApp) -> (TestUser, TestUser, String, String, String) {
    let (owner, workspace, project) = app.user_with_project().await;
    let member = app.register_user().await;
    let workspace_id = workspace["id"].as_str().unwrap();
    app.add_member(&owner, workspace_id, &member).await;
    let project = format!("/api/projects/{}", project["id"].as_str().unwrap());
    let tasks = format!("{project}/tasks");
    let removal = format!("/api/workspaces/{workspace_id}/members/{}", member.id);
    (owner, member, project, tasks, removal)
}

/// The task list's authorization (the project's workspace and the membership, kept beside the
/// cache entries it was read from) ends with them: a member removed from the workspace, or
/// anyone after the project is deleted, gets 404 on the next read, though the list was just
/// served from L1.
#[tokio::test]
async fn a_removed_member_and_a_deleted_project_lose_the_task_list_at_once() {
    let app = TestApp::spawn().await;
    let (owner, member, project, tasks, removal) = a_project_with_a_member(&app).await;
    app.read_until_l1_hit(&tasks, &member.token, "the member's task list")
        .await;
    app.read_until_l1_hit(&tasks, &owner.token, "the owner's task list")
        .await;

    app.delete(&removal, &owner.token).await.assert_status(204);
    app.get(&tasks, &member.token)
        .await
        .assert_error(404, "project_not_found");
    app.get(&tasks, &owner.token).await.assert_status(200);

    app.delete(&project, &owner.token).await.assert_status(204);
    app.get(&tasks, &owner.token)
        .await
        .assert_error(404, "project_not_found");
}

/// What is kept beside the cache entries (a session, a member's access) lives no longer than
/// `CACHE_L1_MAX_TTL`, like the entries, not for the TTL table's 7200 s of a token: a change
/// made where no invalidation is sent (by SQL) ends it within that bound.
#[tokio::test]
async fn a_session_and_a_membership_deleted_in_sql_end_within_cache_l1_max_ttl() {
    let app = TestApp::builder()
        .settings(|s| s.cache.l1_max_ttl = Duration::from_secs(1))
        .spawn()
        .await;
    let (owner, member, _, tasks, _) = a_project_with_a_member(&app).await;
    app.read_until_l1_hit(&tasks, &member.token, "the member's task list")
        .await;
    app.get("/api/users/me", &owner.token).await.assert_status(200);

    let removed = sqlx::query("DELETE FROM workspace_members WHERE user_id = $1")
        .bind(member.id)
        .execute(&app.db)
        .await
        .unwrap();
    assert_eq!(removed.rows_affected(), 1);
    let logged_out = sqlx::query("DELETE FROM auth_tokens WHERE user_id = $1")
        .bind(owner.id)
        .execute(&app.db)
        .await
        .unwrap();
    assert_eq!(logged_out.rows_affected(), 1);
    // `read_until` gives up after 2 s: past the 1 s bound, far short of the 7200 s.
    app.read_until(&tasks, &member.token, "the removed member is refused", |r| {
        r.status == 404
    })
    .await
    .assert_error(404, "project_not_found");
    app.read_until("/api/users/me", &owner.token, "the deleted token is refused", |r| {
        r.status == 401
    })
    .await
    .assert_error(401, "invalid_token");
}

#[tokio::test]
async fn a_member_removed_on_one_instance_loses_the_task_list_on_every_instance() {
    a_member_removed_on_one_instance_loses_the_task_list_on_every_instance_on(Backend::redis().await).await;
}

pub(crate) async fn a_member_removed_on_one_instance_loses_the_task_list_on_every_instance_on(backend: Backend) {
    let a = TestApp::builder().backend(backend).spawn().await;
    let b = backend.sibling(&a).await;
    let (owner, member, _, tasks, removal) = a_project_with_a_member(&a).await;
    b.read_until_l1_hit(&tasks, &member.token, "the member's task list on B")
        .await;

    a.delete(&removal, &owner.token).await.assert_status(204);
    // Propagation is asynchronous (pub/sub): at most 2 s.
    let refused = |seen: &TestResponse| seen.status == 404;
    b.read_until(&tasks, &member.token, "B refuses the removed member", refused)
        .await
        .assert_error(404, "project_not_found");
}

#[tokio::test]
async fn a_no_cache_request_reads_fresh_from_postgres_and_says_bypass() {
    let app = TestApp::spawn().await;
    let world = World::create(&app).await;
    let path = world.fill("/api/tasks/{task}");
    app.get(&path, &world.user.token).await;
    assert_eq!(
        app.get(&path, &world.user.token).await.header("x-cache"),
        Some("HIT-L1")
    );
    // A change behind the cache's back (no API call can make one): only a bypass can see it.
    sqlx::query("UPDATE tasks SET title = 'changed behind the cache' WHERE id = $1::uuid")
        .bind(&world.task)
        .execute(&app.db)
        .await
        .unwrap();
    let bypass = app.get_fresh(&path, &world.user.token).await;
    assert_eq!(bypass.header("x-cache"), Some("BYPASS"));
    assert_eq!(bypass.header("cache-control"), Some("private, no-cache"));
    assert_eq!(bypass.header("cache-status"), Some("nestling; fwd=request"));
    assert!(bypass.header("etag").is_some(), "a bypass answers with an ETag too");
    assert_eq!(bypass.body["title"], "changed behind the cache");
    let cached = app.get(&path, &world.user.token).await;
    assert_eq!(
        (cached.header("x-cache"), cached.body["title"].as_str()),
        (Some("HIT-L1"), Some("original"))
    );
}

#[tokio::test]
async fn deleting_a_workspace_drops_its_tasks_from_my_tasks_at_once() {
    let app = TestApp::spawn().await;
    let world = World::create(&app).await;
    let token = &world.user.token;
    assert_eq!(
        app.get("/api/users/me/tasks", token).await.body["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        app.get("/api/users/me/tasks", token).await.header("x-cache"),
        Some("HIT-L1")
    );
    app.delete(&world.fill("/api/workspaces/{workspace}"), token)
        .await
        .assert_status(204);
    let after = app.get("/api/users/me/tasks", token).await;
    assert_eq!(
        after.body["items"],
        json!([]),
        "deleted tasks still listed: {}",
        after.text
    );
}

/// A deploy that changes an entry's format meets the old entries in a shared Redis. The session
/// entry changed from JSON to 24 bytes: an old one is dropped and the token read again from
/// Postgres, instead of a 500 on every request until it expires.
#[tokio::test]
async fn a_session_cached_in_an_older_format_is_read_again_instead_of_failing() {
    use sha2::{Digest, Sha256};
    let redis = tokio::task::spawn_blocking(shared_redis).await.unwrap();
    let app = TestApp::builder().redis(redis).spawn().await;
    app.wait_for_subscription().await;
    let user = app.register_user().await;
    let key = format!(
        "{}auth-tokens:{{{}}}",
        app.settings.redis.key_prefix,
        hex::encode(Sha256::digest(user.token.as_bytes()))
    );
    let mut conn = redis.connection().await;
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    let old_format = json!({ "user_id": user.id, "expires_at_ms": i64::MAX }).to_string();
    let stamped = format!("{}:{old_format}", secs * 1000 + micros / 1000);
    let _: () = conn.set_ex(&key, stamped, 600).await.unwrap();

    let me = app.get("/api/users/me", &user.token).await;
    me.assert_status(200);
    assert_eq!(me.body["id"], user.id.to_string());
    let rewritten: Vec<u8> = conn.get(&key).await.unwrap();
    assert_eq!(
        rewritten.len() - header_len(&rewritten),
        24,
        "the entry is rewritten in the current format"
    );
}

/// Off and on again quickly, before the subscriber noticed: L2 must be trusted again once the
/// instance listens, not distrusted for good ([4/6], item 8).
#[tokio::test]
async fn switching_redis_off_and_on_quickly_serves_from_l2_again_within_2_s() {
    switching_redis_off_and_on_quickly_serves_from_l2_again_within_2_s_on(Backend::redis().await).await;
}

pub(crate) async fn switching_redis_off_and_on_quickly_serves_from_l2_again_within_2_s_on(backend: Backend) {
    let app = TestApp::builder()
        .backend(backend)
        .settings(|s| {
            with_admin(s);
            // Every read goes to L2: what this test watches.
            s.cache.l1_enabled = false;
        })
        .spawn()
        .await;
    let world = World::create(&app).await;
    let path = world.fill("/api/tasks/{task}");
    app.get(&path, &world.user.token).await.assert_status(200);
    assert_eq!(
        app.get(&path, &world.user.token).await.header("x-cache"),
        Some("HIT-L2")
    );
    for redis_on in [false, true] {
        let body = json!({ "redis": redis_on });
        let switched = app
            .request(Method::POST, "/admin/cache/mode", Some(ADMIN), Some(body))
            .await;
        switched.assert_status(200);
    }
    let from_l2 = |read: &TestResponse| {
        read.assert_status(200);
        read.header("x-cache") == Some("HIT-L2")
    };
    app.read_until(&path, &world.user.token, "served from L2 again", from_l2)
        .await;
}

/// A pattern with a glob inside (not only at the end) drops the matching entries from this
/// instance's L1 too, as it does in Redis ([4/6], item 9).
#[tokio::test]
async fn flushing_with_an_interior_glob_drops_the_matching_l1_entries() {
    let app = TestApp::builder().settings(with_admin).spawn().await;
    let world = World::create(&app).await;
    let path = world.fill("/api/tasks/{task}");
    app.get(&path, &world.user.token).await.assert_status(200);
    assert_eq!(
        app.get(&path, &world.user.token).await.header("x-cache"),
        Some("HIT-L1")
    );
    let tail = &world.task[world.task.len() - 6..];
    let pattern = format!("{}tasks:*{tail}*", app.settings.redis.key_prefix);
    let flushed = app
        .request(
            Method::DELETE,
            &format!("/admin/cache?pattern={pattern}"),
            Some(ADMIN),
            None,
        )
        .await;
    flushed.assert_status(200);
    assert_eq!(flushed.body["deleted"], 1, "{}", flushed.text);
    assert_eq!(app.get(&path, &world.user.token).await.header("x-cache"), Some("MISS"));
}

/// Every key under `prefix`, by SCAN.
async fn keys_under(conn: &mut redis::aio::MultiplexedConnection, prefix: &str) -> Vec<String> {
    let mut iter: redis::AsyncIter<String> = conn.scan_match(format!("{prefix}*")).await.unwrap();
    let mut keys = Vec::new();
    while let Some(key) = futures_util::StreamExt::next(&mut iter).await {
        keys.push(key.unwrap());
    }
    keys
}

/// Rewrites every cache entry under the app's prefix in Redis (strings and hash fields, TTLs
/// kept), as another deploy sharing the Redis would have written them.
async fn rewrite_every_entry(app: &TestApp, rewrite: impl Fn(&[u8]) -> Vec<u8>) {
    let mut conn = shared_redis().connection().await;
    let prefix = app.settings.redis.key_prefix.clone();
    let keys = keys_under(&mut conn, &prefix).await;
    let mut rewritten = 0;
    for key in keys {
        let rest = key.strip_prefix(&prefix).unwrap();
        if rest.starts_with("version:") || rest.starts_with("rl:") {
            continue;
        }
        let kind: String = redis::cmd("TYPE").arg(&key).query_async(&mut conn).await.unwrap();
        if kind == "hash" {
            let fields: Vec<(String, Vec<u8>)> = conn.hgetall(&key).await.unwrap();
            for (field, value) in fields {
                let _: () = conn.hset(&key, field, rewrite(&value)).await.unwrap();
                rewritten += 1;
            }
        } else if kind == "string" {
            let value: Vec<u8> = conn.get(&key).await.unwrap();
            let _: () = redis::cmd("SET")
                .arg(&key)
                .arg(rewrite(&value))
                .arg("KEEPTTL")
                .query_async(&mut conn)
                .await
                .unwrap();
            rewritten += 1;
        }
    }
    assert!(rewritten >= ENTITIES.len(), "only {rewritten} entries to rewrite");
}

/// Length of a stored entry's header: `<written at, ms>:`, then `<format version>:` where the
/// layout has one.
fn header_len(stored: &[u8]) -> usize {
    let first = stored.iter().position(|b| *b == b':').expect("stamped entry") + 1;
    let rest = &stored[first..];
    match rest.iter().position(|b| *b == b':') {
        Some(n) if n > 0 && rest[..n].iter().all(u8::is_ascii_digit) => first + n + 1,
        _ => first,
    }
}

/// Reads every entity on A (filling Redis), rewrites the entries, and reads them again on a new
/// instance B (empty L1): B must answer what A answered. Returns B's `X-Cache` per entity.
async fn reads_after_another_deploy_rewrote_the_entries(rewrite: impl Fn(&[u8]) -> Vec<u8>) -> Vec<String> {
    let a = TestApp::builder().redis(shared_redis()).spawn().await;
    let world = World::create(&a).await;
    let mut bodies = Vec::new();
    for (_, read, ..) in ENTITIES {
        let response = a.get(&world.fill(read), &world.user.token).await;
        response.assert_status(200);
        bodies.push(response.body);
    }
    rewrite_every_entry(&a, rewrite).await;
    let b = TestApp::builder().sibling_of(&a).spawn().await;
    let mut tiers = Vec::new();
    for ((entity, read, ..), expected) in ENTITIES.iter().zip(bodies) {
        let response = b.get(&world.fill(read), &world.user.token).await;
        assert_eq!(response.body, expected, "{entity} on B: {}", response.text);
        tiers.push(response.header("x-cache").unwrap_or_default().to_owned());
    }
    tiers
}

#[tokio::test]
async fn an_entry_that_does_not_decode_is_dropped_and_loaded_again_for_every_entity() {
    reads_after_another_deploy_rewrote_the_entries(|stored| {
        let mut changed = stored[..header_len(stored)].to_vec();
        changed.extend_from_slice(br#"{"unexpected":true}"#);
        changed
    })
    .await;
}

#[tokio::test]
async fn an_entry_of_another_format_version_is_not_served_even_if_it_decodes() {
    let tiers = reads_after_another_deploy_rewrote_the_entries(|stored| {
        let header = header_len(stored);
        let written_at = &stored[..stored.iter().position(|b| *b == b':').unwrap()];
        let mut changed = written_at.to_vec();
        changed.extend_from_slice(b":999:");
        changed.extend_from_slice(&stored[header..]);
        changed
    })
    .await;
    // Nothing comes from Redis (an entry B itself loaded a moment before may be an L1 hit).
    assert!(tiers.iter().all(|tier| tier != "HIT-L2"), "{tiers:?}");
}
