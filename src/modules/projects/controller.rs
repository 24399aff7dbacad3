use actix_web::{web, HttpResponse};
use uuid::Uuid;
use validator::Validate;

use super::dto::{CreateProjectRequest, UpdateProjectRequest};
use super::model::Project;
use super::service::ProjectService;
use crate::container::Inject;
use crate::error::{AppResult, ErrorBody, JsonBody};
use crate::infra::idempotency::Idempotent;
use crate::modules::auth::AuthUser;
use crate::modules::resource;
use crate::modules::{cached_response, CachedResponse};

/// Mounted under `/api/projects`.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        resource("/{id}")
            .route(web::get().to(get_project))
            .route(web::patch().to(update_project))
            .route(web::delete().to(delete_project))
            .wrap(Idempotent),
    );
}

/// Mounted under `/api/workspaces`: a workspace's projects.
pub fn configure_in_workspace(cfg: &mut web::ServiceConfig) {
    cfg.service(
        resource("/{id}/projects")
            .route(web::get().to(list_projects))
            .route(web::post().to(create_project))
            .wrap(Idempotent),
    );
}

/// Create a project in a workspace.
#[utoipa::path(
    post, path = "/api/workspaces/{id}/projects", tag = "projects", operation_id = "create_project", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Workspace id")),
    request_body = CreateProjectRequest,
    responses(
        (status = 201, body = Project), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, description = "Workspace missing or not a member", body = ErrorBody),
    )
)]
pub async fn create_project(
    me: AuthUser,
    projects: Inject<dyn ProjectService>,
    id: web::Path<Uuid>,
    body: JsonBody<CreateProjectRequest>,
) -> AppResult<HttpResponse> {
    body.validate()?;
    Ok(HttpResponse::Created().json(projects.create(me.id, *id, body.into_inner()).await?))
}

/// Projects of a workspace.
#[utoipa::path(
    get, path = "/api/workspaces/{id}/projects", tag = "projects", operation_id = "list_projects", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Workspace id")),
    responses((status = 200, body = Vec<Project>), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody))
)]
pub async fn list_projects(
    me: AuthUser,
    projects: Inject<dyn ProjectService>,
    id: web::Path<Uuid>,
) -> AppResult<CachedResponse> {
    Ok(cached_response(projects.list(me.id, *id).await?))
}

/// One project.
#[utoipa::path(
    get, path = "/api/projects/{id}", tag = "projects", operation_id = "get_project", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Project id")),
    responses((status = 200, body = Project), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody))
)]
pub async fn get_project(
    me: AuthUser,
    projects: Inject<dyn ProjectService>,
    id: web::Path<Uuid>,
) -> AppResult<CachedResponse> {
    Ok(cached_response(projects.get(me.id, *id).await?))
}

/// Change a project's name or description.
#[utoipa::path(
    patch, path = "/api/projects/{id}", tag = "projects", operation_id = "update_project", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Project id")),
    request_body = UpdateProjectRequest,
    responses(
        (status = 200, body = Project), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
    )
)]
pub async fn update_project(
    me: AuthUser,
    projects: Inject<dyn ProjectService>,
    id: web::Path<Uuid>,
    body: JsonBody<UpdateProjectRequest>,
) -> AppResult<HttpResponse> {
    body.validate()?;
    Ok(HttpResponse::Ok().json(projects.update(me.id, *id, body.into_inner()).await?))
}

/// Delete a project and its tasks.
#[utoipa::path(
    delete, path = "/api/projects/{id}", tag = "projects", operation_id = "delete_project", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Project id")),
    responses((status = 204, description = "Deleted"), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody))
)]
pub async fn delete_project(
    me: AuthUser,
    projects: Inject<dyn ProjectService>,
    id: web::Path<Uuid>,
) -> AppResult<HttpResponse> {
    projects.delete(me.id, *id).await?;
    Ok(HttpResponse::NoContent().finish())
}
