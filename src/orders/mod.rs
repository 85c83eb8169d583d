//! Orders: statuses and their transition table, validation of new orders, and the SQL of orders
//! and order items.

pub mod answer;
pub mod cancel;
pub mod place;
pub mod saga;
pub mod status;
pub mod store;
pub mod validate;

pub use status::OrderStatus;
