//! `BearerCaller`: the user behind a request's bearer token, for infrastructure that must know
//! who calls (idempotency keys are per user) without depending on this feature.

use std::sync::Arc;

use actix_web::{HttpMessage, HttpRequest};
use async_trait::async_trait;
use shaku::Component;
use uuid::Uuid;

use super::extractor::{bearer_token, AuthUser, RefusedToken};
use super::service::AuthService;
use crate::infra::idempotency::Caller;

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
        let id = self.auth.authenticate(&token).await.ok()?;
        // Left for the handler's `AuthUser`, so it does not authenticate again.
        req.extensions_mut().insert(AuthUser { id, token });
        Some(id)
    }
}
