//! The saga engine: definitions loaded from `sagas/`, the registry of step handlers, the durable
//! state in PostgreSQL, the worker that claims and advances sagas, and one file per step.

pub mod create_order;
pub mod definition;
pub mod engine;
pub mod failure;
pub mod machine;
pub mod registry;
pub mod steps;
pub mod store;
pub mod views;
