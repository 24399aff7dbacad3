//! Users: the account record, `/api/users/me` and the tasks assigned to me.
//! Registration and tokens live in `auth`; this module owns the `users` table.

pub mod controller;
pub mod dto;
pub mod model;
pub mod repository;
pub mod service;

pub use controller::configure;
