//! `BearerCaller`: the user behind a request's bearer token, for infrastructure that must know
//! who calls (the rate limiter, idempotency keys) without depending on this feature.

use std::sync::Arc;

use actix_web::{HttpMessage, HttpRequest};
use async_trait::async_trait;
use shaku::Component;
use uuid::Uuid;

use super::extractor::{bearer_token, AuthUser, RefusedToken};
use super::service::AuthService;
use crate::error::AppError;
use crate::infra::caller::Caller;

#[derive(Component)]
#[shaku(interface = Caller)]
pub struct BearerCaller {
    #[shaku(inject)]
    auth: Arc<dyn AuthService>,
}

#[async_trait(?Send)]
impl Caller for BearerCaller {
    async fn user_id(&self, req: &HttpRequest) -> Option<Uuid> {
        // The rate limiter may have authenticated the request already.
        if let Some(user) = req.extensions().get::<AuthUser>() {
            return Some(user.id);
        }
        if req.extensions().get::<RefusedToken>().is_some() {
            return None;
        }
        let token = bearer_token(req)?.to_owned();
        // Either answer is left for the handler's `AuthUser`, so it does not look the token up
        // again.
        match self.auth.authenticate(&token).await {
            Ok(id) => {
                req.extensions_mut().insert(AuthUser { id, token });
                Some(id)
            }
            Err(AppError::Unauthorized { code, message }) => {
                req.extensions_mut().insert(RefusedToken { code, message });
                None
            }
            // Anything else (the database is down) the extractor meets again and answers.
            Err(_) => None,
        }
    }
}
