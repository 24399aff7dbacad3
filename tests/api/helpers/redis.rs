//! `redis-server` processes the harness owns: one shared per test binary (every test gets its own
//! key prefix on it) and private ones for fault tests, which `freeze()`, `thaw()`, `kill()` and
//! `restart()` them by PID on the same port. Installed with apt when missing and we are root.
//! `RedisOptions` makes a server that speaks only TLS (with a test CA made by `openssl` at test
//! time) and one that has ACL users.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use nestling::infra::database::local_server::free_port;

use super::servers::{ensure_installed, register_cleanup, shared_server, stop_child};

pub struct TestRedis {
    pub port: u16,
    dir: PathBuf,
    child: Mutex<Option<Child>>,
    options: RedisOptions,
}

/// How a test server is set up beyond the defaults.
#[derive(Debug, Clone, Default)]
pub struct RedisOptions {
    /// Only a TLS port, with a certificate for `localhost` signed by a CA of this server's own.
    pub tls: bool,
    /// ACL rules, one `user` directive each (e.g. `app on >secret ~app:* +get`).
    pub acl_users: Vec<String>,
}

/// A CA and a certificate it signed for `localhost` / 127.0.0.1, made with the openssl CLI.
pub fn make_test_ca(dir: &std::path::Path, name: &str) -> PathBuf {
    let openssl_installed = || {
        Command::new("openssl")
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    ensure_installed(openssl_installed, "openssl", "the openssl command");
    let run = |args: &[&str]| {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs");
        assert!(
            output.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    let ca_key = format!("{name}-ca.key");
    let ca_cert = format!("{name}-ca.crt");
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            &ca_key,
            "-out",
            &ca_cert,
            "-days",
            "2",
            "-subj",
            &format!("/CN={name} test CA"),
        ],
    ]
    .concat());
    run(&[
        &["req"][..],
        &ec,
        &["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"],
    ]
    .concat());
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .expect("extension file");
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        &ca_cert,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ]);
    dir.join(ca_cert)
}

fn redis_server_installed() -> bool {
    Command::new("redis-server")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

impl TestRedis {
    /// Starts `redis-server` on a free port (blocking until it is ready).
    pub fn start() -> TestRedis {
        Self::start_with(RedisOptions::default())
    }

    pub fn start_with(options: RedisOptions) -> TestRedis {
        ensure_installed(redis_server_installed, "redis-server", "redis-server");
        let dir = tempfile::Builder::new()
            .prefix("nestling-redis-")
            .tempdir()
            .expect("temp dir")
            .keep();
        if options.tls {
            make_test_ca(&dir, "server");
        }
        let server = TestRedis {
            port: free_port().expect("free port"),
            dir,
            child: Mutex::new(None),
            options,
        };
        server.launch();
        server
    }

    fn launch(&self) {
        let log = self.dir.join("redis.log");
        let _ = std::fs::remove_file(&log);
        use std::os::unix::process::CommandExt;
        let mut command = Command::new("redis-server");
        if self.options.tls {
            let file = |name: &str| self.dir.join(name).display().to_string();
            command.args([
                "--port",
                "0",
                "--tls-port",
                &self.port.to_string(),
                "--tls-auth-clients",
                "no",
            ]);
            command.args([
                "--tls-cert-file",
                &file("server.crt"),
                "--tls-key-file",
                &file("server.key"),
            ]);
            command.args(["--tls-ca-cert-file", &file("server-ca.crt")]);
        } else {
            command.args(["--port", &self.port.to_string()]);
        }
        for user in &self.options.acl_users {
            command.arg("--user").args(user.split_whitespace());
        }
        let child = command
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(&log)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        register_cleanup(child.id() as i32, &self.dir);
        *self.child.lock().unwrap() = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("Ready to accept connections") {
                return;
            }
            assert!(Instant::now() < deadline, "redis-server did not start:\n{text}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn url(&self) -> String {
        if self.options.tls {
            format!("rediss://localhost:{}", self.port)
        } else {
            format!("redis://127.0.0.1:{}", self.port)
        }
    }

    /// The CA that signed a TLS server's certificate (for `REDIS_TLS_CA_FILE`).
    pub fn ca_file(&self) -> PathBuf {
        assert!(self.options.tls, "not a TLS server");
        self.dir.join("server-ca.crt")
    }

    /// `total_connections_received` of `INFO stats`: every connection ever made to this server,
    /// the one this call makes included.
    pub async fn connections_received(&self) -> u64 {
        self.stat("total_connections_received").await
    }

    /// `total_reads_processed` of `INFO stats`: how many times the server read from a client, so
    /// about one per round trip (a pipeline arrives in one read), this call's own included.
    pub async fn reads_processed(&self) -> u64 {
        self.stat("total_reads_processed").await
    }

    async fn info(&self, section: &str) -> String {
        let mut connection = self.connection().await;
        redis::cmd("INFO")
            .arg(section)
            .query_async(&mut connection)
            .await
            .unwrap()
    }

    /// `EVALSHA` calls so far (`INFO commandstats`): the rate limiter's script calls (the
    /// cache's fills use other commands).
    pub async fn evalsha_calls(&self) -> u64 {
        self.info("commandstats")
            .await
            .lines()
            .find(|l| l.starts_with("cmdstat_evalsha:"))
            .and_then(|l| l.split("calls=").nth(1))
            .and_then(|rest| rest.split(',').next())
            .map_or(0, |n| n.parse().unwrap())
    }

    async fn stat(&self, name: &str) -> u64 {
        nestling::infra::redis::info_field(&self.info("stats").await, name)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("INFO stats has {name}"))
    }

    /// A pub/sub connection (plain TCP servers), to watch what the app publishes.
    pub async fn pubsub(&self) -> redis::aio::PubSub {
        redis::Client::open(self.url())
            .unwrap()
            .get_async_pubsub()
            .await
            .expect("pub/sub connection to test redis")
    }

    pub fn pid(&self) -> i32 {
        self.child
            .lock()
            .unwrap()
            .as_ref()
            .map(|c| c.id() as i32)
            .expect("redis running")
    }

    fn signal(&self, signal: i32) {
        // SAFETY: signalling the redis-server this handle started.
        assert_eq!(unsafe { libc::kill(self.pid(), signal) }, 0);
    }

    pub fn freeze(&self) {
        self.signal(libc::SIGSTOP);
    }

    pub fn thaw(&self) {
        self.signal(libc::SIGCONT);
    }

    pub fn kill(&self) {
        self.signal(libc::SIGKILL);
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.wait();
        }
    }

    /// Starts again on the same port (empty: nothing is persisted).
    pub fn restart(&self) {
        self.launch();
    }

    /// `CONFIG SET name value` on this server (the test's own: it may reconfigure it).
    pub async fn config_set(&self, name: &str, value: &str) {
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg(name)
            .arg(value)
            .query_async(&mut self.connection().await)
            .await
            .unwrap();
    }

    /// A plain connection for assertions (PTTL, INFO, ...), as the default user.
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        let client = if self.options.tls {
            let certificates = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(std::fs::read(self.ca_file()).unwrap()),
            };
            redis::Client::build_with_tls(self.url(), certificates).unwrap()
        } else {
            redis::Client::open(self.url()).unwrap()
        };
        client
            .get_multiplexed_async_connection()
            .await
            .expect("connect to test redis")
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        stop_child(&self.child);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The `redis-server` shared by the tests of this binary.
pub fn shared_redis() -> &'static TestRedis {
    static SHARED: OnceLock<TestRedis> = OnceLock::new();
    shared_server(&SHARED, TestRedis::start)
}

pub async fn private_redis() -> TestRedis {
    private_redis_with(RedisOptions::default()).await
}

pub async fn private_redis_with(options: RedisOptions) -> TestRedis {
    tokio::task::spawn_blocking(move || TestRedis::start_with(options))
        .await
        .expect("private redis starts")
}
