//! Authentication: registration, login/logout with opaque bearer tokens (32 random bytes, only
//! their SHA-256 stored, expiring after `AUTH_TOKEN_TTL`), and the `AuthUser` extractor.

pub mod controller;
pub mod dto;
pub mod extractor;
pub mod password;
pub mod repository;
pub mod service;

pub use controller::configure;
pub use extractor::AuthUser;
