//! Projects: CRUD inside a workspace, validation, and who may see them.

use chrono::{DateTime, Utc};
use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::TestApp;

fn id(value: &Value) -> &str {
    value["id"].as_str().expect("an id")
}

fn timestamp(value: &Value) -> DateTime<Utc> {
    value
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an RFC 3339 timestamp: {value}"))
}

#[tokio::test]
async fn create_project_returns_201_with_the_project() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;
    let workspace = app.create_workspace(&user).await;
    let path = format!("/api/workspaces/{}/projects", id(&workspace));

    let response = app
        .post(
            &path,
            &user.token,
            json!({ "name": "Launch", "description": "Ship it" }),
        )
        .await;

    response.assert_status(201);
    let project = &response.body;
    assert!(id(project).parse::<uuid::Uuid>().is_ok(), "{project}");
    assert_eq!(project["workspaceId"], workspace["id"]);
    assert_eq!(project["name"], "Launch");
    assert_eq!(project["description"], "Ship it");
    assert_eq!(timestamp(&project["createdAt"]), timestamp(&project["updatedAt"]));
    let keys: Vec<&String> = project.as_object().unwrap().keys().collect();
    assert_eq!(keys.len(), 6, "no other fields: {project}");
}

#[tokio::test]
async fn create_project_without_a_description_stores_null_and_trims_the_name() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;
    let workspace = app.create_workspace(&user).await;

    let response = app
        .post(
            &format!("/api/workspaces/{}/projects", id(&workspace)),
            &user.token,
            json!({ "name": "  Launch  " }),
        )
        .await;

    response.assert_status(201);
    assert_eq!(response.body["name"], "Launch");
    assert_eq!(response.body["description"], Value::Null);
}

#[tokio::test]
async fn list_projects_returns_only_that_workspaces_projects_in_creation_order() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;
    let workspace = app.create_workspace(&user).await;
    let other = app.create_workspace(&user).await;
    let path = format!("/api/workspaces/{}/projects", id(&workspace));
    let mut created = Vec::new();
    for name in ["first", "second", "third"] {
        let response = app.post(&path, &user.token, json!({ "name": name })).await;
        response.assert_status(201);
        created.push(response.body.clone());
        // Interleave a project elsewhere: it must not show up.
        app.create_project(&user, id(&other)).await;
    }

    let response = app.get(&path, &user.token).await;

    response.assert_status(200);
    assert_eq!(response.body, Value::Array(created));
}

#[tokio::test]
async fn list_projects_of_a_workspace_without_projects_is_empty() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;
    let workspace = app.create_workspace(&user).await;

    let response = app
        .get(&format!("/api/workspaces/{}/projects", id(&workspace)), &user.token)
        .await;

    response.assert_status(200);
    assert_eq!(response.body, json!([]));
}

#[tokio::test]
async fn get_project_returns_the_project() {
    let app = TestApp::spawn().await;
    let (user, _, project) = app.user_with_project().await;

    let response = app.get(&format!("/api/projects/{}", id(&project)), &user.token).await;

    response.assert_status(200);
    assert_eq!(response.body, project);
}

#[tokio::test]
async fn get_project_that_does_not_exist_is_404_project_not_found() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;

    let response = app
        .get(&format!("/api/projects/{}", uuid::Uuid::new_v4()), &user.token)
        .await;

    response.assert_error(404, "project_not_found");
}

#[tokio::test]
async fn get_project_with_an_id_that_is_not_a_uuid_is_400_invalid_path() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;

    app.get("/api/projects/not-a-uuid", &user.token)
        .await
        .assert_error(400, "invalid_path");
}

#[tokio::test]
async fn projects_need_a_token() {
    let app = TestApp::spawn().await;
    let (_, workspace, project) = app.user_with_project().await;

    for (method, path) in [
        (Method::GET, format!("/api/workspaces/{}/projects", id(&workspace))),
        (Method::GET, format!("/api/projects/{}", id(&project))),
        (Method::DELETE, format!("/api/projects/{}", id(&project))),
    ] {
        let response = app.request(method.clone(), &path, None, None).await;
        assert_eq!(response.status, 401, "{method} {path}: {}", response.text);
        response.assert_error(401, "missing_token");
    }
}

#[tokio::test]
async fn patch_project_renames_it_and_keeps_the_description() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;
    let workspace = app.create_workspace(&user).await;
    let created = app
        .post(
            &format!("/api/workspaces/{}/projects", id(&workspace)),
            &user.token,
            json!({ "name": "Old", "description": "Keep me" }),
        )
        .await
        .body
        .clone();
    let path = format!("/api/projects/{}", id(&created));

    let response = app.patch(&path, &user.token, json!({ "name": "New" })).await;

    response.assert_status(200);
    assert_eq!(response.body["name"], "New");
    assert_eq!(response.body["description"], "Keep me");
    assert_eq!(response.body["createdAt"], created["createdAt"]);
    assert!(timestamp(&response.body["updatedAt"]) >= timestamp(&created["updatedAt"]));
    assert_eq!(
        app.get(&path, &user.token).await.body,
        response.body,
        "the change is stored"
    );
}

#[tokio::test]
async fn patch_project_with_null_description_clears_it_while_an_absent_description_leaves_it() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;
    let workspace = app.create_workspace(&user).await;
    let created = app
        .post(
            &format!("/api/workspaces/{}/projects", id(&workspace)),
            &user.token,
            json!({ "name": "Launch", "description": "Ship it" }),
        )
        .await
        .body
        .clone();
    let path = format!("/api/projects/{}", id(&created));

    let absent = app.patch(&path, &user.token, json!({})).await;
    absent.assert_status(200);
    assert_eq!(absent.body["description"], "Ship it", "absent leaves it");

    let cleared = app.patch(&path, &user.token, json!({ "description": null })).await;
    cleared.assert_status(200);
    assert_eq!(cleared.body["description"], Value::Null, "null clears it");
    assert_eq!(cleared.body["name"], "Launch");
    assert_eq!(
        app.get(&path, &user.token).await.body["description"],
        Value::Null,
        "the clearing is stored"
    );
}

#[tokio::test]
async fn delete_project_returns_204_then_404_and_removes_its_tasks() {
    let app = TestApp::spawn().await;
    let (user, _, project) = app.user_with_project().await;
    app.create_task(&user, id(&project), json!({ "title": "one" })).await;
    app.create_task(&user, id(&project), json!({ "title": "two" })).await;
    let path = format!("/api/projects/{}", id(&project));

    let response = app.delete(&path, &user.token).await;

    response.assert_status(204);
    assert!(response.text.is_empty(), "no body: {}", response.text);
    app.get(&path, &user.token).await.assert_error(404, "project_not_found");
    app.delete(&path, &user.token)
        .await
        .assert_error(404, "project_not_found");
    let project_id: uuid::Uuid = id(&project).parse().unwrap();
    let tasks: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE project_id = $1")
        .bind(project_id)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(tasks, 0, "the project's tasks are deleted with it");
}

/// Bodies every project write must refuse: (reason, body, expected code, field named in details).
fn invalid_project_bodies() -> Vec<(&'static str, Value, &'static str, Option<&'static str>)> {
    vec![
        ("empty name", json!({ "name": "" }), "validation_failed", Some("name")),
        (
            "name of only whitespace",
            json!({ "name": " \t\n " }),
            "validation_failed",
            Some("name"),
        ),
        (
            "name over 200 characters",
            json!({ "name": "n".repeat(201) }),
            "validation_failed",
            Some("name"),
        ),
        (
            "NUL in name",
            json!({ "name": "bad\u{0}name" }),
            "validation_failed",
            Some("name"),
        ),
        (
            "description over 5000 characters",
            json!({ "name": "ok", "description": "d".repeat(5001) }),
            "validation_failed",
            Some("description"),
        ),
        (
            "NUL in description",
            json!({ "name": "ok", "description": "a\u{0}b" }),
            "validation_failed",
            Some("description"),
        ),
        (
            "unknown field",
            json!({ "name": "ok", "color": "red" }),
            "invalid_body",
            None,
        ),
        ("name of the wrong type", json!({ "name": 42 }), "invalid_body", None),
    ]
}

#[tokio::test]
async fn create_project_returns_400_for_invalid_bodies() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;
    let workspace = app.create_workspace(&user).await;
    let path = format!("/api/workspaces/{}/projects", id(&workspace));

    let mut rows = invalid_project_bodies();
    rows.push((
        "missing name",
        json!({ "description": "no name" }),
        "invalid_body",
        None,
    ));
    for (reason, body, code, field) in rows {
        let response = app.post(&path, &user.token, body).await;
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
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM projects")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(stored, 0, "nothing was created");
}

#[tokio::test]
async fn patch_project_returns_400_for_invalid_bodies() {
    let app = TestApp::spawn().await;
    let (user, _, project) = app.user_with_project().await;
    let path = format!("/api/projects/{}", id(&project));

    for (reason, body, code, field) in invalid_project_bodies() {
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
    assert_eq!(
        app.get(&path, &user.token).await.body,
        project,
        "the project is unchanged"
    );
}

#[tokio::test]
async fn a_workspace_member_can_create_and_read_projects() {
    let app = TestApp::spawn().await;
    let owner = app.register_user().await;
    let member = app.register_user().await;
    let workspace = app.create_workspace(&owner).await;
    app.add_member(&owner, id(&workspace), &member).await;
    let owners = app.create_project(&owner, id(&workspace)).await;

    let members = app.create_project(&member, id(&workspace)).await;

    assert_eq!(members["workspaceId"], workspace["id"]);
    let listed = app
        .get(&format!("/api/workspaces/{}/projects", id(&workspace)), &member.token)
        .await;
    listed.assert_status(200);
    assert_eq!(listed.body, json!([owners, members]));
    let read = app.get(&format!("/api/projects/{}", id(&owners)), &member.token).await;
    read.assert_status(200);
    assert_eq!(read.body, owners);
    let by_owner = app.get(&format!("/api/projects/{}", id(&members)), &owner.token).await;
    by_owner.assert_status(200);
    assert_eq!(by_owner.body, members);
}

#[tokio::test]
async fn a_non_member_gets_404_workspace_not_found_on_list_and_create() {
    let app = TestApp::spawn().await;
    let (_, workspace, _) = app.user_with_project().await;
    let stranger = app.register_user().await;
    let path = format!("/api/workspaces/{}/projects", id(&workspace));

    app.get(&path, &stranger.token)
        .await
        .assert_error(404, "workspace_not_found");
    app.post(&path, &stranger.token, json!({ "name": "Intruder" }))
        .await
        .assert_error(404, "workspace_not_found");

    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM projects")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(stored, 1, "the stranger created nothing");
}

#[tokio::test]
async fn a_workspace_that_does_not_exist_is_404_workspace_not_found() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;
    let path = format!("/api/workspaces/{}/projects", uuid::Uuid::new_v4());

    app.get(&path, &user.token)
        .await
        .assert_error(404, "workspace_not_found");
    app.post(&path, &user.token, json!({ "name": "Nowhere" }))
        .await
        .assert_error(404, "workspace_not_found");
}

#[tokio::test]
async fn a_non_member_cannot_read_change_or_delete_a_project() {
    let app = TestApp::spawn().await;
    let (owner, _, project) = app.user_with_project().await;
    let stranger = app.register_user().await;
    let path = format!("/api/projects/{}", id(&project));

    app.get(&path, &stranger.token)
        .await
        .assert_error(404, "project_not_found");
    app.patch(&path, &stranger.token, json!({ "name": "Mine" }))
        .await
        .assert_error(404, "project_not_found");
    app.delete(&path, &stranger.token)
        .await
        .assert_error(404, "project_not_found");

    assert_eq!(
        app.get(&path, &owner.token).await.body,
        project,
        "the project is untouched"
    );
}
