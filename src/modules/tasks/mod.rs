//! Tasks: the work items of a project. Status `done` stamps `completedAt`; leaving it clears it.
//! An assignee must be a member of the task's workspace.

pub mod controller;
pub mod dto;
pub mod model;
pub mod reminders;
pub mod repository;
pub mod service;

pub use controller::{configure, configure_in_project};
