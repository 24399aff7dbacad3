//! Authentication: registration, login/logout with opaque bearer tokens (32 random bytes, only
//! their SHA-256 stored, expiring after `AUTH_TOKEN_TTL`), the sessions a user lists and ends,
//! and the `AuthUser` extractor.

pub mod controller;
pub mod dto;
pub mod extractor;
pub mod last_use;
pub mod model;
pub mod password;
pub mod repository;
pub mod service;

pub use controller::configure;
pub use extractor::AuthUser;
