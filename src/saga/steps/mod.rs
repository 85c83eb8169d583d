//! The CreateOrder saga's steps, one file each. Every step has a persisted action name and
//! compensation name (never renamed), and says whether each runs remotely (an HTTP call with an
//! `Idempotency-Key` derived from the saga and the step) or locally (inside the transaction that
//! records the previous outcome).

pub mod create_shipment;
pub mod persist_order;
pub mod reserve_inventory;

use crate::downstream::{DownstreamError, FailureKind};
use crate::saga::definition::StepImpl;
use crate::saga::machine::{Outcome, StepShape};

/// The CreateOrder saga's steps, in order.
pub const CREATE_ORDER: [StepShape; 3] = [
    StepShape {
        action: reserve_inventory::ACTION,
        compensation: reserve_inventory::COMPENSATION,
        local_action: false,
        local_compensation: false,
    },
    StepShape {
        action: persist_order::ACTION,
        compensation: persist_order::COMPENSATION,
        local_action: true,
        local_compensation: true,
    },
    StepShape {
        action: create_shipment::ACTION,
        compensation: create_shipment::COMPENSATION,
        local_action: false,
        local_compensation: false,
    },
];

/// The names the definition loader validates `sagas/create_order.toml` against.
pub fn create_order_impls() -> Vec<StepImpl> {
    CREATE_ORDER
        .iter()
        .map(|s| StepImpl {
            action: s.action,
            compensation: s.compensation,
        })
        .collect()
}

/// The Idempotency-Key of a step's action or compensation: the same for every attempt, so a retry
/// or a resumed saga never acts twice.
pub fn idempotency_key(saga_id: uuid::Uuid, name: &str) -> String {
    format!("saga-{saga_id}-{name}")
}

/// The saga's requested lines as the downstream contracts spell them.
pub fn line_items(saga: &crate::saga::machine::Saga) -> Vec<crate::contract::LineItem> {
    saga.input
        .iter()
        .map(|l| crate::contract::LineItem {
            product_id: l.product_id,
            quantity: l.quantity,
        })
        .collect()
}

impl From<DownstreamError> for Outcome {
    /// A downstream failure, classified where its cause is known: transient (retried) or refused.
    fn from(e: DownstreamError) -> Self {
        match e.kind {
            FailureKind::Transient => Outcome::Transient {
                class: e.class.to_string(),
                detail: e.message,
                status: e.status,
                retry_after: e.retry_after,
            },
            FailureKind::Refused => Outcome::Refused {
                class: e.class.to_string(),
                detail: e.message,
                status: e.status,
                unavailable: None,
            },
        }
    }
}
