//! Step 2, `persist_order` (local): the order's lines with the catalog's prices and its total, written
//! in the transaction that records the reservation. A total beyond NUMERIC(10,2) is a fatal refusal
//! (`total_overflow`). Compensation `cancel_order` (local): the order becomes `cancelled`.

use crate::saga::machine::{CLASS_TOTAL_OVERFLOW, Outcome, Saga, StepOutput};
use crate::saga::store::{self, Persisted};
use sqlx::PgConnection;

/// Persisted action name.
pub const ACTION: &str = "persist_order";
/// Persisted compensation name.
pub const COMPENSATION: &str = "cancel_order";

/// Runs the action in the caller's transaction.
pub async fn action(conn: &mut PgConnection, saga: &Saga) -> Result<Outcome, sqlx::Error> {
    Ok(match store::persist_order(conn, saga).await? {
        Persisted::Ok {
            items,
            total,
            currency,
        } => Outcome::Succeeded(StepOutput::Persisted {
            items,
            total,
            currency,
        }),
        Persisted::Overflow(detail) => Outcome::Refused {
            class: CLASS_TOTAL_OVERFLOW.into(),
            detail,
            status: None,
            unavailable: None,
        },
        Persisted::Inconsistent(detail) => Outcome::Refused {
            class: "inconsistent_reservation".into(),
            detail,
            status: None,
            unavailable: None,
        },
    })
}

/// Runs the compensation in the caller's transaction.
pub async fn compensation(conn: &mut PgConnection, saga: &Saga) -> Result<Outcome, sqlx::Error> {
    let reason = saga
        .failure
        .as_ref()
        .map(crate::saga::machine::Failure::customer_text)
        .unwrap_or_else(|| "compensated".into());
    let changed = store::cancel_order(conn, saga.order_id, &reason).await?;
    Ok(Outcome::Succeeded(StepOutput::OrderCancelled(changed)))
}
