use actix_web::{web, HttpResponse};
use validator::Validate;

use super::dto::{LoginRequest, LoginResponse, RegisterRequest};
use super::service::AuthService;
use super::AuthUser;
use crate::container::Inject;
use crate::error::{AppResult, ErrorBody, JsonBody};
use crate::infra::rate_limit::middleware::RateLimit;
use crate::modules::resource;
use crate::modules::users::model::User;

/// Mounted under `/api/auth`. Login and register are limited per client IP and per email,
/// logout by the `/api` policy.
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
    .service(resource("/logout").wrap(RateLimit::api()).route(web::post().to(logout)));
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
