//! The login limit reads what login reads: one parsed, decompressed body with no repeated key,
//! one normalised email for the limiter, the lookup and the unique index; and only failures count
//! against an account, so a stranger cannot lock its owner out.

use std::io::Write;
use std::net::IpAddr;

use reqwest::Method;
use serde_json::{json, Value};

use nestling::config::Settings;

use crate::helpers::{into_test_response, TestApp, TestResponse, TestUser};

/// An app with the login limits a user gets by default (the harness raises them for other tests).
async fn with_default_login_limits() -> TestApp {
    TestApp::builder()
        .settings(|s| {
            let defaults = Settings::from_lookup(|_| None).unwrap().rate_limit;
            s.rate_limit.auth_ip = defaults.auth_ip;
            s.rate_limit.auth_email = defaults.auth_email;
        })
        .spawn()
        .await
}

/// A client whose requests come from `address` (any of 127.0.0.0/8 reaches the app), so one test
/// can play the owner and a stranger without trusting a proxy header.
fn client_from(address: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(address.parse::<IpAddr>().unwrap())
        .build()
        .unwrap()
}

async fn login_as(app: &TestApp, client: &reqwest::Client, email: &str, password: &str) -> TestResponse {
    let body = json!({ "email": email, "password": password });
    into_test_response(
        client
            .post(app.url("/api/auth/login"))
            .json(&body)
            .send()
            .await
            .unwrap(),
    )
    .await
}

fn gzip(body: &Value) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(body.to_string().as_bytes()).unwrap();
    encoder.finish().unwrap()
}

#[tokio::test]
async fn a_body_with_a_repeated_key_is_refused_before_any_password_is_checked() {
    let app = with_default_login_limits().await;
    let victim = app.register_user().await;
    let body = format!(
        r#"{{"email":"someone-else@example.com","email":"{}","password":"a guess"}}"#,
        victim.email
    );
    for attempt in 1..=8 {
        let response = app
            .client
            .post(app.url("/api/auth/login"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let response = into_test_response(response).await;
        response.assert_error(400, "validation_failed");
        assert!(
            response.body["details"]["email"].is_array(),
            "attempt {attempt}: {}",
            response.text
        );
    }
    // The other routes refuse a repeated key too (errors::every_body_the_json_extractor_refuses…).
}

#[tokio::test]
async fn gzip_compressed_logins_reach_429_by_the_sixth_try() {
    let app = with_default_login_limits().await;
    let victim = app.register_user().await;
    let body = gzip(&json!({ "email": victim.email, "password": "a guess" }));
    let stranger = client_from("127.0.0.2");
    let mut statuses = Vec::new();
    for _ in 0..8 {
        let response = stranger
            .post(app.url("/api/auth/login"))
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
    }
    assert_eq!(
        statuses,
        [401, 401, 401, 401, 401, 429, 429, 429],
        "RATE_LIMIT_AUTH_EMAIL is 5 a minute"
    );
}

#[tokio::test]
async fn every_spelling_of_an_email_reaches_one_account_and_one_limiter_bucket() {
    let app = with_default_login_limits().await;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let email = format!("sam.k-{id}@example.com");
    let registered = app
        .request(
            Method::POST,
            "/api/auth/register",
            None,
            Some(json!({ "email": email, "password": "correct horse battery", "name": "Sam" })),
        )
        .await;
    registered.assert_status(201);
    let spellings = [
        ("upper case", format!("SAM.K-{}@EXAMPLE.COM", id.to_uppercase())),
        ("surrounding spaces", format!("  sam.k-{id}@example.com ")),
        ("full-width letters", format!("ｓａｍ.ｋ-{id}@example.com")),
        ("Kelvin sign for k", format!("sam.\u{212A}-{id}@example.com")),
        ("long s for s", format!("\u{17F}am.k-{id}@example.com")),
    ];
    let owner = client_from("127.0.0.1");
    for (what, spelling) in &spellings {
        let response = login_as(&app, &owner, spelling, "correct horse battery").await;
        assert_eq!(response.status, 200, "{what}: {}", response.text);
    }
    // A stranger's failures under every spelling count in one bucket.
    let stranger = client_from("127.0.0.2");
    for (what, spelling) in &spellings {
        let response = login_as(&app, &stranger, spelling, "a guess").await;
        assert_eq!(response.status, 401, "{what}: {}", response.text);
    }
    let sixth = login_as(&app, &stranger, &email.to_uppercase(), "a guess").await;
    sixth.assert_error(429, "rate_limited");
    // And the unique index sees one account.
    let again = app
        .request(
            Method::POST,
            "/api/auth/register",
            None,
            Some(json!({ "email": email.to_uppercase(), "password": "correct horse battery", "name": "Sam" })),
        )
        .await;
    again.assert_error(409, "email_taken");
}

async fn registered_from_owner_address(app: &TestApp) -> TestUser {
    // The harness's client connects from 127.0.0.1: registering and logging in there makes it an
    // address this account logged in from.
    app.register_user().await
}

#[tokio::test]
async fn a_stranger_spending_the_email_quota_does_not_lock_the_owner_out_of_an_address_they_used() {
    let app = with_default_login_limits().await;
    let owner = registered_from_owner_address(&app).await;
    let stranger = client_from("127.0.0.2");
    for _ in 0..5 {
        login_as(&app, &stranger, &owner.email, "a guess")
            .await
            .assert_status(401);
    }
    login_as(&app, &stranger, &owner.email, "a guess")
        .await
        .assert_error(429, "rate_limited");

    let home = client_from("127.0.0.1");
    login_as(&app, &home, &owner.email, &owner.password)
        .await
        .assert_status(200);
    // The owner's address has the email quota to itself, for failures as well.
    for _ in 0..5 {
        login_as(&app, &home, &owner.email, "a typo").await.assert_status(401);
    }
    login_as(&app, &home, &owner.email, "a typo")
        .await
        .assert_error(429, "rate_limited");
    // An address the account never logged in from waits, as the README's trade-off says.
    login_as(&app, &client_from("127.0.0.3"), &owner.email, &owner.password)
        .await
        .assert_error(429, "rate_limited");
}

#[tokio::test]
async fn only_failed_logins_count_against_the_email_quota() {
    let app = with_default_login_limits().await;
    let owner = registered_from_owner_address(&app).await;
    let laptop = client_from("127.0.0.2");
    // Five failures among five successes: ten attempts, under a quota of five.
    for _ in 0..5 {
        login_as(&app, &laptop, &owner.email, &owner.password)
            .await
            .assert_status(200);
        login_as(&app, &laptop, &owner.email, "a typo").await.assert_status(401);
    }
    // The five failures did spend the email quota: a new address is refused.
    login_as(&app, &client_from("127.0.0.3"), &owner.email, "a guess")
        .await
        .assert_error(429, "rate_limited");
}
