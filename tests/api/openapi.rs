use crate::helpers::TestApp;
use reqwest::Method;

/// Every `#[get("...")]`-style route in the controllers, as (method, path).
fn registered_routes() -> Vec<(String, String)> {
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
        for line in source.lines().map(str::trim) {
            for method in ["get", "post", "put", "patch", "delete"] {
                if let Some(rest) = line.strip_prefix(&format!("#[{method}(\"")) {
                    let path = rest.split('"').next().unwrap();
                    routes.push((method.to_owned(), path.to_owned()));
                }
            }
        }
    }
    routes
}

#[tokio::test]
async fn every_registered_route_is_documented_in_openapi() {
    let app = TestApp::spawn().await;
    let response = app.request(Method::GET, "/api-docs/openapi.json", None, None).await;
    response.assert_status(200);
    let paths = &response.body["paths"];
    let routes = registered_routes();
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

/// The other direction: every documented operation is mounted (a handler defined but never passed
/// to `service(...)` would answer `route_not_found`).
#[tokio::test]
async fn every_documented_operation_is_mounted() {
    let app = TestApp::spawn().await;
    let document = app
        .request(Method::GET, "/api-docs/openapi.json", None, None)
        .await
        .body;
    let mut checked = 0;
    for (path, operations) in document["paths"].as_object().unwrap() {
        let concrete = path
            .split('/')
            .map(|segment| {
                if segment.starts_with('{') {
                    uuid::Uuid::new_v4().to_string()
                } else {
                    segment.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("/");
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
