//! Step 2, `persist_order` (local): the order's lines with the catalog's prices and its total, written
//! in the transaction that records the reservation. A total beyond NUMERIC(10,2) is a fatal refusal
//! (`total_overflow`). Compensation `cancel_order` (local): the order becomes `cancelled`.

use sqlx::PgConnection;
use time::OffsetDateTime;

use crate::saga::machine::{Attempt, CLASS_TOTAL_OVERFLOW, Kind, Outcome, Saga, StepOutput};
use crate::saga::store::{self, Persisted};

/// Persisted action name.
pub const ACTION: &str = "persist_order";
/// Persisted compensation name.
pub const COMPENSATION: &str = "cancel_order";

/// Runs the action in the caller's transaction.
pub async fn action(
    conn: &mut PgConnection,
    saga: &Saga,
    step: usize,
    number: u32,
) -> Result<Attempt, sqlx::Error> {
    let started_at = OffsetDateTime::now_utc();
    let outcome = match store::persist_order(conn, saga).await? {
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
    };
    Ok(Attempt {
        step,
        kind: Kind::Action,
        number,
        started_at,
        idempotency_key: None,
        outcome,
    })
}

/// Runs the compensation in the caller's transaction.
pub async fn compensation(
    conn: &mut PgConnection,
    saga: &Saga,
    step: usize,
    number: u32,
) -> Result<Attempt, sqlx::Error> {
    let started_at = OffsetDateTime::now_utc();
    let reason = saga
        .failure
        .as_ref()
        .map(|f| f.detail.clone())
        .unwrap_or_else(|| "compensated".into());
    let changed = store::cancel_order(conn, saga.order_id, &reason).await?;
    Ok(Attempt {
        step,
        kind: Kind::Compensation,
        number,
        started_at,
        idempotency_key: None,
        outcome: Outcome::Succeeded(StepOutput::OrderCancelled(changed)),
    })
}
