//! `AuthUser`: put it in a handler's arguments and the route requires a valid bearer token.

use actix_web::dev::Payload;
use actix_web::http::header::AUTHORIZATION;
use actix_web::{FromRequest, HttpMessage, HttpRequest};
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

/// A bearer token the rate limiter already found invalid, with the 401 it got.
#[derive(Debug, Clone, Copy)]
pub struct RefusedToken {
    pub code: &'static str,
    pub message: &'static str,
}

pub const MISSING_TOKEN: AppError = AppError::Unauthorized {
    code: "missing_token",
    message: "an Authorization: Bearer token is required",
};

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive), if any.
pub fn bearer_token(req: &HttpRequest) -> Option<&str> {
    let value = req.headers().get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|token| !token.is_empty())
}

impl FromRequest for AuthUser {
    type Error = AppError;
    type Future = LocalBoxFuture<'static, Result<Self, AppError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        // The rate limiter has authenticated this request already (taken, not copied: a second
        // `AuthUser` in one handler would simply authenticate again).
        if let Some(user) = req.extensions_mut().remove::<AuthUser>() {
            return Box::pin(async move { Ok(user) });
        }
        if let Some(refused) = req.extensions().get::<RefusedToken>() {
            let err = AppError::Unauthorized {
                code: refused.code,
                message: refused.message,
            };
            return Box::pin(async move { Err(err) });
        }
        let token = bearer_token(req).map(str::to_owned);
        let auth: Option<Arc<dyn AuthService>> = req.app_data::<Arc<AppModule>>().map(|m| m.resolve());
        Box::pin(async move {
            let token = token.ok_or(MISSING_TOKEN)?;
            let auth = auth.ok_or_else(|| AppError::internal("AppModule missing from app data"))?;
            let id = auth.authenticate(&token).await?;
            Ok(AuthUser { id, token })
        })
    }
}
