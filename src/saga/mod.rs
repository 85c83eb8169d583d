//! The saga engine: definitions loaded from `sagas/`, the registry of step handlers, the durable
//! state in PostgreSQL, and the worker that claims and advances sagas. It knows no saga type:
//! each type brings its steps and hooks (CreateOrder's are in `orders/saga/`), and nothing here
//! imports `crate::orders`.

pub mod definition;
pub mod engine;
pub mod failure;
pub mod machine;
pub mod registry;
pub mod store;
pub mod views;
