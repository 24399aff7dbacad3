//! Health checks in the NestJS terminus shape (`status`, `info`, `error`, `details`):
//! `/health/live` (the process runs), `/health/ready` (Postgres answers), `/health` (everything).

pub mod controller;
pub mod service;

pub use controller::configure;
