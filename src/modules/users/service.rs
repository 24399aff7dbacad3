use async_trait::async_trait;
use shaku::{Component, Interface};
use std::sync::Arc;
use uuid::Uuid;

use super::dto::UpdateMeRequest;
use super::model::User;
use super::repository::UserRepository;
use crate::error::{AppError, AppResult};

#[async_trait]
pub trait UserService: Interface {
    async fn get(&self, id: Uuid) -> AppResult<User>;
    async fn update(&self, id: Uuid, request: UpdateMeRequest) -> AppResult<User>;
}

#[derive(Component)]
#[shaku(interface = UserService)]
pub struct Users {
    #[shaku(inject)]
    users: Arc<dyn UserRepository>,
}

#[async_trait]
impl UserService for Users {
    async fn get(&self, id: Uuid) -> AppResult<User> {
        self.users
            .find(id)
            .await?
            .ok_or(AppError::not_found("user"))
    }

    async fn update(&self, id: Uuid, request: UpdateMeRequest) -> AppResult<User> {
        self.users
            .update_name(id, request.name.trim())
            .await?
            .ok_or(AppError::not_found("user"))
    }
}
