use actix_web::{web, HttpResponse};
use uuid::Uuid;
use validator::Validate;

use super::dto::{CreateTaskRequest, TaskQuery, UpdateTaskRequest};
use super::model::Task;
use super::service::TaskService;
use crate::container::Inject;
use crate::error::{AppResult, ErrorBody, JsonBody};
use crate::infra::idempotency::Idempotent;
use crate::modules::auth::AuthUser;
use crate::modules::paging::Page;
use crate::modules::resource;
use crate::modules::{cached_response, CachedResponse};

/// Mounted under `/api/tasks`.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        resource("/{id}")
            .route(web::get().to(get_task))
            .route(web::patch().to(update_task))
            .route(web::delete().to(delete_task))
            .wrap(Idempotent),
    );
}

/// Mounted under `/api/projects`: a project's tasks.
pub fn configure_in_project(cfg: &mut web::ServiceConfig) {
    cfg.service(
        resource("/{id}/tasks")
            .route(web::get().to(list_tasks))
            .route(web::post().to(create_task))
            .wrap(Idempotent),
    );
}

/// Create a task in a project.
#[utoipa::path(
    post, path = "/api/projects/{id}/tasks", tag = "tasks", operation_id = "create_task", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Project id")),
    request_body = CreateTaskRequest,
    responses(
        (status = 201, body = Task), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, description = "Project missing or not a member", body = ErrorBody),
    )
)]
pub async fn create_task(
    me: AuthUser,
    tasks: Inject<dyn TaskService>,
    id: web::Path<Uuid>,
    body: JsonBody<CreateTaskRequest>,
) -> AppResult<HttpResponse> {
    body.validate()?;
    Ok(HttpResponse::Created().json(tasks.create(me.id, *id, body.into_inner()).await?))
}

/// Tasks of a project, oldest first, filtered by status and assignee.
#[utoipa::path(
    get, path = "/api/projects/{id}/tasks", tag = "tasks", operation_id = "list_tasks", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Project id"), TaskQuery),
    responses(
        (status = 200, body = Page<Task>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
    )
)]
pub async fn list_tasks(
    me: AuthUser,
    tasks: Inject<dyn TaskService>,
    id: web::Path<Uuid>,
    query: web::Query<TaskQuery>,
) -> AppResult<CachedResponse> {
    query.validate()?;
    Ok(cached_response(tasks.list(me.id, *id, query.into_inner()).await?))
}

/// One task.
#[utoipa::path(
    get, path = "/api/tasks/{id}", tag = "tasks", operation_id = "get_task", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Task id")),
    responses((status = 200, body = Task), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody))
)]
pub async fn get_task(me: AuthUser, tasks: Inject<dyn TaskService>, id: web::Path<Uuid>) -> AppResult<CachedResponse> {
    Ok(cached_response(tasks.get(me.id, *id).await?))
}

/// Change any field of a task; `null` clears description, assignee and due date.
#[utoipa::path(
    patch, path = "/api/tasks/{id}", tag = "tasks", operation_id = "update_task", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Task id")),
    request_body = UpdateTaskRequest,
    responses(
        (status = 200, body = Task), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
    )
)]
pub async fn update_task(
    me: AuthUser,
    tasks: Inject<dyn TaskService>,
    id: web::Path<Uuid>,
    body: JsonBody<UpdateTaskRequest>,
) -> AppResult<HttpResponse> {
    body.validate()?;
    Ok(HttpResponse::Ok().json(tasks.update(me.id, *id, body.into_inner()).await?))
}

/// Delete a task.
#[utoipa::path(
    delete, path = "/api/tasks/{id}", tag = "tasks", operation_id = "delete_task", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Task id")),
    responses((status = 204, description = "Deleted"), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody))
)]
pub async fn delete_task(me: AuthUser, tasks: Inject<dyn TaskService>, id: web::Path<Uuid>) -> AppResult<HttpResponse> {
    tasks.delete(me.id, *id).await?;
    Ok(HttpResponse::NoContent().finish())
}
