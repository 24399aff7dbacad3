use async_trait::async_trait;
use shaku::{Component, Interface};
use std::sync::Arc;
use uuid::Uuid;

use super::dto::{AddMemberRequest, CreateWorkspaceRequest, UpdateWorkspaceRequest};
use super::model::{Member, Role, Workspace};
use super::repository::{RemoveOutcome, WorkspaceRepository, MEMBER_UNIQUE};
use crate::error::{is_unique_violation, AppError, AppResult};
use crate::modules::users::repository::UserRepository;

#[async_trait]
pub trait WorkspaceService: Interface {
    /// The caller's role in the workspace; 404 `workspace_not_found` when they are not a member,
    /// exactly as when the workspace does not exist.
    async fn require_member(&self, user_id: Uuid, workspace_id: Uuid) -> AppResult<Role>;
    async fn create(&self, user_id: Uuid, request: CreateWorkspaceRequest) -> AppResult<Workspace>;
    async fn list(&self, user_id: Uuid) -> AppResult<Vec<Workspace>>;
    async fn get(&self, user_id: Uuid, id: Uuid) -> AppResult<Workspace>;
    async fn update(
        &self,
        user_id: Uuid,
        id: Uuid,
        request: UpdateWorkspaceRequest,
    ) -> AppResult<Workspace>;
    async fn delete(&self, user_id: Uuid, id: Uuid) -> AppResult<()>;
    async fn members(&self, user_id: Uuid, id: Uuid) -> AppResult<Vec<Member>>;
    async fn add_member(
        &self,
        user_id: Uuid,
        id: Uuid,
        request: AddMemberRequest,
    ) -> AppResult<Member>;
    async fn remove_member(&self, user_id: Uuid, id: Uuid, member_id: Uuid) -> AppResult<()>;
}

#[derive(Component)]
#[shaku(interface = WorkspaceService)]
pub struct Workspaces {
    #[shaku(inject)]
    workspaces: Arc<dyn WorkspaceRepository>,
    #[shaku(inject)]
    users: Arc<dyn UserRepository>,
}

const NOT_FOUND: AppError = AppError::NotFound {
    entity: "workspace",
};
const OWNERS_ONLY: AppError = AppError::Forbidden("only workspace owners can do this");

impl Workspaces {
    async fn require_owner(&self, user_id: Uuid, workspace_id: Uuid) -> AppResult<()> {
        match self.require_member(user_id, workspace_id).await? {
            Role::Owner => Ok(()),
            Role::Member => Err(OWNERS_ONLY),
        }
    }
}

#[async_trait]
impl WorkspaceService for Workspaces {
    async fn require_member(&self, user_id: Uuid, workspace_id: Uuid) -> AppResult<Role> {
        self.workspaces
            .role_of(workspace_id, user_id)
            .await?
            .ok_or(NOT_FOUND)
    }

    async fn create(&self, user_id: Uuid, request: CreateWorkspaceRequest) -> AppResult<Workspace> {
        Ok(self.workspaces.create(request.name.trim(), user_id).await?)
    }

    async fn list(&self, user_id: Uuid) -> AppResult<Vec<Workspace>> {
        Ok(self.workspaces.list_for_user(user_id).await?)
    }

    async fn get(&self, user_id: Uuid, id: Uuid) -> AppResult<Workspace> {
        self.require_member(user_id, id).await?;
        self.workspaces.find(id).await?.ok_or(NOT_FOUND)
    }

    async fn update(
        &self,
        user_id: Uuid,
        id: Uuid,
        request: UpdateWorkspaceRequest,
    ) -> AppResult<Workspace> {
        self.require_owner(user_id, id).await?;
        self.workspaces
            .rename(id, request.name.trim())
            .await?
            .ok_or(NOT_FOUND)
    }

    async fn delete(&self, user_id: Uuid, id: Uuid) -> AppResult<()> {
        self.require_owner(user_id, id).await?;
        self.workspaces.delete(id).await?;
        Ok(())
    }

    async fn members(&self, user_id: Uuid, id: Uuid) -> AppResult<Vec<Member>> {
        self.require_member(user_id, id).await?;
        Ok(self.workspaces.members(id).await?)
    }

    async fn add_member(
        &self,
        user_id: Uuid,
        id: Uuid,
        request: AddMemberRequest,
    ) -> AppResult<Member> {
        self.require_owner(user_id, id).await?;
        let user = self
            .users
            .find_by_email(request.email.trim())
            .await?
            .ok_or(AppError::not_found("user"))?;
        let role = request.role.unwrap_or(Role::Member);
        self.workspaces
            .add_member(id, user.id, role)
            .await
            .map_err(|err| {
                if is_unique_violation(&err, MEMBER_UNIQUE) {
                    AppError::conflict("member_exists", "this user is already a member")
                } else {
                    err.into()
                }
            })
    }

    async fn remove_member(&self, user_id: Uuid, id: Uuid, member_id: Uuid) -> AppResult<()> {
        self.require_owner(user_id, id).await?;
        match self.workspaces.remove_member(id, member_id).await? {
            RemoveOutcome::Removed => Ok(()),
            RemoveOutcome::NotAMember => Err(AppError::not_found("member")),
            RemoveOutcome::LastOwner => Err(AppError::conflict(
                "last_owner",
                "a workspace needs at least one owner",
            )),
        }
    }
}
