//! Step 3, `create_shipment`: Shipment Tracking creates the shipment; its id is stored and the order
//! confirmed. Compensation `cancel_shipment`: cancel it by its id; when the id was never learned,
//! learn it first by asking again with the create's Idempotency-Key (skipped only when the shipper
//! refused the create for good).

use std::time::Duration;

use crate::downstream::contract::{CreateShipmentRequest, Shipment};
use crate::downstream::shipments::ShipmentsClient;
use crate::downstream::{DownstreamError, FailureKind};
use crate::orders::saga::steps::idempotency_key;
use crate::orders::saga::{CreateOrderData, Output};
use crate::saga::failure::Downstream;
use crate::saga::machine::{FailureClass, Kind, Outcome, Saga};
use crate::saga::registry::{Registry, RemoteRun, RemoteStep};

/// Persisted action name.
pub const ACTION: &str = "create_shipment";
/// Persisted compensation name.
pub const COMPENSATION: &str = "cancel_shipment";

fn request(saga: &Saga) -> Result<CreateShipmentRequest, Outcome> {
    let order_id = crate::orders::saga::order_id(saga).map_err(|e| Outcome::Fatal {
        class: FailureClass::Unknown,
        detail: e.to_string(),
    })?;
    Ok(CreateShipmentRequest {
        order_id,
        user_id: saga.user_id,
        items: super::line_items(saga),
    })
}

/// Asks the shipper for the saga's shipment with the create's Idempotency-Key (the same shipment
/// however often it is asked); `Err` when the saga cannot even say what to ship.
async fn create(
    client: &ShipmentsClient,
    saga: &Saga,
    timeout: Duration,
) -> Result<Result<Shipment, DownstreamError>, Outcome> {
    let req = request(saga)?;
    Ok(client
        .create(&idempotency_key(saga.id, ACTION), &req, timeout)
        .await)
}

/// Runs the action once.
pub async fn action(client: &ShipmentsClient, saga: &Saga, timeout: Duration) -> Outcome {
    match create(client, saga, timeout).await {
        Ok(Ok(sh)) => Outcome::Succeeded(Output::Shipment(sh).into()),
        Ok(Err(e)) => e.into(),
        Err(o) => o,
    }
}

/// Runs the compensation once. Without a shipment id the create's answer may have been lost (a
/// timeout, a malformed answer, a cancellation or the deadline during the attempt) while the
/// shipper did create it: the compensation asks again with the create's Idempotency-Key, which
/// gives back the same shipment (or creates one, which is then cancelled at once), and cancels it.
/// Only a create the shipper refused for good (a 4xx: nothing was created) is skipped.
pub async fn compensation(client: &ShipmentsClient, saga: &Saga, timeout: Duration) -> Outcome {
    let shipment_id = match &CreateOrderData::of(saga).shipment {
        Some(sh) => sh.shipment_id.clone(),
        None => {
            let refused = saga.failure.as_ref().is_some_and(|f| {
                f.step == ACTION && f.class == FailureClass::Downstream(Downstream::Http4xx)
            });
            if refused {
                return Outcome::Skipped("the shipper refused the shipment: none was created".into());
            }
            match create(client, saga, timeout).await {
                Err(o) => return o,
                Ok(Ok(sh)) => sh.shipment_id,
                Ok(Err(e)) if e.kind == FailureKind::Refused => {
                    return Outcome::Skipped(format!(
                        "no shipment to cancel: the shipper refuses it ({})",
                        e.message
                    ));
                }
                Ok(Err(e)) => return e.into(),
            }
        }
    };
    match client
        .cancel(&idempotency_key(saga.id, COMPENSATION), &shipment_id, timeout)
        .await
    {
        Ok(()) => Outcome::Succeeded(serde_json::Value::Null),
        Err(e) => e.into(),
    }
}

/// The handler of either half.
struct CreateShipment(ShipmentsClient, Kind);

impl RemoteStep for CreateShipment {
    fn run<'a>(&'a self, saga: &'a Saga, timeout: Duration) -> RemoteRun<'a> {
        match self.1 {
            Kind::Action => Box::pin(action(&self.0, saga, timeout)),
            Kind::Compensation => Box::pin(compensation(&self.0, saga, timeout)),
        }
    }
}

/// Registers the action and the compensation.
pub fn register(r: &mut Registry, shipments: &ShipmentsClient) {
    r.remote(ACTION, CreateShipment(shipments.clone(), Kind::Action))
        .remote(
            COMPENSATION,
            CreateShipment(shipments.clone(), Kind::Compensation),
        );
}
