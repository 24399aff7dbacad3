//! Tasks: defaults, the `completedAt` rule, PATCH semantics, assignees, filters and paging,
//! validation, and who may see them.

use chrono::{DateTime, SubsecRound, Utc};
use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{TestApp, TestResponse, TestUser};

fn id(value: &Value) -> &str {
    value["id"].as_str().expect("an id")
}

fn timestamp(value: &Value) -> DateTime<Utc> {
    value
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an RFC 3339 timestamp: {value}"))
}

/// Now, at the precision Postgres stores, for "stamped between these two instants" checks.
fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

fn tasks_path(project: &Value) -> String {
    format!("/api/projects/{}/tasks", id(project))
}

fn task_path(task: &Value) -> String {
    format!("/api/tasks/{}", id(task))
}

async fn list(app: &TestApp, user: &TestUser, project: &Value, query: &str) -> TestResponse {
    app.get(&format!("{}{query}", tasks_path(project)), &user.token).await
}

fn titles(page: &Value) -> Vec<&str> {
    page["items"]
        .as_array()
        .unwrap_or_else(|| panic!("a page: {page}"))
        .iter()
        .map(|task| task["title"].as_str().unwrap())
        .collect()
}

/// Creates tasks titled `t0`, `t1`, ... in this order.
async fn create_numbered_tasks(app: &TestApp, user: &TestUser, project: &Value, count: usize) {
    for n in 0..count {
        app.create_task(user, id(project), json!({ "title": format!("t{n}") }))
            .await;
    }
}

#[tokio::test]
async fn create_task_with_only_a_title_uses_the_defaults() {
    let app = TestApp::spawn().await;
    let (user, workspace, project) = app.user_with_project().await;

    let response = app
        .post(&tasks_path(&project), &user.token, json!({ "title": "Write docs" }))
        .await;

    response.assert_status(201);
    let task = &response.body;
    assert!(id(task).parse::<uuid::Uuid>().is_ok(), "{task}");
    assert_eq!(task["projectId"], project["id"]);
    assert_eq!(task["workspaceId"], workspace["id"]);
    assert_eq!(task["title"], "Write docs");
    assert_eq!(task["status"], "todo");
    assert_eq!(task["priority"], "medium");
    assert_eq!(task["completedAt"], Value::Null);
    assert_eq!(task["description"], Value::Null);
    assert_eq!(task["assigneeId"], Value::Null);
    assert_eq!(task["dueDate"], Value::Null);
    assert_eq!(timestamp(&task["createdAt"]), timestamp(&task["updatedAt"]));
    assert_eq!(task.as_object().unwrap().len(), 12, "no other fields: {task}");
    assert_eq!(app.get(&task_path(task), &user.token).await.body, *task);
}

#[tokio::test]
async fn create_task_with_every_field_stores_them() {
    let app = TestApp::spawn().await;
    let (owner, workspace, project) = app.user_with_project().await;
    let member = app.register_user().await;
    app.add_member(&owner, id(&workspace), &member).await;

    let response = app
        .post(
            &tasks_path(&project),
            &owner.token,
            json!({
                "title": "  Ship it  ",
                "description": "All of it",
                "status": "in_progress",
                "priority": "urgent",
                "assigneeId": member.id,
                "dueDate": "2030-01-31",
            }),
        )
        .await;

    response.assert_status(201);
    let task = &response.body;
    assert_eq!(task["title"], "Ship it", "the title is trimmed");
    assert_eq!(task["description"], "All of it");
    assert_eq!(task["status"], "in_progress");
    assert_eq!(task["priority"], "urgent");
    assert_eq!(task["assigneeId"], member.id.to_string());
    assert_eq!(task["dueDate"], "2030-01-31");
    assert_eq!(task["completedAt"], Value::Null);
    let read = app.get(&task_path(task), &member.token).await;
    read.assert_status(200);
    assert_eq!(read.body, *task, "the assignee reads the same task");
}

#[tokio::test]
async fn create_task_accepts_the_longest_title_and_description() {
    let app = TestApp::spawn().await;
    let (user, _, project) = app.user_with_project().await;
    let (title, description) = ("t".repeat(200), "d".repeat(10_000));

    let task = app
        .create_task(
            &user,
            id(&project),
            json!({ "title": title, "description": description }),
        )
        .await;

    assert_eq!(task["title"], title);
    assert_eq!(task["description"], description);
}

#[tokio::test]
async fn setting_status_done_stamps_completed_at_and_moving_back_to_in_progress_clears_it() {
    let app = TestApp::spawn().await;
    let (user, _, project) = app.user_with_project().await;
    let task = app.create_task(&user, id(&project), json!({ "title": "Finish" })).await;
    let path = task_path(&task);

    let before = now();
    let done = app.patch(&path, &user.token, json!({ "status": "done" })).await;
    let after = now();

    done.assert_status(200);
    assert_eq!(done.body["status"], "done");
    let completed_at = timestamp(&done.body["completedAt"]);
    assert!(
        before <= completed_at && completed_at <= after,
        "stamped at the change: {before} <= {completed_at} <= {after}"
    );
    assert_eq!(
        app.get(&path, &user.token).await.body["completedAt"],
        done.body["completedAt"]
    );

    let reopened = app.patch(&path, &user.token, json!({ "status": "in_progress" })).await;

    reopened.assert_status(200);
    assert_eq!(reopened.body["status"], "in_progress");
    assert_eq!(reopened.body["completedAt"], Value::Null);
    assert_eq!(app.get(&path, &user.token).await.body["completedAt"], Value::Null);
}

#[tokio::test]
async fn patching_a_done_task_keeps_its_completed_at() {
    let app = TestApp::spawn().await;
    let (user, _, project) = app.user_with_project().await;
    let task = app.create_task(&user, id(&project), json!({ "title": "Finish" })).await;
    let path = task_path(&task);
    let done = app
        .patch(&path, &user.token, json!({ "status": "done" }))
        .await
        .body
        .clone();

    let renamed = app
        .patch(&path, &user.token, json!({ "title": "Finished", "status": "done" }))
        .await;

    renamed.assert_status(200);
    assert_eq!(renamed.body["title"], "Finished");
    assert_eq!(
        renamed.body["completedAt"], done["completedAt"],
        "done → done is not a new completion"
    );
}

#[tokio::test]
async fn creating_a_task_as_done_stamps_completed_at() {
    let app = TestApp::spawn().await;
    let (user, _, project) = app.user_with_project().await;

    let before = now();
    let task = app
        .create_task(
            &user,
            id(&project),
            json!({ "title": "Already done", "status": "done" }),
        )
        .await;
    let after = now();

    assert_eq!(task["status"], "done");
    let completed_at = timestamp(&task["completedAt"]);
    assert!(
        before <= completed_at && completed_at <= after,
        "{before} <= {completed_at} <= {after}"
    );
}

#[tokio::test]
async fn a_task_created_as_done_is_not_completed_before_it_was_created() {
    let app = TestApp::spawn().await;
    let (user, _, project) = app.user_with_project().await;

    let task = app
        .create_task(
            &user,
            id(&project),
            json!({ "title": "Already done", "status": "done" }),
        )
        .await;

    let (created_at, completed_at) = (timestamp(&task["createdAt"]), timestamp(&task["completedAt"]));
    assert!(
        completed_at >= created_at,
        "completedAt {completed_at} precedes createdAt {created_at}"
    );
}

#[tokio::test]
async fn patch_with_null_clears_description_assignee_and_due_date_while_absent_fields_stay() {
    let app = TestApp::spawn().await;
    let (user, _, project) = app.user_with_project().await;
    let task = app
        .create_task(
            &user,
            id(&project),
            json!({
                "title": "Plan",
                "description": "Details",
                "status": "in_progress",
                "priority": "high",
                "assigneeId": user.id,
                "dueDate": "2030-06-01",
            }),
        )
        .await;
    let path = task_path(&task);

    let renamed = app.patch(&path, &user.token, json!({ "title": "Plan B" })).await;

    renamed.assert_status(200);
    assert_eq!(renamed.body["title"], "Plan B");
    for field in [
        "description",
        "status",
        "priority",
        "assigneeId",
        "dueDate",
        "completedAt",
        "createdAt",
    ] {
        assert_eq!(renamed.body[field], task[field], "absent {field} stays");
    }

    let cleared = app
        .patch(
            &path,
            &user.token,
            json!({ "description": null, "assigneeId": null, "dueDate": null }),
        )
        .await;

    cleared.assert_status(200);
    for field in ["description", "assigneeId", "dueDate"] {
        assert_eq!(cleared.body[field], Value::Null, "null clears {field}");
    }
    assert_eq!(cleared.body["title"], "Plan B");
    assert_eq!(cleared.body["status"], "in_progress");
    assert_eq!(cleared.body["priority"], "high");
    assert_eq!(
        app.get(&path, &user.token).await.body,
        cleared.body,
        "the clearing is stored"
    );
}

#[tokio::test]
async fn patch_sets_every_field() {
    let app = TestApp::spawn().await;
    let (owner, workspace, project) = app.user_with_project().await;
    let member = app.register_user().await;
    app.add_member(&owner, id(&workspace), &member).await;
    let task = app.create_task(&owner, id(&project), json!({ "title": "Plan" })).await;

    let response = app
        .patch(
            &task_path(&task),
            &owner.token,
            json!({
                "title": "Plan C",
                "description": "Now with details",
                "status": "in_progress",
                "priority": "low",
                "assigneeId": member.id,
                "dueDate": "2031-02-28",
            }),
        )
        .await;

    response.assert_status(200);
    let patched = &response.body;
    assert_eq!(patched["title"], "Plan C");
    assert_eq!(patched["description"], "Now with details");
    assert_eq!(patched["status"], "in_progress");
    assert_eq!(patched["priority"], "low");
    assert_eq!(patched["assigneeId"], member.id.to_string());
    assert_eq!(patched["dueDate"], "2031-02-28");
    assert!(timestamp(&patched["updatedAt"]) >= timestamp(&task["updatedAt"]));
}

#[tokio::test]
async fn an_assignee_who_is_not_a_workspace_member_is_400_validation_failed() {
    let app = TestApp::spawn().await;
    let (user, _, project) = app.user_with_project().await;
    let task = app.create_task(&user, id(&project), json!({ "title": "Mine" })).await;
    let stranger = app.register_user().await;
    // A member of some other workspace is still a stranger here.
    let elsewhere = app.register_user().await;
    app.create_workspace(&elsewhere).await;

    for (reason, assignee) in [
        ("a registered non-member", stranger.id),
        ("a member of another workspace", elsewhere.id),
        ("a user that does not exist", uuid::Uuid::new_v4()),
    ] {
        let created = app
            .post(
                &tasks_path(&project),
                &user.token,
                json!({ "title": "Theirs", "assigneeId": assignee }),
            )
            .await;
        assert_eq!(created.status, 400, "create, {reason}: {}", created.text);
        created.assert_error(400, "validation_failed");
        assert!(
            created.body["details"]["assigneeId"].is_array(),
            "create, {reason}: {}",
            created.text
        );

        let patched = app
            .patch(&task_path(&task), &user.token, json!({ "assigneeId": assignee }))
            .await;
        assert_eq!(patched.status, 400, "patch, {reason}: {}", patched.text);
        patched.assert_error(400, "validation_failed");
        assert!(
            patched.body["details"]["assigneeId"].is_array(),
            "patch, {reason}: {}",
            patched.text
        );
    }

    let stored = list(&app, &user, &project, "").await;
    assert_eq!(titles(&stored.body), ["Mine"], "nothing was created");
    assert_eq!(
        stored.body["items"][0]["assigneeId"],
        Value::Null,
        "nothing was assigned"
    );
}

#[tokio::test]
async fn list_tasks_filters_by_status() {
    let app = TestApp::spawn().await;
    let (user, workspace, project) = app.user_with_project().await;
    for (title, status) in [
        ("a", "todo"),
        ("b", "done"),
        ("c", "in_progress"),
        ("d", "done"),
        ("e", "todo"),
    ] {
        app.create_task(&user, id(&project), json!({ "title": title, "status": status }))
            .await;
    }
    // The same statuses in another project of the workspace must not leak in.
    let other = app.create_project(&user, id(&workspace)).await;
    app.create_task(&user, id(&other), json!({ "title": "x", "status": "done" }))
        .await;

    for (status, expected) in [
        ("todo", vec!["a", "e"]),
        ("in_progress", vec!["c"]),
        ("done", vec!["b", "d"]),
    ] {
        let response = list(&app, &user, &project, &format!("?status={status}")).await;
        response.assert_status(200);
        assert_eq!(titles(&response.body), expected, "status={status}");
    }
    let all = list(&app, &user, &project, "").await;
    assert_eq!(titles(&all.body), ["a", "b", "c", "d", "e"], "no filter");
}

#[tokio::test]
async fn list_tasks_filters_by_assignee_and_status_together() {
    let app = TestApp::spawn().await;
    let (owner, workspace, project) = app.user_with_project().await;
    let member = app.register_user().await;
    app.add_member(&owner, id(&workspace), &member).await;
    for (title, assignee, status) in [
        ("mine", Some(owner.id), "todo"),
        ("theirs", Some(member.id), "todo"),
        ("nobody's", None, "todo"),
        ("theirs, done", Some(member.id), "done"),
    ] {
        app.create_task(
            &owner,
            id(&project),
            json!({ "title": title, "assigneeId": assignee, "status": status }),
        )
        .await;
    }

    let theirs = list(&app, &owner, &project, &format!("?assigneeId={}", member.id)).await;
    theirs.assert_status(200);
    assert_eq!(titles(&theirs.body), ["theirs", "theirs, done"]);

    let mine = list(&app, &member, &project, &format!("?assigneeId={}", owner.id)).await;
    assert_eq!(titles(&mine.body), ["mine"]);

    let theirs_done = list(
        &app,
        &owner,
        &project,
        &format!("?assigneeId={}&status=done", member.id),
    )
    .await;
    assert_eq!(titles(&theirs_done.body), ["theirs, done"]);
}

#[tokio::test]
async fn list_tasks_shows_50_per_page_by_default() {
    let app = TestApp::spawn().await;
    let (user, _, project) = app.user_with_project().await;
    create_numbered_tasks(&app, &user, &project, 51).await;

    let first = list(&app, &user, &project, "").await;

    first.assert_status(200);
    assert_eq!(first.body["limit"], 50);
    assert_eq!(first.body["offset"], 0);
    assert_eq!(first.body["nextOffset"], 50);
    assert_eq!(titles(&first.body).len(), 50);
    assert_eq!(titles(&first.body)[0], "t0", "oldest first");

    let rest = list(&app, &user, &project, "?offset=50").await;
    assert_eq!(titles(&rest.body), ["t50"]);
    assert_eq!(rest.body["nextOffset"], Value::Null);
}

#[tokio::test]
async fn list_tasks_pages_with_limit_and_offset_oldest_first() {
    let app = TestApp::spawn().await;
    let (user, _, project) = app.user_with_project().await;
    create_numbered_tasks(&app, &user, &project, 7).await;

    // (query, titles, nextOffset)
    let pages = [
        ("?limit=3", vec!["t0", "t1", "t2"], json!(3)),
        ("?limit=3&offset=3", vec!["t3", "t4", "t5"], json!(6)),
        ("?limit=3&offset=6", vec!["t6"], Value::Null),
        ("?limit=7", vec!["t0", "t1", "t2", "t3", "t4", "t5", "t6"], Value::Null),
        ("?limit=2&offset=5", vec!["t5", "t6"], Value::Null),
        ("?limit=3&offset=1", vec!["t1", "t2", "t3"], json!(4)),
        ("?limit=3&offset=7", vec![], Value::Null),
        ("?limit=3&offset=100", vec![], Value::Null),
    ];
    for (query, expected, next_offset) in pages {
        let response = list(&app, &user, &project, query).await;
        response.assert_status(200);
        assert_eq!(titles(&response.body), expected, "{query}");
        assert_eq!(response.body["nextOffset"], next_offset, "{query}");
    }

    let page = list(&app, &user, &project, "?limit=3&offset=3").await.body.clone();
    assert_eq!(page["limit"], 3);
    assert_eq!(page["offset"], 3);
}

#[tokio::test]
async fn list_tasks_accepts_limits_from_1_to_100() {
    let app = TestApp::spawn().await;
    let (user, _, project) = app.user_with_project().await;
    create_numbered_tasks(&app, &user, &project, 2).await;

    let one = list(&app, &user, &project, "?limit=1").await;
    one.assert_status(200);
    assert_eq!(titles(&one.body), ["t0"]);
    assert_eq!(one.body["nextOffset"], 1);

    let hundred = list(&app, &user, &project, "?limit=100").await;
    hundred.assert_status(200);
    assert_eq!(hundred.body["limit"], 100);
    assert_eq!(titles(&hundred.body), ["t0", "t1"]);
}

#[tokio::test]
async fn list_tasks_returns_400_validation_failed_for_paging_out_of_range() {
    let app = TestApp::spawn().await;
    let (user, _, project) = app.user_with_project().await;

    for (reason, query, field) in [
        ("limit 0", "?limit=0", "limit"),
        ("limit 101", "?limit=101", "limit"),
        ("negative limit", "?limit=-1", "limit"),
        ("negative offset", "?offset=-1", "offset"),
    ] {
        let response = list(&app, &user, &project, query).await;
        assert_eq!(response.status, 400, "{reason}: {}", response.text);
        assert_eq!(
            response.body["code"], "validation_failed",
            "{reason}: {}",
            response.text
        );
        assert!(
            response.body["details"][field].is_array(),
            "{reason}: details name {field}: {}",
            response.text
        );
    }
}

#[tokio::test]
async fn list_tasks_returns_400_invalid_query_for_malformed_parameters() {
    let app = TestApp::spawn().await;
    let (user, _, project) = app.user_with_project().await;

    for (reason, query) in [
        ("unknown parameter", "?sort=title"),
        (
            "snake_case spelling of a parameter",
            "?assignee_id=00000000-0000-0000-0000-000000000000",
        ),
        ("unknown status", "?status=nope"),
        ("limit that is not a number", "?limit=ten"),
        ("assignee that is not a uuid", "?assigneeId=me"),
    ] {
        let response = list(&app, &user, &project, query).await;
        assert_eq!(response.status, 400, "{reason}: {}", response.text);
        assert_eq!(response.body["code"], "invalid_query", "{reason}: {}", response.text);
    }
}

/// Bodies every task write must refuse: (reason, body, expected code, field named in details).
fn invalid_task_bodies() -> Vec<(&'static str, Value, &'static str, Option<&'static str>)> {
    vec![
        (
            "empty title",
            json!({ "title": "" }),
            "validation_failed",
            Some("title"),
        ),
        (
            "title of only whitespace",
            json!({ "title": " \t\n " }),
            "validation_failed",
            Some("title"),
        ),
        (
            "title over 200 characters",
            json!({ "title": "t".repeat(201) }),
            "validation_failed",
            Some("title"),
        ),
        (
            "NUL in title",
            json!({ "title": "bad\u{0}title" }),
            "validation_failed",
            Some("title"),
        ),
        (
            "description over 10000 characters",
            json!({ "title": "ok", "description": "d".repeat(10_001) }),
            "validation_failed",
            Some("description"),
        ),
        (
            "NUL in description",
            json!({ "title": "ok", "description": "a\u{0}b" }),
            "validation_failed",
            Some("description"),
        ),
        (
            "unknown status",
            json!({ "title": "ok", "status": "nope" }),
            "invalid_body",
            None,
        ),
        (
            "unknown priority",
            json!({ "title": "ok", "priority": "asap" }),
            "invalid_body",
            None,
        ),
        (
            "unknown field",
            json!({ "title": "ok", "labels": [] }),
            "invalid_body",
            None,
        ),
        (
            "assignee that is not a uuid",
            json!({ "title": "ok", "assigneeId": "me" }),
            "invalid_body",
            None,
        ),
        (
            "due date that does not exist",
            json!({ "title": "ok", "dueDate": "2030-02-30" }),
            "invalid_body",
            None,
        ),
        (
            "due date not in YYYY-MM-DD",
            json!({ "title": "ok", "dueDate": "31/01/2030" }),
            "invalid_body",
            None,
        ),
        (
            "due date with a time",
            json!({ "title": "ok", "dueDate": "2030-01-31T12:00:00Z" }),
            "invalid_body",
            None,
        ),
    ]
}

#[tokio::test]
async fn create_task_returns_400_for_invalid_bodies() {
    let app = TestApp::spawn().await;
    let (user, _, project) = app.user_with_project().await;

    let mut rows = invalid_task_bodies();
    rows.push(("missing title", json!({ "priority": "low" }), "invalid_body", None));
    for (reason, body, code, field) in rows {
        let response = app.post(&tasks_path(&project), &user.token, body).await;
        assert_eq!(response.status, 400, "{reason}: {}", response.text);
        assert_eq!(response.body["code"], code, "{reason}: {}", response.text);
        if let Some(field) = field {
            assert!(
                response.body["details"][field].is_array(),
                "{reason}: details name {field}: {}",
                response.text
            );
        }
    }
    let stored = list(&app, &user, &project, "").await;
    assert_eq!(stored.body["items"], json!([]), "nothing was created");
}

#[tokio::test]
async fn patch_task_returns_400_for_invalid_bodies() {
    let app = TestApp::spawn().await;
    let (user, _, project) = app.user_with_project().await;
    let task = app.create_task(&user, id(&project), json!({ "title": "Stable" })).await;
    let path = task_path(&task);

    for (reason, body, code, field) in invalid_task_bodies() {
        let response = app.patch(&path, &user.token, body).await;
        assert_eq!(response.status, 400, "{reason}: {}", response.text);
        assert_eq!(response.body["code"], code, "{reason}: {}", response.text);
        if let Some(field) = field {
            assert!(
                response.body["details"][field].is_array(),
                "{reason}: details name {field}: {}",
                response.text
            );
        }
    }
    assert_eq!(app.get(&path, &user.token).await.body, task, "the task is unchanged");
}

#[tokio::test]
async fn delete_task_returns_204_then_404_task_not_found() {
    let app = TestApp::spawn().await;
    let (user, _, project) = app.user_with_project().await;
    let task = app
        .create_task(&user, id(&project), json!({ "title": "Gone soon" }))
        .await;
    let kept = app.create_task(&user, id(&project), json!({ "title": "Kept" })).await;
    let path = task_path(&task);

    let response = app.delete(&path, &user.token).await;

    response.assert_status(204);
    assert!(response.text.is_empty(), "no body: {}", response.text);
    app.get(&path, &user.token).await.assert_error(404, "task_not_found");
    app.delete(&path, &user.token).await.assert_error(404, "task_not_found");
    let remaining = list(&app, &user, &project, "").await;
    assert_eq!(remaining.body["items"], json!([kept]));
}

#[tokio::test]
async fn a_task_id_that_does_not_exist_is_404_task_not_found() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;
    let path = format!("/api/tasks/{}", uuid::Uuid::new_v4());

    app.get(&path, &user.token).await.assert_error(404, "task_not_found");
    app.patch(&path, &user.token, json!({ "title": "x" }))
        .await
        .assert_error(404, "task_not_found");
    app.delete(&path, &user.token).await.assert_error(404, "task_not_found");
}

#[tokio::test]
async fn a_project_that_does_not_exist_is_404_project_not_found() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;
    let path = format!("/api/projects/{}/tasks", uuid::Uuid::new_v4());

    app.get(&path, &user.token).await.assert_error(404, "project_not_found");
    app.post(&path, &user.token, json!({ "title": "x" }))
        .await
        .assert_error(404, "project_not_found");
}

#[tokio::test]
async fn a_non_member_cannot_see_create_change_or_delete_tasks() {
    let app = TestApp::spawn().await;
    let (owner, _, project) = app.user_with_project().await;
    let task = app
        .create_task(&owner, id(&project), json!({ "title": "Private" }))
        .await;
    let stranger = app.register_user().await;
    let path = task_path(&task);

    list(&app, &stranger, &project, "")
        .await
        .assert_error(404, "project_not_found");
    app.post(&tasks_path(&project), &stranger.token, json!({ "title": "Intruder" }))
        .await
        .assert_error(404, "project_not_found");
    app.get(&path, &stranger.token)
        .await
        .assert_error(404, "task_not_found");
    app.patch(&path, &stranger.token, json!({ "status": "done" }))
        .await
        .assert_error(404, "task_not_found");
    app.delete(&path, &stranger.token)
        .await
        .assert_error(404, "task_not_found");

    let stored = list(&app, &owner, &project, "").await;
    assert_eq!(stored.body["items"], json!([task]), "untouched, nothing added");
}

#[tokio::test]
async fn a_workspace_member_can_work_on_the_owners_tasks() {
    let app = TestApp::spawn().await;
    let (owner, workspace, project) = app.user_with_project().await;
    let member = app.register_user().await;
    app.add_member(&owner, id(&workspace), &member).await;
    let task = app
        .create_task(&owner, id(&project), json!({ "title": "Shared" }))
        .await;

    let patched = app
        .patch(
            &task_path(&task),
            &member.token,
            json!({ "status": "done", "assigneeId": member.id }),
        )
        .await;
    patched.assert_status(200);
    let created = app
        .create_task(&member, id(&project), json!({ "title": "By the member" }))
        .await;

    let listed = list(&app, &owner, &project, "").await;
    assert_eq!(listed.body["items"], json!([patched.body, created]));
}

#[tokio::test]
async fn tasks_need_a_token() {
    let app = TestApp::spawn().await;
    let (user, _, project) = app.user_with_project().await;
    let task = app.create_task(&user, id(&project), json!({ "title": "x" })).await;

    for (method, path) in [
        (Method::GET, tasks_path(&project)),
        (Method::POST, tasks_path(&project)),
        (Method::GET, task_path(&task)),
        (Method::PATCH, task_path(&task)),
        (Method::DELETE, task_path(&task)),
    ] {
        let response = app
            .request(method.clone(), &path, None, Some(json!({ "title": "y" })))
            .await;
        assert_eq!(response.status, 401, "{method} {path}: {}", response.text);
        response.assert_error(401, "missing_token");
    }
}

/// Creating tasks while their project is deleted: each create either lands first (201) or finds
/// the project gone (404), never a 500 from the foreign key ([4/6], item 6).
#[tokio::test]
async fn creating_tasks_while_the_project_is_deleted_never_answers_5xx() {
    let app = TestApp::spawn().await;
    let (user, workspace, _) = app.user_with_project().await;
    let workspace = workspace["id"].as_str().unwrap().to_owned();
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for round in 0..50 {
        let project = app.create_project(&user, &workspace).await;
        let project = project["id"].as_str().unwrap().to_owned();
        let creates = (0..6).map(|n| {
            let (app, user, project) = (&app, &user, &project);
            async move {
                let path = format!("/api/projects/{project}/tasks");
                app.post(
                    &path,
                    &user.token,
                    json!({ "title": format!("round {round} task {n}") }),
                )
                .await
            }
        });
        let project_path = format!("/api/projects/{project}");
        let delete = app.delete(&project_path, &user.token);
        let (deleted, created) = tokio::join!(delete, futures_util::future::join_all(creates));
        deleted.assert_status(204);
        for response in created {
            assert!(
                response.status == 201 || response.status == 404,
                "round {round}: {} {}",
                response.status,
                response.text
            );
            *statuses.entry(response.status.as_u16()).or_default() += 1;
        }
    }
    assert!(statuses.contains_key(&201), "no create ever won the race: {statuses:?}");
}

/// Two PATCHes of one task at once, each changing another field: both changes stay, none is
/// reverted by the other's stale copy of the row ([4/6], item 5).
#[tokio::test]
async fn concurrent_patches_of_different_fields_both_stay() {
    let app = TestApp::spawn().await;
    let world = crate::helpers::World::create(&app).await;
    let path = world.fill("/api/tasks/{task}");
    for round in 0..30 {
        let title = format!("title {round}");
        let priority = if round % 2 == 0 { "high" } else { "low" };
        let (a, b) = tokio::join!(
            app.patch(&path, &world.user.token, json!({ "title": title })),
            app.patch(&path, &world.user.token, json!({ "priority": priority })),
        );
        a.assert_status(200);
        b.assert_status(200);
        let fresh = app.get_fresh(&path, &world.user.token).await.body;
        assert_eq!(
            (fresh["title"].as_str(), fresh["priority"].as_str()),
            (Some(title.as_str()), Some(priority)),
            "round {round}"
        );
    }
}

/// Where nothing comes from a cache (`Cache-Control: no-cache`, or memory mode with L1 off), the
/// list is authorized and read in one statement ([6/6]): it must still refuse a stranger and a
/// missing project, tell an empty project from a forbidden one, filter and page.
#[tokio::test]
async fn a_list_read_past_the_cache_checks_membership_and_tells_empty_from_forbidden() {
    let bypassing = TestApp::spawn().await;
    let l1_off = TestApp::builder()
        .settings(|s| s.cache.l1_enabled = false)
        .spawn()
        .await;
    for (mode, app, fresh) in [("no-cache", &bypassing, true), ("L1 off", &l1_off, false)] {
        let read = |user: &TestUser, path: String| {
            let token = user.token.clone();
            async move {
                match fresh {
                    true => app.get_fresh(&path, &token).await,
                    false => app.get(&path, &token).await,
                }
            }
        };
        let (owner, workspace, project) = app.user_with_project().await;
        let member = app.register_user().await;
        app.add_member(&owner, id(&workspace), &member).await;
        let stranger = app.register_user().await;

        let empty = read(&owner, tasks_path(&project)).await;
        empty.assert_status(200);
        assert_eq!(empty.body["items"], json!([]), "{mode}: an empty project");
        read(&stranger, tasks_path(&project))
            .await
            .assert_error(404, "project_not_found");
        let missing = format!("/api/projects/{}/tasks", uuid::Uuid::new_v4());
        read(&owner, missing).await.assert_error(404, "project_not_found");

        for (title, status) in [("a", "todo"), ("b", "done"), ("c", "todo")] {
            app.create_task(&owner, id(&project), json!({ "title": title, "status": status }))
                .await;
        }
        let todo = read(&member, format!("{}?status=todo&limit=1", tasks_path(&project))).await;
        todo.assert_status(200);
        assert_eq!(titles(&todo.body), ["a"], "{mode}: filtered, first page");
        assert_eq!(todo.body["nextOffset"], 1, "{mode}");
        read(&stranger, tasks_path(&project))
            .await
            .assert_error(404, "project_not_found");
    }
}
