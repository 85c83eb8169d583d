//! Applying one TrackingEvent to its order, in one transaction: dedupe by eventID, the status
//! transition when the transition table allows it, and the notification in the outbox. See the
//! module documentation of [`crate::tracking`] for the rules.

use std::collections::HashMap;

use serde_json::json;
use sqlx::{PgConnection, PgPool};
use tracing::Instrument as _;
use tracing::field::Empty;
use uuid::Uuid;

use super::ConsumerConfig;
use super::dead_letters::dead_letter;
use crate::contract::{TrackingEvent, TrackingStatus};
use crate::orders::OrderStatus;
use crate::outbox::{NewEvent, Topics, enqueue};
use crate::telemetry::{MapExtractor, context_headers, set_remote_parent};

/// A TrackingEvent as received: the raw bytes and where they came from.
#[derive(Debug, Clone, Default)]
pub struct Record {
    /// Topic it was read from.
    pub topic: String,
    /// Partition, when it came from Kafka.
    pub partition: Option<i32>,
    /// Offset, when it came from Kafka.
    pub offset: Option<i64>,
    /// The record's key (the orderID as text, by contract).
    pub key: Option<Vec<u8>>,
    /// The value, exactly as received.
    pub payload: Vec<u8>,
    /// Record headers (`traceparent`, `event-type`, `event-id`, …), values as UTF-8 text.
    pub headers: HashMap<String, String>,
}

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
        event_id: Uuid,
    },
    /// The order is not known yet (or still pending): the event waits in `tracking_retries`.
    Parked {
        /// The event.
        event_id: Uuid,
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

/// Applies a TrackingEvent given as raw bytes and headers, as if it had been read from the tracking
/// topic (without a partition or offset). For tests and tools.
pub async fn apply_event(
    pool: &PgPool,
    cfg: &ConsumerConfig,
    topics: &Topics,
    payload: &[u8],
    headers: &HashMap<String, String>,
) -> Result<Outcome, sqlx::Error> {
    let record = Record {
        topic: topics.tracking_events.clone(),
        payload: payload.to_vec(),
        headers: headers.clone(),
        ..Record::default()
    };
    apply_record(pool, cfg, topics, &record).await
}

/// Handles one record in one transaction (see [`crate::tracking`]). An error means nothing was
/// committed (the database failed) and the record should be handled again.
pub async fn apply_record(
    pool: &PgPool,
    cfg: &ConsumerConfig,
    topics: &Topics,
    record: &Record,
) -> Result<Outcome, sqlx::Error> {
    let span = event_span(record);
    let trace = context_headers(&span);
    async {
        let outcome = apply_in_transaction(pool, cfg, topics, record, &trace).await?;
        let span = tracing::Span::current();
        span.record("outcome", outcome.name());
        log_outcome(&outcome);
        Ok(outcome)
    }
    .instrument(span)
    .await
}

async fn apply_in_transaction(
    pool: &PgPool,
    cfg: &ConsumerConfig,
    topics: &Topics,
    record: &Record,
    trace: &HashMap<String, String>,
) -> Result<Outcome, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let event = match parse(&record.payload) {
        Ok(e) => e,
        Err(reason) => {
            let id = dead_letter(&mut tx, topics, record, &reason, trace).await?;
            tx.commit().await?;
            return Ok(Outcome::DeadLettered { id, reason });
        }
    };
    let span = tracing::Span::current();
    span.record("event_id", tracing::field::display(event.event_id));
    span.record("order_id", event.order_id);
    span.record("tracking_status", event.status.as_str());
    let outcome = match decide(&mut tx, topics, &event, None, trace).await? {
        Decision::Done(outcome) => outcome,
        Decision::NotYet(reason) if cfg.unknown_order_window.is_zero() => {
            let id = dead_letter(&mut tx, topics, record, &reason, trace).await?;
            Outcome::DeadLettered { id, reason }
        }
        Decision::NotYet(reason) => {
            park(&mut tx, cfg, record, &event, &reason).await?;
            Outcome::Parked {
                event_id: event.event_id,
                order_id: event.order_id,
                reason,
            }
        }
    };
    tx.commit().await?;
    Ok(outcome)
}

/// The span one event is handled in, continuing the trace of the record's `traceparent`.
pub(crate) fn event_span(record: &Record) -> tracing::Span {
    let span = tracing::info_span!(
        "tracking.apply",
        otel.kind = "consumer",
        messaging.system = "kafka",
        messaging.destination.name = %record.topic,
        messaging.kafka.partition = record.partition,
        messaging.kafka.offset = record.offset,
        event_id = Empty,
        order_id = Empty,
        tracking_status = Empty,
        outcome = Empty,
    );
    set_remote_parent(&span, &MapExtractor(&record.headers));
    span
}

fn log_outcome(outcome: &Outcome) {
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

/// Parses and checks a TrackingEvent; the error is the dead-letter reason.
pub(crate) fn parse(payload: &[u8]) -> Result<TrackingEvent, String> {
    let event: TrackingEvent =
        serde_json::from_slice(payload).map_err(|e| format!("malformed TrackingEvent: {e}"))?;
    if event.order_id <= 0 {
        return Err(format!(
            "malformed TrackingEvent: orderID {} is not a positive integer",
            event.order_id
        ));
    }
    Ok(event)
}

/// What [`decide`] concluded.
pub(crate) enum Decision {
    /// Handled (and recorded in the inbox, unless a duplicate).
    Done(Outcome),
    /// Cannot be applied yet; nothing was written.
    NotYet(String),
}

/// The rules, inside the caller's transaction. `parked_id` is the `tracking_retries` row being
/// retried, if any (events parked before it go first).
pub(crate) async fn decide(
    conn: &mut PgConnection,
    topics: &Topics,
    event: &TrackingEvent,
    parked_id: Option<i64>,
    trace: &HashMap<String, String>,
) -> Result<Decision, sqlx::Error> {
    let order = sqlx::query!(
        "select user_id, status from orders where order_id = $1 for update",
        event.order_id
    )
    .fetch_optional(&mut *conn)
    .await?;
    let Some(order) = order else {
        return Ok(Decision::NotYet(format!("order {} is not known", event.order_id)));
    };
    let blocked = sqlx::query_scalar!(
        r#"select exists (
               select 1 from tracking_retries
               where order_id = $1 and event_id <> $2 and ($3::bigint is null or id < $3)
           ) as "blocked!""#,
        event.order_id,
        event.event_id,
        parked_id
    )
    .fetch_one(&mut *conn)
    .await?;
    if blocked {
        return Ok(Decision::NotYet(format!(
            "an earlier event of order {} is waiting to be applied",
            event.order_id
        )));
    }
    let Some(current) = OrderStatus::parse(&order.status) else {
        return Ok(Decision::NotYet(format!(
            "order {} has an unknown status {}",
            event.order_id, order.status
        )));
    };
    if current == OrderStatus::Pending && event.status != TrackingStatus::Created {
        return Ok(Decision::NotYet(format!(
            "order {} is still pending",
            event.order_id
        )));
    }
    let fresh = sqlx::query_scalar!(
        r#"insert into tracking_inbox (event_id, order_id, tracking_status, outcome, occurred_at)
           values ($1, $2, $3, 'processing', $4)
           on conflict (event_id) do nothing
           returning true as "inserted!""#,
        event.event_id,
        event.order_id,
        event.status.as_str(),
        event.occurred_at
    )
    .fetch_optional(&mut *conn)
    .await?;
    if fresh.is_none() {
        return Ok(Decision::Done(Outcome::Duplicate {
            event_id: event.event_id,
        }));
    }

    let notify = |event_type: &'static str, to: OrderStatus, message: String| {
        let data = json!({
            "userID": order.user_id,
            "status": to.as_str(),
            "previousStatus": current.as_str(),
            "message": message,
            "shipmentID": event.shipment_id,
            "trackingStatus": event.status.as_str(),
        });
        NewEvent::new(
            &topics.notifications,
            event_type,
            event.order_id,
            None,
            data,
            trace,
        )
    };
    let outcome = match (event.status, target_status(event.status)) {
        (_, Some(to)) if current.can_move_to(to) => {
            sqlx::query!(
                "update orders set status = $2, status_reason = $3 where order_id = $1",
                event.order_id,
                to.as_str(),
                format!("tracking: {}", event.status)
            )
            .execute(&mut *conn)
            .await?;
            let notification = notify(ORDER_STATUS_CHANGED, to, status_message(event.order_id, to));
            let lifecycle = NewEvent::new(
                &topics.order_events,
                ORDER_STATUS_CHANGED,
                event.order_id,
                None,
                notification.envelope.data.clone(),
                trace,
            );
            enqueue(conn, &[lifecycle, notification]).await?;
            Outcome::Applied {
                order_id: event.order_id,
                from: current,
                to,
            }
        }
        (TrackingStatus::Exception | TrackingStatus::Returned, _) => {
            let (event_type, message) = if event.status == TrackingStatus::Exception {
                (
                    SHIPMENT_EXCEPTION,
                    format!(
                        "The carrier reported a problem with the delivery of order {}; we are looking into it.",
                        event.order_id
                    ),
                )
            } else {
                (
                    SHIPMENT_RETURNED,
                    format!("Order {} is being returned to us by the carrier.", event.order_id),
                )
            };
            enqueue(conn, &[notify(event_type, current, message)]).await?;
            Outcome::Notified {
                order_id: event.order_id,
                event_type,
            }
        }
        _ => Outcome::NoChange {
            order_id: event.order_id,
            status: current,
            tracking: event.status,
        },
    };
    sqlx::query!(
        "update tracking_inbox set outcome = $2 where event_id = $1",
        event.event_id,
        outcome.name()
    )
    .execute(&mut *conn)
    .await?;
    Ok(Decision::Done(outcome))
}

/// Event type of a status change (notification and order lifecycle).
pub const ORDER_STATUS_CHANGED: &str = "OrderStatusChanged";
/// Event type of the notification for a tracking `exception`.
pub const SHIPMENT_EXCEPTION: &str = "ShipmentException";
/// Event type of the notification for a tracking `returned`.
pub const SHIPMENT_RETURNED: &str = "ShipmentReturned";

/// The order status a tracking status moves an order to, if any.
pub fn target_status(status: TrackingStatus) -> Option<OrderStatus> {
    match status {
        TrackingStatus::PickedUp | TrackingStatus::InTransit | TrackingStatus::OutForDelivery => {
            Some(OrderStatus::Shipped)
        }
        TrackingStatus::Delivered => Some(OrderStatus::Delivered),
        TrackingStatus::Created | TrackingStatus::Exception | TrackingStatus::Returned => None,
    }
}

fn status_message(order_id: i32, to: OrderStatus) -> String {
    match to {
        OrderStatus::Shipped => format!("Order {order_id} is on its way."),
        OrderStatus::Delivered => format!("Order {order_id} was delivered."),
        other => format!("Order {order_id} is now {other}."),
    }
}

/// Parks an event until its order is known.
async fn park(
    conn: &mut PgConnection,
    cfg: &ConsumerConfig,
    record: &Record,
    event: &TrackingEvent,
    reason: &str,
) -> Result<(), sqlx::Error> {
    let headers = serde_json::to_value(&record.headers).unwrap_or_else(|_| json!({}));
    sqlx::query!(
        r#"insert into tracking_retries
               (event_id, order_id, topic, partition, "offset", key, payload, headers, next_attempt_at, last_error)
           values ($1, $2, $3, $4, $5, $6, $7, $8, now() + make_interval(secs => $9), $10)
           on conflict (event_id) do nothing"#,
        event.event_id,
        event.order_id,
        record.topic,
        record.partition,
        record.offset,
        record.key.as_deref(),
        &record.payload,
        headers,
        cfg.retry_delay(0).as_secs_f64(),
        reason
    )
    .execute(conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracking_statuses_map_to_order_statuses_as_the_contract_says() {
        use TrackingStatus::*;
        assert_eq!(target_status(PickedUp), Some(OrderStatus::Shipped));
        assert_eq!(target_status(InTransit), Some(OrderStatus::Shipped));
        assert_eq!(target_status(OutForDelivery), Some(OrderStatus::Shipped));
        assert_eq!(target_status(Delivered), Some(OrderStatus::Delivered));
        for s in [Created, Exception, Returned] {
            assert_eq!(target_status(s), None);
        }
    }

    #[test]
    fn malformed_events_are_refused_with_a_reason() {
        assert!(
            parse(b"{not json")
                .unwrap_err()
                .starts_with("malformed TrackingEvent")
        );
        let unknown_status = br#"{"eventID":"00000000-0000-0000-0000-000000000001","shipmentID":"s",
            "orderID":1,"status":"lost","occurredAt":"2026-01-01T00:00:00Z"}"#;
        assert!(parse(unknown_status).is_err());
        let zero_order = br#"{"eventID":"00000000-0000-0000-0000-000000000001","shipmentID":"s",
            "orderID":0,"status":"delivered","occurredAt":"2026-01-01T00:00:00Z"}"#;
        assert!(parse(zero_order).unwrap_err().contains("orderID 0"));
    }
}
