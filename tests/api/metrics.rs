//! Daily workspace metrics: per UTC day, tasks created, completed, and open at the end of the day.

use chrono::{Days, NaiveDate, Utc};
use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{TestApp, TestResponse, TestUser};

fn id(value: &Value) -> &str {
    value["id"].as_str().expect("an id")
}

async fn daily(app: &TestApp, user: &TestUser, workspace: &Value, query: &str) -> TestResponse {
    let path = format!("/api/workspaces/{}/metrics/daily{query}", id(workspace));
    app.get(&path, &user.token).await
}

fn day(date: &str, created: i64, completed: i64, open_at_end_of_day: i64) -> Value {
    json!({ "date": date, "created": created, "completed": completed, "openAtEndOfDay": open_at_end_of_day })
}

/// Moves a task's creation (and completion) into the past. The API stamps both with the current
/// time and offers no way to set them, so a history can only be built with direct SQL.
/// `completed_at` must be given exactly for tasks created as `done` (the `tasks_completed_when_done`
/// check: status is done iff completed_at is set).
async fn backdate(app: &TestApp, task: &Value, created_at: &str, completed_at: Option<&str>) {
    assert_eq!(
        task["status"] == "done",
        completed_at.is_some(),
        "a completion time exactly for done tasks: {task}"
    );
    let task_id: uuid::Uuid = id(task).parse().unwrap();
    let updated = sqlx::query(
        "UPDATE tasks SET created_at = $2::timestamptz, updated_at = $2::timestamptz, completed_at = $3::timestamptz
         WHERE id = $1",
    )
    .bind(task_id)
    .bind(created_at)
    .bind(completed_at)
    .execute(&app.db)
    .await
    .expect("backdate task");
    assert_eq!(updated.rows_affected(), 1);
}

/// Creates a task (done when `completed_at` is given) and moves it to the given UTC times.
async fn task_at(
    app: &TestApp,
    user: &TestUser,
    project: &Value,
    created_at: &str,
    completed_at: Option<&str>,
) -> Value {
    let status = if completed_at.is_some() { "done" } else { "todo" };
    let task = app
        .create_task(
            user,
            id(project),
            json!({ "title": format!("created {created_at}"), "status": status }),
        )
        .await;
    backdate(app, &task, created_at, completed_at).await;
    task
}

/// A workspace's history around 2024-03-01..05, the range the first test reads, and a task
/// created today; (user, workspace, project).
async fn history(app: &TestApp) -> (TestUser, Value, Value) {
    let (user, workspace, project) = app.user_with_project().await;
    // Created before the range and still open: open on every day.
    task_at(app, &user, &project, "2024-02-20T10:00:00Z", None).await;
    // Completed exactly at the first midnight: completed on day one, never open inside the range.
    task_at(
        app,
        &user,
        &project,
        "2024-02-25T08:00:00Z",
        Some("2024-03-01T00:00:00Z"),
    )
    .await;
    // Created and completed inside the range.
    task_at(
        app,
        &user,
        &project,
        "2024-03-02T09:00:00Z",
        Some("2024-03-04T15:00:00Z"),
    )
    .await;
    // The last second of a day still belongs to it.
    task_at(app, &user, &project, "2024-03-02T23:59:59Z", None).await;
    // The first instant of the last day.
    task_at(app, &user, &project, "2024-03-05T00:00:00Z", None).await;
    // Outside the range: completed before it, and created after it.
    task_at(
        app,
        &user,
        &project,
        "2024-02-01T00:00:00Z",
        Some("2024-02-10T00:00:00Z"),
    )
    .await;
    task_at(app, &user, &project, "2024-03-06T00:00:00Z", None).await;
    // Another workspace's task, even the same user's, does not count.
    let other_workspace = app.create_workspace(&user).await;
    let other_project = app.create_project(&user, id(&other_workspace)).await;
    task_at(app, &user, &other_project, "2024-03-03T12:00:00Z", None).await;
    // And one today, through the API.
    app.create_task(&user, id(&project), json!({ "title": "today" })).await;
    (user, workspace, project)
}

#[tokio::test]
async fn daily_metrics_count_created_completed_and_open_tasks_per_utc_day() {
    let app = TestApp::spawn().await;
    let (user, workspace, _) = history(&app).await;

    let response = daily(&app, &user, &workspace, "?from=2024-03-01&to=2024-03-05").await;

    response.assert_status(200);
    assert_eq!(
        response.body,
        json!({
            "workspaceId": workspace["id"],
            "from": "2024-03-01",
            "to": "2024-03-05",
            "days": [
                day("2024-03-01", 0, 1, 1),
                day("2024-03-02", 2, 0, 3),
                day("2024-03-03", 0, 0, 3),
                day("2024-03-04", 0, 1, 2),
                day("2024-03-05", 1, 0, 3),
            ],
        })
    );
}

#[tokio::test]
async fn daily_metrics_return_one_entry_per_day_including_days_without_tasks() {
    let app = TestApp::spawn().await;
    let (user, workspace, project) = app.user_with_project().await;
    task_at(&app, &user, &project, "2024-02-28T12:00:00Z", None).await;

    let response = daily(&app, &user, &workspace, "?from=2024-02-26&to=2024-03-02").await;

    response.assert_status(200);
    assert_eq!(
        response.body["days"],
        json!([
            day("2024-02-26", 0, 0, 0),
            day("2024-02-27", 0, 0, 0),
            day("2024-02-28", 1, 0, 1),
            day("2024-02-29", 0, 0, 1),
            day("2024-03-01", 0, 0, 1),
            day("2024-03-02", 0, 0, 1),
        ])
    );
}

#[tokio::test]
async fn daily_metrics_of_a_workspace_without_tasks_are_all_zero() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;
    let workspace = app.create_workspace(&user).await;

    let one_day = daily(&app, &user, &workspace, "?from=2024-03-01&to=2024-03-01").await;
    one_day.assert_status(200);
    assert_eq!(one_day.body["days"], json!([day("2024-03-01", 0, 0, 0)]));

    let three_days = daily(&app, &user, &workspace, "?from=2023-12-31&to=2024-01-02").await;
    three_days.assert_status(200);
    assert_eq!(
        three_days.body["days"],
        json!([
            day("2023-12-31", 0, 0, 0),
            day("2024-01-01", 0, 0, 0),
            day("2024-01-02", 0, 0, 0),
        ])
    );
}

#[tokio::test]
async fn tasks_created_and_completed_through_the_api_count_today() {
    let app = TestApp::spawn().await;
    let (user, workspace, project) = app.user_with_project().await;
    let task = app.create_task(&user, id(&project), json!({ "title": "Today" })).await;
    // Yesterday to tomorrow, so the test holds when it runs across a UTC midnight.
    let today = Utc::now().date_naive();
    let query = format!("?from={}&to={}", today - Days::new(1), today + Days::new(1));
    let totals = |body: &Value, key: &str| -> i64 {
        body["days"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d[key].as_i64().unwrap())
            .sum()
    };

    let open = daily(&app, &user, &workspace, &query).await;
    open.assert_status(200);
    assert_eq!(totals(&open.body, "created"), 1, "{}", open.text);
    assert_eq!(totals(&open.body, "completed"), 0, "{}", open.text);
    assert_eq!(open.body["days"][2]["openAtEndOfDay"], 1, "{}", open.text);

    app.patch(
        &format!("/api/tasks/{}", id(&task)),
        &user.token,
        json!({ "status": "done" }),
    )
    .await
    .assert_status(200);

    let done = daily(&app, &user, &workspace, &query).await;
    assert_eq!(totals(&done.body, "created"), 1, "{}", done.text);
    assert_eq!(totals(&done.body, "completed"), 1, "{}", done.text);
    assert_eq!(done.body["days"][2]["openAtEndOfDay"], 0, "{}", done.text);
}

#[tokio::test]
async fn deleted_tasks_leave_the_history() {
    let app = TestApp::spawn().await;
    let (user, workspace, project) = app.user_with_project().await;
    let task = task_at(&app, &user, &project, "2024-03-01T12:00:00Z", None).await;
    let query = "?from=2024-03-01&to=2024-03-01";
    let before = daily(&app, &user, &workspace, query).await;
    assert_eq!(before.body["days"], json!([day("2024-03-01", 1, 0, 1)]));

    app.delete(&format!("/api/tasks/{}", id(&task)), &user.token)
        .await
        .assert_status(204);

    let after = daily(&app, &user, &workspace, query).await;
    assert_eq!(after.body["days"], json!([day("2024-03-01", 0, 0, 0)]));
}

#[tokio::test]
async fn a_range_of_exactly_366_days_returns_366_entries() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;
    let workspace = app.create_workspace(&user).await;

    for (from, to) in [("2024-01-01", "2024-12-31"), ("2023-03-01", "2024-02-29")] {
        let response = daily(&app, &user, &workspace, &format!("?from={from}&to={to}")).await;

        response.assert_status(200);
        let dates: Vec<NaiveDate> = response.body["days"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["date"].as_str().unwrap().parse().unwrap())
            .collect();
        assert_eq!(dates.len(), 366, "{from}..{to}");
        assert_eq!(dates[0].to_string(), from);
        assert_eq!(dates[365].to_string(), to);
        assert!(
            dates.windows(2).all(|w| w[1] == w[0] + Days::new(1)),
            "consecutive days, {from}..{to}"
        );
    }
}

#[tokio::test]
async fn a_range_over_366_days_is_400_validation_failed_naming_to() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;
    let workspace = app.create_workspace(&user).await;

    for query in [
        "?from=2024-01-01&to=2025-01-01",
        "?from=2023-01-01&to=2024-01-02",
        "?from=2000-01-01&to=2024-12-31",
    ] {
        let response = daily(&app, &user, &workspace, query).await;
        assert_eq!(response.status, 400, "{query}: {}", response.text);
        response.assert_error(400, "validation_failed");
        assert!(response.body["details"]["to"].is_array(), "{query}: {}", response.text);
    }
}

#[tokio::test]
async fn from_after_to_is_400_validation_failed_naming_from() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;
    let workspace = app.create_workspace(&user).await;

    let response = daily(&app, &user, &workspace, "?from=2024-03-02&to=2024-03-01").await;

    response.assert_error(400, "validation_failed");
    assert!(response.body["details"]["from"].is_array(), "{}", response.text);
}

#[tokio::test]
async fn missing_or_malformed_dates_are_400_invalid_query() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;
    let workspace = app.create_workspace(&user).await;

    for (reason, query) in [
        ("no parameters", ""),
        ("missing to", "?from=2024-03-01"),
        ("missing from", "?to=2024-03-01"),
        ("empty to", "?from=2024-03-01&to="),
        ("month 13", "?from=2024-13-01&to=2024-12-31"),
        ("February 30th", "?from=2024-02-01&to=2024-02-30"),
        ("day first", "?from=01-03-2024&to=2024-03-05"),
        ("a timestamp, not a date", "?from=2024-03-01T00:00:00Z&to=2024-03-05"),
        ("unknown parameter", "?from=2024-03-01&to=2024-03-05&tz=Europe/Berlin"),
    ] {
        let response = daily(&app, &user, &workspace, query).await;
        assert_eq!(response.status, 400, "{reason}: {}", response.text);
        assert_eq!(response.body["code"], "invalid_query", "{reason}: {}", response.text);
    }
}

#[tokio::test]
async fn a_non_member_gets_404_workspace_not_found() {
    let app = TestApp::spawn().await;
    let (owner, workspace, project) = app.user_with_project().await;
    task_at(&app, &owner, &project, "2024-03-01T12:00:00Z", None).await;
    let stranger = app.register_user().await;
    let query = "?from=2024-03-01&to=2024-03-01";

    daily(&app, &stranger, &workspace, query)
        .await
        .assert_error(404, "workspace_not_found");
    let missing = json!({ "id": uuid::Uuid::new_v4() });
    daily(&app, &owner, &missing, query)
        .await
        .assert_error(404, "workspace_not_found");

    // Once a member, the same request answers.
    app.add_member(&owner, id(&workspace), &stranger).await;
    let member = daily(&app, &stranger, &workspace, query).await;
    member.assert_status(200);
    assert_eq!(member.body["days"], json!([day("2024-03-01", 1, 0, 1)]));
}

#[tokio::test]
async fn daily_metrics_need_a_token() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;
    let workspace = app.create_workspace(&user).await;
    let path = format!(
        "/api/workspaces/{}/metrics/daily?from=2024-03-01&to=2024-03-01",
        id(&workspace)
    );

    app.request(Method::GET, &path, None, None)
        .await
        .assert_error(401, "missing_token");
}

// Rebuilds: the stored days (`daily_metrics`), the lock, the semaphore and the fenced write.

async fn rebuild(app: &TestApp, user: &TestUser, workspace: &Value) -> TestResponse {
    let path = format!("/api/workspaces/{}/metrics/rebuild", id(workspace));
    app.request(Method::POST, &path, Some(&user.token), None).await
}

async fn stored_days(app: &TestApp, workspace: &Value) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM daily_metrics WHERE workspace_id = $1")
        .bind(id(workspace).parse::<uuid::Uuid>().unwrap())
        .fetch_one(&app.db)
        .await
        .unwrap()
}

/// Ranges over the stored days, around their start, and up to today and beyond.
fn ranges() -> Vec<String> {
    let today = Utc::now().date_naive();
    vec![
        "?from=2024-03-01&to=2024-03-05".to_owned(),
        "?from=2024-01-20&to=2024-02-25".to_owned(),
        "?from=2023-12-31&to=2024-01-02".to_owned(),
        format!("?from={}&to={}", today - Days::new(364), today + Days::new(1)),
        format!("?from={}&to={}", today - Days::new(2), today + Days::new(3)),
    ]
}

async fn answers(app: &TestApp, user: &TestUser, workspace: &Value) -> Vec<Value> {
    let mut bodies = Vec::new();
    for query in ranges() {
        let path = format!("/api/workspaces/{}/metrics/daily{query}", id(workspace));
        let response = app.get_fresh(&path, &user.token).await;
        response.assert_status(200);
        bodies.push(response.body);
    }
    bodies
}

#[tokio::test]
async fn a_rebuild_stores_the_days_and_the_answers_stay_the_same() {
    let app = TestApp::spawn().await;
    let (user, workspace, _) = history(&app).await;
    let query = "?from=2024-03-01&to=2024-03-05";
    let cached = daily(&app, &user, &workspace, query).await;
    let before = answers(&app, &user, &workspace).await;
    assert_eq!(stored_days(&app, &workspace).await, 0);

    let rebuilt = rebuild(&app, &user, &workspace).await;

    rebuilt.assert_status(200);
    let today = Utc::now().date_naive();
    let days = (today - NaiveDate::from_ymd_opt(2024, 2, 1).unwrap()).num_days() + 1;
    assert_eq!(rebuilt.body["workspaceId"], workspace["id"]);
    assert_eq!(rebuilt.body["from"], "2024-02-01", "{}", rebuilt.text);
    assert_eq!(rebuilt.body["to"], today.to_string(), "{}", rebuilt.text);
    assert_eq!(rebuilt.body["days"], days, "{}", rebuilt.text);
    assert!(rebuilt.body["fence"].as_i64().unwrap() > 0, "{}", rebuilt.text);
    assert_eq!(stored_days(&app, &workspace).await, days);
    assert_eq!(answers(&app, &user, &workspace).await, before);
    // The cached answer was dropped, and the one read from the table is the same bytes.
    let after = daily(&app, &user, &workspace, query).await;
    assert_eq!(after.header("x-cache"), Some("MISS"), "{:?}", after.headers);
    assert_eq!(after.text, cached.text);
    assert_eq!(after.header("etag"), cached.header("etag"));

    // A second rebuild writes under a higher fence, and changes nothing either.
    let again = rebuild(&app, &user, &workspace).await;
    again.assert_status(200);
    assert!(
        again.body["fence"].as_i64() > rebuilt.body["fence"].as_i64(),
        "{}",
        again.text
    );
    assert_eq!(answers(&app, &user, &workspace).await, before);
}

#[tokio::test]
async fn daily_metrics_are_read_from_the_stored_days_where_there_are_some() {
    let app = TestApp::spawn().await;
    let (user, workspace, _) = history(&app).await;
    rebuild(&app, &user, &workspace).await.assert_status(200);
    // Only the table could answer this: no task says so.
    sqlx::query("UPDATE daily_metrics SET created = 42 WHERE workspace_id = $1 AND date = '2024-03-03'")
        .bind(id(&workspace).parse::<uuid::Uuid>().unwrap())
        .execute(&app.db)
        .await
        .unwrap();

    let path = format!(
        "/api/workspaces/{}/metrics/daily?from=2024-03-03&to=2024-03-03",
        id(&workspace)
    );
    let read = app.get_fresh(&path, &user.token).await;

    assert_eq!(read.body["days"], json!([day("2024-03-03", 42, 0, 3)]), "{}", read.text);
}

/// After each kind of task change, the answers (stored days where they are left, counted days
/// elsewhere) equal those counted from the tasks alone, with no stored day at all.
#[tokio::test]
async fn task_changes_after_a_rebuild_keep_every_answer_exact() {
    let app = TestApp::spawn().await;
    let (user, workspace, project) = history(&app).await;
    let old = task_at(&app, &user, &project, "2024-02-27T12:00:00Z", None).await;
    let ws: uuid::Uuid = id(&workspace).parse().unwrap();
    let counted_from_tasks = |app: &TestApp| {
        let pool = app.db.clone();
        async move {
            sqlx::query("DELETE FROM daily_metrics WHERE workspace_id = $1")
                .bind(ws)
                .execute(&pool)
                .await
                .unwrap();
        }
    };
    let task_path = |task: &Value| format!("/api/tasks/{}", id(task));
    for step in [
        "create today",
        "complete",
        "reopen",
        "backdate",
        "delete an old task",
        "rename",
    ] {
        rebuild(&app, &user, &workspace).await.assert_status(200);
        match step {
            "create today" => {
                app.create_task(&user, id(&project), json!({ "title": "new" })).await;
            }
            "complete" => {
                app.patch(&task_path(&old), &user.token, json!({ "status": "done" }))
                    .await
                    .assert_status(200);
            }
            "reopen" => {
                app.patch(&task_path(&old), &user.token, json!({ "status": "todo" }))
                    .await
                    .assert_status(200);
            }
            "backdate" => backdate(&app, &old, "2024-02-21T12:00:00Z", None).await,
            "delete an old task" => {
                app.delete(&task_path(&old), &user.token).await.assert_status(204);
            }
            "rename" => {
                let first = sqlx::query_scalar::<_, uuid::Uuid>(
                    "SELECT id FROM tasks WHERE workspace_id = $1 ORDER BY created_at LIMIT 1",
                )
                .bind(ws)
                .fetch_one(&app.db)
                .await
                .unwrap();
                let stored = stored_days(&app, &workspace).await;
                app.patch(
                    &format!("/api/tasks/{first}"),
                    &user.token,
                    json!({ "title": "renamed" }),
                )
                .await
                .assert_status(200);
                assert_eq!(stored_days(&app, &workspace).await, stored, "a rename moves no count");
            }
            _ => unreachable!(),
        }
        let read = answers(&app, &user, &workspace).await;
        counted_from_tasks(&app).await;
        let counted = answers(&app, &user, &workspace).await;
        for ((query, read), counted) in ranges().iter().zip(&read).zip(&counted) {
            let differing: Vec<_> = read["days"]
                .as_array()
                .unwrap()
                .iter()
                .zip(counted["days"].as_array().unwrap())
                .filter(|(read, counted)| read != counted)
                .map(|(read, counted)| format!("{read} (counted: {counted})"))
                .collect();
            assert!(differing.is_empty(), "after {step}, {query}: {differing:?}");
            assert_eq!(read, counted, "after {step}, {query}");
        }
    }
}

#[tokio::test]
async fn only_owners_may_rebuild_daily_metrics() {
    let app = TestApp::spawn().await;
    let (owner, workspace, _) = app.user_with_project().await;
    let member = app.register_user().await;
    app.add_member(&owner, id(&workspace), &member).await;
    let stranger = app.register_user().await;

    rebuild(&app, &member, &workspace).await.assert_error(403, "forbidden");
    rebuild(&app, &stranger, &workspace)
        .await
        .assert_error(404, "workspace_not_found");
    let missing = json!({ "id": uuid::Uuid::new_v4() });
    rebuild(&app, &owner, &missing)
        .await
        .assert_error(404, "workspace_not_found");
    let path = format!("/api/workspaces/{}/metrics/rebuild", id(&workspace));
    app.request(Method::POST, &path, None, None)
        .await
        .assert_error(401, "missing_token");
    assert_eq!(stored_days(&app, &workspace).await, 0);
    rebuild(&app, &owner, &workspace).await.assert_status(200);
}

/// With every permit of the fleet's rebuild semaphore taken (by another instance, here a
/// container of the test's own), a rebuild answers 429 at once; with one free, it runs.
#[tokio::test]
async fn a_rebuild_over_the_concurrency_cap_answers_429_with_retry_after() {
    use nestling::infra::locks::Semaphore;
    use nestling::modules::metrics::service::REBUILDS;
    for redis in [false, true] {
        let builder = TestApp::builder().settings(|s| s.locks.metrics_rebuild_concurrency = 2);
        let app = if redis {
            builder.redis(crate::helpers::shared_redis()).spawn().await
        } else {
            builder.spawn().await
        };
        let (user, workspace, _) = app.user_with_project().await;
        let other = app.real_component::<dyn Semaphore>();
        let ttl = std::time::Duration::from_secs(30);
        let first = other
            .acquire(REBUILDS, 2, ttl, std::time::Duration::ZERO)
            .await
            .unwrap();
        let second = other
            .acquire(REBUILDS, 2, ttl, std::time::Duration::ZERO)
            .await
            .unwrap();

        let refused = rebuild(&app, &user, &workspace).await;

        refused.assert_error(429, "too_many_rebuilds");
        assert_eq!(refused.header("retry-after"), Some("1"), "redis {redis}");
        assert_eq!(stored_days(&app, &workspace).await, 0);
        other.release(first).await.unwrap();
        rebuild(&app, &user, &workspace).await.assert_status(200);
        other.release(second).await.unwrap();
    }
}

#[tokio::test]
async fn a_rebuild_waits_for_one_of_the_same_workspace_then_answers_409() {
    use nestling::infra::locks::LockService;
    use nestling::modules::metrics::service::rebuild_lock;
    let app = TestApp::spawn().await;
    let (user, workspace, _) = app.user_with_project().await;
    let locks = app.real_component::<dyn LockService>();
    let running = locks
        .acquire(
            &rebuild_lock(id(&workspace).parse().unwrap()),
            std::time::Duration::from_secs(30),
            std::time::Duration::ZERO,
        )
        .await
        .unwrap();

    let started = std::time::Instant::now();
    rebuild(&app, &user, &workspace)
        .await
        .assert_error(409, "rebuild_in_progress");
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    locks.release(running).await.unwrap();
    rebuild(&app, &user, &workspace).await.assert_status(200);
}

/// The fenced write: a rebuild under a lower fence than the last one written (its holder paused
/// past its lease while a newer rebuild ran) is refused, and the stored days stay the newer's.
#[tokio::test]
async fn a_rebuild_under_an_older_fence_is_refused() {
    use nestling::infra::locks::LockService;
    use nestling::modules::metrics::repository::{MetricsRepository, Rebuild};
    use nestling::modules::metrics::service::rebuild_lock;
    let app = TestApp::spawn().await;
    let (user, workspace, _) = history(&app).await;
    let ws: uuid::Uuid = id(&workspace).parse().unwrap();
    let (locks, metrics) = (
        app.real_component::<dyn LockService>(),
        app.real_component::<dyn MetricsRepository>(),
    );
    let lease = std::time::Duration::from_millis(200);
    let paused = locks
        .acquire(&rebuild_lock(ws), lease, std::time::Duration::ZERO)
        .await
        .unwrap();
    tokio::time::sleep(lease).await;
    let newer = locks
        .acquire(&rebuild_lock(ws), lease, std::time::Duration::from_secs(1))
        .await
        .unwrap();
    assert!(matches!(
        metrics.rebuild(ws, newer.fence()).await,
        Ok(Rebuild::Written { .. })
    ));
    let stored = stored_days(&app, &workspace).await;

    let refused = metrics.rebuild(ws, paused.fence()).await.unwrap();

    assert_eq!(refused, Rebuild::Superseded);
    assert_eq!(stored_days(&app, &workspace).await, stored);
    // The endpoint's next rebuild takes a newer fence still, and is written.
    let next = rebuild(&app, &user, &workspace).await;
    next.assert_status(200);
    assert!(
        next.body["fence"].as_i64().unwrap() > newer.fence().get(),
        "{}",
        next.text
    );
}
