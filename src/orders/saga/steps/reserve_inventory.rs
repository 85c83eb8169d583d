//! Step 1, `reserve_inventory`: reserve every line at the Product Catalog (prices come from its
//! answer). Compensation `release_reservation`: release it by its id, which is the saga id (ours), so
//! a reservation whose answer was lost can still be released.

use std::time::Duration;

use crate::downstream::catalog::{CatalogClient, ReserveError};
use crate::downstream::contract::ReservationRequest;

use crate::orders::saga::Output;
use crate::orders::saga::steps::idempotency_key;
use crate::saga::machine::{FailureClass, Kind, Outcome, Saga};
use crate::saga::registry::{Registry, RemoteRun, RemoteStep};

/// Persisted action name.
pub const ACTION: &str = "reserve_inventory";
/// Persisted compensation name.
pub const COMPENSATION: &str = "release_reservation";

/// Runs the action once.
pub async fn action(catalog: &CatalogClient, saga: &Saga, timeout: Duration) -> Outcome {
    let req = ReservationRequest {
        reservation_id: saga.id.to_string(),
        items: super::line_items(saga),
    };
    match catalog
        .reserve(&idempotency_key(saga.id, ACTION), &req, timeout)
        .await
    {
        Ok(res) => Outcome::Succeeded(Output::Reservation(res).into()),
        Err(ReserveError::Unavailable(list)) => Outcome::Refused {
            class: FailureClass::InsufficientStock,
            detail: format!(
                "{} product(s) not available in the requested quantity",
                list.len()
            ),
            status: Some(409),
            refusal: Some(serde_json::json!(list)),
        },
        Err(ReserveError::Failed(e)) => e.into(),
    }
}

/// Runs the compensation once.
pub async fn compensation(catalog: &CatalogClient, saga: &Saga, timeout: Duration) -> Outcome {
    let key = idempotency_key(saga.id, COMPENSATION);
    match catalog.release(&key, &saga.id.to_string(), timeout).await {
        Ok(()) => Outcome::Succeeded(serde_json::Value::Null),
        Err(e) => e.into(),
    }
}

/// The handler of either half.
struct ReserveInventory(CatalogClient, Kind);

impl RemoteStep for ReserveInventory {
    fn run<'a>(&'a self, saga: &'a Saga, timeout: Duration) -> RemoteRun<'a> {
        match self.1 {
            Kind::Action => Box::pin(action(&self.0, saga, timeout)),
            Kind::Compensation => Box::pin(compensation(&self.0, saga, timeout)),
        }
    }
}

/// Registers the action and the compensation.
pub fn register(r: &mut Registry, catalog: &CatalogClient) {
    r.remote(ACTION, ReserveInventory(catalog.clone(), Kind::Action))
        .remote(
            COMPENSATION,
            ReserveInventory(catalog.clone(), Kind::Compensation),
        );
}
