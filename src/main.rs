//! `nestling` (serve), `nestling migrate`, `nestling seed`, `nestling admin grant|revoke <email>`,
//! `nestling redis check`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use nestling::config::Settings;
use nestling::infra::database;
use nestling::infra::redis::check::check;
use nestling::infra::redis::keys::KeyRegistry;
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
    /// Operations on the configured Redis (`REDIS_URL`, whatever `REDIS_ENABLED` says).
    Redis {
        #[command(subcommand)]
        action: RedisAction,
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
enum AdminAction {
    /// Grant the admin role to the user with this email.
    Grant { email: String },
    /// Revoke it.
    Revoke { email: String },
}

fn main() -> ExitCode {
    dotenvy::dotenv().ok();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info,sqlx=warn")).init();
    let cli = Cli::parse();
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
            };
            let pool = database::prepare(&mut settings, true).await?;
            let deadline = settings.database.statement_timeout;
            if !set_admin(&pool, &email, grant, deadline).await? {
                return Err(format!("no user has the email {email}").into());
            }
            log::info!("{email}: admin role {}", if grant { "granted" } else { "revoked" });
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

/// The URL without its user and password.
fn redacted(url: &str) -> String {
    match url
        .split_once("://")
        .and_then(|(scheme, rest)| Some((scheme, rest.rsplit_once('@')?.1)))
    {
        Some((scheme, host)) => format!("{scheme}://***@{host}"),
        None => url.to_owned(),
    }
}
