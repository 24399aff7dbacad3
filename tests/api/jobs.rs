//! Background jobs (`infra::jobs`) on real Postgres: enqueued with the write, retried with
//! backoff, dead after the last attempt, retried by an operator, coalesced, run again after a
//! worker's lease ran out, handed back on stop. Each test registers kinds of its own on its app's
//! running queue (its own database), as the app registers its kinds at start-up.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use nestling::infra::database::Database;
use nestling::infra::jobs::{Claimed, JobError, JobHandler, JobKind, JobQueue, NewJob};
use serde_json::json;
use shaku::HasComponent;

use crate::helpers::TestApp;

pub(crate) const SECOND: Duration = Duration::from_secs(1);

pub(crate) fn queue(app: &TestApp) -> Arc<dyn JobQueue> {
    app.module.resolve()
}

pub(crate) fn kind(name: &'static str, max_attempts: u32, backoff: Duration) -> JobKind {
    JobKind {
        name,
        queue: "test",
        max_attempts,
        backoff,
        backoff_max: backoff * 8,
        timeout: 60 * SECOND,
    }
}

/// A handler that records when each attempt started and answers with `outcome(attempt)`.
pub(crate) fn recording(
    runs: Arc<Mutex<Vec<(i64, i32, Instant)>>>,
    outcome: impl Fn(i32) -> Result<(), String> + Send + Sync + 'static,
) -> JobHandler {
    let outcome = Arc::new(outcome);
    Arc::new(move |job: Claimed| {
        runs.lock().unwrap().push((job.id, job.attempt, Instant::now()));
        let result = outcome(job.attempt);
        Box::pin(async move { result })
    })
}

pub(crate) async fn state_of(app: &TestApp, id: i64) -> (String, i32, Option<String>) {
    sqlx::query_as("SELECT state, attempts, last_error FROM jobs WHERE id = $1")
        .bind(id)
        .fetch_one(&app.db)
        .await
        .unwrap()
}

/// Until the job is in `state` (at most `within`).
pub(crate) async fn until_state(app: &TestApp, id: i64, state: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let (now, attempts, error) = state_of(app, id).await;
        if now == state {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} is {now} (attempts {attempts}, error {error:?}), not {state}, after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_rolled_back_write_enqueues_nothing_and_a_committed_one_always_has_its_job() {
    let app = TestApp::spawn().await;
    let jobs = queue(&app);
    // Registered, but never due: the test looks at the table, not at a run.
    jobs.register(kind("test.held", 1, SECOND), recording(Arc::default(), |_| Ok(())));
    let db: Arc<dyn Database> = app.module.resolve();
    let later = chrono::Utc::now() + chrono::Duration::hours(1);

    let rolled_back = db
        .transaction(async {
            jobs.enqueue(NewJob::new("test.held", json!({ "n": 1 })).at(later))
                .await?;
            // The write fails after the enqueue: the whole unit rolls back.
            Err::<(), JobError>(JobError::Database(sqlx::Error::RowNotFound))
        })
        .await;
    assert!(rolled_back.is_err());
    let committed = db
        .transaction(async {
            jobs.enqueue(NewJob::new("test.held", json!({ "n": 2 })).at(later))
                .await
        })
        .await
        .unwrap()
        .expect("a job id");

    let kept: Vec<(i64, serde_json::Value)> = sqlx::query_as("SELECT id, payload FROM jobs")
        .fetch_all(&app.db)
        .await
        .unwrap();
    assert_eq!(kept, [(committed, json!({ "n": 2 }))]);
}

#[tokio::test]
async fn a_failing_job_waits_longer_before_each_attempt_then_is_dead_and_an_operator_retry_runs_it() {
    let app = TestApp::spawn().await;
    let jobs = queue(&app);
    let runs = Arc::new(Mutex::new(Vec::new()));
    let healed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let outcome = {
        let healed = healed.clone();
        move |attempt: i32| {
            if healed.load(std::sync::atomic::Ordering::SeqCst) {
                Ok(())
            } else {
                Err(format!("downstream refused attempt {attempt}"))
            }
        }
    };
    // Delays before attempts 2 and 3: from [300, 400] ms and from [600, 800] ms.
    jobs.register(
        kind("test.flaky", 3, Duration::from_millis(400)),
        recording(runs.clone(), outcome),
    );
    let id = jobs
        .enqueue(NewJob::new("test.flaky", json!({})))
        .await
        .unwrap()
        .unwrap();

    until_state(&app, id, "dead", 10 * SECOND).await;
    let (_, attempts, error) = state_of(&app, id).await;
    assert_eq!(attempts, 3);
    assert_eq!(error.as_deref(), Some("downstream refused attempt 3"));
    let started: Vec<Instant> = runs.lock().unwrap().iter().map(|(_, _, at)| *at).collect();
    assert_eq!(started.len(), 3);
    let gaps = [started[1] - started[0], started[2] - started[1]];
    assert!(gaps[0] >= Duration::from_millis(300), "first gap {:?}", gaps[0]);
    assert!(gaps[1] >= Duration::from_millis(600), "second gap {:?}", gaps[1]);
    assert!(gaps[1] > gaps[0], "the gaps grow: {gaps:?}");

    let dead = jobs.dead(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!((dead[0].id, dead[0].kind.as_str()), (id, "test.flaky"));
    assert_eq!(dead[0].last_error.as_deref(), Some("downstream refused attempt 3"));

    healed.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(jobs.retry(id).await.unwrap());
    until_state(&app, id, "done", 5 * SECOND).await;
    assert_eq!(runs.lock().unwrap().len(), 4);
    assert!(!jobs.retry(id).await.unwrap(), "only a dead job is retried");
}

#[tokio::test]
async fn a_job_with_a_unique_key_is_coalesced_while_one_is_queued_and_not_after_it_started() {
    let app = TestApp::spawn().await;
    let jobs = queue(&app);
    let runs = Arc::new(Mutex::new(Vec::new()));
    jobs.register(kind("test.rebuild", 1, SECOND), recording(runs.clone(), |_| Ok(())));
    let soon = chrono::Utc::now() + chrono::Duration::milliseconds(500);
    let job = || NewJob::new("test.rebuild", json!({ "workspace": "w1" })).unique("w1");

    let first = jobs.enqueue(job().at(soon)).await.unwrap();
    assert!(first.is_some());
    for _ in 0..5 {
        assert_eq!(jobs.enqueue(job().at(soon)).await.unwrap(), None, "coalesced");
    }
    // Another key is another job.
    let other = NewJob::new("test.rebuild", json!({ "workspace": "w2" })).unique("w2");
    let other = jobs.enqueue(other.at(soon)).await.unwrap().expect("another key");

    until_state(&app, first.unwrap(), "done", 5 * SECOND).await;
    until_state(&app, other, "done", 5 * SECOND).await;
    assert_eq!(runs.lock().unwrap().len(), 2, "one run per key");
    // Once it ran, the key takes a new job.
    assert!(jobs.enqueue(job()).await.unwrap().is_some());
}

/// An instance that inserted or met the queued job of a key coalesces the key's next enqueues
/// without a round trip, until shortly before that job is due. The test deletes the queued row
/// behind the instances' backs (a fake: it makes the skipped round trip visible; in the app no one
/// deletes a queued job).
#[tokio::test]
async fn an_instance_that_saw_a_keys_queued_job_coalesces_without_a_round_trip_until_it_is_nearly_due() {
    let a = TestApp::spawn().await;
    let b = TestApp::builder().sibling_of(&a).spawn().await;
    let (on_a, on_b) = (queue(&a), queue(&b));
    for jobs in [&on_a, &on_b] {
        jobs.register(kind("test.memo", 1, SECOND), recording(Arc::default(), |_| Ok(())));
    }
    let due = chrono::Utc::now() + chrono::Duration::milliseconds(1_500);
    let job = || NewJob::new("test.memo", json!({})).unique("k").at(due);

    let inserted = on_a.enqueue(job()).await.unwrap().expect("the first is inserted");
    assert_eq!(on_b.enqueue(job()).await.unwrap(), None, "b meets a's queued job");
    sqlx::query("DELETE FROM jobs WHERE id = $1")
        .bind(inserted)
        .execute(&a.db)
        .await
        .unwrap();
    assert_eq!(on_a.enqueue(job()).await.unwrap(), None, "a inserted it: no round trip");
    assert_eq!(on_b.enqueue(job()).await.unwrap(), None, "b met it: no round trip");

    // Within 500 ms of its due time a worker may take it: the next enqueue asks Postgres.
    let nearly_due = (due - chrono::Utc::now() - chrono::Duration::milliseconds(400))
        .to_std()
        .unwrap();
    tokio::time::sleep(nearly_due).await;
    assert!(on_b.enqueue(job()).await.unwrap().is_some(), "inserted again");
}

/// What a worker killed mid-job leaves behind is a `running` row whose lease nobody renews. The
/// row is written as such a worker would have left it (a fake of the process's death only: the
/// queue, the lease and the reaper are the real ones).
#[tokio::test]
async fn a_job_whose_worker_died_runs_again_once_its_lease_has_run_out() {
    let app = TestApp::builder()
        .settings(|s| s.jobs.poll_every = Duration::from_millis(100))
        .spawn()
        .await;
    let jobs = queue(&app);
    let runs = Arc::new(Mutex::new(Vec::new()));
    jobs.register(kind("test.orphan", 3, SECOND), recording(runs.clone(), |_| Ok(())));
    // Before the row's `now()`: the lease runs out 700 ms after that at the earliest.
    let died = Instant::now();
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO jobs (queue, kind, payload, max_attempts, state, attempts, worker, lease_until, started_at)
         VALUES ('test', 'test.orphan', '{}', 3, 'running', 1, 'a-worker-that-died', now() + interval '700 milliseconds', now())
         RETURNING id",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();

    until_state(&app, id, "done", 5 * SECOND).await;
    let runs = runs.lock().unwrap().clone();
    assert_eq!(runs.len(), 1);
    let (_, attempt, ran_at) = runs[0];
    assert_eq!(attempt, 2, "the lost attempt counts");
    assert!(
        ran_at - died >= Duration::from_millis(700),
        "not before the lease ran out"
    );
    assert!(
        ran_at - died < Duration::from_millis(700) + SECOND,
        "soon after: {:?}",
        ran_at - died
    );
}

#[tokio::test]
async fn stopping_lets_a_short_job_finish_and_hands_a_long_one_back_without_counting_its_attempt() {
    let app = TestApp::spawn().await;
    let jobs = queue(&app);
    let started = Arc::new(tokio::sync::Semaphore::new(0));
    for (name, takes) in [("test.short", Duration::from_millis(300)), ("test.long", 30 * SECOND)] {
        let started = started.clone();
        let handler: JobHandler = Arc::new(move |_job: Claimed| {
            started.add_permits(1);
            Box::pin(async move {
                tokio::time::sleep(takes).await;
                Ok(())
            })
        });
        jobs.register(kind(name, 3, SECOND), handler);
    }
    let short = jobs
        .enqueue(NewJob::new("test.short", json!({})))
        .await
        .unwrap()
        .unwrap();
    let long = jobs
        .enqueue(NewJob::new("test.long", json!({})))
        .await
        .unwrap()
        .unwrap();
    // Both running.
    let _both = started.acquire_many(2).await.unwrap();

    let stopping = Instant::now();
    jobs.stop(SECOND).await;
    assert!(stopping.elapsed() < 2 * SECOND, "stopped within its deadline");
    assert_eq!(state_of(&app, short).await.0, "done", "the short job finished");
    let (state, attempts, _) = state_of(&app, long).await;
    assert_eq!(
        (state.as_str(), attempts),
        ("queued", 0),
        "handed back, attempt not counted"
    );
}

/// Three instances on one database, each with the same per-second schedule (as each would
/// register it at start-up): for 20 s every tick runs exactly once across them, none skipped.
#[tokio::test]
async fn three_instances_run_every_tick_of_a_per_second_schedule_exactly_once() {
    let a = TestApp::spawn().await;
    let b = TestApp::builder().sibling_of(&a).spawn().await;
    let c = TestApp::builder().sibling_of(&a).spawn().await;
    let ticks = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
    for (name, app) in [("a", &a), ("b", &b), ("c", &c)] {
        let jobs = queue(app);
        let ticks = ticks.clone();
        let handler: JobHandler = Arc::new(move |job: Claimed| {
            let fired = job.payload["firedAt"].as_str().unwrap_or_default().to_owned();
            ticks.lock().unwrap().push((fired, name.to_owned()));
            Box::pin(async { Ok(()) })
        });
        jobs.register(kind("test.every-second", 3, SECOND), handler);
        jobs.schedule("test.every-second", "* * * * * *").unwrap();
    }
    let started = chrono::Utc::now();
    tokio::time::sleep(20 * SECOND).await;
    let ended = chrono::Utc::now();
    // The last tick's job may still be running: wait until every recorded tick ran.
    let deadline = Instant::now() + 5 * SECOND;
    let recorded: Vec<chrono::DateTime<chrono::Utc>> = loop {
        let recorded: Vec<chrono::DateTime<chrono::Utc>> =
            sqlx::query_scalar("SELECT fire_at FROM job_ticks WHERE schedule = 'test.every-second' ORDER BY fire_at")
                .fetch_all(&a.db)
                .await
                .unwrap();
        let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state <> 'done'")
            .fetch_one(&a.db)
            .await
            .unwrap();
        if pending == 0 {
            break recorded;
        }
        assert!(Instant::now() < deadline, "{pending} tick jobs not done");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // One tick per second, none skipped, from the first to the last.
    assert!(recorded.len() >= 19, "{} ticks in 20 s", recorded.len());
    assert!(recorded
        .windows(2)
        .all(|pair| pair[1] - pair[0] == chrono::Duration::seconds(1)));
    assert!(recorded[0] >= started - chrono::Duration::seconds(1) && *recorded.last().unwrap() <= ended);
    // Each ran once, on one of the three.
    let ticks = ticks.lock().unwrap().clone();
    let mut fired: Vec<String> = ticks.iter().map(|(fired, _)| fired.clone()).collect();
    fired.sort();
    let runs = fired.len();
    fired.dedup();
    assert_eq!(runs, fired.len(), "a tick ran twice: {ticks:?}");
    assert_eq!(runs, recorded.len(), "every recorded tick ran");
}

/// Task writes enqueue their workspace's metrics rebuild a moment later, coalesced: 100 writes in
/// about a second cause at most two rebuilds, and the stored days are fresh after them.
#[tokio::test]
async fn with_metrics_rebuild_on_write_off_task_writes_enqueue_no_rebuild() {
    // The benchmark's "without" side (and a deployment that rebuilds on its own schedule).
    let app = TestApp::builder()
        .settings(|s| s.jobs.metrics_rebuild_on_write = false)
        .spawn()
        .await;
    let (owner, _workspace, project) = app.user_with_project().await;
    let task = app
        .create_task(
            &owner,
            project["id"].as_str().unwrap(),
            json!({ "title": "no rebuild" }),
        )
        .await;
    let path = format!("/api/tasks/{}", task["id"].as_str().unwrap());
    let done = app.patch(&path, &owner.token, json!({ "status": "done" })).await;
    assert_eq!(done.status, 200);
    let rebuilds: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE kind = 'metrics.rebuild'")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(rebuilds, 0);
}

#[tokio::test]
async fn a_hundred_task_writes_in_a_workspace_cause_at_most_two_metrics_rebuilds() {
    let app = TestApp::spawn().await;
    let (owner, workspace, project) = app.user_with_project().await;
    let project_id = project["id"].as_str().unwrap();
    let writes = (0..100).map(|n| {
        let (app, owner) = (&app, &owner);
        async move {
            app.create_task(owner, project_id, json!({ "title": format!("task {n}") }))
                .await
        }
    });
    let writing = Instant::now();
    futures_util::stream::iter(writes)
        .buffer_unordered(10)
        .collect::<Vec<_>>()
        .await;
    let wrote_in = writing.elapsed();

    let deadline = Instant::now() + 15 * SECOND;
    loop {
        let waiting: i64 =
            sqlx::query_scalar("SELECT count(*) FROM jobs WHERE kind = 'metrics.rebuild' AND state <> 'done'")
                .fetch_one(&app.db)
                .await
                .unwrap();
        if waiting == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{waiting} rebuilds still waiting");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rebuilds: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE kind = 'metrics.rebuild'")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert!(
        (1..=2).contains(&rebuilds),
        "{rebuilds} rebuilds for 100 writes in {wrote_in:?}"
    );
    // The stored day counts all 100 tasks: fresh without a rebuild per write.
    let created_today: i64 = sqlx::query_scalar(
        "SELECT created FROM daily_metrics
         WHERE workspace_id = $1::text::uuid AND date = (now() AT TIME ZONE 'UTC')::date",
    )
    .bind(workspace["id"].as_str().unwrap())
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(created_today, 100);
}

/// The hourly purge deletes what can no longer be used or is past keeping, and nothing else.
#[tokio::test]
async fn the_purge_deletes_expired_tokens_and_records_and_old_finished_jobs_only() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;
    for (hash, expires) in [(1u8, "now() - interval '1 minute'"), (2, "now() + interval '1 hour'")] {
        sqlx::query(&format!(
            "INSERT INTO auth_tokens (token_hash, user_id, expires_at) VALUES ($1, $2, {expires})"
        ))
        .bind(vec![hash; 32])
        .bind(user.id)
        .execute(&app.db)
        .await
        .unwrap();
    }
    sqlx::query(
        "INSERT INTO jobs (queue, kind, payload, max_attempts, state, finished_at) VALUES
           ('old', 'test.old', '{}', 1, 'done', now() - interval '8 days'),
           ('old', 'test.recent', '{}', 1, 'done', now() - interval '1 day'),
           ('old', 'test.dead', '{}', 1, 'dead', now() - interval '8 days')",
    )
    .execute(&app.db)
    .await
    .unwrap();
    sqlx::query("INSERT INTO job_ticks (schedule, fire_at) VALUES ('x', now() - interval '8 days'), ('x', now())")
        .execute(&app.db)
        .await
        .unwrap();

    let jobs = queue(&app);
    let id = jobs
        .enqueue(NewJob::new(nestling::modules::maintenance::PURGE, json!({})))
        .await
        .unwrap()
        .unwrap();
    until_state(&app, id, "done", 10 * SECOND).await;

    let tokens: Vec<Vec<u8>> = sqlx::query_scalar(
        "SELECT token_hash FROM auth_tokens WHERE user_id = $1 AND length(token_hash) = 32 AND token_hash IN ($2, $3)",
    )
    .bind(user.id)
    .bind(vec![1u8; 32])
    .bind(vec![2u8; 32])
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert_eq!(tokens, [vec![2u8; 32]], "only the live token stays");
    let kinds: Vec<String> = sqlx::query_scalar("SELECT kind FROM jobs WHERE queue = 'old' ORDER BY kind")
        .fetch_all(&app.db)
        .await
        .unwrap();
    assert_eq!(kinds, ["test.dead", "test.recent"], "dead jobs stay for operators");
    let ticks: i64 = sqlx::query_scalar("SELECT count(*) FROM job_ticks WHERE schedule = 'x'")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(ticks, 1);
}

/// The morning reminder: each open, assigned task due that day gets a `task.due` event on its
/// workspace's stream; done, unassigned or other days' tasks do not.
#[tokio::test]
async fn the_due_date_reminder_records_a_task_due_event_for_each_open_assigned_task_due_that_day() {
    let app = TestApp::spawn().await;
    let (owner, _, project) = app.user_with_project().await;
    let project_id = project["id"].as_str().unwrap();
    let today = chrono::Utc::now().date_naive();
    let tomorrow = today.succ_opt().unwrap();
    let mut ids = Vec::new();
    for (title, due, assigned, status) in [
        ("due today", today, true, "todo"),
        ("done already", today, true, "done"),
        ("nobody's", today, false, "todo"),
        ("tomorrow", tomorrow, true, "todo"),
    ] {
        let mut body = json!({ "title": title, "dueDate": due, "status": status });
        if assigned {
            body["assigneeId"] = json!(owner.id);
        }
        ids.push(app.create_task(&owner, project_id, body).await["id"].clone());
    }
    let fired_at = chrono::Utc::now();
    let jobs = queue(&app);
    let id = jobs
        .enqueue(NewJob::new(
            nestling::modules::tasks::reminders::DUE_REMINDERS,
            json!({ "firedAt": fired_at }),
        ))
        .await
        .unwrap()
        .unwrap();
    until_state(&app, id, "done", 10 * SECOND).await;

    let due: Vec<serde_json::Value> = sqlx::query_scalar("SELECT data FROM events WHERE type = 'task.due' ORDER BY id")
        .fetch_all(&app.db)
        .await
        .unwrap();
    assert_eq!(due.len(), 1, "{due:?}");
    assert_eq!(due[0]["task"]["id"], ids[0]);
    assert_eq!(due[0]["assigneeId"], json!(owner.id));
    assert_eq!(due[0]["day"], json!(today));
}

/// `nestling worker`: the app's jobs run in a process without HTTP (here the web instance runs
/// none, `JOBS_WORKERS=0`), and SIGTERM stops it at once when it has nothing running.
#[tokio::test]
async fn nestling_worker_runs_the_apps_jobs_without_http_and_stops_on_sigterm() {
    let app = TestApp::builder().settings(|s| s.jobs.workers = 0).spawn().await;
    let mut worker = crate::cli::nestling()
        .arg("worker")
        .env("DATABASE_URL", &app.settings.database.url)
        .env("JOBS_POLL_MS", "100")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let id = queue(&app)
        .enqueue(NewJob::new(nestling::modules::maintenance::PURGE, json!({})))
        .await
        .unwrap()
        .unwrap();
    until_state(&app, id, "done", 15 * SECOND).await;

    let stopping = Instant::now();
    // SAFETY: signalling the process this test spawned.
    unsafe { libc::kill(worker.id().unwrap() as i32, libc::SIGTERM) };
    let status = tokio::time::timeout(5 * SECOND, worker.wait())
        .await
        .expect("the worker exits")
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(stopping.elapsed() < 2 * SECOND, "stopped in {:?}", stopping.elapsed());
}

/// A `nestling worker` process on the test's database, with this environment.
fn worker_process(app: &TestApp, env: &[(&str, &str)]) -> tokio::process::Child {
    let mut command = crate::cli::nestling();
    command
        .arg("worker")
        .env("DATABASE_URL", &app.settings.database.url)
        .env("JOBS_POLL_MS", "100")
        // The purge below waits on a table lock the test holds: longer than the default deadline.
        .env("DATABASE_STATEMENT_TIMEOUT_MS", "60000")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    for (name, value) in env {
        command.env(name, value);
    }
    command.spawn().unwrap()
}

/// Holds an exclusive lock on `auth_tokens` until dropped or committed: the purge's first
/// statement waits on it, so its job runs as long as the test wants.
async fn hold_tokens_table(app: &TestApp) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut tx = app.db.begin().await.unwrap();
    sqlx::query("LOCK TABLE auth_tokens IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx
}

fn signal(child: &tokio::process::Child, signal: i32) {
    // SAFETY: signalling a process this test spawned.
    unsafe { libc::kill(child.id().unwrap() as i32, signal) };
}

/// A worker killed with SIGKILL in the middle of a job: the job runs to completion on another
/// worker once the lease is over, its lost attempt counted. (The purge is idempotent: deleting
/// what is expired twice deletes it once, which is why a job may be run again at all.)
#[tokio::test]
async fn a_job_whose_worker_is_killed_mid_job_completes_on_another_worker_after_the_lease() {
    let app = TestApp::builder().settings(|s| s.jobs.workers = 0).spawn().await;
    let lock = hold_tokens_table(&app).await;
    let mut first = worker_process(&app, &[("JOBS_LEASE_MS", "1500")]);
    let id = queue(&app)
        .enqueue(NewJob::new(nestling::modules::maintenance::PURGE, json!({})))
        .await
        .unwrap()
        .unwrap();
    until_state(&app, id, "running", 15 * SECOND).await;

    signal(&first, libc::SIGKILL);
    first.wait().await.unwrap();
    let killed = Instant::now();
    lock.commit().await.unwrap();
    let _second = worker_process(&app, &[("JOBS_LEASE_MS", "1500")]);
    until_state(&app, id, "done", 15 * SECOND).await;
    let (_, attempts, _) = state_of(&app, id).await;
    assert_eq!(attempts, 2, "the killed attempt counts");
    assert!(
        killed.elapsed() >= Duration::from_millis(1000),
        "not before the lease ran out"
    );
}

/// SIGTERM: a worker finishes a job that ends within `APP_SHUTDOWN_TIMEOUT`, and hands back one
/// that does not, which another worker then runs; the handed-back attempt is not counted.
#[tokio::test]
async fn sigterm_lets_a_short_job_finish_and_hands_a_long_one_to_another_worker() {
    let app = TestApp::builder().settings(|s| s.jobs.workers = 0).spawn().await;
    let jobs = queue(&app);
    let purge = || NewJob::new(nestling::modules::maintenance::PURGE, json!({}));

    // A job that ends 2 s into a 5 s shutdown timeout.
    let lock = hold_tokens_table(&app).await;
    let mut worker = worker_process(&app, &[("APP_SHUTDOWN_TIMEOUT", "5")]);
    let short = jobs.enqueue(purge()).await.unwrap().unwrap();
    until_state(&app, short, "running", 15 * SECOND).await;
    signal(&worker, libc::SIGTERM);
    tokio::time::sleep(2 * SECOND).await;
    lock.commit().await.unwrap();
    let status = tokio::time::timeout(10 * SECOND, worker.wait()).await.unwrap().unwrap();
    assert!(status.success());
    assert_eq!(
        state_of(&app, short).await.0,
        "done",
        "finished before the worker stopped"
    );

    // A job still running when the 2 s timeout ends: handed back, run by the next worker.
    let lock = hold_tokens_table(&app).await;
    let mut worker = worker_process(&app, &[("APP_SHUTDOWN_TIMEOUT", "2")]);
    let long = jobs.enqueue(purge()).await.unwrap().unwrap();
    until_state(&app, long, "running", 15 * SECOND).await;
    signal(&worker, libc::SIGTERM);
    let status = tokio::time::timeout(10 * SECOND, worker.wait()).await.unwrap().unwrap();
    assert!(status.success());
    let (state, attempts, _) = state_of(&app, long).await;
    assert_eq!(
        (state.as_str(), attempts),
        ("queued", 0),
        "handed back, its attempt not counted"
    );
    lock.commit().await.unwrap();
    let _next = worker_process(&app, &[]);
    until_state(&app, long, "done", 15 * SECOND).await;
}
