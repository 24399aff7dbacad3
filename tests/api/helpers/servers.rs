//! Servers the harness owns: one shared Postgres per test binary (with a migrated template
//! database every test copies), and private servers for fault tests, which a test may
//! `freeze()` (SIGSTOP), `thaw()` (SIGCONT), `kill()` (SIGKILL) and `restart()` on the same port.
//! Every server runs in its own process group and is stopped when the test binary exits.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use nestling::infra::database::local_server::{self, PgBinaries};
use nestling::infra::database::MIGRATOR;
use sqlx::Connection;

pub const TEMPLATE_DB: &str = "nestling_template";

/// Postmaster pids and folders to clean up when the test binary exits.
static OWNED: Mutex<Vec<(i32, PathBuf)>> = Mutex::new(Vec::new());

extern "C" fn stop_owned_servers() {
    if let Ok(owned) = OWNED.lock() {
        for (postmaster, dir) in owned.iter() {
            for pid in children_of(*postmaster).into_iter().chain([*postmaster]) {
                // SAFETY: signalling processes we started; no memory is touched.
                unsafe {
                    libc::kill(pid, libc::SIGCONT);
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

pub fn register_cleanup(postmaster_pid: i32, dir: &Path) {
    static AT_EXIT: Once = Once::new();
    // SAFETY: registering a plain extern "C" function; it only signals and removes files.
    AT_EXIT.call_once(|| unsafe {
        libc::atexit(stop_owned_servers);
    });
    OWNED.lock().unwrap().push((postmaster_pid, dir.to_path_buf()));
}

/// Stops a server process the harness started (thawed first, in case a test froze it).
pub fn stop_child(slot: &Mutex<Option<Child>>) {
    if let Some(mut child) = slot.lock().unwrap().take() {
        // SAFETY: signalling a process this harness started.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGCONT);
            libc::kill(child.id() as i32, libc::SIGKILL);
        }
        let _ = child.wait();
    }
}

fn forget_cleanup(postmaster_pid: i32) {
    OWNED.lock().unwrap().retain(|(owned, _)| *owned != postmaster_pid);
}

/// Installs a Debian package when we are root and it is missing; otherwise fails with one line.
pub fn ensure_installed(present: impl Fn() -> bool, package: &str, what: &str) {
    if present() {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        static APT_UPDATE: Once = Once::new();
        APT_UPDATE.call_once(|| {
            let _ = Command::new("apt-get").args(["update", "-qq"]).status();
        });
        let status = Command::new("apt-get")
            .args(["install", "-y", "-qq", package])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status();
        if matches!(status, Ok(s) if s.success()) && present() {
            return;
        }
    }
    panic!("{what} not found: install the `{package}` package (apt-get install {package})");
}

pub fn pg_binaries() -> PgBinaries {
    ensure_installed(
        || PgBinaries::locate().is_ok(),
        "postgresql",
        "PostgreSQL server binaries",
    );
    PgBinaries::locate().expect("located after install")
}

/// A Postgres server owned by the tests.
pub struct TestPostgres {
    pub port: u16,
    dir: PathBuf,
    child: Mutex<Option<Child>>,
    binaries: PgBinaries,
}

impl TestPostgres {
    /// initdb in a fresh temp dir and start on a free port. Blocking: call from `spawn_blocking`
    /// or a plain thread.
    pub fn start() -> TestPostgres {
        let binaries = pg_binaries();
        let dir = tempfile::Builder::new()
            .prefix("nestling-pg-")
            .tempdir()
            .expect("temp dir")
            .keep();
        // The folder must be reachable by the server user when we are root.
        make_traversable(&dir);
        let data = dir.join("data");
        binaries.initdb(&data).expect("initdb");
        let port = local_server::free_port().expect("free port");
        local_server::write_server_conf(
            &data,
            port,
            &[
                "fsync = off",
                "full_page_writes = off",
                "max_connections = 400",
                "shared_buffers = 64MB",
            ],
        )
        .expect("server conf");
        let server = TestPostgres {
            port,
            dir,
            child: Mutex::new(None),
            binaries,
        };
        server.launch();
        server
    }

    fn launch(&self) {
        let log = std::fs::File::create(self.dir.join("server.log")).expect("log file");
        let child = self
            .binaries
            .command("postgres")
            .arg("-D")
            .arg(self.dir.join("data"))
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn postgres");
        register_cleanup(child.id() as i32, &self.dir);
        *self.child.lock().unwrap() = Some(child);
        self.wait_until_accepting();
    }

    /// Waits for the server's own "ready" line: no runtime needed, so this works anywhere.
    fn wait_until_accepting(&self) {
        let log_path = self.dir.join("server.log");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            if log.contains("database system is ready to accept connections") {
                return;
            }
            if let Some(status) = self
                .child
                .lock()
                .unwrap()
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("postgres exited with {status} while starting:\n{log}");
            }
            assert!(Instant::now() < deadline, "postgres did not start within 30 s:\n{log}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    fn postmaster_pid(&self) -> i32 {
        self.child
            .lock()
            .unwrap()
            .as_ref()
            .map(|c| c.id() as i32)
            .expect("server running")
    }

    /// Signals the postmaster and every process it forked. Backends call `setsid()`, so a
    /// process-group signal would miss them: they are found through /proc instead.
    fn signal_server(&self, signal: i32, postmaster_first: bool) {
        let postmaster = self.postmaster_pid();
        // SAFETY: signalling processes of a server this handle started.
        let send = |pid: i32| unsafe {
            libc::kill(pid, signal);
        };
        // The children are listed after the postmaster stopped: one it forked just before (a new
        // connection) would otherwise go on answering.
        if postmaster_first {
            send(postmaster);
            children_of(postmaster).into_iter().for_each(send);
        } else {
            children_of(postmaster).into_iter().for_each(send);
            send(postmaster);
        }
    }

    /// SIGSTOP the postmaster (first, so it forks nothing new) and every backend: connections
    /// stay open and nothing answers.
    pub fn freeze(&self) {
        self.signal_server(libc::SIGSTOP, true);
    }

    pub fn thaw(&self) {
        self.signal_server(libc::SIGCONT, false);
    }

    /// SIGKILL the whole server and wait until its port is free.
    pub fn kill(&self) {
        let postmaster_pid = self.postmaster_pid();
        self.signal_server(libc::SIGKILL, true);
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.wait();
        }
        forget_cleanup(postmaster_pid);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Start again on the same port, with the same data.
    pub fn restart(&self) {
        let pid_file = self.dir.join("data").join("postmaster.pid");
        let _ = std::fs::remove_file(pid_file);
        self.launch();
    }

    /// Creates the template database with every migration applied.
    fn create_template(&self) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut admin = sqlx::PgConnection::connect(&self.url("postgres"))
                .await
                .expect("connect");
            sqlx::query(&format!("CREATE DATABASE {TEMPLATE_DB}"))
                .execute(&mut admin)
                .await
                .expect("create");
            admin.close().await.ok();
            let mut conn = sqlx::PgConnection::connect(&self.url(TEMPLATE_DB))
                .await
                .expect("connect template");
            MIGRATOR.run(&mut conn).await.expect("migrations apply to the template");
            conn.close().await.ok();
        });
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        if self.child.lock().unwrap().is_some() {
            self.signal_server(libc::SIGCONT, false);
            self.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Processes whose parent is `pid`, read from /proc.
pub fn children_of(pid: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|candidate| {
            let stat = std::fs::read_to_string(format!("/proc/{candidate}/stat")).unwrap_or_default();
            // Fields after the parenthesised command name: state, ppid, ...
            let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
            after_name
                .split_whitespace()
                .nth(1)
                .and_then(|ppid| ppid.parse::<i32>().ok())
                == Some(pid)
        })
        .collect()
}

fn make_traversable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
    local_server::hand_to_server_user(dir).expect("chown");
}

/// The server in `cell`, started by `start` the first time: one per test binary. Started on a
/// plain thread, since the test calling first may be inside an async runtime.
pub fn shared_server<T: Send + Sync + 'static>(cell: &'static OnceLock<T>, start: fn() -> T) -> &'static T {
    cell.get_or_init(|| std::thread::spawn(start).join().expect("a shared server starts"))
}

/// A server of the test's own (to freeze or kill), started off the test's runtime.
pub async fn private_server<T: Send + 'static>(start: fn() -> T) -> T {
    tokio::task::spawn_blocking(start)
        .await
        .expect("a private server starts")
}

fn postgres_with_template() -> TestPostgres {
    let server = TestPostgres::start();
    server.create_template();
    server
}

/// The Postgres shared by every test of this binary, with its migrated template database.
pub fn shared_postgres() -> &'static TestPostgres {
    static SHARED: OnceLock<TestPostgres> = OnceLock::new();
    shared_server(&SHARED, postgres_with_template)
}

/// A private Postgres for a test that will freeze or kill it (with the template created too).
pub async fn private_postgres() -> TestPostgres {
    private_server(postgres_with_template).await
}
