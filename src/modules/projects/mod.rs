//! Projects: named groups of tasks inside a workspace. Any member may create, edit and delete them.

pub mod controller;
pub mod dto;
pub mod model;
pub mod repository;
pub mod service;

pub use controller::{configure, configure_in_workspace};
