use async_trait::async_trait;
use chrono::Utc;
use shaku::{Component, Interface};
use std::sync::Arc;
use uuid::Uuid;

use super::dto::{CreateTaskRequest, TaskQuery, UpdateTaskRequest};
use super::model::{Task, TaskPriority, TaskStatus};
use super::repository::{TaskListFilter, TaskRepository};
use crate::error::{AppError, AppResult};
use crate::infra::cache::{json, CacheService, Cached};
use crate::infra::database::Database;
use crate::infra::events::EventBus;
use crate::infra::jobs::JobQueue;
use crate::infra::redis::keys::CacheKey;
use crate::modules::events::model::WorkspaceEvent;
use crate::modules::metrics::jobs::rebuild_soon;
use crate::modules::paging::Page;
use crate::modules::projects::service::ProjectService;
use crate::modules::workspaces::model::InWorkspace;
use crate::modules::workspaces::service::WorkspaceService;
use crate::modules::{from_json_bytes, to_json_bytes};

#[async_trait]
pub trait TaskService: Interface {
    async fn create(&self, user_id: Uuid, project_id: Uuid, request: CreateTaskRequest) -> AppResult<Task>;
    /// One page of a project's tasks, as cached JSON.
    async fn list(&self, user_id: Uuid, project_id: Uuid, query: TaskQuery) -> AppResult<Cached>;
    /// One page of the tasks assigned to the user, as cached JSON.
    async fn list_assigned(&self, user_id: Uuid, query: TaskQuery) -> AppResult<Cached>;
    async fn get(&self, user_id: Uuid, id: Uuid) -> AppResult<Cached>;
    async fn update(&self, user_id: Uuid, id: Uuid, request: UpdateTaskRequest) -> AppResult<Task>;
    async fn delete(&self, user_id: Uuid, id: Uuid) -> AppResult<()>;
}

#[derive(Component)]
#[shaku(interface = TaskService)]
pub struct Tasks {
    #[shaku(inject)]
    tasks: Arc<dyn TaskRepository>,
    #[shaku(inject)]
    projects: Arc<dyn ProjectService>,
    #[shaku(inject)]
    workspaces: Arc<dyn WorkspaceService>,
    #[shaku(inject)]
    cache: Arc<dyn CacheService>,
    /// Writes and their events commit together (`Database::transaction`).
    #[shaku(inject)]
    db: Arc<dyn Database>,
    #[shaku(inject)]
    events: Arc<dyn EventBus>,
    /// Task writes enqueue their workspace's metrics rebuild (coalesced).
    #[shaku(inject)]
    jobs: Arc<dyn JobQueue>,
    /// `METRICS_REBUILD_ON_WRITE=false`. Negative, so that a module built without the parameter
    /// keeps the rebuilds.
    skip_metrics_rebuild: bool,
}

const NOT_FOUND: AppError = AppError::NotFound { entity: "task" };
const PROJECT_NOT_FOUND: AppError = AppError::NotFound { entity: "project" };

/// Canonical form of a list query: equal queries share one cache entry.
fn list_variant(query: &TaskQuery) -> String {
    use std::fmt::Write;
    let paging = query.paging();
    let mut variant = String::with_capacity(96);
    variant.push_str("status=");
    if let Some(status) = query.status {
        let _ = write!(variant, "{status:?}");
    }
    variant.push_str("&assignee=");
    if let Some(assignee) = query.assignee_id {
        let _ = write!(variant, "{assignee}");
    }
    let _ = write!(variant, "&limit={}&offset={}", paging.limit, paging.offset);
    variant
}

impl Tasks {
    /// Enqueues the workspace's coalesced metrics rebuild in the write's transaction (unless
    /// `METRICS_REBUILD_ON_WRITE=false`).
    async fn rebuild_metrics_soon(&self, workspace_id: Uuid) -> AppResult<()> {
        if !self.skip_metrics_rebuild {
            self.jobs.enqueue(rebuild_soon(workspace_id)).await?;
        }
        Ok(())
    }

    /// The task fresh from Postgres (the base of every write), if the user may see it.
    async fn find_for_write(&self, user_id: Uuid, id: Uuid) -> AppResult<Task> {
        let task = self.tasks.find(id).await?.ok_or(NOT_FOUND)?;
        self.workspaces
            .require_member_or(user_id, task.workspace_id, NOT_FOUND)
            .await?;
        Ok(task)
    }

    async fn check_assignee(&self, assignee: Option<Uuid>, workspace_id: Uuid) -> AppResult<()> {
        let Some(assignee) = assignee else { return Ok(()) };
        let not_member = AppError::invalid_field("assigneeId", "must be a member of the workspace");
        self.workspaces
            .require_member_or(assignee, workspace_id, not_member)
            .await?;
        Ok(())
    }

    /// What a change to these task states makes stale: the tasks, their projects' lists, their
    /// assignees' lists and their workspaces' daily metrics.
    fn stale_keys(&self, states: &[&Task]) -> Vec<CacheKey> {
        let keys = self.cache.keys();
        let mut stale: Vec<CacheKey> = Vec::new();
        for task in states {
            stale.extend([
                keys.task(task.id),
                keys.task_lists(task.project_id),
                keys.all_daily_metrics(task.workspace_id),
            ]);
            stale.extend(task.assignee_id.map(|user| keys.assigned_task_lists(user)));
        }
        stale
    }
}

#[async_trait]
impl TaskService for Tasks {
    async fn create(&self, user_id: Uuid, project_id: Uuid, request: CreateTaskRequest) -> AppResult<Task> {
        let workspace_id = self.projects.workspace_of(user_id, project_id).await?;
        self.check_assignee(request.assignee_id, workspace_id).await?;
        let now = Utc::now();
        let task = Task {
            id: Uuid::nil(),
            project_id,
            workspace_id,
            title: request.title.trim().to_owned(),
            description: request.description,
            status: request.status.unwrap_or(TaskStatus::Todo),
            priority: request.priority.unwrap_or(TaskPriority::Medium),
            assignee_id: request.assignee_id,
            due_date: request.due_date,
            completed_at: None,
            created_at: now,
            updated_at: now,
        };
        let stale = self.stale_keys(&[&task]);
        let create = self.db.transaction(async {
            let created = self.tasks.create(&task).await?;
            WorkspaceEvent::TaskCreated(&created).record(&*self.events).await?;
            self.rebuild_metrics_soon(created.workspace_id).await?;
            Ok::<_, AppError>(created)
        });
        Ok(self
            .cache
            .write(stale, create, |created| self.stale_keys(&[created]))
            .await?)
    }

    async fn list(&self, user_id: Uuid, project_id: Uuid, query: TaskQuery) -> AppResult<Cached> {
        let key = self.cache.keys().task_list(project_id, list_variant(&query));
        let filter = TaskListFilter {
            status: query.status,
            assignee_id: query.assignee_id,
        };
        let paging = query.paging();
        if self.cache.is_pass_through() {
            // The project and the membership would come from Postgres too: one statement, not three.
            let load = async {
                let rows = self
                    .tasks
                    .list_in_project_as_member(user_id, project_id, filter, paging);
                to_json_bytes(&Page::from_rows(rows.await?.ok_or(PROJECT_NOT_FOUND)?, paging))
            };
            return self.cache.get_or_load(key, Box::pin(load), json::<Page<Task>>).await;
        }
        // The project, the membership in its workspace (when known) and the page do not depend on
        // each other: one L2 round trip for all three.
        let ahead = || {
            let keys = self.cache.keys();
            let mut ahead = vec![
                keys.project(project_id),
                keys.task_list(project_id, list_variant(&query)),
            ];
            if let Some(workspace_id) = self.projects.seen_workspace(project_id) {
                ahead.push(keys.member(workspace_id, user_id));
            }
            ahead
        };
        let list = async {
            self.projects.workspace_of(user_id, project_id).await?;
            let load = async {
                let rows = self.tasks.list_in_project(project_id, filter, paging).await?;
                to_json_bytes(&Page::from_rows(rows, paging))
            };
            self.cache.get_or_load(key, Box::pin(load), json::<Page<Task>>).await
        };
        self.cache.with_prefetched(ahead, list).await
    }

    async fn list_assigned(&self, user_id: Uuid, query: TaskQuery) -> AppResult<Cached> {
        let key = self.cache.keys().assigned_task_list(user_id, list_variant(&query));
        let load = async {
            let rows = self.tasks.list_assigned(user_id, query.status, query.paging()).await?;
            to_json_bytes(&Page::from_rows(rows, query.paging()))
        };
        self.cache.get_or_load(key, Box::pin(load), json::<Page<Task>>).await
    }

    async fn get(&self, user_id: Uuid, id: Uuid) -> AppResult<Cached> {
        let key = self.cache.keys().task(id);
        let load = async { to_json_bytes(&self.tasks.find(id).await?.ok_or(NOT_FOUND)?) };
        let cached = self.cache.get_or_load(key, Box::pin(load), json::<Task>).await?;
        let owner: InWorkspace = from_json_bytes(&cached.bytes)?;
        self.workspaces
            .require_member_or(user_id, owner.workspace_id, NOT_FOUND)
            .await?;
        Ok(cached)
    }

    async fn update(&self, user_id: Uuid, id: Uuid, request: UpdateTaskRequest) -> AppResult<Task> {
        let seen = self.find_for_write(user_id, id).await?;
        if let Some(assignee) = request.assignee_id {
            self.check_assignee(assignee, seen.workspace_id).await?;
        }
        // What may go stale whatever happens: the task as seen, and its new assignee's lists.
        let mut planned = seen.clone();
        planned.assignee_id = request.assignee_id.unwrap_or(seen.assignee_id);
        let mut change = request;
        if let Some(title) = &mut change.title {
            *title = title.trim().to_owned();
        }
        let stale = self.stale_keys(&[&seen, &planned]);
        let as_locked_and_saved = |outcome: &Option<(Task, Task)>| match outcome {
            Some((locked, saved)) => self.stale_keys(&[locked, saved]),
            None => Vec::new(),
        };
        let update = self.db.transaction(async {
            let outcome = self.tasks.update(id, &change).await?;
            if let Some((before, saved)) = &outcome {
                WorkspaceEvent::TaskUpdated(saved).record(&*self.events).await?;
                // Completion moves the daily counts; other fields do not.
                if before.completed_at != saved.completed_at {
                    self.rebuild_metrics_soon(saved.workspace_id).await?;
                }
            }
            Ok::<_, AppError>(outcome)
        });
        let updated = self.cache.write(stale, update, as_locked_and_saved);
        Ok(updated.await?.ok_or(NOT_FOUND)?.1)
    }

    async fn delete(&self, user_id: Uuid, id: Uuid) -> AppResult<()> {
        let task = self.find_for_write(user_id, id).await?;
        let stale = self.stale_keys(&[&task]);
        let delete = self.db.transaction(async {
            let deleted = self.tasks.delete(id).await?;
            if deleted {
                WorkspaceEvent::TaskDeleted(&task).record(&*self.events).await?;
                self.rebuild_metrics_soon(task.workspace_id).await?;
            }
            Ok::<_, AppError>(deleted)
        });
        self.cache.write(stale, delete, |_| Vec::new()).await?;
        Ok(())
    }
}
