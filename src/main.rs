//! `nestling` (serve), `nestling migrate`, `nestling seed`, `nestling admin grant|revoke <email>`,
//! `nestling admin end-sessions <email>`, `nestling jobs list [--dead]`, `nestling jobs retry <id>`,
//! `nestling redis check`, `nestling health`, `nestling doctor`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use nestling::config::{redacted, Settings};
use nestling::infra::database;
use nestling::infra::redis::check::check;
use nestling::infra::redis::keys::KeyRegistry;
use nestling::modules::health::service::HealthReport;
use nestling::modules::users::repository::set_admin;
use nestling::seed;
use nestling::startup::Application;

#[derive(Parser)]
#[command(name = "nestling", version, about = "A NestJS-style backend starter in Rust")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API (the default).
    Serve,
    /// Create the database if missing, apply migrations, exit.
    Migrate,
    /// Migrate, then load the demo data (demo@nestling.dev / demo-password).
    Seed,
    /// Give or take a user's admin role: their own bearer token then opens the /admin endpoints.
    Admin {
        #[command(subcommand)]
        action: AdminAction,
    },
    /// Ask a running instance for `GET /health` and print each component: exit 0 when healthy,
    /// 1 otherwise (for scripts and container health checks).
    Health {
        /// The instance; by default this configuration's `http://127.0.0.1:APP_PORT`.
        #[arg(long)]
        url: Option<String>,
        /// How long to wait for the answer.
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
    },
    /// Write code: `generate resource labels name:string 'color:enum(red|blue)?' --parent workspaces`.
    #[command(alias = "g")]
    Generate {
        #[command(subcommand)]
        what: GenerateWhat,
    },
    /// Check what a deploy needs, one line each: every configuration variable (set or default),
    /// Postgres and its version, pending migrations, the job queue, Redis (as `redis check`) and
    /// the clocks' skew. Exits 1 naming what fails.
    Doctor,
    /// Run this configuration's job workers and scheduler without HTTP (SIGTERM: finish within
    /// APP_SHUTDOWN_TIMEOUT, hand the rest back).
    Worker,
    /// The job queue in the configured database (as `GET /admin/jobs` shows it), without serving.
    Jobs {
        #[command(subcommand)]
        action: JobsAction,
    },
    /// Operations on the configured Redis (`REDIS_URL`, whatever `REDIS_ENABLED` says).
    Redis {
        #[command(subcommand)]
        action: RedisAction,
    },
}

#[derive(Subcommand)]
enum GenerateWhat {
    /// A cached, documented, tested CRUD resource under a workspace or a project: the feature
    /// module, a migration, a test file, and the lines that wire them in (README, "Adding a
    /// feature module"). Refuses to overwrite; run again, it changes nothing.
    Resource {
        /// Plural, snake_case: the table, the module and the URL (`labels`).
        name: String,
        /// `name:type`, type one of string, text, int, bool, date, timestamp, uuid, enum(a|b|c);
        /// `?` after the type makes the field optional (`'color:enum(red|blue)?'`: quoted for the
        /// shell).
        fields: Vec<String>,
        #[arg(long, value_enum, default_value = "workspaces")]
        parent: nestling::generate::Parent,
        /// The singular, when it is not the name without its plural ending.
        #[arg(long)]
        singular: Option<String>,
        /// Seconds its entries stay cached (the default of its TTL-table row).
        #[arg(long, default_value_t = 600)]
        ttl: u64,
        /// The repository's root.
        #[arg(long, default_value = ".")]
        root: std::path::PathBuf,
    },
}

#[derive(Subcommand)]
enum RedisAction {
    /// Connect, PING, read the server's memory and persistence settings, and run a
    /// SET/GET/PUBLISH/SUBSCRIBE round trip under the key prefix. Exits 0 when the app can use
    /// it (warnings are printed), 1 when it cannot.
    Check,
}

#[derive(Subcommand)]
enum JobsAction {
    /// Jobs by queue and state, with the due backlog and how long its oldest job has waited.
    List {
        /// List the dead jobs instead, newest first: id, kind, attempts, last error.
        #[arg(long)]
        dead: bool,
        /// With --dead: how many at most.
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Queue a dead job again, its attempts reset (a running instance takes it at its next poll,
    /// `JOBS_POLL_MS`). Exits 1 when no dead job has this id.
    Retry { id: i64 },
}

#[derive(Subcommand)]
enum AdminAction {
    /// Grant the admin role to the user with this email.
    Grant { email: String },
    /// Revoke it.
    Revoke { email: String },
    /// End every session of the user with this email: on every running instance within a
    /// second when `REDIS_URL` is set (the instances hear it as they hear a logout).
    EndSessions { email: String },
}

fn main() -> ExitCode {
    dotenvy::dotenv().ok();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info,sqlx=warn")).init();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Doctor) => return doctor(),
        Some(Command::Generate { what }) => return generate(what),
        _ => {}
    }
    let settings = match Settings::from_env() {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("nestling: {err}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = actix_web::rt::System::new().block_on(run(cli.command.unwrap_or(Command::Serve), settings));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("nestling: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, mut settings: Settings) -> Result<(), Box<dyn std::error::Error>> {
    match command {
        Command::Serve => Application::build(settings).await?.run_until_stopped().await?,
        Command::Worker => nestling::startup::run_worker(settings).await?,
        Command::Doctor | Command::Generate { .. } => unreachable!("run before the configuration is read"),
        Command::Migrate => {
            database::prepare(&mut settings, true).await?;
            log::info!("migrations applied");
        }
        Command::Seed => {
            let pool = database::prepare(&mut settings, true).await?;
            seed::run(&pool).await?;
        }
        Command::Admin { action } => {
            let (email, grant) = match action {
                AdminAction::Grant { email } => (email, true),
                AdminAction::Revoke { email } => (email, false),
                AdminAction::EndSessions { email } => return end_sessions(settings, &email).await,
            };
            let pool = database::prepare(&mut settings, true).await?;
            let deadline = settings.database.statement_timeout;
            if !set_admin(&pool, &email, grant, deadline).await? {
                return Err(format!("no user has the email {email}").into());
            }
            log::info!("{email}: admin role {}", if grant { "granted" } else { "revoked" });
        }
        Command::Jobs { action } => return jobs(settings, action).await,
        Command::Health { url, timeout_ms } => {
            let url = url.unwrap_or_else(|| format!("http://127.0.0.1:{}", settings.app.port));
            let wait = std::time::Duration::from_millis(timeout_ms);
            let (status, body) = tokio::time::timeout(wait, get(&url, "/health"))
                .await
                .map_err(|_| format!("{url} did not answer within {timeout_ms} ms"))??;
            let report: HealthReport = serde_json::from_slice(&body)
                .map_err(|err| format!("{url}/health answered {status} with an unexpected body: {err}"))?;
            println!("status: {}", report.status);
            for (name, component) in &report.details {
                let status = serde_json::to_value(component.status)?;
                let reason = component.reason.map(serde_json::to_value).transpose()?;
                match reason {
                    Some(reason) => println!(
                        "{name}: {} ({})",
                        status.as_str().unwrap_or("?"),
                        reason.as_str().unwrap_or("?")
                    ),
                    None => println!("{name}: {}", status.as_str().unwrap_or("?")),
                }
            }
            if status != 200 {
                return Err(format!("{url}/health answered {status}").into());
            }
        }
        Command::Redis {
            action: RedisAction::Check,
        } => {
            let keys = KeyRegistry::new(settings.redis.key_prefix.clone(), settings.ttl.clone());
            println!("redis check: {}", redacted(&settings.redis.url));
            let report = check(&settings.redis, keys).await;
            for finding in &report.findings {
                println!("{finding}");
            }
            if !report.usable() {
                return Err("this Redis cannot be used".into());
            }
            println!("usable");
        }
    }
    Ok(())
}

/// `nestling generate`: works on the source tree; needs no configuration.
fn generate(what: GenerateWhat) -> ExitCode {
    let GenerateWhat::Resource {
        name,
        fields,
        parent,
        singular,
        ttl,
        root,
    } = what;
    let request = nestling::generate::Request {
        root,
        name,
        singular,
        parent,
        fields,
        ttl_seconds: ttl,
    };
    match nestling::generate::resource(&request) {
        Ok(report) => {
            for line in report {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("nestling generate: {err}");
            ExitCode::FAILURE
        }
    }
}

/// `nestling doctor`: reads the configuration itself, so that an invalid variable is one failed
/// check among the others' lines rather than the end of the run.
fn doctor() -> ExitCode {
    let checkup = actix_web::rt::System::new().block_on(nestling::doctor::examine(|name| std::env::var(name).ok()));
    for line in &checkup.lines {
        println!("{line}");
    }
    if checkup.failed.is_empty() {
        println!("doctor: every check passed");
        ExitCode::SUCCESS
    } else {
        eprintln!("nestling doctor: failed: {}", checkup.failed.join(", "));
        ExitCode::FAILURE
    }
}

/// Ends the sessions through the app's own services, so the invalidations take the path of a
/// logout: Redis, then every instance. Redis trouble is waited out briefly (the cache replays
/// what it queued), then reported: Postgres no longer knows the tokens, so running this again
/// could not name them.
async fn end_sessions(mut settings: Settings, email: &str) -> Result<(), Box<dyn std::error::Error>> {
    use nestling::error::AppError;
    use nestling::infra::cache::CacheService;
    use nestling::infra::redis::RedisService;
    use nestling::modules::admin::service::AdminService;
    use shaku::HasComponent;
    use std::sync::Arc;

    let pool = database::prepare(&mut settings, true).await?;
    let module = nestling::container::builder(&settings, pool).build();
    let admin: Arc<dyn AdminService> = module.resolve();
    let cache: Arc<dyn CacheService> = module.resolve();
    let redis: Arc<dyn RedisService> = module.resolve();
    let ended = admin.end_sessions_by_email(email).await.map_err(|err| match err {
        AppError::NotFound { .. } => format!("no user has the email {email}"),
        err => err.to_string(),
    })?;
    if !redis.is_syncing() {
        log::warn!(
            "{email}: {} session(s) ended; without REDIS_URL the running instances cannot be told: \
             each stops honouring them when its cached copy expires (CACHE_L1_MAX_TTL)",
            ended.ended
        );
        return Ok(());
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    if redis.synced().is_some() && cache.status().pending_invalidations > 0 {
        // The subscriber replays queued invalidations once Redis answers.
        cache.start();
        while cache.status().pending_invalidations > 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
    if redis.synced().is_none() || cache.status().pending_invalidations > 0 {
        return Err(format!(
            "{email}: {} session(s) ended in Postgres, but Redis did not take the invalidations: \
             instances that reach it may honour those tokens until their cached sessions expire",
            ended.ended
        )
        .into());
    }
    log::info!("{email}: {} session(s) ended on every instance", ended.ended);
    Ok(())
}

/// `nestling jobs ...`: the container's job queue on the configured database; no server, no
/// workers (the queue only answers `counts`, `dead` and `retry` here).
async fn jobs(mut settings: Settings, action: JobsAction) -> Result<(), Box<dyn std::error::Error>> {
    use nestling::infra::jobs::JobQueue;
    use shaku::HasComponent;
    use std::sync::Arc;

    let pool = database::prepare(&mut settings, true).await?;
    let module = nestling::container::builder(&settings, pool).build();
    let queue: Arc<dyn JobQueue> = module.resolve();
    match action {
        JobsAction::List { dead: false, .. } => {
            let counts = queue.counts().await?;
            if counts.is_empty() {
                println!("no jobs");
            }
            let rows = counts.into_iter().map(|count| {
                let oldest = count.oldest_due_seconds.map(|s| format!("{s:.1}")).unwrap_or_default();
                let due = if count.state == "queued" {
                    count.due.to_string()
                } else {
                    String::new()
                };
                vec![count.queue, count.state, count.jobs.to_string(), due, oldest]
            });
            print_table(&["QUEUE", "STATE", "JOBS", "DUE", "OLDEST DUE (s)"], rows);
        }
        JobsAction::List { dead: true, limit } => {
            let dead = queue.dead(limit).await?;
            if dead.is_empty() {
                println!("no dead jobs");
            }
            let rows = dead.into_iter().map(|job| {
                // One line per job, whatever the error's text holds.
                let error = job
                    .last_error
                    .unwrap_or_default()
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ");
                vec![job.id.to_string(), job.kind, job.attempts.to_string(), error]
            });
            print_table(&["ID", "KIND", "ATTEMPTS", "LAST ERROR"], rows);
        }
        JobsAction::Retry { id } => {
            if !queue.retry(id).await? {
                return Err(
                    format!("no dead job has the id {id} (or a queued job of its kind holds its unique key)").into(),
                );
            }
            println!("job {id} queued again");
        }
    }
    Ok(())
}

/// Left-aligned columns two spaces apart under `header`; nothing when there are no rows.
fn print_table(header: &[&str], rows: impl Iterator<Item = Vec<String>>) {
    let rows: Vec<Vec<String>> = rows.collect();
    if rows.is_empty() {
        return;
    }
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:width$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// `GET <base><path>` over plain HTTP/1.1 (a local probe: no TLS, no redirects): (status, body).
async fn get(base: &str, path: &str) -> Result<(u16, Vec<u8>), Box<dyn std::error::Error>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let authority = base
        .strip_prefix("http://")
        .ok_or_else(|| format!("{base}: only http:// URLs can be probed"))?
        .trim_end_matches('/');
    let mut stream = tokio::net::TcpStream::connect(authority)
        .await
        .map_err(|err| format!("{base}: {err}"))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let head_end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("the answer is not HTTP")?;
    let head = String::from_utf8_lossy(&response[..head_end]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or("the answer has no status")?;
    Ok((status, response[head_end + 4..].to_vec()))
}
