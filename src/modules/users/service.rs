use async_trait::async_trait;
use shaku::{Component, Interface};
use std::sync::Arc;
use uuid::Uuid;

use super::dto::UpdateMeRequest;
use super::model::User;
use super::repository::UserRepository;
use crate::error::{AppError, AppResult};
use crate::infra::cache::{json, CacheService, Cached};
use crate::modules::to_json_bytes;
use crate::modules::workspaces::repository::WorkspaceRepository;

#[async_trait]
pub trait UserService: Interface {
    async fn get(&self, id: Uuid) -> AppResult<Cached>;
    async fn update(&self, id: Uuid, request: UpdateMeRequest) -> AppResult<User>;
}

#[derive(Component)]
#[shaku(interface = UserService)]
pub struct Users {
    #[shaku(inject)]
    users: Arc<dyn UserRepository>,
    #[shaku(inject)]
    workspaces: Arc<dyn WorkspaceRepository>,
    #[shaku(inject)]
    cache: Arc<dyn CacheService>,
}

const NOT_FOUND: AppError = AppError::NotFound { entity: "user" };

#[async_trait]
impl UserService for Users {
    async fn get(&self, id: Uuid) -> AppResult<Cached> {
        let key = self.cache.keys().user(id);
        let load = async { to_json_bytes(&self.users.find(id).await?.ok_or(NOT_FOUND)?) };
        self.cache.get_or_load(key, Box::pin(load), json::<User>).await
    }

    async fn update(&self, id: Uuid, request: UpdateMeRequest) -> AppResult<User> {
        // Member lists show names too. Known before the write, so nothing stands between the
        // commit and the invalidation.
        let keys = self.cache.keys();
        let mut stale = vec![keys.user(id)];
        for workspace in self.workspaces.list_for_user(id).await? {
            stale.push(keys.member_list(workspace.id));
        }
        let update = self.users.update_name(id, request.name.trim());
        self.cache.write(stale, update, |_| Vec::new()).await?.ok_or(NOT_FOUND)
    }
}
