//! What browsers see: CORS for pages on other origins (`CORS_ALLOWED_ORIGINS`), preflights
//! answered before authentication and rate limiting, refusals in the error envelope, and the
//! security headers on every response (HSTS in production only), `/docs` still loading.

use std::time::Duration;

use nestling::config::{AppEnv, Quota, Settings};
use reqwest::Method;

use crate::helpers::{into_test_response, TestApp, TestResponse, World};

const ORIGIN: &str = "https://app.example.com";

fn allowing(origins: &[&str]) -> impl FnOnce(&mut Settings) + 'static {
    let origins: Vec<String> = origins.iter().map(|o| o.to_string()).collect();
    move |s| s.cors.allowed_origins = origins
}

fn per_hour(limit: u64) -> Vec<Quota> {
    vec![Quota {
        limit,
        period: Duration::from_secs(3600),
    }]
}

/// `OPTIONS path` as a browser sends it before a cross-origin request: no credentials, the
/// method and headers it is about to use.
async fn preflight(app: &TestApp, path: &str, origin: &str, method: &str, headers: &str) -> TestResponse {
    let request = app
        .client
        .request(Method::OPTIONS, app.url(path))
        .header("origin", origin)
        .header("access-control-request-method", method)
        .header("access-control-request-headers", headers);
    into_test_response(request.send().await.expect("preflight sent")).await
}

async fn get_from(app: &TestApp, path: &str, origin: &str, token: &str) -> TestResponse {
    let request = app
        .client
        .get(app.url(path))
        .header("origin", origin)
        .bearer_auth(token);
    into_test_response(request.send().await.expect("request sent")).await
}

/// A comma-separated header as lower-case items.
fn items(response: &TestResponse, name: &str) -> Vec<String> {
    response
        .header(name)
        .unwrap_or_default()
        .split(',')
        .map(|item| item.trim().to_ascii_lowercase())
        .filter(|item| !item.is_empty())
        .collect()
}

fn cors_headers(response: &TestResponse) -> Vec<String> {
    response
        .headers
        .keys()
        .map(|name| name.as_str().to_owned())
        .filter(|name| name.starts_with("access-control-"))
        .collect()
}

async fn remaining(app: &TestApp, token: &str) -> u64 {
    let response = app.get("/api/users/me", token).await;
    response.assert_status(200);
    response.header("x-ratelimit-remaining").unwrap().parse().unwrap()
}

#[tokio::test]
async fn a_preflight_from_an_allowed_origin_is_answered_with_its_origin_methods_headers_and_max_age() {
    let app = TestApp::builder()
        .settings(allowing(&[ORIGIN]))
        .settings(|s| s.cors.max_age = Duration::from_secs(900))
        .spawn()
        .await;
    let world = World::create(&app).await;
    let path = world.fill("/api/tasks/{task}");
    let answer = preflight(
        &app,
        &path,
        ORIGIN,
        "PATCH",
        "authorization, content-type, if-none-match, cache-control, x-request-id, idempotency-key",
    )
    .await;
    assert!(answer.status == 200 || answer.status == 204, "{answer:?}");
    assert_eq!(answer.header("access-control-allow-origin"), Some(ORIGIN));
    let methods = items(&answer, "access-control-allow-methods");
    for method in ["get", "post", "patch", "delete"] {
        assert!(methods.contains(&method.to_owned()), "{method} in {methods:?}");
    }
    let headers = items(&answer, "access-control-allow-headers");
    for header in [
        "authorization",
        "content-type",
        "if-none-match",
        "cache-control",
        "x-request-id",
        "idempotency-key",
    ] {
        assert!(headers.contains(&header.to_owned()), "{header} in {headers:?}");
    }
    assert_eq!(answer.header("access-control-max-age"), Some("900"));
    assert_eq!(answer.header("access-control-allow-credentials"), None);
    assert!(items(&answer, "vary").contains(&"origin".to_owned()), "{answer:?}");
    // Answered inside `Edge`: the request id and the security headers are there too.
    assert!(answer.header("x-request-id").is_some(), "{answer:?}");
    assert_eq!(answer.header("x-content-type-options"), Some("nosniff"));
}

#[tokio::test]
async fn preflights_cost_no_rate_limit_token_and_need_no_credentials() {
    let app = TestApp::builder()
        .settings(allowing(&[ORIGIN]))
        .settings(|s| {
            s.rate_limit.api = per_hour(5);
            // Register and login take two; one is left.
            s.rate_limit.auth_ip = per_hour(3);
        })
        .spawn()
        .await;
    let user = app.register_user().await;
    let before = remaining(&app, &user.token).await;
    for _ in 0..10 {
        let answer = preflight(&app, "/api/users/me", ORIGIN, "GET", "authorization").await;
        answer.assert_status(200);
        assert_eq!(answer.header("x-ratelimit-remaining"), None, "{answer:?}");
    }
    // A preflight never carries the token; one that does, a wrong one, is answered all the same.
    let with_bad_token = app
        .client
        .request(Method::OPTIONS, app.url("/api/users/me"))
        .header("origin", ORIGIN)
        .header("access-control-request-method", "GET")
        .bearer_auth("0".repeat(64))
        .send()
        .await
        .unwrap();
    assert_eq!(with_bad_token.status(), 200);
    assert_eq!(
        remaining(&app, &user.token).await,
        before - 1,
        "only the read took a token"
    );
    for _ in 0..10 {
        preflight(&app, "/api/auth/login", ORIGIN, "POST", "content-type")
            .await
            .assert_status(200);
    }
    let login = app
        .request(
            Method::POST,
            "/api/auth/login",
            None,
            Some(serde_json::json!({ "email": user.email, "password": user.password })),
        )
        .await;
    login.assert_status(200);
}

#[tokio::test]
async fn a_request_from_an_allowed_origin_gets_its_origin_and_the_exposed_headers() {
    let app = TestApp::builder()
        .settings(allowing(&["https://other.example.com", ORIGIN]))
        .settings(|s| s.cors.allow_credentials = true)
        .spawn()
        .await;
    let world = World::create(&app).await;
    let path = world.fill("/api/tasks/{task}");
    let read = get_from(&app, &path, ORIGIN, &world.user.token).await;
    read.assert_status(200);
    assert_eq!(read.header("access-control-allow-origin"), Some(ORIGIN));
    assert_eq!(read.header("access-control-allow-credentials"), Some("true"));
    assert!(items(&read, "vary").contains(&"origin".to_owned()), "{read:?}");
    let exposed = items(&read, "access-control-expose-headers");
    for header in [
        "ratelimit",
        "ratelimit-policy",
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
        "retry-after",
        "etag",
        "cache-status",
        "x-cache",
        "x-request-id",
    ] {
        assert!(exposed.contains(&header.to_owned()), "{header} exposed: {exposed:?}");
    }
    // The names exposed are the ones the app sends.
    for header in [
        "ratelimit",
        "x-ratelimit-remaining",
        "etag",
        "cache-status",
        "x-cache",
        "x-request-id",
    ] {
        assert!(read.header(header).is_some(), "{header} sent: {read:?}");
    }
    // A page reads the error envelope too.
    let refused = get_from(&app, &path, ORIGIN, &"0".repeat(64)).await;
    refused.assert_error(401, "invalid_token");
    assert_eq!(refused.header("access-control-allow-origin"), Some(ORIGIN));
}

#[tokio::test]
async fn an_origin_not_allowed_gets_no_cors_headers_and_its_preflight_is_refused_in_the_envelope() {
    let app = TestApp::builder().settings(allowing(&[ORIGIN])).spawn().await;
    let world = World::create(&app).await;
    let path = world.fill("/api/tasks/{task}");
    // Without the header a browser refuses the answer; other clients are served as ever.
    let read = get_from(&app, &path, "https://evil.example.com", &world.user.token).await;
    read.assert_status(200);
    assert_eq!(read.header("access-control-allow-origin"), None, "{read:?}");
    let refused = preflight(&app, &path, "https://evil.example.com", "PATCH", "authorization").await;
    refused.assert_error(400, "cors_origin_not_allowed");
    assert_eq!(cors_headers(&refused), Vec::<String>::new());
    // An allowed origin asking for what the API does not use.
    preflight(&app, &path, ORIGIN, "PUT", "authorization")
        .await
        .assert_error(400, "cors_method_not_allowed");
    preflight(&app, &path, ORIGIN, "PATCH", "authorization, x-secret")
        .await
        .assert_error(400, "cors_headers_not_allowed");
}

#[tokio::test]
async fn without_allowed_origins_no_response_carries_cors_headers_and_preflights_are_refused_for_free() {
    let app = TestApp::builder()
        .settings(|s| s.rate_limit.api = per_hour(5))
        .spawn()
        .await;
    let user = app.register_user().await;
    let read = get_from(&app, "/api/users/me", ORIGIN, &user.token).await;
    read.assert_status(200);
    assert_eq!(cors_headers(&read), Vec::<String>::new());
    let before = remaining(&app, &user.token).await;
    let refused = preflight(&app, "/api/users/me", ORIGIN, "GET", "authorization").await;
    refused.assert_error(400, "cors_origin_not_allowed");
    assert_eq!(cors_headers(&refused), Vec::<String>::new());
    assert_eq!(
        remaining(&app, &user.token).await,
        before - 1,
        "the preflight took no token"
    );
}

#[tokio::test]
async fn any_origin_is_answered_with_a_wildcard() {
    let app = TestApp::builder().settings(|s| s.cors.any_origin = true).spawn().await;
    let user = app.register_user().await;
    let read = get_from(&app, "/api/users/me", "https://anywhere.example.com", &user.token).await;
    assert_eq!(read.header("access-control-allow-origin"), Some("*"));
    assert_eq!(read.header("access-control-allow-credentials"), None);
    let answer = preflight(
        &app,
        "/api/users/me",
        "https://anywhere.example.com",
        "GET",
        "authorization",
    )
    .await;
    answer.assert_status(200);
    assert_eq!(answer.header("access-control-allow-origin"), Some("*"));
}

/// (what, response) for every kind of answer: an API read, an error, a preflight, health, the
/// OpenAPI document, and the Swagger UI page with every script and stylesheet it loads.
async fn every_kind_of_response(app: &TestApp) -> Vec<(String, TestResponse)> {
    let user = app.register_user().await;
    let plain = |path: &str| {
        let request = app.client.get(app.url(path));
        async move { into_test_response(request.send().await.unwrap()).await }
    };
    let mut responses = vec![
        ("an API read".to_owned(), app.get("/api/users/me", &user.token).await),
        (
            "an error".to_owned(),
            app.get(&format!("/api/tasks/{}", uuid::Uuid::new_v4()), &user.token)
                .await,
        ),
        ("an unknown route".to_owned(), plain("/nowhere").await),
        (
            "a preflight".to_owned(),
            preflight(app, "/api/users/me", ORIGIN, "GET", "authorization").await,
        ),
        ("/health".to_owned(), plain("/health").await),
        ("the OpenAPI document".to_owned(), plain("/api-docs/openapi.json").await),
    ];
    let page = plain("/docs/").await;
    page.assert_status(200);
    // Under nosniff a browser runs a script only if it is served as JavaScript, and applies a
    // stylesheet only if it is served as CSS: each must say what it is.
    assert!(
        page.header("content-type").unwrap().starts_with("text/html"),
        "{page:?}"
    );
    let assets: Vec<String> = page
        .text
        .split(['"', '\''])
        .filter(|part| part.ends_with(".js") || part.ends_with(".css"))
        .map(|part| part.trim_start_matches("./").to_owned())
        .collect();
    assert!(assets.iter().any(|a| a.ends_with(".js")), "{}", page.text);
    assert!(assets.iter().any(|a| a.ends_with(".css")), "{}", page.text);
    for asset in assets {
        let loaded = plain(&format!("/docs/{asset}")).await;
        loaded.assert_status(200);
        let kind = loaded.header("content-type").unwrap_or_default().to_owned();
        let expected = if asset.ends_with(".js") {
            ["text/javascript", "application/javascript"]
                .iter()
                .any(|k| kind.starts_with(k))
        } else {
            kind.starts_with("text/css")
        };
        assert!(expected, "/docs/{asset} is served as {kind:?}");
        responses.push((format!("/docs/{asset}"), loaded));
    }
    responses.push(("/docs/".to_owned(), page));
    responses
}

#[tokio::test]
async fn every_response_carries_nosniff_and_no_referrer_and_docs_still_load() {
    let app = TestApp::spawn().await;
    for (what, response) in every_kind_of_response(&app).await {
        assert_eq!(response.header("x-content-type-options"), Some("nosniff"), "{what}");
        assert_eq!(response.header("referrer-policy"), Some("no-referrer"), "{what}");
        assert_eq!(
            response.header("strict-transport-security"),
            None,
            "{what}: not in test"
        );
    }
}

#[tokio::test]
async fn in_production_every_response_also_carries_hsts() {
    let app = TestApp::builder()
        .settings(|s| s.app.env = AppEnv::Production)
        .spawn()
        .await;
    for (what, response) in every_kind_of_response(&app).await {
        assert_eq!(
            response.header("strict-transport-security"),
            Some("max-age=31536000; includeSubDomains"),
            "{what}"
        );
        assert_eq!(response.header("x-content-type-options"), Some("nosniff"), "{what}");
    }
}
