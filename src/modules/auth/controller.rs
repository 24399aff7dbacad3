use actix_web::{post, web, HttpResponse};
use validator::Validate;

use super::dto::{LoginRequest, LoginResponse, RegisterRequest};
use super::service::AuthService;
use super::AuthUser;
use crate::container::Inject;
use crate::error::{AppResult, ErrorBody};
use crate::modules::users::model::User;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(register).service(login).service(logout);
}

/// Create an account.
#[utoipa::path(
    tag = "auth", operation_id = "register",
    request_body = RegisterRequest,
    responses(
        (status = 201, body = User),
        (status = 400, description = "Invalid body", body = ErrorBody),
        (status = 409, description = "Email already registered", body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 415, body = ErrorBody),
    )
)]
#[post("/api/auth/register")]
pub async fn register(auth: Inject<dyn AuthService>, body: web::Json<RegisterRequest>) -> AppResult<HttpResponse> {
    body.validate()?;
    Ok(HttpResponse::Created().json(auth.register(body.into_inner()).await?))
}

/// Exchange email and password for a bearer token.
#[utoipa::path(
    tag = "auth", operation_id = "login",
    request_body = LoginRequest,
    responses(
        (status = 200, body = LoginResponse),
        (status = 400, description = "Invalid body", body = ErrorBody),
        (status = 401, description = "Wrong email or password (same answer for both)", body = ErrorBody),
    )
)]
#[post("/api/auth/login")]
pub async fn login(auth: Inject<dyn AuthService>, body: web::Json<LoginRequest>) -> AppResult<HttpResponse> {
    body.validate()?;
    Ok(HttpResponse::Ok().json(auth.login(body.into_inner()).await?))
}

/// Revoke the token this request is made with.
#[utoipa::path(
    tag = "auth", operation_id = "logout", security(("bearer" = [])),
    responses((status = 204, description = "Token revoked"), (status = 401, body = ErrorBody))
)]
#[post("/api/auth/logout")]
pub async fn logout(me: AuthUser, auth: Inject<dyn AuthService>) -> AppResult<HttpResponse> {
    auth.logout(&me.token).await?;
    Ok(HttpResponse::NoContent().finish())
}
