//! Integration tests of the API: real PostgreSQL (a fresh database per test), the real app on port 0.

mod admin;
mod apidoc;
mod auth;
mod console;
mod events_contract;
mod health;
mod hostile;
mod metrics;
mod orders;
mod pipeline;
mod saga;
#[path = "../support/mod.rs"]
mod support;
mod toy_saga;
mod users;
