//! `Idempotency-Key` (README, "Idempotency keys"): a write sent again with the same key happens
//! once, on any instance; the first answer is replayed byte for byte.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::future::join_all;
use nestling::error::AppResult;
use nestling::infra::idempotency::{Claim, IdempotencyStore, OpenClaim, Recorded};
use nestling::modules::projects::model::Project;
use nestling::modules::projects::repository::ProjectRepository;
use reqwest::Method;
use serde_json::{json, Value};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::helpers::{into_test_response, private_redis, TestApp, TestResponse};

/// A request with an `Idempotency-Key`.
async fn send(app: &TestApp, method: Method, path: &str, token: &str, key: &str, body: Value) -> TestResponse {
    let request = app
        .client
        .request(method, app.url(path))
        .bearer_auth(token)
        .header("Idempotency-Key", key)
        .json(&body);
    into_test_response(request.send().await.expect("request sent")).await
}

fn new_key() -> String {
    Uuid::new_v4().to_string()
}

fn replayed(response: &TestResponse) -> bool {
    response.header("idempotent-replayed") == Some("true")
}

/// The answer `replay` must repeat exactly: status, Content-Type and body bytes.
fn assert_replay_of(replay: &TestResponse, first: &TestResponse) {
    assert!(replayed(replay), "not marked as a replay: {:?}", replay.headers);
    assert_eq!(replay.status, first.status, "{}", replay.text);
    assert_eq!(replay.header("content-type"), first.header("content-type"));
    assert_eq!(replay.text, first.text, "the body, byte for byte");
}

async fn count(app: &TestApp, sql: &str, id: Uuid) -> i64 {
    sqlx::query_scalar(sql).bind(id).fetch_one(&app.db).await.unwrap()
}

async fn tasks_in(app: &TestApp, project: &Value) -> i64 {
    let project: Uuid = project["id"].as_str().unwrap().parse().unwrap();
    count(app, "SELECT count(*) FROM tasks WHERE project_id = $1", project).await
}

async fn workspaces_of(app: &TestApp, user: Uuid) -> i64 {
    count(app, "SELECT count(*) FROM workspaces WHERE created_by = $1", user).await
}

#[tokio::test]
async fn a_create_sent_again_on_the_other_instance_is_replayed_byte_for_byte_and_creates_one_task() {
    let a = TestApp::spawn().await;
    let b = TestApp::builder().sibling_of(&a).spawn().await;
    let (user, _, project) = a.user_with_project().await;
    let path = format!("/api/projects/{}/tasks", project["id"].as_str().unwrap());
    let key = new_key();
    let body = json!({ "title": "Pay the invoice", "priority": "high" });

    let first = send(&a, Method::POST, &path, &user.token, &key, body.clone()).await;
    first.assert_status(201);
    assert!(!replayed(&first), "a first answer is not a replay");
    // The same JSON spelled differently is the same request.
    let respelled = json!({ "priority": "high", "title": "Pay the invoice" });
    let again = send(&b, Method::POST, &path, &user.token, &key, respelled).await;

    assert_replay_of(&again, &first);
    assert_replay_of(&send(&a, Method::POST, &path, &user.token, &key, body).await, &first);
    assert_eq!(tasks_in(&a, &project).await, 1);
}

#[tokio::test]
async fn the_same_key_with_another_body_or_path_answers_422_and_keeps_the_first_answer() {
    let app = TestApp::spawn().await;
    let (user, workspace, project) = app.user_with_project().await;
    let path = format!("/api/projects/{}/tasks", project["id"].as_str().unwrap());
    let key = new_key();
    let first = send(&app, Method::POST, &path, &user.token, &key, json!({ "title": "one" })).await;
    first.assert_status(201);

    send(&app, Method::POST, &path, &user.token, &key, json!({ "title": "two" }))
        .await
        .assert_error(422, "idempotency_key_reused");
    let elsewhere = format!("/api/workspaces/{}/projects", workspace["id"].as_str().unwrap());
    send(
        &app,
        Method::POST,
        &elsewhere,
        &user.token,
        &key,
        json!({ "title": "one" }),
    )
    .await
    .assert_error(422, "idempotency_key_reused");

    let replay = send(&app, Method::POST, &path, &user.token, &key, json!({ "title": "one" })).await;
    assert_replay_of(&replay, &first);
    assert_eq!(tasks_in(&app, &project).await, 1);
}

#[tokio::test]
async fn fifty_concurrent_duplicates_over_two_instances_create_exactly_one_workspace() {
    let a = TestApp::spawn().await;
    let b = TestApp::builder().sibling_of(&a).spawn().await;
    let user = a.register_user().await;
    let key = new_key();
    let body = json!({ "name": "Once" });
    let answers = join_all((0..50).map(|i| {
        let instance = if i % 2 == 0 { &a } else { &b };
        send(
            instance,
            Method::POST,
            "/api/workspaces",
            &user.token,
            &key,
            body.clone(),
        )
    }))
    .await;

    let created: Vec<&TestResponse> = answers.iter().filter(|r| r.status == 201).collect();
    for answer in answers.iter().filter(|r| r.status != 201) {
        answer.assert_error(409, "idempotency_key_in_flight");
        assert_eq!(answer.header("retry-after"), Some("1"), "{}", answer.text);
    }
    assert!(!created.is_empty(), "no duplicate got the answer");
    assert!(
        created.iter().all(|r| r.text == created[0].text),
        "every 201 is the same answer"
    );
    assert_eq!(created.iter().filter(|r| !replayed(r)).count(), 1, "one first answer");
    assert_eq!(workspaces_of(&a, user.id).await, 1);
}

/// Creates projects for real, then reports the database deadline (the answer is 503): a write
/// that reached Postgres and then failed.
struct ProjectsFailAfterWrite(Arc<dyn ProjectRepository>);

#[async_trait]
impl ProjectRepository for ProjectsFailAfterWrite {
    async fn create(&self, workspace_id: Uuid, name: &str, description: Option<&str>) -> Result<Project, sqlx::Error> {
        self.0.create(workspace_id, name, description).await?;
        Err(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "deadline (test)",
        )))
    }
    async fn list(&self, workspace_id: Uuid) -> Result<Vec<Project>, sqlx::Error> {
        self.0.list(workspace_id).await
    }
    async fn find(&self, id: Uuid) -> Result<Option<Project>, sqlx::Error> {
        self.0.find(id).await
    }
    async fn save(&self, project: &Project) -> Result<Option<Project>, sqlx::Error> {
        self.0.save(project).await
    }
    async fn delete(&self, id: Uuid) -> Result<Option<Vec<(Uuid, Option<Uuid>)>>, sqlx::Error> {
        self.0.delete(id).await
    }
}

/// The real store, except that it says when a request has run its handler and waits for
/// `release` before recording the answer and committing: a request held in flight, its writes
/// made but not committed.
struct HeldStore {
    real: Arc<dyn IdempotencyStore>,
    answered: Arc<Notify>,
    release: Arc<Notify>,
}

#[async_trait]
impl IdempotencyStore for HeldStore {
    async fn claim(&self, user_id: Uuid, key: &str, fingerprint: [u8; 32]) -> AppResult<Claim> {
        self.real.claim(user_id, key, fingerprint).await
    }
    async fn complete(&self, claim: OpenClaim, answer: &Recorded) -> AppResult<()> {
        self.answered.notify_one();
        self.release.notified().await;
        self.real.complete(claim, answer).await
    }
    async fn abandon(&self, claim: OpenClaim) {
        self.real.abandon(claim).await
    }
}

/// A sibling of `app` whose requests with a key wait before their commit: (it, answered, release).
async fn held_sibling(app: &TestApp) -> (TestApp, Arc<Notify>, Arc<Notify>) {
    let (answered, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let store = HeldStore {
        real: app.real_component(),
        answered: answered.clone(),
        release: release.clone(),
    };
    let held = TestApp::builder()
        .sibling_of(app)
        .module(move |module| module.with_component_override::<dyn IdempotencyStore>(Box::new(store)))
        .spawn()
        .await;
    (held, answered, release)
}

async fn projects_in(app: &TestApp, workspace: &Value) -> i64 {
    let workspace: Uuid = workspace["id"].as_str().unwrap().parse().unwrap();
    count(app, "SELECT count(*) FROM projects WHERE workspace_id = $1", workspace).await
}

/// The failing instance's write reached Postgres inside the key's transaction; the 503 rolled it
/// back with the key, so the retry runs afresh and the project exists once.
#[tokio::test]
async fn a_key_whose_first_request_failed_with_a_5xx_can_be_retried() {
    let app = TestApp::spawn().await;
    let projects = ProjectsFailAfterWrite(app.real_component());
    let failing = TestApp::builder()
        .sibling_of(&app)
        .module(move |module| module.with_component_override::<dyn ProjectRepository>(Box::new(projects)))
        .spawn()
        .await;
    let user = app.register_user().await;
    let workspace = app.create_workspace(&user).await;
    let path = format!("/api/workspaces/{}/projects", workspace["id"].as_str().unwrap());
    let key = new_key();
    let body = json!({ "name": "Launch" });

    send(&failing, Method::POST, &path, &user.token, &key, body.clone())
        .await
        .assert_error(503, "database_unavailable");
    assert_eq!(
        projects_in(&app, &workspace).await,
        0,
        "the failed write was rolled back"
    );

    let retry = send(&app, Method::POST, &path, &user.token, &key, body).await;
    retry.assert_status(201);
    assert!(!replayed(&retry), "the 5xx was not recorded");
    assert_eq!(projects_in(&app, &workspace).await, 1);
}

#[tokio::test]
async fn a_duplicate_while_the_first_is_running_answers_409_with_retry_after_then_the_replay() {
    let app = TestApp::spawn().await;
    let (holding, answered, release) = held_sibling(&app).await;
    let user = app.register_user().await;
    let workspace = app.create_workspace(&user).await;
    let path = format!("/api/workspaces/{}/projects", workspace["id"].as_str().unwrap());
    let key = new_key();
    let body = json!({ "name": "Slow" });

    let first = send(&holding, Method::POST, &path, &user.token, &key, body.clone());
    let duplicates = async {
        answered.notified().await;
        let during = send(&app, Method::POST, &path, &user.token, &key, body.clone()).await;
        release.notify_one();
        during
    };
    let (first, during) = tokio::join!(first, duplicates);

    during.assert_error(409, "idempotency_key_in_flight");
    assert_eq!(during.header("retry-after"), Some("1"));
    first.assert_status(201);
    assert_replay_of(&send(&app, Method::POST, &path, &user.token, &key, body).await, &first);
    assert_eq!(projects_in(&app, &workspace).await, 1);
}

/// The write's first invalidation comes before its commit: a read in between loads the old rows
/// and caches them. The second, after the commit, drops them.
#[tokio::test]
async fn a_list_read_between_an_idempotent_write_and_its_commit_is_not_served_after_the_commit() {
    let app = TestApp::spawn().await;
    let (held, answered, release) = held_sibling(&app).await;
    let user = app.register_user().await;
    let workspace = app.create_workspace(&user).await;
    let path = format!("/api/workspaces/{}/projects", workspace["id"].as_str().unwrap());
    held.read_until_l1_hit(&path, &user.token, "the empty list").await;

    let key = new_key();
    let create = send(&held, Method::POST, &path, &user.token, &key, json!({ "name": "New" }));
    let read_before_the_commit = async {
        answered.notified().await;
        let read = held.get(&path, &user.token).await;
        release.notify_one();
        read
    };
    let (created, before) = tokio::join!(create, read_before_the_commit);
    created.assert_status(201);
    assert_eq!(
        before.body.as_array().map(Vec::len),
        Some(0),
        "uncommitted: {}",
        before.text
    );

    let after = held.get(&path, &user.token).await;
    assert_eq!(after.body.as_array().map(Vec::len), Some(1), "{}", after.text);
}

#[tokio::test]
async fn a_key_runs_afresh_once_idempotency_ttl_has_passed() {
    let app = TestApp::builder()
        .settings(|s| s.idempotency.ttl = Duration::from_secs(1))
        .spawn()
        .await;
    let user = app.register_user().await;
    let key = new_key();
    let body = json!({ "name": "Expiring" });
    let first = send(&app, Method::POST, "/api/workspaces", &user.token, &key, body.clone()).await;
    first.assert_status(201);
    assert_replay_of(
        &send(&app, Method::POST, "/api/workspaces", &user.token, &key, body.clone()).await,
        &first,
    );

    // Replays until the record expires (a replay writes nothing), then a new write.
    let deadline = Instant::now() + Duration::from_secs(5);
    let fresh = loop {
        let answer = send(&app, Method::POST, "/api/workspaces", &user.token, &key, body.clone()).await;
        if !replayed(&answer) {
            break answer;
        }
        assert!(Instant::now() < deadline, "still replayed 5 s after a TTL of 1 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    fresh.assert_status(201);
    assert_ne!(fresh.body["id"], first.body["id"]);
    assert_eq!(workspaces_of(&app, user.id).await, 2);
}

#[tokio::test]
async fn another_users_identical_key_is_another_key() {
    let app = TestApp::spawn().await;
    let (alice, bob) = (app.register_user().await, app.register_user().await);
    let key = new_key();
    let body = json!({ "name": "Same" });
    let for_alice = send(&app, Method::POST, "/api/workspaces", &alice.token, &key, body.clone()).await;
    let for_bob = send(&app, Method::POST, "/api/workspaces", &bob.token, &key, body).await;

    for_alice.assert_status(201);
    for_bob.assert_status(201);
    assert!(!replayed(&for_bob), "{}", for_bob.text);
    assert_ne!(for_alice.body["id"], for_bob.body["id"]);
    assert_eq!(workspaces_of(&app, alice.id).await, 1);
    assert_eq!(workspaces_of(&app, bob.id).await, 1);
}

/// The record is in Postgres, committed with the write: Redis dying after the commit, before
/// the answer is sent, takes nothing with it.
#[tokio::test]
async fn a_replay_after_redis_is_killed_between_the_commit_and_the_answer_is_byte_identical() {
    let redis = private_redis().await;
    let a = TestApp::builder().redis(&redis).spawn().await;
    let b = TestApp::builder().sibling_of(&a).spawn().await;
    let (user, _, project) = a.user_with_project().await;
    let path = format!("/api/projects/{}/tasks", project["id"].as_str().unwrap());
    let key = new_key();
    let body = json!({ "title": "Survives" });

    // Frozen, Redis slows the request down (its invalidations wait for Redis until the breaker
    // opens); it is killed as soon as the write has committed, the answer perhaps still pending.
    redis.freeze();
    let first = send(&a, Method::POST, &path, &user.token, &key, body.clone());
    let kill_once_committed = async {
        let deadline = Instant::now() + Duration::from_secs(5);
        while tasks_in(&a, &project).await == 0 {
            assert!(Instant::now() < deadline, "the write never committed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        redis.kill();
    };
    let (first, ()) = tokio::join!(first, kill_once_committed);
    first.assert_status(201);

    assert_replay_of(
        &send(&b, Method::POST, &path, &user.token, &key, body.clone()).await,
        &first,
    );
    assert_replay_of(&send(&a, Method::POST, &path, &user.token, &key, body).await, &first);
    assert_eq!(tasks_in(&a, &project).await, 1);
}

#[tokio::test]
async fn a_patch_sent_again_is_replayed_and_not_applied_twice() {
    let app = TestApp::spawn().await;
    let (user, _, project) = app.user_with_project().await;
    let task = app
        .create_task(&user, project["id"].as_str().unwrap(), json!({ "title": "draft" }))
        .await;
    let path = format!("/api/tasks/{}", task["id"].as_str().unwrap());
    let key = new_key();
    let first = send(
        &app,
        Method::PATCH,
        &path,
        &user.token,
        &key,
        json!({ "title": "first" }),
    )
    .await;
    first.assert_status(200);
    app.patch(&path, &user.token, json!({ "title": "later" }))
        .await
        .assert_status(200);

    let replay = send(
        &app,
        Method::PATCH,
        &path,
        &user.token,
        &key,
        json!({ "title": "first" }),
    )
    .await;

    assert_replay_of(&replay, &first);
    assert_eq!(
        app.get(&path, &user.token).await.body["title"],
        "later",
        "not applied again"
    );
}

/// The second add fails inside the key's transaction (a unique violation): only its savepoint is
/// undone, and its 409 is recorded and replayed like any answer below 500.
#[tokio::test]
async fn a_write_refused_inside_the_keys_transaction_is_recorded_and_replayed() {
    let app = TestApp::spawn().await;
    let (owner, member) = (app.register_user().await, app.register_user().await);
    let workspace = app.create_workspace(&owner).await;
    let workspace_id = workspace["id"].as_str().unwrap();
    app.add_member(&owner, workspace_id, &member).await;
    let path = format!("/api/workspaces/{workspace_id}/members");
    let key = new_key();
    let body = json!({ "email": member.email });

    let first = send(&app, Method::POST, &path, &owner.token, &key, body.clone()).await;
    first.assert_error(409, "member_exists");
    assert!(!replayed(&first));

    assert_replay_of(&send(&app, Method::POST, &path, &owner.token, &key, body).await, &first);
}

/// Both directions of the document: every operation it says takes the header refuses a malformed
/// key, and no other operation does (the wrapping in the controllers and `IDEMPOTENT_OPERATIONS`
/// in the document cannot drift apart).
#[tokio::test]
async fn a_malformed_key_answers_400_exactly_on_the_operations_the_document_lists() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;
    let document = app
        .request(Method::GET, "/api-docs/openapi.json", None, None)
        .await
        .body;
    let malformed = "k".repeat(256);
    let mut listed = 0;
    for (path, operations) in document["paths"].as_object().unwrap() {
        // Logout would end the session the loop runs with; admin routes take another credential.
        if path.starts_with("/api/auth") || !path.starts_with("/api/") {
            continue;
        }
        let concrete: String = path
            .split('/')
            .map(|s| {
                if s.starts_with('{') {
                    Uuid::new_v4().to_string()
                } else {
                    s.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("/");
        for (method, operation) in operations.as_object().unwrap() {
            let takes_key = operation["parameters"]
                .as_array()
                .is_some_and(|ps| ps.iter().any(|p| p["name"] == "Idempotency-Key" && p["in"] == "header"));
            let method: Method = method.to_uppercase().parse().unwrap();
            let answer = send(&app, method.clone(), &concrete, &user.token, &malformed, json!({})).await;
            if takes_key {
                answer.assert_error(400, "invalid_idempotency_key");
                listed += 1;
            } else {
                assert_ne!(
                    answer.body["code"], "invalid_idempotency_key",
                    "{method} {path} reads the key"
                );
            }
        }
    }
    assert_eq!(listed, nestling::openapi::IDEMPOTENT_OPERATIONS.len());
}

#[tokio::test]
async fn writes_without_a_key_are_neither_recorded_nor_replayed() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;
    let first = app
        .post("/api/workspaces", &user.token, json!({ "name": "Twice" }))
        .await;
    let second = app
        .post("/api/workspaces", &user.token, json!({ "name": "Twice" }))
        .await;

    first.assert_status(201);
    second.assert_status(201);
    assert!(!replayed(&second));
    assert_eq!(workspaces_of(&app, user.id).await, 2);
    let records: i64 = sqlx::query_scalar("SELECT count(*) FROM idempotency_keys")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(records, 0);
}

/// A method the path does not serve is answered 405 with or without a key: the key must not turn
/// it into a 422 (the contract fuzzer found that, a PATCH on a project's task list).
#[tokio::test]
async fn a_method_the_path_does_not_serve_answers_405_whatever_the_key() {
    let app = TestApp::spawn().await;
    let (user, _, project) = app.user_with_project().await;
    let path = format!("/api/projects/{}/tasks", project["id"].as_str().unwrap());
    let key = new_key();
    send(
        &app,
        Method::POST,
        &path,
        &user.token,
        &key,
        json!({ "title": "First" }),
    )
    .await
    .assert_status(201);
    for body in [json!({ "title": "First" }), json!({ "title": "Other" })] {
        let patch = send(&app, Method::PATCH, &path, &user.token, &key, body).await;
        patch.assert_error(405, "method_not_allowed");
    }
}

/// `idempotency_requests_total` counts each outcome, for the dashboard's panel.
#[tokio::test]
async fn each_outcome_of_a_key_is_counted_in_the_metrics() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;
    let key = new_key();
    let body = json!({ "name": "Counted" });
    send(&app, Method::POST, "/api/workspaces", &user.token, &key, body.clone())
        .await
        .assert_status(201);
    assert!(replayed(
        &send(&app, Method::POST, "/api/workspaces", &user.token, &key, body).await
    ));
    send(
        &app,
        Method::POST,
        "/api/workspaces",
        &user.token,
        &key,
        json!({ "name": "Other" }),
    )
    .await
    .assert_error(422, "idempotency_key_reused");
    let metrics = app.request(Method::GET, "/metrics", None, None).await.text;
    for (outcome, count) in [("recorded", 1), ("replayed", 1), ("reused", 1), ("in_flight", 0)] {
        let line = format!("nestling_idempotency_requests_total{{outcome=\"{outcome}\"}} {count}");
        assert!(metrics.lines().any(|l| l == line), "no `{line}` in:\n{metrics}");
    }
}
