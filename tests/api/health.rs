use crate::helpers::TestApp;
use reqwest::Method;

#[tokio::test]
async fn liveness_is_200_while_the_process_runs() {
    let app = TestApp::spawn().await;
    let response = app.request(Method::GET, "/health/live", None, None).await;
    response.assert_status(200);
    assert_eq!(response.body["status"], "ok");
}

#[tokio::test]
async fn health_reports_every_component_in_the_terminus_shape() {
    let app = TestApp::spawn().await;
    let response = app.request(Method::GET, "/health", None, None).await;
    response.assert_status(200);
    let body = &response.body;
    assert_eq!(body["status"], "ok");
    assert_eq!(body["details"]["database"]["status"], "up");
    assert!(body["details"]["database"]["latencyMs"].as_f64().unwrap() >= 0.0);
    assert_eq!(body["details"]["redis"]["status"], "disabled");
    assert!(body["details"]["cache"]["mode"].is_string());
    assert_eq!(body["info"]["database"]["status"], "up");
    assert_eq!(body["error"], serde_json::json!({}));
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
    assert!(body["uptimeSeconds"].is_u64());
}

#[tokio::test]
async fn readiness_is_200_when_the_database_answers() {
    let app = TestApp::spawn().await;
    let response = app.request(Method::GET, "/health/ready", None, None).await;
    response.assert_status(200);
    assert_eq!(response.body["details"]["database"]["status"], "up");
}

#[tokio::test]
async fn every_response_carries_a_request_id_and_keeps_the_clients() {
    let app = TestApp::spawn().await;
    let generated = app.request(Method::GET, "/health/live", None, None).await;
    assert!(generated.header("x-request-id").is_some_and(|id| !id.is_empty()));

    let sent = app
        .client
        .get(app.url("/nowhere"))
        .header("x-request-id", "trace-me-42")
        .send()
        .await
        .unwrap();
    assert_eq!(sent.headers()["x-request-id"], "trace-me-42");
}
