//! Step 1, `reserve_inventory`: reserve every line at the Product Catalog (prices come from its
//! answer). Compensation `release_reservation`: release it by its id, which is the saga id (ours), so
//! a reservation whose answer was lost can still be released.

use std::time::Duration;

use time::OffsetDateTime;

use crate::catalog::{CatalogClient, ReserveError};
use crate::contract::ReservationRequest;
use crate::saga::machine::{Attempt, CLASS_INSUFFICIENT_STOCK, Kind, Outcome, Saga, StepOutput};
use crate::saga::steps::{failed, idempotency_key};

/// Persisted action name.
pub const ACTION: &str = "reserve_inventory";
/// Persisted compensation name.
pub const COMPENSATION: &str = "release_reservation";

/// Runs the action once.
pub async fn action(
    catalog: &CatalogClient,
    saga: &Saga,
    step: usize,
    number: u32,
    timeout: Duration,
) -> Attempt {
    let started_at = OffsetDateTime::now_utc();
    let key = idempotency_key(saga.id, ACTION);
    let req = ReservationRequest {
        reservation_id: saga.id.to_string(),
        items: super::line_items(saga),
    };
    match catalog.reserve(&key, &req, timeout).await {
        Ok(res) => Attempt {
            step,
            kind: Kind::Action,
            number,
            started_at,
            idempotency_key: Some(key),
            outcome: Outcome::Succeeded(StepOutput::Reservation(res)),
        },
        Err(ReserveError::Unavailable(list)) => Attempt {
            step,
            kind: Kind::Action,
            number,
            started_at,
            idempotency_key: Some(key),
            outcome: Outcome::Refused {
                class: CLASS_INSUFFICIENT_STOCK.into(),
                detail: format!(
                    "{} product(s) not available in the requested quantity",
                    list.len()
                ),
                status: Some(409),
                unavailable: Some(list),
            },
        },
        Err(ReserveError::Failed(e)) => failed(step, Kind::Action, number, started_at, key, e),
    }
}

/// Runs the compensation once.
pub async fn compensation(
    catalog: &CatalogClient,
    saga: &Saga,
    step: usize,
    number: u32,
    timeout: Duration,
) -> Attempt {
    let started_at = OffsetDateTime::now_utc();
    let key = idempotency_key(saga.id, COMPENSATION);
    match catalog.release(&key, &saga.id.to_string(), timeout).await {
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
