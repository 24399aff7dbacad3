//! The `nestling` binary as a user runs it: configuration errors, migrate, graceful shutdown.

use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::helpers::{shared_postgres, TestApp};
use nestling::infra::database::local_server::free_port;

pub(crate) fn nestling() -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_nestling"));
    // Run from a folder without a .env file, so only what the test sets applies.
    command
        .current_dir(std::env::temp_dir())
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn");
    command
}

#[tokio::test]
async fn an_invalid_variable_stops_startup_with_one_line_naming_it() {
    let cases = [
        ("APP_PORT", "eighty"),
        ("REDIS_ENABLED", "maybe"),
        ("DATABASE_STATEMENT_TIMEOUT_MS", "0"),
        ("JOBS_PURGE_SCHEDULE", "hourly"),
    ];
    for (variable, value) in cases {
        let output = nestling().env(variable, value).output().await.unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{variable}={value}: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{variable}={value}: one line, got {stderr}");
        assert!(
            lines[0].contains(variable) && lines[0].contains(value),
            "{variable}={value}: {stderr}"
        );
    }
}

#[tokio::test]
async fn migrate_creates_a_missing_database_and_applies_migrations() {
    let postgres = tokio::task::spawn_blocking(shared_postgres).await.unwrap();
    let name = format!("cli_{}", uuid::Uuid::new_v4().simple());
    let status = nestling()
        .arg("migrate")
        .env("DATABASE_URL", postgres.url(&name))
        .status()
        .await
        .unwrap();
    assert!(status.success());
    let pool = sqlx::PgPool::connect(&postgres.url(&name)).await.unwrap();
    let tables: i64 = sqlx::query_scalar("SELECT count(*) FROM information_schema.tables WHERE table_name = 'tasks'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(tables, 1);
    pool.close().await;
    let admin = sqlx::PgPool::connect(&postgres.url("postgres")).await.unwrap();
    sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
}

/// The binary serving `app`'s database (made by the harness) on `port`.
async fn serving(app: &TestApp, port: u16, shutdown_delay: &str) -> tokio::process::Child {
    let url = format!(
        "postgres://postgres@127.0.0.1:{}/{}",
        shared_postgres_port().await,
        app.db_name
    );
    nestling()
        .env("DATABASE_URL", url)
        .env("APP_PORT", port.to_string())
        .env("APP_WORKERS", "1")
        .env("APP_SHUTDOWN_DELAY", shutdown_delay)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// SIGTERM, and how the process exited.
async fn exit_after_sigterm(mut child: tokio::process::Child) -> std::process::ExitStatus {
    // SAFETY: signalling the child this test spawned.
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) };
    tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap()
}

#[tokio::test]
async fn sigterm_stops_the_server_gracefully() {
    let app = TestApp::spawn().await;
    let port = free_port().unwrap();
    let child = serving(&app, port, "1").await;
    let live = format!("http://127.0.0.1:{port}/health/live");
    let deadline = Instant::now() + Duration::from_secs(20);
    while app.client.get(&live).send().await.is_err() {
        assert!(Instant::now() < deadline, "the binary did not start serving");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = exit_after_sigterm(child).await;
    assert!(status.success(), "graceful shutdown exits 0, got {status}");
}

/// A SIGTERM that arrives the moment the instance accepts its first connection (a rolling
/// restart that stops an instance which has only just started) stops it gracefully too: exit 0,
/// not killed by the signal's default action. The listeners were once installed after the
/// server had started accepting, and this killed the process now and then.
#[tokio::test]
async fn a_sigterm_while_the_instance_starts_still_stops_it_gracefully() {
    let app = TestApp::spawn().await;
    for attempt in 0..10 {
        let port = free_port().unwrap();
        let child = serving(&app, port, "0").await;
        // The first moment a connection is accepted: no HTTP round trip in between.
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the binary did not start serving");
            std::thread::yield_now();
        }
        let status = exit_after_sigterm(child).await;
        assert!(status.success(), "attempt {attempt}: exited with {status}");
    }
}

async fn shared_postgres_port() -> u16 {
    tokio::task::spawn_blocking(shared_postgres).await.unwrap().port
}

/// The dev service: with the default DATABASE_URL refusing connections in development, `migrate`
/// starts a private Postgres in `.nestling/pg` of the working directory and says so in one line.
/// A second run reuses it. Skipped when something listens on the default port: that server is
/// not ours to touch.
#[tokio::test]
async fn the_dev_service_starts_a_private_postgres_when_the_default_database_refuses() {
    if std::net::TcpStream::connect(("127.0.0.1", 5432)).is_ok() || std::net::TcpStream::connect(("::1", 5432)).is_ok()
    {
        eprintln!("skipped: a server listens on port 5432, so the default database does not refuse connections");
        return;
    }
    let project = tempfile::Builder::new().prefix("nestling-devsvc-").tempdir().unwrap();
    let dir = project.path().to_path_buf();
    // As root the cluster runs as `postgres`, which must reach the folder (temp dirs are 0700).
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let run = || {
        let mut command = nestling();
        command
            .current_dir(&dir)
            .arg("migrate")
            .env("APP_ENV", "development")
            .env("RUST_LOG", "info");
        command
    };
    let first = run().output().await.unwrap();
    let log = String::from_utf8_lossy(&first.stderr).to_string();
    let data = dir.join(".nestling/pg");
    let stop = || {
        let pg_ctl = nestling::infra::database::local_server::PgBinaries::locate().unwrap();
        let _ = pg_ctl
            .command("pg_ctl")
            .arg("stop")
            .arg("-D")
            .arg(&data)
            .args(["-m", "immediate"])
            .output();
    };
    if !first.status.success() {
        stop();
        panic!("migrate with the dev service failed:\n{log}");
    }
    let lines: Vec<&str> = log.lines().filter(|line| line.contains("dev service:")).collect();
    assert_eq!(lines.len(), 1, "one log line about the dev service:\n{log}");
    assert!(
        lines[0].contains("started a private Postgres") && lines[0].contains("pg_ctl"),
        "{}",
        lines[0]
    );
    assert!(data.join("PG_VERSION").exists(), "the cluster lives in .nestling/pg");

    let second = run().output().await.unwrap();
    let log = String::from_utf8_lossy(&second.stderr).to_string();
    stop();
    assert!(second.status.success(), "{log}");
    assert!(
        log.contains("dev service: using the private Postgres"),
        "the second run reuses it:\n{log}"
    );
}

#[tokio::test]
async fn admin_grant_and_revoke_change_a_users_role_and_name_an_unknown_email() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;
    let admin = |action: &'static str, email: String| {
        let url = app.settings.database.url.clone();
        async move {
            nestling()
                .args(["admin", action, &email])
                .env("DATABASE_URL", url)
                .output()
                .await
                .unwrap()
        }
    };
    let role = || async {
        sqlx::query_scalar::<_, bool>("SELECT is_admin FROM users WHERE id = $1")
            .bind(user.id)
            .fetch_one(&app.db)
            .await
            .unwrap()
    };
    assert!(admin("grant", user.email.clone()).await.status.success());
    assert!(role().await, "granted");
    assert!(admin("revoke", user.email.to_uppercase()).await.status.success());
    assert!(!role().await, "revoked (emails compare case-insensitively)");
    let unknown = admin("grant", "nobody@example.com".into()).await;
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert_eq!(unknown.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.trim().lines().count() == 1 && stderr.contains("nobody@example.com"),
        "{stderr}"
    );
}

/// `nestling redis check` against `url`: (exit code, stdout, how long it took).
async fn redis_check(url: &str) -> (Option<i32>, String, Duration) {
    redis_check_with("REDIS_URL", url).await
}

/// `nestling redis check` with `variable` (`REDIS_URL` or `REDIS_CLUSTER_NODES`) set to `value`.
pub(crate) async fn redis_check_with(variable: &str, value: &str) -> (Option<i32>, String, Duration) {
    let started = Instant::now();
    let output = nestling()
        .args(["redis", "check"])
        .env(variable, value)
        .env("REDIS_KEY_PREFIX", format!("check-{}:", uuid::Uuid::new_v4().simple()))
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    (output.status.code(), stdout, started.elapsed())
}

/// Every key nestling writes expires, so no policy spares the rate limits: the check passes the
/// LRU policy nestling recommends and warns about those that evict rate limits first.
#[tokio::test]
async fn redis_check_passes_on_a_usable_redis_and_warns_when_eviction_takes_rate_limits_first() {
    let redis = crate::helpers::private_redis().await;
    let (code, stdout, _) = redis_check(&redis.url()).await;
    assert_eq!(code, Some(0), "{stdout}");
    for line in ["ok   ping", "ok   server: Redis ", "ok   round trip"] {
        assert!(stdout.contains(line), "no {line:?} in:\n{stdout}");
    }

    redis.config_set("maxmemory-policy", "allkeys-lru").await;
    let (code, stdout, _) = redis_check(&redis.url()).await;
    assert_eq!(code, Some(0), "{stdout}");
    assert!(
        stdout.contains("ok   maxmemory-policy: allkeys-lru"),
        "the recommended policy passes:\n{stdout}"
    );

    redis.config_set("maxmemory-policy", "volatile-ttl").await;
    let (code, stdout, _) = redis_check(&redis.url()).await;
    assert_eq!(code, Some(0), "warnings do not fail the check:\n{stdout}");
    let warning = stdout
        .lines()
        .find(|line| line.starts_with("warn") && line.contains("volatile-ttl"))
        .unwrap_or_else(|| panic!("no eviction warning in:\n{stdout}"));
    assert!(warning.contains("rate limits"), "{warning}");
}

#[tokio::test]
async fn redis_check_fails_within_seconds_when_redis_refuses_or_is_frozen() {
    let nobody = format!("redis://127.0.0.1:{}", free_port().unwrap());
    let (code, stdout, took) = redis_check(&nobody).await;
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.lines().any(|l| l.starts_with("FAIL") && l.contains("refused")),
        "{stdout}"
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");

    let redis = crate::helpers::private_redis().await;
    redis.freeze();
    let (code, stdout, took) = redis_check(&redis.url()).await;
    redis.thaw();
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.lines().any(|l| l.starts_with("FAIL") && l.contains("timeout")),
        "{stdout}"
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

/// `nestling health --url <app>`: (exit code, stdout, how long it took).
async fn health_command(url: &str) -> (Option<i32>, String, Duration) {
    let started = Instant::now();
    let output = nestling().args(["health", "--url", url]).output().await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    (output.status.code(), stdout, started.elapsed())
}

#[tokio::test]
async fn health_exits_0_when_the_app_is_healthy_and_1_naming_the_component_that_is_down() {
    let app = TestApp::spawn().await;
    let (code, stdout, _) = health_command(&app.address).await;
    assert_eq!(code, Some(0), "{stdout}");
    for line in ["status: ok", "database: up", "redis: disabled"] {
        assert!(stdout.lines().any(|l| l == line), "no {line:?} in:\n{stdout}");
    }

    let redis = crate::helpers::private_redis().await;
    let with_redis = TestApp::builder().redis(&redis).spawn().await;
    redis.kill();
    // /health reuses the PING start-up made for up to a second: wait for it to tell the kill.
    let by = Instant::now() + nestling::modules::health::service::PROBE_TTL * 2;
    loop {
        let health = with_redis.request(reqwest::Method::GET, "/health", None, None).await;
        if health.status == 503 {
            break;
        }
        assert!(Instant::now() < by, "/health never told the kill: {}", health.text);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (code, stdout, took) = health_command(&with_redis.address).await;
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.lines().any(|l| l == "status: error"), "{stdout}");
    assert!(stdout.lines().any(|l| l.starts_with("redis: down")), "{stdout}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

#[tokio::test]
async fn health_exits_1_at_once_when_no_app_answers() {
    let nobody = format!("http://127.0.0.1:{}", free_port().unwrap());
    let (code, stdout, took) = health_command(&nobody).await;
    assert_eq!(code, Some(1), "{stdout}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

/// `nestling jobs <args>` against the app's database: (exit code, stdout, stderr).
async fn jobs_command(app: &TestApp, args: &[&str]) -> (Option<i32>, String, String) {
    let output = nestling()
        .arg("jobs")
        .args(args)
        .env("DATABASE_URL", &app.settings.database.url)
        .output()
        .await
        .unwrap();
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (output.status.code(), text(&output.stdout), text(&output.stderr))
}

/// The lines of a table `nestling jobs list` printed, each split into its columns.
fn table(stdout: &str) -> Vec<Vec<&str>> {
    stdout.lines().map(|line| line.split_whitespace().collect()).collect()
}

#[tokio::test]
async fn jobs_list_shows_counts_by_queue_and_state_and_with_dead_each_dead_job_on_one_line() {
    let app = TestApp::spawn().await;
    let (id, _, _) = crate::jobs_admin::dead_job(&app, "test.mail", "smtp refused:\n  554 no such user").await;
    let jobs = crate::jobs::queue(&app);
    jobs.register(
        crate::jobs::kind("test.later", 1, crate::jobs::SECOND),
        crate::jobs::recording(Default::default(), |_| Ok(())),
    );
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    let job = nestling::infra::jobs::NewJob::new("test.later", serde_json::json!({}));
    jobs.enqueue(job.at(later)).await.unwrap();

    let (code, stdout, stderr) = jobs_command(&app, &["list"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    let rows = table(&stdout);
    assert_eq!(rows[0][..4], ["QUEUE", "STATE", "JOBS", "DUE"], "{stdout}");
    assert!(rows.contains(&vec!["test", "dead", "1"]), "{stdout}");
    assert!(
        rows.contains(&vec!["test", "queued", "1", "0"]),
        "queued, none due yet:\n{stdout}"
    );

    let (code, stdout, stderr) = jobs_command(&app, &["list", "--dead"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "a header and one line per dead job:\n{stdout}");
    let fields: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(fields[..3], [id.to_string().as_str(), "test.mail", "1"], "{stdout}");
    assert!(lines[1].ends_with("smtp refused: 554 no such user"), "{stdout}");
}

#[tokio::test]
async fn jobs_retry_queues_a_dead_job_for_the_running_instances_and_exits_1_naming_an_id_that_is_not_dead() {
    let app = TestApp::spawn().await;
    let (id, healed, runs) = crate::jobs_admin::dead_job(&app, "test.flaky", "downstream refused").await;
    healed.store(true, std::sync::atomic::Ordering::SeqCst);

    let (code, stdout, stderr) = jobs_command(&app, &["retry", &id.to_string()]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout.trim(), format!("job {id} queued again"));
    // The running instance takes it at its next poll.
    crate::jobs::until_state(&app, id, "done", 5 * crate::jobs::SECOND).await;
    assert_eq!(runs.lock().unwrap().len(), 2);

    for not_dead in [id, id + 1_000] {
        let (code, _, stderr) = jobs_command(&app, &["retry", &not_dead.to_string()]).await;
        assert_eq!(code, Some(1), "{stderr}");
        assert!(
            stderr.trim().lines().count() == 1 && stderr.contains(&format!("no dead job has the id {not_dead}")),
            "{stderr}"
        );
    }
}
