//! One test binary for the whole API: every file below is a feature's tests.

mod helpers;

mod auth;
mod cache;
mod cache_memory;
mod cache_races;
mod cli;
mod cluster;
mod compose;
mod compression;
mod cors;
mod database_faults;
mod doctor;
mod errors;
mod events;
mod failed_writes;
mod health;
mod idempotency;
mod isolation;
mod jobs;
mod jobs_admin;
mod leases;
mod locks;
mod login_limit;
mod metrics;
mod migration;
mod observability;
mod openapi;
mod password_hashing;
mod projects;
mod rate_limit;
mod readme;
mod redis_faults;
mod redis_module;
mod restart;
mod rollout;
mod sessions;
mod tasks;
mod users;
mod workspaces;
// @generate: modules
