//! Deciding a run of TrackingEvents against their orders, and recording the decisions: the orders
//! are locked, each event is decided by the [`super::rules`] against its order as the events
//! before it left it, and the inbox rows and status changes of the whole run are written in a few
//! statements (see docs/performance.md for why they are batched).

use std::collections::{HashMap, HashSet};

use serde_json::json;
use sqlx::PgConnection;

use super::outcome::{Decision, Outcome};
use super::rules::{Effect, ORDER_STATUS_CHANGED, effect, must_wait, status_message};
use crate::downstream::contract::TrackingEvent;
use crate::orders::OrderStatus;
use crate::outbox::{NewEvent, Topics, enqueue};

/// One event for [`plan`].
pub(crate) struct Pending<'a> {
    /// The event.
    pub event: &'a TrackingEvent,
    /// The `tracking_retries` row being retried, if any (events parked before it go first).
    pub parked_id: Option<i64>,
    /// The trace context its notifications carry.
    pub trace: &'a HashMap<String, String>,
}

/// An order as the rules see it, kept current while a run of events is decided.
struct OrderRow {
    user_id: i32,
    status: String,
}

/// A parked event of one of the run's orders (`tracking_retries`).
struct Waiting {
    id: i64,
    order_id: i32,
    event_id: String,
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
/// before it left them (one statement reads the orders, locked, with what the run must know of
/// them). [`Plan::write`] then records them (inbox rows, status changes) in two statements; the
/// caller writes each event's messages, in order. `parks`: the caller parks the events that
/// cannot be applied yet, so later events of their orders wait behind them.
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
    // One statement reads what deciding the run needs: its orders, locked; the parked events of
    // these orders; the events already in the inbox. An order another transaction holds (a saga
    // confirming it, a cancellation) is not waited for: waiting would hold this run's other
    // orders locked behind it, and a saga's commit (with every saga sharing it) behind them. Its
    // events wait like those of a pending order.
    let event_ids: Vec<String> = items.iter().map(|i| i.event.event_id.clone()).collect();
    let rows = sqlx::query!(
        r#"with o as (
               select order_id, user_id, status from orders where order_id = any($1)
                order by order_id for update skip locked)
           select 'order' as "kind!", order_id as "order_id?", user_id as "user_id?", status as "status?",
                  null::bigint as "retry_id?", null::text as "event_id?"
             from o
           union all
           -- Parked events of these orders: a later event of the same order waits behind them.
           select 'waiting', order_id, null, null, id, event_id from tracking_retries where order_id = any($1)
           union all
           select 'seen', null, null, null, null, event_id from tracking_inbox where event_id = any($2)"#,
        &order_ids,
        &event_ids
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut orders: HashMap<i32, OrderRow> = HashMap::new();
    let mut waiting: Vec<Waiting> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    for r in rows {
        match (
            r.kind.as_str(),
            r.order_id,
            r.user_id,
            r.status,
            r.retry_id,
            r.event_id,
        ) {
            ("order", Some(order_id), Some(user_id), Some(status), _, _) => {
                orders.insert(order_id, OrderRow { user_id, status });
            }
            ("waiting", Some(order_id), _, _, Some(id), Some(event_id)) => waiting.push(Waiting {
                id,
                order_id,
                event_id,
            }),
            ("seen", _, _, _, _, Some(event_id)) => {
                seen.insert(event_id);
            }
            (kind, ..) => {
                return Err(sqlx::Error::Protocol(format!(
                    "the tracking run's read answered an incomplete {kind} row"
                )));
            }
        }
    }
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

    let mut parked_here: Vec<(i32, &str)> = Vec::new();
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
                .any(|(o, e)| *o == event.order_id && *e != event.event_id.as_str());
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
            if let Some(reason) = must_wait(current, event) {
                break 'decided not_yet(reason);
            }
            if !seen.insert(event.event_id.clone()) {
                let duplicate = Outcome::Duplicate {
                    event_id: event.event_id.clone(),
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
            parked_here.push((event.order_id, event.event_id.as_str()));
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
            // A function whose cached plan looks the orders up by key (migration 0018).
            sqlx::query_scalar!("select order_status_many($1, $2, $3)", &ids, &statuses, &reasons)
                .fetch_one(&mut *conn)
                .await?;
        }
        Ok(())
    }
}

/// Inbox rows of a run of events, written in one statement.
#[derive(Default)]
struct Inbox {
    event_ids: Vec<String>,
    order_ids: Vec<i32>,
    statuses: Vec<String>,
    outcomes: Vec<String>,
    occurred: Vec<time::OffsetDateTime>,
}

impl Inbox {
    fn push(&mut self, event: &TrackingEvent, outcome: &str) {
        self.event_ids.push(event.event_id.clone());
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
                 select * from unnest($1::text[], $2::int[], $3::text[], $4::text[], $5::timestamptz[])
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
pub(crate) async fn enqueue_in_chunks(
    conn: &mut PgConnection,
    events: &[NewEvent],
) -> Result<(), sqlx::Error> {
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
