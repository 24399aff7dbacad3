//! Daily workspace metrics: per UTC day, tasks created, tasks completed, and tasks open at the
//! end of the day. Computed from the tasks table, so deleted tasks leave the history.

pub mod controller;
pub mod dto;
pub mod repository;
pub mod service;

pub use controller::configure;
