use actix_web::{web, HttpResponse};
use validator::Validate;

use super::dto::UpdateMeRequest;
use super::model::User;
use super::service::UserService;
use crate::container::Inject;
use crate::error::{AppResult, ErrorBody, JsonBody};
use crate::infra::idempotency::Idempotent;
use crate::modules::auth::AuthUser;
use crate::modules::paging::Page;
use crate::modules::resource;
use crate::modules::tasks::dto::AssignedTaskQuery;
use crate::modules::tasks::model::Task;
use crate::modules::tasks::service::TaskService;
use crate::modules::{cached_response, CachedResponse};

/// Mounted under `/api/users/me`.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        resource("")
            .route(web::get().to(get_me))
            .route(web::patch().to(update_me))
            .wrap(Idempotent),
    )
    .service(resource("/tasks").route(web::get().to(list_my_tasks)));
}

/// The signed-in user.
#[utoipa::path(
    get, path = "/api/users/me", tag = "users", operation_id = "get_me", security(("bearer" = [])),
    responses(
        (status = 200, body = User),
        (status = 401, description = "Missing, invalid or expired token", body = ErrorBody),
    )
)]
pub async fn get_me(me: AuthUser, users: Inject<dyn UserService>) -> AppResult<CachedResponse> {
    Ok(cached_response(users.get(me.id).await?))
}

/// Change my display name.
#[utoipa::path(
    patch, path = "/api/users/me", tag = "users", operation_id = "update_me", security(("bearer" = [])),
    request_body = UpdateMeRequest,
    responses(
        (status = 200, body = User),
        (status = 400, description = "Invalid body", body = ErrorBody),
        (status = 401, body = ErrorBody),
    )
)]
pub async fn update_me(
    me: AuthUser,
    users: Inject<dyn UserService>,
    body: JsonBody<UpdateMeRequest>,
) -> AppResult<HttpResponse> {
    body.validate()?;
    Ok(HttpResponse::Ok().json(users.update(me.id, body.into_inner()).await?))
}

/// Tasks assigned to me, across the workspaces I belong to.
#[utoipa::path(
    get, path = "/api/users/me/tasks", tag = "users", operation_id = "list_my_tasks", security(("bearer" = [])),
    params(AssignedTaskQuery),
    responses(
        (status = 200, body = Page<Task>),
        (status = 400, description = "Invalid query", body = ErrorBody),
        (status = 401, body = ErrorBody),
    )
)]
pub async fn list_my_tasks(
    me: AuthUser,
    tasks: Inject<dyn TaskService>,
    query: web::Query<AssignedTaskQuery>,
) -> AppResult<CachedResponse> {
    query.validate()?;
    Ok(cached_response(
        tasks.list_assigned(me.id, query.into_inner().into()).await?,
    ))
}
