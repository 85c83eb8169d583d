//! OStore order management service.
//!
//! One crate, several roles (API, saga worker, outbox relay, tracking consumer, simulators); see the
//! README for how they fit together and `docs/` for the contracts. The benchmarks and Kafka tools
//! are a crate of their own in the same workspace (`benches/tools`, `ostore-tools`), built on this
//! library.

pub mod admin;
pub mod api;
pub mod app;
pub mod auth;
pub mod cli;
pub mod config;
pub mod console;
pub mod db;
pub mod dev;
pub mod downstream;
pub mod error;
pub mod kafka;
pub mod metrics;
pub mod orders;
pub mod outbox;
pub mod saga;
pub mod sim;
pub mod telemetry;
pub mod topics;
pub mod tracking;
pub mod verify;
pub mod wake;

// The downstream clients and contract types at their former top-level paths, for code written
// against them on branches merged at the same time (the saga's steps, the tools); remove once
// nothing imports `crate::catalog`, `crate::contract` or `crate::shipments` any more.
#[doc(hidden)]
pub use downstream::{catalog, contract, shipments};
