//! `nestling doctor`: what a deploy checks before it serves, one line each: the configuration
//! (every variable, set or default), Postgres and its version, pending migrations, the job queue,
//! Redis (what `nestling redis check` says) and the clock skew between this host and Postgres
//! and Redis. It starts nothing and changes nothing (the dev service included).

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection};

use crate::config::{AppEnv, Settings, Variable};
use crate::infra::database::{dev_service, within, MIGRATOR};
use crate::infra::redis::check::{check, Finding, Verdict};
use crate::infra::redis::keys::KeyRegistry;
use crate::infra::redis::{RedisModule, RedisService};
use crate::infra::telemetry::Telemetry;

/// Clock skew worth a warning: cache and lease times are this host's, job and token times
/// Postgres', rate limits Redis'.
const SKEW_WARN: Duration = Duration::from_millis(250);
/// Clock skew that fails the check: a job scheduled by one clock and run by another, or a token
/// expiring by one and checked by the other, would be visibly early or late.
const SKEW_FAIL: Duration = Duration::from_secs(2);

/// The lines to print, and the checks that failed.
#[derive(Default)]
pub struct Checkup {
    pub lines: Vec<String>,
    pub failed: Vec<&'static str>,
}

impl Checkup {
    fn record(&mut self, check: &'static str, verdict: Verdict, text: impl AsRef<str>) {
        let text = format!("{check}: {}", text.as_ref());
        self.lines.push(Finding { verdict, text }.to_string());
        if verdict == Verdict::Fail {
            self.failed.push(check);
        }
    }
}

/// Runs every check against the configuration `lookup` reads (the environment and `.env`).
pub async fn examine(lookup: impl Fn(&str) -> Option<String>) -> Checkup {
    let mut checkup = Checkup::default();
    let (settings, variables) = match Settings::described(lookup) {
        Ok(described) => described,
        Err(err) => {
            checkup.record("config", Verdict::Fail, err.to_string());
            return checkup;
        }
    };
    configuration(&variables, &mut checkup);
    let postgres = postgres(&settings, &mut checkup).await;
    let mut skews = Vec::new();
    match postgres {
        Some((mut conn, skew)) => {
            skews.push(("Postgres", skew));
            migrations(&settings, &mut conn, &mut checkup).await;
            job_queue(&settings, &mut conn, &mut checkup).await;
            within(settings.database.connect_timeout, conn.close()).await.ok();
        }
        None => {
            checkup.record("migrations", Verdict::Warn, "not checked: no database");
            checkup.record("job queue", Verdict::Warn, "not checked: no database");
        }
    }
    if let Some(skew) = redis(&settings, &mut checkup).await {
        skews.push(("Redis", skew));
    }
    clock(&skews, &mut checkup);
    checkup
}

fn configuration(variables: &[Variable], checkup: &mut Checkup) {
    let set = variables.iter().filter(|v| v.set.is_some()).count();
    checkup.record(
        "config",
        Verdict::Ok,
        format!("{} variables read, {set} set, the rest default", variables.len()),
    );
    for variable in variables {
        let origin = if variable.set.is_some() { "set" } else { "default" };
        checkup
            .lines
            .push(format!("       {}={} ({origin})", variable.name, variable.shown()));
    }
}

/// Connects (in development, with the default URL, to the dev service if this folder has one)
/// and reads the server's version and clock: the connection, and the clock's skew.
async fn postgres(settings: &Settings, checkup: &mut Checkup) -> Option<(PgConnection, Skew)> {
    let db = &settings.database;
    let may_use_dev_service = settings.app.env == AppEnv::Development && db.url_is_default;
    let mut url = db.url.clone();
    let mut connected = connect(&url, db.connect_timeout).await;
    if connected.is_err() && may_use_dev_service {
        if let Some(dev_url) = dev_service::url_if_created() {
            if let Ok(conn) = connect(&dev_url, db.connect_timeout).await {
                (url, connected) = (dev_url, Ok(conn));
            }
        }
    }
    let mut where_ = crate::config::redacted(&url);
    if url != db.url {
        where_.push_str(" (the dev service)");
    }
    let mut conn = match connected {
        Ok(conn) => conn,
        Err(err) if may_use_dev_service => {
            checkup.record(
                "postgres",
                Verdict::Warn,
                format!("nothing answers at {where_} ({err}); in development `nestling` starts the dev service"),
            );
            return None;
        }
        Err(err) => {
            checkup.record("postgres", Verdict::Fail, format!("cannot connect to {where_}: {err}"));
            return None;
        }
    };
    let sent = SystemTime::now();
    let started = Instant::now();
    let asked = sqlx::query_as::<_, (String, f64)>(
        "SELECT current_setting('server_version'), extract(epoch FROM clock_timestamp())::float8",
    )
    .fetch_one(&mut conn);
    match within(db.statement_timeout, asked).await {
        Ok((version, epoch)) => {
            let round_trip = started.elapsed();
            checkup.record(
                "postgres",
                Verdict::Ok,
                format!("PostgreSQL {version} at {where_}, {} ms", round_trip.as_millis()),
            );
            Some((conn, Skew::of(epoch, sent, round_trip)))
        }
        Err(err) => {
            checkup.record(
                "postgres",
                Verdict::Fail,
                format!("{where_} connected but did not answer: {err}"),
            );
            None
        }
    }
}

async fn connect(url: &str, timeout: Duration) -> Result<PgConnection, sqlx::Error> {
    let options: PgConnectOptions = url.parse()?;
    within(timeout, options.connect()).await
}

/// Postgres' `undefined_table` (42P01): a table the pending migrations have not made yet.
fn is_undefined_table(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(e) if e.code().as_deref() == Some("42P01"))
}

/// Migrations in the binary against those the database recorded: pending, changed since they
/// were applied, failed, or unknown to this build.
async fn migrations(settings: &Settings, conn: &mut PgConnection, checkup: &mut Checkup) {
    let query = sqlx::query_as::<_, (i64, Vec<u8>, bool)>("SELECT version, checksum, success FROM _sqlx_migrations");
    let applied: HashMap<i64, (Vec<u8>, bool)> =
        match within(settings.database.statement_timeout, query.fetch_all(&mut *conn)).await {
            Ok(rows) => rows
                .into_iter()
                .map(|(version, checksum, success)| (version, (checksum, success)))
                .collect(),
            // No table yet: nothing applied.
            Err(err) if is_undefined_table(&err) => HashMap::new(),
            Err(err) => {
                checkup.record(
                    "migrations",
                    Verdict::Fail,
                    format!("cannot read _sqlx_migrations: {err}"),
                );
                return;
            }
        };
    let known: Vec<_> = MIGRATOR.iter().filter(|m| m.migration_type.is_up_migration()).collect();
    let mut pending = Vec::new();
    let mut problems = Vec::new();
    for migration in &known {
        match applied.get(&migration.version) {
            None => pending.push(migration.version.to_string()),
            Some((_, false)) => problems.push(format!("{} failed part-way", migration.version)),
            Some((checksum, true)) if checksum[..] != migration.checksum[..] => {
                problems.push(format!("{} changed since it was applied", migration.version))
            }
            Some(_) => {}
        }
    }
    for version in applied.keys().filter(|v| !known.iter().any(|m| m.version == **v)) {
        problems.push(format!("{version} is applied but not in this build"));
    }
    let summary = format!("{} of {} applied", known.len() - pending.len(), known.len());
    if !problems.is_empty() {
        checkup.record(
            "migrations",
            Verdict::Fail,
            format!("{summary}; {}", problems.join("; ")),
        );
    } else if pending.is_empty() {
        checkup.record("migrations", Verdict::Ok, format!("{summary}, none pending"));
    } else if settings.database.migrate_on_start {
        checkup.record(
            "migrations",
            Verdict::Warn,
            format!(
                "{summary}; pending: {} (applied on start: APP_MIGRATE_ON_START=true)",
                pending.join(", ")
            ),
        );
    } else {
        checkup.record(
            "migrations",
            Verdict::Fail,
            format!(
                "{summary}; pending: {} and APP_MIGRATE_ON_START=false: run `nestling migrate`",
                pending.join(", ")
            ),
        );
    }
}

/// The job queue's table answers: jobs by state, and how long the oldest due one has waited.
async fn job_queue(settings: &Settings, conn: &mut PgConnection, checkup: &mut Checkup) {
    let query = sqlx::query_as::<_, (i64, i64, i64, i64, Option<f64>)>(
        "SELECT count(*) FILTER (WHERE state = 'queued'),
                count(*) FILTER (WHERE state = 'queued' AND run_at <= now()),
                count(*) FILTER (WHERE state = 'running'),
                count(*) FILTER (WHERE state = 'dead'),
                extract(epoch FROM now() - min(run_at) FILTER (WHERE state = 'queued' AND run_at <= now()))::float8
         FROM jobs",
    );
    match within(settings.database.statement_timeout, query.fetch_one(conn)).await {
        Ok((queued, due, running, dead, oldest)) => {
            let waited = oldest.map_or(String::new(), |s| format!(", the oldest waiting {s:.0} s"));
            let text = format!("reachable: {queued} queued ({due} due{waited}), {running} running, {dead} dead");
            let verdict = if dead > 0 { Verdict::Warn } else { Verdict::Ok };
            let hint = if dead > 0 { " (`nestling jobs list --dead`)" } else { "" };
            checkup.record("job queue", verdict, format!("{text}{hint}"));
        }
        Err(err) if is_undefined_table(&err) => {
            checkup.record(
                "job queue",
                Verdict::Warn,
                "no jobs table yet (created by the pending migrations)",
            );
        }
        Err(err) => checkup.record("job queue", Verdict::Fail, format!("cannot read the jobs table: {err}")),
    }
}

/// `redis check` when the app would use Redis (REDIS_ENABLED, or a REDIS_URL for the fleet's
/// cache sync), then its clock.
async fn redis(settings: &Settings, checkup: &mut Checkup) -> Option<Skew> {
    if !settings.redis.enabled && !settings.redis.fleet_sync {
        checkup.record(
            "redis",
            Verdict::Ok,
            "not used (REDIS_ENABLED=false, no REDIS_URL): memory mode",
        );
        return None;
    }
    let keys = KeyRegistry::new(settings.redis.key_prefix.clone(), settings.ttl.clone());
    let report = check(&settings.redis, keys.clone()).await;
    let why = if settings.redis.enabled {
        "REDIS_ENABLED=true"
    } else {
        "memory mode, REDIS_URL set: the fleet's cache sync"
    };
    if let Some(failure) = report.findings.iter().find(|f| f.verdict == Verdict::Fail) {
        checkup.record("redis", Verdict::Fail, format!("{why}; not usable: {}", failure.text));
        return None;
    }
    let warnings: Vec<&str> = report
        .findings
        .iter()
        .filter(|f| f.verdict == Verdict::Warn)
        .map(|f| f.text.as_str())
        .collect();
    let server = report
        .findings
        .iter()
        .find(|f| f.text.starts_with("server:"))
        .map_or("", |f| f.text.trim_start_matches("server: "));
    if warnings.is_empty() {
        checkup.record("redis", Verdict::Ok, format!("{why}; usable: {server}"));
    } else {
        checkup.record(
            "redis",
            Verdict::Warn,
            format!("{why}; usable: {server}; warnings: {}", warnings.join("; ")),
        );
    }
    let module = RedisModule::new(
        crate::config::RedisSettings {
            enabled: true,
            ..settings.redis.clone()
        },
        keys,
        Telemetry::new(),
    );
    let redis = module.active()?;
    let sent = SystemTime::now();
    let started = Instant::now();
    let (seconds, micros) = redis.server_time().await.ok()?;
    Some(Skew::of(seconds as f64 + micros as f64 / 1e6, sent, started.elapsed()))
}

/// A server's clock against this host's: the server's time minus the middle of the round trip,
/// known to within half the round trip.
#[derive(Clone, Copy)]
struct Skew {
    seconds: f64,
    uncertainty: f64,
}

impl Skew {
    fn of(server_epoch: f64, sent: SystemTime, round_trip: Duration) -> Skew {
        let sent = sent.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        let half = round_trip.as_secs_f64() / 2.0;
        Skew {
            seconds: server_epoch - (sent + half),
            uncertainty: half,
        }
    }

    /// The least the skew can be, given the round trip.
    fn at_least(self) -> Duration {
        Duration::from_secs_f64((self.seconds.abs() - self.uncertainty).max(0.0))
    }
}

fn clock(skews: &[(&str, Skew)], checkup: &mut Checkup) {
    if skews.is_empty() {
        checkup.record("clock", Verdict::Warn, "not checked: no server answered");
        return;
    }
    let shown: Vec<String> = skews
        .iter()
        .map(|(name, skew)| {
            format!(
                "{name} {:+.0} ms (± {:.0})",
                skew.seconds * 1000.0,
                (skew.uncertainty * 1000.0).ceil()
            )
        })
        .collect();
    let worst = skews.iter().map(|(_, skew)| skew.at_least()).max().unwrap_or_default();
    let verdict = if worst > SKEW_FAIL {
        Verdict::Fail
    } else if worst > SKEW_WARN {
        Verdict::Warn
    } else {
        Verdict::Ok
    };
    checkup.record(
        "clock",
        verdict,
        format!(
            "skew against this host: {} (warn above {} ms, fail above {} s)",
            shown.join(", "),
            SKEW_WARN.as_millis(),
            SKEW_FAIL.as_secs()
        ),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The clock line's verdict for a server `skew_ms` ahead, seen over a `round_trip_ms` round
    /// trip. (A real server's clock cannot be set apart from this host's in a test.)
    fn verdict(skew_ms: f64, round_trip_ms: u64) -> String {
        let round_trip = Duration::from_millis(round_trip_ms);
        let sent = SystemTime::now();
        let middle = sent.duration_since(UNIX_EPOCH).unwrap() + round_trip / 2;
        let skew = Skew::of(middle.as_secs_f64() + skew_ms / 1000.0, sent, round_trip);
        let mut checkup = Checkup::default();
        clock(&[("Redis", skew)], &mut checkup);
        checkup.lines[0].split(' ').next().unwrap().to_owned()
    }

    #[test]
    fn a_skew_warns_then_fails_and_the_round_trip_is_given_the_benefit_of_the_doubt() {
        assert_eq!(verdict(30.0, 1), "ok");
        assert_eq!(verdict(-400.0, 1), "warn");
        assert_eq!(verdict(2_500.0, 1), "FAIL");
        // 400 ms ahead over a 400 ms round trip may be 200 ms: not a warning.
        assert_eq!(verdict(400.0, 400), "ok");
    }
}
