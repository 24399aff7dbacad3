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

#[tokio::test]
async fn daily_metrics_count_created_completed_and_open_tasks_per_utc_day() {
    let app = TestApp::spawn().await;
    let (user, workspace, project) = app.user_with_project().await;
    // Created before the range and still open: open on every day.
    task_at(&app, &user, &project, "2024-02-20T10:00:00Z", None).await;
    // Completed exactly at the first midnight: completed on day one, never open inside the range.
    task_at(
        &app,
        &user,
        &project,
        "2024-02-25T08:00:00Z",
        Some("2024-03-01T00:00:00Z"),
    )
    .await;
    // Created and completed inside the range.
    task_at(
        &app,
        &user,
        &project,
        "2024-03-02T09:00:00Z",
        Some("2024-03-04T15:00:00Z"),
    )
    .await;
    // The last second of a day still belongs to it.
    task_at(&app, &user, &project, "2024-03-02T23:59:59Z", None).await;
    // The first instant of the last day.
    task_at(&app, &user, &project, "2024-03-05T00:00:00Z", None).await;
    // Outside the range: completed before it, and created after it.
    task_at(
        &app,
        &user,
        &project,
        "2024-02-01T00:00:00Z",
        Some("2024-02-10T00:00:00Z"),
    )
    .await;
    task_at(&app, &user, &project, "2024-03-06T00:00:00Z", None).await;
    // Another workspace's task, even the same user's, does not count.
    let other_workspace = app.create_workspace(&user).await;
    let other_project = app.create_project(&user, id(&other_workspace)).await;
    task_at(&app, &user, &other_project, "2024-03-03T12:00:00Z", None).await;

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
