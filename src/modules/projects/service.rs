use async_trait::async_trait;
use shaku::{Component, Interface};
use std::sync::Arc;
use uuid::Uuid;

use super::dto::{CreateProjectRequest, UpdateProjectRequest};
use super::model::Project;
use super::repository::ProjectRepository;
use crate::error::{AppError, AppResult};
use crate::modules::workspaces::service::WorkspaceService;

#[async_trait]
pub trait ProjectService: Interface {
    /// The project, if the user is a member of its workspace; 404 `project_not_found` otherwise.
    async fn get(&self, user_id: Uuid, id: Uuid) -> AppResult<Project>;
    async fn create(
        &self,
        user_id: Uuid,
        workspace_id: Uuid,
        request: CreateProjectRequest,
    ) -> AppResult<Project>;
    async fn list(&self, user_id: Uuid, workspace_id: Uuid) -> AppResult<Vec<Project>>;
    async fn update(
        &self,
        user_id: Uuid,
        id: Uuid,
        request: UpdateProjectRequest,
    ) -> AppResult<Project>;
    async fn delete(&self, user_id: Uuid, id: Uuid) -> AppResult<()>;
}

#[derive(Component)]
#[shaku(interface = ProjectService)]
pub struct Projects {
    #[shaku(inject)]
    projects: Arc<dyn ProjectRepository>,
    #[shaku(inject)]
    workspaces: Arc<dyn WorkspaceService>,
}

const NOT_FOUND: AppError = AppError::NotFound { entity: "project" };

#[async_trait]
impl ProjectService for Projects {
    async fn get(&self, user_id: Uuid, id: Uuid) -> AppResult<Project> {
        let project = self.projects.find(id).await?.ok_or(NOT_FOUND)?;
        match self
            .workspaces
            .require_member(user_id, project.workspace_id)
            .await
        {
            Ok(_) => Ok(project),
            Err(AppError::NotFound { .. }) => Err(NOT_FOUND),
            Err(other) => Err(other),
        }
    }

    async fn create(
        &self,
        user_id: Uuid,
        workspace_id: Uuid,
        request: CreateProjectRequest,
    ) -> AppResult<Project> {
        self.workspaces
            .require_member(user_id, workspace_id)
            .await?;
        Ok(self
            .projects
            .create(
                workspace_id,
                request.name.trim(),
                request.description.as_deref(),
            )
            .await?)
    }

    async fn list(&self, user_id: Uuid, workspace_id: Uuid) -> AppResult<Vec<Project>> {
        self.workspaces
            .require_member(user_id, workspace_id)
            .await?;
        Ok(self.projects.list(workspace_id).await?)
    }

    async fn update(
        &self,
        user_id: Uuid,
        id: Uuid,
        request: UpdateProjectRequest,
    ) -> AppResult<Project> {
        let mut project = self.get(user_id, id).await?;
        if let Some(name) = request.name {
            project.name = name.trim().to_owned();
        }
        if let Some(description) = request.description {
            project.description = description;
        }
        self.projects.save(&project).await?.ok_or(NOT_FOUND)
    }

    async fn delete(&self, user_id: Uuid, id: Uuid) -> AppResult<()> {
        self.get(user_id, id).await?;
        self.projects.delete(id).await?;
        Ok(())
    }
}
