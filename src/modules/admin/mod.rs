//! Operator endpoints under `/admin`: cache statistics, the runtime Redis switch (the instant
//! rollback of the migration plan) and cache flushes. Guarded by `ADMIN_TOKEN` or a user with the admin role.

pub mod controller;
pub mod service;

pub use controller::configure;
