//! Operations: finding sagas (by state, step, order, age, error class), reading one saga's whole
//! history, re-driving stuck or waiting sagas one by one or in bulk (with a dry run), cancelling
//! (compensating) a running or stuck saga, and the audit trail every admin action leaves.
//! Every action is one transaction, idempotent, and wakes the workers through NOTIFY.

use base64::Engine as _;
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::PgConnection;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::saga::machine::{Failure, FailureClass, SagaState, rfc3339};
use crate::saga::store::{self as saga_store, OperatorView};

/// Filter of a saga listing (every field optional).
#[derive(Debug, Clone, Default)]
pub struct SagaFilter {
    /// State.
    pub state: Option<String>,
    /// Step name (action or compensation).
    pub step: Option<String>,
    /// Order id.
    pub order_id: Option<i32>,
    /// Last updated more than this many seconds ago.
    pub older_than_seconds: Option<f64>,
    /// Last error class.
    pub error_class: Option<String>,
}

/// A saga in a listing.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SagaSummary {
    /// Saga id.
    #[serde(rename = "sagaID")]
    pub saga_id: Uuid,
    /// Order id.
    #[serde(rename = "orderID")]
    pub order_id: i32,
    /// Saga type.
    #[serde(rename = "sagaType")]
    pub saga_type: String,
    /// State.
    pub state: String,
    /// Current (or failed) step name.
    pub step: String,
    /// Attempts made of that step.
    pub attempt: i32,
    /// Last error text.
    #[serde(rename = "lastError")]
    pub last_error: Option<String>,
    /// Last error class.
    #[serde(rename = "errorClass")]
    pub error_class: Option<String>,
    /// When the next attempt is due.
    #[serde(rename = "nextAttemptAt")]
    pub next_attempt_at: Option<String>,
    /// Last change.
    #[serde(rename = "updatedAt")]
    pub updated_at: String,
    /// Creation.
    #[serde(rename = "createdAt")]
    pub created_at: String,
    /// The saga's trace id (find it in the trace UI).
    #[serde(rename = "traceID")]
    pub trace_id: Option<String>,
    #[serde(skip)]
    created: OffsetDateTime,
}

struct SummaryRow {
    saga_id: Uuid,
    order_id: i32,
    saga_type: String,
    state: String,
    step_name: String,
    attempt: i32,
    last_error: Option<String>,
    last_error_class: Option<String>,
    next_attempt_at: Option<OffsetDateTime>,
    updated_at: OffsetDateTime,
    created_at: OffsetDateTime,
    trace_context: Value,
}

/// The trace id in a stored W3C context.
pub fn trace_id(ctx: &Value) -> Option<String> {
    let tp = ctx.get("traceparent")?.as_str()?;
    let id = tp.split('-').nth(1)?;
    (id.len() == 32 && id != "0".repeat(32)).then(|| id.to_string())
}

fn summary(r: SummaryRow) -> SagaSummary {
    SagaSummary {
        saga_id: r.saga_id,
        order_id: r.order_id,
        saga_type: r.saga_type,
        state: r.state,
        step: r.step_name,
        attempt: r.attempt,
        last_error: r.last_error,
        error_class: r.last_error_class,
        next_attempt_at: r.next_attempt_at.map(rfc3339),
        updated_at: rfc3339(r.updated_at),
        created_at: rfc3339(r.created_at),
        trace_id: trace_id(&r.trace_context),
        created: r.created_at,
    }
}

/// An opaque cursor: the last item's creation time and id.
pub fn encode_cursor(s: &SagaSummary) -> String {
    let micros = s.created.unix_timestamp_nanos() / 1000;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("s:{micros}:{}", s.saga_id))
}

/// Reads a cursor made by `encode_cursor`.
pub fn decode_cursor(c: &str) -> Option<(OffsetDateTime, Uuid)> {
    let raw = String::from_utf8(base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(c).ok()?).ok()?;
    let mut parts = raw.strip_prefix("s:")?.splitn(2, ':');
    let micros: i128 = parts.next()?.parse().ok()?;
    let id = Uuid::parse_str(parts.next()?).ok()?;
    // checked: a crafted cursor's number must not overflow (a panic, then no answer at all).
    Some((
        OffsetDateTime::from_unix_timestamp_nanos(micros.checked_mul(1000)?).ok()?,
        id,
    ))
}

/// Sagas matching a filter, newest first.
pub async fn list_sagas(
    conn: &mut PgConnection,
    f: &SagaFilter,
    after: Option<(OffsetDateTime, Uuid)>,
    limit: i64,
) -> Result<Vec<SagaSummary>, sqlx::Error> {
    let (at, id) = after.map_or((None, None), |(a, i)| (Some(a), Some(i)));
    let rows = sqlx::query_as!(
        SummaryRow,
        r#"select saga_id, order_id, saga_type, state, step_name, attempt, last_error, last_error_class,
                  next_attempt_at, updated_at, created_at, trace_context
             from sagas
            where ($1::text is null or state = $1)
              and ($2::text is null or step_name = $2)
              and ($3::int is null or order_id = $3)
              and ($4::float8 is null or updated_at < now() - make_interval(secs => $4))
              and ($5::text is null or last_error_class = $5)
              and ($6::timestamptz is null or (created_at, saga_id) < ($6, $7))
            order by created_at desc, saga_id desc
            limit $8"#,
        f.state,
        f.step,
        f.order_id,
        f.older_than_seconds,
        f.error_class,
        at,
        id,
        limit
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().map(summary).collect())
}

/// Counts the sagas a filter selects.
pub async fn count_sagas(conn: &mut PgConnection, f: &SagaFilter) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(
        r#"select count(*) as "n!" from sagas
            where ($1::text is null or state = $1)
              and ($2::text is null or step_name = $2)
              and ($3::int is null or order_id = $3)
              and ($4::float8 is null or updated_at < now() - make_interval(secs => $4))
              and ($5::text is null or last_error_class = $5)"#,
        f.state,
        f.step,
        f.order_id,
        f.older_than_seconds,
        f.error_class
    )
    .fetch_one(&mut *conn)
    .await
}

/// One attempt in a saga's history.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HistoryItem {
    /// Action or compensation name.
    pub step: String,
    /// `action` or `compensation`.
    pub kind: String,
    /// Attempt number.
    pub attempt: i32,
    /// Start.
    pub started_at: String,
    /// End.
    pub finished_at: String,
    /// `succeeded`, `retry_scheduled`, `failed`, `skipped`.
    pub outcome: String,
    /// Error class.
    pub error_class: Option<String>,
    /// Error text.
    pub error: Option<String>,
    /// Idempotency-Key sent downstream.
    pub idempotency_key: Option<String>,
    /// The HTTP status the downstream answered (successes and failures alike; null for a local
    /// step or when no answer came).
    pub downstream_status: Option<i32>,
    /// How long the attempt took, in milliseconds (null for rows written before it was recorded).
    pub duration_ms: Option<i32>,
    /// The worker that ran it.
    pub worker: Option<String>,
}

/// A saga with its whole history.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SagaDetail {
    /// The listing fields.
    #[serde(flatten)]
    pub summary: SagaSummary,
    /// Lease holder while a worker drives it.
    #[serde(rename = "leaseOwner")]
    pub lease_owner: Option<String>,
    /// Why it compensates.
    pub failure: Option<Value>,
    /// A cancellation was asked for (by whom).
    #[serde(rename = "cancelRequested")]
    pub cancel_requested: Option<String>,
    /// Every attempt of every action and compensation, oldest first.
    pub history: Vec<HistoryItem>,
}

/// One saga with its history.
pub async fn get_saga(conn: &mut PgConnection, saga_id: Uuid) -> Result<Option<SagaDetail>, sqlx::Error> {
    let Some(r) = sqlx::query!(
        r#"select saga_id, order_id, saga_type, state, step_name, attempt, last_error, last_error_class,
                  next_attempt_at, updated_at, created_at, trace_context, lease_owner, failure, cancel_requested
             from sagas where saga_id = $1"#,
        saga_id
    )
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(None);
    };
    let history = sqlx::query!(
        r#"select step, kind, attempt, started_at, finished_at, outcome, error_class, error, idempotency_key,
                  downstream_status, duration_ms, worker
             from saga_steps where saga_id = $1 order by id"#,
        saga_id
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|h| HistoryItem {
        step: h.step,
        kind: h.kind,
        attempt: h.attempt,
        started_at: rfc3339(h.started_at),
        finished_at: rfc3339(h.finished_at),
        outcome: h.outcome,
        error_class: h.error_class,
        error: h.error,
        idempotency_key: h.idempotency_key,
        downstream_status: h.downstream_status,
        duration_ms: h.duration_ms,
        worker: h.worker,
    })
    .collect();
    Ok(Some(SagaDetail {
        summary: summary(SummaryRow {
            saga_id: r.saga_id,
            order_id: r.order_id,
            saga_type: r.saga_type,
            state: r.state,
            step_name: r.step_name,
            attempt: r.attempt,
            last_error: r.last_error,
            last_error_class: r.last_error_class,
            next_attempt_at: r.next_attempt_at,
            updated_at: r.updated_at,
            created_at: r.created_at,
            trace_context: r.trace_context,
        }),
        lease_owner: r.lease_owner,
        failure: r.failure,
        cancel_requested: r.cancel_requested,
        history,
    }))
}

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

/// Re-drives a saga: a stuck one continues its compensation with fresh attempts; a waiting one runs
/// its next attempt now. Terminal sagas are refused. Harmless to repeat.
pub async fn retry(conn: &mut PgConnection, saga_id: Uuid) -> Result<ActionOutcome, sqlx::Error> {
    let Some(l) = saga_store::lock_for_operator(conn, saga_id).await? else {
        return Ok(ActionOutcome::NotFound);
    };
    if l.state.is_terminal() {
        return Ok(ActionOutcome::Terminal(l.state));
    }
    let before = snapshot(&l);
    if l.state == SagaState::Stuck {
        saga_store::resume_compensation(conn, saga_id, None).await?;
    } else if !l.leased {
        saga_store::run_now(conn, saga_id).await?;
    }
    saga_store::wake_due(conn).await?;
    let after = snapshot_of(conn, saga_id).await?;
    Ok(ActionOutcome::Done { before, after })
}

/// Compensates a running or stuck saga (a running one turns at its next step boundary). Refused for
/// terminal sagas; harmless to repeat.
pub async fn cancel(
    conn: &mut PgConnection,
    saga_id: Uuid,
    actor: i32,
) -> Result<ActionOutcome, sqlx::Error> {
    let Some(l) = saga_store::lock_for_operator(conn, saga_id).await? else {
        return Ok(ActionOutcome::NotFound);
    };
    if l.state.is_terminal() {
        return Ok(ActionOutcome::Terminal(l.state));
    }
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
                unavailable: None,
                after_completion: false,
            };
            saga_store::resume_compensation(conn, saga_id, Some((&reason, &failure))).await?;
        }
        // Compensating already: nothing more to do.
        _ => {}
    }
    saga_store::wake_due(conn).await?;
    let after = snapshot_of(conn, saga_id).await?;
    Ok(ActionOutcome::Done { before, after })
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
    let rows = sqlx::query!(
        r#"select id, at, actor, action, target, before, after from audit_log
            where ($1::bigint is null or id < $1) order by id desc limit $2"#,
        before_id,
        limit
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| AuditItem {
            id: r.id,
            at: rfc3339(r.at),
            actor: r.actor,
            action: r.action,
            target: r.target,
            before: r.before,
            after: r.after,
        })
        .collect())
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
