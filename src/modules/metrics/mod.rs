//! Daily workspace metrics: per UTC day, tasks created, tasks completed, and tasks open at the
//! end of the day, so deleted tasks leave the history. A table keeps the days a rebuild computed
//! (`POST …/metrics/rebuild`, owners, under the workspace's lock, fenced, capped fleet-wide by a
//! semaphore); a trigger on `tasks` deletes the stored days each task change moves, and a read
//! computes days without a row from the tasks, so its answer is the same with or without them.

pub mod controller;
pub mod dto;
pub mod jobs;
pub mod repository;
pub mod service;

pub use controller::configure;
