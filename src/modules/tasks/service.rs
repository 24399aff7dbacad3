use async_trait::async_trait;
use chrono::Utc;
use shaku::{Component, Interface};
use std::sync::Arc;
use uuid::Uuid;

use super::dto::{CreateTaskRequest, TaskQuery, UpdateTaskRequest};
use super::model::{Task, TaskPriority, TaskStatus};
use super::repository::{TaskListFilter, TaskRepository};
use crate::error::{AppError, AppResult};
use crate::modules::paging::Page;
use crate::modules::projects::service::ProjectService;
use crate::modules::workspaces::service::WorkspaceService;

#[async_trait]
pub trait TaskService: Interface {
    async fn create(
        &self,
        user_id: Uuid,
        project_id: Uuid,
        request: CreateTaskRequest,
    ) -> AppResult<Task>;
    async fn list(
        &self,
        user_id: Uuid,
        project_id: Uuid,
        query: TaskQuery,
    ) -> AppResult<Page<Task>>;
    async fn list_assigned(&self, user_id: Uuid, query: TaskQuery) -> AppResult<Page<Task>>;
    async fn get(&self, user_id: Uuid, id: Uuid) -> AppResult<Task>;
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
}

const NOT_FOUND: AppError = AppError::NotFound { entity: "task" };

impl Tasks {
    async fn check_assignee(&self, assignee: Option<Uuid>, workspace_id: Uuid) -> AppResult<()> {
        let Some(assignee) = assignee else {
            return Ok(());
        };
        match self.workspaces.require_member(assignee, workspace_id).await {
            Ok(_) => Ok(()),
            Err(AppError::NotFound { .. }) => Err(AppError::invalid_field(
                "assigneeId",
                "must be a member of the workspace",
            )),
            Err(other) => Err(other),
        }
    }
}

/// `completedAt` follows the status: stamped when a task becomes done, cleared when it leaves done.
fn apply_status(task: &mut Task, status: TaskStatus) {
    match (task.status == TaskStatus::Done, status == TaskStatus::Done) {
        (false, true) => task.completed_at = Some(Utc::now()),
        (true, false) => task.completed_at = None,
        _ => {}
    }
    task.status = status;
}

#[async_trait]
impl TaskService for Tasks {
    async fn create(
        &self,
        user_id: Uuid,
        project_id: Uuid,
        request: CreateTaskRequest,
    ) -> AppResult<Task> {
        let project = self.projects.get(user_id, project_id).await?;
        self.check_assignee(request.assignee_id, project.workspace_id)
            .await?;
        let now = Utc::now();
        let mut task = Task {
            id: Uuid::nil(),
            project_id,
            workspace_id: project.workspace_id,
            title: request.title.trim().to_owned(),
            description: request.description,
            status: TaskStatus::Todo,
            priority: request.priority.unwrap_or(TaskPriority::Medium),
            assignee_id: request.assignee_id,
            due_date: request.due_date,
            completed_at: None,
            created_at: now,
            updated_at: now,
        };
        apply_status(&mut task, request.status.unwrap_or(TaskStatus::Todo));
        Ok(self.tasks.create(&task).await?)
    }

    async fn list(
        &self,
        user_id: Uuid,
        project_id: Uuid,
        query: TaskQuery,
    ) -> AppResult<Page<Task>> {
        self.projects.get(user_id, project_id).await?;
        let filter = TaskListFilter {
            status: query.status,
            assignee_id: query.assignee_id,
        };
        let rows = self
            .tasks
            .list_in_project(project_id, filter, query.paging())
            .await?;
        Ok(Page::from_rows(rows, query.paging()))
    }

    async fn list_assigned(&self, user_id: Uuid, query: TaskQuery) -> AppResult<Page<Task>> {
        if query.assignee_id.is_some() {
            return Err(AppError::bad_request(
                "invalid_query",
                "assigneeId is implied by /users/me/tasks",
            ));
        }
        let rows = self
            .tasks
            .list_assigned(user_id, query.status, query.paging())
            .await?;
        Ok(Page::from_rows(rows, query.paging()))
    }

    async fn get(&self, user_id: Uuid, id: Uuid) -> AppResult<Task> {
        let task = self.tasks.find(id).await?.ok_or(NOT_FOUND)?;
        match self
            .workspaces
            .require_member(user_id, task.workspace_id)
            .await
        {
            Ok(_) => Ok(task),
            Err(AppError::NotFound { .. }) => Err(NOT_FOUND),
            Err(other) => Err(other),
        }
    }

    async fn update(&self, user_id: Uuid, id: Uuid, request: UpdateTaskRequest) -> AppResult<Task> {
        let mut task = self.get(user_id, id).await?;
        if let Some(assignee) = request.assignee_id {
            self.check_assignee(assignee, task.workspace_id).await?;
            task.assignee_id = assignee;
        }
        if let Some(title) = request.title {
            task.title = title.trim().to_owned();
        }
        if let Some(description) = request.description {
            task.description = description;
        }
        if let Some(priority) = request.priority {
            task.priority = priority;
        }
        if let Some(due_date) = request.due_date {
            task.due_date = due_date;
        }
        if let Some(status) = request.status {
            apply_status(&mut task, status);
        }
        self.tasks.save(&task).await?.ok_or(NOT_FOUND)
    }

    async fn delete(&self, user_id: Uuid, id: Uuid) -> AppResult<()> {
        self.get(user_id, id).await?;
        self.tasks.delete(id).await?;
        Ok(())
    }
}
