//! Background jobs, a container component (`JobQueue`): a queue in Postgres and this instance's
//! workers.
//!
//! What it guarantees:
//! - **Enqueued with the write.** `enqueue` inserts the job in the caller's transaction
//!   (`Database::transaction`): a rolled-back write enqueues nothing, a committed one always has
//!   its job. Nothing depends on Redis.
//! - **At least once.** A worker claims jobs with `FOR UPDATE SKIP LOCKED` and holds each on a
//!   lease (`JOBS_LEASE_MS`), renewed every third of it while the job runs. A worker that dies or
//!   freezes stops renewing; any instance then puts the job back (the attempt counts), so it runs
//!   again after at most the lease. A handler must therefore be idempotent.
//! - **Retries with backoff.** A failed attempt is queued again after an exponential delay with
//!   jitter (`JobKind::backoff`: the delay doubles per attempt up to its cap, and is drawn from
//!   its upper quarter), up to the kind's `max_attempts`; after the last one the job is `dead`, kept
//!   with its error, until an operator retries it.
//! - **Coalescing.** A job enqueued with a unique key is dropped while a job of its kind with that
//!   key is queued (not yet running): a burst of writes causes one run, plus at most one more for
//!   the writes that came while it ran.
//! - **Fenced results.** Completion and failure name the worker and the attempt: a worker whose
//!   lease was taken away cannot mark the job done over the attempt that replaced it.
//! - **Stopping.** `stop` takes no more jobs, waits for the running ones up to its deadline, and
//!   hands the rest back (queued again at once, the attempt not counted).
//!
//! What it does not: run a job exactly once (at least once, see above); order jobs beyond
//! "oldest due first" per queue; keep finished jobs forever (the purge drops them).

mod scheduler;
mod store;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use rand::Rng;
use shaku::{Component, Interface};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::config::JobSettings;
use crate::infra::database::Database;
use crate::infra::telemetry::Telemetry;
pub use scheduler::Schedule;
pub use store::{Claimed, DeadJob, QueueCount};

/// A kind of job: where it runs, how often it may fail, how long it may take.
#[derive(Debug, Clone)]
pub struct JobKind {
    pub name: &'static str,
    pub queue: &'static str,
    pub max_attempts: u32,
    /// The delay after the first failure; it doubles per attempt up to `backoff_max`.
    pub backoff: Duration,
    pub backoff_max: Duration,
    /// How long one attempt may run before it counts as failed.
    pub timeout: Duration,
}

impl JobKind {
    /// The delay before the attempt after `attempt` (1, 2, …) failed: `backoff · 2^(attempt-1)`,
    /// capped, drawn uniformly from its upper quarter. The jitter spreads a burst of failures
    /// over a quarter of the delay, and each delay still exceeds the one before.
    pub fn retry_delay(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(30);
        let full = self.backoff.saturating_mul(1 << exponent).min(self.backoff_max);
        full.mul_f64(rand::thread_rng().gen_range(0.75..=1.0))
    }
}

/// A job to enqueue.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub kind: &'static str,
    pub payload: serde_json::Value,
    pub run_at: Option<DateTime<Utc>>,
    pub unique_key: Option<String>,
}

impl NewJob {
    pub fn new(kind: &'static str, payload: serde_json::Value) -> Self {
        Self {
            kind,
            payload,
            run_at: None,
            unique_key: None,
        }
    }

    /// Coalesce with a queued job of the same kind and key.
    pub fn unique(mut self, key: impl Into<String>) -> Self {
        self.unique_key = Some(key.into());
        self
    }

    pub fn at(mut self, run_at: DateTime<Utc>) -> Self {
        self.run_at = Some(run_at);
        self
    }
}

/// See `Inner::queued_here`: more than the clock skew between an instance and Postgres.
const QUEUED_MARGIN: Duration = Duration::from_millis(500);

/// See `Inner::wake_at`.
const DUE_MARGIN: Duration = Duration::from_millis(50);

/// What a handler gets: the job as claimed (`attempt` is 1 on the first run).
pub type JobHandler = Arc<dyn Fn(Claimed) -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("no job kind {0} is registered")]
    UnknownKind(String),
    #[error("not a cron expression (six fields, seconds first): {0}")]
    BadSchedule(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

#[async_trait]
pub trait JobQueue: Interface {
    /// Registers a kind and its handler (at start-up, alike on every instance).
    fn register(&self, kind: JobKind, handler: JobHandler);
    /// Enqueues a job of a registered kind at each fire time of `cron` (six fields, seconds first:
    /// `0 0 * * * *` is hourly), once across the fleet (see `scheduler`).
    fn schedule(&self, kind: &'static str, cron: &str) -> Result<(), JobError>;
    /// Enqueues in the current transaction; `None` when coalesced with a queued job.
    async fn enqueue(&self, job: NewJob) -> Result<Option<i64>, JobError>;
    /// Starts `JOBS_WORKERS` worker slots on this instance (none when 0), and the scheduler.
    fn start(&self);
    /// Takes no more jobs, waits for the running ones up to `within`, hands back the rest.
    async fn stop(&self, within: Duration);
    async fn counts(&self) -> Result<Vec<QueueCount>, sqlx::Error>;
    async fn dead(&self, limit: i64) -> Result<Vec<DeadJob>, sqlx::Error>;
    /// Queues a dead job again; `false` when it is not dead (or a queued job holds its key).
    async fn retry(&self, id: i64) -> Result<bool, sqlx::Error>;
    /// The registered kinds: the metrics show each kind and queue at zero before its first run.
    fn kinds(&self) -> Vec<JobKind>;
}

pub struct PgJobQueue {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<dyn Database>,
    settings: JobSettings,
    telemetry: Arc<Telemetry>,
    schedules: Mutex<Vec<Schedule>>,
    /// This instance's worker id (the lease holder's name in the table).
    worker: Uuid,
    kinds: Mutex<HashMap<&'static str, (JobKind, JobHandler)>>,
    wake: Notify,
    running: Mutex<Running>,
    /// When the queued job of a unique (kind, key) this instance inserted or met is due: until
    /// shortly before, no worker can take it, so an enqueue of the same key coalesces without a
    /// round trip (see `queued_here`).
    queued: Mutex<HashMap<(&'static str, String), DateTime<Utc>>>,
    /// Jobs that succeeded here, recorded done by the next claim (`store::complete_and_claim`).
    finished: Mutex<Vec<store::Finished>>,
    /// Set by `stop`: claim nothing more.
    stopping: std::sync::atomic::AtomicBool,
    /// Held by the worker loop from a claim until its jobs are in `running` (or handed back), so
    /// `stop` never finds `running` empty while a claimed job is on its way there.
    round: tokio::sync::Mutex<()>,
    idle: Notify,
}

#[derive(Default)]
struct Running {
    /// Jobs running now, with the task that runs each.
    jobs: HashMap<i64, (Claimed, tokio::task::AbortHandle)>,
    per_queue: HashMap<&'static str, usize>,
}

pub struct PgJobQueueParameters {
    pub settings: JobSettings,
    pub telemetry: Arc<Telemetry>,
}

crate::container::set_by_the_container!(PgJobQueueParameters);

impl<M: shaku::Module + shaku::HasComponent<dyn Database>> Component<M> for PgJobQueue {
    type Interface = dyn JobQueue;
    type Parameters = PgJobQueueParameters;

    fn build(context: &mut shaku::ModuleBuildContext<M>, params: PgJobQueueParameters) -> Box<dyn JobQueue> {
        let db = <M as shaku::HasComponent<dyn Database>>::build_component(context);
        Box::new(PgJobQueue {
            inner: Arc::new(Inner {
                db,
                settings: params.settings,
                telemetry: params.telemetry,
                schedules: Mutex::default(),
                worker: Uuid::new_v4(),
                kinds: Mutex::default(),
                wake: Notify::new(),
                running: Mutex::default(),
                queued: Mutex::default(),
                finished: Mutex::default(),
                stopping: Default::default(),
                round: tokio::sync::Mutex::new(()),
                idle: Notify::new(),
            }),
        })
    }
}

#[async_trait]
impl JobQueue for PgJobQueue {
    fn register(&self, kind: JobKind, handler: JobHandler) {
        let mut kinds = self.inner.kinds.lock().unwrap_or_else(|e| e.into_inner());
        kinds.insert(kind.name, (kind, handler));
    }

    fn schedule(&self, kind: &'static str, cron: &str) -> Result<(), JobError> {
        use std::str::FromStr;
        self.inner
            .kind(kind)
            .ok_or_else(|| JobError::UnknownKind(kind.to_owned()))?;
        let cron = cron::Schedule::from_str(cron).map_err(|err| JobError::BadSchedule(format!("{cron:?}: {err}")))?;
        let mut schedules = self.inner.schedules.lock().unwrap_or_else(|e| e.into_inner());
        schedules.retain(|schedule| schedule.kind != kind);
        schedules.push(Schedule { kind, cron });
        Ok(())
    }

    async fn enqueue(&self, job: NewJob) -> Result<Option<i64>, JobError> {
        let kind = self
            .inner
            .kind(job.kind)
            .ok_or_else(|| JobError::UnknownKind(job.kind.to_owned()))?;
        if let Some(key) = &job.unique_key {
            if self.inner.queued_here(kind.name, key) {
                return Ok(None);
            }
        }
        let inserted = store::insert(&*self.inner.db, &kind, &job).await?;
        // A coalesced job wakes no one: the queued one it joined has its wake-up (or the poll).
        // Waking per enqueue would make a burst of coalesced writes a burst of claim rounds.
        match (inserted.id, inserted.due, job.unique_key) {
            (Some(_), due, key) => {
                let inner = self.inner.clone();
                let due_in = job.run_at.and_then(|at| (at - Utc::now()).to_std().ok());
                let after_commit = move || {
                    if let (Some(due), Some(key)) = (due, key) {
                        inner.remember_queued(kind.name, key, due);
                    }
                    match due_in {
                        Some(due_in) => inner.wake_at(due_in),
                        None => inner.wake.notify_one(),
                    }
                };
                crate::infra::database::transaction::after_commit(after_commit).await;
            }
            // Met a committed queued job.
            (None, Some(due), Some(key)) => self.inner.remember_queued(kind.name, key, due),
            (None, _, _) => {}
        }
        Ok(inserted.id)
    }

    fn start(&self) {
        if self.inner.settings.workers > 0 {
            tokio::spawn(worker_loop(self.inner.clone()));
        }
        tokio::spawn(scheduler::run(self.inner.clone()));
    }

    async fn stop(&self, within: Duration) {
        let inner = &self.inner;
        inner.stopping.store(true, std::sync::atomic::Ordering::Release);
        inner.wake.notify_one();
        // A round under way finishes first: its jobs are then running (waited for below) or
        // handed back.
        drop(inner.round.lock().await);
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let idle = inner.idle.notified();
            if inner.running().jobs.is_empty() {
                inner.record_finished().await;
                return;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                break;
            }
        }
        inner.record_finished().await;
        let left: Vec<Claimed> = {
            let mut running = inner.running();
            running
                .jobs
                .drain()
                .map(|(_, (job, task))| {
                    task.abort();
                    job
                })
                .collect()
        };
        match store::hand_back(&*inner.db, &left, inner.worker).await {
            Ok(handed) => log::info!("jobs: stopped; {handed} running jobs handed back"),
            Err(err) => log::warn!(
                "jobs: handing back {} jobs failed (their leases will expire): {err}",
                left.len()
            ),
        }
    }

    async fn counts(&self) -> Result<Vec<QueueCount>, sqlx::Error> {
        store::counts(&*self.inner.db).await
    }

    async fn dead(&self, limit: i64) -> Result<Vec<DeadJob>, sqlx::Error> {
        store::dead(&*self.inner.db, limit).await
    }

    async fn retry(&self, id: i64) -> Result<bool, sqlx::Error> {
        let retried = match store::retry(&*self.inner.db, id).await {
            Err(err) if crate::error::is_unique_violation(&err, "jobs_queued_once") => false,
            other => other?,
        };
        if retried {
            self.inner.wake.notify_one();
        }
        Ok(retried)
    }

    fn kinds(&self) -> Vec<JobKind> {
        let kinds = self.inner.kinds.lock().unwrap_or_else(|e| e.into_inner());
        kinds.values().map(|(kind, _)| kind.clone()).collect()
    }
}

impl Inner {
    fn kind(&self, name: &str) -> Option<JobKind> {
        let kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        kinds.get(name).map(|(kind, _)| kind.clone())
    }

    /// Wakes this instance's workers just after `after` (a retry or a job coming due), rather
    /// than at the next poll. Just after: the due time is the database's `now()` plus `after`,
    /// taken a moment after this timer starts.
    fn wake_at(self: &Arc<Self>, after: Duration) {
        let inner = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after + DUE_MARGIN).await;
            inner.wake.notify_one();
        });
    }

    /// Whether a queued job of `kind` with `key` is known to stay queued a while yet: due more
    /// than `QUEUED_MARGIN` from now (workers take a job once the database's clock passes its due
    /// time). Coalescing here is what the insert would do: nothing, as the queued job runs after.
    fn queued_here(&self, kind: &str, key: &str) -> bool {
        let queued = self.queued.lock().unwrap_or_else(|e| e.into_inner());
        let until = Utc::now() + chrono::Duration::from_std(QUEUED_MARGIN).expect("a short margin");
        queued.get(&(kind, key.to_owned())).is_some_and(|due| *due > until)
    }

    fn remember_queued(&self, kind: &'static str, key: String, due: DateTime<Utc>) {
        let mut queued = self.queued.lock().unwrap_or_else(|e| e.into_inner());
        if queued.len() >= 10_000 {
            let now = Utc::now();
            queued.retain(|_, due| *due > now);
        }
        queued.insert((kind, key), due);
    }

    fn take_finished(&self) -> Vec<store::Finished> {
        std::mem::take(&mut *self.finished.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Records the jobs `claim_for` did not: at stop, or when no queue had room.
    async fn record_finished(&self) {
        let finished = self.take_finished();
        if !finished.is_empty() {
            self.claim_for("", 0, finished).await;
        }
    }

    /// One round trip: records `finished` done and claims up to `room` jobs of `queue`. When it
    /// fails, the finished jobs wait for the next round (their leases cover them meanwhile).
    async fn claim_for(&self, queue: &str, room: i64, finished: Vec<store::Finished>) -> Vec<Claimed> {
        let round =
            store::complete_and_claim(&*self.db, self.worker, &finished, queue, self.settings.lease, room).await;
        match round {
            Ok(round) => {
                for job in finished.iter().filter(|job| !round.completed.contains(&job.id)) {
                    log::warn!(
                        "jobs: job {}'s lease was taken over: its success is not recorded",
                        job.id
                    );
                }
                round.claimed
            }
            Err(err) => {
                log::debug!("jobs: claiming from {queue:?} failed: {err}");
                self.finished.lock().unwrap_or_else(|e| e.into_inner()).extend(finished);
                Vec::new()
            }
        }
    }

    fn schedules(&self) -> Vec<Schedule> {
        self.schedules.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn running(&self) -> std::sync::MutexGuard<'_, Running> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The queues this instance serves: those of its registered kinds.
    fn queues(&self) -> Vec<&'static str> {
        let kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        let mut queues: Vec<&'static str> = kinds.values().map(|(kind, _)| kind.queue).collect();
        queues.sort_unstable();
        queues.dedup();
        queues
    }

    /// How many more jobs of `queue` this instance may start now.
    fn room_in(&self, queue: &str) -> i64 {
        let running = self.running();
        let free = self.settings.workers.saturating_sub(running.jobs.len());
        let busy = running.per_queue.get(queue).copied().unwrap_or(0);
        self.settings.queue_concurrency.saturating_sub(busy).min(free) as i64
    }
}

async fn worker_loop(inner: Arc<Inner>) {
    let mut reaped_at = tokio::time::Instant::now();
    let mut round: usize = 0;
    loop {
        let in_round = inner.round.lock().await;
        if inner.stopping.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        if reaped_at.elapsed() >= inner.settings.poll_every {
            reaped_at = tokio::time::Instant::now();
            match store::reap(&*inner.db).await {
                Ok(0) => {}
                Ok(reaped) => log::warn!("jobs: {reaped} jobs whose worker stopped renewing its lease queued again"),
                Err(err) => log::debug!("jobs: reaping expired leases failed: {err}"),
            }
        }
        // Each queue takes what it has due, up to its room and what the others left free; the
        // first queue in the round turns, so a busy queue cannot keep the slots from the rest.
        let mut queues = inner.queues();
        if !queues.is_empty() {
            let turn = round % queues.len();
            queues.rotate_left(turn);
        }
        round = round.wrapping_add(1);
        for queue in queues {
            let room = inner.room_in(queue);
            if room == 0 {
                continue;
            }
            let claimed = inner.claim_for(queue, room, inner.take_finished()).await;
            if inner.stopping.load(std::sync::atomic::Ordering::Acquire) {
                // `stop` began while this claim was on its way (it waits for this round to
                // end): these go back at once rather than start.
                if let Err(err) = store::hand_back(&*inner.db, &claimed, inner.worker).await {
                    log::warn!(
                        "jobs: handing back {} jobs failed (their leases will expire): {err}",
                        claimed.len()
                    );
                }
                return;
            }
            claimed.into_iter().for_each(|job| run(&inner, queue, job));
        }
        inner.record_finished().await;
        drop(in_round);
        // An enqueue on this instance, a finished job (a slot is free) or the poll (jobs enqueued
        // elsewhere, retries coming due) starts the next round.
        tokio::select! {
            _ = inner.wake.notified() => {}
            _ = tokio::time::sleep(inner.settings.poll_every) => {}
        }
    }
}

/// Runs a claimed job in a task of its own, renewing its lease until it ends.
fn run(inner: &Arc<Inner>, queue: &'static str, job: Claimed) {
    let Some((kind, handler)) = ({
        let kinds = inner.kinds.lock().unwrap_or_else(|e| e.into_inner());
        kinds.get(job.kind.as_str()).cloned()
    }) else {
        // Claimed from a queue this instance serves, of a kind it does not know (another version).
        let (inner, job) = (inner.clone(), job);
        tokio::spawn(async move {
            let error = format!("no handler for {} on this instance", job.kind);
            let _ = store::fail(&*inner.db, &job, inner.worker, &error, Duration::from_secs(1)).await;
        });
        return;
    };
    let task_inner = inner.clone();
    let task_job = job.clone();
    let mut running = inner.running();
    let task = tokio::spawn(async move {
        let inner = task_inner;
        let job = task_job;
        let started = std::time::Instant::now();
        let attempt = tokio::spawn(handler(job.clone()));
        let abort = attempt.abort_handle();
        let renew_every = inner.settings.lease / 3;
        let outcome = {
            let renewals = async {
                loop {
                    tokio::time::sleep(renew_every).await;
                    match store::renew(&*inner.db, &job, inner.worker, inner.settings.lease).await {
                        Ok(true) => {}
                        Ok(false) => log::warn!("jobs: job {} lost its lease while running", job.id),
                        Err(err) => log::debug!("jobs: renewing job {}'s lease failed: {err}", job.id),
                    }
                }
            };
            tokio::select! {
                outcome = tokio::time::timeout(kind.timeout, attempt) => outcome,
                _ = renewals => unreachable!("renewals never end"),
            }
        };
        let result = match outcome {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(err))) => Err(err),
            Ok(Err(panicked)) => Err(format!("panicked: {panicked}")),
            Err(_) => {
                abort.abort();
                Err(format!("timed out after {:?}", kind.timeout))
            }
        };
        match &result {
            // Recorded with the worker's next claim, which this job's freed slot sets off.
            Ok(()) => inner
                .finished
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(store::Finished {
                    id: job.id,
                    attempt: job.attempt,
                }),
            Err(error) => {
                let delay = kind.retry_delay(job.attempt as u32);
                inner.wake_at(delay);
                match store::fail(&*inner.db, &job, inner.worker, error, delay).await {
                    Ok(true) => {}
                    Ok(false) => log::warn!(
                        "jobs: job {}'s lease was taken over: its failure is not recorded",
                        job.id
                    ),
                    Err(err) => log::warn!(
                        "jobs: recording job {}'s failure failed (its lease will expire): {err}",
                        job.id
                    ),
                }
            }
        }
        let outcome = match &result {
            Ok(()) => "done",
            Err(_) if job.attempt >= job.max_attempts => "dead",
            Err(_) => "retry",
        };
        inner.telemetry.job_runs.with_label_values(&[kind.name, outcome]).inc();
        inner
            .telemetry
            .job_duration
            .with_label_values(&[kind.name])
            .observe(started.elapsed().as_secs_f64());
        if let Err(error) = &result {
            log::warn!(
                "jobs: {} job {} failed attempt {}/{} after {:?}: {error}",
                job.kind,
                job.id,
                job.attempt,
                job.max_attempts,
                started.elapsed()
            );
        }
        let mut running = inner.running();
        running.jobs.remove(&job.id);
        if let Some(busy) = running.per_queue.get_mut(queue) {
            *busy = busy.saturating_sub(1);
        }
        let idle = running.jobs.is_empty();
        drop(running);
        inner.wake.notify_one();
        if idle {
            inner.idle.notify_waiters();
        }
    });
    running.jobs.insert(job.id, (job, task.abort_handle()));
    *running.per_queue.entry(queue).or_default() += 1;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_retry_waits_longer_than_the_one_before_up_to_the_cap() {
        let kind = JobKind {
            name: "test",
            queue: "test",
            max_attempts: 10,
            backoff: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
        };
        for _ in 0..1_000 {
            for (attempt, full_ms) in [(1, 100), (2, 200), (3, 400), (4, 800), (5, 1_000), (9, 1_000)] {
                let delay = kind.retry_delay(attempt);
                let full = Duration::from_millis(full_ms);
                assert!(delay >= full * 3 / 4 && delay <= full, "attempt {attempt}: {delay:?}");
            }
        }
    }
}
