//! The job queue's drain rate: enqueues `JOBS` no-op jobs (each an INSERT in a transaction of a
//! thousand, as writes enqueue them), then starts this process's workers (`JOBS_WORKERS`, the
//! default 2 unless set) and times how long they take to run them all.
//!
//! Usage: `cargo run --release --example jobs [JOBS]` (default 10,000), with the database at
//! `DATABASE_URL` or the dev service; the jobs go to a queue of their own and are deleted after.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nestling::config::Settings;
use nestling::infra::database::{self, Database};
use nestling::infra::jobs::{Claimed, JobError, JobHandler, JobKind, JobQueue, NewJob};
use shaku::HasComponent;

const KIND: &str = "bench.noop";

#[actix_web::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let jobs_wanted: usize = std::env::args().nth(1).map_or(Ok(10_000), |n| n.parse())?;
    let mut settings = Settings::from_env()?;
    let pool = database::prepare(&mut settings, true).await?;
    let module = nestling::container::builder(&settings, pool.clone()).build();
    let jobs: Arc<dyn JobQueue> = module.resolve();
    let db: Arc<dyn Database> = module.resolve();
    let noop: JobHandler = Arc::new(|_job: Claimed| Box::pin(async { Ok(()) }));
    jobs.register(
        JobKind {
            name: KIND,
            queue: "bench",
            max_attempts: 1,
            backoff: Duration::from_secs(1),
            backoff_max: Duration::from_secs(1),
            timeout: Duration::from_secs(10),
        },
        noop,
    );

    let enqueueing = Instant::now();
    for batch in 0..jobs_wanted.div_ceil(1_000) {
        let in_batch = (jobs_wanted - batch * 1_000).min(1_000);
        db.transaction(async {
            for _ in 0..in_batch {
                jobs.enqueue(NewJob::new(KIND, serde_json::json!({}))).await?;
            }
            Ok::<_, JobError>(())
        })
        .await?;
    }
    let enqueued_in = enqueueing.elapsed();

    let draining = Instant::now();
    jobs.start();
    loop {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE kind = $1 AND state <> 'done'")
            .bind(KIND)
            .fetch_one(&pool)
            .await?;
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drained_in = draining.elapsed();
    jobs.stop(Duration::from_secs(1)).await;
    sqlx::query("DELETE FROM jobs WHERE kind = $1")
        .bind(KIND)
        .execute(&pool)
        .await?;
    // Its 10,000 dead rows would slow the next run's claims until autovacuum came by: successive
    // runs measured 5,545 down to 3,525 jobs/s without this.
    sqlx::query("VACUUM ANALYZE jobs").execute(&pool).await?;

    let rate = |took: Duration| jobs_wanted as f64 / took.as_secs_f64();
    println!(
        "{jobs_wanted} no-op jobs, {} workers: enqueued in {enqueued_in:.2?} ({:.0}/s), drained in {drained_in:.2?} ({:.0} jobs/s)",
        settings.jobs.workers,
        rate(enqueued_in),
        rate(drained_in)
    );
    Ok(())
}
