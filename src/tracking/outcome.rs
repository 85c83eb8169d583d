//! What handling a TrackingEvent did ([`Outcome`]), and what the rules decided before anything was
//! written (`Decision`).

use crate::downstream::contract::TrackingStatus;
use crate::orders::OrderStatus;

/// What handling one event did.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The order moved to a new status; a notification was written.
    Applied {
        /// The order.
        order_id: i32,
        /// Its status before.
        from: OrderStatus,
        /// Its status now.
        to: OrderStatus,
    },
    /// No status change, but the customer was notified (`exception`, `returned`).
    Notified {
        /// The order.
        order_id: i32,
        /// `ShipmentException` or `ShipmentReturned`.
        event_type: &'static str,
    },
    /// Recorded, nothing changed: `created`, a status the order already has, or a late event the
    /// transition table refuses (nothing moves backwards).
    NoChange {
        /// The order.
        order_id: i32,
        /// The order's (unchanged) status.
        status: OrderStatus,
        /// The event's tracking status.
        tracking: TrackingStatus,
    },
    /// The eventID was handled before; nothing changed.
    Duplicate {
        /// The event.
        event_id: String,
    },
    /// The order is not known yet (or still pending): the event waits in `tracking_retries`.
    Parked {
        /// The event.
        event_id: String,
        /// The order it is about.
        order_id: i32,
        /// Why it waits.
        reason: String,
    },
    /// The event cannot be applied: it is in `dead_letters` and on the DLQ topic.
    DeadLettered {
        /// The `dead_letters` row.
        id: i64,
        /// Why.
        reason: String,
    },
}

impl Outcome {
    /// A short name for logs and the inbox.
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Applied { .. } => "applied",
            Outcome::Notified { .. } => "notified",
            Outcome::NoChange { .. } => "no_change",
            Outcome::Duplicate { .. } => "duplicate",
            Outcome::Parked { .. } => "parked",
            Outcome::DeadLettered { .. } => "dead_lettered",
        }
    }
}

/// What the rules concluded for one event (see [`super::apply::decide`]).
#[derive(Debug)]
pub(crate) enum Decision {
    /// Handled (and recorded in the inbox, unless a duplicate).
    Done(Outcome),
    /// Cannot be applied yet; nothing was written.
    NotYet(String),
}

/// Logs what handling an event did.
pub(crate) fn log_outcome(outcome: &Outcome) {
    match outcome {
        Outcome::Applied { order_id, from, to } => {
            tracing::info!(order_id, %from, %to, "tracking event applied")
        }
        Outcome::Notified { order_id, event_type } => {
            tracing::info!(order_id, event_type, "tracking event notified")
        }
        Outcome::NoChange {
            order_id,
            status,
            tracking,
        } => {
            tracing::info!(order_id, %status, %tracking, "tracking event changes nothing (late or repeated status)")
        }
        Outcome::Duplicate { event_id } => tracing::info!(%event_id, "tracking event already handled"),
        Outcome::Parked { order_id, reason, .. } => {
            tracing::info!(order_id, reason = %reason, "tracking event parked for a retry")
        }
        Outcome::DeadLettered { id, reason } => {
            tracing::warn!(dead_letter_id = id, reason = %reason, "tracking event dead-lettered")
        }
    }
}
