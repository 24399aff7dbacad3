//! `nestling redis check`: what an operator runs against a Redis before pointing the app at it.
//! Connects as the app would (TLS and ACL user from `REDIS_URL`), then reports one finding per
//! line. Warnings leave the Redis usable; a failure does not. Every step is bounded by the
//! module's connect and command timeouts, so the whole check ends within a few seconds.

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use super::{RedisFailure, RedisModule, RedisService};
use crate::config::RedisSettings;
use crate::infra::redis::keys::KeyRegistry;
use crate::infra::telemetry::Telemetry;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    Warn,
    Fail,
}

pub struct Finding {
    pub verdict: Verdict,
    pub text: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let label = match self.verdict {
            Verdict::Ok => "ok  ",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
        };
        write!(f, "{label} {}", self.text)
    }
}

#[derive(Default)]
pub struct Report {
    pub findings: Vec<Finding>,
}

impl Report {
    fn add(&mut self, verdict: Verdict, text: impl Into<String>) {
        self.findings.push(Finding {
            verdict,
            text: text.into(),
        });
    }

    /// Usable: nothing failed (warnings allowed).
    pub fn usable(&self) -> bool {
        self.findings.iter().all(|finding| finding.verdict != Verdict::Fail)
    }
}

/// Runs every check against the configured Redis (whatever `REDIS_ENABLED` says).
pub async fn check(settings: &RedisSettings, keys: KeyRegistry) -> Report {
    let mut report = Report::default();
    let settings = RedisSettings {
        enabled: true,
        ..settings.clone()
    };
    let redis = RedisModule::new(settings.clone(), keys.clone(), Telemetry::new());
    match redis.ping().await {
        Ok(rtt) => report.add(Verdict::Ok, format!("ping: {:.1} ms", rtt.as_secs_f64() * 1000.0)),
        Err(err) => {
            // A pool timeout hides the cause; the module keeps the last connect error.
            let (class, message) = redis.status().failure.unwrap_or_else(|| (err.class(), err.to_string()));
            let class = serde_json::to_value(class).unwrap_or_default();
            report.add(
                Verdict::Fail,
                format!("ping: {} ({message})", class.as_str().unwrap_or("error")),
            );
            return report;
        }
    }
    match info(&redis).await {
        Ok(info) => judge_server(&info, &mut report),
        Err(err) => report.add(
            Verdict::Warn,
            format!("INFO refused ({err}): cannot check memory and persistence"),
        ),
    }
    match round_trip(&redis, &keys, settings.command_timeout * 4).await {
        Ok(took) => report.add(
            Verdict::Ok,
            format!(
                "round trip under {}: SET, GET, UNLINK, PUBLISH and SUBSCRIBE in {:.1} ms",
                keys.prefix(),
                took.as_secs_f64() * 1000.0
            ),
        ),
        Err(err) => report.add(Verdict::Fail, format!("round trip under {}: {err}", keys.prefix())),
    }
    report
}

/// `INFO server`, `memory` and `persistence` as one map.
async fn info(redis: &RedisModule) -> Result<HashMap<String, String>, RedisFailure> {
    let active = redis.active().ok_or(RedisFailure::Disabled)?;
    let mut fields = HashMap::new();
    for section in ["server", "memory", "persistence"] {
        let text = active.info(section).await?;
        for line in text.lines() {
            if let Some((name, value)) = line.split_once(':') {
                fields.insert(name.to_owned(), value.trim().to_owned());
            }
        }
    }
    Ok(fields)
}

fn judge_server(info: &HashMap<String, String>, report: &mut Report) {
    let field = |name: &str| info.get(name).map_or("?", String::as_str);
    report.add(
        Verdict::Ok,
        format!("server: Redis {} ({})", field("redis_version"), field("redis_mode")),
    );
    let maxmemory: u64 = field("maxmemory").parse().unwrap_or(0);
    if maxmemory == 0 {
        report.add(
            Verdict::Warn,
            "maxmemory: 0 (no limit): Redis grows until the machine runs out; set maxmemory",
        );
    } else {
        report.add(Verdict::Ok, format!("maxmemory: {} bytes", maxmemory));
    }
    // Every key nestling writes has a TTL, so `volatile-*` and `allkeys-*` evict alike, and
    // nothing here keeps rate limits from being evicted (docs/REDIS.md, "Memory").
    let policy = field("maxmemory_policy");
    match policy {
        "allkeys-lru" | "volatile-lru" | "allkeys-lfu" | "volatile-lfu" => report.add(
            Verdict::Ok,
            format!(
                "maxmemory-policy: {policy} (when full, the keys used least go first, rate limits among them: \
                 size maxmemory so that nothing is evicted; docs/REDIS.md)"
            ),
        ),
        "volatile-ttl" => report.add(
            Verdict::Warn,
            "maxmemory-policy: volatile-ttl: when full, the keys nearest their expiry go first, and those are \
             the short rate limits (their quotas start over) before any cache entry; use allkeys-lru \
             (docs/REDIS.md)",
        ),
        "allkeys-random" | "volatile-random" => report.add(
            Verdict::Warn,
            format!(
                "maxmemory-policy: {policy}: when full, the rate limits of clients being limited right now go \
                 (their quotas start over) as readily as idle cache entries; use allkeys-lru (docs/REDIS.md)"
            ),
        ),
        "noeviction" => report.add(
            Verdict::Warn,
            "maxmemory-policy: noeviction: when Redis is full, every write fails (the app then serves without \
             Redis); allkeys-lru evicts the least recently used keys instead",
        ),
        _ => report.add(Verdict::Ok, format!("maxmemory-policy: {policy}")),
    }
    let aof = if field("aof_enabled") == "1" { "on" } else { "off" };
    report.add(
        Verdict::Ok,
        format!(
            "persistence: AOF {aof}, last RDB save status {} (the cache needs none: Postgres holds the data)",
            field("rdb_last_bgsave_status")
        ),
    );
}

/// Writes, reads and deletes a key under the prefix, and hears a message published on a channel
/// under it, as the cache and its invalidations do.
async fn round_trip(redis: &RedisModule, keys: &KeyRegistry, deadline: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    let run = uuid::Uuid::new_v4().simple().to_string();
    let key = keys.check(&run);
    let value = run.as_bytes();
    redis
        .set(&key, value, Duration::from_secs(10))
        .await
        .map_err(|e| format!("SET: {e}"))?;
    let read = redis.get(&key).await.map_err(|e| format!("GET: {e}"))?;
    if read.as_deref() != Some(value) {
        return Err(format!("GET returned {read:?}, not what was SET"));
    }
    redis
        .delete(std::slice::from_ref(&key))
        .await
        .map_err(|e| format!("UNLINK: {e}"))?;

    let active = redis.active().ok_or("Redis is not configured")?;
    let mut pubsub = tokio::time::timeout(deadline, active.pubsub())
        .await
        .map_err(|_| "SUBSCRIBE: timeout".to_owned())?
        .map_err(|e| format!("SUBSCRIBE: {e}"))?;
    tokio::time::timeout(deadline, pubsub.subscribe(key.as_str()))
        .await
        .map_err(|_| "SUBSCRIBE: timeout".to_owned())?
        .map_err(|e| format!("SUBSCRIBE: {e}"))?;
    redis.publish(&key, value).await.map_err(|e| format!("PUBLISH: {e}"))?;
    let heard = tokio::time::timeout(deadline, pubsub.on_message().next())
        .await
        .map_err(|_| "the published message never arrived".to_owned())?;
    let payload: Vec<u8> = heard
        .ok_or("the subscription closed")?
        .get_payload()
        .map_err(|e| e.to_string())?;
    if payload != value {
        return Err("the message arrived changed".into());
    }
    Ok(started.elapsed())
}
