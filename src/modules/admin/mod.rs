//! Operator endpoints under `/admin`: cache statistics, the runtime Redis switch (the instant
//! rollback of the migration plan) and cache flushes. Guarded by `ADMIN_TOKEN`.

pub mod controller;
pub mod service;

pub use controller::configure;
