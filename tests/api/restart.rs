//! Rolling restarts. An instance told to stop (SIGTERM) is unready at once and serves on for
//! `APP_SHUTDOWN_DELAY` (for load balancers that poll readiness), then drains and exits. Behind
//! the compose proxy (docs/compose/nginx.conf, run by a real nginx), restarting each instance in
//! turn under load fails no request: nginx retries an idempotent request that an instance going
//! away refused on the other one.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nestling::infra::database::local_server::free_port;

use crate::helpers::instance::{signed_up_with_workspace, Instance, TestDatabase};
use crate::helpers::servers::ensure_installed;

const SECOND: Duration = Duration::from_secs(1);

fn env(database: &TestDatabase, delay_secs: u64) -> Vec<(String, String)> {
    [
        ("DATABASE_URL", database.url.as_str()),
        ("APP_SHUTDOWN_DELAY", &delay_secs.to_string()),
        ("APP_WORKERS", "1"),
        // The load is one user's: what is measured is the restart, not the quota.
        ("RATE_LIMIT_API", "1000000/1m"),
    ]
    .iter()
    .map(|(name, value)| (name.to_string(), value.to_string()))
    .collect()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(10 * SECOND)
        .build()
        .unwrap()
}

#[tokio::test]
async fn sigterm_makes_the_instance_unready_at_once_it_serves_through_the_delay_then_exits() {
    let database = TestDatabase::create().await;
    let mut instance = Instance::start(&env(&database, 2)).await;
    let client = client();
    let (token, workspace_id) = signed_up_with_workspace(&client, &instance.url).await;
    let ready = format!("{}/health/ready", instance.url);
    let read = format!("{}/api/workspaces/{workspace_id}", instance.url);
    assert_eq!(client.get(&ready).send().await.unwrap().status(), 200);

    let signalled = Instant::now();
    instance.send_sigterm();
    loop {
        let response = client.get(&ready).send().await.expect("still serving");
        if response.status() == 503 {
            let body: serde_json::Value = response.json().await.unwrap();
            assert_eq!(body["error"]["instance"]["status"], "down", "{body}");
            break;
        }
        assert!(
            signalled.elapsed() < SECOND,
            "readiness still 200 after {:?}",
            signalled.elapsed()
        );
    }
    // Unready, but serving: a load balancer that has not noticed yet loses nothing.
    while signalled.elapsed() < 3 * SECOND / 2 {
        let response = client
            .get(&read)
            .bearer_auth(&token)
            .send()
            .await
            .expect("still serving");
        assert_eq!(response.status(), 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(instance.exited(10 * SECOND).await, Some(true), "exits 0 after draining");
    let took = signalled.elapsed();
    assert!(took >= 2 * SECOND, "exited after {took:?}, before APP_SHUTDOWN_DELAY=2");
}

/// nginx running docs/compose/nginx.conf as compose runs it, with the instances' addresses and
/// the listening port of the test's choosing.
struct Proxy {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Proxy {
    fn start(instances: [u16; 2], tweak: impl Fn(String) -> String) -> Proxy {
        ensure_installed(|| nginx().is_some(), "nginx", "nginx");
        let dir = tempfile::tempdir().unwrap();
        let port = free_port().unwrap();
        let mut conf =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/compose/nginx.conf")).unwrap();
        for (from, to) in [
            ("app-a:8080", format!("127.0.0.1:{}", instances[0])),
            ("app-b:8080", format!("127.0.0.1:{}", instances[1])),
            ("listen 80;", format!("listen 127.0.0.1:{port};")),
        ] {
            assert!(conf.contains(from), "docs/compose/nginx.conf no longer has {from}");
            conf = conf.replace(from, &to);
        }
        let d = dir.path().display();
        std::fs::write(dir.path().join("default.conf"), tweak(conf)).unwrap();
        // SAFETY: geteuid has no preconditions.
        let user = if unsafe { libc::geteuid() } == 0 {
            "user root;"
        } else {
            ""
        };
        std::fs::write(
            dir.path().join("nginx.conf"),
            format!(
                "{user} worker_processes 1; pid {d}/nginx.pid; error_log {d}/error.log warn;
                 events {{ worker_connections 1024; }}
                 http {{ access_log off; client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;
                        fastcgi_temp_path {d}/fastcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
                        include {d}/default.conf; }}"
            ),
        )
        .unwrap();
        let child = Command::new(nginx().unwrap())
            .args([
                "-p",
                &d.to_string(),
                "-e",
                &format!("{d}/error.log"),
                "-c",
                &format!("{d}/nginx.conf"),
            ])
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx starts");
        let deadline = Instant::now() + 10 * SECOND;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            let log = std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default();
            assert!(Instant::now() < deadline, "nginx did not start: {log}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Proxy {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nginx() -> Option<&'static Path> {
    [
        "/usr/sbin/nginx",
        "/usr/bin/nginx",
        "/usr/local/sbin/nginx",
        "/usr/local/nginx/sbin/nginx",
    ]
    .into_iter()
    .map(Path::new)
    .find(|path| path.exists())
}

/// What the clients saw: answers by the instance that gave them (the last of `X-Upstream`), and
/// every failure.
#[derive(Default)]
struct Tally {
    answered: Mutex<HashMap<String, u64>>,
    failures: Mutex<Vec<String>>,
    requests: AtomicU64,
}

impl Tally {
    fn answered_by(&self, port: u16) -> u64 {
        let answered = self.answered.lock().unwrap();
        answered.get(&format!("127.0.0.1:{port}")).copied().unwrap_or(0)
    }
}

/// `clients` clients reading the workspace through the proxy until `stop`.
fn load(
    url: String,
    token: String,
    clients: usize,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..clients)
        .map(|_| {
            let (url, token, tally, stop) = (url.clone(), token.clone(), tally.clone(), stop.clone());
            tokio::spawn(async move {
                let client = client();
                while !stop.load(Ordering::Relaxed) {
                    tally.requests.fetch_add(1, Ordering::Relaxed);
                    match client.get(&url).bearer_auth(&token).send().await {
                        Ok(response) if response.status().is_success() => {
                            let upstream = response
                                .headers()
                                .get("x-upstream")
                                .and_then(|v| v.to_str().ok())
                                .and_then(|v| v.rsplit(", ").next())
                                .unwrap_or("?")
                                .to_owned();
                            *tally.answered.lock().unwrap().entry(upstream).or_default() += 1;
                        }
                        Ok(response) => {
                            let status = response.status();
                            let body = response.text().await.unwrap_or_default();
                            tally.failures.lock().unwrap().push(format!("{status}: {body}"));
                        }
                        Err(err) => tally.failures.lock().unwrap().push(err.to_string()),
                    }
                }
            })
        })
        .collect()
}

/// Restarts each of two instances in turn behind the proxy while clients read through it: the
/// failures the clients saw, and how many requests they made.
async fn rolling_restart(tweak_proxy: impl Fn(String) -> String) -> (Vec<String>, u64) {
    let database = TestDatabase::create().await;
    let env = env(&database, 1);
    let ports = [free_port().unwrap(), free_port().unwrap()];
    let mut instances = [
        Instance::start_on(ports[0], &env).await,
        Instance::start_on(ports[1], &env).await,
    ];
    let proxy = Proxy::start(ports, tweak_proxy);
    let (token, workspace_id) = signed_up_with_workspace(&client(), &proxy.url).await;
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let url = format!("{}/api/workspaces/{workspace_id}", proxy.url);
    let clients = load(url, token, 4, tally.clone(), stop.clone());

    for (slot, port) in ports.into_iter().enumerate() {
        // Both instances answering before this one goes.
        for other in ports {
            let seen = tally.answered_by(other);
            wait_until(20 * SECOND, || tally.answered_by(other) > seen + 10).await;
        }
        let exited = instances[slot].terminate(20 * SECOND).await;
        assert!(exited.is_some(), "instance {slot} exits");
        instances[slot] = Instance::start_on(port, &env).await;
    }
    for port in ports {
        let seen = tally.answered_by(port);
        wait_until(20 * SECOND, || tally.answered_by(port) > seen + 10).await;
    }
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    let failures = tally.failures.lock().unwrap().clone();
    (failures, tally.requests.load(Ordering::Relaxed))
}

/// Polls `done` (an outside counter the clients move) until it holds, at most `within`.
async fn wait_until(within: Duration, done: impl Fn() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_rolling_restart_behind_the_compose_proxy_fails_no_request() {
    let (failures, requests) = rolling_restart(|conf| conf).await;
    assert!(requests > 200, "only {requests} requests: no load to speak of");
    assert!(
        failures.is_empty(),
        "{} of {requests} requests failed: {failures:?}",
        failures.len()
    );
}

/// The same restart without nginx's retry fails requests: the test above can fail, and the retry
/// is what it measures.
#[tokio::test]
async fn without_the_proxys_retry_the_same_restart_fails_requests() {
    let (failures, requests) = rolling_restart(|conf| {
        let retry = "proxy_next_upstream error timeout http_502 http_503;";
        assert!(conf.contains(retry), "docs/compose/nginx.conf no longer has {retry}");
        conf.replace(retry, "proxy_next_upstream off;")
    })
    .await;
    assert!(
        !failures.is_empty(),
        "no request of {requests} failed without the retry"
    );
}
