//! Operator endpoints under `/admin`: cache statistics, the runtime Redis switch (the instant
//! rollback of the migration plan), cache flushes, ending a user's sessions, and the job queue
//! (counts, dead jobs, retry). Guarded by `ADMIN_TOKEN` or a user with the admin role.

pub mod controller;
pub mod service;

pub use controller::configure;
