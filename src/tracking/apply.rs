//! Applying TrackingEvents to their orders, a batch per transaction: dedupe by eventID, the status
//! transition when the transition table allows it, and the notification in the outbox. A batch has
//! the outcome its events handled one after the other would have ([`plan`] decides each event
//! against its order as the events before it left it). See the module documentation of
//! [`crate::tracking`] for the rules.

use std::collections::{HashMap, HashSet};

use serde_json::json;
use sqlx::{PgConnection, PgPool};
use tracing::Instrument as _;
use tracing::field::Empty;
use uuid::Uuid;

use super::ConsumerConfig;
use super::dead_letters::dead_letter;
use crate::downstream::contract::{TrackingEvent, TrackingStatus};
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

/// The [`Record`] kept in a row of `tracking_retries` or `dead_letters` (sqlx's anonymous row
/// types differ per query; both have these columns).
macro_rules! stored_record {
    ($row:expr) => {
        $crate::tracking::apply::Record::stored(
            $row.topic,
            $row.partition,
            $row.offset,
            $row.key,
            $row.payload,
            $row.headers,
        )
    };
}
pub(crate) use stored_record;

impl Record {
    /// A record as the retry and dead-letter tables keep it (headers as a JSON object).
    pub(crate) fn stored(
        topic: String,
        partition: Option<i32>,
        offset: Option<i64>,
        key: Option<Vec<u8>>,
        payload: Vec<u8>,
        headers: serde_json::Value,
    ) -> Record {
        Record {
            topic,
            partition,
            offset,
            key,
            payload,
            headers: serde_json::from_value(headers).unwrap_or_default(),
        }
    }
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
    let mut outcomes = apply_records(pool, cfg, topics, std::slice::from_ref(record)).await?;
    outcomes
        .pop()
        .ok_or_else(|| sqlx::Error::Protocol("no outcome for the record".into()))
}

/// Handles records in one transaction, with the outcome handling them one after the other, in
/// their order, would have (see [`crate::tracking`]); returns one outcome per record. An error
/// means nothing was committed: handle them again (one by one, to isolate an event the database
/// refuses).
///
/// Each record gets its own `tracking.apply` span, continuing its message's trace; the spans last
/// the whole transaction.
pub async fn apply_records(
    pool: &PgPool,
    cfg: &ConsumerConfig,
    topics: &Topics,
    records: &[Record],
) -> Result<Vec<Outcome>, sqlx::Error> {
    if records.is_empty() {
        return Ok(Vec::new());
    }
    let spans: Vec<tracing::Span> = records.iter().map(event_span).collect();
    let traces: Vec<HashMap<String, String>> = spans.iter().map(context_headers).collect();
    if records.len() > 1 {
        for span in &spans {
            span.record("messaging.batch.message_count", records.len());
        }
    }
    let work = apply_in_transaction(pool, cfg, topics, records, &spans, &traces);
    // A single record's work runs inside its span (so does whatever it logs).
    let outcomes = match spans.as_slice() {
        [only] => work.instrument(only.clone()).await?,
        _ => work.await?,
    };
    for (span, outcome) in spans.iter().zip(&outcomes) {
        span.record("outcome", outcome.name());
        span.in_scope(|| log_outcome(outcome));
    }
    Ok(outcomes)
}

async fn apply_in_transaction(
    pool: &PgPool,
    cfg: &ConsumerConfig,
    topics: &Topics,
    records: &[Record],
    spans: &[tracing::Span],
    traces: &[HashMap<String, String>],
) -> Result<Vec<Outcome>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let parsed: Vec<Result<TrackingEvent, String>> = records.iter().map(|r| parse(&r.payload)).collect();
    let mut items = Vec::with_capacity(records.len());
    for (i, event) in parsed.iter().enumerate() {
        if let Ok(event) = event {
            let span = &spans[i];
            span.record("event_id", tracing::field::display(event.event_id));
            span.record("order_id", event.order_id);
            span.record("tracking_status", event.status.as_str());
            items.push(Pending {
                event,
                parked_id: None,
                trace: &traces[i],
            });
        }
    }
    // An event that must wait is parked, and later events of its order wait behind it; with no
    // window to wait in, it is dead-lettered at once.
    let parks = !cfg.unknown_order_window.is_zero();
    let mut plan = plan(&mut tx, topics, &items, parks).await?;
    // In record order, so the outbox gets every message where handling the records one by one
    // would have put it (a dead letter's DLQ message between the notifications around it).
    let mut decided = plan.decisions.drain(..).zip(plan.messages.drain(..));
    let mut outbox: Vec<NewEvent> = Vec::new();
    let mut outcomes = Vec::with_capacity(records.len());
    for (i, (record, event)) in records.iter().zip(&parsed).enumerate() {
        let outcome = match event {
            // Malformed: dead-lettered at once.
            Err(reason) => {
                dead_letter_in_turn(&mut tx, topics, &mut outbox, record, reason, &traces[i]).await?
            }
            Ok(event) => {
                let (decision, messages) = decided
                    .next()
                    .ok_or_else(|| sqlx::Error::Protocol("an event was left undecided".into()))?;
                outbox.extend(messages);
                match decision {
                    Decision::Done(outcome) => outcome,
                    Decision::NotYet(reason) if parks => {
                        park(&mut tx, cfg, record, event, &reason).await?;
                        Outcome::Parked {
                            event_id: event.event_id,
                            order_id: event.order_id,
                            reason,
                        }
                    }
                    Decision::NotYet(reason) => {
                        dead_letter_in_turn(&mut tx, topics, &mut outbox, record, &reason, &traces[i]).await?
                    }
                }
            }
        };
        outcomes.push(outcome);
    }
    drop(decided);
    enqueue_in_chunks(&mut tx, &outbox).await?;
    plan.write(&mut tx).await?;
    tx.commit().await?;
    Ok(outcomes)
}

/// Dead-letters a record after writing the outbox messages of the records before it.
async fn dead_letter_in_turn(
    conn: &mut PgConnection,
    topics: &Topics,
    outbox: &mut Vec<NewEvent>,
    record: &Record,
    reason: &str,
    trace: &HashMap<String, String>,
) -> Result<Outcome, sqlx::Error> {
    enqueue_in_chunks(&mut *conn, &std::mem::take(outbox)).await?;
    let id = dead_letter(conn, topics, record, reason, trace).await?;
    Ok(Outcome::DeadLettered {
        id,
        reason: reason.to_string(),
    })
}

/// The span one event is handled in, continuing the trace of the record's `traceparent`.
pub(crate) fn event_span(record: &Record) -> tracing::Span {
    let span = tracing::info_span!(
        "tracking.apply",
        otel.name = format!("process {}", record.topic),
        otel.kind = "consumer",
        messaging.system = "kafka",
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.destination.name = %record.topic,
        messaging.destination.partition.id = record.partition.map(|p| p.to_string()),
        messaging.kafka.offset = record.offset,
        messaging.batch.message_count = Empty,
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
#[derive(Debug)]
pub(crate) enum Decision {
    /// Handled (and recorded in the inbox, unless a duplicate).
    Done(Outcome),
    /// Cannot be applied yet; nothing was written.
    NotYet(String),
}

/// One event for [`decide_all`].
pub(crate) struct Pending<'a> {
    /// The event.
    pub event: &'a TrackingEvent,
    /// The `tracking_retries` row being retried, if any (events parked before it go first).
    pub parked_id: Option<i64>,
    /// The trace context its notifications carry.
    pub trace: &'a HashMap<String, String>,
}

/// The rules for one event, inside the caller's transaction. `parked_id` is the `tracking_retries`
/// row being retried, if any (events parked before it go first).
pub(crate) async fn decide(
    conn: &mut PgConnection,
    topics: &Topics,
    event: &TrackingEvent,
    parked_id: Option<i64>,
    trace: &HashMap<String, String>,
) -> Result<Decision, sqlx::Error> {
    let item = Pending {
        event,
        parked_id,
        trace,
    };
    let mut plan = plan(&mut *conn, topics, std::slice::from_ref(&item), false).await?;
    let (decision, messages) = plan
        .decisions
        .pop()
        .zip(plan.messages.pop())
        .ok_or_else(|| sqlx::Error::Protocol("no decision for the event".into()))?;
    enqueue_in_chunks(&mut *conn, &messages).await?;
    plan.write(conn).await?;
    Ok(decision)
}

/// An order as the rules see it, kept current while a run of events is decided.
struct OrderRow {
    user_id: i32,
    status: String,
}

/// What the transition table says an event does to an order in `current` status.
enum Effect {
    /// The order moves to this status (and the customer is told).
    Move(OrderStatus),
    /// No status change, but the customer is told (`exception`, `returned`).
    Notify(&'static str, String),
    /// Nothing: `created`, a status the order already has, or a late one.
    Nothing,
}

fn effect(current: OrderStatus, event: &TrackingEvent) -> Effect {
    match (event.status, target_status(event.status)) {
        (_, Some(to)) if current.can_move_to(to) => Effect::Move(to),
        (TrackingStatus::Exception, _) => Effect::Notify(
            SHIPMENT_EXCEPTION,
            format!(
                "The carrier reported a problem with the delivery of order {}; we are looking into it.",
                event.order_id
            ),
        ),
        (TrackingStatus::Returned, _) => Effect::Notify(
            SHIPMENT_RETURNED,
            format!("Order {} is being returned to us by the carrier.", event.order_id),
        ),
        _ => Effect::Nothing,
    }
}

/// What [`plan`] decided for a run of events; nothing of it is written yet.
pub(crate) struct Plan {
    /// One decision per event, in order.
    pub decisions: Vec<Decision>,
    /// The outbox messages of each event (notifications, lifecycle events), in order.
    pub messages: Vec<Vec<NewEvent>>,
    inbox: Inbox,
    moved: HashMap<i32, (OrderStatus, String)>,
}

/// The rules for a run of events inside the caller's transaction, with the result of applying
/// them one after the other in their order: their orders are locked (in id order, so concurrent
/// runs cannot deadlock), and every event is decided against the orders' statuses as the events
/// before it left them. [`Plan::write`] then records them (inbox rows, status changes) in two
/// statements; the caller writes each event's messages, in order. `parks`: the caller parks the
/// events that cannot be applied yet, so later events of their orders wait behind them.
pub(crate) async fn plan(
    conn: &mut PgConnection,
    topics: &Topics,
    items: &[Pending<'_>],
    parks: bool,
) -> Result<Plan, sqlx::Error> {
    let mut plan = Plan {
        decisions: Vec::with_capacity(items.len()),
        messages: Vec::with_capacity(items.len()),
        inbox: Inbox::default(),
        moved: HashMap::new(),
    };
    if items.is_empty() {
        return Ok(plan);
    }
    let mut order_ids: Vec<i32> = items.iter().map(|i| i.event.order_id).collect();
    order_ids.sort_unstable();
    order_ids.dedup();
    // An order another transaction holds (a saga confirming it, a cancellation) is not waited
    // for: waiting would hold this batch's other orders locked behind it, and a saga's commit (with
    // every saga sharing it) behind them. Its events wait like those of a pending order.
    let mut orders: HashMap<i32, OrderRow> = sqlx::query!(
        "select order_id, user_id, status from orders where order_id = any($1) order by order_id for update skip locked",
        &order_ids
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|r| {
        (
            r.order_id,
            OrderRow {
                user_id: r.user_id,
                status: r.status,
            },
        )
    })
    .collect();
    let skipped: Vec<i32> = order_ids
        .iter()
        .copied()
        .filter(|id| !orders.contains_key(id))
        .collect();
    let busy: HashSet<i32> = if skipped.is_empty() {
        HashSet::new()
    } else {
        sqlx::query_scalar!("select order_id from orders where order_id = any($1)", &skipped)
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .collect()
    };
    // Parked events of these orders: a later event of the same order waits behind them.
    let waiting = sqlx::query!(
        "select id, order_id, event_id from tracking_retries where order_id = any($1)",
        &order_ids
    )
    .fetch_all(&mut *conn)
    .await?;
    let event_ids: Vec<Uuid> = items.iter().map(|i| i.event.event_id).collect();
    let mut seen: HashSet<Uuid> = sqlx::query_scalar!(
        "select event_id from tracking_inbox where event_id = any($1)",
        &event_ids
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .collect();

    let mut parked_here: Vec<(i32, Uuid)> = Vec::new();
    for item in items {
        let event = item.event;
        let not_yet = |reason: String| (Decision::NotYet(reason), Vec::new());
        let (decision, messages) = 'decided: {
            let Some(order) = orders.get_mut(&event.order_id) else {
                if busy.contains(&event.order_id) {
                    break 'decided not_yet(format!("order {} is being changed", event.order_id));
                }
                break 'decided not_yet(format!("order {} is not known", event.order_id));
            };
            let blocked = waiting.iter().any(|w| {
                w.order_id == event.order_id
                    && w.event_id != event.event_id
                    && item.parked_id.is_none_or(|p| w.id < p)
            }) || parked_here
                .iter()
                .any(|(o, e)| *o == event.order_id && *e != event.event_id);
            if blocked {
                break 'decided not_yet(format!(
                    "an earlier event of order {} is waiting to be applied",
                    event.order_id
                ));
            }
            let Some(current) = OrderStatus::parse(&order.status) else {
                break 'decided not_yet(format!(
                    "order {} has an unknown status {}",
                    event.order_id, order.status
                ));
            };
            if current == OrderStatus::Pending && event.status != TrackingStatus::Created {
                break 'decided not_yet(format!("order {} is still pending", event.order_id));
            }
            if !seen.insert(event.event_id) {
                let duplicate = Outcome::Duplicate {
                    event_id: event.event_id,
                };
                break 'decided (Decision::Done(duplicate), Vec::new());
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
                    item.trace,
                )
            };
            let (outcome, messages) = match effect(current, event) {
                Effect::Move(to) => {
                    let notification = notify(ORDER_STATUS_CHANGED, to, status_message(event.order_id, to));
                    let lifecycle = NewEvent::new(
                        &topics.order_events,
                        ORDER_STATUS_CHANGED,
                        event.order_id,
                        None,
                        notification.envelope.data.clone(),
                        item.trace,
                    );
                    plan.moved
                        .insert(event.order_id, (to, format!("tracking: {}", event.status)));
                    order.status = to.as_str().to_string();
                    let applied = Outcome::Applied {
                        order_id: event.order_id,
                        from: current,
                        to,
                    };
                    (applied, vec![lifecycle, notification])
                }
                Effect::Notify(event_type, message) => {
                    let notification = notify(event_type, current, message);
                    let notified = Outcome::Notified {
                        order_id: event.order_id,
                        event_type,
                    };
                    (notified, vec![notification])
                }
                Effect::Nothing => {
                    let unchanged = Outcome::NoChange {
                        order_id: event.order_id,
                        status: current,
                        tracking: event.status,
                    };
                    (unchanged, Vec::new())
                }
            };
            plan.inbox.push(event, outcome.name());
            (Decision::Done(outcome), messages)
        };
        if parks && matches!(decision, Decision::NotYet(_)) {
            parked_here.push((event.order_id, event.event_id));
        }
        plan.decisions.push(decision);
        plan.messages.push(messages);
    }
    Ok(plan)
}

impl Plan {
    /// Records the decided events: their inbox rows and their orders' new statuses.
    pub(crate) async fn write(self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        self.inbox.insert(&mut *conn).await?;
        if self.moved.is_empty() {
            return Ok(());
        }
        let moved: Vec<(i32, (OrderStatus, String))> = self.moved.into_iter().collect();
        for chunk in moved.chunks(STATUS_CHUNK) {
            let (mut ids, mut statuses, mut reasons) = (Vec::new(), Vec::new(), Vec::new());
            for (id, (to, reason)) in chunk {
                ids.push(*id);
                statuses.push(to.as_str().to_string());
                reasons.push(reason.clone());
            }
            sqlx::query!(
                "update orders set status = u.status, status_reason = u.reason
                 from unnest($1::int[], $2::text[], $3::text[]) as u (order_id, status, reason)
                 where orders.order_id = u.order_id",
                &ids,
                &statuses,
                &reasons
            )
            // Planned for each batch (the unnamed statement): a generic plan made while `orders`
            // was small joins by scanning it whole (docs/performance.md, finding 8).
            .persistent(false)
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }
}

/// Inbox rows of a run of events, written in one statement.
#[derive(Default)]
struct Inbox {
    event_ids: Vec<Uuid>,
    order_ids: Vec<i32>,
    statuses: Vec<String>,
    outcomes: Vec<String>,
    occurred: Vec<time::OffsetDateTime>,
}

impl Inbox {
    fn push(&mut self, event: &TrackingEvent, outcome: &str) {
        self.event_ids.push(event.event_id);
        self.order_ids.push(event.order_id);
        self.statuses.push(event.status.as_str().to_string());
        self.outcomes.push(outcome.to_string());
        self.occurred.push(event.occurred_at);
    }

    /// Inserts the rows. The events' orders are locked, so no other transaction can record one of
    /// these eventIDs meanwhile; if one did anyway, the whole run is refused (and handled again).
    async fn insert(self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        let mut inserted = 0;
        for start in (0..self.event_ids.len()).step_by(INBOX_CHUNK) {
            let end = (start + INBOX_CHUNK).min(self.event_ids.len());
            let r = sqlx::query!(
                "insert into tracking_inbox (event_id, order_id, tracking_status, outcome, occurred_at)
                 select * from unnest($1::uuid[], $2::int[], $3::text[], $4::text[], $5::timestamptz[])
                 on conflict (event_id) do nothing",
                &self.event_ids[start..end],
                &self.order_ids[start..end],
                &self.statuses[start..end],
                &self.outcomes[start..end],
                &self.occurred[start..end]
            )
            .execute(&mut *conn)
            .await?;
            inserted += r.rows_affected();
        }
        if inserted != self.event_ids.len() as u64 {
            return Err(sqlx::Error::Protocol(
                "a tracking event was recorded by another transaction meanwhile".into(),
            ));
        }
        Ok(())
    }
}

/// Statements stay below one TLS record (16 KiB): with sqlx 0.9.0 over TLS, a larger one waits
/// ~40 ms for a delayed ACK (launchbadge/sqlx#4335; see docs/outbox.md).
const STATEMENT_BYTES: usize = 12 * 1024;
/// Inbox rows per statement (about 90 bytes each on the wire).
const INBOX_CHUNK: usize = STATEMENT_BYTES / 96;
/// Status changes per statement (about 50 bytes each on the wire).
const STATUS_CHUNK: usize = STATEMENT_BYTES / 64;

/// [`enqueue`] in statements of at most about [`STATEMENT_BYTES`], in order.
async fn enqueue_in_chunks(conn: &mut PgConnection, events: &[NewEvent]) -> Result<(), sqlx::Error> {
    // The envelope's fields, the headers (with a trace context) and the other columns add up to
    // about 400 bytes besides `data`.
    let size = |e: &NewEvent| serde_json::to_vec(&e.envelope.data).map_or(0, |v| v.len()) + 400;
    let (mut start, mut bytes) = (0, 0);
    for (i, event) in events.iter().enumerate() {
        let n = size(event);
        if i > start && bytes + n > STATEMENT_BYTES {
            enqueue(&mut *conn, &events[start..i]).await?;
            (start, bytes) = (i, 0);
        }
        bytes += n;
    }
    enqueue(conn, &events[start..]).await
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
