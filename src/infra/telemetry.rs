//! Prometheus metrics of one app instance (its own registry, so several instances in one process,
//! as in the tests, do not mix): HTTP, cache tiers per namespace, loaders, Redis commands, the
//! breaker, the pool, pub/sub, invalidations, rate-limit decisions, lock waits, events and jobs.
//! Served as text at `GET /metrics`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::infra::redis::info_field;
use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

const LATENCY_BUCKETS: [f64; 14] = [
    0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

pub struct Telemetry {
    registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    /// `result` = `hit_l1` | `hit_l2` | `miss`.
    pub cache_requests: IntCounterVec,
    pub loader_duration: HistogramVec,
    pub redis_duration: HistogramVec,
    /// `kind` = `timeout` | `error` | `pool` | `circuit_open`.
    pub redis_errors: IntCounterVec,
    pub breaker_state: IntGauge,
    /// 1 when Redis is switched on (redis mode), 0 in memory mode.
    pub redis_enabled: IntGauge,
    /// 1 when Redis is usable (switched on, breaker closed), else 0.
    pub redis_up: IntGauge,
    /// Redis' `used_memory` and `maxmemory` (0: no limit), read at scrape time.
    pub redis_memory_used: IntGauge,
    pub redis_memory_max: IntGauge,
    pub pool: IntGaugeVec,
    /// The Postgres pool: `size` (open connections), `idle`, `max`.
    pub db_pool: IntGaugeVec,
    pub pubsub_messages: IntCounter,
    pub invalidations_queued: IntCounter,
    pub invalidations_replayed: IntCounter,
    pub invalidations_pending: IntGauge,
    pub l1_entries: IntGauge,
    /// Cached bodies compressed, by `encoding` = `gzip` | `br`: once per entry and form, so this
    /// grows with fills, not with requests.
    pub cache_compressions: IntCounterVec,
    /// `group` = `api` | `credentials`, `outcome` = `allowed` | `denied`, `by` = `redis` | `lease` | `local`.
    pub rate_limit_decisions: IntCounterVec,
    /// Time to get a lock or a semaphore permit, waiting included: `kind` = `lock` | `semaphore`,
    /// `outcome` = `acquired` | `busy` (the wait ran out) | `error` (the store did not answer).
    pub lock_wait: HistogramVec,
    /// Requests with an `Idempotency-Key` answered from its record or refused because of it:
    /// `outcome` = `recorded` (a first answer kept) | `replayed` | `reused` (422) | `in_flight` (409).
    pub idempotency_requests: IntCounterVec,
    /// From an event's commit (its `occurred_at`) to `stage` = `relayed` (published by the relay)
    /// | `delivered` (handed to this instance's streams).
    pub event_lag: HistogramVec,
    /// Events the relay published, by `via` = `redis` | `postgres`.
    pub events_published: IntCounterVec,
    /// Events an in-app subscriber failed after every attempt (the log names the type).
    pub event_handler_failures: IntCounter,
    /// Open event streams (SSE) on this instance.
    pub event_streams: IntGauge,
    /// Job attempts by kind and `outcome` = `done` | `retry` | `dead`.
    pub job_runs: IntCounterVec,
    pub job_duration: HistogramVec,
    /// From a schedule's fire time to its job being enqueued.
    pub scheduler_lag: prometheus::Histogram,
    /// Read from Postgres at scrape time, so every instance shows the same figures: jobs queued and
    /// due by queue, the age of each queue's oldest due job, and the dead jobs.
    pub jobs_waiting: IntGaugeVec,
    pub job_oldest_waiting: GaugeVec,
    pub jobs_dead: IntGauge,
}

fn histogram(name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    HistogramVec::new(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()), labels)
        .expect("valid histogram")
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter")
}

impl Telemetry {
    pub fn new() -> Arc<Self> {
        let telemetry = Telemetry {
            registry: Registry::new_custom(Some("nestling".into()), None).expect("valid registry"),
            http_requests: counter(
                "http_requests_total",
                "HTTP requests by route and status",
                &["method", "route", "status"],
            ),
            http_duration: histogram(
                "http_request_duration_seconds",
                "HTTP request latency",
                &["method", "route"],
            ),
            cache_requests: counter(
                "cache_requests_total",
                "Cache lookups by namespace and result",
                &["namespace", "result"],
            ),
            loader_duration: histogram(
                "cache_loader_duration_seconds",
                "Time to load a missed entry",
                &["namespace"],
            ),
            redis_duration: histogram("redis_command_duration_seconds", "Redis command latency", &["outcome"]),
            redis_errors: counter("redis_errors_total", "Redis calls that failed, by kind", &["kind"]),
            breaker_state: IntGauge::new("redis_breaker_state", "0 closed, 1 half-open, 2 open").expect("gauge"),
            redis_enabled: IntGauge::new("redis_enabled", "1 when Redis is switched on, 0 in memory mode")
                .expect("gauge"),
            redis_up: IntGauge::new("redis_up", "1 when Redis is switched on and usable, else 0").expect("gauge"),
            redis_memory_used: IntGauge::new("redis_memory_used_bytes", "Redis used_memory, read at scrape time")
                .expect("gauge"),
            redis_memory_max: IntGauge::new("redis_memory_max_bytes", "Redis maxmemory (0: no limit)").expect("gauge"),
            db_pool: IntGaugeVec::new(
                Opts::new("db_pool_connections", "Postgres pool: open (size), idle, max"),
                &["state"],
            )
            .expect("gauge"),
            pool: IntGaugeVec::new(
                Opts::new("redis_pool", "Redis pool: connections, idle, waits, timeouts"),
                &["stat"],
            )
            .expect("gauge"),
            pubsub_messages: IntCounter::new("pubsub_messages_total", "Invalidation messages received")
                .expect("counter"),
            invalidations_queued: IntCounter::new(
                "cache_invalidations_queued_total",
                "Invalidations queued while Redis failed",
            )
            .expect("counter"),
            invalidations_replayed: IntCounter::new(
                "cache_invalidations_replayed_total",
                "Queued invalidations replayed",
            )
            .expect("counter"),
            invalidations_pending: IntGauge::new("cache_invalidations_pending", "Invalidations waiting for Redis")
                .expect("gauge"),
            l1_entries: IntGauge::new("cache_l1_entries", "Entries in the in-process cache").expect("gauge"),
            cache_compressions: counter(
                "cache_compressions_total",
                "Cached bodies compressed (once per entry and encoding), by encoding: gzip, br",
                &["encoding"],
            ),
            rate_limit_decisions: counter(
                "rate_limit_decisions_total",
                "Rate-limit decisions by route group, outcome and where they were made",
                &["group", "outcome", "by"],
            ),
            lock_wait: histogram(
                "lock_wait_seconds",
                "Time to get a lock or a semaphore permit, by kind and outcome",
                &["kind", "outcome"],
            ),
            idempotency_requests: counter(
                "idempotency_requests_total",
                "Requests with an Idempotency-Key by outcome: recorded, replayed, reused, in_flight",
                &["outcome"],
            ),
            event_lag: histogram(
                "event_lag_seconds",
                "Time from an event's commit to its relay (stage=relayed) and to this instance's streams (stage=delivered)",
                &["stage"],
            ),
            events_published: counter(
                "events_published_total",
                "Events the relay published, by channel: redis or postgres",
                &["via"],
            ),
            event_handler_failures: IntCounter::new(
                "event_handler_failures_total",
                "Events an in-app subscriber failed after every attempt",
            )
            .expect("counter"),
            event_streams: IntGauge::new("event_streams", "Open event streams (SSE) on this instance").expect("gauge"),
            job_runs: counter("job_runs_total", "Job attempts by kind and outcome: done, retry, dead", &["kind", "outcome"]),
            job_duration: histogram("job_duration_seconds", "Time one job attempt took, by kind", &["kind"]),
            scheduler_lag: prometheus::Histogram::with_opts(
                HistogramOpts::new("scheduler_lag_seconds", "From a schedule's fire time to its job being enqueued")
                    .buckets(LATENCY_BUCKETS.to_vec()),
            )
            .expect("histogram"),
            jobs_waiting: IntGaugeVec::new(
                Opts::new("jobs_waiting", "Jobs queued and due, by queue (read at scrape time)"),
                &["queue"],
            )
            .expect("gauge"),
            job_oldest_waiting: GaugeVec::new(
                Opts::new(
                    "job_oldest_waiting_seconds",
                    "How long the oldest due job of the queue has waited (read at scrape time)",
                ),
                &["queue"],
            )
            .expect("gauge"),
            jobs_dead: IntGauge::new("jobs_dead", "Jobs that failed their last attempt (read at scrape time)")
                .expect("gauge"),
        };
        // Every series exists from the start (at zero), so dashboards and alerts see them before
        // the first lock is taken.
        for kind in ["lock", "semaphore"] {
            for outcome in ["acquired", "busy", "error"] {
                telemetry.lock_wait.with_label_values(&[kind, outcome]);
            }
        }
        for outcome in ["recorded", "replayed", "reused", "in_flight"] {
            telemetry.idempotency_requests.with_label_values(&[outcome]);
        }
        for stage in ["relayed", "delivered"] {
            telemetry.event_lag.with_label_values(&[stage]);
        }
        for via in ["redis", "postgres"] {
            telemetry.events_published.with_label_values(&[via]);
        }
        for encoding in ["gzip", "br"] {
            telemetry.cache_compressions.with_label_values(&[encoding]);
        }
        let registry = &telemetry.registry;
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(telemetry.http_requests.clone()),
            Box::new(telemetry.http_duration.clone()),
            Box::new(telemetry.cache_requests.clone()),
            Box::new(telemetry.loader_duration.clone()),
            Box::new(telemetry.redis_duration.clone()),
            Box::new(telemetry.redis_errors.clone()),
            Box::new(telemetry.breaker_state.clone()),
            Box::new(telemetry.redis_enabled.clone()),
            Box::new(telemetry.redis_up.clone()),
            Box::new(telemetry.redis_memory_used.clone()),
            Box::new(telemetry.redis_memory_max.clone()),
            Box::new(telemetry.pool.clone()),
            Box::new(telemetry.db_pool.clone()),
            Box::new(telemetry.pubsub_messages.clone()),
            Box::new(telemetry.invalidations_queued.clone()),
            Box::new(telemetry.invalidations_replayed.clone()),
            Box::new(telemetry.invalidations_pending.clone()),
            Box::new(telemetry.l1_entries.clone()),
            Box::new(telemetry.cache_compressions.clone()),
            Box::new(telemetry.rate_limit_decisions.clone()),
            Box::new(telemetry.lock_wait.clone()),
            Box::new(telemetry.idempotency_requests.clone()),
            Box::new(telemetry.event_lag.clone()),
            Box::new(telemetry.events_published.clone()),
            Box::new(telemetry.event_handler_failures.clone()),
            Box::new(telemetry.event_streams.clone()),
            Box::new(telemetry.job_runs.clone()),
            Box::new(telemetry.job_duration.clone()),
            Box::new(telemetry.scheduler_lag.clone()),
            Box::new(telemetry.jobs_waiting.clone()),
            Box::new(telemetry.job_oldest_waiting.clone()),
            Box::new(telemetry.jobs_dead.clone()),
        ];
        for collector in collectors {
            registry.register(collector).expect("each metric registered once");
        }
        Arc::new(telemetry)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("text encoding never fails");
        String::from_utf8(buffer).expect("the text format is UTF-8")
    }

    pub fn observe_redis(&self, started: Instant, ok: bool) {
        let outcome = if ok { "ok" } else { "error" };
        self.redis_duration
            .with_label_values(&[outcome])
            .observe(started.elapsed().as_secs_f64());
    }

    pub fn observe_loader(&self, namespace: &str, took: Duration) {
        self.loader_duration
            .with_label_values(&[namespace])
            .observe(took.as_secs_f64());
    }
}

/// The `/metrics` source in the container: refreshes the gauges that are read at scrape time.
#[async_trait::async_trait]
pub trait MetricsRegistry: shaku::Interface {
    fn telemetry(&self) -> Arc<Telemetry>;
    /// The exposition text; reads Redis' memory figures (bounded by the command timeout) and the
    /// job queue's figures (bounded by the statement deadline).
    async fn render(&self) -> String;
}

#[derive(shaku::Component)]
#[shaku(interface = MetricsRegistry)]
pub struct PrometheusMetrics {
    #[shaku(inject)]
    cache: Arc<dyn crate::infra::cache::CacheService>,
    #[shaku(inject)]
    redis: Arc<dyn crate::infra::redis::RedisService>,
    #[shaku(inject)]
    database: Arc<dyn crate::infra::database::Database>,
    #[shaku(inject)]
    jobs: Arc<dyn crate::infra::jobs::JobQueue>,
    telemetry: Arc<Telemetry>,
}

#[async_trait::async_trait]
impl MetricsRegistry for PrometheusMetrics {
    fn telemetry(&self) -> Arc<Telemetry> {
        self.telemetry.clone()
    }

    async fn render(&self) -> String {
        use crate::infra::redis::breaker::BreakerState;
        let status = self.cache.status();
        let t = &self.telemetry;
        t.breaker_state.set(match status.breaker {
            None | Some(BreakerState::Closed) => 0,
            Some(BreakerState::HalfOpen) => 1,
            Some(BreakerState::Open) => 2,
        });
        t.invalidations_pending.set(status.pending_invalidations as i64);
        t.l1_entries.set(status.l1_entries as i64);
        let pool = self.database.pool();
        for (state, value) in [
            ("size", pool.size() as i64),
            ("idle", pool.num_idle() as i64),
            ("max", pool.options().get_max_connections() as i64),
        ] {
            t.db_pool.with_label_values(&[state]).set(value);
        }
        let redis_status = self.redis.status();
        t.redis_enabled.set(i64::from(redis_status.enabled));
        t.redis_up.set(i64::from(redis_status.usable()));
        if let Some(redis) = self.redis.active().filter(|_| redis_status.usable()) {
            if let Ok(memory) = redis.info("memory").await {
                let field = |name| info_field(&memory, name).and_then(|v| v.parse().ok()).unwrap_or(0);
                t.redis_memory_used.set(field("used_memory"));
                t.redis_memory_max.set(field("maxmemory"));
            }
        }
        if let Some(redis) = self.redis.active() {
            let (connections, idle, stats) = redis.pool_statistics();
            for (stat, value) in [
                ("connections", connections as i64),
                ("idle", idle as i64),
                ("gets_waited", stats.get_waited as i64),
                ("gets_timed_out", stats.get_timed_out as i64),
                ("connections_closed_broken", stats.connections_closed_broken as i64),
            ] {
                t.pool.with_label_values(&[stat]).set(value);
            }
        }
        self.refresh_jobs().await;
        t.render()
    }
}

impl PrometheusMetrics {
    /// The job gauges, from one `counts()` under the statement deadline (a frozen Postgres delays
    /// the scrape by that much at most; the last values then stay). Every queue a registered
    /// kind serves, that has jobs, or that was shown before gets a value, 0 when nothing in it is
    /// due: a drained queue reads 0, not its last backlog. Each registered kind's runs and
    /// durations exist at zero, so that its first run counts in `increase()`.
    async fn refresh_jobs(&self) {
        use prometheus::core::Collector;
        let t = &self.telemetry;
        let kinds = self.jobs.kinds();
        for kind in &kinds {
            for outcome in ["done", "retry", "dead"] {
                t.job_runs.with_label_values(&[kind.name, outcome]);
            }
            t.job_duration.with_label_values(&[kind.name]);
        }
        let counts = match self.jobs.counts().await {
            Ok(counts) => counts,
            Err(err) => {
                log::debug!("metrics: reading the job queue failed, its gauges keep their last values: {err}");
                return;
            }
        };
        let families = t.jobs_waiting.collect();
        let shown = families
            .iter()
            .flat_map(|family| family.get_metric())
            .filter_map(|metric| {
                let queue = metric.get_label().iter().find(|label| label.name() == "queue")?;
                Some(queue.value().to_owned())
            });
        let mut queues: std::collections::BTreeMap<String, (i64, f64)> = kinds
            .iter()
            .map(|kind| kind.queue.to_owned())
            .chain(shown)
            .map(|queue| (queue, (0, 0.0)))
            .collect();
        let mut dead = 0;
        for count in counts {
            let queue = queues.entry(count.queue).or_default();
            match count.state.as_str() {
                "queued" => *queue = (count.due, count.oldest_due_seconds.unwrap_or(0.0)),
                "dead" => dead += count.jobs,
                _ => {}
            }
        }
        for (queue, (due, oldest)) in queues {
            t.jobs_waiting.with_label_values(&[&queue]).set(due);
            t.job_oldest_waiting.with_label_values(&[&queue]).set(oldest);
        }
        t.jobs_dead.set(dead);
    }
}
