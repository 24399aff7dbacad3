//! A write whose commit lands but whose answer is an error (the database deadline hit while the
//! COMMIT was on the wire) must still invalidate what it changed: the client got 503, the data
//! changed anyway. Postgres cannot be made to fail exactly after a commit on cue, so a component
//! override wraps the real repository: it performs the write, then returns the timeout error
//! that `Database::run` gives (a fake for a fault a real server cannot produce on demand).
//!
//! Each test warms this instance's cache with a read, does the write through the failing
//! repository (503), and reads again: the read must see the committed write.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use nestling::modules::auth::model::StoredSession;
use nestling::modules::auth::repository::TokenRepository;
use nestling::modules::projects::model::Project;
use nestling::modules::projects::repository::ProjectRepository;
use nestling::modules::workspaces::model::{Member, Role, Workspace};
use nestling::modules::workspaces::repository::{RemoveOutcome, WorkspaceRepository};
use serde_json::json;
use uuid::Uuid;

use crate::helpers::TestApp;

/// What `Database::run` returns when the deadline passes.
fn deadline_passed() -> sqlx::Error {
    sqlx::Error::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, "deadline (test)"))
}

/// Runs the write for real and commits it (on its own, outside the service's transaction: the
/// fault is a COMMIT that landed), then reports the timeout.
async fn committed_then_timed_out<T>(
    write: impl std::future::Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, sqlx::Error> {
    nestling::infra::database::transaction::outside(write).await?;
    Err(deadline_passed())
}

struct WorkspacesCommitThenTimeOut(Arc<dyn WorkspaceRepository>);

#[async_trait]
impl WorkspaceRepository for WorkspacesCommitThenTimeOut {
    async fn create(&self, name: &str, owner: Uuid) -> Result<Workspace, sqlx::Error> {
        committed_then_timed_out(self.0.create(name, owner)).await
    }
    async fn list_for_user(&self, user_id: Uuid) -> Result<Vec<Workspace>, sqlx::Error> {
        self.0.list_for_user(user_id).await
    }
    async fn find(&self, id: Uuid) -> Result<Option<Workspace>, sqlx::Error> {
        self.0.find(id).await
    }
    async fn rename(&self, id: Uuid, name: &str) -> Result<Option<Workspace>, sqlx::Error> {
        committed_then_timed_out(self.0.rename(id, name)).await
    }
    async fn delete(&self, id: Uuid) -> Result<bool, sqlx::Error> {
        committed_then_timed_out(self.0.delete(id)).await
    }
    async fn role_of(&self, workspace_id: Uuid, user_id: Uuid) -> Result<Option<Role>, sqlx::Error> {
        self.0.role_of(workspace_id, user_id).await
    }
    async fn members(&self, workspace_id: Uuid) -> Result<Vec<Member>, sqlx::Error> {
        self.0.members(workspace_id).await
    }
    async fn assigned_tasks(&self, workspace_id: Uuid, user_id: Uuid) -> Result<Vec<(Uuid, Uuid)>, sqlx::Error> {
        self.0.assigned_tasks(workspace_id, user_id).await
    }
    async fn add_member(&self, workspace_id: Uuid, user_id: Uuid, role: Role) -> Result<Member, sqlx::Error> {
        committed_then_timed_out(self.0.add_member(workspace_id, user_id, role)).await
    }
    async fn remove_member(&self, workspace_id: Uuid, user_id: Uuid) -> Result<RemoveOutcome, sqlx::Error> {
        committed_then_timed_out(self.0.remove_member(workspace_id, user_id)).await
    }
}

struct ProjectsCommitThenTimeOut(Arc<dyn ProjectRepository>);

#[async_trait]
impl ProjectRepository for ProjectsCommitThenTimeOut {
    async fn create(&self, workspace_id: Uuid, name: &str, description: Option<&str>) -> Result<Project, sqlx::Error> {
        committed_then_timed_out(self.0.create(workspace_id, name, description)).await
    }
    async fn list(&self, workspace_id: Uuid) -> Result<Vec<Project>, sqlx::Error> {
        self.0.list(workspace_id).await
    }
    async fn find(&self, id: Uuid) -> Result<Option<Project>, sqlx::Error> {
        self.0.find(id).await
    }
    async fn save(&self, project: &Project) -> Result<Option<Project>, sqlx::Error> {
        committed_then_timed_out(self.0.save(project)).await
    }
    async fn delete(&self, id: Uuid) -> Result<Option<Vec<(Uuid, Option<Uuid>)>>, sqlx::Error> {
        committed_then_timed_out(self.0.delete(id)).await
    }
}

struct TokensCommitThenTimeOut(Arc<dyn TokenRepository>);

#[async_trait]
impl TokenRepository for TokensCommitThenTimeOut {
    async fn insert(&self, token_hash: &[u8], user_id: Uuid, expires_at: DateTime<Utc>) -> Result<(), sqlx::Error> {
        self.0.insert(token_hash, user_id, expires_at).await
    }
    async fn find_user(&self, token_hash: &[u8]) -> Result<Option<(Uuid, DateTime<Utc>)>, sqlx::Error> {
        self.0.find_user(token_hash).await
    }
    async fn delete(&self, token_hash: &[u8]) -> Result<(), sqlx::Error> {
        committed_then_timed_out(self.0.delete(token_hash)).await
    }
    async fn sessions(&self, user_id: Uuid) -> Result<Vec<StoredSession>, sqlx::Error> {
        self.0.sessions(user_id).await
    }
    async fn session_hash(&self, user_id: Uuid, id: Uuid) -> Result<Option<Vec<u8>>, sqlx::Error> {
        self.0.session_hash(user_id, id).await
    }
    async fn hashes(&self, user_id: Uuid) -> Result<Vec<Vec<u8>>, sqlx::Error> {
        self.0.hashes(user_id).await
    }
    async fn delete_session(&self, user_id: Uuid, id: Uuid) -> Result<Option<Vec<u8>>, sqlx::Error> {
        committed_then_timed_out(self.0.delete_session(user_id, id)).await
    }
    async fn delete_all(&self, user_id: Uuid, except: Option<&[u8]>) -> Result<Vec<Vec<u8>>, sqlx::Error> {
        committed_then_timed_out(self.0.delete_all(user_id, except)).await
    }
    async fn touch(
        &self,
        hashes: &[Vec<u8>],
        extend: Option<(DateTime<Utc>, DateTime<Utc>)>,
    ) -> Result<Vec<Vec<u8>>, sqlx::Error> {
        self.0.touch(hashes, extend).await
    }
}

/// A second instance of `app` whose repositories commit every write and then time out.
async fn commit_then_time_out(app: &TestApp) -> TestApp {
    let workspaces = WorkspacesCommitThenTimeOut(app.real_component());
    let projects = ProjectsCommitThenTimeOut(app.real_component());
    let tokens = TokensCommitThenTimeOut(app.real_component());
    TestApp::builder()
        .sibling_of(app)
        .module(move |module| {
            module
                .with_component_override::<dyn WorkspaceRepository>(Box::new(workspaces))
                .with_component_override::<dyn ProjectRepository>(Box::new(projects))
                .with_component_override::<dyn TokenRepository>(Box::new(tokens))
        })
        .spawn()
        .await
}

#[tokio::test]
async fn a_member_removed_by_a_write_that_timed_out_after_its_commit_loses_access_at_once() {
    let app = TestApp::spawn().await;
    let owner = app.register_user().await;
    let member = app.register_user().await;
    let workspace = app.create_workspace(&owner).await;
    let workspace_id = workspace["id"].as_str().unwrap();
    app.add_member(&owner, workspace_id, &member).await;
    let project = app.create_project(&owner, workspace_id).await;
    let task = app
        .create_task(
            &owner,
            project["id"].as_str().unwrap(),
            json!({ "title": "t", "assigneeId": member.id }),
        )
        .await;
    let failing = commit_then_time_out(&app).await;
    let task_path = format!("/api/tasks/{}", task["id"].as_str().unwrap());
    failing
        .get(&format!("/api/workspaces/{workspace_id}"), &member.token)
        .await
        .assert_status(200);
    failing.get(&task_path, &owner.token).await.assert_status(200);

    failing
        .delete(
            &format!("/api/workspaces/{workspace_id}/members/{}", member.id),
            &owner.token,
        )
        .await
        .assert_error(503, "database_unavailable");

    failing
        .get(&format!("/api/workspaces/{workspace_id}"), &member.token)
        .await
        .assert_error(404, "workspace_not_found");
    let unassigned = failing.get(&task_path, &owner.token).await;
    assert_eq!(unassigned.body["assigneeId"], json!(null), "{}", unassigned.text);
}

#[tokio::test]
async fn a_member_added_by_a_write_that_timed_out_after_its_commit_sees_the_workspace() {
    let app = TestApp::spawn().await;
    let owner = app.register_user().await;
    let member = app.register_user().await;
    let workspace = app.create_workspace(&owner).await;
    let workspace_id = workspace["id"].as_str().unwrap();
    let failing = commit_then_time_out(&app).await;
    let before = failing.get("/api/workspaces", &member.token).await;
    assert_eq!(before.body.as_array().map(Vec::len), Some(0), "{}", before.text);

    failing
        .post(
            &format!("/api/workspaces/{workspace_id}/members"),
            &owner.token,
            json!({ "email": member.email }),
        )
        .await
        .assert_error(503, "database_unavailable");

    let after = failing.get("/api/workspaces", &member.token).await;
    assert_eq!(after.body[0]["id"], json!(workspace_id), "{}", after.text);
}

#[tokio::test]
async fn a_token_logged_out_by_a_write_that_timed_out_after_its_commit_stops_working() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;
    let failing = commit_then_time_out(&app).await;
    failing.get("/api/users/me", &user.token).await.assert_status(200);

    failing
        .request(reqwest::Method::POST, "/api/auth/logout", Some(&user.token), None)
        .await
        .assert_error(503, "database_unavailable");

    failing
        .get("/api/users/me", &user.token)
        .await
        .assert_error(401, "invalid_token");
}

#[tokio::test]
async fn sessions_ended_by_writes_that_timed_out_after_their_commit_stop_working() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;
    let (second, third) = (
        app.login(&user.email, &user.password).await,
        app.login(&user.email, &user.password).await,
    );
    let failing = commit_then_time_out(&app).await;
    for token in [&user.token, &second, &third] {
        failing.get("/api/users/me", token).await.assert_status(200);
    }
    let sessions = failing.get("/api/auth/sessions", &user.token).await;
    let other = sessions.body.as_array().unwrap().iter().find(|s| s["current"] == false);
    let other = other.unwrap()["id"].as_str().unwrap().to_owned();

    failing
        .delete(&format!("/api/auth/sessions/{other}"), &user.token)
        .await
        .assert_error(503, "database_unavailable");
    failing
        .delete("/api/auth/sessions", &user.token)
        .await
        .assert_error(503, "database_unavailable");

    for token in [&second, &third] {
        failing
            .get("/api/users/me", token)
            .await
            .assert_error(401, "invalid_token");
    }
    failing.get("/api/users/me", &user.token).await.assert_status(200);
}

#[tokio::test]
async fn workspaces_and_projects_created_by_writes_that_timed_out_after_their_commit_are_listed() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;
    let workspace = app.create_workspace(&user).await;
    let workspace_id = workspace["id"].as_str().unwrap();
    let failing = commit_then_time_out(&app).await;
    let projects_path = format!("/api/workspaces/{workspace_id}/projects");
    failing.get("/api/workspaces", &user.token).await.assert_status(200);
    failing.get(&projects_path, &user.token).await.assert_status(200);

    failing
        .post("/api/workspaces", &user.token, json!({ "name": "second" }))
        .await
        .assert_error(503, "database_unavailable");
    failing
        .post(&projects_path, &user.token, json!({ "name": "second" }))
        .await
        .assert_error(503, "database_unavailable");

    let workspaces = failing.get("/api/workspaces", &user.token).await;
    assert_eq!(workspaces.body.as_array().map(Vec::len), Some(2), "{}", workspaces.text);
    let projects = failing.get(&projects_path, &user.token).await;
    assert_eq!(projects.body.as_array().map(Vec::len), Some(1), "{}", projects.text);
}
