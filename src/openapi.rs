//! The OpenAPI document: every route, body and error response. Served at `/api-docs/openapi.json`
//! with Swagger UI at `/docs`. A test fails when a route is registered but not listed here.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::error::ErrorBody;
use crate::modules::{admin, auth, cache_policy, events, health, metrics, projects, tasks, users, workspaces};
// @generate: imports

#[derive(OpenApi)]
#[openapi(
    info(title = "nestling", description = "A NestJS-style, dependency-injected backend starter in Rust."),
    paths(
        health::controller::live, health::controller::ready, health::controller::health, health::controller::metrics,
        auth::controller::register, auth::controller::login, auth::controller::logout,
        auth::controller::list_sessions, auth::controller::delete_session, auth::controller::delete_sessions,
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
        metrics::controller::get_daily_metrics, metrics::controller::rebuild_metrics,
        events::controller::stream_events,
        admin::controller::get_cache_stats, admin::controller::set_cache_mode, admin::controller::flush_cache,
        admin::controller::warm_cache, admin::controller::get_redis_health, admin::controller::get_redis_metrics,
        admin::controller::get_redis_slowlog, admin::controller::get_redis_keys, admin::controller::delete_user_sessions,
        admin::controller::list_jobs, admin::controller::retry_job, cache_policy::get_cache_policy, cache_policy::get_rate_limit_policy,
        // @generate: paths
    ),
    components(schemas(ErrorBody)),
    modifiers(&BearerAuth, &IdempotencyKeys, &RateLimitResponses, &ExtractorErrors),
    tags(
        (name = "auth", description = "Register, log in, log out, sessions"),
        (name = "users", description = "The signed-in user"),
        (name = "workspaces", description = "Workspaces and members"),
        (name = "projects"), (name = "tasks"), (name = "metrics", description = "Daily task metrics"),
        (name = "events", description = "A workspace's changes as Server-Sent Events"),
        (name = "health", description = "Liveness, readiness, components"),
        (name = "admin", description = "Operator endpoints (ADMIN_TOKEN or a user with the admin role)"),
        (name = "cache", description = "The TTL table and the rate-limit policies in force"),
        // @generate: tags
    )
)]
pub struct ApiDoc;

/// The methods the document lists for a route pattern (`GET, PATCH, DELETE`), for the `Allow`
/// header of a 405: the document is where every route is declared, so the two cannot differ.
pub fn allowed_methods(pattern: &str) -> &'static str {
    use std::collections::HashMap;
    use std::sync::OnceLock;
    static ALLOWED: OnceLock<HashMap<String, String>> = OnceLock::new();
    let allowed = ALLOWED.get_or_init(|| {
        let document = serde_json::to_value(ApiDoc::openapi()).expect("the document serializes");
        let paths = document["paths"].as_object().cloned().unwrap_or_default();
        paths
            .into_iter()
            .map(|(path, operations)| {
                let methods: Vec<String> = operations
                    .as_object()
                    .map(|ops| ops.keys().map(|method| method.to_uppercase()).collect())
                    .unwrap_or_default();
                (path, methods.join(", "))
            })
            .collect()
    });
    allowed.get(pattern).map_or("", String::as_str)
}

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

/// Every operation of a path.
fn operations_mut(item: &mut utoipa::openapi::PathItem) -> impl Iterator<Item = &mut utoipa::openapi::path::Operation> {
    [
        &mut item.get,
        &mut item.post,
        &mut item.put,
        &mut item.patch,
        &mut item.delete,
    ]
    .into_iter()
    .flatten()
}

/// The answers the extractors and the auth guard give before a handler runs, documented where
/// they apply: 400 for a malformed path or query parameter or body, 413 and 415 for a body too
/// large or not JSON, 401 for a protected operation without a valid token.
struct ExtractorErrors;

impl Modify for ExtractorErrors {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::path::ParameterIn;
        use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
        let error = |description: &str| {
            let body = ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build();
            RefOr::T(
                ResponseBuilder::new()
                    .description(description)
                    .content("application/json", body)
                    .build(),
            )
        };
        for item in openapi.paths.paths.values_mut() {
            for operation in operations_mut(item) {
                let parameters = operation.parameters.as_deref().unwrap_or_default();
                let in_path_or_query = parameters
                    .iter()
                    .any(|p| matches!(p.parameter_in, ParameterIn::Path | ParameterIn::Query));
                let has_body = operation.request_body.is_some();
                let protected = operation.security.as_ref().is_some_and(|s| !s.is_empty());
                let responses = &mut operation.responses.responses;
                let mut document = |status: &str, description: &str| {
                    responses.entry(status.to_owned()).or_insert_with(|| error(description));
                };
                if in_path_or_query || has_body {
                    document("400", "A malformed parameter or body, or a value out of bounds");
                }
                if has_body {
                    document("413", "The body is larger than the limit");
                    document("415", "The body is not sent as application/json");
                }
                if protected {
                    document("401", "No valid bearer token");
                }
            }
        }
    }
}

/// The operations wrapped in `Idempotent` (`infra::idempotency`): the creating POSTs and every
/// PATCH. A test sends each documented one an invalid key, and every other operation too, so
/// this list and the routes cannot drift apart.
pub const IDEMPOTENT_OPERATIONS: &[&str] = &[
    "create_workspace",
    "update_workspace",
    "add_member",
    "create_project",
    "update_project",
    "create_task",
    "update_task",
    "update_me",
    // @generate: idempotent
];

/// The `Idempotency-Key` header, and the answers it adds: 409 while the key's first request is
/// running (`Retry-After`), 422 for the key reused with another request, and
/// `Idempotent-Replayed` on a replayed answer.
struct IdempotencyKeys;

impl Modify for IdempotencyKeys {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use crate::infra::idempotency::{HEADER, MAX_KEY_LENGTH, REPLAYED_HEADER};
        use utoipa::openapi::header::HeaderBuilder;
        use utoipa::openapi::path::{ParameterBuilder, ParameterIn};
        use utoipa::openapi::{ContentBuilder, ObjectBuilder, Ref, RefOr, Required, ResponseBuilder, Type};
        let key = ParameterBuilder::new()
            .name(HEADER)
            .parameter_in(ParameterIn::Header)
            .required(Required::False)
            .description(Some(
                "Makes the write safe to retry: the first answer to this key (per user) is replayed for \
                 IDEMPOTENCY_TTL (24 h by default) with `Idempotent-Replayed: true`",
            ))
            .schema(Some(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .min_length(Some(1))
                    .max_length(Some(MAX_KEY_LENGTH))
                    .pattern(Some("^[ -~]+$")),
            ))
            .build();
        let error = |description: &str| {
            ResponseBuilder::new().description(description).content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
        };
        let header = |description: &str, kind: Type| {
            HeaderBuilder::new()
                .schema(ObjectBuilder::new().schema_type(kind))
                .description(Some(description))
                .build()
        };
        const IN_FLIGHT: &str =
            "A request with this Idempotency-Key is still running: retry after `Retry-After` seconds \
                                 (`idempotency_key_in_flight`)";
        for item in openapi.paths.paths.values_mut() {
            for operation in operations_mut(item) {
                let idempotent = operation
                    .operation_id
                    .as_deref()
                    .is_some_and(|id| IDEMPOTENT_OPERATIONS.contains(&id));
                if !idempotent {
                    continue;
                }
                operation.parameters.get_or_insert_with(Vec::new).push(key.clone());
                let responses = &mut operation.responses.responses;
                for (status, response) in responses.iter_mut() {
                    if let (true, RefOr::T(response)) = (status.starts_with('2'), response) {
                        let replayed = header("`true` when this is the recorded first answer to the key", Type::String);
                        response.headers.insert(REPLAYED_HEADER.to_owned(), replayed);
                    }
                }
                let retry_after = header("Seconds to wait before retrying", Type::Integer);
                match responses.get_mut("409") {
                    // add_member documents its own 409 already: one status, both reasons.
                    Some(RefOr::T(conflict)) => {
                        conflict.description = format!("{}; or: {IN_FLIGHT}", conflict.description);
                        conflict.headers.insert("Retry-After".to_owned(), retry_after);
                    }
                    _ => {
                        let in_flight = error(IN_FLIGHT).header("Retry-After", retry_after).build();
                        responses.insert("409".to_owned(), RefOr::T(in_flight));
                    }
                }
                let reused =
                    "This Idempotency-Key was used with another method, path or body (`idempotency_key_reused`)";
                responses.insert("422".to_owned(), RefOr::T(error(reused).build()));
            }
        }
    }
}

/// Every `/api` operation is rate limited: each response carries the RateLimit headers, and each
/// operation may answer 429 with `Retry-After` (`infra::rate_limit`).
struct RateLimitResponses;

impl Modify for RateLimitResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::header::HeaderBuilder;
        use utoipa::openapi::{ContentBuilder, ObjectBuilder, Ref, RefOr, ResponseBuilder, Type};
        let header = |description: &str, kind: Type| {
            HeaderBuilder::new()
                .schema(ObjectBuilder::new().schema_type(kind))
                .description(Some(description))
                .build()
        };
        let rate_limit_headers = [
            (
                "RateLimit-Policy",
                "Every quota of the route: \"name\";q=<limit>;w=<window s>",
                Type::String,
            ),
            (
                "RateLimit",
                "The tightest quota: \"name\";r=<remaining>;t=<s until full>",
                Type::String,
            ),
            ("X-RateLimit-Limit", "Limit of the tightest quota", Type::Integer),
            ("X-RateLimit-Remaining", "Requests left in it", Type::Integer),
            ("X-RateLimit-Reset", "Seconds until it is full again", Type::Integer),
        ];
        for (path, item) in openapi.paths.paths.iter_mut() {
            if !path.starts_with("/api/") {
                continue;
            }
            for operation in operations_mut(item) {
                let responses = &mut operation.responses.responses;
                for response in responses.values_mut() {
                    if let RefOr::T(response) = response {
                        for (name, description, kind) in &rate_limit_headers {
                            response
                                .headers
                                .insert((*name).to_owned(), header(description, kind.clone()));
                        }
                    }
                }
                let mut too_many = ResponseBuilder::new()
                    .description("Rate limited: retry after `Retry-After` seconds")
                    .content(
                        "application/json",
                        ContentBuilder::new()
                            .schema(Some(Ref::from_schema_name("ErrorBody")))
                            .build(),
                    )
                    .header("Retry-After", header("Seconds to wait before retrying", Type::Integer));
                for (name, description, kind) in &rate_limit_headers {
                    too_many = too_many.header(*name, header(description, kind.clone()));
                }
                responses.insert("429".to_owned(), RefOr::T(too_many.build()));
            }
        }
    }
}
