//! Step 3, `create_shipment`: Shipment Tracking creates the shipment; its id is stored and the order
//! confirmed. Compensation `cancel_shipment`: cancel it by its id. When the shipment's id was never
//! learned (every create attempt failed), the compensation is recorded as skipped.

use std::time::Duration;

use time::OffsetDateTime;

use crate::contract::CreateShipmentRequest;
use crate::saga::machine::{Attempt, Kind, Outcome, Saga, StepOutput};
use crate::saga::steps::{failed, idempotency_key};
use crate::shipments::ShipmentsClient;

/// Persisted action name.
pub const ACTION: &str = "create_shipment";
/// Persisted compensation name.
pub const COMPENSATION: &str = "cancel_shipment";

/// Runs the action once.
pub async fn action(
    client: &ShipmentsClient,
    saga: &Saga,
    step: usize,
    number: u32,
    timeout: Duration,
) -> Attempt {
    let started_at = OffsetDateTime::now_utc();
    let key = idempotency_key(saga.id, ACTION);
    let req = CreateShipmentRequest {
        order_id: saga.order_id,
        user_id: saga.user_id,
        items: super::line_items(saga),
    };
    match client.create(&key, &req, timeout).await {
        Ok(sh) => Attempt {
            step,
            kind: Kind::Action,
            number,
            started_at,
            idempotency_key: Some(key),
            outcome: Outcome::Succeeded(StepOutput::Shipment(sh)),
        },
        Err(e) => failed(step, Kind::Action, number, started_at, key, e),
    }
}

/// Runs the compensation once.
pub async fn compensation(
    client: &ShipmentsClient,
    saga: &Saga,
    step: usize,
    number: u32,
    timeout: Duration,
) -> Attempt {
    let started_at = OffsetDateTime::now_utc();
    let key = idempotency_key(saga.id, COMPENSATION);
    let Some(sh) = &saga.data.shipment else {
        return Attempt {
            step,
            kind: Kind::Compensation,
            number,
            started_at,
            idempotency_key: None,
            outcome: Outcome::Skipped("no shipment was created".into()),
        };
    };
    match client.cancel(&key, &sh.shipment_id, timeout).await {
        Ok(()) => Attempt {
            step,
            kind: Kind::Compensation,
            number,
            started_at,
            idempotency_key: Some(key),
            outcome: Outcome::Succeeded(StepOutput::Done),
        },
        Err(e) => failed(step, Kind::Compensation, number, started_at, key, e),
    }
}
