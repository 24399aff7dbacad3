//! Sessions a user lists and ends (`/api/auth/sessions`), an operator's end of all of a user's
//! sessions (admin endpoint and CLI), and how fast an ended token stops working on another
//! instance: within a second, with Redis up and with Redis frozen.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use crate::cli::nestling;
use crate::helpers::{private_redis, Backend, TestApp, TestResponse, TestUser};

const ADMIN: &str = "test-admin-token";

/// A user with two more tokens (three sessions): (user, second token, third token).
async fn user_with_three_sessions(app: &TestApp) -> (TestUser, String, String) {
    let user = app.register_user().await;
    let second = app.login(&user.email, &user.password).await;
    let third = app.login(&user.email, &user.password).await;
    (user, second, third)
}

fn sessions_of(list: &TestResponse) -> &Vec<Value> {
    list.body
        .as_array()
        .unwrap_or_else(|| panic!("a list of sessions: {}", list.text))
}

/// The id of the session `token` lists as its own.
async fn session_id(app: &TestApp, token: &str) -> String {
    let list = app.get("/api/auth/sessions", token).await;
    list.assert_status(200);
    let current: Vec<&Value> = sessions_of(&list).iter().filter(|s| s["current"] == true).collect();
    assert_eq!(current.len(), 1, "one current session: {}", list.text);
    current[0]["id"].as_str().unwrap().to_owned()
}

fn time(value: &Value) -> DateTime<Utc> {
    value
        .as_str()
        .and_then(|text| text.parse().ok())
        .unwrap_or_else(|| panic!("an RFC 3339 time: {value}"))
}

fn assert_works(response: &TestResponse, what: &str) {
    assert_eq!(response.status, 200, "{what}: {}", response.text);
}

#[tokio::test]
async fn the_session_list_shows_each_login_with_the_one_in_use_marked_current() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;
    let second = app.login(&user.email, &user.password).await;

    let list = app.get("/api/auth/sessions", &user.token).await;
    list.assert_status(200);
    let sessions = sessions_of(&list);
    assert_eq!(sessions.len(), 2, "{}", list.text);
    let now = Utc::now();
    for session in sessions {
        assert!(
            session["id"].as_str().unwrap().parse::<uuid::Uuid>().is_ok(),
            "{session}"
        );
        let (created, last_used, expires) = (
            time(&session["createdAt"]),
            time(&session["lastUsedAt"]),
            time(&session["expiresAt"]),
        );
        assert!(created <= last_used && last_used <= now, "{session}");
        let lifetime = (expires - created).num_seconds();
        assert!(
            (7199..=7201).contains(&lifetime),
            "expires after AUTH_TOKEN_TTL: {session}"
        );
    }
    // Neither token, nor its hash, is part of the answer.
    for token in [&user.token, &second] {
        let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(token.as_bytes()));
        assert!(
            !list.text.contains(token.as_str()) && !list.text.contains(&hash),
            "{}",
            list.text
        );
    }

    let mine = session_id(&app, &user.token).await;
    let theirs = session_id(&app, &second).await;
    assert_ne!(mine, theirs, "each token is its own session");
    let ids: Vec<&str> = sessions.iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert!(
        ids.contains(&mine.as_str()) && ids.contains(&theirs.as_str()),
        "{ids:?}"
    );
}

#[tokio::test]
async fn deleting_a_session_ends_that_token_and_no_other() {
    let app = TestApp::spawn().await;
    let (user, second, third) = user_with_three_sessions(&app).await;
    for token in [&user.token, &second, &third] {
        assert_works(&app.get("/api/users/me", token).await, "warming the session");
    }
    let path = format!("/api/auth/sessions/{}", session_id(&app, &second).await);

    app.delete(&path, &user.token).await.assert_status(204);

    app.get("/api/users/me", &second)
        .await
        .assert_error(401, "invalid_token");
    assert_works(&app.get("/api/users/me", &user.token).await, "the caller's token");
    assert_works(&app.get("/api/users/me", &third).await, "the third token");
    let list = app.get("/api/auth/sessions", &user.token).await;
    assert_eq!(sessions_of(&list).len(), 2, "{}", list.text);
    app.delete(&path, &user.token)
        .await
        .assert_error(404, "session_not_found");
}

#[tokio::test]
async fn deleting_sessions_ends_every_other_token_and_with_all_true_this_one_too() {
    let app = TestApp::spawn().await;
    let (user, second, third) = user_with_three_sessions(&app).await;
    for token in [&user.token, &second, &third] {
        assert_works(&app.get("/api/users/me", token).await, "warming the session");
    }

    let ended = app.delete("/api/auth/sessions", &user.token).await;
    ended.assert_status(200);
    assert_eq!(ended.body, json!({ "ended": 2 }), "{}", ended.text);
    for token in [&second, &third] {
        app.get("/api/users/me", token).await.assert_error(401, "invalid_token");
    }
    let list = app.get("/api/auth/sessions", &user.token).await;
    let sessions = sessions_of(&list);
    assert!(sessions.len() == 1 && sessions[0]["current"] == true, "{}", list.text);

    let fourth = app.login(&user.email, &user.password).await;
    assert_works(&app.get("/api/users/me", &fourth).await, "warming the new session");
    let ended = app.delete("/api/auth/sessions?all=true", &user.token).await;
    ended.assert_status(200);
    assert_eq!(ended.body, json!({ "ended": 2 }), "{}", ended.text);
    for token in [&user.token, &fourth] {
        app.get("/api/users/me", token).await.assert_error(401, "invalid_token");
    }
}

#[tokio::test]
async fn another_users_session_or_an_unknown_id_is_a_404_and_that_session_lives_on() {
    let app = TestApp::spawn().await;
    let me = app.register_user().await;
    let other = app.register_user().await;
    let theirs = session_id(&app, &other.token).await;

    let cases = [
        (format!("/api/auth/sessions/{theirs}"), "another user's session"),
        (format!("/api/auth/sessions/{}", uuid::Uuid::new_v4()), "an unknown id"),
    ];
    for (path, what) in &cases {
        let answer = app.delete(path, &me.token).await;
        assert_eq!(answer.status, 404, "{what}: {}", answer.text);
        answer.assert_error(404, "session_not_found");
    }
    app.delete("/api/auth/sessions/not-a-uuid", &me.token)
        .await
        .assert_error(400, "invalid_path");
    assert_works(&app.get("/api/users/me", &other.token).await, "the other user's token");
    // Ending "all" ends only one's own.
    app.delete("/api/auth/sessions?all=true", &me.token)
        .await
        .assert_status(200);
    assert_works(&app.get("/api/users/me", &other.token).await, "the other user's token");
}

#[tokio::test]
async fn the_admin_endpoint_ends_every_session_of_a_user_and_no_one_elses() {
    let app = TestApp::builder()
        .settings(|s| s.app.admin_token = Some(ADMIN.into()))
        .spawn()
        .await;
    let (user, second, _) = user_with_three_sessions(&app).await;
    let bystander = app.register_user().await;
    for token in [&user.token, &second, &bystander.token] {
        assert_works(&app.get("/api/users/me", token).await, "warming the session");
    }
    let path = format!("/admin/users/{}/sessions", user.id);

    app.delete(&path, &bystander.token).await.assert_error(403, "forbidden");
    let ended = app.delete(&path, ADMIN).await;
    ended.assert_status(200);
    assert_eq!(ended.body, json!({ "ended": 3 }), "{}", ended.text);

    for token in [&user.token, &second] {
        app.get("/api/users/me", token).await.assert_error(401, "invalid_token");
    }
    assert_works(&app.get("/api/users/me", &bystander.token).await, "the bystander");
    app.delete(&format!("/admin/users/{}/sessions", uuid::Uuid::new_v4()), ADMIN)
        .await
        .assert_error(404, "user_not_found");
}

/// The CLI runs without the app's cache in memory: it publishes the invalidations on the fleet's
/// channel, and the running instance drops the sessions it was serving from L1.
#[tokio::test]
async fn admin_end_sessions_on_the_command_line_ends_them_on_the_running_instances() {
    let app = TestApp::builder().backend(Backend::redis().await).spawn().await;
    let (user, second, _) = user_with_three_sessions(&app).await;
    let bystander = app.register_user().await;
    for token in [&user.token, &second, &bystander.token] {
        app.read_until_l1_hit("/api/users/me", token, "the session").await;
    }
    let end_sessions = |email: String| {
        let settings = app.settings.clone();
        async move {
            nestling()
                .args(["admin", "end-sessions", &email])
                .env("DATABASE_URL", &settings.database.url)
                .env("REDIS_ENABLED", "true")
                .env("REDIS_URL", &settings.redis.url)
                .env("REDIS_KEY_PREFIX", &settings.redis.key_prefix)
                .output()
                .await
                .unwrap()
        }
    };

    let done = end_sessions(user.email.to_uppercase()).await;
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    for token in [&user.token, &second] {
        app.refused_after(token, Duration::from_secs(1))
            .await
            .expect("the instance stops honouring the token within 1 s");
    }
    assert_works(&app.get("/api/users/me", &bystander.token).await, "the bystander");

    let unknown = end_sessions("nobody@example.com".into()).await;
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert_eq!(unknown.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.trim().lines().count() == 1 && stderr.contains("nobody@example.com"),
        "{stderr}"
    );
}

/// The test: two tokens of one user, `DELETE /api/auth/sessions` on A, and B refuses
/// the other token within a second.
#[tokio::test]
async fn ending_the_other_sessions_on_one_instance_refuses_their_tokens_on_another_within_a_second() {
    let backend = Backend::redis().await;
    let a = TestApp::builder().backend(backend).spawn().await;
    let b = backend.sibling(&a).await;
    let user = a.register_user().await;
    let other = a.login(&user.email, &user.password).await;
    b.read_until_l1_hit("/api/users/me", &other, "B keeps the other session")
        .await;

    let ended = a.delete("/api/auth/sessions", &user.token).await;
    ended.assert_status(200);
    assert_eq!(ended.body, json!({ "ended": 1 }), "{}", ended.text);

    let took = b.refused_after(&other, Duration::from_secs(1)).await;
    assert!(took.is_some(), "B still served the ended token after 1 s");
    assert_works(&b.get("/api/users/me", &user.token).await, "the token kept");
}

/// Instances A and B share a Redis that freezes, so B hears nothing; A ends the user's other
/// sessions. Returns how long after that B first refused the other token, or `None` if it still
/// served it after `give_up`.
async fn end_other_sessions_while_redis_is_frozen(unsynced_ttl: Duration, give_up: Duration) -> Option<Duration> {
    let redis = private_redis().await;
    let a = TestApp::builder()
        .redis(&redis)
        .settings(move |s| s.cache.l1_unsynced_ttl = unsynced_ttl)
        .spawn()
        .await;
    let b = TestApp::builder().sibling_of(&a).spawn().await;
    let user = a.register_user().await;
    let other = a.login(&user.email, &user.password).await;
    assert_works(&b.get("/api/users/me", &other).await, "before the freeze");

    redis.freeze();
    // B notices, flushes L1 and keeps the session again, read from Postgres.
    b.wait_for_lost_subscription().await;
    assert_works(&b.get("/api/users/me", &other).await, "B keeps the session");
    a.delete("/api/auth/sessions", &user.token).await.assert_status(200);
    let took = b.refused_after(&other, give_up).await;
    redis.thaw();
    took
}

#[tokio::test]
async fn ending_the_other_sessions_while_redis_is_frozen_refuses_their_tokens_on_another_instance_within_a_second() {
    // The default bound (CACHE_L1_UNSYNCED_TTL_MS), as a user runs it.
    let unsynced_ttl = crate::helpers::test_settings().cache.l1_unsynced_ttl;
    let took = end_other_sessions_while_redis_is_frozen(unsynced_ttl, Duration::from_secs(3))
        .await
        .expect("B stopped honouring the ended token");
    assert!(took <= Duration::from_secs(1), "B refused it after {took:?}");
}

/// The control: with the unsynced bound as long as the L1 TTL, nothing tells B.
#[tokio::test]
async fn without_the_unsynced_bound_the_other_instance_honours_an_ended_session_on() {
    let took = end_other_sessions_while_redis_is_frozen(Duration::from_secs(60), Duration::from_millis(1500)).await;
    assert_eq!(took, None, "B refused the token although nothing told it to");
}

/// `lastUsedAt` is written after the answer, once a minute per token at most: a second use
/// within the minute writes nothing. Uses are written in the order they are queued, so once a
/// later token's use shows, an earlier one's would have too.
#[tokio::test]
async fn a_sessions_last_use_is_recorded_after_the_request_at_most_once_a_minute() {
    let app = TestApp::spawn().await;
    // Logging in is not a use: no write is on its way yet.
    let user = app.register_user().await;
    let second = app.login(&user.email, &user.password).await;
    // Both sessions last used ten minutes ago: a state only time could reach otherwise.
    let back_in_time = || async {
        sqlx::query("UPDATE auth_tokens SET last_used_at = now() - interval '10 minutes' WHERE user_id = $1")
            .bind(user.id)
            .execute(&app.db)
            .await
            .unwrap();
    };
    let last_used = |list: &TestResponse, current: bool| {
        let session = sessions_of(list).iter().find(|s| s["current"] == current).cloned();
        time(&session.unwrap_or_else(|| panic!("current = {current} in {}", list.text))["lastUsedAt"])
    };
    let recent = |at: DateTime<Utc>| Utc::now() - at < chrono::Duration::seconds(60);
    back_in_time().await;

    let list = app
        .read_until("/api/auth/sessions", &user.token, "the first use is recorded", |list| {
            list.status == 200 && recent(last_used(list, true))
        })
        .await;
    assert!(!recent(last_used(&list, false)), "an unused session: {}", list.text);

    back_in_time().await;
    assert_works(&app.get("/api/users/me", &user.token).await, "a second use");
    assert_works(&app.get("/api/users/me", &second).await, "the other token's first use");
    let list = app
        .read_until(
            "/api/auth/sessions",
            &second,
            "the other token's use is recorded",
            |list| list.status == 200 && recent(last_used(list, true)),
        )
        .await;
    assert!(
        !recent(last_used(&list, false)),
        "a second use within the minute is not written: {}",
        list.text
    );
}

/// `AUTH_TOKEN_SLIDING=true`: a token used in the last half of its life is extended, and every
/// instance drops the expiry it had cached. B caches the session while it expires in 1.5 s; A's
/// use extends it; past the old expiry B still honours the token.
#[tokio::test]
async fn with_sliding_expiry_a_use_in_the_last_half_extends_the_session_on_every_instance() {
    let backend = Backend::redis().await;
    let a = TestApp::builder()
        .backend(backend)
        .settings(|s| {
            s.app.auth_token_sliding = true;
            s.app.admin_token = Some(ADMIN.into());
        })
        .spawn()
        .await;
    let b = backend.sibling(&a).await;
    let user = a.register_user().await;
    let set = |column_value: &'static str| {
        let (db, user_id) = (a.db.clone(), user.id);
        async move {
            sqlx::query(&format!("UPDATE auth_tokens SET {column_value} WHERE user_id = $1"))
                .bind(user_id)
                .execute(&db)
                .await
                .unwrap();
        }
    };
    let session = |list: &TestResponse, field: &str| time(&sessions_of(list)[0][field]);
    // B's write of this minute, awaited: the token is in the first half of its life, so it
    // records the use and extends nothing.
    set("last_used_at = now() - interval '10 minutes'").await;
    assert_works(&b.get("/api/users/me", &user.token).await, "B's first use");
    let recent = |list: &TestResponse| {
        list.status == 200 && Utc::now() - session(list, "lastUsedAt") < chrono::Duration::seconds(60)
    };
    b.read_until("/api/auth/sessions", &user.token, "B's use is recorded", recent)
        .await;

    let old_expiry = Instant::now() + Duration::from_millis(1500);
    set("expires_at = now() + interval '1500 milliseconds'").await;
    // Every instance forgets the session; B reads the near expiry back and keeps it.
    b.delete("/admin/cache?namespace=auth-tokens", ADMIN)
        .await
        .assert_status(200);
    assert_works(&b.get("/api/users/me", &user.token).await, "B keeps the near expiry");

    assert_works(&a.get("/api/users/me", &user.token).await, "A's use in the last half");
    let extended = |list: &TestResponse| {
        list.status == 200 && session(list, "expiresAt") > Utc::now() + chrono::Duration::hours(1)
    };
    b.read_until("/api/auth/sessions", &user.token, "the session is extended", extended)
        .await;

    tokio::time::sleep_until(old_expiry.into()).await;
    assert_works(&b.get("/api/users/me", &user.token).await, "B past the old expiry");
}
