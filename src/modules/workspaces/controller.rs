use actix_web::{web, HttpResponse};
use uuid::Uuid;
use validator::Validate;

use super::dto::{AddMemberRequest, CreateWorkspaceRequest, UpdateWorkspaceRequest};
use super::model::{Member, Workspace};
use super::service::WorkspaceService;
use crate::container::Inject;
use crate::error::{AppResult, ErrorBody, JsonBody};
use crate::infra::idempotency::Idempotent;
use crate::modules::auth::AuthUser;
use crate::modules::resource;
use crate::modules::{cached_response, CachedResponse};

/// Mounted under `/api/workspaces` (with the projects and metrics of a workspace).
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        resource("")
            .route(web::get().to(list_workspaces))
            .route(web::post().to(create_workspace))
            .wrap(Idempotent),
    )
    .service(
        resource("/{id}")
            .route(web::get().to(get_workspace))
            .route(web::patch().to(update_workspace))
            .route(web::delete().to(delete_workspace))
            .wrap(Idempotent),
    )
    .service(
        resource("/{id}/members")
            .route(web::get().to(list_members))
            .route(web::post().to(add_member))
            .wrap(Idempotent),
    )
    .service(resource("/{id}/members/{userId}").route(web::delete().to(remove_member)));
}

/// Create a workspace; the caller becomes its owner.
#[utoipa::path(
    post, path = "/api/workspaces", tag = "workspaces", operation_id = "create_workspace", security(("bearer" = [])),
    request_body = CreateWorkspaceRequest,
    responses((status = 201, body = Workspace), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody))
)]
pub async fn create_workspace(
    me: AuthUser,
    workspaces: Inject<dyn WorkspaceService>,
    body: JsonBody<CreateWorkspaceRequest>,
) -> AppResult<HttpResponse> {
    body.validate()?;
    Ok(HttpResponse::Created().json(workspaces.create(me.id, body.into_inner()).await?))
}

/// Workspaces I am a member of.
#[utoipa::path(
    get, path = "/api/workspaces", tag = "workspaces", operation_id = "list_workspaces", security(("bearer" = [])),
    responses((status = 200, body = Vec<Workspace>), (status = 401, body = ErrorBody))
)]
pub async fn list_workspaces(me: AuthUser, workspaces: Inject<dyn WorkspaceService>) -> AppResult<CachedResponse> {
    Ok(cached_response(workspaces.list(me.id).await?))
}

/// One workspace (members only).
#[utoipa::path(
    get, path = "/api/workspaces/{id}", tag = "workspaces", operation_id = "get_workspace", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Workspace id")),
    responses(
        (status = 200, body = Workspace), (status = 400, description = "Bad id", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, description = "Missing or not a member", body = ErrorBody),
    )
)]
pub async fn get_workspace(
    me: AuthUser,
    workspaces: Inject<dyn WorkspaceService>,
    id: web::Path<Uuid>,
) -> AppResult<CachedResponse> {
    Ok(cached_response(workspaces.get(me.id, *id).await?))
}

/// Rename a workspace (owners only).
#[utoipa::path(
    patch, path = "/api/workspaces/{id}", tag = "workspaces", operation_id = "update_workspace", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Workspace id")),
    request_body = UpdateWorkspaceRequest,
    responses(
        (status = 200, body = Workspace), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, description = "Not an owner", body = ErrorBody), (status = 404, body = ErrorBody),
    )
)]
pub async fn update_workspace(
    me: AuthUser,
    workspaces: Inject<dyn WorkspaceService>,
    id: web::Path<Uuid>,
    body: JsonBody<UpdateWorkspaceRequest>,
) -> AppResult<HttpResponse> {
    body.validate()?;
    Ok(HttpResponse::Ok().json(workspaces.update(me.id, *id, body.into_inner()).await?))
}

/// Delete a workspace with its projects and tasks (owners only).
#[utoipa::path(
    delete, path = "/api/workspaces/{id}", tag = "workspaces", operation_id = "delete_workspace", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Workspace id")),
    responses(
        (status = 204, description = "Deleted"), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
    )
)]
pub async fn delete_workspace(
    me: AuthUser,
    workspaces: Inject<dyn WorkspaceService>,
    id: web::Path<Uuid>,
) -> AppResult<HttpResponse> {
    workspaces.delete(me.id, *id).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// Members of a workspace.
#[utoipa::path(
    get, path = "/api/workspaces/{id}/members", tag = "workspaces", operation_id = "list_members", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Workspace id")),
    responses((status = 200, body = Vec<Member>), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody))
)]
pub async fn list_members(
    me: AuthUser,
    workspaces: Inject<dyn WorkspaceService>,
    id: web::Path<Uuid>,
) -> AppResult<CachedResponse> {
    Ok(cached_response(workspaces.members(me.id, *id).await?))
}

/// Add a registered user by email (owners only).
#[utoipa::path(
    post, path = "/api/workspaces/{id}/members", tag = "workspaces", operation_id = "add_member", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Workspace id")),
    request_body = AddMemberRequest,
    responses(
        (status = 201, body = Member), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, description = "Workspace or user not found", body = ErrorBody),
        (status = 409, description = "Already a member", body = ErrorBody),
    )
)]
pub async fn add_member(
    me: AuthUser,
    workspaces: Inject<dyn WorkspaceService>,
    id: web::Path<Uuid>,
    body: JsonBody<AddMemberRequest>,
) -> AppResult<HttpResponse> {
    body.validate()?;
    Ok(HttpResponse::Created().json(workspaces.add_member(me.id, *id, body.into_inner()).await?))
}

/// Remove a member (owners only); their tasks here become unassigned.
#[utoipa::path(
    delete, path = "/api/workspaces/{id}/members/{userId}", tag = "workspaces", operation_id = "remove_member", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Workspace id"), ("userId" = Uuid, Path, description = "Member's user id")),
    responses(
        (status = 204, description = "Removed"), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, description = "Last owner", body = ErrorBody),
    )
)]
pub async fn remove_member(
    me: AuthUser,
    workspaces: Inject<dyn WorkspaceService>,
    path: web::Path<(Uuid, Uuid)>,
) -> AppResult<HttpResponse> {
    let (id, member_id) = path.into_inner();
    workspaces.remove_member(me.id, id, member_id).await?;
    Ok(HttpResponse::NoContent().finish())
}
