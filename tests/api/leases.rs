//! Leases charge what is used: tokens a lease did not spend go back to Redis with the identity's
//! next call, so a client calling now and then pays one token per request, and across the fleet
//! the accepted count stays within instances × lease of the exact figure. And every quota of a
//! policy is its own state in Redis, whatever its period.

use std::time::Duration;

use futures_util::future::join_all;
use nestling::config::{Quota, Settings};

use crate::helpers::{Backend, TestApp, TestResponse, TestUser};

fn per(limit: u64, secs: u64) -> Quota {
    Quota {
        limit,
        period: Duration::from_secs(secs),
    }
}

/// Longer than the lease lifetime these tests set: what the test is about is the lease lapsing.
const PAUSE: Duration = Duration::from_millis(80);

fn short_leases(limit: u64) -> impl FnOnce(&mut Settings) + 'static {
    move |s| {
        s.rate_limit.api = vec![per(limit, 3600)];
        s.rate_limit.lease_lifetime = Duration::from_millis(50);
        // Hundreds of requests at once queue on a debug build for longer than the 250 ms default.
        s.redis.command_timeout = Duration::from_secs(5);
        s.redis.pool_timeout = Duration::from_secs(5);
    }
}

fn remaining(response: &TestResponse) -> u64 {
    response.assert_status(200);
    response.header("x-ratelimit-remaining").unwrap().parse().unwrap()
}

#[tokio::test]
async fn a_client_calling_now_and_then_is_charged_one_token_per_request() {
    let app = TestApp::builder()
        .backend(Backend::redis().await)
        .settings(short_leases(10_000))
        .spawn()
        .await;
    assert_eq!(app.settings.rate_limit.lease, 1000, "the default lease");
    let user = app.register_user().await;
    let mut seen = Vec::new();
    for _ in 0..5 {
        seen.push(remaining(&app.get("/api/users/me", &user.token).await));
        tokio::time::sleep(PAUSE).await;
    }
    // One token per request; a token refills every 360 ms, so a step may also show none.
    for pair in seen.windows(2) {
        assert!(pair[0].abs_diff(pair[1]) <= 1, "remaining went {seen:?}");
    }
    assert!(seen[0] >= seen[4] + 3, "remaining went {seen:?}");
}

#[tokio::test]
async fn across_two_instances_busy_and_sporadic_clients_are_accepted_within_instances_times_lease() {
    const LIMIT: u64 = 500;
    let a = TestApp::builder()
        .backend(Backend::redis().await)
        .settings(short_leases(LIMIT))
        .spawn()
        .await;
    let b = TestApp::builder().sibling_of(&a).spawn().await;
    // The cap: RATE_LIMIT_LEASE, at most 5 % of the quota.
    let lease = a.settings.rate_limit.lease.min(LIMIT / 20);
    let bound = 2 * lease;
    let busy = a.register_user().await;
    let sporadic: Vec<TestUser> = join_all((0..3).map(|_| a.register_user())).await;

    // The busy client: 700 requests at once over both instances, more than its quota.
    let busy_requests = async {
        let requests = (0..700).map(|n| {
            let app = if n % 2 == 0 { &a } else { &b };
            app.get("/api/users/me", &busy.token)
        });
        join_all(requests).await.iter().filter(|r| r.status == 200).count() as u64
    };
    // Sporadic clients: twelve requests each, alternating instances, each lease lapsing between.
    let sporadic_requests = join_all(sporadic.iter().map(|user| {
        let (a, b) = (&a, &b);
        async move {
            let mut accepted = 0;
            for n in 0..12 {
                let app = if n % 2 == 0 { a } else { b };
                accepted += u64::from(app.get("/api/users/me", &user.token).await.status == 200);
                tokio::time::sleep(PAUSE).await;
            }
            accepted
        }
    }));
    let (busy_accepted, sporadic_accepted) = tokio::join!(busy_requests, sporadic_requests);

    // Never more than the quota (plus what refills during the test: one token per 7.2 s), never
    // fewer than the quota less what leases may hold on other instances.
    assert!(
        busy_accepted + bound >= LIMIT && busy_accepted <= LIMIT + 1,
        "busy: accepted {busy_accepted} of {LIMIT} (bound {bound})"
    );
    for (user, accepted) in sporadic.iter().zip(sporadic_accepted) {
        assert_eq!(accepted, 12, "a sporadic client is never refused");
        // What Redis charged them: the twelve requests, the thirteenth's token and at most the
        // leases the two instances may still hold.
        tokio::time::sleep(PAUSE).await;
        let left = remaining(&a.get("/api/users/me", &user.token).await);
        assert!(
            left + 13 + bound >= LIMIT,
            "a sporadic client was charged {} for 13 requests (bound {bound})",
            LIMIT - left
        );
    }
}

#[tokio::test]
async fn two_quotas_with_the_same_period_are_both_enforced_in_redis() {
    two_quotas_with_the_same_period_are_both_enforced(Backend::redis().await).await;
}

#[tokio::test]
async fn on_a_cluster_two_quotas_with_the_same_period_are_both_enforced() {
    two_quotas_with_the_same_period_are_both_enforced(Backend::cluster().await).await;
}

async fn two_quotas_with_the_same_period_are_both_enforced(backend: Backend) {
    // RATE_LIMIT_API="5, 50/1m" with the default 60 s window: both quotas last a minute.
    let app = TestApp::builder()
        .backend(backend)
        .settings(|s| s.rate_limit.api = vec![per(5, 60), per(50, 60)])
        .spawn()
        .await;
    let user = app.register_user().await;
    let mut statuses = Vec::new();
    for _ in 0..7 {
        statuses.push(app.get("/api/users/me", &user.token).await.status.as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429]);
}

/// Real traffic is many users, each making a few requests a second; with leases of a fixed 1 %
/// of the quota (6 of the default 600 a minute) each of them called Redis every third request.
/// A lease sized by the identity's recent rate lasts its lifetime: one call per many requests.
#[tokio::test]
async fn a_user_making_requests_steadily_calls_redis_at_most_once_per_ten_requests() {
    let redis = crate::helpers::private_redis().await;
    let app = TestApp::builder()
        .redis(&redis)
        .settings(|s| s.rate_limit.api = vec![per(600, 60)])
        .spawn()
        .await;
    let user = app.register_user().await;
    // Its session cached first: only the limiter's calls are counted.
    app.get("/api/users/me", &user.token).await.assert_status(200);
    let before = redis.evalsha_calls().await;
    // 200 requests at about 50 a second, as a busy client (under the quota: 600 a minute).
    for _ in 0..200 {
        app.get("/api/users/me", &user.token).await.assert_status(200);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let calls = redis.evalsha_calls().await - before;
    assert!(calls <= 20, "{calls} limiter calls to Redis for 200 requests");
}

/// Leases of at most 20 tokens that last a minute, under a quota that never runs out.
fn leases_of_20(s: &mut Settings) {
    s.rate_limit.api = vec![per(1_000_000, 3600)];
    s.rate_limit.lease = 20;
    s.rate_limit.lease_lifetime = Duration::from_secs(60);
}

/// The request whose token takes a lease under its top-up mark is answered from the lease at
/// once; the top-up goes on in the background. Before, that request waited for Redis (here
/// frozen: the command timeout).
#[tokio::test]
async fn the_request_that_tops_up_a_lease_does_not_wait_for_redis() {
    let redis = crate::helpers::private_redis().await;
    let app = TestApp::builder()
        .redis(&redis)
        .settings(|s| {
            leases_of_20(s);
            s.redis.command_timeout = Duration::from_millis(500);
        })
        .spawn()
        .await;
    let user = app.register_user().await;
    // The first request takes one token, the second (a burst) a whole lease of 20 and spends one:
    // 19 are left, and no top-up is under way.
    for _ in 0..2 {
        app.get("/api/users/me", &user.token).await.assert_status(200);
    }
    redis.freeze();
    // 16 requests: the 15th leaves 4, under a quarter, and sets off the top-up (before, a lease
    // was topped up under half of it). Each is answered from the lease, none waits for Redis.
    let mut slowest = Duration::ZERO;
    for _ in 0..16 {
        let started = std::time::Instant::now();
        app.get("/api/users/me", &user.token).await.assert_status(200);
        slowest = slowest.max(started.elapsed());
    }
    redis.thaw();
    assert!(slowest < Duration::from_millis(250), "a request waited {slowest:?}");
}

/// Thousands of busy users each top up a lease now and then; a round trip apiece cost Redis and
/// the app more than the scripts did. The top-ups that set off within one tick of the limiter's
/// clock reach Redis together, in one round trip.
#[tokio::test]
async fn top_ups_set_off_together_reach_redis_in_one_round_trip() {
    const USERS: usize = 20;
    let redis = crate::helpers::private_redis().await;
    let app = TestApp::builder().redis(&redis).settings(leases_of_20).spawn().await;
    let users: Vec<TestUser> = join_all((0..USERS).map(|_| app.register_user())).await;
    let (app, users) = (&app, &users);
    let requests = |count: usize| {
        join_all(users.iter().map(move |user| async move {
            for _ in 0..count {
                app.get("/api/users/me", &user.token).await.assert_status(200);
            }
        }))
    };
    // Each user's first request takes a token, its second (a burst) a lease of 20: 19 are left.
    requests(2).await;
    // A pause, so that the rate each lease is spent at lets its top-up wait for the tick (what
    // is left lasts more than four ticks); 14 requests then leave each lease 5 tokens.
    tokio::time::sleep(Duration::from_millis(200)).await;
    requests(14).await;
    let round_trips = "nestling_redis_command_duration_seconds_count{outcome=\"ok\"}";
    let (calls_before, trips_before) = (redis.evalsha_calls().await, app.metric(round_trips).await.unwrap());
    // Every user's next request leaves 4, under a quarter of the lease: all top up at once.
    requests(1).await;
    tokio::time::timeout(Duration::from_secs(10), async {
        while redis.evalsha_calls().await < calls_before + USERS as u64 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("every lease topped up");
    let trips = app.metric(round_trips).await.unwrap() - trips_before;
    assert!(
        trips <= (USERS / 4) as f64,
        "{USERS} top-ups took {trips} round trips to Redis"
    );
}
