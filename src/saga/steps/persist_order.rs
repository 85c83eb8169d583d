//! Step 2, `persist_order` (local): the order's lines with the catalog's prices and its total, written
//! in the transaction that records the reservation. A total beyond NUMERIC(10,2) is fatal
//! (`total_overflow`). Compensation `cancel_order` (local): the order becomes `cancelled`.

use futures::future::BoxFuture;
use sqlx::PgConnection;

use crate::saga::machine::{FailureClass, Outcome, Saga, StepOutput};
use crate::saga::registry::{LocalStep, Registry};
use crate::saga::store::{self, Persisted};

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
        Persisted::Overflow(detail) => Outcome::Fatal {
            class: FailureClass::TotalOverflow,
            detail,
        },
        Persisted::Inconsistent(detail) => Outcome::Fatal {
            class: FailureClass::InconsistentReservation,
            detail,
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

struct Persist;

impl LocalStep for Persist {
    fn run<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        saga: &'a Saga,
    ) -> BoxFuture<'a, Result<Outcome, sqlx::Error>> {
        Box::pin(action(conn, saga))
    }
}

struct Cancel;

impl LocalStep for Cancel {
    fn run<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        saga: &'a Saga,
    ) -> BoxFuture<'a, Result<Outcome, sqlx::Error>> {
        Box::pin(compensation(conn, saga))
    }
}

/// Registers the action and the compensation (both local).
pub fn register(r: &mut Registry) {
    r.local(ACTION, Persist).local(COMPENSATION, Cancel);
}
