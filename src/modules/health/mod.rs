//! Health checks in the NestJS terminus shape (`status`, `info`, `error`, `details`):
//! `/health/live` (the process runs), `/health/ready` (Postgres answers), `/health` (everything).
//! Each Postgres or Redis ping's answer is reused for a second (`service::PROBE_TTL`), so probes
//! and load balancers may call them as often as they like.

pub mod controller;
pub mod service;

pub use controller::configure;
