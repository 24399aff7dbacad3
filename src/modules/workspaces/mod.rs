//! Workspaces and their members. Every other feature asks `WorkspaceService::require_member`
//! before touching workspace data: a non-member gets the same 404 as a missing id.

pub mod controller;
pub mod dto;
pub mod model;
pub mod repository;
pub mod service;

pub use controller::configure;
