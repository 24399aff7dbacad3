//! Infrastructure without routes: who calls (`caller`, implemented by the auth feature), the database pool and its local servers, Redis (pool, keys,
//! breaker), the two-tier cache, rate limiting, idempotency keys, locks and semaphores, durable
//! events, background jobs, the app-wide middleware (`edge`, `cors`), Prometheus telemetry.

pub mod cache;
pub mod caller;
pub mod cors;
pub mod database;
pub mod edge;
pub mod events;
pub mod idempotency;
pub mod jobs;
pub mod locks;
pub mod rate_limit;
pub mod redis;
pub mod telemetry;
