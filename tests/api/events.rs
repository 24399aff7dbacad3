//! Durable events (`infra::events`) and their Server-Sent Events stream
//! (`GET /api/workspaces/{id}/events`), with real Postgres and Redis, on two instances where it
//! says so.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use nestling::infra::events::{Event, EventBus, Handler};
use reqwest::Method;
use serde_json::{json, Value};
use shaku::HasComponent;
use uuid::Uuid;

use crate::helpers::instance::{signed_up_with_workspace, Instance, TestDatabase};
use crate::helpers::partition::Partition;
use crate::helpers::sse::{until_numbered, Next, SseClient, SseEvent};
use crate::helpers::{private_redis, shared_redis, Backend, TestApp, TestUser};

const SECOND: Duration = Duration::from_secs(1);

/// A workspace with a project, its owner, and two instances of one deployment on Redis.
async fn pair_on_redis() -> (TestApp, TestApp) {
    pair_on(Backend::redis().await).await
}

async fn pair_on(backend: Backend) -> (TestApp, TestApp) {
    let a = TestApp::builder().backend(backend).spawn().await;
    let b = backend.sibling(&a).await;
    (a, b)
}

/// The running instance's event bus, where its in-app subscribers are registered.
fn bus(app: &TestApp) -> Arc<dyn EventBus> {
    app.module.resolve()
}

/// An in-app subscriber from a closure that returns a future.
fn handler<F, R>(f: F) -> Handler
where
    F: Fn(Arc<Event>) -> R + Send + Sync + 'static,
    R: Future<Output = Result<(), String>> + Send + 'static,
{
    Arc::new(move |event| Box::pin(f(event)))
}

/// How many times each subscriber was called, per event number.
#[derive(Clone, Default)]
struct Calls(Arc<Mutex<HashMap<(&'static str, i64), u32>>>);

impl Calls {
    /// Counts a call and returns which attempt it is (1, 2, ...).
    fn count(&self, subscriber: &'static str, seq: i64) -> u32 {
        let mut calls = self.0.lock().unwrap();
        let n = calls.entry((subscriber, seq)).or_default();
        *n += 1;
        *n
    }

    fn of(&self, subscriber: &'static str, seq: i64) -> u32 {
        self.0.lock().unwrap().get(&(subscriber, seq)).copied().unwrap_or(0)
    }
}

/// Waits until every event is published and handled (at most `within`): from then on no pass
/// runs a subscriber on them again, so what the subscribers saw is final.
async fn until_settled(app: &TestApp, within: Duration) {
    until_none_left(app, "published_at IS NULL OR handled_at IS NULL", within).await
}

/// Waits until no event matches `condition` (at most `within`).
async fn until_none_left(app: &TestApp, condition: &str, within: Duration) {
    let deadline = Instant::now() + within;
    let sql = format!("SELECT count(*) FROM events WHERE {condition}");
    loop {
        let left: i64 = sqlx::query_scalar(&sql).fetch_one(&app.db).await.unwrap();
        if left == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{left} events still {condition} after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One series of this instance's `/metrics` (0 if absent).
async fn metric(app: &TestApp, series: &str) -> f64 {
    app.metric(series).await.unwrap_or(0.0)
}

async fn task_in(app: &TestApp, user: &TestUser, project: &Value, title: &str) -> Value {
    let project_id = project["id"].as_str().unwrap();
    app.create_task(user, project_id, json!({ "title": title })).await
}

fn ids(events: &[SseEvent]) -> Vec<i64> {
    events
        .iter()
        .map(|event| event.id.expect("every event has an id"))
        .collect()
}

#[tokio::test]
async fn a_write_on_one_instance_reaches_an_sse_client_on_the_other_within_a_second() {
    a_write_on_one_instance_reaches_an_sse_client_on_the_other_within_a_second_on(Backend::redis().await).await;
}

#[tokio::test]
async fn on_a_cluster_a_write_on_one_instance_reaches_an_sse_client_on_the_other_within_a_second() {
    a_write_on_one_instance_reaches_an_sse_client_on_the_other_within_a_second_on(Backend::cluster().await).await;
}

async fn a_write_on_one_instance_reaches_an_sse_client_on_the_other_within_a_second_on(backend: Backend) {
    let (a, b) = pair_on(backend).await;
    let (owner, workspace, project) = a.user_with_project().await;
    let workspace_id = workspace["id"].as_str().unwrap();
    let mut stream = SseClient::open(&b, workspace_id, &owner.token, None).await;

    let written = Instant::now();
    let task = task_in(&a, &owner, &project, "streamed").await;
    let event = stream.expect_event(SECOND).await;
    assert!(written.elapsed() < SECOND, "took {:?}", written.elapsed());

    assert_eq!(event.event, "task.created");
    assert_eq!(event.data["type"], "task.created");
    assert_eq!(event.data["workspaceId"], workspace["id"]);
    assert_eq!(event.data["seq"], json!(event.id.unwrap()));
    // The task as the API answered it.
    assert_eq!(event.data["data"], task);

    // It travelled on Redis: had publishing there failed, the relay would have fallen back to
    // NOTIFY, which is as fast between two instances and would hide the failure.
    let published = |via: &'static str| {
        let series = format!("nestling_events_published_total{{via=\"{via}\"}}");
        let (a, b) = (&a, &b);
        async move { metric(a, &series).await + metric(b, &series).await }
    };
    let deadline = Instant::now() + 2 * SECOND;
    // The project's event and the task's (the counter moves after the relay's commit).
    while published("redis").await < 2.0 {
        assert!(Instant::now() < deadline, "the relay did not publish on Redis");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(published("postgres").await, 0.0, "no event fell back to NOTIFY");
}

#[tokio::test]
async fn every_kind_of_change_is_streamed_in_order_with_numbers_that_follow_each_other() {
    let app = TestApp::spawn().await;
    let (owner, workspace, project) = app.user_with_project().await;
    let workspace_id = workspace["id"].as_str().unwrap();
    let mut stream = SseClient::open(&app, workspace_id, &owner.token, None).await;
    let member = app.register_user().await;

    let task = task_in(&app, &owner, &project, "one").await;
    let task_id = task["id"].as_str().unwrap();
    app.patch(
        &format!("/api/tasks/{task_id}"),
        &owner.token,
        json!({ "status": "done" }),
    )
    .await
    .assert_status(200);
    app.delete(&format!("/api/tasks/{task_id}"), &owner.token)
        .await
        .assert_status(204);
    let project_id = project["id"].as_str().unwrap();
    app.patch(
        &format!("/api/projects/{project_id}"),
        &owner.token,
        json!({ "name": "renamed" }),
    )
    .await
    .assert_status(200);
    app.add_member(&owner, workspace_id, &member).await;
    app.delete(
        &format!("/api/workspaces/{workspace_id}/members/{}", member.id),
        &owner.token,
    )
    .await
    .assert_status(204);
    app.delete(&format!("/api/projects/{project_id}"), &owner.token)
        .await
        .assert_status(204);

    let mut events = Vec::new();
    for _ in 0..7 {
        events.push(stream.expect_event(5 * SECOND).await);
    }
    let types: Vec<&str> = events.iter().map(|event| event.event.as_str()).collect();
    assert_eq!(
        types,
        [
            "task.created",
            "task.updated",
            "task.deleted",
            "project.updated",
            "member.added",
            "member.removed",
            "project.deleted"
        ]
    );
    let first = events[0].id.unwrap();
    assert_eq!(ids(&events), (first..first + 7).collect::<Vec<_>>());
    assert_eq!(events[1].data["data"]["status"], "done");
    assert_eq!(
        events[2].data["data"],
        json!({ "id": task_id, "projectId": project_id })
    );
    assert_eq!(events[5].data["data"], json!({ "userId": member.id }));
}

#[tokio::test]
async fn a_client_that_reconnects_with_last_event_id_gets_exactly_what_it_missed_in_order() {
    let (a, b) = pair_on_redis().await;
    let (owner, workspace, project) = a.user_with_project().await;
    let workspace_id = workspace["id"].as_str().unwrap();
    let mut stream = SseClient::open(&a, workspace_id, &owner.token, None).await;
    task_in(&a, &owner, &project, "seen").await;
    let seen = stream.expect_event(5 * SECOND).await.id.unwrap();
    drop(stream);

    for n in 0..5 {
        task_in(&a, &owner, &project, &format!("missed {n}")).await;
    }
    // Back, on the other instance, with the last id it had.
    let mut stream = SseClient::open(&b, workspace_id, &owner.token, Some(seen)).await;
    task_in(&b, &owner, &project, "live").await;
    let mut events = Vec::new();
    for _ in 0..6 {
        events.push(stream.expect_event(5 * SECOND).await);
    }
    assert_eq!(ids(&events), (seen + 1..=seen + 6).collect::<Vec<_>>());
    let titles: Vec<&str> = events
        .iter()
        .map(|e| e.data["data"]["title"].as_str().unwrap())
        .collect();
    assert_eq!(
        titles,
        ["missed 0", "missed 1", "missed 2", "missed 3", "missed 4", "live"]
    );
    assert!(
        matches!(stream.next(SECOND / 2).await, Next::TimedOut),
        "nothing more, no duplicate"
    );
}

#[tokio::test]
async fn a_removed_member_has_the_stream_ended_within_a_second() {
    let (a, b) = pair_on_redis().await;
    let (owner, workspace, _) = a.user_with_project().await;
    let workspace_id = workspace["id"].as_str().unwrap();
    let member = a.register_user().await;
    a.add_member(&owner, workspace_id, &member).await;
    let mut stream = SseClient::open(&b, workspace_id, &member.token, None).await;
    let mut owners_stream = SseClient::open(&b, workspace_id, &owner.token, None).await;

    let removed = Instant::now();
    a.delete(
        &format!("/api/workspaces/{workspace_id}/members/{}", member.id),
        &owner.token,
    )
    .await
    .assert_status(204);
    let last = stream.until_end(SECOND).await.expect("the stream ends within a second");
    assert!(removed.elapsed() < SECOND);
    assert_eq!(last.last().map(|e| e.event.as_str()), Some("member.removed"));
    // The owner's stream goes on, and the member cannot open another.
    assert_eq!(owners_stream.expect_event(SECOND).await.event, "member.removed");
    let again = SseClient::request(&b, workspace_id, &member.token, None).await;
    assert_eq!(again.status(), 404);
}

#[tokio::test]
async fn a_logged_out_token_has_its_stream_ended_within_a_second() {
    let (a, b) = pair_on_redis().await;
    let (owner, workspace, _) = a.user_with_project().await;
    let workspace_id = workspace["id"].as_str().unwrap();
    let mut stream = SseClient::open(&b, workspace_id, &owner.token, None).await;

    let logged_out = Instant::now();
    a.request(reqwest::Method::POST, "/api/auth/logout", Some(&owner.token), None)
        .await
        .assert_status(204);
    stream.until_end(SECOND).await.expect("the stream ends within a second");
    assert!(logged_out.elapsed() < SECOND);
}

#[tokio::test]
async fn without_redis_events_travel_between_instances_through_postgres() {
    let a = TestApp::spawn().await;
    let b = TestApp::builder().sibling_of(&a).spawn().await;
    let (owner, workspace, project) = a.user_with_project().await;
    let workspace_id = workspace["id"].as_str().unwrap();
    let mut stream = SseClient::open(&b, workspace_id, &owner.token, None).await;

    let written = Instant::now();
    task_in(&a, &owner, &project, "through NOTIFY").await;
    let event = stream.expect_event(SECOND).await;
    assert_eq!(event.data["data"]["title"], "through NOTIFY");
    assert!(written.elapsed() < SECOND, "took {:?}", written.elapsed());
}

#[tokio::test]
async fn every_committed_event_is_delivered_when_redis_is_killed_while_writes_go_on() {
    let redis = private_redis().await;
    let a = TestApp::builder().redis(&redis).spawn().await;
    let b = TestApp::builder().sibling_of(&a).spawn().await;
    let (owner, workspace, project) = a.user_with_project().await;
    let workspace_id = workspace["id"].as_str().unwrap();
    let mut stream = SseClient::open(&b, workspace_id, &owner.token, None).await;

    let mut written = Vec::new();
    for n in 0..30 {
        if n == 10 {
            redis.kill();
        }
        if n == 20 {
            redis.restart();
        }
        let response = a
            .post(
                &format!("/api/projects/{}/tasks", project["id"].as_str().unwrap()),
                &owner.token,
                json!({ "title": format!("task {n}") }),
            )
            .await;
        // Redis trouble never fails a write: each one commits, with its event.
        response.assert_status(201);
        written.push(format!("task {n}"));
    }
    let mut titles = Vec::new();
    let mut seqs = Vec::new();
    while titles.len() < written.len() {
        let event = stream.expect_event(10 * SECOND).await;
        seqs.push(event.id.unwrap());
        titles.push(event.data["data"]["title"].as_str().unwrap().to_owned());
    }
    assert_eq!(titles, written, "every event, once, in order");
    assert!(seqs.windows(2).all(|pair| pair[1] == pair[0] + 1));
}

#[tokio::test]
async fn a_write_that_fails_leaves_no_event() {
    let app = TestApp::spawn().await;
    let (owner, workspace, _) = app.user_with_project().await;
    let workspace_id = workspace["id"].as_str().unwrap();
    let member = app.register_user().await;
    app.add_member(&owner, workspace_id, &member).await;
    // The same member again: 409, rolled back with its event.
    app.post(
        &format!("/api/workspaces/{workspace_id}/members"),
        &owner.token,
        json!({ "email": member.email }),
    )
    .await
    .assert_error(409, "member_exists");
    let types: Vec<String> =
        sqlx::query_scalar("SELECT type FROM events WHERE workspace_id = $1::text::uuid ORDER BY id")
            .bind(workspace_id)
            .fetch_all(&app.db)
            .await
            .unwrap();
    assert_eq!(types, ["project.created", "member.added"]);
}

#[tokio::test]
async fn streams_are_bounded_per_user_and_answer_429_beyond() {
    let app = TestApp::builder()
        .settings(|s| {
            s.events.max_streams_per_user = 2;
            // A client that went away is noticed when the next heartbeat cannot be written.
            s.events.heartbeat = Duration::from_millis(100);
        })
        .spawn()
        .await;
    let (owner, workspace, _) = app.user_with_project().await;
    let workspace_id = workspace["id"].as_str().unwrap();
    let first = SseClient::open(&app, workspace_id, &owner.token, None).await;
    let _second = SseClient::open(&app, workspace_id, &owner.token, None).await;
    let third = SseClient::request(&app, workspace_id, &owner.token, None).await;
    assert_eq!(third.status(), 429);
    assert!(third.headers().contains_key("retry-after"));
    let body: Value = third.json().await.unwrap();
    assert_eq!(body["code"], "too_many_streams");
    // A closed stream gives its place back.
    drop(first);
    let deadline = Instant::now() + 5 * SECOND;
    loop {
        let again = SseClient::request(&app, workspace_id, &owner.token, None).await;
        if again.status() == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the place was not given back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_bad_last_event_id_is_a_400_and_strangers_get_404() {
    let app = TestApp::spawn().await;
    let (owner, workspace, _) = app.user_with_project().await;
    let workspace_id = workspace["id"].as_str().unwrap();
    let response = app
        .client
        .get(app.url(&format!("/api/workspaces/{workspace_id}/events")))
        .bearer_auth(&owner.token)
        .header("Last-Event-ID", "yesterday")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "invalid_last_event_id");
    let stranger = app.register_user().await;
    let refused = SseClient::request(&app, workspace_id, &stranger.token, None).await;
    assert_eq!(refused.status(), 404);
}

#[tokio::test]
async fn each_event_runs_an_in_app_subscriber_once_across_the_fleet_in_order_per_workspace() {
    let (a, b) = pair_on_redis().await;
    // (instance, workspace, number), in the order handled.
    type Handled = Arc<Mutex<Vec<(&'static str, Uuid, i64)>>>;
    let handled = Handled::default();
    // Each instance registers its own subscriber at start-up, as each process of a deployment
    // would; whichever relay publishes an event runs it.
    for (instance, app) in [("a", &a), ("b", &b)] {
        let handled = handled.clone();
        let subscriber = handler(move |event: Arc<Event>| {
            handled.lock().unwrap().push((instance, event.workspace_id, event.seq));
            async { Ok(()) }
        });
        bus(app).subscribe(&["task.created"], subscriber);
    }
    let (first_owner, first, first_project) = a.user_with_project().await;
    let (second_owner, second, second_project) = b.user_with_project().await;

    // 20 tasks at once, in two workspaces, half through each instance.
    let writes = (0..20).map(|n| {
        let app = if n % 2 == 0 { &a } else { &b };
        let (owner, project) = if n % 4 < 2 {
            (&first_owner, &first_project)
        } else {
            (&second_owner, &second_project)
        };
        async move { task_in(app, owner, project, &format!("task {n}")).await }
    });
    futures_util::future::join_all(writes).await;
    until_settled(&a, 10 * SECOND).await;

    let mut recorded: Vec<(Uuid, i64)> =
        sqlx::query_as("SELECT workspace_id, seq FROM events WHERE type = 'task.created'")
            .fetch_all(&a.db)
            .await
            .unwrap();
    recorded.sort();
    assert_eq!(recorded.len(), 20);
    let handled = handled.lock().unwrap().clone();
    let mut each: Vec<(Uuid, i64)> = handled.iter().map(|(_, workspace, seq)| (*workspace, *seq)).collect();
    each.sort();
    assert_eq!(
        each, recorded,
        "every event handled exactly once across both instances: {handled:?}"
    );
    for workspace in [&first, &second] {
        let workspace: Uuid = workspace["id"].as_str().unwrap().parse().unwrap();
        let seqs: Vec<i64> = handled
            .iter()
            .filter(|(_, handled_in, _)| *handled_in == workspace)
            .map(|(_, _, seq)| *seq)
            .collect();
        assert!(
            seqs.windows(2).all(|pair| pair[0] < pair[1]),
            "handled out of order in {workspace}: {seqs:?}"
        );
    }
}

#[tokio::test]
async fn a_subscriber_that_fails_is_tried_three_times_then_given_up_and_later_events_flow() {
    let app = TestApp::builder()
        .settings(|s| s.events.handler_timeout = Duration::from_millis(200))
        .spawn()
        .await;
    let bus = bus(&app);
    let calls = Calls::default();
    let subscribe = |name: &'static str, outcome: fn(u32) -> Option<Result<(), String>>| {
        let calls = calls.clone();
        let subscriber = handler(move |event: Arc<Event>| {
            let attempt = calls.count(name, event.seq);
            async move {
                match outcome(attempt) {
                    Some(outcome) => outcome,
                    // Never answers: the attempt times out.
                    None => std::future::pending().await,
                }
            }
        });
        bus.subscribe(&["task.created"], subscriber);
    };
    subscribe("flaky", |attempt| {
        Some(if attempt <= 2 {
            Err(format!("attempt {attempt} fails"))
        } else {
            Ok(())
        })
    });
    subscribe("broken", |_| Some(Err("downstream is down".into())));
    subscribe("stuck", |_| None);
    subscribe("healthy", |_| Some(Ok(())));
    let (owner, workspace, project) = app.user_with_project().await;
    let workspace_id = workspace["id"].as_str().unwrap();
    let mut stream = SseClient::open(&app, workspace_id, &owner.token, None).await;

    let mut seqs = Vec::new();
    for title in ["first", "second"] {
        task_in(&app, &owner, &project, title).await;
        let event = stream.expect_event(5 * SECOND).await;
        assert_eq!(event.data["data"]["title"], title);
        seqs.push(event.id.unwrap());
    }
    until_settled(&app, 10 * SECOND).await;

    for seq in seqs {
        assert_eq!(
            calls.of("flaky", seq),
            3,
            "the flaky subscriber succeeds on its third attempt at {seq}"
        );
        assert_eq!(
            calls.of("broken", seq),
            3,
            "the broken subscriber is given up after 3 attempts at {seq}"
        );
        assert_eq!(
            calls.of("stuck", seq),
            3,
            "the stuck subscriber times out 3 times at {seq}"
        );
        assert_eq!(
            calls.of("healthy", seq),
            1,
            "the subscriber after them runs once at {seq}"
        );
    }
    let failures = metric(&app, "nestling_event_handler_failures_total").await;
    assert_eq!(failures, 4.0, "broken and stuck, given up on each of the two events");
}

/// A backlog that built up while both queues were held (another instance's long pass, a restart):
/// 30 events behind a subscriber that fails each one (three attempts and 300 ms of back-off
/// each: about 9 s in all). Each event is marked handled as soon as its subscribers ran, so no
/// transaction sits idle for the whole backlog (Postgres ended such a pass, and it was retried
/// forever), and the relay publishes the backlog at once, without waiting for the subscribers.
#[tokio::test]
async fn a_backlog_behind_a_failing_subscriber_is_relayed_and_each_event_handled_once() {
    let app = TestApp::builder()
        .settings(|s| s.events.handler_timeout = Duration::from_millis(200))
        .spawn()
        .await;
    let bus = bus(&app);
    let calls = Calls::default();
    for (name, fails) in [("broken", true), ("healthy", false)] {
        let calls = calls.clone();
        let subscriber = handler(move |event: Arc<Event>| {
            calls.count(name, event.seq);
            async move {
                if fails {
                    Err("downstream is down".to_owned())
                } else {
                    Ok(())
                }
            }
        });
        bus.subscribe(&["task.created"], subscriber);
    }
    let (owner, _, project) = app.user_with_project().await;
    until_settled(&app, 5 * SECOND).await;

    // Both queues' locks, held as other instances' passes would hold them, while the backlog builds.
    let mut held = app.db.begin().await.unwrap();
    sqlx::query(
        "SELECT pg_advisory_xact_lock(hashtextextended('events-relay', 0)),
                pg_advisory_xact_lock(hashtextextended('events-subscribers', 0))",
    )
    .execute(&mut *held)
    .await
    .unwrap();
    for n in 0..30 {
        task_in(&app, &owner, &project, &format!("backlog {n}")).await;
    }
    held.commit().await.unwrap();

    // Published while the subscribers still work through it.
    until_none_left(&app, "published_at IS NULL", 2 * SECOND).await;
    until_settled(&app, 30 * SECOND).await;
    let seqs: Vec<i64> = sqlx::query_scalar("SELECT seq FROM events WHERE type = 'task.created' ORDER BY seq")
        .fetch_all(&app.db)
        .await
        .unwrap();
    assert_eq!(seqs.len(), 30);
    for seq in seqs {
        assert_eq!(calls.of("healthy", seq), 1, "event {seq} handled once");
        assert_eq!(calls.of("broken", seq), 3, "event {seq} tried 3 times");
    }
    assert_eq!(metric(&app, "nestling_event_handler_failures_total").await, 30.0);
}

/// Until the relay's prune has removed events 1 to `upto` of the workspace (5 s at most).
async fn until_pruned(app: &TestApp, workspace_id: Uuid, upto: i64) {
    let deadline = Instant::now() + 5 * SECOND;
    loop {
        let first: Option<i64> = sqlx::query_scalar("SELECT min(seq) FROM events WHERE workspace_id = $1")
            .bind(workspace_id)
            .fetch_one(&app.db)
            .await
            .unwrap();
        if first == Some(upto + 1) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "events up to {upto} not pruned: the first is {first:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_client_further_behind_than_the_retention_gets_resync_then_what_remains_in_order() {
    let app = TestApp::builder()
        .settings(|s| s.events.retention = Duration::from_secs(3600))
        .spawn()
        .await;
    let (owner, workspace, project) = app.user_with_project().await;
    let workspace_id = workspace["id"].as_str().unwrap();
    // 1 is the project's event, 2 to 5 the tasks'.
    for n in 2..=5 {
        task_in(&app, &owner, &project, &format!("task {n}")).await;
    }
    until_settled(&app, 5 * SECOND).await;
    // Events 1 to 3 are two days old: past the retention. The API cannot age an event.
    let aged = sqlx::query(
        "UPDATE events SET occurred_at = now() - interval '2 days' WHERE workspace_id = $1::text::uuid AND seq <= 3",
    )
    .bind(workspace_id)
    .execute(&app.db)
    .await
    .unwrap();
    assert_eq!(aged.rows_affected(), 3);
    // An instance prunes on its first relay pass after it starts, then every minute: starting one
    // is the real way to have the prune run now.
    let restarted = TestApp::builder().sibling_of(&app).spawn().await;
    until_pruned(&app, workspace_id.parse().unwrap(), 3).await;

    let mut behind = SseClient::open(&restarted, workspace_id, &owner.token, Some(1)).await;
    let resync = behind.expect_event(5 * SECOND).await;
    assert_eq!(resync.event, "resync");
    assert_eq!(resync.id, None, "resync is not an event of the workspace");
    assert_eq!(resync.data, json!({ "lastEventId": 1, "firstAvailable": 4 }));
    let remaining = [
        behind.expect_event(5 * SECOND).await,
        behind.expect_event(5 * SECOND).await,
    ];
    assert_eq!(ids(&remaining), [4, 5]);
    assert_eq!(remaining[0].data["data"]["title"], "task 4");

    // One whose next event still exists gets no resync.
    let mut just_in_time = SseClient::open(&restarted, workspace_id, &owner.token, Some(3)).await;
    assert_eq!(just_in_time.expect_event(5 * SECOND).await.id, Some(4));
    assert_eq!(just_in_time.expect_event(5 * SECOND).await.id, Some(5));

    // Both follow on live.
    task_in(&app, &owner, &project, "live").await;
    assert_eq!(behind.expect_event(5 * SECOND).await.id, Some(6));
    assert_eq!(just_in_time.expect_event(5 * SECOND).await.id, Some(6));
}

#[tokio::test]
async fn a_last_event_id_beyond_the_workspaces_last_event_gets_resync_first() {
    let app = TestApp::spawn().await;
    let (owner, workspace, project) = app.user_with_project().await;
    let workspace_id = workspace["id"].as_str().unwrap();
    task_in(&app, &owner, &project, "2").await;
    until_numbered(&app).await;
    // An id of another database (restored from a backup, say): the workspace's last is 2.
    let mut stream = SseClient::open(&app, workspace_id, &owner.token, Some(99)).await;
    let resync = stream.expect_event(5 * SECOND).await;
    assert_eq!(resync.event, "resync");
    assert_eq!(resync.data, json!({ "lastEventId": 99, "firstAvailable": 3 }));
    task_in(&app, &owner, &project, "3").await;
    let next = stream.expect_event(5 * SECOND).await;
    assert_eq!((next.id, next.data["data"]["title"].as_str()), (Some(3), Some("3")));
}

/// Instance A on the shared Redis; instance B reaching it through a link the test can cut (a
/// partition between B and Redis only). The relay runs on A: B's is left to wake on B's own
/// commits only (the test writes through A), since B's relay, unable to reach Redis, would
/// publish with NOTIFY, which B hears.
async fn b_cut_off_from_redis(catch_up_every: Duration) -> (TestApp, TestApp, Partition) {
    let redis = tokio::task::spawn_blocking(shared_redis).await.unwrap();
    let link = Partition::new(format!("127.0.0.1:{}", redis.port)).await;
    let a = TestApp::builder().redis(redis).spawn().await;
    let through_link = format!("redis://127.0.0.1:{}", link.port);
    let b = TestApp::builder()
        .sibling_of(&a)
        .settings(move |s| {
            s.redis.url = through_link;
            s.events.relay_every = Duration::from_secs(3600);
            s.events.catch_up_every = catch_up_every;
        })
        .spawn()
        .await;
    (a, b, link)
}

/// Opens a stream on B, checks that it hears A through Redis, cuts B off from Redis, and writes
/// five tasks on A: A's relay publishes them on Redis, which B cannot hear, and no relay sends
/// NOTIFY. Returns the stream and the titles written.
async fn five_events_while_b_is_cut_off(a: &TestApp, b: &TestApp, link: &Partition) -> (SseClient, Vec<String>) {
    let (owner, workspace, project) = a.user_with_project().await;
    let workspace_id = workspace["id"].as_str().unwrap();
    let mut stream = SseClient::open(b, workspace_id, &owner.token, None).await;
    task_in(a, &owner, &project, "before the cut").await;
    assert_eq!(
        stream.expect_event(SECOND).await.data["data"]["title"],
        "before the cut"
    );

    link.cut();
    let mut titles = Vec::new();
    for n in 0..5 {
        let title = format!("while cut off {n}");
        task_in(a, &owner, &project, &title).await;
        titles.push(title);
    }
    (stream, titles)
}

/// Reads `count` events, each within `within` of the previous one: (titles, ids).
async fn read_events(stream: &mut SseClient, count: usize, within: Duration) -> (Vec<String>, Vec<i64>) {
    let mut titles = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..count {
        let event = stream.expect_event(within).await;
        ids.push(event.id.unwrap());
        titles.push(event.data["data"]["title"].as_str().unwrap().to_owned());
    }
    (titles, ids)
}

#[tokio::test]
async fn an_instance_cut_off_from_redis_still_streams_every_event_in_order_from_the_table() {
    let (a, b, link) = b_cut_off_from_redis(SECOND).await;
    let (mut stream, written) = five_events_while_b_is_cut_off(&a, &b, &link).await;

    // Still cut off: the periodic catch-up reads them from the table.
    let (titles, ids) = read_events(&mut stream, written.len(), 3 * SECOND).await;
    assert_eq!(titles, written, "every event, in order");
    assert!(ids.windows(2).all(|pair| pair[1] == pair[0] + 1), "{ids:?}");

    // Healed: what Redis held back for B arrives too, and is not streamed twice.
    link.heal();
    assert!(
        matches!(stream.next(2 * SECOND).await, Next::TimedOut),
        "nothing more, no duplicate"
    );
}

/// The control: with the periodic catch-up effectively off, nothing reaches B's stream while it is
/// cut off from Redis; the events come only once the partition heals.
#[tokio::test]
async fn without_the_periodic_catch_up_an_instance_cut_off_from_redis_streams_nothing() {
    let (a, b, link) = b_cut_off_from_redis(Duration::from_secs(3600)).await;
    let (mut stream, written) = five_events_while_b_is_cut_off(&a, &b, &link).await;

    assert!(
        matches!(stream.next(3 * SECOND).await, Next::TimedOut),
        "an event reached the stream without the catch-up"
    );
    link.heal();
    // B resubscribes (or its held-back subscription delivers) and reads them then.
    let (titles, _) = read_events(&mut stream, written.len(), 10 * SECOND).await;
    assert_eq!(titles, written);
}

/// The budget: this many idle streams on one instance...
const IDLE_STREAMS: usize = 1_000;
/// ...cost it less than this much resident memory.
const IDLE_BUDGET_KIB: u64 = 50 * 1024;
/// Streams being opened at once: enough to be quick, few enough not to trip over the accept queue.
const OPENING_AT_ONCE: usize = 100;

#[tokio::test]
async fn a_thousand_idle_streams_cost_one_instance_under_50_mib() {
    // The test holds one end of each stream and the instance the other (it inherits the limit).
    raise_open_file_limit(2 * IDLE_STREAMS as libc::rlim_t + 1_024);
    let db = TestDatabase::create().await;
    let env: Vec<(String, String)> = [
        ("DATABASE_URL", db.url.as_str()),
        ("EVENTS_MAX_STREAMS_PER_USER", "2000"),
        // The warm-up's closed streams are noticed at their next heartbeat.
        ("EVENTS_HEARTBEAT", "1"),
        // 1,000 opens from one user and one address are not what the limiter is measured on here.
        ("RATE_LIMIT_ENABLED", "false"),
    ]
    .iter()
    .map(|(name, value)| (name.to_string(), value.to_string()))
    .collect();
    let instance = Instance::start(&env).await;
    // One connection per stream, as 1,000 browsers would hold them: HTTP/1 keeps a connection
    // for each request in flight, and none is kept idle for another.
    let client = reqwest::Client::builder()
        .no_proxy()
        .http1_only()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let base = instance.url.as_str();
    let call = |method: Method, path: &str, token: Option<&str>, body: Option<Value>| {
        let mut request = client.request(method, format!("{base}{path}"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        async move {
            let response = request.send().await.expect("request sent");
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (token, workspace_id) = signed_up_with_workspace(&client, base).await;

    let open_streams = |count: usize| {
        futures_util::stream::iter(0..count)
            .map(|_| SseClient::open_at(&client, base, &workspace_id, &token, None))
            .buffered(OPENING_AT_ONCE)
            .collect::<Vec<_>>()
    };
    let streams_open = || async {
        let metrics = client.get(format!("{base}/metrics")).send().await.expect("metrics");
        assert_eq!(metrics.status(), 200);
        let text = metrics.text().await.unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix("nestling_event_streams "))
            .and_then(|value| value.trim().parse::<usize>().ok())
            .expect("the event_streams gauge")
    };
    let until_streams_open = |expected: usize| async move {
        let deadline = Instant::now() + 10 * SECOND;
        loop {
            let open = streams_open().await;
            if open == expected {
                return;
            }
            assert!(Instant::now() < deadline, "{open} streams open, {expected} expected");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };

    // Warm-up: what the first streams allocate once (the workspace's feed, buffers, the
    // allocator's arenas) is not what a stream costs.
    drop(open_streams(20).await);
    until_streams_open(0).await;
    tokio::time::sleep(SECOND).await;
    let pid = instance.pid();
    let (rss_before, fds_before) = (resident_kib(pid), open_fds(pid));

    let opening = Instant::now();
    let mut streams = open_streams(IDLE_STREAMS).await;
    let opened_in = opening.elapsed();
    until_streams_open(IDLE_STREAMS).await;
    let rss_opened = resident_kib(pid);
    // Idle for a few rounds of the membership re-check, so what it allocates counts too.
    tokio::time::sleep(3 * SECOND).await;
    let (rss_after, fds_after) = (resident_kib(pid), open_fds(pid));
    let cost = rss_after.saturating_sub(rss_before);
    eprintln!(
        "{IDLE_STREAMS} idle streams (opened in {opened_in:?}): VmRSS {:.1} MiB before, {:.1} MiB once open, \
         {:.1} MiB after {:?} idle: {:.1} MiB, {:.1} KiB a stream; file descriptors {fds_before} -> {fds_after}",
        rss_before as f64 / 1024.0,
        rss_opened as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        3 * SECOND,
        cost as f64 / 1024.0,
        cost as f64 / IDLE_STREAMS as f64,
    );
    assert!(
        fds_after >= fds_before + IDLE_STREAMS,
        "each stream has a connection of its own: {fds_before} -> {fds_after} descriptors"
    );
    assert!(
        cost < IDLE_BUDGET_KIB,
        "{IDLE_STREAMS} idle streams cost {:.1} MiB, the budget is {} MiB",
        cost as f64 / 1024.0,
        IDLE_BUDGET_KIB / 1024
    );

    // The instance still serves, and the streams are alive: a write reaches the first and the last.
    let read = call(
        Method::GET,
        &format!("/api/workspaces/{workspace_id}"),
        Some(&token),
        None,
    )
    .await;
    assert_eq!(read.0, 200, "a normal request: {}", read.1);
    let project = call(
        Method::POST,
        &format!("/api/workspaces/{workspace_id}/projects"),
        Some(&token),
        Some(json!({ "name": "Heard by all" })),
    )
    .await;
    assert_eq!(project.0, 201, "create project: {}", project.1);
    let last = streams.len() - 1;
    for index in [0, last] {
        let event = streams[index].expect_event(5 * SECOND).await;
        assert_eq!(event.event, "project.created", "stream {index}");
        assert_eq!(event.data["data"]["id"], project.1["id"], "stream {index}");
    }
}

/// Stopping an instance (SIGTERM, as a rolling restart does) ends its event streams first, so
/// they do not hold the shutdown for `APP_SHUTDOWN_TIMEOUT`: their clients reconnect elsewhere
/// with `Last-Event-ID`. Left open, one idle stream kept the process for the whole timeout.
#[tokio::test]
async fn sigterm_ends_the_instances_streams_and_it_exits_without_waiting_for_them() {
    let db = TestDatabase::create().await;
    let env: Vec<(String, String)> = [
        ("DATABASE_URL", db.url.as_str()),
        ("APP_SHUTDOWN_TIMEOUT", "5"),
        // No wait for load balancers: what is timed here is the drain.
        ("APP_SHUTDOWN_DELAY", "0"),
    ]
    .iter()
    .map(|(name, value)| (name.to_string(), value.to_string()))
    .collect();
    let mut instance = Instance::start(&env).await;
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let (token, workspace_id) = signed_up_with_workspace(&client, &instance.url).await;
    let mut stream = SseClient::open_at(&client, &instance.url, &workspace_id, &token, None).await;

    let took = instance.terminate(10 * SECOND).await.expect("the instance exits");
    assert!(took < 2 * SECOND, "exiting took {took:?}, with APP_SHUTDOWN_TIMEOUT=5");
    stream.until_end(SECOND).await.expect("the stream has ended");
}

/// Lifts this process's soft limit on open files to `needed` (children inherit it).
fn raise_open_file_limit(needed: libc::rlim_t) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) }, 0);
    if limit.rlim_cur >= needed {
        return;
    }
    assert!(
        limit.rlim_max >= needed,
        "the hard limit on open files ({}) is below the {needed} this test needs (ulimit -Hn)",
        limit.rlim_max
    );
    limit.rlim_cur = needed;
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
}

/// The process's resident memory (`VmRSS`), in KiB.
fn resident_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/<pid>/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("a VmRSS line")
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/<pid>/fd")
        .count()
}

/// A client that reconnects to an instance whose feed lags behind the one it came from (here: cut
/// off from Redis, its periodic catch-up off) gets neither a `resync` nor the events it already
/// has: its `Last-Event-ID` is below the workspace's last number, so the instance skips up to it.
#[tokio::test]
async fn a_client_reconnecting_to_a_lagging_instance_gets_no_duplicate_and_no_resync() {
    let (a, b, link) = b_cut_off_from_redis(Duration::from_secs(3600)).await;
    let (owner, workspace, project) = a.user_with_project().await;
    let workspace_id = workspace["id"].as_str().unwrap();
    // B follows the workspace (another client of B's), so its feed has a cursor, which stops
    // moving while B cannot hear Redis.
    let mut on_b = SseClient::open(&b, workspace_id, &owner.token, None).await;
    task_in(&a, &owner, &project, "heard by both").await;
    assert_eq!(on_b.expect_event(SECOND).await.data["data"]["title"], "heard by both");
    let mut on_a = SseClient::open(&a, workspace_id, &owner.token, None).await;
    link.cut();
    for n in 0..3 {
        task_in(&a, &owner, &project, &format!("on A {n}")).await;
    }
    let (_, seen) = read_events(&mut on_a, 3, 5 * SECOND).await;
    let last = *seen.last().unwrap();
    drop(on_a);

    // Back on B, whose feed is three events behind the client.
    let mut back = SseClient::open(&b, workspace_id, &owner.token, Some(last)).await;
    link.heal();
    task_in(&a, &owner, &project, "after the reconnect").await;
    let event = back.expect_event(5 * SECOND).await;
    assert_eq!(event.event, "task.created", "no resync first: {event:?}");
    assert_eq!(event.id, Some(last + 1), "nothing the client had, nothing skipped");
    assert_eq!(event.data["data"]["title"], "after the reconnect");
}

/// A subscriber that panics fails its attempt like one that returns an error: the pass goes on,
/// later events and other subscribers run, and the failure is counted.
#[tokio::test]
async fn a_subscriber_that_panics_fails_its_attempts_and_the_others_go_on() {
    let app = TestApp::builder()
        .settings(|s| s.events.handler_timeout = Duration::from_millis(500))
        .spawn()
        .await;
    let bus = bus(&app);
    let calls = Calls::default();
    for (name, panics) in [("panics", true), ("healthy", false)] {
        let calls = calls.clone();
        bus.subscribe(
            &["task.created"],
            handler(move |event: Arc<Event>| {
                calls.count(name, event.seq);
                async move {
                    assert!(!panics, "a subscriber bug");
                    Ok(())
                }
            }),
        );
    }
    let (owner, _, project) = app.user_with_project().await;
    for n in 0..2 {
        task_in(&app, &owner, &project, &format!("task {n}")).await;
    }
    until_settled(&app, 10 * SECOND).await;
    let seqs: Vec<i64> = sqlx::query_scalar("SELECT seq FROM events WHERE type = 'task.created' ORDER BY seq")
        .fetch_all(&app.db)
        .await
        .unwrap();
    for seq in seqs {
        assert_eq!(calls.of("panics", seq), 3, "three attempts at {seq}");
        assert_eq!(calls.of("healthy", seq), 1, "the next subscriber ran at {seq}");
    }
    assert_eq!(metric(&app, "nestling_event_handler_failures_total").await, 2.0);
}

/// The prune deletes only a prefix of each workspace's events: an old event still waiting for
/// its subscribers keeps itself and every later one, so a stream never meets a hole.
#[tokio::test]
async fn the_prune_never_leaves_a_hole_behind_an_event_still_queued() {
    let app = TestApp::builder()
        .settings(|s| s.events.retention = Duration::from_secs(3600))
        .spawn()
        .await;
    let (owner, workspace, project) = app.user_with_project().await;
    let workspace_id: Uuid = workspace["id"].as_str().unwrap().parse().unwrap();
    for n in 2..=5 {
        task_in(&app, &owner, &project, &format!("task {n}")).await;
    }
    until_settled(&app, 5 * SECOND).await;
    // All five are past the retention; the third still waits for its subscribers (no instance
    // here has any, so it stays queued).
    sqlx::query(
        "UPDATE events SET occurred_at = now() - interval '2 days',
                handled_at = CASE WHEN seq = 3 THEN NULL ELSE handled_at END
         WHERE workspace_id = $1",
    )
    .bind(workspace_id)
    .execute(&app.db)
    .await
    .unwrap();
    // A starting instance prunes on its first pass.
    let _restarted = TestApp::builder().sibling_of(&app).spawn().await;
    until_pruned(&app, workspace_id, 2).await;
    let left: Vec<i64> = sqlx::query_scalar("SELECT seq FROM events WHERE workspace_id = $1 ORDER BY seq")
        .bind(workspace_id)
        .fetch_all(&app.db)
        .await
        .unwrap();
    assert_eq!(left, [3, 4, 5], "only what came before the queued event goes");
}

/// A member added later reads the workspace's events from their own `member.added` on, even
/// with `Last-Event-ID: 0`: not its history from before they joined.
#[tokio::test]
async fn a_member_reads_events_from_when_they_joined_not_before() {
    let app = TestApp::spawn().await;
    let (owner, workspace, project) = app.user_with_project().await;
    let workspace_id = workspace["id"].as_str().unwrap();
    task_in(&app, &owner, &project, "before they joined").await;
    let member = app.register_user().await;
    app.add_member(&owner, workspace_id, &member).await;
    task_in(&app, &owner, &project, "after they joined").await;

    let mut stream = SseClient::open(&app, workspace_id, &member.token, Some(0)).await;
    let first = stream.expect_event(5 * SECOND).await;
    assert_eq!(first.event, "member.added");
    assert_eq!(first.data["data"]["userId"], json!(member.id));
    let next = stream.expect_event(5 * SECOND).await;
    assert_eq!(next.data["data"]["title"], "after they joined");
    // The owner, there from the start, reads it all.
    let mut owners = SseClient::open(&app, workspace_id, &owner.token, Some(0)).await;
    assert_eq!(owners.expect_event(5 * SECOND).await.event, "project.created");
}
