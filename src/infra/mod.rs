//! Infrastructure without routes: the database pool and its local servers, request ids.

pub mod database;
pub mod request_id;
