//! nestling: a NestJS-style, dependency-injected backend starter (actix-web + shaku + sqlx).
//! Reading order: `startup` → `container` → `modules/tasks` (controller → service → repository).

pub mod config;
pub mod container;
pub mod doctor;
pub mod error;
pub mod generate;
pub mod infra;
pub mod modules;
pub mod openapi;
pub mod seed;
pub mod startup;
