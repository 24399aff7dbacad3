//! Password hashing is bounded: 500 concurrent wrong-password logins raise the server's peak RSS
//! by no more than (slots + 2) × one hash's memory, and every one of them answers 401, 429 or 503
//! within 10 s. Measured on the real binary, so the RSS is the server's alone; a control run with
//! as many slots as logins shows the same measurement catching an unbounded hasher.

use std::process::Stdio;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use nestling::infra::database::local_server::free_port;
use serde_json::json;

use crate::helpers::{shared_postgres, TestApp};

/// argon2's default memory cost (m = 19456 KiB), the one `Argon2::default()` uses.
const HASH_MEMORY: u64 = 19_456 * 1024;

/// A field of /proc/<pid>/status, in bytes (VmRSS, VmHWM).
fn memory(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.trim().strip_suffix("kB"))
        .map(|value| value.trim().parse().unwrap())
        .unwrap();
    kib * 1024
}

struct Run {
    growth: u64,
    statuses: Vec<u16>,
    slowest: Duration,
}

/// Starts the binary with `slots` hashing slots, warms it with one login, then sends `logins`
/// concurrent wrong-password logins; returns the rise of the peak RSS over the warm RSS.
async fn concurrent_logins(slots: usize, wait_ms: u64, logins: usize) -> Run {
    let app = TestApp::spawn().await;
    let postgres = tokio::task::spawn_blocking(shared_postgres).await.unwrap();
    let port = free_port().unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_nestling"))
        .current_dir(std::env::temp_dir())
        .env("DATABASE_URL", postgres.url(&app.db_name))
        .env("APP_PORT", port.to_string())
        .env("APP_WORKERS", "2")
        .env("RUST_LOG", "error")
        .env("REDIS_ENABLED", "false")
        .env("PASSWORD_HASH_CONCURRENCY", slots.to_string())
        .env("PASSWORD_HASH_WAIT_MS", wait_ms.to_string())
        // Hashing is what this measures, not the login rate limit.
        .env("RATE_LIMIT_AUTH_IP", "1000000")
        .env("RATE_LIMIT_AUTH_EMAIL", "1000000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.get(format!("{base}/health/live")).send().await.is_err() {
        assert!(Instant::now() < deadline, "the binary did not start serving");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let login = |n: usize| {
        let (client, base) = (&client, &base);
        async move {
            let started = Instant::now();
            let response = client
                .post(format!("{base}/api/auth/login"))
                .json(&json!({ "email": format!("nobody-{n}@example.com"), "password": "wrong password" }))
                .timeout(Duration::from_secs(10))
                .send()
                .await;
            (response.map(|r| r.status().as_u16()).unwrap_or(0), started.elapsed())
        }
    };
    assert_eq!(login(usize::MAX).await.0, 401, "warm-up login");
    let warm = memory(pid, "VmRSS");
    let results = join_all((0..logins).map(login)).await;
    let peak = memory(pid, "VmHWM");
    let _ = child.kill().await;
    Run {
        growth: peak.saturating_sub(warm),
        statuses: results.iter().map(|(status, _)| *status).collect(),
        slowest: results.iter().map(|(_, took)| *took).max().unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_wrong_password_logins_stay_within_the_hashing_memory_bound() {
    const SLOTS: usize = 2;
    let run = concurrent_logins(SLOTS, 500, 500).await;
    let bound = (SLOTS as u64 + 2) * HASH_MEMORY;
    assert!(
        run.growth <= bound,
        "peak RSS rose by {} MiB, bound {} MiB",
        run.growth >> 20,
        bound >> 20
    );
    for status in &run.statuses {
        assert!([401, 429, 503].contains(status), "a login answered {status}");
    }
    assert!(run.statuses.contains(&401), "some logins were hashed");
    assert!(run.statuses.contains(&503), "some waited past PASSWORD_HASH_WAIT_MS");
    assert!(
        run.slowest < Duration::from_secs(10),
        "slowest answer {:?}",
        run.slowest
    );
}

/// The control: as many slots as concurrent logins (what the blocking pool used to give: a hash
/// per login) and the same measurement goes far past the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_bound_concurrent_logins_take_a_hash_of_memory_each() {
    let run = concurrent_logins(48, 10_000, 48).await;
    assert!(run.statuses.iter().all(|s| *s == 401), "{:?}", run.statuses);
    assert!(
        run.growth > 4 * HASH_MEMORY,
        "peak RSS rose by only {} MiB: the control would not catch an unbounded hasher",
        run.growth >> 20
    );
}
