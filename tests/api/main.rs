//! One test binary for the whole API: every file below is a feature's tests.

mod helpers;

mod database_faults;
mod health;
mod openapi;
mod readme;
