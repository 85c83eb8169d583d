//! Cancelling an order: its row and its saga's, locked in one order (saga first), and what each
//! state of the saga makes of the request.

use serde_json::json;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::orders::OrderStatus;
use crate::orders::saga::steps::create_shipment;
use crate::orders::store as order_store;
use crate::saga::machine::{Failure, FailureClass, SagaState};
use crate::saga::store as saga_store;

/// Result of a cancellation request.
#[derive(Debug)]
pub enum CancelOutcome {
    /// No such order for this user.
    NotFound,
    /// Cancelled now (or already); the saga compensates.
    Cancelled {
        /// The saga to wait for.
        saga_id: Uuid,
        /// It was already cancelled before this request.
        already: bool,
    },
    /// The order's shipment exists (its saga completed): the cancellation is stored as an intent and
    /// the saga compensates; the order is cancelled only once the shipper cancelled the shipment,
    /// and stays as it is if the shipper refuses (the parcel was picked up).
    Requested {
        /// The saga to wait for.
        saga_id: Uuid,
    },
    /// Too late: the order's status does not allow it.
    NotCancellable(OrderStatus),
    /// Too late: the shipper already refused to cancel the shipment (picked up).
    RefusedByShipper(OrderStatus),
}

/// Cancels an order before it ships. A pending order becomes `cancelled` at once and its saga
/// compensates at its next step boundary. A confirmed order (its saga completed, the shipment
/// exists) keeps its status: the cancellation is stored on the saga, which compensates from its
/// last step; the order is cancelled when the shipper has cancelled the shipment, and a shipper's
/// refusal returns the saga to `completed`. Idempotent.
pub async fn cancel(
    conn: &mut PgConnection,
    order_id: i32,
    user_id: Option<i32>,
    reason: &str,
    last_step: i32,
    topics: &crate::outbox::Topics,
) -> Result<CancelOutcome, sqlx::Error> {
    // One lock order everywhere: the saga's row, then its order's (the saga committer locks the
    // sagas of a shared commit, then writes their orders). Locking the order first, as a join
    // `for update of o, s` does, could deadlock with a commit of the same saga: PostgreSQL would
    // then abort one of the two (a 500 here, or a whole shared commit rolled back).
    let Some(saga_id) = order_store::saga_of(conn, order_id, user_id).await? else {
        return Ok(CancelOutcome::NotFound);
    };
    let saga = saga_store::lock_for_cancel(conn, saga_id).await?;
    let (status, owner) = order_store::lock(conn, order_id).await?;
    if status == OrderStatus::Cancelled {
        return Ok(CancelOutcome::Cancelled {
            saga_id,
            already: true,
        });
    }
    if !status.is_cancellable() {
        return Ok(CancelOutcome::NotCancellable(status));
    }
    let intent_pending = saga
        .failure
        .as_ref()
        .is_some_and(|f| f.class == FailureClass::Cancelled && f.after_completion);
    match saga.state {
        SagaState::Running => saga_store::request_cancel(conn, saga_id, reason, false).await?,
        SagaState::Completed => {
            if saga.last_error_class == Some(FailureClass::CancelRefused) {
                // The shipper refused a cancellation before: the parcel is on its way for good.
                return Ok(CancelOutcome::RefusedByShipper(status));
            }
            let failure = Failure {
                class: FailureClass::Cancelled,
                detail: format!("cancelled: {reason}"),
                step: create_shipment::ACTION.into(),
                refusal: None,
                after_completion: true,
            };
            saga_store::cancel_completed(conn, saga_id, last_step, reason, &failure).await?;
            saga_store::wake_due(conn).await?;
            return Ok(CancelOutcome::Requested { saga_id });
        }
        // A cancellation of the completed saga is under way (or stuck, for ops): the order follows
        // when the shipment is cancelled.
        SagaState::Compensating | SagaState::Stuck if intent_pending => {
            return Ok(CancelOutcome::Requested { saga_id });
        }
        // Already compensating (or finished compensating): the order just follows.
        _ => {}
    }
    order_store::set_status(
        conn,
        order_id,
        OrderStatus::Cancelled,
        Some(&format!("cancelled: {reason}")),
    )
    .await?;
    let stored: std::collections::HashMap<String, String> =
        serde_json::from_value(saga.trace_context).unwrap_or_default();
    // The event is produced in the order's trace, linked to the cancelling request.
    let span = tracing::info_span!("order.cancel", otel.name = "cancel order", order.id = order_id);
    let trace = crate::telemetry::in_stored_trace(&span, &stored);
    crate::outbox::enqueue(
        conn,
        &[crate::outbox::NewEvent::new(
            &topics.order_events,
            "OrderCancelled",
            order_id,
            Some(saga_id),
            json!({"userID": owner, "status": "cancelled", "previousStatus": status.as_str(), "reason": format!("cancelled: {reason}")}),
            &trace,
        )],
    )
    .await?;
    saga_store::wake_due(conn).await?;
    Ok(CancelOutcome::Cancelled {
        saga_id,
        already: false,
    })
}
