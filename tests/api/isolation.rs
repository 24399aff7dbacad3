//! Cross-tenant isolation: a stranger who replays another tenant's ids on every id-taking route
//! gets exactly the 404 a random id gets (so ids leak nothing), and changes nothing.
//!
//! The matrix is `#[rustfmt::skip]`: one row per line reads as a table, one field per line not.

use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{TestApp, TestUser};

/// Tenant A's world: an owner, a second member (so member routes have a real target), and one
/// workspace with a project and a task assigned to the owner.
struct Tenant {
    owner: TestUser,
    member: TestUser,
    workspace: String,
    project: String,
    task: String,
}

impl Tenant {
    async fn create(app: &TestApp) -> Tenant {
        let (owner, workspace, project) = app.user_with_project().await;
        let workspace = workspace["id"].as_str().unwrap().to_owned();
        let project = project["id"].as_str().unwrap().to_owned();
        let member = app.register_user().await;
        let members = format!("/api/workspaces/{workspace}/members");
        app.post(&members, &owner.token, json!({ "email": member.email }))
            .await
            .assert_status(201);
        let assigned = json!({ "title": "Secret plan", "assigneeId": owner.id });
        let task = app.create_task(&owner, &project, assigned).await;
        let task = task["id"].as_str().unwrap().to_owned();
        Tenant {
            owner,
            member,
            workspace,
            project,
            task,
        }
    }

    /// `template` with this tenant's ids in `{ws}`, `{project}`, `{task}` and `{member}`.
    fn fill(&self, template: &str) -> String {
        fill(
            template,
            [&self.workspace, &self.project, &self.task, &self.member.id.to_string()],
        )
    }
}

fn fill(template: &str, [ws, project, task, member]: [&str; 4]) -> String {
    template
        .replace("{ws}", ws)
        .replace("{project}", project)
        .replace("{task}", task)
        .replace("{member}", member)
}

/// The same template with a fresh random uuid in every slot.
fn fill_random(template: &str) -> String {
    let ids: [String; 4] = std::array::from_fn(|_| Uuid::new_v4().to_string());
    fill(template, [&ids[0], &ids[1], &ids[2], &ids[3]])
}

/// One row of the matrix: a route and verb that takes an id, a body valid enough that only the
/// id can make the request fail, and the code a non-member gets.
struct Row {
    method: Method,
    template: &'static str,
    body: Option<Value>,
    code: &'static str,
}

impl Row {
    fn name(&self) -> String {
        format!("{} {}", self.method, self.template)
    }
}

/// Every route and verb that takes an id. With `stranger_email`, "add member" is an attempt to join.
#[rustfmt::skip]
fn matrix(stranger_email: &str) -> Vec<Row> {
    let row = |method, template, body: Option<Value>, code| Row { method, template, body, code };
    let name = || Some(json!({ "name": "Hijacked" }));
    let join = Some(json!({ "email": stranger_email, "role": "owner" }));
    let retitle = Some(json!({ "title": "Hijacked", "status": "done", "assigneeId": null }));
    let metrics = "/api/workspaces/{ws}/metrics/daily?from=2026-01-01&to=2026-12-31";
    vec![
        row(Method::GET,    "/api/workspaces/{ws}",                  None,    "workspace_not_found"),
        row(Method::PATCH,  "/api/workspaces/{ws}",                  name(),  "workspace_not_found"),
        row(Method::DELETE, "/api/workspaces/{ws}",                  None,    "workspace_not_found"),
        row(Method::GET,    "/api/workspaces/{ws}/members",          None,    "workspace_not_found"),
        row(Method::POST,   "/api/workspaces/{ws}/members",          join,    "workspace_not_found"),
        row(Method::DELETE, "/api/workspaces/{ws}/members/{member}", None,    "workspace_not_found"),
        row(Method::GET,    "/api/workspaces/{ws}/projects",         None,    "workspace_not_found"),
        row(Method::POST,   "/api/workspaces/{ws}/projects",         name(),  "workspace_not_found"),
        row(Method::GET,    metrics,                                 None,    "workspace_not_found"),
        row(Method::GET,    "/api/projects/{project}",               None,    "project_not_found"),
        row(Method::PATCH,  "/api/projects/{project}",               name(),  "project_not_found"),
        row(Method::DELETE, "/api/projects/{project}",               None,    "project_not_found"),
        row(Method::GET,    "/api/projects/{project}/tasks",         None,    "project_not_found"),
        row(Method::POST,   "/api/projects/{project}/tasks",         Some(json!({ "title": "Planted" })), "project_not_found"),
        row(Method::GET,    "/api/tasks/{task}",                     None,    "task_not_found"),
        row(Method::PATCH,  "/api/tasks/{task}",                     retitle, "task_not_found"),
        row(Method::DELETE, "/api/tasks/{task}",                     None,    "task_not_found"),
    ]
}

#[tokio::test]
async fn a_stranger_replaying_another_tenants_ids_gets_the_random_id_404_and_changes_nothing() {
    let app = TestApp::spawn().await;
    let tenant = Tenant::create(&app).await;
    let stranger = app.register_user().await;
    // The stranger owns a workspace too: being an owner somewhere must open no door elsewhere.
    app.create_workspace(&stranger).await;

    let before = app.fingerprint().await;
    for row in matrix(&stranger.email) {
        let name = row.name();
        let token = Some(stranger.token.as_str());
        let replayed = app
            .request(row.method.clone(), &tenant.fill(row.template), token, row.body.clone())
            .await;
        let random = app
            .request(row.method.clone(), &fill_random(row.template), token, row.body.clone())
            .await;

        assert_eq!(
            replayed.status.as_u16(),
            404,
            "{name} with the other tenant's ids: {}",
            replayed.text
        );
        assert_eq!(
            replayed.body["statusCode"], 404,
            "{name}: envelope statusCode: {}",
            replayed.text
        );
        assert_eq!(
            replayed.body["code"], row.code,
            "{name}: envelope code: {}",
            replayed.text
        );
        assert!(
            replayed.body["message"].is_string(),
            "{name}: envelope message: {}",
            replayed.text
        );
        assert_eq!(
            replayed.status, random.status,
            "{name}: status for a foreign id vs a random id"
        );
        assert_eq!(
            replayed.body, random.body,
            "{name}: body for a foreign id vs a random id"
        );
    }
    assert_eq!(
        before,
        app.fingerprint().await,
        "the stranger's requests changed the database"
    );
}

/// The control for the matrix: its templates name real ids, so the owner gets 200 where the
/// stranger gets 404 (a typo in a template would otherwise pass as "isolated").
#[tokio::test]
async fn the_owner_reads_every_route_the_stranger_is_refused() {
    let app = TestApp::spawn().await;
    let tenant = Tenant::create(&app).await;
    for row in matrix("unused@example.com")
        .into_iter()
        .filter(|row| row.method == Method::GET)
    {
        let response = app.get(&tenant.fill(row.template), &tenant.owner.token).await;
        assert_eq!(
            response.status.as_u16(),
            200,
            "{} as the owner: {}",
            row.name(),
            response.text
        );
    }
}

#[tokio::test]
async fn a_strangers_lists_do_not_show_another_tenants_workspaces_or_tasks() {
    let app = TestApp::spawn().await;
    let tenant = Tenant::create(&app).await;
    let stranger = app.register_user().await;
    let own = app.create_workspace(&stranger).await;

    let workspaces = app.get("/api/workspaces", &stranger.token).await;
    workspaces.assert_status(200);
    let ids: Vec<&Value> = workspaces
        .body
        .as_array()
        .expect("a list")
        .iter()
        .map(|w| &w["id"])
        .collect();
    assert_eq!(ids, [&own["id"]], "the stranger sees exactly their own workspace");

    let tasks = app.get("/api/users/me/tasks", &stranger.token).await;
    tasks.assert_status(200);
    assert_eq!(
        tasks.body["items"],
        json!([]),
        "the stranger has no tasks: {}",
        tasks.text
    );

    // The control: for the owner the same lists do show them.
    let owners = app.get("/api/workspaces", &tenant.owner.token).await;
    let listed = owners
        .body
        .as_array()
        .unwrap()
        .iter()
        .any(|w| w["id"] == tenant.workspace.as_str());
    assert!(listed, "the owner's workspace list: {}", owners.text);
    let owners_tasks = app.get("/api/users/me/tasks", &tenant.owner.token).await;
    let listed = owners_tasks.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["id"] == tenant.task.as_str());
    assert!(listed, "the owner's task list: {}", owners_tasks.text);
}
