//! Everything about the two services the saga calls over HTTP, the Product Catalog and Shipment
//! Tracking (SPEC §4):
//!
//! - [`contract`]: the wire types (the JSON bodies, and the TrackingEvent the shipper publishes),
//!   shared with the simulators ([`crate::sim`]);
//! - [`catalog`], [`shipments`]: the clients, which check every answer against the contract;
//! - [`transport`]: how a call is sent (span, trace context, `Idempotency-Key`, timeout, body cap);
//! - [`failure`]: how a failed call is classified ([`FailureClass`], retryable or refused).
//!
//! The saga's steps call the clients; nothing here knows about sagas or orders.

pub mod catalog;
pub mod contract;
pub mod failure;
pub mod shipments;
pub mod transport;

pub use failure::{DownstreamError, FailureClass, FailureKind, class};
pub use transport::{DownstreamResponse, IDEMPOTENCY_KEY_HEADER, MAX_RESPONSE_BYTES, observed, send};
