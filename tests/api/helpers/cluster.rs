//! A Redis Cluster the harness owns: three masters and three replicas, each a `redis-server
//! --cluster-enabled yes` process on a free port, joined with `redis-cli --cluster create`. One is
//! shared per test binary (every test has its own key prefix); a failover test starts its own and
//! kills a master by PID.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use nestling::infra::database::local_server::free_port;

use super::servers::{ensure_installed, private_server, register_cleanup, shared_server, stop_child};

const NODES: usize = 6;
/// How long a master may be silent before its replica takes over: short, so failover tests are.
const NODE_TIMEOUT_MS: u64 = 1000;

pub struct TestCluster {
    dir: PathBuf,
    nodes: Vec<(u16, Mutex<Option<Child>>)>,
}

fn installed(binary: &str) -> bool {
    Command::new(binary)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A free port whose cluster bus port (port + 10000) is free too.
fn cluster_port() -> u16 {
    loop {
        let port = free_port().expect("free port");
        if port < 55_535 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

/// Whether `masters` masters serve every slot, as each of the `alive` nodes sees it.
fn healthy(alive: &[u16], masters: usize) -> bool {
    alive.iter().all(|&port| {
        let info = cli(port, &["CLUSTER", "INFO"]).unwrap_or_default();
        let serving = cli(port, &["CLUSTER", "NODES"])
            .unwrap_or_default()
            .lines()
            .filter(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let flags = fields.get(2).copied().unwrap_or_default();
                let port = fields
                    .get(1)
                    .and_then(|a| a.split('@').next()?.rsplit(':').next()?.parse::<u16>().ok());
                let live = port.is_some_and(|port| alive.contains(&port));
                live && flags.contains("master") && !flags.contains("fail") && fields.len() > 8
            })
            .count();
        info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384") && serving == masters
    })
}

/// `redis-cli -p <port> <args>`: its output, or `None` when the node does not answer.
fn cli(port: u16, args: &[&str]) -> Option<String> {
    let output = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    (output.status.success() && !text.starts_with("Could not connect")).then_some(text)
}

impl TestCluster {
    /// Starts six nodes and joins them (blocking until every slot is served and every master has
    /// its replica).
    pub fn start() -> TestCluster {
        ensure_installed(|| installed("redis-server"), "redis-server", "redis-server");
        ensure_installed(|| installed("redis-cli"), "redis-tools", "redis-cli");
        let dir = tempfile::Builder::new()
            .prefix("nestling-cluster-")
            .tempdir()
            .expect("temp dir")
            .keep();
        let mut nodes = Vec::new();
        for _ in 0..NODES {
            let port = cluster_port();
            let log = dir.join(format!("{port}.log"));
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
                .args(["--cluster-node-timeout", &NODE_TIMEOUT_MS.to_string()])
                // A cache: the slots of a master that is down fail alone, the others serve on.
                .args(["--cluster-require-full-coverage", "no"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&dir)
                .arg("--logfile")
                .arg(&log)
                .process_group(0)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn redis-server");
            register_cleanup(child.id() as i32, &dir);
            nodes.push((port, Mutex::new(Some(child))));
        }
        let cluster = TestCluster { dir, nodes };
        for &(port, _) in &cluster.nodes {
            cluster.wait_for(&format!("node {port} answers"), || cli(port, &["PING"]).is_some());
        }
        let addresses: Vec<String> = cluster.ports().iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let output = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            output.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        cluster.wait_until_healthy(3);
        // A replica that never finished its first sync would refuse to take over.
        for port in cluster.ports() {
            cluster.wait_for(&format!("node {port} in sync"), || {
                cli(port, &["INFO", "replication"])
                    .is_some_and(|info| info.contains("role:master") || info.contains("master_link_status:up"))
            });
        }
        cluster
    }

    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|(port, _)| *port).collect()
    }

    /// `redis://127.0.0.1:<port>` of every node, starting with the `first`-th: instances given
    /// different seeds subscribe on different nodes.
    pub fn nodes_from(&self, first: usize) -> Vec<String> {
        let ports = self.ports();
        (0..ports.len())
            .map(|i| format!("redis://127.0.0.1:{}", ports[(first + i) % ports.len()]))
            .collect()
    }

    fn alive(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|(_, child)| child.lock().unwrap().is_some())
            .map(|(port, _)| *port)
            .collect()
    }

    /// The port of the live master serving `key`'s slot (from the slot ranges `CLUSTER NODES`
    /// lists after each master).
    pub fn master_of(&self, key: &str) -> u16 {
        let port = self.alive()[0];
        let slot: u16 = cli(port, &["CLUSTER", "KEYSLOT", key]).unwrap().trim().parse().unwrap();
        let text = cli(port, &["CLUSTER", "NODES"]).unwrap_or_default();
        for line in text.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if !fields
                .get(2)
                .is_some_and(|flags| flags.contains("master") && !flags.contains("fail"))
            {
                continue;
            }
            let serves = fields.iter().skip(8).any(|range| {
                let (start, end) = range.split_once('-').unwrap_or((range, range));
                matches!((start.parse::<u16>(), end.parse::<u16>()), (Ok(a), Ok(b)) if (a..=b).contains(&slot))
            });
            if serves {
                let address = fields[1].split('@').next().unwrap();
                return address.rsplit(':').next().unwrap().parse().unwrap();
            }
        }
        panic!("no master serves slot {slot}: {text}");
    }

    /// SIGKILL the node on `port`.
    pub fn kill(&self, port: u16) {
        let (_, child) = self.nodes.iter().find(|(p, _)| *p == port).expect("a node of ours");
        stop_child(child);
    }

    /// Blocks until `masters` live masters serve all 16,384 slots and every live node says
    /// `cluster_state:ok`.
    pub fn wait_until_healthy(&self, masters: usize) {
        self.wait_for(&format!("{masters} masters serving every slot"), || {
            healthy(&self.alive(), masters)
        });
    }

    /// `wait_until_healthy` for a test whose runtime also serves the app: the checks run off it.
    pub async fn healed(&self, masters: usize) {
        let alive = self.alive();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let nodes = alive.clone();
            if tokio::task::spawn_blocking(move || healthy(&nodes, masters))
                .await
                .unwrap()
            {
                return;
            }
            if Instant::now() > deadline {
                let views: Vec<String> = alive
                    .iter()
                    .map(|&port| {
                        let log = std::fs::read_to_string(self.dir.join(format!("{port}.log"))).unwrap_or_default();
                        let tail: Vec<&str> = log.lines().rev().take(6).collect();
                        format!(
                            "{port}:\n{}\n{}",
                            cli(port, &["CLUSTER", "NODES"]).unwrap_or_default(),
                            tail.join("\n")
                        )
                    })
                    .collect();
                panic!("cluster: not healed within 30 s:\n{}", views.join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn wait_for(&self, what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(
                Instant::now() < deadline,
                "cluster: {what}: not within 30 s ({:?})",
                self.dir
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `redis-cli <args>` on every node, each answering `OK` (ACL users, for one, are per node).
    pub fn on_every_node(&self, args: &[&str]) {
        for port in self.ports() {
            let reply = cli(port, args);
            assert_eq!(reply.as_deref().map(str::trim), Some("OK"), "node {port}: {args:?}");
        }
    }

    /// A cluster connection for assertions, as the default user.
    pub async fn connection(&self) -> redis::cluster_async::ClusterConnection {
        redis::cluster::ClusterClient::new(self.nodes_from(0))
            .unwrap()
            .get_async_connection()
            .await
            .expect("connect to the test cluster")
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for (_, child) in &self.nodes {
            stop_child(child);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The cluster shared by the tests of this binary.
pub fn shared_cluster() -> &'static TestCluster {
    static SHARED: OnceLock<TestCluster> = OnceLock::new();
    shared_server(&SHARED, TestCluster::start)
}

pub async fn private_cluster() -> TestCluster {
    private_server(TestCluster::start).await
}
