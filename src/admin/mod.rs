//! Operations: finding sagas (by state, step, order, age, error class), reading one saga's whole
//! history, re-driving stuck or waiting sagas one by one or in bulk (with a dry run), cancelling
//! (compensating) a running or stuck saga, and the audit trail every admin action leaves.
//! Every action is one transaction, idempotent, and wakes the workers through NOTIFY.

use serde::Serialize;
use serde_json::{Value, json};
use sqlx::PgConnection;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::saga::machine::{Failure, FailureClass, SagaState, rfc3339};
use crate::saga::store::{self as saga_store, OperatorView};

// What operators read of sagas is the saga module's (it owns the tables); re-exported here, where
// the admin API and the console have always found it.
pub use crate::saga::views::{
    HistoryItem, SagaDetail, SagaFilter, SagaSummary, count_sagas, decode_cursor, encode_cursor, get_saga,
    list_sagas, trace_id,
};

/// Outcome of an admin action on one saga.
#[derive(Debug)]
pub enum ActionOutcome {
    /// No such saga.
    NotFound,
    /// Refused: the saga is terminal (its state).
    Terminal(SagaState),
    /// Done (or nothing to do): the state before and after.
    Done {
        /// Before.
        before: Value,
        /// After.
        after: Value,
    },
}

fn snapshot(l: &OperatorView) -> Value {
    json!({"state": l.state.as_str(), "step": l.step_name, "attempt": l.attempt, "nextAttemptAt": l.next_attempt_at.map(rfc3339)})
}

async fn snapshot_of(conn: &mut PgConnection, saga_id: Uuid) -> Result<Value, sqlx::Error> {
    Ok(saga_store::lock_for_operator(conn, saga_id)
        .await?
        .map(|l| snapshot(&l))
        .unwrap_or(Value::Null))
}

/// Locks a saga for an operator's action; `Err` with the outcome when there is nothing to act on
/// (no such saga, or a terminal one).
async fn lock_live(
    conn: &mut PgConnection,
    saga_id: Uuid,
) -> Result<Result<OperatorView, ActionOutcome>, sqlx::Error> {
    Ok(match saga_store::lock_for_operator(conn, saga_id).await? {
        None => Err(ActionOutcome::NotFound),
        Some(l) if l.state.is_terminal() => Err(ActionOutcome::Terminal(l.state)),
        Some(l) => Ok(l),
    })
}

/// Ends an operator's action: wakes the workers and reports the saga as it was `before` and is now.
async fn done(conn: &mut PgConnection, saga_id: Uuid, before: Value) -> Result<ActionOutcome, sqlx::Error> {
    saga_store::wake_due(conn).await?;
    let after = snapshot_of(conn, saga_id).await?;
    Ok(ActionOutcome::Done { before, after })
}

/// Re-drives a saga: a stuck one continues its compensation with fresh attempts; a waiting one runs
/// its next attempt now. Terminal sagas are refused. Harmless to repeat.
pub async fn retry(conn: &mut PgConnection, saga_id: Uuid) -> Result<ActionOutcome, sqlx::Error> {
    let l = match lock_live(conn, saga_id).await? {
        Ok(l) => l,
        Err(refused) => return Ok(refused),
    };
    let before = snapshot(&l);
    if l.state == SagaState::Stuck {
        saga_store::resume_compensation(conn, saga_id, None).await?;
    } else if !l.leased {
        saga_store::run_now(conn, saga_id).await?;
    }
    done(conn, saga_id, before).await
}

/// Compensates a running or stuck saga (a running one turns at its next step boundary). Refused for
/// terminal sagas; harmless to repeat.
pub async fn cancel(
    conn: &mut PgConnection,
    saga_id: Uuid,
    actor: i32,
) -> Result<ActionOutcome, sqlx::Error> {
    let l = match lock_live(conn, saga_id).await? {
        Ok(l) => l,
        Err(refused) => return Ok(refused),
    };
    let before = snapshot(&l);
    let reason = format!("by admin {actor}");
    match l.state {
        // The first reason stays (a repeated admin cancel, or one after the customer's).
        SagaState::Running => saga_store::request_cancel(conn, saga_id, &reason, true).await?,
        // Stuck: it is compensating already; continue with fresh attempts.
        SagaState::Stuck => {
            let failure = Failure {
                class: FailureClass::Cancelled,
                detail: format!("cancelled: {reason}"),
                step: l.step_name.clone(),
                refusal: None,
                after_completion: false,
            };
            saga_store::resume_compensation(conn, saga_id, Some((&reason, &failure))).await?;
        }
        // Compensating already: nothing more to do.
        _ => {}
    }
    done(conn, saga_id, before).await
}

/// Writes an audit row; returns its id.
pub async fn audit(
    conn: &mut PgConnection,
    actor: i32,
    action: &str,
    target: &str,
    before: Option<Value>,
    after: Option<Value>,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "insert into audit_log (actor, action, target, before, after) values ($1, $2, $3, $4, $5) returning id",
    )
    .bind(actor)
    .bind(action)
    .bind(target)
    .bind(before)
    .bind(after)
    .fetch_one(&mut *conn)
    .await
}

/// Applies an account lifecycle action and audits it (when it changed something) in the caller's
/// transaction; `actor` is the admin's user id, 0 for the command line.
pub async fn change_account(
    conn: &mut PgConnection,
    actor: i32,
    user_id: i32,
    action: crate::auth::users::LifecycleAction,
) -> Result<crate::auth::users::LifecycleOutcome, sqlx::Error> {
    use crate::auth::users::{LifecycleOutcome, apply_lifecycle};
    let outcome = apply_lifecycle(conn, user_id, action).await?;
    if let LifecycleOutcome::Done {
        before,
        after,
        changed: true,
        families_revoked,
    } = &outcome
    {
        let mut after = serde_json::to_value(after).unwrap_or_default();
        after["sessionsRevoked"] = (*families_revoked).into();
        audit(
            conn,
            actor,
            action.audit_name(),
            &format!("user:{user_id}"),
            serde_json::to_value(before).ok(),
            Some(after),
        )
        .await?;
    }
    Ok(outcome)
}

/// An audit row.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AuditItem {
    /// Row id (also the cursor).
    #[serde(skip)]
    pub id: i64,
    /// When.
    pub at: String,
    /// The admin's user id.
    pub actor: i32,
    /// What (`saga.retry`, `saga.cancel`, `sagas.bulk_retry`, `dead_letter.replay`).
    pub action: String,
    /// On what.
    pub target: String,
    /// State before.
    pub before: Option<Value>,
    /// State after.
    pub after: Option<Value>,
}

/// Audit rows, newest first, below `before_id`.
pub async fn list_audit(
    conn: &mut PgConnection,
    before_id: Option<i64>,
    limit: i64,
) -> Result<Vec<AuditItem>, sqlx::Error> {
    let rows = sqlx::query_as!(
        AuditRow,
        r#"select id, at, actor, action, target, before, after from audit_log
            where ($1::bigint is null or id < $1) order by id desc limit $2"#,
        before_id,
        limit
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().map(AuditItem::from).collect())
}

#[derive(sqlx::FromRow)]
struct AuditRow {
    id: i64,
    at: OffsetDateTime,
    actor: i32,
    action: String,
    target: String,
    before: Option<Value>,
    after: Option<Value>,
}

impl From<AuditRow> for AuditItem {
    fn from(r: AuditRow) -> Self {
        AuditItem {
            id: r.id,
            at: rfc3339(r.at),
            actor: r.actor,
            action: r.action,
            target: r.target,
            before: r.before,
            after: r.after,
        }
    }
}

/// One audit row by id.
pub async fn audit_entry(conn: &mut PgConnection, id: i64) -> Result<Option<AuditItem>, sqlx::Error> {
    let row: Option<AuditRow> =
        sqlx::query_as("select id, at, actor, action, target, before, after from audit_log where id = $1")
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
    Ok(row.map(AuditItem::from))
}

/// The audit rows about one saga, newest first: its own actions (`target` = `saga:{id}`) and the
/// bulk re-drives that re-drove it.
pub async fn audit_of_saga(
    conn: &mut PgConnection,
    saga_id: Uuid,
    limit: i64,
) -> Result<Vec<AuditItem>, sqlx::Error> {
    let rows: Vec<AuditRow> = sqlx::query_as(
        r#"select id, at, actor, action, target, before, after from audit_log
            where target = $1 or (action = 'sagas.bulk_retry' and after -> 'retried' ? $2)
            order by id desc limit $3"#,
    )
    .bind(format!("saga:{saga_id}"))
    .bind(saga_id.to_string())
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().map(AuditItem::from).collect())
}
