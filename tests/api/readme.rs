//! The README is part of the product: its walk-through runs here against a seeded app, and its
//! TTL table must match the code.

use crate::helpers::{test_settings, TestApp};

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README.md")
}

fn walkthrough_script(readme: &str) -> String {
    let start = readme
        .find("<!-- walkthrough:start -->")
        .expect("walk-through start marker");
    let end = readme
        .find("<!-- walkthrough:end -->")
        .expect("walk-through end marker");
    readme[start..end]
        .lines()
        .filter(|line| !line.starts_with("```") && !line.starts_with("<!--"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn the_readme_walkthrough_works_as_written_against_seeded_data() {
    let app = TestApp::spawn().await;
    nestling::seed::run(&app.db).await.expect("seed");
    let script = walkthrough_script(&readme());
    assert!(
        script.contains("BASE=http://127.0.0.1:8080"),
        "the walk-through targets the default address"
    );
    let script = script.replace("BASE=http://127.0.0.1:8080", &format!("BASE={}", app.address));

    let output = tokio::process::Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .output()
        .await
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "walk-through failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("\"email\":\"demo@nestling.dev\""),
        "shows the demo user:\n{stdout}"
    );
    assert!(
        stdout.contains("\"title\":\"Try nestling\""),
        "shows the new task:\n{stdout}"
    );
    assert!(stdout.contains("\"status\":\"done\""), "shows the task done:\n{stdout}");
    assert!(stdout.contains("\"openAtEndOfDay\""), "shows daily metrics:\n{stdout}");
    assert!(
        stdout.contains("\"code\":\"validation_failed\""),
        "shows the error envelope:\n{stdout}"
    );
}

#[tokio::test]
async fn seeding_twice_keeps_one_copy_of_the_demo_data() {
    let app = TestApp::spawn().await;
    nestling::seed::run(&app.db).await.expect("first seed");
    nestling::seed::run(&app.db).await.expect("second seed");
    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(&app.db)
        .await
        .unwrap();
    let tasks: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks")
        .fetch_one(&app.db)
        .await
        .unwrap();
    let oldest_days: f64 =
        sqlx::query_scalar("SELECT extract(epoch FROM now() - min(created_at))::float8 / 86400 FROM tasks")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!((users, tasks), (2, 300));
    assert!(
        oldest_days > 50.0 && oldest_days <= 60.0,
        "tasks spread over the last 60 days, oldest {oldest_days}"
    );
}

#[test]
fn the_readme_ttl_table_matches_the_code() {
    let readme = readme();
    for (variable, default_seconds, value) in test_settings().ttl.entries() {
        assert_eq!(
            value.as_secs(),
            default_seconds,
            "{variable}: default differs from the documented one"
        );
        let row = format!("| `{variable}` | {default_seconds} |");
        assert!(readme.contains(&row), "README TTL table lacks the row starting {row}");
    }
}

#[test]
fn every_configuration_variable_is_documented_in_the_readme_and_env_example() {
    let env_example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.env.example")).unwrap();
    let readme = readme();
    // What the configuration reads, as `nestling doctor` lists it.
    let (_, variables) = nestling::config::Settings::described(|_| None).unwrap();
    assert!(variables.len() >= 20, "read only {variables:?}");
    for variable in variables.iter().map(|v| v.name) {
        assert!(
            env_example.contains(&format!("{variable}=")),
            "{variable} is missing from .env.example"
        );
        assert!(
            readme.contains(&format!("`{variable}`")),
            "{variable} is missing from the README"
        );
    }
}
