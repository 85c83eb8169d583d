//! Where an event that cannot be applied goes: parked in `tracking_retries` until its order is
//! known ([`park`]; [`super::retries`] retries it), or dead-lettered ([`dead_letter`]: a
//! `dead_letters` row with the raw bytes and the reason, written with a `TrackingEventDeadLettered`
//! message for the DLQ topic in the outbox, so the copy is as durable as the row).

use std::collections::HashMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool};

use super::ConsumerConfig;
use super::record::{Record, event_span};
use crate::downstream::contract::TrackingEvent;
use crate::outbox::{NewEvent, Topics, enqueue};
use crate::telemetry::context_headers;

/// Event type of the DLQ messages.
pub const TRACKING_EVENT_DEAD_LETTERED: &str = "TrackingEventDeadLettered";

/// Most bytes of a bad record copied into its DLQ message (base64 makes them a third larger). The
/// whole record stays in `dead_letters` (`deadLetterID`); a copy of any size would let one large
/// record make a DLQ message Kafka refuses.
pub const DLQ_PAYLOAD_BYTES: usize = 64 * 1024;

/// Writes a dead letter and its DLQ message in the caller's transaction; returns the row's id. A
/// Kafka record dead-lettered before (redelivered after a crash) keeps its first row and message.
pub(crate) async fn dead_letter(
    conn: &mut PgConnection,
    topics: &Topics,
    record: &Record,
    reason: &str,
    trace: &HashMap<String, String>,
) -> Result<i64, sqlx::Error> {
    let headers = serde_json::to_value(&record.headers).unwrap_or_else(|_| json!({}));
    let inserted = sqlx::query_scalar!(
        r#"insert into dead_letters (topic, partition, "offset", key, payload, headers, reason)
           values ($1, $2, $3, $4, $5, $6, $7)
           on conflict (topic, partition, "offset") where partition is not null and "offset" is not null
           do nothing
           returning id"#,
        record.topic,
        record.partition,
        record.offset,
        record.key.as_deref(),
        &record.payload,
        headers,
        reason
    )
    .fetch_optional(&mut *conn)
    .await?;
    let id = match inserted {
        Some(id) => id,
        None => {
            return sqlx::query_scalar!(
                r#"select id from dead_letters where topic = $1 and partition = $2 and "offset" = $3"#,
                record.topic,
                record.partition,
                record.offset
            )
            .fetch_one(&mut *conn)
            .await;
        }
    };
    let data = json!({
        "deadLetterID": id,
        "reason": reason,
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "key": record.key.as_deref().map(|k| String::from_utf8_lossy(k).into_owned()),
        "payload": BASE64.encode(&record.payload[..record.payload.len().min(DLQ_PAYLOAD_BYTES)]),
        "payloadBytes": record.payload.len(),
        "payloadTruncated": record.payload.len() > DLQ_PAYLOAD_BYTES,
        "headers": headers,
    });
    let event = NewEvent::new(
        &topics.tracking_dlq,
        TRACKING_EVENT_DEAD_LETTERED,
        order_id_hint(record),
        None,
        data,
        trace,
    );
    enqueue(conn, &[event]).await?;
    Ok(id)
}

/// Dead-letters a record in a transaction of its own; returns the row's id.
pub(crate) async fn dead_letter_now(
    pool: &PgPool,
    topics: &Topics,
    record: &Record,
    reason: &str,
) -> Result<i64, sqlx::Error> {
    let span = event_span(record);
    let trace = context_headers(&span);
    let mut tx = pool.begin().await?;
    let id = dead_letter(&mut tx, topics, record, reason, &trace).await?;
    tx.commit().await?;
    Ok(id)
}

/// The orderID a bad record is probably about (its key, or an `orderID` in its JSON), 0 when
/// nothing tells; it keys the DLQ message.
fn order_id_hint(record: &Record) -> i32 {
    let from_key = record
        .key
        .as_deref()
        .and_then(|k| std::str::from_utf8(k).ok())
        .and_then(|k| k.trim().parse::<i32>().ok());
    from_key
        .or_else(|| {
            serde_json::from_slice::<Value>(&record.payload)
                .ok()
                .and_then(|v| v.get("orderID").and_then(Value::as_i64))
                .and_then(|n| i32::try_from(n).ok())
        })
        .unwrap_or(0)
}

/// Parks an event until its order is known.
pub(crate) async fn park(
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
