//! `redis-server` processes the harness owns: one shared per test binary (every test gets its own
//! key prefix on it) and private ones for fault tests, which `freeze()`, `thaw()`, `kill()` and
//! `restart()` them by PID on the same port. Installed with apt when missing and we are root.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use nestling::infra::database::local_server::free_port;

use super::servers::{ensure_installed, register_cleanup};

pub struct TestRedis {
    pub port: u16,
    dir: PathBuf,
    child: Mutex<Option<Child>>,
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
        ensure_installed(redis_server_installed, "redis-server", "redis-server");
        let dir = tempfile::Builder::new()
            .prefix("nestling-redis-")
            .tempdir()
            .expect("temp dir")
            .keep();
        let server = TestRedis {
            port: free_port().expect("free port"),
            dir,
            child: Mutex::new(None),
        };
        server.launch();
        server
    }

    fn launch(&self) {
        let log = self.dir.join("redis.log");
        let _ = std::fs::remove_file(&log);
        use std::os::unix::process::CommandExt;
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
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
        format!("redis://127.0.0.1:{}", self.port)
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

    /// A plain connection for assertions (PTTL, INFO, ...).
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .expect("connect to test redis")
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            // SAFETY: stopping the redis-server this handle started.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGCONT);
                libc::kill(child.id() as i32, libc::SIGKILL);
            }
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The `redis-server` shared by the tests of this binary.
pub fn shared_redis() -> &'static TestRedis {
    static SHARED: OnceLock<TestRedis> = OnceLock::new();
    SHARED.get_or_init(|| {
        std::thread::spawn(TestRedis::start)
            .join()
            .expect("shared redis starts")
    })
}

pub async fn private_redis() -> TestRedis {
    tokio::task::spawn_blocking(TestRedis::start)
        .await
        .expect("private redis starts")
}
