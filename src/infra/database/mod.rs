//! The Postgres pool with explicit timeouts, the `Database` component every repository injects,
//! start-up preparation (dev service, create database, migrations), and the writes that join a
//! caller's open transaction (`transaction`).

pub mod dev_service;
pub mod local_server;
pub mod transaction;

use std::future::Future;
use std::io;
use std::time::{Duration, Instant};

use shaku::{Component, Interface};
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

use crate::config::{AppEnv, Settings};

pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// The pool plus the deadline every statement runs under.
pub trait Database: Interface {
    fn pool(&self) -> &PgPool;
    fn statement_timeout(&self) -> Duration;
    fn health_timeout(&self) -> Duration;
}

#[derive(Component)]
#[shaku(interface = Database)]
pub struct PgDatabase {
    pool: PgPool,
    statement_timeout: Duration,
    health_timeout: Duration,
}

impl Database for PgDatabase {
    fn pool(&self) -> &PgPool {
        &self.pool
    }
    fn statement_timeout(&self) -> Duration {
        self.statement_timeout
    }
    fn health_timeout(&self) -> Duration {
        self.health_timeout
    }
}

impl dyn Database {
    /// Runs one statement or transaction under the statement deadline. sqlx has no query timeout,
    /// and a frozen server never answers: without this a request would hang forever.
    pub async fn run<T>(&self, work: impl Future<Output = Result<T, sqlx::Error>>) -> Result<T, sqlx::Error> {
        within(self.statement_timeout(), work).await
    }

    /// The connection a one-statement write runs on: the open transaction of the request when
    /// there is one (see `transaction`), else a pooled connection. End it with `commit`.
    pub async fn writer(&self) -> Result<transaction::Write, sqlx::Error> {
        transaction::write(self.pool(), false).await
    }

    /// `writer` for several statements that must commit together: a transaction of its own
    /// when the request has none open.
    pub async fn begin(&self) -> Result<transaction::Write, sqlx::Error> {
        transaction::write(self.pool(), true).await
    }

    /// Runs `work` with its writes in one transaction (see `transaction`): the request's open
    /// one, or one of its own, committed when `work` succeeds. BEGIN and COMMIT run under the
    /// statement deadline, as each write does.
    pub async fn transaction<T, E: From<sqlx::Error>>(&self, work: impl Future<Output = Result<T, E>>) -> Result<T, E> {
        transaction::run_in_transaction(self.pool(), self.statement_timeout(), work).await
    }

    /// Round-trip time of `SELECT 1`, under the (shorter) health deadline.
    pub async fn ping(&self) -> Result<Duration, sqlx::Error> {
        let started = Instant::now();
        within(self.health_timeout(), sqlx::query("SELECT 1").execute(self.pool())).await?;
        Ok(started.elapsed())
    }
}

/// `work` under `deadline`: sqlx has no query timeout of its own.
pub async fn within<T>(
    deadline: Duration,
    work: impl Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, sqlx::Error> {
    match tokio::time::timeout(deadline, work).await {
        Ok(result) => result,
        Err(_) => Err(sqlx::Error::Io(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("database did not answer within {deadline:?}"),
        ))),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DatabaseSetupError {
    #[error("DATABASE_URL is not a valid Postgres URL: {0}")]
    InvalidUrl(#[source] sqlx::Error),
    #[error("cannot reach Postgres at {url}: {source}")]
    Unreachable { url: String, source: sqlx::Error },
    #[error("cannot create database {name}: {source}")]
    CreateDatabase { name: String, source: sqlx::Error },
    #[error("migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("migrations did not finish within {0:?} (DATABASE_MIGRATION_TIMEOUT_MS)")]
    MigrationTimeout(Duration),
    #[error("dev service: {0}")]
    DevService(String),
}

/// Makes the database ready: starts the dev service when allowed and needed, creates the database
/// if missing, applies migrations when `migrate` is set, and returns the application pool.
pub async fn prepare(settings: &mut Settings, migrate: bool) -> Result<PgPool, DatabaseSetupError> {
    let db = &settings.database;
    let options: PgConnectOptions = db.url.parse().map_err(DatabaseSetupError::InvalidUrl)?;
    match probe(&options, db.connect_timeout).await {
        Err(err) if refused(&err) && settings.app.env == AppEnv::Development && db.url_is_default => {
            let url = dev_service::ensure_running()
                .await
                .map_err(DatabaseSetupError::DevService)?;
            settings.database.url = url;
        }
        _ => {}
    }
    let db = &settings.database;
    let options: PgConnectOptions = db.url.parse().map_err(DatabaseSetupError::InvalidUrl)?;
    create_database_if_missing(&options, db.connect_timeout).await?;
    let pool = pool(settings)?;
    if migrate {
        let deadline = settings.database.migration_timeout;
        match tokio::time::timeout(deadline, MIGRATOR.run(&pool)).await {
            Ok(applied) => applied?,
            Err(_) => return Err(DatabaseSetupError::MigrationTimeout(deadline)),
        }
    }
    Ok(pool)
}

/// The application pool: lazily connecting, every wait bounded.
pub fn pool(settings: &Settings) -> Result<PgPool, DatabaseSetupError> {
    let db = &settings.database;
    let options: PgConnectOptions = db.url.parse().map_err(DatabaseSetupError::InvalidUrl)?;
    // Server-side limit too, so a slow statement on a live server is cancelled there, not only abandoned here.
    let statement_ms = db.statement_timeout.as_millis().to_string();
    let options = options
        .options([("statement_timeout", statement_ms.as_str())])
        .application_name("nestling")
        .log_slow_statements(log::LevelFilter::Warn, Duration::from_millis(500));
    Ok(PgPoolOptions::new()
        .max_connections(db.max_connections)
        .acquire_timeout(db.acquire_timeout)
        .idle_timeout(Duration::from_secs(300))
        // sqlx pings every connection it hands out: one more round trip per statement. A
        // connection used moments ago is as alive as a ping would show; only one idle for longer
        // is pinged (HikariCP's `aliveBypassWindowMs` does the same).
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_IF_IDLE_FOR {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
        .connect_lazy_with(options))
}

/// A pooled connection idle this long is pinged before use (see `pool`).
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

async fn probe(options: &PgConnectOptions, timeout: Duration) -> Result<(), sqlx::Error> {
    let conn = within(timeout, sqlx::PgConnection::connect_with(options)).await?;
    within(timeout, conn.close()).await
}

fn refused(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Io(e) if e.kind() == io::ErrorKind::ConnectionRefused)
}

async fn create_database_if_missing(options: &PgConnectOptions, timeout: Duration) -> Result<(), DatabaseSetupError> {
    let unreachable = |source| DatabaseSetupError::Unreachable {
        url: describe(options),
        source,
    };
    let err = match probe(options, timeout).await {
        Ok(()) => return Ok(()),
        Err(err) => err,
    };
    let missing = matches!(&err, sqlx::Error::Database(e) if e.code().as_deref() == Some("3D000"));
    if !missing {
        return Err(unreachable(err));
    }
    let name = options.get_database().unwrap_or("postgres").to_owned();
    let admin = options.clone().database("postgres");
    let mut conn = within(timeout, sqlx::PgConnection::connect_with(&admin))
        .await
        .map_err(unreachable)?;
    let statement = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
    match within(timeout, sqlx::query(&statement).execute(&mut conn)).await {
        Ok(_) => log::info!("created database {name}"),
        // Another process created it meanwhile.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
        Err(source) => return Err(DatabaseSetupError::CreateDatabase { name, source }),
    }
    within(timeout, conn.close()).await.ok();
    Ok(())
}

fn describe(options: &PgConnectOptions) -> String {
    format!(
        "{}:{}/{}",
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("postgres")
    )
}
