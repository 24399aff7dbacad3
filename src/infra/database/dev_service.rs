//! The development "dev service": when the default database refuses connections, start (or reuse)
//! a private Postgres cluster in `.nestling/pg`, from the installed server binaries.

use std::path::{Path, PathBuf};

use super::local_server::{self, PgBinaries};

/// Starts the dev cluster if it is not running and returns its database URL.
pub async fn ensure_running() -> Result<String, String> {
    tokio::task::spawn_blocking(ensure_running_blocking)
        .await
        .map_err(|e| format!("dev service task failed: {e}"))?
}

fn ensure_running_blocking() -> Result<String, String> {
    let binaries = PgBinaries::locate()?;
    let data = data_dir()?;
    let port_file = data.join("nestling.port");
    if !data.join("PG_VERSION").exists() {
        binaries.initdb(&data)?;
        let port = local_server::free_port().map_err(|e| format!("no free port: {e}"))?;
        local_server::write_server_conf(&data, port, &[])?;
        std::fs::write(&port_file, port.to_string())
            .map_err(|e| format!("cannot write {}: {e}", port_file.display()))?;
    }
    let port: u16 = std::fs::read_to_string(&port_file)
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .ok_or_else(|| {
            format!(
                "{} is missing or damaged: delete {} to start over",
                port_file.display(),
                data.display()
            )
        })?;

    let running = binaries.command("pg_ctl").arg("status").arg("-D").arg(&data).output();
    let already_running = matches!(running, Ok(out) if out.status.success());
    if !already_running {
        let output = binaries
            .command("pg_ctl")
            .arg("start")
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(data.join("server.log"))
            .args(["-w", "-t", "30"])
            .current_dir(&data)
            .output()
            .map_err(|e| format!("cannot run pg_ctl: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "pg_ctl start failed (see {}): {}",
                data.join("server.log").display(),
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
    }
    let pg_ctl = binaries.command("pg_ctl").get_program().to_string_lossy().into_owned();
    let stop = match local_server::server_user() {
        Some(_) => format!("su postgres -c '{pg_ctl} stop -D {}'", data.display()),
        None => format!("{pg_ctl} stop -D {}", data.display()),
    };
    log::info!(
        "dev service: {} private Postgres on 127.0.0.1:{port} (data in {}); stop it with: {stop}",
        if already_running { "using the" } else { "started a" },
        data.display()
    );
    Ok(dev_url(port))
}

fn dev_url(port: u16) -> String {
    format!("postgres://postgres@127.0.0.1:{port}/nestling")
}

/// `.nestling/pg` in the working directory; as root, when the `postgres` user cannot reach that
/// folder (a clone under /root), a folder under the temp dir named after the working directory.
fn data_dir() -> Result<PathBuf, String> {
    let data = data_dir_path()?;
    let in_working_directory = std::env::current_dir().is_ok_and(|cwd| data.starts_with(cwd));
    if in_working_directory {
        std::fs::create_dir_all(data.parent().unwrap_or(Path::new(".")))
            .map_err(|e| format!("cannot create .nestling: {e}"))?;
    }
    Ok(data)
}

/// Where `data_dir` puts the cluster, creating nothing.
fn data_dir_path() -> Result<PathBuf, String> {
    let cwd = std::env::current_dir().map_err(|e| format!("no working directory: {e}"))?;
    let local = cwd.join(".nestling").join("pg");
    if local_server::reachable_by_server_user(&local) {
        return Ok(local);
    }
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    cwd.hash(&mut hasher);
    Ok(std::env::temp_dir()
        .join(format!("nestling-dev-{:x}", hasher.finish()))
        .join("pg"))
}

/// The dev service's database URL when this working directory has one, without starting it
/// (`nestling doctor`): whether it runs, a connection tells.
pub fn url_if_created() -> Option<String> {
    let port = std::fs::read_to_string(data_dir_path().ok()?.join("nestling.port")).ok()?;
    let port: u16 = port.trim().parse().ok()?;
    Some(dev_url(port))
}
