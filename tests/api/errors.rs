//! One JSON envelope on every error path: bodies the JSON extractor refuses, bad path and query
//! parameters, unknown routes and methods, missing or bad tokens — each with a stable code, each
//! `application/json` with an `x-request-id`.
//!
//! The tables are `#[rustfmt::skip]`: one row per line reads as a table, one field per line not.

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use reqwest::Method;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

use crate::helpers::{into_test_response, TestApp, TestResponse, World};

/// Raw requests, which `TestApp::request` cannot send.
trait SendRaw {
    async fn send_raw(
        &self,
        app: &TestApp,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> TestResponse;
}

impl SendRaw for World {
    /// A request with raw bytes and any content type (or none), which `TestApp::request` cannot send.
    async fn send_raw(
        &self,
        app: &TestApp,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> TestResponse {
        let mut request = app
            .client
            .request(method, app.url(&self.fill(path)))
            .bearer_auth(&self.user.token);
        if let Some(content_type) = content_type {
            request = request.header(CONTENT_TYPE, content_type);
        }
        into_test_response(request.body(body.to_vec()).send().await.expect("request sent")).await
    }
}

/// The envelope, plus what every error response carries whatever produced it.
fn assert_envelope(name: &str, response: &TestResponse, status: u16, code: &str) {
    let text = &response.text;
    assert_eq!(response.status.as_u16(), status, "{name}: status: {text}");
    assert_eq!(
        response.body["statusCode"], status,
        "{name}: envelope statusCode: {text}"
    );
    assert_eq!(response.body["code"], code, "{name}: envelope code: {text}");
    assert!(response.body["error"].is_string(), "{name}: envelope error: {text}");
    assert!(response.body["message"].is_string(), "{name}: envelope message: {text}");
    assert!(
        response.body.get("details").is_some(),
        "{name}: envelope details: {text}"
    );
    let content_type = response.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("application/json"),
        "{name}: content-type is {content_type:?}"
    );
    let request_id = response.header("x-request-id").unwrap_or_default();
    assert!(!request_id.is_empty(), "{name}: no x-request-id");
}

const JSON: Option<&str> = Some("application/json");

/// name, method, path, content type, body, expected status, expected code.
type BodyCase<'a> = (&'a str, &'a Method, &'a str, Option<&'a str>, &'a [u8], u16, &'a str);

#[tokio::test]
async fn every_body_the_json_extractor_refuses_answers_with_the_envelope() {
    let app = TestApp::spawn().await;
    let world = World::create(&app).await;
    let too_large = serde_json::to_vec(&json!({ "title": "x".repeat(70 * 1024) })).unwrap();
    let (post, patch) = (Method::POST, Method::PATCH);
    let (tasks, task) = ("/api/projects/{project}/tasks", "/api/tasks/{task}");
    #[rustfmt::skip]
    let cases: [BodyCase; 17] = [
        ("body over 64 KiB",           &post,  tasks, JSON,               &too_large,                        413, "payload_too_large"),
        ("text/plain content type",    &post,  tasks, Some("text/plain"), br#"{"title":"ok"}"#,              415, "unsupported_media_type"),
        ("form content type",          &post,  tasks, Some("application/x-www-form-urlencoded"), b"title=ok", 415, "unsupported_media_type"),
        ("no content type",            &post,  tasks, None,               br#"{"title":"ok"}"#,              415, "unsupported_media_type"),
        ("malformed JSON",             &post,  tasks, JSON,               br#"{"title":"#,                   400, "malformed_json"),
        ("garbage after the JSON",     &post,  tasks, JSON,               br#"{"title":"ok"} x"#,            400, "malformed_json"),
        ("empty body",                 &post,  tasks, JSON,               b"",                               400, "malformed_json"),
        ("wrong JSON type for a field", &post, tasks, JSON,               br#"{"title": 5}"#,                400, "invalid_body"),
        ("an array, not an object",    &post,  tasks, JSON,               br#"["title"]"#,                   400, "invalid_body"),
        ("missing required field",     &post,  tasks, JSON,               br#"{}"#,                          400, "invalid_body"),
        ("unknown field",              &post,  tasks, JSON,               br#"{"title":"ok","colour":"red"}"#, 400, "invalid_body"),
        ("unknown enum value",         &patch, task,  JSON,               br#"{"status":"archived"}"#,       400, "invalid_body"),
        ("not a date",                 &patch, task,  JSON,               br#"{"dueDate":"tomorrow"}"#,      400, "invalid_body"),
        ("not a uuid in the body",     &patch, task,  JSON,               br#"{"assigneeId":"nobody"}"#,     400, "invalid_body"),
        ("a repeated key",             &post,  tasks, JSON,               br#"{"title":"a","title":"b"}"#,   400, "validation_failed"),
        ("a repeated key in a patch",  &patch, task,  JSON,               br#"{"title":"a","title":"b"}"#,   400, "validation_failed"),
        ("a repeated nested key",      &post,  tasks, JSON,               br#"{"title":"a","x":{"k":1,"k":2}}"#, 400, "validation_failed"),
    ];
    let before = app.fingerprint().await;
    for (name, method, path, content_type, body, status, code) in cases {
        let response = world.send_raw(&app, method.clone(), path, content_type, body).await;
        assert_envelope(name, &response, status, code);
    }
    assert_eq!(before, app.fingerprint().await, "a refused body changed the database");
}

/// Without `Content-Length` the limit can only be enforced while reading: still 413, still the envelope.
#[tokio::test]
async fn a_chunked_body_over_64_kib_is_refused_with_413_while_streaming() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", app.port)).await.unwrap();
    let head = format!(
        "POST /api/workspaces HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        user.token
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let chunk = [b' '; 8192];
    for _ in 0..10 {
        // The server may answer and stop reading before the last chunk: that is what is tested.
        let written = async {
            stream.write_all(format!("{:x}\r\n", chunk.len()).as_bytes()).await?;
            stream.write_all(&chunk).await?;
            stream.write_all(b"\r\n").await
        };
        if written.await.is_err() {
            break;
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer).to_lowercase();
    assert!(answer.starts_with("http/1.1 413"), "{answer}");
    assert!(answer.contains("content-type: application/json"), "{answer}");
    assert!(answer.contains("x-request-id: "), "{answer}");
    assert!(answer.contains(r#""code":"payload_too_large""#), "{answer}");
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM workspaces")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(count, 0, "nothing was created");
}

#[tokio::test]
async fn bad_path_and_query_parameters_answer_400_with_the_envelope() {
    let app = TestApp::spawn().await;
    let world = World::create(&app).await;
    let metrics = "/api/workspaces/{ws}/metrics/daily";
    let any_uuid = Uuid::new_v4();
    #[rustfmt::skip]
    let cases = [
        ("not a uuid",                  Method::GET,    "/api/projects/not-a-uuid".to_owned(),                   "invalid_path"),
        ("a number for a uuid",         Method::GET,    "/api/tasks/123".to_owned(),                             "invalid_path"),
        ("a uuid with one char more",   Method::GET,    "/api/workspaces/{ws}x".to_owned(),                      "invalid_path"),
        ("a bad second path parameter", Method::DELETE, "/api/workspaces/{ws}/members/me".to_owned(),            "invalid_path"),
        ("limit is not a number",       Method::GET,    "/api/projects/{project}/tasks?limit=abc".to_owned(),    "invalid_query"),
        ("unknown status",              Method::GET,    "/api/projects/{project}/tasks?status=archived".to_owned(), "invalid_query"),
        ("unknown parameter",           Method::GET,    "/api/projects/{project}/tasks?colour=red".to_owned(),   "invalid_query"),
        ("assignee is not a uuid",      Method::GET,    "/api/users/me/tasks?assigneeId=me".to_owned(),          "invalid_query"),
        ("assignee on my own tasks",    Method::GET,    format!("/api/users/me/tasks?assigneeId={any_uuid}"),    "invalid_query"),
        ("metrics date is not a date",  Method::GET,    format!("{metrics}?from=yesterday&to=2026-01-01"),       "invalid_query"),
        ("metrics without a range",     Method::GET,    metrics.to_owned(),                                      "invalid_query"),
        ("limit out of range",          Method::GET,    "/api/projects/{project}/tasks?limit=0".to_owned(),      "validation_failed"),
        ("metrics range reversed",      Method::GET,    format!("{metrics}?from=2026-02-01&to=2026-01-01"),      "validation_failed"),
    ];
    for (name, method, path, code) in cases {
        let response = app
            .request(method, &world.fill(&path), Some(&world.user.token), None)
            .await;
        assert_envelope(name, &response, 400, code);
    }
}

/// Postgres cannot store NUL: every free-text field must refuse it up front (400, not a 500 from
/// the driver) and nothing may be written.
#[tokio::test]
async fn a_nul_character_in_any_text_field_is_a_400_and_nothing_is_stored() {
    let app = TestApp::spawn().await;
    let world = World::create(&app).await;
    let nul = "bad\u{0}text";
    let (post, patch) = (Method::POST, Method::PATCH);
    #[rustfmt::skip]
    let signed_in = [
        ("workspace name",          &post,  "/api/workspaces",               json!({ "name": nul }),                     "name"),
        ("workspace rename",        &patch, "/api/workspaces/{ws}",          json!({ "name": nul }),                     "name"),
        ("member email",            &post,  "/api/workspaces/{ws}/members",  json!({ "email": nul }),                    "email"),
        ("project name",            &post,  "/api/workspaces/{ws}/projects", json!({ "name": nul }),                     "name"),
        ("project description",     &post,  "/api/workspaces/{ws}/projects", json!({ "name": "ok", "description": nul }), "description"),
        ("project rename",          &patch, "/api/projects/{project}",       json!({ "name": nul }),                     "name"),
        ("project new description", &patch, "/api/projects/{project}",       json!({ "description": nul }),              "description"),
        ("task title",              &post,  "/api/projects/{project}/tasks", json!({ "title": nul }),                    "title"),
        ("task description",        &post,  "/api/projects/{project}/tasks", json!({ "title": "ok", "description": nul }), "description"),
        ("task retitle",            &patch, "/api/tasks/{task}",             json!({ "title": nul }),                    "title"),
        ("task new description",    &patch, "/api/tasks/{task}",             json!({ "description": nul }),              "description"),
        ("my name",                 &patch, "/api/users/me",                 json!({ "name": nul }),                     "name"),
    ];
    #[rustfmt::skip]
    let anonymous = [
        ("register name",     "/api/auth/register", json!({ "email": "nul@example.com", "password": "long enough", "name": nul }), "name"),
        ("register password", "/api/auth/register", json!({ "email": "nul@example.com", "password": "long\u{0}enough", "name": "N" }), "password"),
        ("login email",       "/api/auth/login",    json!({ "email": nul, "password": "whatever" }),                          "email"),
    ];
    let before = app.fingerprint().await;
    let token = Some(world.user.token.as_str());
    let requests = signed_in
        .into_iter()
        .map(|(name, method, path, body, field)| (name, method.clone(), world.fill(path), token, body, field));
    let requests = requests.chain(
        anonymous
            .into_iter()
            .map(|(name, path, body, field)| (name, Method::POST, path.to_owned(), None, body, field)),
    );
    for (name, method, path, token, body, field) in requests {
        let response = app.request(method, &path, token, Some(body)).await;
        assert_envelope(name, &response, 400, "validation_failed");
        assert!(
            response.body["details"][field].is_array(),
            "{name}: details name {field}: {}",
            response.text
        );
    }
    assert_eq!(
        before,
        app.fingerprint().await,
        "a refused request changed the database"
    );
}

/// chrono parses years down to -262143, Postgres stores dates from 4714 BC only: a date in between
/// is the client's mistake (400), not a database failure (500).
#[tokio::test]
async fn a_date_postgres_cannot_store_is_a_400_not_a_500() {
    let app = TestApp::spawn().await;
    let world = World::create(&app).await;
    #[rustfmt::skip]
    let cases = [
        ("a new task due in 4800 BC", Method::POST,  "/api/projects/{project}/tasks", Some(json!({ "title": "ok", "dueDate": "-4800-01-01" }))),
        ("a task moved to 4800 BC",   Method::PATCH, "/api/tasks/{task}",             Some(json!({ "dueDate": "-4800-01-01" }))),
        ("metrics for 4800 BC",       Method::GET,   "/api/workspaces/{ws}/metrics/daily?from=-4800-01-01&to=-4800-01-31", None),
    ];
    let before = app.fingerprint().await;
    for (name, method, path, body) in cases {
        let response = app
            .request(method, &world.fill(path), Some(&world.user.token), body)
            .await;
        let code = response.body["code"].as_str().unwrap_or_default().to_owned();
        assert_envelope(name, &response, 400, &code);
        assert!(
            ["validation_failed", "invalid_body", "invalid_query", "invalid_date"].contains(&code.as_str()),
            "{name}: {code}"
        );
    }
    assert_eq!(
        before,
        app.fingerprint().await,
        "a refused request changed the database"
    );
}

#[tokio::test]
async fn unknown_routes_answer_404_route_not_found_with_or_without_a_token() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;
    let id = Uuid::new_v4();
    let paths = [
        "/api/nowhere".to_owned(),
        "/nowhere".to_owned(),
        "/api".to_owned(),
        format!("/api/workspaces/{id}/nowhere"),
    ];
    for path in &paths {
        let anonymous = app.request(Method::GET, path, None, None).await;
        assert_envelope(
            &format!("GET {path} without a token"),
            &anonymous,
            404,
            "route_not_found",
        );
        let signed_in = app.get(path, &user.token).await;
        assert_envelope(&format!("GET {path} with a token"), &signed_in, 404, "route_not_found");
        assert_eq!(anonymous.body, signed_in.body, "GET {path}: a token changes nothing");
    }
}

/// Whether a wrong method is a 404 (no route matched) or a 405, the answer is the envelope.
#[tokio::test]
async fn a_wrong_method_on_a_known_path_answers_with_the_envelope() {
    let app = TestApp::spawn().await;
    let world = World::create(&app).await;
    #[rustfmt::skip]
    let cases = [
        (Method::PUT,    "/api/workspaces"),
        (Method::DELETE, "/api/workspaces"),
        (Method::PUT,    "/api/tasks/{task}"),
        (Method::POST,   "/api/tasks/{task}"),
        (Method::POST,   "/api/users/me"),
        (Method::GET,    "/api/auth/login"),
    ];
    for (method, path) in cases {
        let name = format!("{method} {path}");
        let response = app
            .request(method, &world.fill(path), Some(&world.user.token), Some(json!({})))
            .await;
        let status = response.status.as_u16();
        let code = match status {
            404 => "route_not_found",
            405 => "method_not_allowed",
            other => panic!("{name}: status {other}: {}", response.text),
        };
        assert_envelope(&name, &response, status, code);
    }
    app.get(&world.fill("/api/tasks/{task}"), &world.user.token)
        .await
        .assert_status(200);
}

#[tokio::test]
async fn missing_or_bad_tokens_answer_401_with_the_envelope_and_a_bearer_challenge() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;
    let revoked = app.login(&user.email, &user.password).await;
    app.request(Method::POST, "/api/auth/logout", Some(&revoked), None)
        .await
        .assert_status(204);
    let revoked = format!("Bearer {revoked}");
    let well_formed_unknown = format!("Bearer {}", "ab".repeat(32));
    #[rustfmt::skip]
    let cases = [
        ("no Authorization header",      None,                               "missing_token"),
        ("an empty bearer token",        Some("Bearer "),                    "missing_token"),
        ("a Basic credential",           Some("Basic dXNlcjpwYXNz"),         "missing_token"),
        ("a token without the scheme",   Some(user.token.as_str()),          "missing_token"),
        ("a garbage token",              Some("Bearer not-a-token"),         "invalid_token"),
        ("a well-formed unknown token",  Some(well_formed_unknown.as_str()), "invalid_token"),
        ("a logged-out token",           Some(revoked.as_str()),             "invalid_token"),
    ];
    for path in ["/api/users/me", "/api/workspaces"] {
        for (name, header, code) in cases {
            let mut request = app.client.get(app.url(path));
            if let Some(header) = header {
                request = request.header(AUTHORIZATION, header);
            }
            let response = into_test_response(request.send().await.unwrap()).await;
            let name = format!("GET {path} with {name}");
            assert_envelope(&name, &response, 401, code);
            assert_eq!(response.header("www-authenticate"), Some("Bearer"), "{name}");
        }
    }
}

/// Without a token nothing else about the request is looked at: the answer is 401 whatever else is wrong.
#[tokio::test]
async fn a_missing_token_wins_over_every_other_fault_of_the_request() {
    let app = TestApp::spawn().await;
    #[rustfmt::skip]
    let cases: [(&str, &str, Option<&str>, &[u8]); 4] = [
        ("malformed JSON",       "/api/workspaces",                     JSON,               br#"{"name":"#),
        ("wrong content type",   "/api/workspaces",                     Some("text/plain"), b"name"),
        ("bad uuid in the path", "/api/workspaces/not-a-uuid/projects", JSON,               br#"{"name":"ok"}"#),
        ("unknown field",        "/api/workspaces",                     JSON,               br#"{"name":"ok","x":1}"#),
    ];
    for (name, path, content_type, body) in cases {
        let mut request = app.client.post(app.url(path)).body(body.to_vec());
        if let Some(content_type) = content_type {
            request = request.header(CONTENT_TYPE, content_type);
        }
        let response = into_test_response(request.send().await.unwrap()).await;
        assert_envelope(name, &response, 401, "missing_token");
    }
}

/// A driver error with internal detail in it, which a real Postgres cannot be made to produce on
/// demand: the one place a component is swapped (`with_component_override`, the NestJS
/// `overrideProvider`). The body is the generic envelope; the detail only reaches the log.
#[tokio::test]
async fn a_server_error_answers_with_a_generic_body_that_leaks_nothing() {
    use nestling::modules::metrics::dto::DailyMetric;
    use nestling::modules::metrics::repository::MetricsRepository;

    struct BrokenMetrics;
    #[async_trait::async_trait]
    impl MetricsRepository for BrokenMetrics {
        async fn daily(
            &self,
            _: Uuid,
            _: chrono::NaiveDate,
            _: chrono::NaiveDate,
        ) -> Result<Vec<DailyMetric>, sqlx::Error> {
            Err(sqlx::Error::ColumnNotFound("secret_internal_column".into()))
        }

        async fn rebuild(
            &self,
            _: Uuid,
            _: nestling::infra::locks::Fence,
        ) -> Result<nestling::modules::metrics::repository::Rebuild, sqlx::Error> {
            Err(sqlx::Error::ColumnNotFound("secret_internal_column".into()))
        }
    }

    let app = TestApp::builder()
        .module(|module| module.with_component_override::<dyn MetricsRepository>(Box::new(BrokenMetrics)))
        .spawn()
        .await;
    let world = World::create(&app).await;
    let response = app
        .get(
            &world.fill("/api/workspaces/{ws}/metrics/daily?from=2026-01-01&to=2026-01-02"),
            &world.user.token,
        )
        .await;
    response.assert_error(500, "internal_error");
    assert_eq!(response.body["message"], "internal error");
    assert!(
        !response.text.contains("secret_internal_column"),
        "leaked: {}",
        response.text
    );
}
