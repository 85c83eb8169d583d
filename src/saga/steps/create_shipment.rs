//! Step 3, `create_shipment`: Shipment Tracking creates the shipment; its id is stored and the order
//! confirmed. Compensation `cancel_shipment`: cancel it by its id. When the shipment's id was never
//! learned (every create attempt failed), the compensation is recorded as skipped.

use std::time::Duration;

use crate::contract::CreateShipmentRequest;
use crate::saga::machine::{Outcome, Saga, StepOutput};
use crate::saga::steps::idempotency_key;
use crate::shipments::ShipmentsClient;

/// Persisted action name.
pub const ACTION: &str = "create_shipment";
/// Persisted compensation name.
pub const COMPENSATION: &str = "cancel_shipment";

/// Runs the action once.
pub async fn action(client: &ShipmentsClient, saga: &Saga, timeout: Duration) -> Outcome {
    let req = CreateShipmentRequest {
        order_id: saga.order_id,
        user_id: saga.user_id,
        items: super::line_items(saga),
    };
    match client
        .create(&idempotency_key(saga.id, ACTION), &req, timeout)
        .await
    {
        Ok(sh) => Outcome::Succeeded(StepOutput::Shipment(sh)),
        Err(e) => e.into(),
    }
}

/// Runs the compensation once.
pub async fn compensation(client: &ShipmentsClient, saga: &Saga, timeout: Duration) -> Outcome {
    let Some(sh) = &saga.data.shipment else {
        return Outcome::Skipped("no shipment was created".into());
    };
    match client
        .cancel(&idempotency_key(saga.id, COMPENSATION), &sh.shipment_id, timeout)
        .await
    {
        Ok(()) => Outcome::Succeeded(StepOutput::Done),
        Err(e) => e.into(),
    }
}
