//! The OpenAPI document: every route, body and error response. Served at `/api-docs/openapi.json`
//! with Swagger UI at `/docs`. A test fails when a route is registered but not listed here.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::error::ErrorBody;
use crate::modules::{admin, auth, cache_policy, health, metrics, projects, tasks, users, workspaces};

#[derive(OpenApi)]
#[openapi(
    info(title = "nestling", description = "A NestJS-style, dependency-injected backend starter in Rust."),
    paths(
        health::controller::live, health::controller::ready, health::controller::health, health::controller::metrics,
        auth::controller::register, auth::controller::login, auth::controller::logout,
        users::controller::get_me, users::controller::update_me, users::controller::list_my_tasks,
        workspaces::controller::create_workspace, workspaces::controller::list_workspaces,
        workspaces::controller::get_workspace, workspaces::controller::update_workspace,
        workspaces::controller::delete_workspace, workspaces::controller::list_members,
        workspaces::controller::add_member, workspaces::controller::remove_member,
        projects::controller::create_project, projects::controller::list_projects,
        projects::controller::get_project, projects::controller::update_project,
        projects::controller::delete_project,
        tasks::controller::create_task, tasks::controller::list_tasks, tasks::controller::get_task,
        tasks::controller::update_task, tasks::controller::delete_task,
        metrics::controller::get_daily_metrics,
        admin::controller::get_cache_stats, admin::controller::set_cache_mode, admin::controller::flush_cache,
        admin::controller::warm_cache, admin::controller::get_redis_health, admin::controller::get_redis_metrics,
        admin::controller::get_redis_slowlog, cache_policy::get_cache_policy,
    ),
    components(schemas(ErrorBody)),
    modifiers(&BearerAuth),
    tags(
        (name = "auth", description = "Register, log in, log out"),
        (name = "users", description = "The signed-in user"),
        (name = "workspaces", description = "Workspaces and members"),
        (name = "projects"), (name = "tasks"), (name = "metrics", description = "Daily task metrics"),
        (name = "health", description = "Liveness, readiness, components"),
        (name = "admin", description = "Operator endpoints (ADMIN_TOKEN or a user with the admin role)"),
        (name = "cache", description = "The TTL table in force"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let bearer = |format: &str| {
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format(format)
                    .build(),
            )
        };
        // Users' login tokens; for /admin routes, the operator's ADMIN_TOKEN or an admin user's token.
        components.add_security_scheme("bearer", bearer("opaque"));
        components.add_security_scheme("admin", bearer("ADMIN_TOKEN or an admin user's token"));
    }
}
