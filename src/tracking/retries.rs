//! Parked TrackingEvents: events whose order was not known yet (or still pending) wait in
//! `tracking_retries` and are retried with exponential backoff until
//! [`ConsumerConfig::unknown_order_window`] has passed since they were first seen; then they are
//! dead-lettered. The rows are claimed with `FOR UPDATE SKIP LOCKED`, so every consumer instance
//! may run this loop; an order's parked events apply in the order they were parked.

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::ConsumerConfig;
use super::apply::decide;
use super::dead_letters::dead_letter;
use super::outcome::Decision;
use super::record::{event_span, parse, stored_record};
use crate::outbox::Topics;
use crate::telemetry::context_headers;

/// Most parked events looked at per round.
const ROUND: i64 = 200;

/// Retries due parked events every [`ConsumerConfig::retry_poll_interval`] until `shutdown`.
pub(crate) async fn run(pool: PgPool, cfg: ConsumerConfig, topics: Topics, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(cfg.retry_poll_interval) => {}
        }
        if let Err(e) = process_due(&pool, &cfg, &topics).await {
            tracing::warn!(error = %e, "tracking consumer: retrying parked events failed");
        }
    }
}

/// Retries every parked event that is due now; returns how many were resolved (applied, found to
/// be duplicates or late, or dead-lettered). Tests call it to drive retries deterministically.
pub async fn process_due(pool: &PgPool, cfg: &ConsumerConfig, topics: &Topics) -> Result<usize, sqlx::Error> {
    let due = sqlx::query_scalar!(
        "select id from tracking_retries where next_attempt_at <= now() order by id limit $1",
        ROUND
    )
    .fetch_all(pool)
    .await?;
    let mut resolved = 0;
    for id in due {
        match retry_one(pool, cfg, topics, id).await {
            Ok(true) => resolved += 1,
            Ok(false) => {}
            // One event failing does not hold up the others; it is tried again next round.
            Err(e) => {
                tracing::warn!(error = %e, retry_id = id, "tracking consumer: retrying a parked event failed")
            }
        }
    }
    Ok(resolved)
}

/// One retry in one transaction; true when the event left the retry table.
async fn retry_one(
    pool: &PgPool,
    cfg: &ConsumerConfig,
    topics: &Topics,
    id: i64,
) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let row = sqlx::query!(
        r#"select event_id, order_id, topic, partition, "offset", key, payload, headers, attempts,
                  now() - first_seen_at >= make_interval(secs => $2) as "expired!"
           from tracking_retries
           where id = $1 and next_attempt_at <= now()
           for update skip locked"#,
        id,
        cfg.unknown_order_window.as_secs_f64()
    )
    .fetch_optional(&mut *tx)
    .await?;
    // Taken by another instance, or already resolved.
    let Some(row) = row else { return Ok(false) };
    let record = stored_record!(row);
    let span = event_span(&record);
    let trace = context_headers(&span);
    async {
        let decision = match parse(&record.payload) {
            Ok(event) => decide(&mut tx, topics, &event, Some(id), &trace).await?,
            // Cannot happen for rows the consumer parked; dead-letter rather than loop.
            Err(reason) => Decision::NotYet(reason),
        };
        let resolved = match decision {
            Decision::Done(outcome) => {
                tracing::info!(
                    order_id = row.order_id,
                    outcome = outcome.name(),
                    attempts = row.attempts + 1,
                    "parked tracking event resolved"
                );
                true
            }
            Decision::NotYet(reason) if row.expired => {
                let reason = format!(
                    "{reason} (retried {} times over {} s)",
                    row.attempts + 1,
                    cfg.unknown_order_window.as_secs()
                );
                let dl = dead_letter(&mut tx, topics, &record, &reason, &trace).await?;
                tracing::warn!(order_id = row.order_id, dead_letter_id = dl, reason = %reason,
                    "parked tracking event dead-lettered");
                true
            }
            Decision::NotYet(reason) => {
                let delay = cfg.retry_delay(u32::try_from(row.attempts + 1).unwrap_or(u32::MAX));
                sqlx::query!(
                    "update tracking_retries
                     set attempts = attempts + 1, next_attempt_at = now() + make_interval(secs => $2),
                         last_error = $3
                     where id = $1",
                    id,
                    delay.as_secs_f64(),
                    reason
                )
                .execute(&mut *tx)
                .await?;
                false
            }
        };
        if resolved {
            sqlx::query!("delete from tracking_retries where id = $1", id)
                .execute(&mut *tx)
                .await?;
            // The order's next parked event need not wait for its own backoff.
            sqlx::query!(
                "update tracking_retries set next_attempt_at = now() where order_id = $1 and id > $2",
                row.order_id,
                id
            )
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(resolved)
    }
    .instrument(span)
    .await
}
