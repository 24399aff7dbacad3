//! Registration, login and logout, and how bearer tokens are accepted, refused and stored.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use reqwest::Method;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::helpers::{TestApp, TestResponse};

const PASSWORD: &str = "correct horse battery";

fn unique_email() -> String {
    format!("ada-{}@example.com", Uuid::new_v4().simple())
}

async fn register(app: &TestApp, body: Value) -> TestResponse {
    app.request(Method::POST, "/api/auth/register", None, Some(body)).await
}

async fn login(app: &TestApp, email: &str, password: &str) -> TestResponse {
    let body = json!({ "email": email, "password": password });
    app.request(Method::POST, "/api/auth/login", None, Some(body)).await
}

/// `GET /api/users/me`: the cheapest route that needs a token.
async fn me(app: &TestApp, token: Option<&str>) -> TestResponse {
    app.request(Method::GET, "/api/users/me", token, None).await
}

fn sha256(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// Logs in and checks that `expiresAt` is `ttl` after the moment of the request.
async fn assert_login_expires_after(app: &TestApp, email: &str, ttl: TimeDelta) {
    let before = Utc::now();
    let response = login(app, email, PASSWORD).await;
    let after = Utc::now();
    response.assert_status(200);
    let expires_at: DateTime<Utc> = response.body["expiresAt"].as_str().unwrap().parse().unwrap();
    // Same clock for client and server: the only slack needed is for rounding.
    let slack = TimeDelta::seconds(1);
    assert!(
        before + ttl - slack <= expires_at && expires_at <= after + ttl + slack,
        "expiresAt {expires_at} is not {ttl} after the login ({before} .. {after})"
    );
}

#[tokio::test]
async fn register_returns_201_with_the_user_and_never_the_password() {
    let app = TestApp::spawn().await;
    let local = format!("Ada.{}", Uuid::new_v4().simple());
    let response = register(
        &app,
        json!({ "email": format!("{local}@Example.COM"), "password": PASSWORD, "name": "Ada Lovelace" }),
    )
    .await;

    response.assert_status(201);
    let body = response.body.as_object().expect("a JSON object");
    let mut keys: Vec<&str> = body.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["createdAt", "email", "id", "name", "updatedAt"],
        "{}",
        response.text
    );
    assert!(body["id"].as_str().unwrap().parse::<Uuid>().is_ok());
    assert_eq!(body["email"], format!("{local}@example.com").to_lowercase());
    assert_eq!(body["name"], "Ada Lovelace");
    assert!(body["createdAt"].as_str().unwrap().parse::<DateTime<Utc>>().is_ok());
    assert!(body["updatedAt"].as_str().unwrap().parse::<DateTime<Utc>>().is_ok());
    let text = response.text.to_lowercase();
    for secret in [PASSWORD, "password", "hash", "$argon2"] {
        assert!(
            !text.contains(secret),
            "register response contains {secret:?}: {}",
            response.text
        );
    }
}

#[tokio::test]
async fn register_returns_409_email_taken_for_an_email_already_registered_in_any_case() {
    let app = TestApp::spawn().await;
    let email = unique_email();
    register(&app, json!({ "email": email, "password": PASSWORD, "name": "First" }))
        .await
        .assert_status(201);

    let cases = [
        ("the same email", email.clone()),
        ("the email in upper case", email.to_uppercase()),
    ];
    for (reason, duplicate) in cases {
        let response = register(
            &app,
            json!({ "email": duplicate, "password": PASSWORD, "name": "Second" }),
        )
        .await;
        assert_eq!(response.status, 409, "{reason}: {}", response.text);
        response.assert_error(409, "email_taken");
    }
    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM users WHERE lower(email) = $1")
        .bind(&email)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(users, 1);
}

#[tokio::test]
async fn register_returns_400_validation_failed_naming_the_invalid_field() {
    let app = TestApp::spawn().await;
    let valid = || json!({ "email": unique_email(), "password": PASSWORD, "name": "Ada Lovelace" });
    let with = |field: &str, value: &str| {
        let mut body = valid();
        body[field] = json!(value);
        body
    };
    let long_name = "x".repeat(101);
    let cases = [
        (
            "email is not an email address",
            with("email", "ada-at-example.com"),
            "email",
        ),
        (
            "password is one character short of 8",
            with("password", "1234567"),
            "password",
        ),
        ("name is empty", with("name", ""), "name"),
        ("name is only whitespace", with("name", "   "), "name"),
        ("name is over 100 characters", with("name", &long_name), "name"),
        ("name contains a NUL character", with("name", "Ada\0Lovelace"), "name"),
    ];

    for (reason, body, field) in cases {
        let response = register(&app, body).await;
        assert_eq!(response.status, 400, "{reason}: {}", response.text);
        assert_eq!(
            response.body["code"], "validation_failed",
            "{reason}: {}",
            response.text
        );
        response.assert_error(400, "validation_failed");
        let details = response.body["details"]
            .as_object()
            .unwrap_or_else(|| panic!("{reason}: no details"));
        let fields: Vec<&String> = details.keys().collect();
        assert_eq!(fields, [field], "{reason}: {}", response.text);
        let messages = details[field].as_array().unwrap();
        assert!(
            !messages.is_empty() && messages.iter().all(|m| m.as_str().is_some_and(|m| !m.is_empty())),
            "{reason}: {}",
            response.text
        );
    }
    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(users, 0, "an invalid registration created a user");
}

#[tokio::test]
async fn login_returns_a_64_hex_bearer_token_that_expires_after_two_hours_by_default() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;

    let response = login(&app, &user.email, &user.password).await;
    response.assert_status(200);
    let token = response.body["token"].as_str().unwrap();
    assert_eq!(token.len(), 64, "{token}");
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()), "{token}");
    assert_eq!(response.body["tokenType"], "Bearer");
    me(&app, Some(token)).await.assert_status(200);

    assert_login_expires_after(&app, &user.email, TimeDelta::seconds(7200)).await;
}

#[tokio::test]
async fn auth_token_ttl_setting_sets_how_long_a_token_lives() {
    let app = TestApp::builder()
        .settings(|s| s.ttl.auth_token = Duration::from_secs(60))
        .spawn()
        .await;
    let user = app.register_user().await;
    assert_login_expires_after(&app, &user.email, TimeDelta::seconds(60)).await;
}

#[tokio::test]
async fn login_accepts_the_email_in_any_case() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;
    let response = login(&app, &user.email.to_uppercase(), &user.password).await;
    response.assert_status(200);
}

#[tokio::test]
async fn only_the_sha256_of_a_token_is_stored() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;

    let rows: Vec<(Vec<u8>, Uuid)> = sqlx::query_as("SELECT token_hash, user_id FROM auth_tokens")
        .fetch_all(&app.db)
        .await
        .unwrap();
    assert_eq!(rows.len(), 1, "one login, one stored token");
    let (stored, owner) = &rows[0];
    assert_eq!(*owner, user.id);
    assert_eq!(
        *stored,
        sha256(&user.token),
        "the stored value is the SHA-256 of the token"
    );
    assert_ne!(stored.as_slice(), user.token.as_bytes(), "the token itself is stored");
    assert_ne!(
        *stored,
        hex::decode(&user.token).unwrap(),
        "the token's random bytes are stored"
    );
}

#[tokio::test]
async fn wrong_password_and_unknown_email_get_the_same_401_invalid_credentials() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;

    let wrong_password = login(&app, &user.email, "not the password").await;
    let unknown_email = login(&app, &unique_email(), &user.password).await;

    wrong_password.assert_error(401, "invalid_credentials");
    unknown_email.assert_error(401, "invalid_credentials");
    assert_eq!(
        wrong_password.text, unknown_email.text,
        "the bodies tell the two cases apart"
    );
    let tokens: i64 = sqlx::query_scalar("SELECT count(*) FROM auth_tokens")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(tokens, 1, "only the login of register_user issued a token");
}

#[tokio::test]
async fn logout_returns_204_and_the_token_is_then_refused() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;

    let response = app
        .request(Method::POST, "/api/auth/logout", Some(&user.token), None)
        .await;
    response.assert_status(204);
    assert!(response.text.is_empty(), "{}", response.text);

    me(&app, Some(&user.token)).await.assert_error(401, "invalid_token");
    let again = app
        .request(Method::POST, "/api/auth/logout", Some(&user.token), None)
        .await;
    again.assert_error(401, "invalid_token");
}

#[tokio::test]
async fn logout_revokes_only_the_token_it_is_made_with() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;
    let second = app.login(&user.email, &user.password).await;

    app.request(Method::POST, "/api/auth/logout", Some(&user.token), None)
        .await
        .assert_status(204);

    me(&app, Some(&user.token)).await.assert_error(401, "invalid_token");
    me(&app, Some(&second)).await.assert_status(200);
}

#[tokio::test]
async fn a_request_without_a_bearer_token_gets_401_missing_token() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;

    me(&app, None).await.assert_error(401, "missing_token");

    let basic = app
        .client
        .get(app.url("/api/users/me"))
        .basic_auth(&user.email, Some(&user.password))
        .send()
        .await;
    crate::helpers::into_test_response(basic.unwrap())
        .await
        .assert_error(401, "missing_token");
}

#[tokio::test]
async fn a_garbage_or_unknown_token_gets_401_invalid_token() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;
    let unknown = hex::encode(Sha256::digest(Uuid::new_v4().as_bytes()));
    let cases = [
        ("garbage", "not-a-token".to_owned()),
        ("one hex character short", user.token[..63].to_owned()),
        ("64 characters, not hex", "z".repeat(64)),
        ("well-formed but never issued", unknown),
    ];

    for (reason, token) in cases {
        let response = me(&app, Some(&token)).await;
        assert_eq!(response.status, 401, "{reason}: {}", response.text);
        assert_eq!(response.body["code"], "invalid_token", "{reason}: {}", response.text);
        response.assert_error(401, "invalid_token");
    }
}

#[tokio::test]
async fn an_expired_token_gets_401_invalid_token() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;

    // Direct SQL: waiting out the TTL is not an option, and no API call can age a token. Done
    // before the token's first use, so the lookup reaches Postgres rather than the cache.
    let expired = sqlx::query("UPDATE auth_tokens SET expires_at = now() - interval '1 second' WHERE token_hash = $1")
        .bind(sha256(&user.token))
        .execute(&app.db)
        .await
        .unwrap();
    assert_eq!(expired.rows_affected(), 1);

    me(&app, Some(&user.token)).await.assert_error(401, "invalid_token");
}

#[tokio::test]
async fn a_cached_session_stops_working_when_its_token_expires() {
    let app = TestApp::builder()
        .settings(|s| s.ttl.auth_token = Duration::from_secs(1))
        .spawn()
        .await;
    let user = app.register_user().await;
    me(&app, Some(&user.token)).await.assert_status(200);
    let cached = me(&app, Some(&user.token)).await;
    cached.assert_status(200);

    // The session is cached now (L1); its expiry, not the cache TTL, decides.
    let expires_at: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT expires_at FROM auth_tokens")
        .fetch_one(&app.db)
        .await
        .unwrap();
    let wait = (expires_at - chrono::Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_millis(20)).await;
    me(&app, Some(&user.token)).await.assert_error(401, "invalid_token");
}

#[tokio::test]
async fn logging_in_again_removes_the_users_expired_tokens() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;
    let other = app.register_user().await;
    // Direct SQL: no API call can age a token.
    sqlx::query("UPDATE auth_tokens SET expires_at = now() - interval '1 second'")
        .execute(&app.db)
        .await
        .unwrap();

    let fresh = app.login(&user.email, &user.password).await;

    let stored: Vec<(Vec<u8>, Uuid)> = sqlx::query_as("SELECT token_hash, user_id FROM auth_tokens ORDER BY user_id")
        .fetch_all(&app.db)
        .await
        .unwrap();
    assert!(stored.contains(&(sha256(&fresh), user.id)), "the new token is stored");
    assert!(
        !stored.contains(&(sha256(&user.token), user.id)),
        "the user's expired token is still stored"
    );
    assert!(
        stored.contains(&(sha256(&other.token), other.id)),
        "another user's tokens are not this login's business"
    );
}

#[tokio::test]
async fn every_401_carries_www_authenticate_bearer() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;
    let cases = [
        ("missing token", me(&app, None).await),
        ("invalid token", me(&app, Some("not-a-token")).await),
        ("wrong password", login(&app, &user.email, "not the password").await),
    ];

    for (reason, response) in cases {
        assert_eq!(response.status, 401, "{reason}: {}", response.text);
        assert_eq!(response.header("www-authenticate"), Some("Bearer"), "{reason}");
    }
}
