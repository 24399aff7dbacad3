use std::time::{Duration, Instant};

use futures_util::future::join_all;
use nestling::modules::health::service::PROBE_TTL;
use reqwest::Method;

use crate::helpers::{private_redis, TestApp, TestRedis};

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

/// PINGs the app sends this server on its pooled connections (the subscriber's own PINGs on its
/// pub/sub connection are not health checks), from now until `marker` is sent: MONITOR streams
/// commands in the order the server runs them, so every earlier PING is in before the marker.
async fn health_pings(redis: &TestRedis) -> impl std::future::Future<Output = usize> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut monitor = tokio::net::TcpStream::connect(redis.url().trim_start_matches("redis://"))
        .await
        .unwrap();
    monitor.write_all(b"MONITOR\r\n").await.unwrap();
    let mut lines = BufReader::new(monitor).lines();
    assert_eq!(lines.next_line().await.unwrap().as_deref(), Some("+OK"));
    let mut connection = redis.connection().await;
    async move {
        let subscribers: String = redis::cmd("CLIENT")
            .arg("LIST")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut connection)
            .await
            .unwrap();
        let subscribers: Vec<String> = subscribers
            .split_whitespace()
            .filter_map(|field| field.strip_prefix("addr="))
            .map(str::to_owned)
            .collect();
        let marker = format!("end-{}", uuid::Uuid::new_v4().simple());
        let _: String = redis::cmd("ECHO")
            .arg(&marker)
            .query_async(&mut connection)
            .await
            .unwrap();
        let mut pings = 0;
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains(&marker) {
                return pings;
            }
            let from_subscriber = subscribers.iter().any(|addr| line.contains(&format!(" {addr}]")));
            if line.ends_with("\"PING\"") && !from_subscriber {
                pings += 1;
            }
        }
        panic!("MONITOR ended before the marker");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_health_calls_within_a_second_cost_one_round_trip() {
    let redis = private_redis().await;
    let app = TestApp::builder().redis(&redis).spawn().await;
    // What start-up asked is reused for a second: let it go stale, so one of the calls below asks.
    tokio::time::sleep(PROBE_TTL).await;
    let pings = health_pings(&redis).await;
    let calls = join_all((0..50).map(|_| app.request(Method::GET, "/health", None, None))).await;
    for call in &calls {
        call.assert_status(200);
    }
    assert_eq!(pings.await, 1, "50 calls of /health within a second, Redis PINGs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_turns_unhealthy_within_about_a_second_of_redis_being_killed() {
    let redis = private_redis().await;
    let app = TestApp::builder().redis(&redis).spawn().await;
    app.request(Method::GET, "/health", None, None).await.assert_status(200);
    redis.kill();
    let killed = Instant::now();
    loop {
        let health = app.request(Method::GET, "/health", None, None).await;
        if health.status == 503 {
            assert_eq!(health.body["error"]["redis"]["status"], "down", "{}", health.text);
            break;
        }
        assert!(
            killed.elapsed() < PROBE_TTL + Duration::from_millis(500),
            "/health still says {} {:?} after the kill",
            health.status,
            killed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
