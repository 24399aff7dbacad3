use async_trait::async_trait;
use shaku::{Component, Interface};
use std::sync::Arc;
use uuid::Uuid;

use super::dto::{CreateProjectRequest, UpdateProjectRequest};
use super::model::Project;
use super::repository::ProjectRepository;
use crate::error::{AppError, AppResult};
use crate::infra::cache::{json, CacheService, Cached, Derived, Stamp};
use crate::infra::database::Database;
use crate::infra::events::EventBus;
use crate::modules::events::model::WorkspaceEvent;
use crate::modules::workspaces::model::InWorkspace;
use crate::modules::workspaces::service::WorkspaceService;
use crate::modules::{from_json_bytes, to_json_bytes};

#[async_trait]
pub trait ProjectService: Interface {
    /// The project as cached JSON, if the user is a member of its workspace; 404 otherwise.
    async fn get(&self, user_id: Uuid, id: Uuid) -> AppResult<Cached>;
    /// The project's workspace, if the user is a member of it; 404 otherwise (other services
    /// authorize through this on every request, so it reads one field of the cached JSON).
    async fn workspace_of(&self, user_id: Uuid, id: Uuid) -> AppResult<Uuid>;
    /// The project's workspace as this instance last saw it, where lookups read ahead (see
    /// `with_prefetched`): a hint for which membership to read, never an authorization.
    fn seen_workspace(&self, id: Uuid) -> Option<Uuid>;
    async fn create(&self, user_id: Uuid, workspace_id: Uuid, request: CreateProjectRequest) -> AppResult<Project>;
    async fn list(&self, user_id: Uuid, workspace_id: Uuid) -> AppResult<Cached>;
    async fn update(&self, user_id: Uuid, id: Uuid, request: UpdateProjectRequest) -> AppResult<Project>;
    async fn delete(&self, user_id: Uuid, id: Uuid) -> AppResult<()>;
}

#[derive(Component)]
#[shaku(interface = ProjectService)]
pub struct Projects {
    #[shaku(inject)]
    projects: Arc<dyn ProjectRepository>,
    #[shaku(inject)]
    workspaces: Arc<dyn WorkspaceService>,
    #[shaku(inject)]
    cache: Arc<dyn CacheService>,
    /// Writes and their events commit together (`Database::transaction`).
    #[shaku(inject)]
    db: Arc<dyn Database>,
    #[shaku(inject)]
    events: Arc<dyn EventBus>,
    #[shaku(default)]
    seen_workspaces: SeenWorkspaces,
    /// (user, project) → the project's workspace, for members: every task request authorizes
    /// through `workspace_of`, and this spares it the project's and the membership's lookups.
    #[shaku(default)]
    authorized: Derived<(Uuid, Uuid), Uuid>,
}

/// Project → workspace, as read from the projects this instance served (a project never moves).
pub struct SeenWorkspaces(moka::sync::Cache<Uuid, Uuid>);

impl Default for SeenWorkspaces {
    fn default() -> Self {
        Self(moka::sync::Cache::new(SEEN_WORKSPACES))
    }
}

/// About 100 bytes each.
const SEEN_WORKSPACES: u64 = 10_000;

const NOT_FOUND: AppError = AppError::NotFound { entity: "project" };

impl Projects {
    /// The project and its workspace, if the user is a member of it. With `stamped`, also the
    /// stamp under which that answer may be kept (`None` when nothing may be kept).
    async fn get_with_workspace(
        &self,
        user_id: Uuid,
        id: Uuid,
        stamped: bool,
    ) -> AppResult<(Cached, Uuid, Option<Stamp>)> {
        let key = self.cache.keys().project(id);
        // Taken before the lookups: an invalidation from then on makes the answer stale.
        let project_stamp = stamped.then(|| self.cache.stamp(&key)).flatten();
        let load = async { to_json_bytes(&self.projects.find(id).await?.ok_or(NOT_FOUND)?) };
        let cached = self.cache.get_or_load(key, Box::pin(load), json::<Project>).await?;
        let owner: InWorkspace = from_json_bytes(&cached.bytes)?;
        // A lookup, not a write, once the project is known (it never moves).
        if self.cache.reads_ahead() && !self.seen_workspaces.0.contains_key(&id) {
            self.seen_workspaces.0.insert(id, owner.workspace_id);
        }
        let member_stamp = project_stamp
            .is_some()
            .then(|| self.cache.stamp(&self.cache.keys().member(owner.workspace_id, user_id)))
            .flatten();
        self.workspaces
            .require_member_or(user_id, owner.workspace_id, NOT_FOUND)
            .await?;
        let stamp = project_stamp
            .zip(member_stamp)
            .map(|(project, member)| project.and(member));
        Ok((cached, owner.workspace_id, stamp))
    }

    /// The project fresh from Postgres (the base of every write), if the user may see it.
    async fn find_for_write(&self, user_id: Uuid, id: Uuid) -> AppResult<Project> {
        let project = self.projects.find(id).await?.ok_or(NOT_FOUND)?;
        self.workspaces
            .require_member_or(user_id, project.workspace_id, NOT_FOUND)
            .await?;
        Ok(project)
    }
}

#[async_trait]
impl ProjectService for Projects {
    async fn get(&self, user_id: Uuid, id: Uuid) -> AppResult<Cached> {
        Ok(self.get_with_workspace(user_id, id, false).await?.0)
    }

    async fn workspace_of(&self, user_id: Uuid, id: Uuid) -> AppResult<Uuid> {
        if let Some(workspace_id) = self.authorized.get(self.cache.as_ref(), &(user_id, id)) {
            return Ok(workspace_id);
        }
        let (_, workspace_id, stamp) = self.get_with_workspace(user_id, id, true).await?;
        self.authorized.keep((user_id, id), workspace_id, stamp);
        Ok(workspace_id)
    }

    fn seen_workspace(&self, id: Uuid) -> Option<Uuid> {
        self.seen_workspaces.0.get(&id)
    }

    async fn create(&self, user_id: Uuid, workspace_id: Uuid, request: CreateProjectRequest) -> AppResult<Project> {
        self.workspaces.require_member(user_id, workspace_id).await?;
        let stale = vec![self.cache.keys().project_list(workspace_id)];
        let create = self.db.transaction(async {
            let created = self
                .projects
                .create(workspace_id, request.name.trim(), request.description.as_deref())
                .await?;
            WorkspaceEvent::ProjectCreated(&created).record(&*self.events).await?;
            Ok::<_, sqlx::Error>(created)
        });
        Ok(self.cache.write(stale, create, |_| Vec::new()).await?)
    }

    async fn list(&self, user_id: Uuid, workspace_id: Uuid) -> AppResult<Cached> {
        self.workspaces.require_member(user_id, workspace_id).await?;
        let key = self.cache.keys().project_list(workspace_id);
        let load = async { to_json_bytes(&self.projects.list(workspace_id).await?) };
        self.cache.get_or_load(key, Box::pin(load), json::<Vec<Project>>).await
    }

    async fn update(&self, user_id: Uuid, id: Uuid, request: UpdateProjectRequest) -> AppResult<Project> {
        let mut project = self.find_for_write(user_id, id).await?;
        if let Some(name) = request.name {
            project.name = name.trim().to_owned();
        }
        if let Some(description) = request.description {
            project.description = description;
        }
        let keys = self.cache.keys();
        let stale = vec![keys.project(id), keys.project_list(project.workspace_id)];
        let save = self.db.transaction(async {
            let saved = self.projects.save(&project).await?;
            if let Some(saved) = &saved {
                WorkspaceEvent::ProjectUpdated(saved).record(&*self.events).await?;
            }
            Ok::<_, sqlx::Error>(saved)
        });
        self.cache.write(stale, save, |_| Vec::new()).await?.ok_or(NOT_FOUND)
    }

    async fn delete(&self, user_id: Uuid, id: Uuid) -> AppResult<()> {
        let workspace_id = self.workspace_of(user_id, id).await?;
        let keys = self.cache.keys();
        let stale = vec![
            keys.project(id),
            keys.project_list(workspace_id),
            keys.task_lists(id),
            keys.all_daily_metrics(workspace_id),
        ];
        // The deleted tasks are known only from the write; on an error the project's keys still go
        // (its tasks cannot be reached without it).
        let deleted_tasks = |deleted: &Option<Vec<(Uuid, Option<Uuid>)>>| {
            let mut stale = Vec::new();
            for (task_id, assignee) in deleted.iter().flatten() {
                stale.push(keys.task(*task_id));
                stale.extend(assignee.map(|user| keys.assigned_task_lists(user)));
            }
            stale
        };
        let delete = self.db.transaction(async {
            let deleted = self.projects.delete(id).await?;
            if deleted.is_some() {
                WorkspaceEvent::ProjectDeleted { workspace_id, id }
                    .record(&*self.events)
                    .await?;
            }
            Ok::<_, sqlx::Error>(deleted)
        });
        self.cache.write(stale, delete, deleted_tasks).await?;
        Ok(())
    }
}
