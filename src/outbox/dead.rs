//! Outbox rows Kafka refuses for good. A record larger than the producer or the broker accepts, or
//! bound for a topic name the broker rejects, fails the same way at every attempt; retrying it
//! forever would hold every later row (every order's events) behind it. The relay moves such a row
//! out of `outbox` into `outbox_dead_letters` in one transaction, logs why, and goes on; operators
//! see the rows in `GET /admin/outbox/dead-letters` and put one back with
//! `POST /admin/outbox/dead-letters/{id}/replay` once the cause is fixed (a broker limit raised,
//! say). A replayed row goes back to the outbox with its eventID, so consumers that saw another
//! copy deduplicate it.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use serde::Serialize;
use serde_json::Value;
use sqlx::{PgConnection, PgPool, Row as _};
use time::OffsetDateTime;

/// Bytes of a payload shown in a listing (the whole row is in `GET .../{id}`).
const EXCERPT_BYTES: usize = 512;

/// Whether Kafka refuses this record for good: the same record fails the same way at every
/// attempt, whatever the broker's health. Everything else (timeouts, a broker down, a full queue,
/// leader changes, a fatal producer state) is retried with the rest of the batch.
pub fn is_permanent(e: &KafkaError) -> bool {
    let code = match e {
        KafkaError::MessageProduction(code) => *code,
        _ => return false,
    };
    matches!(
        code,
        RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::InvalidMessage
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::InvalidTopic
            | RDKafkaErrorCode::BadMessage
    )
}

/// Moves refused rows out of the outbox (a row already gone, published or moved by another relay,
/// is skipped); returns how many were moved.
pub async fn set_aside(pool: &PgPool, refused: &[(i64, String)]) -> Result<u64, sqlx::Error> {
    let mut moved = 0;
    let mut tx = pool.begin().await?;
    for (id, error) in refused {
        let r = sqlx::query(
            "with gone as (delete from outbox where id = $1
                           returning id, topic, message_key, event_id, event_type, payload, headers, created_at)
             insert into outbox_dead_letters
                 (id, topic, message_key, event_id, event_type, payload, headers, created_at, error)
             select id, topic, message_key, event_id, event_type, payload::jsonb, headers, created_at, $2 from gone
             on conflict (id) do nothing",
        )
        .bind(id)
        .bind(error)
        .execute(&mut *tx)
        .await?;
        moved += r.rows_affected();
    }
    tx.commit().await?;
    Ok(moved)
}

/// Rows set aside and not replayed.
pub async fn waiting(conn: &mut PgConnection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("select count(*) from outbox_dead_letters where replayed_at is null")
        .fetch_one(conn)
        .await
}

/// One set-aside row as the admin API lists it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutboxDeadLetter {
    /// The outbox row's id (what replay takes).
    pub id: i64,
    /// Destination topic.
    pub topic: String,
    /// Message key (the orderID).
    pub key: String,
    /// The event's id.
    #[serde(rename = "eventID")]
    pub event_id: uuid::Uuid,
    /// The event's type.
    pub event_type: String,
    /// Size of the envelope as the relay produced it, in bytes.
    pub payload_bytes: i64,
    /// The envelope's first bytes (a listing); the whole envelope (one row).
    pub payload: String,
    /// Whether `payload` is only the envelope's beginning.
    pub payload_truncated: bool,
    /// What Kafka answered.
    pub error: String,
    /// When the event was written (RFC 3339).
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When the relay set it aside.
    #[serde(with = "time::serde::rfc3339")]
    pub failed_at: OffsetDateTime,
    /// When an operator put it back in the outbox; null if never.
    #[serde(with = "time::serde::rfc3339::option")]
    pub replayed_at: Option<OffsetDateTime>,
}

/// A page of set-aside rows, newest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutboxDeadLetterPage {
    /// Newest first.
    pub items: Vec<OutboxDeadLetter>,
    /// Cursor of the next page; null on the last.
    pub next_cursor: Option<String>,
}

macro_rules! columns {
    () => {
        "id, topic, message_key, event_id, event_type, payload::text as payload, error, created_at, \
         failed_at, replayed_at"
    };
}

fn view(r: &sqlx::postgres::PgRow, excerpt: bool) -> Result<OutboxDeadLetter, sqlx::Error> {
    let payload: String = r.try_get("payload")?;
    let size = i64::try_from(payload.len()).unwrap_or(i64::MAX);
    let (payload, truncated) = if excerpt && payload.len() > EXCERPT_BYTES {
        let mut end = EXCERPT_BYTES;
        while !payload.is_char_boundary(end) {
            end -= 1;
        }
        (payload[..end].to_string(), true)
    } else {
        (payload, false)
    };
    Ok(OutboxDeadLetter {
        id: r.try_get("id")?,
        topic: r.try_get("topic")?,
        key: r.try_get("message_key")?,
        event_id: r.try_get("event_id")?,
        event_type: r.try_get("event_type")?,
        payload_bytes: size,
        payload,
        payload_truncated: truncated,
        error: r.try_get("error")?,
        created_at: r.try_get("created_at")?,
        failed_at: r.try_get("failed_at")?,
        replayed_at: r.try_get("replayed_at")?,
    })
}

/// Lists set-aside rows, newest first, `limit` per page, before the row `before`.
pub async fn list(
    conn: &mut PgConnection,
    limit: i64,
    before: Option<i64>,
) -> Result<OutboxDeadLetterPage, sqlx::Error> {
    let limit = limit.clamp(1, 1000);
    let rows = sqlx::query(concat!(
        "select ",
        columns!(),
        " from outbox_dead_letters where ($1::bigint is null or id < $1) order by id desc limit $2"
    ))
    .bind(before)
    .bind(limit + 1)
    .fetch_all(conn)
    .await?;
    let more = rows.len() as i64 > limit;
    let items = rows
        .iter()
        .take(limit as usize)
        .map(|r| view(r, true))
        .collect::<Result<Vec<_>, _>>()?;
    let next_cursor = if more {
        items.last().map(|i| i.id.to_string())
    } else {
        None
    };
    Ok(OutboxDeadLetterPage { items, next_cursor })
}

/// One set-aside row with its whole envelope.
pub async fn get(conn: &mut PgConnection, id: i64) -> Result<Option<OutboxDeadLetter>, sqlx::Error> {
    let row = sqlx::query(concat!(
        "select ",
        columns!(),
        " from outbox_dead_letters where id = $1"
    ))
    .bind(id)
    .fetch_optional(conn)
    .await?;
    row.map(|r| view(&r, false)).transpose()
}

/// What a replay did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replayed {
    /// Back in the outbox as the row with this id (published next, after what is pending).
    Queued(i64),
    /// Replayed before, and its copy is still in the outbox (nothing done).
    AlreadyQueued(i64),
}

/// Puts a set-aside row back in the outbox (a new row, same topic, key, envelope and headers, so
/// the same eventID) and records when; `None` when there is no such row. Repeating it while the
/// copy is in the outbox does nothing more.
pub async fn replay(pool: &PgPool, id: i64) -> Result<Option<Replayed>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let Some(row) = sqlx::query(
        "select topic, message_key, event_id, event_type, payload, headers,
                (select o.id from outbox o where o.id = d.replayed_as) as queued
         from outbox_dead_letters d where id = $1 for update",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?
    else {
        return Ok(None);
    };
    // The copy an earlier replay queued, while it is still in the outbox (the row lock above
    // serialises replays of one dead letter).
    if let Some(queued) = row.try_get::<Option<i64>, _>("queued")? {
        tx.commit().await?;
        return Ok(Some(Replayed::AlreadyQueued(queued)));
    }
    let new_id: i64 = sqlx::query_scalar(
        "insert into outbox (topic, message_key, event_id, event_type, payload, headers)
         values ($1, $2, $3, $4, $5, $6) returning id",
    )
    .bind(row.try_get::<String, _>("topic")?)
    .bind(row.try_get::<String, _>("message_key")?)
    .bind(row.try_get::<uuid::Uuid, _>("event_id")?)
    .bind(row.try_get::<String, _>("event_type")?)
    .bind(row.try_get::<Value, _>("payload")?)
    .bind(row.try_get::<Value, _>("headers")?)
    .fetch_one(&mut *tx)
    .await?;
    let outcome = Replayed::Queued(new_id);
    sqlx::query("update outbox_dead_letters set replayed_at = now(), replayed_as = $2 where id = $1")
        .bind(id)
        .bind(new_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Some(outcome))
}
