//! The `nestling` binary as a process, with an environment of the test's choosing, on a database
//! of its own: what a user deploys. The migration plan's steps run against these.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nestling::infra::database::local_server::free_port;
use serde_json::{json, Value};

use super::{create_database, drop_database, shared_postgres};

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_nestling"))
}

/// A database copied from the migrated template, dropped with this.
pub struct TestDatabase {
    pub url: String,
    name: String,
    admin_url: String,
}

impl TestDatabase {
    pub async fn create() -> TestDatabase {
        let postgres = tokio::task::spawn_blocking(shared_postgres).await.unwrap();
        let (name, admin_url) = create_database(postgres).await;
        TestDatabase {
            url: postgres.url(&name),
            name,
            admin_url,
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        drop_database(self.admin_url.clone(), self.name.clone());
    }
}

/// A running `nestling` (serving), stopped when dropped.
pub struct Instance {
    pub url: String,
    child: tokio::process::Child,
    log: PathBuf,
}

impl Instance {
    /// Runs `nestling` with `env` (and nothing else from the test's environment but `PATH`) on a
    /// free port, until `/health/live` answers.
    pub async fn start(env: &[(String, String)]) -> Instance {
        Self::start_on(free_port().expect("free port"), env).await
    }

    /// `start` on `port` (a restart takes its instance's port again).
    pub async fn start_on(port: u16, env: &[(String, String)]) -> Instance {
        let log = std::env::temp_dir().join(format!("nestling-instance-{port}.log"));
        let child = tokio::process::Command::new(binary())
            .current_dir(std::env::temp_dir())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "warn")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("APP_PORT", port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .kill_on_drop(true)
            .spawn()
            .expect("spawn nestling");
        let instance = Instance {
            url: format!("http://127.0.0.1:{port}"),
            child,
            log,
        };
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let live = client.get(format!("{}/health/live", instance.url)).send().await;
            if live.is_ok_and(|r| r.status().is_success()) {
                return instance;
            }
            assert!(
                Instant::now() < deadline,
                "nestling did not start: {}",
                std::fs::read_to_string(&instance.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The process id (for reading `/proc/<pid>/…`).
    pub fn pid(&self) -> u32 {
        self.child.id().expect("nestling is running")
    }

    /// Sends SIGTERM and waits for the process to exit (at most `within`): how long it took.
    pub async fn terminate(&mut self, within: Duration) -> Option<Duration> {
        let started = Instant::now();
        self.send_sigterm();
        self.exited(within).await?;
        Some(started.elapsed())
    }

    /// SIGTERM, as an orchestrator sends it; `exited` waits for the exit.
    pub fn send_sigterm(&self) {
        // SAFETY: signalling the process this handle spawned.
        unsafe { libc::kill(self.pid() as i32, libc::SIGTERM) };
    }

    /// Waits for the process to exit (at most `within`): whether it exited 0.
    pub async fn exited(&mut self, within: Duration) -> Option<bool> {
        let status = tokio::time::timeout(within, self.child.wait()).await.ok()?.ok()?;
        Some(status.success())
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A user and a workspace on an instance run as its own process: (token, workspace id).
pub async fn signed_up_with_workspace(client: &reqwest::Client, base: &str) -> (String, String) {
    let (email, password) = ("instance@example.com", "correct horse battery");
    let send = |path: &str, token: Option<&str>, body: Value| {
        let mut request = client.post(format!("{base}{path}")).json(&body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move {
            let response = request.send().await.expect("request sent");
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let registered = send(
        "/api/auth/register",
        None,
        json!({ "email": email, "password": password, "name": "Streams" }),
    )
    .await;
    assert_eq!(registered.0, 201, "register: {}", registered.1);
    let login = send("/api/auth/login", None, json!({ "email": email, "password": password })).await;
    assert_eq!(login.0, 200, "login: {}", login.1);
    let token = login.1["token"].as_str().unwrap().to_owned();
    let created = send("/api/workspaces", Some(&token), json!({ "name": "Streams" })).await;
    assert_eq!(created.0, 201, "create workspace: {}", created.1);
    (token, created.1["id"].as_str().unwrap().to_owned())
}
