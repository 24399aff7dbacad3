//! `AuthUser`: put it in a handler's arguments and the route requires a valid bearer token.

use actix_web::dev::Payload;
use actix_web::http::header::AUTHORIZATION;
use actix_web::{FromRequest, HttpRequest};
use futures_util::future::LocalBoxFuture;
use shaku::HasComponent;
use std::sync::Arc;
use uuid::Uuid;

use super::service::AuthService;
use crate::container::AppModule;
use crate::error::AppError;

#[derive(Debug, Clone)]
pub struct AuthUser {
    pub id: Uuid,
    /// The bearer token this request came with (logout revokes it).
    pub token: String,
}

const MISSING_TOKEN: AppError = AppError::Unauthorized {
    code: "missing_token",
    message: "an Authorization: Bearer token is required",
};

impl FromRequest for AuthUser {
    type Error = AppError;
    type Future = LocalBoxFuture<'static, Result<Self, AppError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let token = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")))
            .map(|token| token.trim().to_owned());
        let auth: Option<Arc<dyn AuthService>> = req.app_data::<Arc<AppModule>>().map(|m| m.resolve());
        Box::pin(async move {
            let token = token.filter(|t| !t.is_empty()).ok_or(MISSING_TOKEN)?;
            let auth = auth.ok_or_else(|| AppError::internal("AppModule missing from app data"))?;
            let id = auth.authenticate(&token).await?;
            Ok(AuthUser { id, token })
        })
    }
}
