//! `Caller`: who makes a request, for the middleware that must know (the rate limiter counts per
//! user, idempotency keys are per user) without reading tokens itself. The auth feature
//! implements it (`modules::auth::caller::BearerCaller`); infrastructure depends on this trait,
//! not on the feature.

use actix_web::HttpRequest;
use async_trait::async_trait;
use shaku::Interface;
use uuid::Uuid;

#[async_trait(?Send)]
pub trait Caller: Interface {
    /// The user behind the request's credentials; `None` when there is none or it is refused
    /// (the handler then answers 401). Whatever it learns it leaves in the request's extensions,
    /// so the handler's extractor does not authenticate again.
    async fn user_id(&self, req: &HttpRequest) -> Option<Uuid>;
}
