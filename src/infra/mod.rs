//! Infrastructure without routes: the database pool and its local servers, Redis (pool, keys,
//! breaker), the two-tier cache, rate limiting, request ids, Prometheus telemetry.

pub mod cache;
pub mod database;
pub mod rate_limit;
pub mod redis;
pub mod request_id;
pub mod telemetry;
