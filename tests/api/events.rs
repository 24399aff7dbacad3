//! Durable events (`infra::events`) and their Server-Sent Events stream
//! (`GET /api/workspaces/{id}/events`), with real Postgres and Redis, on two instances where it
//! says so.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::sse::{Next, SseClient, SseEvent};
use crate::helpers::{private_redis, shared_redis, TestApp, TestUser};

const SECOND: Duration = Duration::from_secs(1);

/// A workspace with a project, its owner, and two instances of one deployment on Redis.
async fn pair_on_redis() -> (TestApp, TestApp) {
    let a = TestApp::builder().redis(shared_redis()).spawn().await;
    let b = TestApp::builder().sibling_of(&a).spawn().await;
    (a, b)
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
    let (a, b) = pair_on_redis().await;
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
        sqlx::query_scalar("SELECT type FROM events WHERE workspace_id = $1::text::uuid ORDER BY seq")
            .bind(workspace_id)
            .fetch_all(&app.db)
            .await
            .unwrap();
    assert_eq!(types, ["project.created", "member.added"]);
}

#[tokio::test]
async fn streams_are_bounded_per_user_and_answer_429_beyond() {
    let app = TestApp::builder()
        .settings(|s| s.events.max_streams_per_user = 2)
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
