//! Operator endpoints under `/admin`: cache statistics, the runtime Redis switch (the instant
//! rollback of the migration plan), cache flushes and ending a user's sessions. Guarded by
//! `ADMIN_TOKEN` or a user with the admin role.

pub mod controller;
pub mod service;

pub use controller::configure;
