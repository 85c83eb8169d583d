//! Dead letters: TrackingEvents that cannot be applied (malformed, or their order stayed unknown
//! for the whole retry window). Each is a `dead_letters` row with the raw bytes and the reason,
//! written with a `TrackingEventDeadLettered` message for the DLQ topic in the outbox (so the copy
//! is as durable as the row). Operators list them and replay one ([`super::replay`]) once the
//! cause is fixed.

use std::collections::HashMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool};

use super::record::{Record, event_span};
use crate::outbox::{NewEvent, Topics, enqueue};
use crate::telemetry::context_headers;

/// Event type of the DLQ messages.
pub const TRACKING_EVENT_DEAD_LETTERED: &str = "TrackingEventDeadLettered";

/// Most bytes of a bad record copied into its DLQ message (base64 makes them a third larger). The
/// whole record stays in `dead_letters` (`deadLetterID`); a copy of any size would let one large
/// record make a DLQ message Kafka refuses.
pub const DLQ_PAYLOAD_BYTES: usize = 64 * 1024;

/// Writes a dead letter and its DLQ message in the caller's transaction; returns the row's id. A
/// Kafka record dead-lettered before (redelivered after a crash: same topic, partition, offset and
/// bytes) keeps its first row and message; another record at an offset seen before (the topic or
/// the broker was recreated) is a dead letter of its own (migration 0022).
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
           on conflict (topic, partition, "offset", md5(payload))
              where partition is not null and "offset" is not null
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
                r#"select id from dead_letters
                    where topic = $1 and partition = $2 and "offset" = $3 and md5(payload) = md5($4::bytea)"#,
                record.topic,
                record.partition,
                record.offset,
                &record.payload
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

/// One dead letter as `GET /admin/dead-letters` shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterView {
    /// Row id (what replay takes).
    pub id: i64,
    /// Topic the record came from.
    pub topic: String,
    /// Partition; null when the event did not come from Kafka.
    pub partition: Option<i32>,
    /// Offset; null when the event did not come from Kafka.
    pub offset: Option<i64>,
    /// The record key as text (the orderID, by contract); null when the record had none.
    pub key: Option<String>,
    /// Base64 of the raw value bytes.
    pub payload: String,
    /// Why it could not be applied.
    pub reason: String,
    /// When it was dead-lettered (RFC 3339).
    #[serde(with = "time::serde::rfc3339")]
    pub at: time::OffsetDateTime,
    /// When it was first replayed successfully; null if never.
    #[serde(with = "time::serde::rfc3339::option")]
    pub replayed_at: Option<time::OffsetDateTime>,
}

/// A page of dead letters, newest first.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterPage {
    /// The dead letters.
    pub items: Vec<DeadLetterView>,
    /// Pass as `cursor` for the next page (the last id shown); null on the last page.
    pub next_cursor: Option<String>,
}

/// Lists dead letters newest first: at most `limit`, with ids below `before` when given (the
/// previous page's `nextCursor`).
pub async fn list_dead_letters(
    conn: &mut PgConnection,
    limit: i64,
    before: Option<i64>,
) -> Result<DeadLetterPage, sqlx::Error> {
    let limit = limit.clamp(1, 1000);
    let rows = sqlx::query!(
        r#"select id, topic, partition, "offset", key, payload, reason, at, replayed_at
           from dead_letters where ($1::bigint is null or id < $1) order by id desc limit $2"#,
        before,
        limit + 1
    )
    .fetch_all(conn)
    .await?;
    let more = rows.len() as i64 > limit;
    let items: Vec<DeadLetterView> = rows
        .into_iter()
        .take(limit as usize)
        .map(|r| DeadLetterView {
            id: r.id,
            topic: r.topic,
            partition: r.partition,
            offset: r.offset,
            key: r.key.map(|k| String::from_utf8_lossy(&k).into_owned()),
            payload: BASE64.encode(&r.payload),
            reason: r.reason,
            at: r.at,
            replayed_at: r.replayed_at,
        })
        .collect();
    let next_cursor = if more {
        items.last().map(|i| i.id.to_string())
    } else {
        None
    };
    Ok(DeadLetterPage { items, next_cursor })
}
