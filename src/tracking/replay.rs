//! Replaying a dead letter: its event is applied again with the usual rules, once whatever made it
//! fail is fixed (`POST /admin/dead-letters/{id}/replay`).

use sqlx::PgPool;
use tracing::Instrument as _;

use super::apply::decide;
use super::outcome::{Decision, Outcome};
use super::record::{event_span, parse, stored_record};
use crate::outbox::Topics;
use crate::telemetry::context_headers;

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
