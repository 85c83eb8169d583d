//! The saga engine: definitions loaded from `sagas/`, the durable state in PostgreSQL, the worker
//! that claims and advances sagas, and one file per step.

pub mod definition;
pub mod engine;
pub mod machine;
pub mod steps;
pub mod store;
