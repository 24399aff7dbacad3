//! `nestling doctor` as a deploy runs it: one line per check, exit 1 naming what fails. Against
//! a real Postgres and a real `redis-server`, each the test's own.

use crate::cli::nestling;
use crate::helpers::instance::TestDatabase;
use crate::helpers::{private_redis, shared_postgres};
use nestling::infra::database::local_server::free_port;

struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Outcome {
    /// The line of one check (`ok   postgres: …`), without the verdict.
    fn line(&self, check: &str) -> (&str, &str) {
        self.stdout
            .lines()
            .find_map(|line| {
                let (verdict, rest) = line.split_once(' ')?;
                rest.trim_start()
                    .strip_prefix(check)?
                    .strip_prefix(": ")
                    .map(|text| (verdict, text))
            })
            .unwrap_or_else(|| panic!("no {check} line in:\n{}{}", self.stdout, self.stderr))
    }
}

async fn doctor(env: &[(&str, &str)]) -> Outcome {
    let output = nestling()
        .arg("doctor")
        .envs(env.iter().copied())
        .output()
        .await
        .unwrap();
    Outcome {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

#[tokio::test]
async fn on_a_ready_deployment_every_check_passes_and_every_variable_shows_set_or_default() {
    let database = TestDatabase::create().await;
    let redis = private_redis().await;
    // A Redis set up as docs/REDIS.md says (else `redis check` warns).
    redis.config_set("maxmemory", "64mb").await;
    redis.config_set("maxmemory-policy", "allkeys-lru").await;
    let redis_url = redis.url();
    let outcome = doctor(&[
        ("DATABASE_URL", &database.url),
        ("REDIS_ENABLED", "true"),
        ("REDIS_URL", &redis_url),
        ("ADMIN_TOKEN", "a-secret-admin-token"),
        ("APP_PORT", "9123"),
    ])
    .await;
    assert_eq!(outcome.code, Some(0), "{}{}", outcome.stdout, outcome.stderr);
    let (verdict, postgres) = outcome.line("postgres");
    assert!(verdict == "ok" && postgres.starts_with("PostgreSQL 15"), "{postgres}");
    let (verdict, migrations) = outcome.line("migrations");
    let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .unwrap()
        .count();
    assert_eq!(
        (verdict, migrations),
        ("ok", format!("{files} of {files} applied, none pending").as_str())
    );
    let (verdict, queue) = outcome.line("job queue");
    assert!(verdict == "ok" && queue.starts_with("reachable: 0 queued"), "{queue}");
    let (verdict, redis_line) = outcome.line("redis");
    assert!(verdict == "ok" && redis_line.contains("usable: Redis "), "{redis_line}");
    let (verdict, clock) = outcome.line("clock");
    assert!(
        verdict == "ok" && clock.contains("Postgres") && clock.contains("Redis"),
        "{clock}"
    );
    // Every variable the configuration reads, each on a line of its own, set or default; a
    // token's value never printed.
    let (_, variables) = nestling::config::Settings::described(|_| None).unwrap();
    let (_, config) = outcome.line("config");
    assert!(
        config.starts_with(&format!("{} variables read", variables.len())),
        "{config}"
    );
    for variable in &variables {
        assert!(
            outcome.stdout.contains(&format!("       {}=", variable.name)),
            "{} is not listed",
            variable.name
        );
    }
    for shown in [
        "APP_PORT=9123 (set)",
        "REDIS_POOL_SIZE=8 (default)",
        "ADMIN_TOKEN=*** (set)",
    ] {
        assert!(outcome.stdout.contains(shown), "no {shown} in\n{}", outcome.stdout);
    }
    assert!(!outcome.stdout.contains("a-secret-admin-token"));
}

#[tokio::test]
async fn each_failure_is_its_own_line_and_the_exit_names_it() {
    // An invalid variable: the config check fails, naming it.
    let outcome = doctor(&[("REDIS_POOL_SIZE", "lots")]).await;
    assert_eq!(outcome.code, Some(1));
    let (verdict, config) = outcome.line("config");
    assert!(verdict == "FAIL" && config.contains("REDIS_POOL_SIZE"), "{config}");
    assert_eq!(outcome.stderr.trim(), "nestling doctor: failed: config");

    // Nothing listens where DATABASE_URL points, and Redis is killed: both fail, the rest say
    // what they could not check.
    let redis = private_redis().await;
    let redis_url = redis.url();
    redis.kill();
    let nowhere = format!("postgres://postgres@127.0.0.1:{}/nestling", free_port().unwrap());
    let outcome = doctor(&[
        ("DATABASE_URL", &nowhere),
        ("REDIS_ENABLED", "true"),
        ("REDIS_URL", &redis_url),
    ])
    .await;
    assert_eq!(outcome.code, Some(1));
    assert_eq!(outcome.line("postgres").0, "FAIL");
    assert_eq!(outcome.line("migrations"), ("warn", "not checked: no database"));
    let (verdict, redis_line) = outcome.line("redis");
    assert!(verdict == "FAIL" && redis_line.contains("refused"), "{redis_line}");
    assert_eq!(outcome.stderr.trim(), "nestling doctor: failed: postgres, redis");
}

#[tokio::test]
async fn pending_migrations_fail_only_when_the_app_would_not_apply_them() {
    let postgres = tokio::task::spawn_blocking(shared_postgres).await.unwrap();
    let name = format!("doctor_{}", uuid::Uuid::new_v4().simple());
    let admin = sqlx::PgPool::connect(&postgres.url("postgres")).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .unwrap();
    let url = postgres.url(&name);
    let applied_on_start = doctor(&[("DATABASE_URL", &url)]).await;
    assert_eq!(applied_on_start.code, Some(0), "{}", applied_on_start.stdout);
    let (verdict, migrations) = applied_on_start.line("migrations");
    assert!(
        verdict == "warn" && migrations.starts_with("0 of ") && migrations.contains("applied on start"),
        "{migrations}"
    );
    assert_eq!(applied_on_start.line("job queue").0, "warn");
    let not_applied = doctor(&[("DATABASE_URL", &url), ("APP_MIGRATE_ON_START", "false")]).await;
    assert_eq!(not_applied.code, Some(1));
    let (verdict, migrations) = not_applied.line("migrations");
    assert!(
        verdict == "FAIL" && migrations.contains("nestling migrate"),
        "{migrations}"
    );
    sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .execute(&admin)
        .await
        .unwrap();
}
