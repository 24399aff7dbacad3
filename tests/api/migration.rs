//! docs/MIGRATION.md, run as written: each phase is a test that reads the document, starts
//! `nestling` processes with the variables of its `env` blocks, runs its `sh` blocks with bash and
//! checks their output against its `text` blocks. Only addresses are swapped for the test's own
//! servers (and the key prefix for one of the test's own, on the shared cluster).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use nestling::infra::redis::ACL_COMMANDS;
use serde_json::{json, Value};

use crate::helpers::instance::{binary, Instance, TestDatabase};
use crate::helpers::redis::{private_redis_with, RedisOptions};
use crate::helpers::servers::ensure_installed;
use crate::helpers::{private_redis, Backend};

const PLAN: &str = include_str!("../../docs/MIGRATION.md");
/// This file: which steps the phase tests run (each by a call of `step` with its id).
const THIS_FILE: &str = include_str!("migration.rs");
/// The addresses of the phase-3 cluster in the document.
const DOC_CLUSTER: &str = "redis://10.0.1.11:6379,redis://10.0.1.12:6379,redis://10.0.1.13:6379";

/// One `### <id> <title>` section: its fenced blocks in order, as (language, text).
struct Step {
    id: String,
    blocks: Vec<(String, String)>,
}

fn steps() -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    let mut fence: Option<(String, String)> = None;
    for line in PLAN.lines() {
        if let Some((language, text)) = &mut fence {
            if line == "```" {
                let block = (language.clone(), std::mem::take(text));
                if let Some(step) = steps.last_mut() {
                    step.blocks.push(block);
                }
                fence = None;
            } else {
                text.push_str(line);
                text.push('\n');
            }
        } else if let Some(language) = line.strip_prefix("```") {
            fence = Some((language.to_owned(), String::new()));
        } else if let Some(heading) = line.strip_prefix("### ") {
            let id = heading.split_whitespace().next().unwrap_or_default().to_owned();
            steps.push(Step { id, blocks: Vec::new() });
        }
    }
    steps
}

fn step(id: &str) -> Step {
    steps()
        .into_iter()
        .find(|step| step.id == id)
        .unwrap_or_else(|| panic!("docs/MIGRATION.md has no step {id}"))
}

/// Values of the document swapped for the test's own, in variables and expected output alike.
type Swaps = Vec<(String, String)>;

fn swapped(text: &str, swaps: &Swaps) -> String {
    swaps
        .iter()
        .fold(text.to_owned(), |text, (from, to)| text.replace(from, to))
}

impl Step {
    fn blocks<'a>(&'a self, language: &'a str) -> impl Iterator<Item = &'a str> {
        self.blocks
            .iter()
            .filter(move |(lang, _)| lang == language)
            .map(|(_, text)| text.as_str())
    }

    /// The variables the step's `env` blocks set.
    fn env(&self, swaps: &Swaps) -> Vec<(String, String)> {
        self.blocks("env")
            .flat_map(str::lines)
            .filter(|line| !line.trim().is_empty() && !line.starts_with('#'))
            .map(|line| {
                let (name, value) = line.split_once('=').expect("NAME=value");
                (name.to_owned(), swapped(value, swaps))
            })
            .collect()
    }

    /// Runs every `sh` block against the instance at `app_url` with `env`, and checks the
    /// output holds every line of the `text` blocks.
    async fn run(&self, app_url: &str, env: &[(String, String)], swaps: &Swaps) {
        let mut output = String::new();
        for script in self.blocks("sh") {
            output.push_str(&sh(script, app_url, env).await);
        }
        for expected in self.blocks("text").flat_map(str::lines) {
            let expected = swapped(expected, swaps);
            assert!(
                output.lines().any(|line| holds(line, &expected)),
                "step {}: no line like {expected:?} in:\n{output}",
                self.id
            );
        }
    }
}

/// Whether `line` matches `expected`, where `…` stands for any text.
fn holds(line: &str, expected: &str) -> bool {
    let mut rest = line;
    for (index, piece) in expected.split('…').enumerate() {
        match rest.find(piece) {
            Some(at) if index > 0 || at == 0 => rest = &rest[at + piece.len()..],
            _ => return false,
        }
    }
    expected.ends_with('…') || rest.is_empty()
}

/// `bash -euo pipefail -c <script>` from the repository root, with `nestling` on the `PATH`, the
/// instance's variables, `APP_URL` and `ADMIN_TOKEN`; returns what it printed.
async fn sh(script: &str, app_url: &str, env: &[(String, String)]) -> String {
    let bin_dir = binary().parent().unwrap().to_path_buf();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let output = tokio::process::Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_clear()
        .env("PATH", path)
        .env("RUST_LOG", "warn")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("APP_URL", app_url)
        .output()
        .await
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{script}\nexited {:?}:\n{stdout}\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// `base` with `changes` applied (later values win).
fn with(base: &[(String, String)], changes: Vec<(String, String)>) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = base
        .iter()
        .filter(|(name, _)| !changes.iter().any(|(changed, _)| changed == name))
        .cloned()
        .collect();
    env.extend(changes);
    env
}

fn var(name: &str, value: impl Into<String>) -> (String, String) {
    (name.to_owned(), value.into())
}

/// A task written on `writer` shows on `reader` within 1 s, after `reader` held it in L1.
async fn a_write_reaches_the_other_instance(writer: &Instance, reader: &Instance) {
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let login = client
        .post(format!("{}/api/auth/login", writer.url))
        .json(&json!({ "email": "demo@nestling.dev", "password": "demo-password" }))
        .send()
        .await
        .unwrap();
    let token = login.json::<Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let get = |base: &str, path: &str| client.get(format!("{base}{path}")).bearer_auth(&token).send();
    let workspaces: Value = get(&writer.url, "/api/workspaces").await.unwrap().json().await.unwrap();
    let workspace = workspaces[0]["id"].as_str().unwrap().to_owned();
    let projects: Value = get(&writer.url, &format!("/api/workspaces/{workspace}/projects"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let project = projects[0]["id"].as_str().unwrap().to_owned();
    let tasks: Value = get(&writer.url, &format!("/api/projects/{project}/tasks"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let path = format!("/api/tasks/{}", tasks["items"][0]["id"].as_str().unwrap());
    let started = Instant::now();
    while get(&reader.url, &path).await.unwrap().headers()["x-cache"] != "HIT-L1" {
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the reader never holds the task"
        );
    }
    let title = format!("changed {}", uuid::Uuid::new_v4().simple());
    let patched = client
        .patch(format!("{}{path}", writer.url))
        .bearer_auth(&token)
        .json(&json!({ "title": title }))
        .send()
        .await
        .unwrap();
    assert_eq!(patched.status(), 200);
    let written = Instant::now();
    loop {
        let read: Value = get(&reader.url, &path).await.unwrap().json().await.unwrap();
        if read["title"] == title.as_str() {
            return;
        }
        assert!(written.elapsed() < Duration::from_secs(1), "still served: {read}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn seed(env: &[(String, String)]) {
    let seeded = tokio::process::Command::new(binary())
        .arg("seed")
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .await
        .unwrap();
    assert!(seeded.status.success(), "{}", String::from_utf8_lossy(&seeded.stderr));
}

#[test]
fn every_step_of_the_migration_plan_is_run_by_a_phase_test_and_no_other() {
    let documented: BTreeSet<String> = steps().into_iter().map(|step| step.id).collect();
    let call = format!("{}(\"", "step");
    let run: BTreeSet<String> = THIS_FILE
        .split(call.as_str())
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .map(str::to_owned)
        .collect();
    assert_eq!(
        documented, run,
        "steps in docs/MIGRATION.md vs. steps the phase tests run"
    );
    for phase in 1..=4 {
        assert!(
            documented.iter().any(|id| id.starts_with(&format!("{phase}."))),
            "phase {phase}"
        );
    }
}

#[test]
fn the_acl_user_of_the_plan_may_run_exactly_the_commands_the_app_sends() {
    let script = step("2.1").blocks("sh").next().unwrap().to_owned();
    let granted: BTreeSet<String> = script
        .split_whitespace()
        .map(|token| token.trim_matches('\''))
        .filter_map(|token| token.strip_prefix('+'))
        .map(str::to_owned)
        .collect();
    let sent: BTreeSet<String> = ACL_COMMANDS.iter().map(|c| c.to_string()).collect();
    assert_eq!(granted, sent);
}

#[tokio::test]
async fn phase_1_development_runs_as_written() {
    ensure_commands(&[("curl", "curl")]);
    // 1.1: the harness runs redis-server with the document's flags, on a port of its own.
    let start = step("1.1");
    assert_eq!(
        start.blocks("sh").next().map(str::trim),
        Some(r#"redis-server --save "" --appendonly no"#)
    );
    let redis = private_redis().await;
    let db = TestDatabase::create().await;
    let swaps: Swaps = vec![("127.0.0.1:6379".into(), format!("127.0.0.1:{}", redis.port))];
    let prefix = var("REDIS_KEY_PREFIX", "nestling:");

    let run_with_redis = step("1.2");
    let env = with(&[var("DATABASE_URL", &db.url), prefix], run_with_redis.env(&swaps));
    seed(&env).await;
    let first = Instance::start(&env).await;
    run_with_redis.run(&first.url, &env, &swaps).await;

    step("1.3").run(&first.url, &env, &swaps).await;

    let second = Instance::start(&env).await;
    step("1.4").run(&second.url, &env, &swaps).await;
    a_write_reaches_the_other_instance(&first, &second).await;
    a_write_reaches_the_other_instance(&second, &first).await;
}

/// Installs what the document's commands need when missing (as the harness does for servers).
fn ensure_commands(commands: &[(&str, &str)]) {
    for (command, package) in commands {
        let present = || {
            std::process::Command::new("sh")
                .args(["-c", &format!("command -v {command}")])
                .output()
                .is_ok_and(|o| o.status.success())
        };
        ensure_installed(present, package, command);
    }
}

#[tokio::test]
async fn phase_2_staging_runs_as_written() {
    ensure_commands(&[("redis-cli", "redis-tools"), ("wrk", "wrk"), ("curl", "curl")]);
    let redis = private_redis_with(RedisOptions {
        tls: true,
        ..Default::default()
    })
    .await;
    let db = TestDatabase::create().await;
    let ca = redis.ca_file().display().to_string();
    let swaps: Swaps = vec![
        (
            "redis.staging.internal:6380".into(),
            format!("localhost:{}", redis.port),
        ),
        ("/etc/nestling/redis-ca.pem".into(), ca.clone()),
    ];

    // 2.1, as the administrator of the (TLS) server.
    let admin = vec![
        var("REDIS_TLS_CA_FILE", ca),
        var("REDIS_HOST", "localhost"),
        var("REDIS_PORT", redis.port.to_string()),
    ];
    step("2.1").run("", &admin, &swaps).await;

    let staging = step("2.2");
    let env = with(&[var("DATABASE_URL", &db.url)], staging.env(&swaps));
    let app = Instance::start(&env).await;
    staging.run(&app.url, &env, &swaps).await;
    step("2.3").run(&app.url, &env, &swaps).await;
    step("2.4").run(&app.url, &env, &swaps).await;
}

/// The phase-3 deployment on the shared cluster, under a key prefix of the test's own.
fn production(db: &TestDatabase, cluster_nodes: String) -> (Vec<(String, String)>, Swaps) {
    let prefix = format!("migration-{}:", uuid::Uuid::new_v4().simple());
    let swaps: Swaps = vec![(DOC_CLUSTER.into(), cluster_nodes), ("nestling:".into(), prefix)];
    let env = with(&[var("DATABASE_URL", &db.url)], step("3.2").env(&swaps));
    (env, swaps)
}

async fn cluster_nodes() -> String {
    let Backend::Cluster(cluster) = Backend::cluster().await else {
        unreachable!()
    };
    cluster.nodes_from(0).join(",")
}

#[tokio::test]
async fn phase_3_production_runs_as_written() {
    ensure_commands(&[("curl", "curl")]);
    let db = TestDatabase::create().await;
    let (env, swaps) = production(&db, cluster_nodes().await);

    let check = step("3.1");
    let check_env = with(&[var("DATABASE_URL", &db.url)], check.env(&swaps));
    check.run("", &check_env, &swaps).await;

    seed(&env).await;
    let (a, b) = (Instance::start(&env).await, Instance::start(&env).await);
    for instance in [&a, &b] {
        step("3.2").run(&instance.url, &env, &swaps).await;
    }
    // One instance on Redis, the other not yet: each serves the other's writes.
    step("3.3").run(&a.url, &env, &swaps).await;
    a_write_reaches_the_other_instance(&a, &b).await;
    a_write_reaches_the_other_instance(&b, &a).await;
    step("3.3").run(&b.url, &env, &swaps).await;
    a_write_reaches_the_other_instance(&a, &b).await;
    for instance in [&a, &b] {
        step("3.4").run(&instance.url, &env, &swaps).await;
    }
}

#[tokio::test]
async fn phase_4_rollback_runs_as_written() {
    ensure_commands(&[("curl", "curl")]);
    let db = TestDatabase::create().await;
    let (env, swaps) = production(&db, cluster_nodes().await);
    // Where phase 3 ends: REDIS_ENABLED=true in the deployment.
    let env = with(&env, vec![var("REDIS_ENABLED", "true")]);
    seed(&env).await;
    let (a, b) = (Instance::start(&env).await, Instance::start(&env).await);

    step("4.1").run(&a.url, &env, &swaps).await;
    // The other instance heard it.
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let health: Value = client
            .get(format!("{}/health", b.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if health["details"]["cache"]["mode"] == "memory-synced" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B is still in {}",
            health["details"]["cache"]["mode"]
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    a_write_reaches_the_other_instance(&a, &b).await;

    // 4.2: restart one instance at a time with the lasting setting.
    let lasting = step("4.2");
    let env = with(&env, lasting.env(&swaps));
    a.stop().await;
    let a = Instance::start(&env).await;
    lasting.run(&a.url, &env, &swaps).await;
    a_write_reaches_the_other_instance(&b, &a).await;

    // 4.3: one instance, no Redis address.
    let alone = step("4.3");
    let env = with(&env, alone.env(&swaps));
    drop((a, b));
    let single = Instance::start(&env).await;
    alone.run(&single.url, &env, &swaps).await;
}
