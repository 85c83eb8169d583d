//! What operators read of sagas: listings by state, step, order, age and error class (newest first,
//! with an opaque cursor), counts, and one saga with its whole history. The SQL of `sagas` and
//! `saga_steps` is the saga module's; the admin API and the console call these (through
//! `crate::admin`).

use base64::Engine as _;
use serde::Serialize;
use serde_json::Value;
use sqlx::PgConnection;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::saga::machine::rfc3339;

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
    /// Order id (null for a saga of a type that places no order).
    #[serde(rename = "orderID")]
    pub order_id: Option<i32>,
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
    order_id: Option<i32>,
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
