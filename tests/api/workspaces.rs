//! Workspaces and their members: who may read, who may change, and what removal and deletion take along.

use std::collections::BTreeMap;

use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{TestApp, TestResponse, TestUser};

fn id(value: &Value) -> String {
    value["id"].as_str().expect("an id").to_owned()
}

fn uuid(value: &Value) -> Uuid {
    id(value).parse().unwrap()
}

/// The workspace's members as user id → role, read by `user`.
async fn roles(app: &TestApp, user: &TestUser, workspace_id: &str) -> BTreeMap<String, String> {
    let response = app
        .get(&format!("/api/workspaces/{workspace_id}/members"), &user.token)
        .await;
    response.assert_status(200);
    let members = response.body.as_array().expect("a list of members");
    members
        .iter()
        .map(|m| {
            (
                m["userId"].as_str().unwrap().to_owned(),
                m["role"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

async fn add_owner(app: &TestApp, owner: &TestUser, workspace_id: &str, co_owner: &TestUser) {
    let path = format!("/api/workspaces/{workspace_id}/members");
    let body = json!({ "email": co_owner.email, "role": "owner" });
    app.post(&path, &owner.token, body).await.assert_status(201);
}

async fn remove_member(app: &TestApp, by: &TestUser, workspace_id: &str, member: &TestUser) -> TestResponse {
    app.delete(
        &format!("/api/workspaces/{workspace_id}/members/{}", member.id),
        &by.token,
    )
    .await
}

async fn count(app: &TestApp, sql: &str, id: Uuid) -> i64 {
    sqlx::query_scalar(sql).bind(id).fetch_one(&app.db).await.unwrap()
}

#[tokio::test]
async fn create_workspace_returns_201_and_makes_the_creator_its_owner() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;

    let response = app
        .post("/api/workspaces", &user.token, json!({ "name": "  Acme " }))
        .await;

    response.assert_status(201);
    let mut keys: Vec<&str> = response.body.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["createdAt", "createdBy", "id", "name", "updatedAt"],
        "{}",
        response.text
    );
    assert_eq!(response.body["name"], "Acme", "the name is stored trimmed");
    assert_eq!(response.body["createdBy"], user.id.to_string());

    let members = app
        .get(&format!("/api/workspaces/{}/members", id(&response.body)), &user.token)
        .await;
    members.assert_status(200);
    let members = members.body.as_array().unwrap();
    assert_eq!(members.len(), 1);
    assert_eq!(members[0]["userId"], user.id.to_string());
    assert_eq!(members[0]["email"], user.email);
    assert_eq!(members[0]["name"], "Test User");
    assert_eq!(members[0]["role"], "owner");
    assert!(members[0]["joinedAt"].is_string());
}

#[tokio::test]
async fn create_workspace_returns_400_validation_failed_naming_the_name_when_it_is_invalid() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;
    let cases = [
        ("name is empty", "".to_owned()),
        ("name is only whitespace", "  ".to_owned()),
        ("name is over 100 characters", "x".repeat(101)),
        ("name contains a NUL character", "Ac\0me".to_owned()),
    ];

    for (reason, name) in cases {
        let response = app.post("/api/workspaces", &user.token, json!({ "name": name })).await;
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
    let workspaces = app.get("/api/workspaces", &user.token).await;
    assert_eq!(workspaces.body, json!([]));
}

#[tokio::test]
async fn list_workspaces_shows_only_the_workspaces_i_belong_to() {
    let app = TestApp::spawn().await;
    let me = app.register_user().await;
    let other = app.register_user().await;
    let first = app.create_workspace(&me).await;
    let second = app.create_workspace(&me).await;
    let joined = app.create_workspace(&other).await;
    app.create_workspace(&other).await;
    app.add_member(&other, &id(&joined), &me).await;

    let response = app.get("/api/workspaces", &me.token).await;

    response.assert_status(200);
    let ids: Vec<String> = response.body.as_array().unwrap().iter().map(id).collect();
    assert_eq!(ids, [id(&first), id(&second), id(&joined)], "mine, oldest first");
}

#[tokio::test]
async fn get_workspace_returns_it_to_its_owner_and_members() {
    let app = TestApp::spawn().await;
    let owner = app.register_user().await;
    let member = app.register_user().await;
    let workspace = app.create_workspace(&owner).await;
    app.add_member(&owner, &id(&workspace), &member).await;

    for user in [&owner, &member] {
        let response = app
            .get(&format!("/api/workspaces/{}", id(&workspace)), &user.token)
            .await;
        response.assert_status(200);
        assert_eq!(response.body, workspace);
    }
}

#[tokio::test]
async fn an_owner_can_rename_a_workspace() {
    let app = TestApp::spawn().await;
    let owner = app.register_user().await;
    let workspace = app.create_workspace(&owner).await;
    let path = format!("/api/workspaces/{}", id(&workspace));

    let response = app.patch(&path, &owner.token, json!({ "name": "Renamed" })).await;

    response.assert_status(200);
    assert_eq!(response.body["name"], "Renamed");
    assert_eq!(response.body["createdAt"], workspace["createdAt"]);
    assert_eq!(app.get(&path, &owner.token).await.body, response.body);

    let empty = app.patch(&path, &owner.token, json!({ "name": "" })).await;
    empty.assert_error(400, "validation_failed");
    assert!(empty.body["details"]["name"].is_array(), "{}", empty.text);
    assert_eq!(app.get(&path, &owner.token).await.body["name"], "Renamed");
}

#[tokio::test]
async fn an_owner_can_delete_a_workspace() {
    let app = TestApp::spawn().await;
    let owner = app.register_user().await;
    let workspace = app.create_workspace(&owner).await;
    let path = format!("/api/workspaces/{}", id(&workspace));

    let response = app.delete(&path, &owner.token).await;

    response.assert_status(204);
    assert!(response.text.is_empty(), "{}", response.text);
    app.get(&path, &owner.token)
        .await
        .assert_error(404, "workspace_not_found");
    assert_eq!(app.get("/api/workspaces", &owner.token).await.body, json!([]));
}

#[tokio::test]
async fn deleting_a_workspace_deletes_its_projects_and_tasks() {
    let app = TestApp::spawn().await;
    let (owner, doomed, project) = app.user_with_project().await;
    let second_project = app.create_project(&owner, &id(&doomed)).await;
    let task = app.create_task(&owner, &id(&project), json!({ "title": "one" })).await;
    app.create_task(
        &owner,
        &id(&second_project),
        json!({ "title": "two", "assigneeId": owner.id }),
    )
    .await;
    let kept = app.create_workspace(&owner).await;
    let kept_project = app.create_project(&owner, &id(&kept)).await;
    app.create_task(&owner, &id(&kept_project), json!({ "title": "kept" }))
        .await;

    app.delete(&format!("/api/workspaces/{}", id(&doomed)), &owner.token)
        .await
        .assert_status(204);

    let projects = "SELECT count(*) FROM projects WHERE workspace_id = $1";
    let tasks = "SELECT count(*) FROM tasks WHERE workspace_id = $1";
    let members = "SELECT count(*) FROM workspace_members WHERE workspace_id = $1";
    assert_eq!(
        count(&app, projects, uuid(&doomed)).await,
        0,
        "projects of the deleted workspace"
    );
    assert_eq!(
        count(&app, tasks, uuid(&doomed)).await,
        0,
        "tasks of the deleted workspace"
    );
    assert_eq!(
        count(&app, members, uuid(&doomed)).await,
        0,
        "members of the deleted workspace"
    );
    assert_eq!(
        count(&app, projects, uuid(&kept)).await,
        1,
        "projects of another workspace"
    );
    assert_eq!(count(&app, tasks, uuid(&kept)).await, 1, "tasks of another workspace");
    app.get(&format!("/api/projects/{}", id(&project)), &owner.token)
        .await
        .assert_error(404, "project_not_found");
    app.get(&format!("/api/tasks/{}", id(&task)), &owner.token)
        .await
        .assert_error(404, "task_not_found");
}

#[tokio::test]
async fn a_plain_member_can_read_a_workspace_but_gets_403_on_every_change() {
    let app = TestApp::spawn().await;
    let owner = app.register_user().await;
    let member = app.register_user().await;
    let other_member = app.register_user().await;
    let outsider = app.register_user().await;
    let workspace = app.create_workspace(&owner).await;
    let ws = id(&workspace);
    app.add_member(&owner, &ws, &member).await;
    app.add_member(&owner, &ws, &other_member).await;
    let roles_before = roles(&app, &owner, &ws).await;

    app.get(&format!("/api/workspaces/{ws}"), &member.token)
        .await
        .assert_status(200);
    assert_eq!(roles(&app, &member, &ws).await, roles_before);

    let cases = [
        (
            "rename it",
            Method::PATCH,
            format!("/api/workspaces/{ws}"),
            Some(json!({ "name": "Mine now" })),
        ),
        ("delete it", Method::DELETE, format!("/api/workspaces/{ws}"), None),
        (
            "add a member",
            Method::POST,
            format!("/api/workspaces/{ws}/members"),
            Some(json!({ "email": outsider.email })),
        ),
        (
            "remove the owner",
            Method::DELETE,
            format!("/api/workspaces/{ws}/members/{}", owner.id),
            None,
        ),
        (
            "remove another member",
            Method::DELETE,
            format!("/api/workspaces/{ws}/members/{}", other_member.id),
            None,
        ),
    ];
    for (reason, method, path, body) in cases {
        let response = app.request(method, &path, Some(&member.token), body).await;
        assert_eq!(response.status, 403, "{reason}: {}", response.text);
        response.assert_error(403, "forbidden");
    }

    assert_eq!(
        app.get(&format!("/api/workspaces/{ws}"), &owner.token).await.body,
        workspace
    );
    assert_eq!(roles(&app, &owner, &ws).await, roles_before);
}

#[tokio::test]
async fn add_member_by_email_returns_201_with_the_member_as_a_plain_member() {
    let app = TestApp::spawn().await;
    let owner = app.register_user().await;
    let newcomer = app.register_user().await;
    let ws = id(&app.create_workspace(&owner).await);

    let response = app
        .post(
            &format!("/api/workspaces/{ws}/members"),
            &owner.token,
            json!({ "email": newcomer.email }),
        )
        .await;

    response.assert_status(201);
    let mut keys: Vec<&str> = response.body.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["email", "joinedAt", "name", "role", "userId"],
        "{}",
        response.text
    );
    assert_eq!(response.body["userId"], newcomer.id.to_string());
    assert_eq!(response.body["email"], newcomer.email);
    assert_eq!(response.body["name"], "Test User");
    assert_eq!(response.body["role"], "member");
    let roles = roles(&app, &owner, &ws).await;
    assert_eq!(roles.get(&newcomer.id.to_string()).map(String::as_str), Some("member"));
    app.get(&format!("/api/workspaces/{ws}"), &newcomer.token)
        .await
        .assert_status(200);
}

#[tokio::test]
async fn add_member_finds_the_email_in_any_case() {
    let app = TestApp::spawn().await;
    let owner = app.register_user().await;
    let newcomer = app.register_user().await;
    let ws = id(&app.create_workspace(&owner).await);

    let body = json!({ "email": newcomer.email.to_uppercase() });
    let response = app
        .post(&format!("/api/workspaces/{ws}/members"), &owner.token, body)
        .await;

    response.assert_status(201);
    assert_eq!(response.body["userId"], newcomer.id.to_string());
}

#[tokio::test]
async fn a_member_added_as_owner_can_manage_the_workspace() {
    let app = TestApp::spawn().await;
    let owner = app.register_user().await;
    let co_owner = app.register_user().await;
    let newcomer = app.register_user().await;
    let ws = id(&app.create_workspace(&owner).await);

    add_owner(&app, &owner, &ws, &co_owner).await;

    assert_eq!(roles(&app, &owner, &ws).await[&co_owner.id.to_string()], "owner");
    app.patch(
        &format!("/api/workspaces/{ws}"),
        &co_owner.token,
        json!({ "name": "Shared" }),
    )
    .await
    .assert_status(200);
    app.add_member(&co_owner, &ws, &newcomer).await;
}

#[tokio::test]
async fn add_member_returns_404_user_not_found_for_an_unregistered_email() {
    let app = TestApp::spawn().await;
    let owner = app.register_user().await;
    let ws = id(&app.create_workspace(&owner).await);

    let body = json!({ "email": format!("nobody-{}@example.com", Uuid::new_v4().simple()) });
    let response = app
        .post(&format!("/api/workspaces/{ws}/members"), &owner.token, body)
        .await;

    response.assert_error(404, "user_not_found");
    assert_eq!(roles(&app, &owner, &ws).await.len(), 1);
}

#[tokio::test]
async fn add_member_returns_409_member_exists_for_someone_already_in_the_workspace() {
    let app = TestApp::spawn().await;
    let owner = app.register_user().await;
    let member = app.register_user().await;
    let ws = id(&app.create_workspace(&owner).await);
    app.add_member(&owner, &ws, &member).await;
    let cases = [
        ("the member, added again", json!({ "email": member.email })),
        (
            "the member, added again as owner",
            json!({ "email": member.email, "role": "owner" }),
        ),
        ("the owner", json!({ "email": owner.email })),
    ];

    for (reason, body) in cases {
        let response = app
            .post(&format!("/api/workspaces/{ws}/members"), &owner.token, body)
            .await;
        assert_eq!(response.status, 409, "{reason}: {}", response.text);
        response.assert_error(409, "member_exists");
    }
    let roles = roles(&app, &owner, &ws).await;
    let expected = [(owner.id.to_string(), "owner"), (member.id.to_string(), "member")];
    assert_eq!(
        roles,
        expected.map(|(id, role)| (id, role.to_owned())).into_iter().collect()
    );
}

#[tokio::test]
async fn removing_the_last_owner_returns_409_last_owner() {
    let app = TestApp::spawn().await;
    let owner = app.register_user().await;
    let member = app.register_user().await;
    let ws = id(&app.create_workspace(&owner).await);
    app.add_member(&owner, &ws, &member).await;
    let before = roles(&app, &owner, &ws).await;

    remove_member(&app, &owner, &ws, &owner)
        .await
        .assert_error(409, "last_owner");

    assert_eq!(roles(&app, &owner, &ws).await, before);
}

#[tokio::test]
async fn an_owner_can_leave_when_another_owner_remains() {
    let app = TestApp::spawn().await;
    let owner = app.register_user().await;
    let co_owner = app.register_user().await;
    let ws = id(&app.create_workspace(&owner).await);
    add_owner(&app, &owner, &ws, &co_owner).await;

    remove_member(&app, &owner, &ws, &owner).await.assert_status(204);

    let roles = roles(&app, &co_owner, &ws).await;
    assert_eq!(roles, BTreeMap::from([(co_owner.id.to_string(), "owner".to_owned())]));
    app.get(&format!("/api/workspaces/{ws}"), &owner.token)
        .await
        .assert_error(404, "workspace_not_found");
}

#[tokio::test]
async fn two_owners_removing_each_other_at_once_leave_exactly_one_owner() {
    let app = TestApp::spawn().await;
    // Several rounds: the two requests only sometimes reach the database at the same moment.
    for round in 0..10 {
        let first = app.register_user().await;
        let second = app.register_user().await;
        let ws = id(&app.create_workspace(&first).await);
        add_owner(&app, &first, &ws, &second).await;

        let (a, b) = tokio::join!(
            remove_member(&app, &first, &ws, &second),
            remove_member(&app, &second, &ws, &first)
        );

        let mut statuses = [a.status.as_u16(), b.status.as_u16()];
        statuses.sort_unstable();
        // 409 when both got past the owner check; 404 when one was already gone by then.
        assert!(
            statuses == [204, 404] || statuses == [204, 409],
            "round {round}: {statuses:?}: {} / {}",
            a.text,
            b.text
        );
        let survivor = if a.status == 204 { &first } else { &second };
        let roles = roles(&app, survivor, &ws).await;
        assert_eq!(
            roles,
            BTreeMap::from([(survivor.id.to_string(), "owner".to_owned())]),
            "round {round}"
        );
    }
}

#[tokio::test]
async fn removing_a_member_unassigns_their_tasks_in_that_workspace_only() {
    let app = TestApp::spawn().await;
    let (owner, workspace, project) = app.user_with_project().await;
    let member = app.register_user().await;
    let ws = id(&workspace);
    app.add_member(&owner, &ws, &member).await;
    let other = app.create_workspace(&owner).await;
    let other_project = app.create_project(&owner, &id(&other)).await;
    app.add_member(&owner, &id(&other), &member).await;
    let theirs = app
        .create_task(
            &owner,
            &id(&project),
            json!({ "title": "theirs", "assigneeId": member.id }),
        )
        .await;
    let owners = app
        .create_task(
            &owner,
            &id(&project),
            json!({ "title": "owner's", "assigneeId": owner.id }),
        )
        .await;
    let elsewhere = app
        .create_task(
            &owner,
            &id(&other_project),
            json!({ "title": "elsewhere", "assigneeId": member.id }),
        )
        .await;

    remove_member(&app, &owner, &ws, &member).await.assert_status(204);

    let assignee = |task: TestResponse| task.body["assigneeId"].clone();
    let task = |t: &Value| format!("/api/tasks/{}", id(t));
    assert_eq!(assignee(app.get(&task(&theirs), &owner.token).await), Value::Null);
    assert_eq!(
        assignee(app.get(&task(&owners), &owner.token).await),
        owner.id.to_string()
    );
    assert_eq!(
        assignee(app.get(&task(&elsewhere), &owner.token).await),
        member.id.to_string()
    );
    assert!(!roles(&app, &owner, &ws).await.contains_key(&member.id.to_string()));
    app.get(&format!("/api/workspaces/{ws}"), &member.token)
        .await
        .assert_error(404, "workspace_not_found");
}

#[tokio::test]
async fn removing_someone_who_is_not_a_member_returns_404_member_not_found() {
    let app = TestApp::spawn().await;
    let owner = app.register_user().await;
    let stranger = app.register_user().await;
    let ws = id(&app.create_workspace(&owner).await);

    remove_member(&app, &owner, &ws, &stranger)
        .await
        .assert_error(404, "member_not_found");
}

#[tokio::test]
async fn a_non_member_gets_the_same_404_as_for_a_workspace_that_does_not_exist() {
    let app = TestApp::spawn().await;
    let owner = app.register_user().await;
    let outsider = app.register_user().await;
    let workspace = app.create_workspace(&owner).await;
    let missing = Uuid::new_v4().to_string();
    let routes: [(&str, Method, &str, Option<Value>); 6] = [
        ("get it", Method::GET, "", None),
        ("rename it", Method::PATCH, "", Some(json!({ "name": "Mine now" }))),
        ("delete it", Method::DELETE, "", None),
        ("list its members", Method::GET, "/members", None),
        (
            "add themselves",
            Method::POST,
            "/members",
            Some(json!({ "email": outsider.email })),
        ),
        (
            "remove the owner",
            Method::DELETE,
            &format!("/members/{}", owner.id),
            None,
        ),
    ];

    for (reason, method, suffix, body) in routes {
        let existing = format!("/api/workspaces/{}{suffix}", id(&workspace));
        let hidden = app
            .request(method.clone(), &existing, Some(&outsider.token), body.clone())
            .await;
        let absent = app
            .request(
                method,
                &format!("/api/workspaces/{missing}{suffix}"),
                Some(&outsider.token),
                body,
            )
            .await;
        assert_eq!(hidden.status, 404, "{reason}: {}", hidden.text);
        hidden.assert_error(404, "workspace_not_found");
        assert_eq!(
            hidden.text, absent.text,
            "{reason}: the answer tells an existing workspace apart"
        );
    }
    assert_eq!(
        app.get(&format!("/api/workspaces/{}", id(&workspace)), &owner.token)
            .await
            .body,
        workspace
    );
    assert_eq!(roles(&app, &owner, &id(&workspace)).await.len(), 1);
}
