//! Applying TrackingEvents to their orders, a batch per transaction: dedupe by eventID, the status
//! transition when the transition table allows it, and the notification in the outbox. A batch has
//! the outcome its events handled one after the other would have (`plan` decides each event
//! against its order as the events before it left it). See the module documentation of
//! [`crate::tracking`] for the rules.

use std::collections::HashMap;

use serde_json::json;
use sqlx::{PgConnection, PgPool};
use tracing::Instrument as _;

use super::ConsumerConfig;
use super::dead_letters::dead_letter;
use super::outcome::{Decision, Outcome, log_outcome};
use super::plan::{Pending, enqueue_in_chunks, plan};
use super::record::{Record, event_span, parse};
use crate::downstream::contract::TrackingEvent;
use crate::outbox::{NewEvent, Topics};
use crate::telemetry::context_headers;

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
            span.record("event_id", event.event_id.as_str());
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
                            event_id: event.event_id.clone(),
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
