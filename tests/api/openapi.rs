use crate::helpers::TestApp;
use reqwest::Method;

/// Every handler in the controllers, as (method, path) from its `#[utoipa::path(...)]`. A handler
/// without one fails here: routes are mounted in `configure` functions, so the annotation is the
/// only place a handler's method and path are written next to it.
fn annotated_handlers() -> Vec<(String, String)> {
    let mut routes = Vec::new();
    let modules = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/modules");
    for entry in std::fs::read_dir(modules).unwrap() {
        let path = entry.unwrap().path();
        let controller = if path.is_dir() {
            path.join("controller.rs")
        } else {
            path
        };
        let Ok(source) = std::fs::read_to_string(&controller) else {
            continue;
        };
        let mut annotation: Option<(String, String)> = None;
        let mut in_annotation = false;
        for line in source.lines().map(str::trim) {
            in_annotation |= line.starts_with("#[utoipa::path(");
            if let Some((method, rest)) = line.split_once(", path = \"").filter(|_| in_annotation) {
                let method = method.trim_start_matches("#[utoipa::path(").trim();
                annotation = Some((method.to_owned(), rest.split('"').next().unwrap().to_owned()));
                in_annotation = false;
            }
            if line.starts_with("pub async fn ") {
                let handler = line.trim_start_matches("pub async fn ").split('(').next().unwrap();
                let route = annotation
                    .take()
                    .unwrap_or_else(|| panic!("{}: handler {handler} has no #[utoipa::path]", controller.display()));
                routes.push(route);
            }
        }
    }
    routes
}

#[tokio::test]
async fn every_handler_is_documented_in_openapi() {
    let app = TestApp::spawn().await;
    let response = app.request(Method::GET, "/api-docs/openapi.json", None, None).await;
    response.assert_status(200);
    let paths = &response.body["paths"];
    let routes = annotated_handlers();
    assert!(
        routes.len() >= 28,
        "found only {} routes: is the scan broken?",
        routes.len()
    );
    for (method, path) in routes {
        let operation = &paths[&path][&method];
        assert!(
            operation.is_object(),
            "{} {path} is not in the OpenAPI document",
            method.to_uppercase()
        );
        assert!(
            operation["operationId"].is_string(),
            "{method} {path} has no operationId"
        );
        let protected =
            path.starts_with("/api/") && !path.starts_with("/api/auth/register") && path != "/api/auth/login";
        if protected || path.starts_with("/admin/") {
            assert!(
                operation["security"].is_array(),
                "{method} {path} does not declare its security"
            );
            assert!(
                operation["responses"]["401"].is_object(),
                "{method} {path} does not document 401"
            );
        }
    }
    assert_eq!(
        response.body["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    assert!(response.body["components"]["schemas"]["ErrorBody"].is_object());
}

#[tokio::test]
async fn swagger_ui_is_served_at_docs() {
    let app = TestApp::spawn().await;
    let response = app.client.get(app.url("/docs/")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.text().await.unwrap().contains("swagger"), "Swagger UI page");
    let redirect = app.request(Method::GET, "/docs", None, None).await;
    assert!(redirect.status.is_success(), "/docs redirects to the UI");
}

/// The document's paths, each with its operations keyed by lower-case method.
async fn documented_paths(app: &TestApp) -> serde_json::Map<String, serde_json::Value> {
    let document = app
        .request(Method::GET, "/api-docs/openapi.json", None, None)
        .await
        .body;
    document["paths"].as_object().unwrap().clone()
}

/// `/api/tasks/{id}` → `/api/tasks/<random uuid>`.
fn with_random_ids(path: &str) -> String {
    path.split('/')
        .map(|segment| {
            if segment.starts_with('{') {
                uuid::Uuid::new_v4().to_string()
            } else {
                segment.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// The other direction: every documented operation is mounted (a handler defined but never passed
/// to `service(...)` would answer `route_not_found`).
#[tokio::test]
async fn every_documented_operation_is_mounted() {
    let app = TestApp::spawn().await;
    let mut checked = 0;
    for (path, operations) in documented_paths(&app).await {
        let concrete = with_random_ids(&path);
        for method in operations.as_object().unwrap().keys() {
            let method: Method = method.to_uppercase().parse().unwrap();
            let response = app.request(method.clone(), &concrete, None, None).await;
            assert_ne!(
                response.body["code"], "route_not_found",
                "{method} {path} is documented but not mounted"
            );
            checked += 1;
        }
    }
    assert!(checked >= 36, "checked only {checked} operations");
}

/// The routing table mounts one resource per path with all its methods: a method the document
/// does not list answers 405 with the envelope (an undocumented route would answer otherwise)
/// and, as RFC 9110 requires, an `Allow` header naming exactly the documented methods.
#[tokio::test]
async fn methods_a_documented_path_does_not_list_answer_405_with_allow() {
    let app = TestApp::spawn().await;
    let mut checked = 0;
    for (path, operations) in documented_paths(&app).await {
        let concrete = with_random_ids(&path);
        let mut documented: Vec<String> = operations
            .as_object()
            .unwrap()
            .keys()
            .map(|m| m.to_uppercase())
            .collect();
        documented.sort();
        for method in [
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
            Method::HEAD,
        ] {
            if operations.get(method.as_str().to_lowercase()).is_some() {
                continue;
            }
            let response = app.request(method.clone(), &concrete, None, None).await;
            assert_eq!(response.status, 405, "{method} {path}: {}", response.text);
            if method != Method::HEAD {
                assert_eq!(response.body["code"], "method_not_allowed", "{method} {path}");
            }
            let mut allowed: Vec<String> = response
                .header("allow")
                .unwrap_or_else(|| panic!("{method} {path}: 405 without Allow"))
                .split(',')
                .map(|m| m.trim().to_owned())
                .collect();
            allowed.sort();
            assert_eq!(allowed, documented, "{method} {path}");
            checked += 1;
        }
    }
    assert!(checked >= 90, "checked only {checked} methods");
}

/// Every `/api` operation is behind a rate-limit policy: its responses carry the RateLimit headers
/// (whatever the status) and the document lists its 429 with `Retry-After`; health, metrics and
/// docs carry none.
#[tokio::test]
async fn every_api_operation_is_rate_limited_and_documents_429() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;
    let mut checked = 0;
    for (path, operations) in documented_paths(&app).await {
        let concrete = with_random_ids(&path);
        for (method, operation) in operations.as_object().unwrap() {
            let method: Method = method.to_uppercase().parse().unwrap();
            let body = (method != Method::GET).then(|| serde_json::json!({}));
            let response = app.request(method.clone(), &concrete, Some(&user.token), body).await;
            let limited = path.starts_with("/api/");
            for header in [
                "ratelimit-policy",
                "ratelimit",
                "x-ratelimit-limit",
                "x-ratelimit-remaining",
                "x-ratelimit-reset",
            ] {
                assert_eq!(
                    response.header(header).is_some(),
                    limited,
                    "{method} {path} ({}): {header}",
                    response.status
                );
            }
            let documented = &operation["responses"]["429"];
            assert_eq!(documented.is_object(), limited, "{method} {path}: 429 documented");
            if limited {
                assert!(documented["headers"]["Retry-After"].is_object(), "{method} {path}");
                assert!(
                    operation["responses"]["200"]["headers"]["RateLimit"].is_object()
                        || operation["responses"]["201"]["headers"]["RateLimit"].is_object()
                        || operation["responses"]["204"]["headers"]["RateLimit"].is_object(),
                    "{method} {path}: RateLimit on the success response"
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 36, "checked only {checked} operations");
}

/// What the extractors and guards answer before any handler runs is in the document: a malformed
/// path id (400), a body that is not JSON (415) or too large (413), no token (401). Each is
/// provoked on every operation it applies to, and its status must be listed there.
#[tokio::test]
async fn every_status_the_extractors_give_is_documented() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;
    let mut checked = 0;
    for (path, operations) in documented_paths(&app).await {
        for (method, operation) in operations.as_object().unwrap() {
            let documented = |status: u16| operation["responses"].get(status.to_string()).is_some();
            let method: Method = method.to_uppercase().parse().unwrap();
            let mut provoked = Vec::new();
            if path.contains('{') {
                let malformed = path
                    .split('/')
                    .map(|s| if s.starts_with('{') { "not-an-id" } else { s })
                    .collect::<Vec<_>>()
                    .join("/");
                let request = app
                    .client
                    .request(method.clone(), app.url(&malformed))
                    .bearer_auth(&user.token);
                provoked.push(("malformed id", request));
            }
            if operation.get("requestBody").is_some() {
                let concrete = with_random_ids(&path);
                let request = app
                    .client
                    .request(method.clone(), app.url(&concrete))
                    .bearer_auth(&user.token);
                provoked.push(("text body", request.header("Content-Type", "text/plain").body("{}")));
                let request = app
                    .client
                    .request(method.clone(), app.url(&concrete))
                    .bearer_auth(&user.token);
                let huge = format!(r#"{{"name":"{}"}}"#, "x".repeat(80 * 1024));
                provoked.push((
                    "huge body",
                    request.header("Content-Type", "application/json").body(huge),
                ));
            }
            if operation.get("security").is_some() {
                let concrete = with_random_ids(&path);
                provoked.push(("no token", app.client.request(method.clone(), app.url(&concrete))));
            }
            for (what, request) in provoked {
                let status = request.send().await.expect("sent").status().as_u16();
                assert!(
                    documented(status),
                    "{method} {path} with a {what} answers {status}, not documented"
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 60, "checked only {checked} cases");
}

/// One validator rule on a DTO field, read from the source: (struct, field in camelCase, rule).
#[derive(Debug)]
enum Rule {
    Length { min: Option<u64>, max: Option<u64> },
    Range { min: Option<i64>, max: Option<i64> },
    NotBlank,
    NoNul,
}

/// `not_blank` as a pattern: no NUL, and one character that Rust's `trim` keeps (its whitespace
/// spelled out, so that every regex dialect agrees).
const NOT_BLANK: &str =
    r"^[^\u0000]*[^\u0000\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000][^\u0000]*$";
/// `no_nul` as a pattern.
const NO_NUL: &str = r"^[^\u0000]*$";

/// `name = 12` inside `text`, e.g. `max` in `length(min = 1, max = 200)`.
fn bound(text: &str, name: &str) -> Option<i64> {
    let at = text.find(&format!("{name} = "))? + name.len() + 3;
    let digits: String = text[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '-')
        .collect();
    digits.parse().ok()
}

fn validator_rules() -> Vec<(String, String, Rule)> {
    let mut rules = Vec::new();
    for entry in glob_dto_files() {
        let source = std::fs::read_to_string(&entry).unwrap();
        let (mut strukt, mut pending) = (String::new(), Vec::<String>::new());
        for line in source.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("pub struct ") {
                strukt = rest
                    .split(|c: char| !c.is_alphanumeric() && c != '_')
                    .next()
                    .unwrap()
                    .to_owned();
            } else if line.starts_with("#[validate(") {
                pending.push(line.to_owned());
            } else if let Some(rest) = line.strip_prefix("pub ").filter(|rest| rest.contains(':')) {
                let field = nestling::error::camel_case(rest.split(':').next().unwrap());
                for validate in pending.drain(..) {
                    if let Some(at) = validate.find("length(") {
                        let args = &validate[at..validate[at..].find(')').unwrap() + at];
                        let (min, max) = (
                            bound(args, "min").map(|n| n as u64),
                            bound(args, "max").map(|n| n as u64),
                        );
                        rules.push((strukt.clone(), field.clone(), Rule::Length { min, max }));
                    }
                    if let Some(at) = validate.find("range(") {
                        let args = &validate[at..validate[at..].find(')').unwrap() + at];
                        let rule = Rule::Range {
                            min: bound(args, "min"),
                            max: bound(args, "max"),
                        };
                        rules.push((strukt.clone(), field.clone(), rule));
                    }
                    if validate.contains("\"not_blank\"") {
                        rules.push((strukt.clone(), field.clone(), Rule::NotBlank));
                    } else if validate.contains("\"no_nul\"") {
                        rules.push((strukt.clone(), field.clone(), Rule::NoNul));
                    }
                }
            }
        }
    }
    rules
}

fn glob_dto_files() -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for module in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/src/modules")).unwrap() {
        let dto = module.unwrap().path().join("dto.rs");
        if dto.exists() {
            files.push(dto);
        }
    }
    files
}

/// The schemas every field named `field` of `strukt` has in the document: the component's
/// property, or each operation parameter of that name when the struct is a set of parameters.
fn documented_schemas(document: &serde_json::Value, strukt: &str, field: &str) -> Vec<serde_json::Value> {
    if let Some(property) = document.pointer(&format!("/components/schemas/{strukt}/properties/{field}")) {
        return vec![property.clone()];
    }
    let mut found = Vec::new();
    for operations in document["paths"].as_object().unwrap().values() {
        for operation in operations.as_object().unwrap().values() {
            for parameter in operation["parameters"].as_array().into_iter().flatten() {
                if parameter["name"] == field {
                    found.push(parameter["schema"].clone());
                }
            }
        }
    }
    found
}

/// Every bound `validator` enforces on a request field is declared in the OpenAPI document
/// (minLength/maxLength, minimum/maximum, patterns for "not blank" and "no NUL"), so a client or a
/// fuzzer that follows the document is never refused for a rule it could not see. Utoipa takes
/// only literals in these attributes, so the two are written side by side and this test keeps
/// them equal.
#[test]
fn every_validator_bound_is_declared_in_the_schema() {
    use utoipa::OpenApi;
    let document = serde_json::to_value(nestling::openapi::ApiDoc::openapi()).unwrap();
    let rules = validator_rules();
    assert!(rules.len() >= 20, "found only {} rules", rules.len());
    for (strukt, field, rule) in rules {
        let schemas = documented_schemas(&document, &strukt, &field);
        assert!(!schemas.is_empty(), "{strukt}.{field} is not in the document");
        for schema in schemas {
            let number = |key: &str| schema.get(key).and_then(|v| v.as_i64());
            let what = format!("{strukt}.{field}: {rule:?} vs {schema}");
            match rule {
                Rule::Length { min, max } => {
                    assert_eq!(number("minLength").map(|n| n as u64), min.filter(|m| *m > 0), "{what}");
                    assert_eq!(number("maxLength").map(|n| n as u64), max, "{what}");
                }
                Rule::Range { min, max } => {
                    assert_eq!((number("minimum"), number("maximum")), (min, max), "{what}");
                }
                Rule::NotBlank => assert_eq!(schema["pattern"], NOT_BLANK, "{what}"),
                Rule::NoNul => assert_eq!(schema["pattern"], NO_NUL, "{what}"),
            }
        }
    }
}

/// serde reads a struct from a JSON array as readily as from an object, so `["x"]` once created
/// a workspace. Every operation with a body refuses anything but an object, before any change.
#[tokio::test]
async fn a_body_that_is_not_a_json_object_is_400_everywhere_and_changes_nothing() {
    const ADMIN: &str = "test-admin-token";
    let app = TestApp::builder()
        .settings(|s| s.app.admin_token = Some(ADMIN.into()))
        .spawn()
        .await;
    let world = crate::helpers::World::create(&app).await;
    let before = app.fingerprint().await;
    let mut checked = 0;
    for (path, operations) in documented_paths(&app).await {
        for (method, operation) in operations.as_object().unwrap() {
            if operation.get("requestBody").is_none() {
                continue;
            }
            let token = if path.starts_with("/admin") {
                ADMIN
            } else {
                world.user.token.as_str()
            };
            let concrete = world.fill(&path.replace("{id}", "{ws}"));
            let concrete = if path.starts_with("/api/projects/") {
                world.fill(&path.replace("{id}", "{project}"))
            } else {
                concrete
            };
            let concrete = if path.starts_with("/api/tasks/") {
                world.fill(&path.replace("{id}", "{task}"))
            } else {
                concrete
            };
            for body in [
                serde_json::json!(["Array"]),
                serde_json::json!([null, null]),
                serde_json::json!("text"),
                serde_json::json!(7),
            ] {
                let method: Method = method.to_uppercase().parse().unwrap();
                let response = app
                    .request(method.clone(), &concrete, Some(token), Some(body.clone()))
                    .await;
                assert_eq!(response.status, 400, "{method} {path} with {body}: {}", response.text);
                checked += 1;
            }
        }
    }
    assert!(checked >= 40, "checked only {checked}");
    assert_eq!(
        app.fingerprint().await,
        before,
        "a request with a non-object body changed data"
    );
}
