//! Postgres failures, on a private server each test owns: a frozen (SIGSTOP) or killed
//! server turns requests into fast 503s, never hung requests, and the app recovers after.

use std::time::{Duration, Instant};

use crate::helpers::{private_postgres, TestApp, TestPostgres};
use reqwest::Method;
use serde_json::json;

const DEADLINE: Duration = Duration::from_millis(500);

fn short_timeouts(s: &mut nestling::config::Settings) {
    s.database.statement_timeout = DEADLINE;
    s.database.acquire_timeout = DEADLINE;
    s.database.health_timeout = DEADLINE;
}

#[tokio::test]
async fn a_frozen_postgres_turns_requests_into_503_within_the_deadline() {
    let postgres = private_postgres().await;
    let app = TestApp::builder()
        .postgres(&postgres)
        .settings(short_timeouts)
        .spawn()
        .await;
    let user = app.register_user().await;
    app.get("/api/users/me", &user.token).await.assert_status(200);

    postgres.freeze();
    let uncached = format!("/api/workspaces/{}", uuid::Uuid::new_v4());
    let requests = [
        (
            "a write",
            Method::POST,
            "/api/workspaces",
            Some(json!({ "name": "while frozen" })),
        ),
        ("an uncached read", Method::GET, uncached.as_str(), None),
    ];
    for (what, method, path, body) in requests {
        let started = Instant::now();
        let response = app.request(method, path, Some(&user.token), body).await;
        let took = started.elapsed();
        response.assert_error(503, "database_unavailable");
        assert!(took < DEADLINE * 3, "{what} took {took:?} with a {DEADLINE:?} deadline");
    }
    // What the cache holds is still served while Postgres is frozen (not the workspace list:
    // the failed write above may have committed, so it invalidated the list).
    let cached = app.get("/api/users/me", &user.token).await;
    cached.assert_status(200);
    assert_eq!(cached.header("x-cache"), Some("HIT-L1"));
    let ready = app.request(Method::GET, "/health/ready", None, None).await;
    ready.assert_status(503);
    assert_eq!(ready.body["error"]["database"]["status"], "down");

    postgres.thaw();
    let recovered = wait_for_status(&app, "/health/ready", 200).await;
    assert!(recovered, "readiness came back after SIGCONT");
    // A write proves Postgres itself is back (reads may come from the cache).
    app.post("/api/workspaces", &user.token, json!({ "name": "after" }))
        .await
        .assert_status(201);
}

/// An app on `postgres` with sqlx's defaults in place of the deadlines (no statement deadline,
/// 30 s acquire): the controls' setting.
async fn with_library_defaults(postgres: &TestPostgres) -> TestApp {
    TestApp::builder()
        .postgres(postgres)
        .settings(|s| {
            s.database.statement_timeout = Duration::from_secs(3600);
            s.database.acquire_timeout = Duration::from_secs(30);
        })
        .spawn()
        .await
}

/// The control: with the library defaults (no statement deadline, 30 s acquire) the same fault
/// hangs the request, which is what the test above would catch if the deadline were removed.
#[tokio::test]
async fn without_a_deadline_a_frozen_postgres_hangs_the_request() {
    let postgres = private_postgres().await;
    let app = with_library_defaults(&postgres).await;
    let user = app.register_user().await;
    postgres.freeze();
    let write = app.post("/api/workspaces", &user.token, json!({ "name": "while frozen" }));
    let hung = tokio::time::timeout(DEADLINE * 4, write).await;
    assert!(hung.is_err(), "without a deadline the request should still be waiting");
    postgres.thaw();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_postgres_turns_requests_into_503_and_the_app_recovers_after_restart() {
    let postgres = private_postgres().await;
    let app = TestApp::builder()
        .postgres(&postgres)
        .settings(short_timeouts)
        .spawn()
        .await;
    let user = app.register_user().await;
    app.get("/api/workspaces", &user.token).await.assert_status(200);

    postgres.kill();
    let started = Instant::now();
    let response = app
        .post("/api/workspaces", &user.token, json!({ "name": "while dead" }))
        .await;
    response.assert_error(503, "database_unavailable");
    assert!(started.elapsed() < DEADLINE * 3, "took {:?}", started.elapsed());
    assert_eq!(response.header("retry-after"), Some("1"));
    app.request(Method::GET, "/health/ready", None, None)
        .await
        .assert_status(503);

    tokio::task::block_in_place(|| postgres.restart());
    assert!(
        wait_for_status(&app, "/health/ready", 200).await,
        "readiness came back after restart"
    );
    // A write proves Postgres itself is back (reads may come from the cache).
    app.post("/api/workspaces", &user.token, json!({ "name": "after" }))
        .await
        .assert_status(201);
}

/// Polls a route until it answers `status` (at most 10 s): the server's recovery is the event.
async fn wait_for_status(app: &TestApp, path: &str, status: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if app.request(Method::GET, path, None, None).await.status.as_u16() == status {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// A statement the server cancels (57014: `statement_timeout`, `pg_cancel_backend`, an
/// administrator) is the database being unavailable for it: 503, not 500 ([4/6], item 6).
#[tokio::test]
async fn a_statement_cancelled_by_the_server_answers_503() {
    let app = TestApp::spawn().await;
    let world = crate::helpers::World::create(&app).await;
    // Hold a lock the write needs, then cancel the app's waiting statement from the server side.
    let mut lock = app.db.begin().await.unwrap();
    sqlx::query("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let started = Instant::now();
    let path = world.fill("/api/tasks/{task}");
    let write = app.patch(&path, &world.user.token, json!({ "title": "x" }));
    let cancel = async {
        // Postgres announces no event for "a backend started waiting": poll pg_stat_activity.
        loop {
            let cancelled: Option<bool> = sqlx::query_scalar(
                "SELECT pg_cancel_backend(pid) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()
                 LIMIT 1",
            )
            .fetch_optional(&app.db)
            .await
            .unwrap();
            if cancelled == Some(true) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let (response, ()) = tokio::join!(write, cancel);
    lock.rollback().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "cancelled, not timed out by the app's own deadline"
    );
    response.assert_error(503, "database_unavailable");
}

/// A connection the server dropped while it sat idle in the pool (an administrator, a failover,
/// `idle_session_timeout`) is found out by a ping before use, not by the request that draws it.
/// Connections used within the last second skip that ping (a round trip less per statement);
/// these have been idle longer.
#[tokio::test]
async fn connections_dropped_while_idle_are_replaced_before_a_request_draws_them() {
    let postgres = private_postgres().await;
    let app = TestApp::builder().postgres(&postgres).spawn().await;
    let user = app.register_user().await;
    app.get("/api/workspaces", &user.token).await.assert_status(200);

    let admin = sqlx::PgPool::connect(&postgres.url("postgres")).await.unwrap();
    let dropped: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'nestling'",
    )
    .fetch_all(&admin)
    .await
    .unwrap();
    assert!(!dropped.is_empty(), "the app holds pooled connections");
    // The idle time is the condition under test: there is no event to wait for.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // The pool hands out its idle connections oldest first: one write per dropped connection.
    for round in 0..dropped.len() {
        app.post(
            "/api/workspaces",
            &user.token,
            json!({ "name": format!("after {round}") }),
        )
        .await
        .assert_status(201);
    }
}

/// `/metrics` reads the job queue's figures from Postgres at scrape time, under the statement
/// deadline: a frozen Postgres delays the scrape by that much at most, and the scrape still
/// answers with every metric (the job gauges keep their last values).
#[tokio::test]
async fn a_frozen_postgres_delays_the_metrics_scrape_by_the_deadline_at_most() {
    let postgres = private_postgres().await;
    let app = TestApp::builder()
        .postgres(&postgres)
        .settings(short_timeouts)
        .spawn()
        .await;
    let before = app.request(Method::GET, "/metrics", None, None).await;
    before.assert_status(200);
    assert!(
        before.text.lines().any(|line| line == "nestling_jobs_dead 0"),
        "{}",
        before.text
    );

    postgres.freeze();
    let started = Instant::now();
    let scrape = tokio::time::timeout(DEADLINE * 3, app.request(Method::GET, "/metrics", None, None)).await;
    let took = started.elapsed();
    postgres.thaw();
    let scrape = scrape.unwrap_or_else(|_| panic!("the scrape hung on the frozen Postgres ({took:?})"));
    scrape.assert_status(200);
    for line in ["nestling_jobs_dead 0", "nestling_redis_breaker_state 0"] {
        assert!(
            scrape.text.lines().any(|l| l == line),
            "no {line:?} in:\n{}",
            scrape.text
        );
    }
}

/// The control: without a statement deadline the same fault holds the scrape, which is what the
/// test above would catch if the job gauges were read without it.
#[tokio::test]
async fn without_a_deadline_a_frozen_postgres_hangs_the_metrics_scrape() {
    let postgres = private_postgres().await;
    let app = with_library_defaults(&postgres).await;
    app.request(Method::GET, "/metrics", None, None)
        .await
        .assert_status(200);
    postgres.freeze();
    let scrape = app.request(Method::GET, "/metrics", None, None);
    let hung = tokio::time::timeout(DEADLINE * 4, scrape).await;
    postgres.thaw();
    assert!(hung.is_err(), "without a deadline the scrape should still be waiting");
}
