//! Running a private Postgres from the installed server binaries: used by the development
//! dev service and by the test harness. Postgres refuses to run as root, so as root every
//! server command runs as the `postgres` system user.

use std::ffi::CString;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where `initdb`, `pg_ctl` and `postgres` live.
#[derive(Debug, Clone)]
pub struct PgBinaries {
    dir: PathBuf,
}

pub const MISSING_BINARIES: &str =
    "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: install the `postgresql` package";

impl PgBinaries {
    /// `initdb` on PATH, else the newest `/usr/lib/postgresql/*/bin`.
    pub fn locate() -> Result<Self, String> {
        let on_path = std::env::var_os("PATH")
            .into_iter()
            .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
            .map(|dir| dir.join("initdb"))
            .find(|candidate| candidate.is_file())
            .and_then(|initdb| std::fs::canonicalize(initdb).ok())
            .and_then(|initdb| initdb.parent().map(Path::to_path_buf));
        let installed = || {
            let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
                .ok()?
                .flatten()
                .filter_map(|entry| {
                    let version = entry.file_name().to_str()?.parse().ok()?;
                    Some((version, entry.path().join("bin")))
                })
                .collect();
            dirs.sort();
            dirs.pop().map(|(_, dir)| dir)
        };
        on_path
            .or_else(installed)
            .filter(|dir| ["initdb", "pg_ctl", "postgres"].iter().all(|b| dir.join(b).is_file()))
            .map(|dir| Self { dir })
            .ok_or_else(|| MISSING_BINARIES.to_owned())
    }

    /// A command for one of the server binaries, run as the server user when we are root.
    pub fn command(&self, name: &str) -> Command {
        let mut command = Command::new(self.dir.join(name));
        if let Some((uid, gid)) = server_user() {
            command.uid(uid).gid(gid);
        }
        command
    }

    /// Creates a trust-authenticated cluster (superuser `postgres`) in `data_dir`.
    pub fn initdb(&self, data_dir: &Path) -> Result<(), String> {
        std::fs::create_dir_all(data_dir).map_err(|e| format!("cannot create {}: {e}", data_dir.display()))?;
        hand_to_server_user(data_dir)?;
        let output = self
            .command("initdb")
            .arg("-D")
            .arg(data_dir)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .current_dir(data_dir)
            .output()
            .map_err(|e| format!("cannot run initdb: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        Ok(())
    }
}

/// (uid, gid) of the `postgres` user when this process runs as root; `None` otherwise.
pub fn server_user() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions; getpwnam returns a pointer into static storage that we
    // read immediately, before any other call that could overwrite it.
    unsafe {
        if libc::geteuid() != 0 {
            return None;
        }
        let name = CString::new("postgres").ok()?;
        let entry = libc::getpwnam(name.as_ptr());
        if entry.is_null() {
            return None;
        }
        Some(((*entry).pw_uid, (*entry).pw_gid))
    }
}

/// Gives a directory we created to the server user (a no-op unless we are root).
pub fn hand_to_server_user(dir: &Path) -> Result<(), String> {
    match server_user() {
        Some((uid, gid)) => std::os::unix::fs::chown(dir, Some(uid), Some(gid))
            .map_err(|e| format!("cannot give {} to the postgres user: {e}", dir.display())),
        None => Ok(()),
    }
}

/// Whether the server user can reach `dir` (every ancestor searchable). Always true when not root.
pub fn reachable_by_server_user(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some((uid, _)) = server_user() else {
        return true;
    };
    dir.ancestors().all(|ancestor| match std::fs::metadata(ancestor) {
        Ok(meta) => meta.uid() == uid || meta.mode() & 0o001 != 0,
        Err(_) => true, // not created yet: we create it ourselves
    })
}

/// A TCP port that was free a moment ago on the loopback interface.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Settings for a private cluster: loopback only, no Unix socket (its default directory may not be
/// writable), the given port.
pub fn write_server_conf(data_dir: &Path, port: u16, extra: &[&str]) -> Result<(), String> {
    use std::io::Write;
    let conf = data_dir.join("postgresql.conf");
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&conf)
        .map_err(|e| format!("cannot open {}: {e}", conf.display()))?;
    let mut text =
        format!("\n# nestling\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = ''\n");
    for line in extra {
        text.push_str(line);
        text.push('\n');
    }
    file.write_all(text.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", conf.display()))
}
