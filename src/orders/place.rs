//! Placing an order: the idempotency rules of `POST /orders` and the synchronous wait for the saga.

use std::collections::HashMap;
use std::time::Duration;

use sqlx::PgPool;
use uuid::Uuid;

use crate::orders::answer::Answer;
use crate::orders::validate::{Line, request_hash};
use crate::saga::engine::Engine;
use crate::saga::store::{self as saga_store, Created, NewSaga};

/// What `POST /orders` answers.
#[derive(Debug)]
pub enum Placed {
    /// The saga finished: its answer.
    Answer(Answer),
    /// Still running (or first answered 202): 202 with the order id.
    Pending(i32),
    /// The key's first request is still being answered.
    InFlight,
    /// The key was used with another body.
    KeyReused,
}

/// Places an order (or replays the answer for a repeated Idempotency-Key).
pub async fn place(
    engine: &Engine,
    pool: &PgPool,
    user_id: i32,
    key: &str,
    lines: Vec<Line>,
    trace: HashMap<String, String>,
    wait: Duration,
) -> Result<Placed, sqlx::Error> {
    let saga_id = Uuid::now_v7();
    let hash = request_hash(&lines);
    let def = engine.definition();
    let waiter = engine.waiter(saga_id);
    let created = engine
        .create(NewSaga {
            saga_id,
            user_id,
            idempotency_key: key.to_string(),
            request_hash: hash.clone(),
            input: crate::orders::saga::input(&lines),
            trace,
            saga_type: def.name.clone(),
            version: def.version as i32,
            deadline: Duration::from_secs(def.deadline_seconds),
            first_step: def.steps[0].name.clone(),
        })
        .await;
    let created = match created {
        Ok(c) => c,
        Err(e) => {
            engine.forget_waiters(saga_id);
            return Err(e);
        }
    };
    match created {
        Created::New(saga) => {
            let finished = tokio::time::timeout(wait, waiter).await;
            if let Ok(Ok(f)) = &finished
                && let Some(answer) = &f.answer
            {
                return Ok(Placed::Answer(decode(saga_id, answer)?));
            }
            engine.forget_waiters(saga_id);
            let mut conn = pool.acquire().await?;
            if finished.is_err() && saga_store::mark_answered_pending(&mut conn, saga_id).await? {
                return Ok(Placed::Pending(crate::orders::saga::order_id(&saga)?));
            }
            // Finished meanwhile (or learnt from another instance, or stuck): read the row.
            match replay_state(&mut conn, saga_id).await? {
                Some(st) => match st.answer {
                    Some(a) if !st.answered_pending => Ok(Placed::Answer(a)),
                    _ => {
                        saga_store::mark_answered_pending(&mut conn, saga_id).await?;
                        Ok(Placed::Pending(st.order_id))
                    }
                },
                None => Ok(Placed::Pending(crate::orders::saga::order_id(&saga)?)),
            }
        }
        Created::Existing(existing) => {
            engine.forget_waiters(saga_id);
            if existing.request_hash != hash {
                return Ok(Placed::KeyReused);
            }
            let mut conn = pool.acquire().await?;
            match replay_state(&mut conn, existing.saga_id).await? {
                Some(st) if st.answered_pending => Ok(Placed::Pending(st.order_id)),
                Some(ReplayState { answer: Some(a), .. }) => Ok(Placed::Answer(a)),
                Some(st) if first_request_gone(&mut conn, existing.saga_id, wait).await? => {
                    // The first request waits at most `wait`, then answers 202 and records it; past
                    // that, with nothing recorded, its client went away before any answer. This
                    // request answers in its place (else the key would answer 409 until the saga
                    // ends, for good if it is stuck).
                    if saga_store::mark_answered_pending(&mut conn, existing.saga_id).await? {
                        return Ok(Placed::Pending(st.order_id));
                    }
                    // It finished meanwhile.
                    match replay_state(&mut conn, existing.saga_id).await? {
                        Some(ReplayState {
                            answer: Some(a),
                            answered_pending: false,
                            ..
                        }) => Ok(Placed::Answer(a)),
                        Some(st) => Ok(Placed::Pending(st.order_id)),
                        None => Ok(Placed::InFlight),
                    }
                }
                _ => Ok(Placed::InFlight),
            }
        }
    }
}

/// Whether the first request for a saga has waited longer than it ever does (`wait`, and a second
/// for its own way out): with no answer recorded, its client is gone.
async fn first_request_gone(
    conn: &mut sqlx::PgConnection,
    saga_id: Uuid,
    wait: Duration,
) -> Result<bool, sqlx::Error> {
    saga_store::created_before(conn, saga_id, wait + Duration::from_secs(1)).await
}

/// Deletes the Idempotency-Keys of finished orders older than `retention` (a repeated request
/// after that places a new order); keys of sagas still running, compensating or stuck stay.
pub async fn purge_idempotency_keys(
    conn: &mut sqlx::PgConnection,
    retention: Duration,
) -> Result<u64, sqlx::Error> {
    let r = sqlx::query(
        "delete from idempotency_keys k using sagas s
          where k.created_at < now() - make_interval(secs => $1)
            and s.saga_id = k.saga_id and s.state in ('completed', 'compensated', 'failed')",
    )
    .bind(retention.as_secs_f64())
    .execute(conn)
    .await?;
    Ok(r.rows_affected())
}

/// What a saga's row says for an idempotent replay, its stored answer decoded.
#[derive(Debug)]
struct ReplayState {
    /// The stored answer, once finished.
    answer: Option<Answer>,
    /// The first request answered 202.
    answered_pending: bool,
    /// The order.
    order_id: i32,
}

async fn replay_state(
    conn: &mut sqlx::PgConnection,
    saga_id: Uuid,
) -> Result<Option<ReplayState>, sqlx::Error> {
    let Some(st) = saga_store::replay_state(conn, saga_id).await? else {
        return Ok(None);
    };
    Ok(Some(ReplayState {
        answer: st.answer.map(|a| decode(saga_id, &a)).transpose()?,
        answered_pending: st.answered_pending,
        order_id: st
            .order_id
            .ok_or_else(|| sqlx::Error::Decode(format!("saga {saga_id} names no order").into()))?,
    }))
}

/// The CreateOrder saga's answer as the engine carries and stores it.
fn decode(saga_id: Uuid, v: &serde_json::Value) -> Result<Answer, sqlx::Error> {
    Answer::from_stored(v)
        .ok_or_else(|| sqlx::Error::Decode(format!("saga {saga_id}: unreadable stored answer {v}").into()))
}
