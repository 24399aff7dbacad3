//! Authentication: registration, login/logout with opaque bearer tokens (32 random bytes, only
//! their SHA-256 stored, expiring after `AUTH_TOKEN_TTL`), the sessions a user lists and ends,
//! the `AuthUser` extractor, and `BearerCaller` (who calls, for infrastructure such as
//! idempotency keys).

pub mod caller;
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
