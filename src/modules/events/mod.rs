//! A workspace's events for its members: the types the domain records with each change
//! (`model`, through `infra::events`), and `GET /api/workspaces/{id}/events`, which streams them
//! as Server-Sent Events and lets a reconnecting client catch up with `Last-Event-ID`.

pub mod controller;
pub mod model;

pub use controller::configure;
