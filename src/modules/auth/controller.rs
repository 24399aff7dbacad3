use actix_web::{web, HttpResponse};
use uuid::Uuid;
use validator::Validate;

use super::dto::{EndSessionsQuery, EndedSessions, LoginRequest, LoginResponse, RegisterRequest, SessionResponse};
use super::service::AuthService;
use super::AuthUser;
use crate::container::Inject;
use crate::error::{AppResult, ErrorBody, JsonBody};
use crate::infra::rate_limit::middleware::RateLimit;
use crate::modules::resource;
use crate::modules::users::model::User;

/// Mounted under `/api/auth`. Login and register are limited per client IP and per email,
/// logout and sessions by the `/api` policy.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        resource("/register")
            .wrap(RateLimit::credentials())
            .route(web::post().to(register)),
    )
    .service(
        resource("/login")
            .wrap(RateLimit::credentials())
            .route(web::post().to(login)),
    )
    .service(resource("/logout").wrap(RateLimit::api()).route(web::post().to(logout)))
    .service(
        resource("/sessions")
            .wrap(RateLimit::api())
            .route(web::get().to(list_sessions))
            .route(web::delete().to(delete_sessions)),
    )
    .service(
        resource("/sessions/{id}")
            .wrap(RateLimit::api())
            .route(web::delete().to(delete_session)),
    );
}

/// Create an account.
#[utoipa::path(
    post, path = "/api/auth/register", tag = "auth", operation_id = "register",
    request_body = RegisterRequest,
    responses(
        (status = 201, body = User),
        (status = 400, description = "Invalid body", body = ErrorBody),
        (status = 409, description = "Email already registered", body = ErrorBody),
        (status = 503, description = "Every password-hashing slot is busy: retry after `Retry-After`", body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 415, body = ErrorBody),
    )
)]
pub async fn register(auth: Inject<dyn AuthService>, body: JsonBody<RegisterRequest>) -> AppResult<HttpResponse> {
    body.validate()?;
    Ok(HttpResponse::Created().json(auth.register(body.into_inner()).await?))
}

/// Exchange email and password for a bearer token.
///
/// Limited per client address and per email (`GET /api/rate-limit/policy`). Only failed attempts
/// count against an email, and an address that logged in to the account before has an allowance
/// of its own, so others' guesses do not lock the owner out there. A body with a repeated key is
/// refused (400) before any password is checked.
#[utoipa::path(
    post, path = "/api/auth/login", tag = "auth", operation_id = "login",
    request_body = LoginRequest,
    responses(
        (status = 200, body = LoginResponse),
        (status = 400, description = "Invalid body", body = ErrorBody),
        (status = 401, description = "Wrong email or password (same answer for both)", body = ErrorBody),
        (status = 503, description = "Every password-hashing slot is busy: retry after `Retry-After`", body = ErrorBody),
    )
)]
pub async fn login(auth: Inject<dyn AuthService>, body: JsonBody<LoginRequest>) -> AppResult<HttpResponse> {
    body.validate()?;
    Ok(HttpResponse::Ok().json(auth.login(body.into_inner()).await?))
}

/// Revoke the token this request is made with.
#[utoipa::path(
    post, path = "/api/auth/logout", tag = "auth", operation_id = "logout", security(("bearer" = [])),
    responses((status = 204, description = "Token revoked"), (status = 401, body = ErrorBody))
)]
pub async fn logout(me: AuthUser, auth: Inject<dyn AuthService>) -> AppResult<HttpResponse> {
    auth.logout(&me.token).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// My sessions (live tokens), newest first: `current` is the one this request is made with.
#[utoipa::path(
    get, path = "/api/auth/sessions", tag = "auth", operation_id = "list_sessions", security(("bearer" = [])),
    responses((status = 200, body = Vec<SessionResponse>), (status = 401, body = ErrorBody))
)]
pub async fn list_sessions(me: AuthUser, auth: Inject<dyn AuthService>) -> AppResult<HttpResponse> {
    Ok(HttpResponse::Ok().json(auth.sessions(me.id, &me.token).await?))
}

/// End one of my sessions: its token stops working on every instance.
#[utoipa::path(
    delete, path = "/api/auth/sessions/{id}", tag = "auth", operation_id = "delete_session", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Session id")),
    responses(
        (status = 204, description = "Session ended"), (status = 400, description = "Bad id", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, description = "No such session of mine", body = ErrorBody),
    )
)]
pub async fn delete_session(
    me: AuthUser,
    auth: Inject<dyn AuthService>,
    id: web::Path<Uuid>,
) -> AppResult<HttpResponse> {
    auth.end_session(me.id, *id).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// End all my other sessions ("log out everywhere else"); with `all=true`, this one too.
#[utoipa::path(
    delete, path = "/api/auth/sessions", tag = "auth", operation_id = "delete_sessions", security(("bearer" = [])),
    params(EndSessionsQuery),
    responses((status = 200, body = EndedSessions), (status = 401, body = ErrorBody))
)]
pub async fn delete_sessions(
    me: AuthUser,
    auth: Inject<dyn AuthService>,
    query: web::Query<EndSessionsQuery>,
) -> AppResult<HttpResponse> {
    let keep = (!query.all).then_some(me.token.as_str());
    let ended = auth.end_sessions(me.id, keep).await?;
    Ok(HttpResponse::Ok().json(EndedSessions { ended }))
}
