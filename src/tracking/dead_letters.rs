//! Dead letters, for operators: TrackingEvents that could not be applied (malformed, or their
//! order stayed unknown for the whole retry window) are listed, and one is replayed once the cause
//! is fixed. They are written by `park`.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use tracing::Instrument as _;

use super::apply::decide;
use super::outcome::{Decision, Outcome};
use super::record::{event_span, parse, stored_record};
use crate::outbox::Topics;
use crate::telemetry::context_headers;

pub use super::park::{DLQ_PAYLOAD_BYTES, TRACKING_EVENT_DEAD_LETTERED};

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

/// Why a replay did not apply the event.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// No dead letter has this id.
    #[error("dead letter {0} not found")]
    NotFound(i64),
    /// The event still cannot be applied (still malformed, order still unknown); nothing changed.
    #[error("the event still cannot be applied: {0}")]
    StillFailing(String),
    /// The database failed; nothing changed.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Re-applies one dead letter's event with the usual rules (so replaying twice is harmless: the
/// second finds the eventID in the inbox) and records when it was replayed.
pub async fn replay_dead_letter(pool: &PgPool, topics: &Topics, id: i64) -> Result<Outcome, ReplayError> {
    let row = sqlx::query!(
        r#"select topic, partition, "offset", key, payload, headers from dead_letters where id = $1"#,
        id
    )
    .fetch_optional(pool)
    .await?
    .ok_or(ReplayError::NotFound(id))?;
    let record = stored_record!(row);
    let span = event_span(&record);
    let trace = context_headers(&span);
    async {
        let event = parse(&record.payload).map_err(ReplayError::StillFailing)?;
        let mut tx = pool.begin().await?;
        // Concurrent replays of one letter take turns.
        sqlx::query!("select id from dead_letters where id = $1 for update", id)
            .fetch_one(&mut *tx)
            .await?;
        let outcome = match decide(&mut tx, topics, &event, None, &trace).await? {
            Decision::Done(outcome) => outcome,
            Decision::NotYet(reason) => return Err(ReplayError::StillFailing(reason)),
        };
        sqlx::query!(
            "update dead_letters set replayed_at = coalesce(replayed_at, now()) where id = $1",
            id
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        tracing::info!(
            dead_letter_id = id,
            outcome = outcome.name(),
            "dead letter replayed"
        );
        Ok(outcome)
    }
    .instrument(span)
    .await
}
