//! `/api/users/me`: reading and renaming myself, and the tasks assigned to me.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use crate::helpers::{TestApp, TestUser};

fn id(value: &Value) -> String {
    value["id"].as_str().expect("an id").to_owned()
}

/// The ids of the tasks on my "assigned to me" page for `query` (e.g. `?status=done`).
async fn my_task_ids(app: &TestApp, user: &TestUser, query: &str) -> BTreeSet<String> {
    let response = app.get(&format!("/api/users/me/tasks{query}"), &user.token).await;
    response.assert_status(200);
    response.body["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(id)
        .collect()
}

async fn assigned_task(
    app: &TestApp,
    creator: &TestUser,
    project: &Value,
    assignee: &TestUser,
    status: &str,
) -> String {
    let body = json!({ "title": format!("{status} task"), "assigneeId": assignee.id, "status": status });
    id(&app.create_task(creator, &id(project), body).await)
}

#[tokio::test]
async fn get_me_returns_the_signed_in_user() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;

    let response = app.get("/api/users/me", &user.token).await;

    response.assert_status(200);
    let mut keys: Vec<&str> = response.body.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["createdAt", "email", "id", "name", "updatedAt"],
        "{}",
        response.text
    );
    assert_eq!(response.body["id"], user.id.to_string());
    assert_eq!(response.body["email"], user.email);
    assert_eq!(response.body["name"], "Test User");
}

#[tokio::test]
async fn patch_me_changes_my_name_and_the_change_persists() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;
    let before = app.get("/api/users/me", &user.token).await.body;

    let response = app
        .patch("/api/users/me", &user.token, json!({ "name": "  Grace Hopper " }))
        .await;

    response.assert_status(200);
    assert_eq!(response.body["name"], "Grace Hopper", "the name is stored trimmed");
    assert_eq!(response.body["id"], before["id"]);
    assert_eq!(response.body["email"], before["email"]);
    assert_eq!(response.body["createdAt"], before["createdAt"]);
    let read_again = app.get("/api/users/me", &user.token).await;
    assert_eq!(read_again.body, response.body);
}

#[tokio::test]
async fn patch_me_returns_400_validation_failed_naming_the_name_when_it_is_invalid() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;
    let cases = [
        ("name is empty", "".to_owned()),
        ("name is only whitespace", "   ".to_owned()),
        ("name is over 100 characters", "x".repeat(101)),
        ("name contains a NUL character", "Grace\0Hopper".to_owned()),
    ];

    for (reason, name) in cases {
        let response = app.patch("/api/users/me", &user.token, json!({ "name": name })).await;
        assert_eq!(response.status, 400, "{reason}: {}", response.text);
        assert_eq!(
            response.body["code"], "validation_failed",
            "{reason}: {}",
            response.text
        );
        response.assert_error(400, "validation_failed");
        assert!(
            response.body["details"]["name"].is_array(),
            "{reason}: {}",
            response.text
        );
    }
    let me = app.get("/api/users/me", &user.token).await;
    assert_eq!(me.body["name"], "Test User");
}

#[tokio::test]
async fn patch_me_returns_400_invalid_body_for_an_unknown_field_and_changes_nothing() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;
    let before = app.get("/api/users/me", &user.token).await.body;

    let body = json!({ "name": "Grace Hopper", "email": "grace@example.com" });
    let response = app.patch("/api/users/me", &user.token, body).await;

    response.assert_error(400, "invalid_body");
    let after = app.get("/api/users/me", &user.token).await.body;
    assert_eq!(after, before);
}

#[tokio::test]
async fn my_tasks_lists_only_tasks_assigned_to_me_across_my_workspaces() {
    let app = TestApp::spawn().await;
    let (me, mine, my_project) = app.user_with_project().await;
    let (teammate, theirs, their_project) = app.user_with_project().await;
    app.add_member(&teammate, &id(&theirs), &me).await;
    app.add_member(&me, &id(&mine), &teammate).await;

    let in_mine = assigned_task(&app, &me, &my_project, &me, "todo").await;
    let in_theirs = assigned_task(&app, &teammate, &their_project, &me, "todo").await;
    assigned_task(&app, &me, &my_project, &teammate, "todo").await;
    assigned_task(&app, &teammate, &their_project, &teammate, "todo").await;
    app.create_task(&me, &id(&my_project), json!({ "title": "nobody's" }))
        .await;

    let response = app.get("/api/users/me/tasks", &me.token).await;
    response.assert_status(200);
    assert_eq!(response.body["limit"], 50);
    assert_eq!(response.body["offset"], 0);
    assert_eq!(response.body["nextOffset"], Value::Null);
    let ids: BTreeSet<String> = response.body["items"].as_array().unwrap().iter().map(id).collect();
    assert_eq!(ids, BTreeSet::from([in_mine, in_theirs]));
}

#[tokio::test]
async fn my_tasks_leaves_out_workspaces_i_was_removed_from() {
    let app = TestApp::spawn().await;
    let (me, _, my_project) = app.user_with_project().await;
    let (teammate, theirs, their_project) = app.user_with_project().await;
    app.add_member(&teammate, &id(&theirs), &me).await;
    let kept = assigned_task(&app, &me, &my_project, &me, "todo").await;
    let there = assigned_task(&app, &teammate, &their_project, &me, "todo").await;
    assert_eq!(my_task_ids(&app, &me, "").await, BTreeSet::from([kept.clone(), there]));

    let path = format!("/api/workspaces/{}/members/{}", id(&theirs), me.id);
    app.delete(&path, &teammate.token).await.assert_status(204);

    assert_eq!(my_task_ids(&app, &me, "").await, BTreeSet::from([kept]));
}

#[tokio::test]
async fn my_tasks_filters_by_status() {
    let app = TestApp::spawn().await;
    let (me, _, project) = app.user_with_project().await;
    let todo = assigned_task(&app, &me, &project, &me, "todo").await;
    let in_progress = assigned_task(&app, &me, &project, &me, "in_progress").await;
    let done = assigned_task(&app, &me, &project, &me, "done").await;

    assert_eq!(my_task_ids(&app, &me, "?status=todo").await, BTreeSet::from([todo]));
    assert_eq!(
        my_task_ids(&app, &me, "?status=in_progress").await,
        BTreeSet::from([in_progress])
    );
    assert_eq!(my_task_ids(&app, &me, "?status=done").await, BTreeSet::from([done]));
}

#[tokio::test]
async fn my_tasks_pages_with_limit_and_offset() {
    let app = TestApp::spawn().await;
    let (me, _, project) = app.user_with_project().await;
    for _ in 0..3 {
        assigned_task(&app, &me, &project, &me, "todo").await;
    }

    let first = app.get("/api/users/me/tasks?limit=2", &me.token).await;
    first.assert_status(200);
    assert_eq!(first.body["items"].as_array().unwrap().len(), 2);
    assert_eq!(first.body["nextOffset"], 2);
    let last = app.get("/api/users/me/tasks?limit=2&offset=2", &me.token).await;
    assert_eq!(last.body["items"].as_array().unwrap().len(), 1);
    assert_eq!(last.body["nextOffset"], Value::Null);
}

#[tokio::test]
async fn my_tasks_returns_400_invalid_query_for_an_assignee_id() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;

    let path = format!("/api/users/me/tasks?assigneeId={}", user.id);
    app.get(&path, &user.token).await.assert_error(400, "invalid_query");
}
