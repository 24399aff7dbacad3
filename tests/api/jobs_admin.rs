//! What operators see of the job queue and do with it: `GET /admin/jobs` (counts and the dead
//! jobs with their errors), `POST /admin/jobs/{id}/retry`, and the Prometheus gauges read at
//! scrape time (the due backlog, its oldest job's wait, the dead jobs). The CLI's `nestling jobs`
//! is tested in `cli.rs`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use nestling::infra::jobs::{Claimed, JobHandler, NewJob};
use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{sample, TestApp};
use crate::jobs::{kind, queue, recording, until_state, SECOND};

const ADMIN: &str = "jobs-admin-token";

/// Runs recorded by a kind's handler: (job id, attempt, when).
pub(crate) type Runs = Arc<Mutex<Vec<(i64, i32, Instant)>>>;

/// Registers `name` (one attempt, on the queue `test`) failing with `error` until `healed` is set,
/// and enqueues one job of it: returns the job's id once it is dead.
pub(crate) async fn dead_job(app: &TestApp, name: &'static str, error: &'static str) -> (i64, Arc<AtomicBool>, Runs) {
    let jobs = queue(app);
    let healed = Arc::new(AtomicBool::new(false));
    let runs: Runs = Arc::default();
    let outcome = {
        let healed = healed.clone();
        move |_attempt: i32| {
            if healed.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err(error.to_owned())
            }
        }
    };
    jobs.register(kind(name, 1, SECOND), recording(runs.clone(), outcome));
    let id = jobs
        .enqueue(NewJob::new(name, json!({ "n": 1 })))
        .await
        .unwrap()
        .unwrap();
    until_state(app, id, "dead", 5 * SECOND).await;
    (id, healed, runs)
}

async fn admin_app() -> TestApp {
    TestApp::builder()
        .settings(|s| s.app.admin_token = Some(ADMIN.into()))
        .spawn()
        .await
}

/// The row of `GET /admin/jobs`' `queues` for (queue, state).
fn count<'a>(overview: &'a Value, queue: &str, state: &str) -> Option<&'a Value> {
    overview["queues"]
        .as_array()
        .unwrap_or_else(|| panic!("queues: {overview}"))
        .iter()
        .find(|row| row["queue"] == queue && row["state"] == state)
}

fn dead_ids(overview: &Value) -> Vec<i64> {
    let dead = overview["dead"]
        .as_array()
        .unwrap_or_else(|| panic!("dead: {overview}"));
    dead.iter().map(|job| job["id"].as_i64().unwrap()).collect()
}

#[tokio::test]
async fn admin_jobs_lists_dead_jobs_newest_first_with_their_errors_and_a_retry_runs_one_again() {
    let app = admin_app().await;
    let (older, _, _) = dead_job(&app, "test.mail", "smtp refused: 554").await;
    let (newer, healed, runs) = dead_job(&app, "test.flaky", "downstream refused").await;

    let listed = app.request(Method::GET, "/admin/jobs", Some(ADMIN), None).await;
    listed.assert_status(200);
    assert_eq!(dead_ids(&listed.body), [newer, older], "newest first: {}", listed.text);
    let dead = &listed.body["dead"][0];
    assert_eq!(dead["kind"], "test.flaky");
    assert_eq!(dead["queue"], "test");
    assert_eq!(dead["attempts"], 1);
    assert_eq!(dead["lastError"], "downstream refused");
    assert_eq!(dead["payload"], json!({ "n": 1 }));
    assert!(dead["finishedAt"].is_string(), "{dead}");
    let dead_count = count(&listed.body, "test", "dead").unwrap_or_else(|| panic!("{}", listed.text));
    assert_eq!(dead_count["jobs"], 2);

    healed.store(true, Ordering::SeqCst);
    let retried = app
        .request(Method::POST, &format!("/admin/jobs/{newer}/retry"), Some(ADMIN), None)
        .await;
    retried.assert_status(200);
    assert_eq!(retried.body, json!({ "retried": true }));
    until_state(&app, newer, "done", 5 * SECOND).await;
    let attempts: Vec<i32> = runs.lock().unwrap().iter().map(|(_, attempt, _)| *attempt).collect();
    assert_eq!(attempts, [1, 1], "ran again, its attempts reset");

    let after = app.request(Method::GET, "/admin/jobs", Some(ADMIN), None).await;
    assert_eq!(dead_ids(&after.body), [older], "{}", after.text);
    assert_eq!(count(&after.body, "test", "done").unwrap()["jobs"], 1, "{}", after.text);
    // A job that is not dead (any more), and an id no job has, are not found.
    for id in [newer, older + newer + 1_000] {
        app.request(Method::POST, &format!("/admin/jobs/{id}/retry"), Some(ADMIN), None)
            .await
            .assert_error(404, "job_not_found");
    }
}

#[tokio::test]
async fn the_job_endpoints_need_admin_token_or_an_admin_user_and_a_refused_retry_changes_nothing() {
    let app = admin_app().await;
    let (id, _, runs) = dead_job(&app, "test.flaky", "downstream refused").await;
    let user = app.register_user().await;
    let retry = format!("/admin/jobs/{id}/retry");
    for (method, path) in [(Method::GET, "/admin/jobs"), (Method::POST, retry.as_str())] {
        app.request(method.clone(), path, None, None)
            .await
            .assert_error(401, "missing_token");
        app.request(method.clone(), path, Some("not-a-token"), None)
            .await
            .assert_error(401, "invalid_admin_token");
        app.request(method, path, Some(&user.token), None)
            .await
            .assert_error(403, "forbidden");
    }
    assert_eq!(crate::jobs::state_of(&app, id).await.0, "dead", "still dead");
    assert_eq!(runs.lock().unwrap().len(), 1, "not run again");

    nestling::modules::users::repository::set_admin(&app.db, &user.email, true, SECOND)
        .await
        .unwrap();
    let listed = app.request(Method::GET, "/admin/jobs", Some(&user.token), None).await;
    listed.assert_status(200);
    assert_eq!(dead_ids(&listed.body), [id]);
}

/// The value of `series` (name and labels, as exposed) in the `/metrics` text.
/// One worker slot, held by a job that waits for the test: what is enqueued meanwhile waits. The
/// gauges count what is due (not a job scheduled for later), age the backlog from its oldest due
/// job, count the dead, and read 0 again once the queue drained. A kind's runs exist at zero
/// from its registration, so that its first run counts in `increase()`.
#[tokio::test]
async fn the_job_gauges_show_the_due_backlog_its_oldest_wait_and_the_dead_and_fall_back_when_it_drains() {
    let app = TestApp::builder()
        .settings(|s| {
            s.jobs.workers = 1;
            s.jobs.queue_concurrency = 1;
        })
        .spawn()
        .await;
    let jobs = queue(&app);
    dead_job(&app, "test.fails", "downstream refused").await;
    let (started, release) = (
        Arc::new(tokio::sync::Semaphore::new(0)),
        Arc::new(tokio::sync::Semaphore::new(0)),
    );
    let blocking: JobHandler = {
        let (started, release) = (started.clone(), release.clone());
        Arc::new(move |_job: Claimed| {
            started.add_permits(1);
            let release = release.clone();
            Box::pin(async move {
                let _go = release.acquire().await.unwrap();
                Ok(())
            })
        })
    };
    jobs.register(kind("test.blocking", 1, SECOND), blocking);
    jobs.register(kind("test.quick", 1, SECOND), recording(Arc::default(), |_| Ok(())));
    let before = app.scrape_metrics().await;
    for outcome in ["done", "retry", "dead"] {
        let series = format!(r#"nestling_job_runs_total{{kind="test.quick",outcome="{outcome}"}}"#);
        assert_eq!(sample(&before, &series), Some(0.0), "{series} before the first run");
    }

    jobs.enqueue(NewJob::new("test.blocking", json!({}))).await.unwrap();
    let _running = started.acquire().await.unwrap();
    let now = chrono::Utc::now();
    let mut quick_ids = Vec::new();
    for due in [now - chrono::Duration::minutes(10), now] {
        let id = jobs
            .enqueue(NewJob::new("test.quick", json!({})).at(due))
            .await
            .unwrap();
        quick_ids.push(id.unwrap());
    }
    let later = NewJob::new("test.quick", json!({})).at(now + chrono::Duration::hours(1));
    jobs.enqueue(later).await.unwrap();

    let backlog = app.scrape_metrics().await;
    assert_eq!(
        sample(&backlog, r#"nestling_jobs_waiting{queue="test"}"#),
        Some(2.0),
        "due only"
    );
    let oldest = sample(&backlog, r#"nestling_job_oldest_waiting_seconds{queue="test"}"#).unwrap();
    assert!(
        (600.0..660.0).contains(&oldest),
        "the oldest due job waited 10 min: {oldest}"
    );
    assert_eq!(sample(&backlog, "nestling_jobs_dead"), Some(1.0));

    release.add_permits(1);
    for id in quick_ids {
        until_state(&app, id, "done", 5 * SECOND).await;
    }
    let drained = app.scrape_metrics().await;
    assert_eq!(sample(&drained, r#"nestling_jobs_waiting{queue="test"}"#), Some(0.0));
    assert_eq!(
        sample(&drained, r#"nestling_job_oldest_waiting_seconds{queue="test"}"#),
        Some(0.0)
    );
    assert_eq!(
        sample(&drained, r#"nestling_job_runs_total{kind="test.quick",outcome="done"}"#),
        Some(2.0)
    );
    assert_eq!(sample(&drained, "nestling_jobs_dead"), Some(1.0));
}
