use async_trait::async_trait;
use shaku::{Component, Interface};
use std::sync::Arc;
use uuid::Uuid;

use super::dto::{AddMemberRequest, CreateWorkspaceRequest, UpdateWorkspaceRequest};
use super::model::{Member, Role, Workspace};
use super::repository::{RemoveOutcome, WorkspaceRepository, MEMBER_UNIQUE};
use crate::error::{is_unique_violation, AppError, AppResult};
use crate::infra::cache::{json, CacheService, Cached};
use crate::infra::database::Database;
use crate::infra::events::EventBus;
use crate::infra::redis::keys::CacheKey;
use crate::modules::events::model::WorkspaceEvent;
use crate::modules::users::repository::UserRepository;
use crate::modules::{from_json_bytes, to_json_bytes};

#[async_trait]
pub trait WorkspaceService: Interface {
    /// The caller's role in the workspace; 404 `workspace_not_found` when they are not a member,
    /// exactly as when the workspace does not exist. Cached, so every feature can afford it.
    async fn require_member(&self, user_id: Uuid, workspace_id: Uuid) -> AppResult<Role>;
    /// `require_member`, answering `not_member` instead of `workspace_not_found`: a project or task
    /// the user may not see gets its own 404 (or an assignee check its own 400).
    async fn require_member_or(&self, user_id: Uuid, workspace_id: Uuid, not_member: AppError) -> AppResult<Role>;
    /// `require_member`, and 403 `forbidden` for a member who is not an owner.
    async fn require_owner(&self, user_id: Uuid, workspace_id: Uuid) -> AppResult<()>;
    async fn create(&self, user_id: Uuid, request: CreateWorkspaceRequest) -> AppResult<Workspace>;
    async fn list(&self, user_id: Uuid) -> AppResult<Cached>;
    async fn get(&self, user_id: Uuid, id: Uuid) -> AppResult<Cached>;
    async fn update(&self, user_id: Uuid, id: Uuid, request: UpdateWorkspaceRequest) -> AppResult<Workspace>;
    async fn delete(&self, user_id: Uuid, id: Uuid) -> AppResult<()>;
    async fn members(&self, user_id: Uuid, id: Uuid) -> AppResult<Cached>;
    async fn add_member(&self, user_id: Uuid, id: Uuid, request: AddMemberRequest) -> AppResult<Member>;
    async fn remove_member(&self, user_id: Uuid, id: Uuid, member_id: Uuid) -> AppResult<()>;
}

#[derive(Component)]
#[shaku(interface = WorkspaceService)]
pub struct Workspaces {
    #[shaku(inject)]
    workspaces: Arc<dyn WorkspaceRepository>,
    #[shaku(inject)]
    users: Arc<dyn UserRepository>,
    #[shaku(inject)]
    cache: Arc<dyn CacheService>,
    /// Writes and their events commit together (`Database::transaction`).
    #[shaku(inject)]
    db: Arc<dyn Database>,
    #[shaku(inject)]
    events: Arc<dyn EventBus>,
}

const NOT_FOUND: AppError = AppError::NotFound { entity: "workspace" };
const OWNERS_ONLY: AppError = AppError::Forbidden("only workspace owners can do this");

impl Workspaces {
    /// Keys that change with the workspace itself: it, its member data, its members' lists.
    async fn workspace_keys(&self, id: Uuid) -> AppResult<Vec<CacheKey>> {
        let keys = self.cache.keys();
        let mut stale = vec![keys.workspace(id), keys.members(id)];
        for member in self.workspaces.members(id).await? {
            stale.push(keys.workspace_list(member.user_id));
        }
        Ok(stale)
    }
}

#[async_trait]
impl WorkspaceService for Workspaces {
    async fn require_member(&self, user_id: Uuid, workspace_id: Uuid) -> AppResult<Role> {
        let key = self.cache.keys().member(workspace_id, user_id);
        let load = async {
            let role = self.workspaces.role_of(workspace_id, user_id).await?;
            role.map(|role| to_json_bytes(&role)).transpose()
        };
        let found = self.cache.get_or_load_found(key, Box::pin(load), json::<Role>);
        from_json_bytes(&found.await?.ok_or(NOT_FOUND)?.bytes)
    }

    async fn require_member_or(&self, user_id: Uuid, workspace_id: Uuid, not_member: AppError) -> AppResult<Role> {
        match self.require_member(user_id, workspace_id).await {
            Err(AppError::NotFound { .. }) => Err(not_member),
            other => other,
        }
    }

    async fn require_owner(&self, user_id: Uuid, workspace_id: Uuid) -> AppResult<()> {
        match self.require_member(user_id, workspace_id).await? {
            Role::Owner => Ok(()),
            Role::Member => Err(OWNERS_ONLY),
        }
    }

    async fn create(&self, user_id: Uuid, request: CreateWorkspaceRequest) -> AppResult<Workspace> {
        let stale = vec![self.cache.keys().workspace_list(user_id)];
        let create = self.workspaces.create(request.name.trim(), user_id);
        Ok(self.cache.write(stale, create, |_| Vec::new()).await?)
    }

    async fn list(&self, user_id: Uuid) -> AppResult<Cached> {
        let key = self.cache.keys().workspace_list(user_id);
        let load = async { to_json_bytes(&self.workspaces.list_for_user(user_id).await?) };
        self.cache
            .get_or_load(key, Box::pin(load), json::<Vec<Workspace>>)
            .await
    }

    async fn get(&self, user_id: Uuid, id: Uuid) -> AppResult<Cached> {
        self.require_member(user_id, id).await?;
        let key = self.cache.keys().workspace(id);
        let load = async { to_json_bytes(&self.workspaces.find(id).await?.ok_or(NOT_FOUND)?) };
        self.cache.get_or_load(key, Box::pin(load), json::<Workspace>).await
    }

    async fn update(&self, user_id: Uuid, id: Uuid, request: UpdateWorkspaceRequest) -> AppResult<Workspace> {
        self.require_owner(user_id, id).await?;
        let stale = self.workspace_keys(id).await?;
        let rename = self.db.transaction(async {
            let renamed = self.workspaces.rename(id, request.name.trim()).await?;
            if let Some(renamed) = &renamed {
                WorkspaceEvent::WorkspaceUpdated(renamed).record(&*self.events).await?;
            }
            Ok::<_, sqlx::Error>(renamed)
        });
        self.cache.write(stale, rename, |_| Vec::new()).await?.ok_or(NOT_FOUND)
    }

    async fn delete(&self, user_id: Uuid, id: Uuid) -> AppResult<()> {
        self.require_owner(user_id, id).await?;
        let keys = self.cache.keys();
        let mut stale = self.workspace_keys(id).await?;
        // Members' "my tasks" lists hold this workspace's tasks (assignees are always members).
        for member in self.workspaces.members(id).await? {
            stale.push(keys.assigned_task_lists(member.user_id));
        }
        stale.extend([keys.project_list(id), keys.all_daily_metrics(id)]);
        // Projects and tasks of the workspace stay cached until their TTL, but nobody can reach
        // them: every read of them checks membership, and the memberships are gone.
        let delete = self.db.transaction(async {
            let deleted = self.workspaces.delete(id).await?;
            if deleted {
                WorkspaceEvent::WorkspaceDeleted { workspace_id: id }
                    .record(&*self.events)
                    .await?;
            }
            Ok::<_, sqlx::Error>(deleted)
        });
        self.cache.write(stale, delete, |_| Vec::new()).await?;
        Ok(())
    }

    async fn members(&self, user_id: Uuid, id: Uuid) -> AppResult<Cached> {
        self.require_member(user_id, id).await?;
        let key = self.cache.keys().member_list(id);
        let load = async { to_json_bytes(&self.workspaces.members(id).await?) };
        self.cache.get_or_load(key, Box::pin(load), json::<Vec<Member>>).await
    }

    async fn add_member(&self, user_id: Uuid, id: Uuid, request: AddMemberRequest) -> AppResult<Member> {
        self.require_owner(user_id, id).await?;
        let user = self
            .users
            .find_by_email(request.email.trim())
            .await?
            .ok_or(AppError::not_found("user"))?;
        let role = request.role.unwrap_or(Role::Member);
        let keys = self.cache.keys();
        let stale = vec![keys.members(id), keys.workspace_list(user.id)];
        let add = self.db.transaction(async {
            let member = self.workspaces.add_member(id, user.id, role).await?;
            let added = WorkspaceEvent::MemberAdded {
                workspace_id: id,
                member: &member,
            };
            added.record(&*self.events).await?;
            Ok::<_, sqlx::Error>(member)
        });
        self.cache.write(stale, add, |_| Vec::new()).await.map_err(|err| {
            if is_unique_violation(&err, MEMBER_UNIQUE) {
                AppError::conflict("member_exists", "this user is already a member")
            } else {
                AppError::from(err)
            }
        })
    }

    async fn remove_member(&self, user_id: Uuid, id: Uuid, member_id: Uuid) -> AppResult<()> {
        self.require_owner(user_id, id).await?;
        let keys = self.cache.keys();
        let task_keys = |tasks: &[(Uuid, Uuid)]| {
            let mut stale = Vec::new();
            for (task_id, project_id) in tasks {
                stale.extend([keys.task(*task_id), keys.task_lists(*project_id)]);
            }
            stale
        };
        // The tasks as assigned now, and (on success) as the write unassigned them: one assigned
        // in between is in the second set.
        let mut stale = task_keys(&self.workspaces.assigned_tasks(id, member_id).await?);
        stale.extend([
            keys.members(id),
            keys.workspace_list(member_id),
            keys.assigned_task_lists(member_id),
        ]);
        let remove = self.db.transaction(async {
            let outcome = self.workspaces.remove_member(id, member_id).await?;
            if let RemoveOutcome::Removed { .. } = outcome {
                let removed = WorkspaceEvent::MemberRemoved {
                    workspace_id: id,
                    user_id: member_id,
                };
                removed.record(&*self.events).await?;
            }
            Ok::<_, sqlx::Error>(outcome)
        });
        let unassigned = |outcome: &RemoveOutcome| match outcome {
            RemoveOutcome::Removed { unassigned } => task_keys(unassigned),
            _ => Vec::new(),
        };
        // A retry of a removal that committed finds no member: invalidated all the same.
        match self.cache.write(stale, remove, unassigned).await? {
            RemoveOutcome::Removed { .. } => Ok(()),
            RemoveOutcome::NotAMember => Err(AppError::not_found("member")),
            RemoveOutcome::LastOwner => Err(AppError::conflict("last_owner", "a workspace needs at least one owner")),
        }
    }
}
