//! The admin API (role `admin`): sagas, their history, re-drives and cancellations (one or in bulk,
//! with a dry run), user accounts (disable, enable, delete, their orders), and the audit trail.
//! Every action is audited in the transaction that makes it.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Path, State};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::admin::{self, ActionOutcome, AuditItem, SagaDetail, SagaFilter, SagaSummary};
use crate::api::AppState;
use crate::api::extract::{AdminUser, ApiJson, ApiQuery};
use crate::api::orders::{OrderPage, PageParams, page_of_orders};
use crate::auth::users::{self, Account, AccountStatus, LifecycleAction, LifecycleOutcome};
use crate::error::ApiError;
use crate::saga::machine::SagaState;

/// A page of sagas.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SagaPage {
    /// Newest first.
    pub items: Vec<SagaSummary>,
    /// Cursor of the next page; null on the last.
    pub next_cursor: Option<String>,
}

/// A page of audit rows.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditPage {
    /// Newest first.
    pub items: Vec<AuditItem>,
    /// Cursor of the next page; null on the last.
    pub next_cursor: Option<String>,
}

type Params = ApiQuery<HashMap<String, String>>;

/// Longest `olderThanSeconds` (a hundred years): beyond it PostgreSQL's interval and timestamp
/// arithmetic overflows, which was a 500.
const MAX_OLDER_THAN_SECONDS: f64 = 100.0 * 365.25 * 24.0 * 3600.0;

fn older_than(v: f64) -> Result<f64, ApiError> {
    if v.is_finite() && (0.0..=MAX_OLDER_THAN_SECONDS).contains(&v) {
        Ok(v)
    } else {
        Err(ApiError::invalid_field(
            "olderThanSeconds",
            format!("olderThanSeconds must be a number from 0 to {MAX_OLDER_THAN_SECONDS:.0}"),
        ))
    }
}

fn only(params: &HashMap<String, String>, allowed: &[&str]) -> Result<(), ApiError> {
    match params.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(ApiError::invalid_field(
            k,
            format!("unknown query parameter {k:?}"),
        )),
        None => Ok(()),
    }
}

fn limit_param(params: &HashMap<String, String>, default: i64, max: i64) -> Result<i64, ApiError> {
    match params.get("limit") {
        None => Ok(default),
        Some(s) => s
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=max).contains(l))
            .ok_or_else(|| {
                ApiError::invalid_field("limit", format!("limit must be an integer from 1 to {max}"))
            }),
    }
}

fn state_param(v: Option<&String>) -> Result<Option<String>, ApiError> {
    match v {
        None => Ok(None),
        Some(s) if SagaState::parse(s).is_some() => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::invalid_field(
            "state",
            "state must be one of running, compensating, completed, compensated, failed, stuck",
        )),
    }
}

pub(crate) fn filter_from(params: &HashMap<String, String>) -> Result<SagaFilter, ApiError> {
    Ok(SagaFilter {
        state: state_param(params.get("state"))?,
        step: params.get("step").cloned(),
        order_id: match params.get("orderID") {
            None => None,
            Some(s) => {
                Some(s.parse::<i32>().ok().filter(|v| *v > 0).ok_or_else(|| {
                    ApiError::invalid_field("orderID", "orderID must be a positive integer")
                })?)
            }
        },
        older_than_seconds: match params.get("olderThanSeconds") {
            None => None,
            Some(s) => Some(older_than(s.parse::<f64>().unwrap_or(f64::NAN))?),
        },
        error_class: params.get("errorClass").cloned(),
    })
}

/// Sagas matching a filter, newest first.
#[utoipa::path(get, path = "/admin/sagas", tag = "admin", security(("bearer" = [])),
    params(("state" = Option<String>, Query), ("step" = Option<String>, Query), ("orderID" = Option<i32>, Query),
           ("olderThanSeconds" = Option<f64>, Query), ("errorClass" = Option<String>, Query),
           ("limit" = Option<i64>, Query), ("cursor" = Option<String>, Query)),
    responses((status = 200, body = SagaPage), (status = 401), (status = 403), (status = 422)))]
pub async fn list_sagas(
    State(state): State<AppState>,
    _admin: AdminUser,
    ApiQuery(params): Params,
) -> Result<Json<SagaPage>, ApiError> {
    only(
        &params,
        &[
            "state",
            "step",
            "orderID",
            "olderThanSeconds",
            "errorClass",
            "limit",
            "cursor",
        ],
    )?;
    let filter = filter_from(&params)?;
    let limit = limit_param(&params, 50, 100)?;
    let after = match params.get("cursor").map(String::as_str) {
        None | Some("") => None,
        Some(c) => Some(
            admin::decode_cursor(c)
                .ok_or_else(|| ApiError::invalid_field("cursor", "cursor is not one this API issued"))?,
        ),
    };
    let mut conn = state.db.acquire().await?;
    let mut items = admin::list_sagas(&mut conn, &filter, after, limit + 1).await?;
    let next_cursor = if items.len() as i64 > limit {
        items.truncate(limit as usize);
        items.last().map(admin::encode_cursor)
    } else {
        None
    };
    Ok(Json(SagaPage { items, next_cursor }))
}

fn saga_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::not_found("no such saga"))
}

/// One saga with every attempt of every action and compensation.
#[utoipa::path(get, path = "/admin/sagas/{sagaID}", tag = "admin", security(("bearer" = [])),
    params(("sagaID" = String, Path)), responses((status = 200, body = SagaDetail), (status = 404)))]
pub async fn get_saga(
    State(state): State<AppState>,
    _admin: AdminUser,
    Path(raw): Path<String>,
) -> Result<Json<SagaDetail>, ApiError> {
    let id = saga_id(&raw)?;
    let mut conn = state.db.acquire().await?;
    admin::get_saga(&mut conn, id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("no such saga"))
}

/// Retries (`saga.retry`) or cancels (`saga.cancel`) one saga and audits it in the same
/// transaction; `reason` (the console asks for one) is kept in the audit row's `after.reason`.
/// Returns the saga as it is now and the audit row's id.
pub(crate) async fn act(
    state: &AppState,
    actor: i32,
    id: Uuid,
    action: &'static str,
    reason: Option<&str>,
) -> Result<(SagaDetail, i64), ApiError> {
    let mut tx = state.db.begin().await?;
    let outcome = match action {
        "saga.retry" => admin::retry(&mut tx, id).await?,
        _ => admin::cancel(&mut tx, id, actor).await?,
    };
    let audit_id = match outcome {
        ActionOutcome::NotFound => return Err(ApiError::not_found("no such saga")),
        ActionOutcome::Terminal(s) => {
            return Err(ApiError::conflict(
                "saga-terminal",
                format!("the saga is {}; nothing can change it any more", s.as_str()),
            )
            .with("state", s.as_str()));
        }
        ActionOutcome::Done { before, mut after } => {
            if let (Some(r), Some(obj)) = (reason, after.as_object_mut()) {
                obj.insert("reason".into(), json!(r));
            }
            admin::audit(
                &mut tx,
                actor,
                action,
                &format!("saga:{id}"),
                Some(before),
                Some(after),
            )
            .await?
        }
    };
    tx.commit().await?;
    state.engine.nudge();
    let mut conn = state.db.acquire().await?;
    let detail = admin::get_saga(&mut conn, id)
        .await?
        .ok_or_else(|| ApiError::not_found("no such saga"))?;
    Ok((detail, audit_id))
}

/// Re-drives a stuck saga from where it stopped (a compensating saga continues its compensation), or
/// runs a waiting saga's next attempt now. 409 for a terminal saga. Harmless to repeat.
#[utoipa::path(post, path = "/admin/sagas/{sagaID}/retry", tag = "admin", security(("bearer" = [])),
    params(("sagaID" = String, Path)), responses((status = 200, body = SagaDetail), (status = 404), (status = 409)))]
pub async fn retry_saga(
    State(state): State<AppState>,
    AdminUser(claims): AdminUser,
    Path(raw): Path<String>,
) -> Result<Json<SagaDetail>, ApiError> {
    act(&state, claims.user_id(), saga_id(&raw)?, "saga.retry", None)
        .await
        .map(|(d, _)| Json(d))
}

/// Compensates a running or stuck saga. 409 once it is terminal.
#[utoipa::path(post, path = "/admin/sagas/{sagaID}/cancel", tag = "admin", security(("bearer" = [])),
    params(("sagaID" = String, Path)), responses((status = 200, body = SagaDetail), (status = 404), (status = 409)))]
pub async fn cancel_saga(
    State(state): State<AppState>,
    AdminUser(claims): AdminUser,
    Path(raw): Path<String>,
) -> Result<Json<SagaDetail>, ApiError> {
    act(&state, claims.user_id(), saga_id(&raw)?, "saga.cancel", None)
        .await
        .map(|(d, _)| Json(d))
}

/// Bulk re-drive request.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, remote = "Self", rename_all = "camelCase")]
pub struct BulkRetryRequest {
    /// State to select (usually `stuck`).
    pub state: String,
    /// Step name.
    pub step: Option<String>,
    /// Last error class.
    pub error_class: Option<String>,
    /// Last updated more than this many seconds ago.
    pub older_than_seconds: Option<f64>,
    /// Most sagas to re-drive (1–1000).
    pub limit: i64,
    /// Report what would be re-driven without changing anything.
    #[serde(default)]
    pub dry_run: bool,
}
crate::api::extract::object_only!(BulkRetryRequest);

/// Bulk re-drive answer.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BulkRetryAnswer {
    /// Every saga the filter selects.
    pub matched: i64,
    /// The ones re-driven (on a dry run: the ones that would be).
    pub retried: Vec<Uuid>,
    /// Whether this was a dry run.
    pub dry_run: bool,
}

/// Re-drives every saga a filter selects, up to `limit`; a dry run changes nothing.
#[utoipa::path(post, path = "/admin/sagas/retry", tag = "admin", security(("bearer" = [])), request_body = BulkRetryRequest,
    responses((status = 200, body = BulkRetryAnswer), (status = 422)))]
pub async fn bulk_retry(
    State(state): State<AppState>,
    AdminUser(claims): AdminUser,
    ApiJson(req): ApiJson<BulkRetryRequest>,
) -> Result<Json<BulkRetryAnswer>, ApiError> {
    run_bulk_retry(&state, claims.user_id(), &req, None)
        .await
        .map(|(a, _)| Json(a))
}

/// The bulk re-drive: validates the request, re-drives (or on a dry run only lists) the sagas it
/// selects and audits a real run in the same transaction, with `reason` in the audit row's
/// `after.reason` when given. Returns the answer and, for a real run, the audit row's id.
pub(crate) async fn run_bulk_retry(
    state: &AppState,
    actor: i32,
    req: &BulkRetryRequest,
    reason: Option<&str>,
) -> Result<(BulkRetryAnswer, Option<i64>), ApiError> {
    let filter = SagaFilter {
        state: state_param(Some(&req.state))?,
        step: req.step.clone(),
        order_id: None,
        older_than_seconds: req.older_than_seconds.map(older_than).transpose()?,
        error_class: req.error_class.clone(),
    };
    if !(1..=1000).contains(&req.limit) {
        return Err(ApiError::invalid_field(
            "limit",
            "limit must be an integer from 1 to 1000",
        ));
    }
    let mut tx = state.db.begin().await?;
    let matched = admin::count_sagas(&mut tx, &filter).await?;
    let candidates: Vec<Uuid> = admin::list_sagas(&mut tx, &filter, None, req.limit)
        .await?
        .into_iter()
        .filter(|s| SagaState::parse(&s.state).is_some_and(|st| !st.is_terminal()))
        .map(|s| s.saga_id)
        .collect();
    if req.dry_run {
        tx.rollback().await?;
        let answer = BulkRetryAnswer {
            matched,
            retried: candidates,
            dry_run: true,
        };
        return Ok((answer, None));
    }
    let mut retried = Vec::with_capacity(candidates.len());
    for id in candidates {
        if let ActionOutcome::Done { .. } = admin::retry(&mut tx, id).await? {
            retried.push(id);
        }
    }
    let target = json!({"state": req.state, "step": req.step, "errorClass": req.error_class, "olderThanSeconds": req.older_than_seconds, "limit": req.limit});
    let mut after = json!({"retried": retried});
    if let Some(r) = reason {
        after["reason"] = json!(r);
    }
    let audit_id = admin::audit(
        &mut tx,
        actor,
        "sagas.bulk_retry",
        &target.to_string(),
        Some(json!({"matched": matched})),
        Some(after),
    )
    .await?;
    tx.commit().await?;
    state.engine.nudge();
    let answer = BulkRetryAnswer {
        matched,
        retried,
        dry_run: false,
    };
    Ok((answer, Some(audit_id)))
}

/// The audit trail, newest first.
#[utoipa::path(get, path = "/admin/audit", tag = "admin", security(("bearer" = [])),
    params(("limit" = Option<i64>, Query), ("cursor" = Option<String>, Query)), responses((status = 200, body = AuditPage)))]
pub async fn list_audit(
    State(state): State<AppState>,
    _admin: AdminUser,
    ApiQuery(params): Params,
) -> Result<Json<AuditPage>, ApiError> {
    only(&params, &["limit", "cursor"])?;
    let limit = limit_param(&params, 50, 100)?;
    let before = match params.get("cursor").map(String::as_str) {
        None | Some("") => None,
        Some(c) => Some(
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(c)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|s| s.strip_prefix("a:").and_then(|n| n.parse::<i64>().ok()))
                .ok_or_else(|| ApiError::invalid_field("cursor", "cursor is not one this API issued"))?,
        ),
    };
    let mut conn = state.db.acquire().await?;
    let mut items = admin::list_audit(&mut conn, before, limit + 1).await?;
    let next_cursor = if items.len() as i64 > limit {
        items.truncate(limit as usize);
        items
            .last()
            .map(|a| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("a:{}", a.id)))
    } else {
        None
    };
    Ok(Json(AuditPage { items, next_cursor }))
}

/// Tracking events that could not be applied, newest first.
#[utoipa::path(get, path = "/admin/dead-letters", tag = "admin", security(("bearer" = [])),
    params(("limit" = Option<i64>, Query), ("cursor" = Option<String>, Query)),
    responses((status = 200, body = crate::tracking::dead_letters::DeadLetterPage)))]
pub async fn list_dead_letters(
    State(state): State<AppState>,
    _admin: AdminUser,
    ApiQuery(params): Params,
) -> Result<Json<crate::tracking::dead_letters::DeadLetterPage>, ApiError> {
    only(&params, &["limit", "cursor"])?;
    let limit = limit_param(&params, 50, 100)?;
    let before = id_cursor(&params)?;
    let mut conn = state.db.acquire().await?;
    Ok(Json(
        crate::tracking::dead_letters::list_dead_letters(&mut conn, limit, before).await?,
    ))
}

/// What a replay did.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReplayAnswer {
    /// The dead letter.
    pub id: i64,
    /// `applied`, `notified`, `no_change`, `duplicate`, `parked`, `dead_lettered`.
    pub outcome: &'static str,
}

/// Re-applies one dead-lettered tracking event (after the cause was fixed). Harmless to repeat:
/// events are deduplicated by eventID.
#[utoipa::path(post, path = "/admin/dead-letters/{id}/replay", tag = "admin", security(("bearer" = [])),
    params(("id" = i64, Path)),
    responses((status = 200, body = ReplayAnswer), (status = 404), (status = 409, description = "still cannot be applied")))]
pub async fn replay_dead_letter(
    State(state): State<AppState>,
    AdminUser(claims): AdminUser,
    Path(raw): Path<String>,
) -> Result<Json<ReplayAnswer>, ApiError> {
    use crate::tracking::ReplayError;
    let id = raw
        .parse::<i64>()
        .map_err(|_| ApiError::not_found("no such dead letter"))?;
    let outcome = match crate::tracking::replay_dead_letter(&state.db, &state.config.topics, id).await {
        Ok(o) => o,
        Err(ReplayError::NotFound(_)) => return Err(ApiError::not_found("no such dead letter")),
        Err(ReplayError::StillFailing(why)) => {
            return Err(ApiError::conflict(
                "replay-failed",
                format!("the event still cannot be applied: {why}"),
            ));
        }
        Err(ReplayError::Database(e)) => return Err(e.into()),
    };
    let mut conn = state.db.acquire().await?;
    admin::audit(
        &mut conn,
        claims.user_id(),
        "dead_letter.replay",
        &format!("dead_letter:{id}"),
        None,
        Some(json!({"outcome": outcome.name()})),
    )
    .await?;
    Ok(Json(ReplayAnswer {
        id,
        outcome: outcome.name(),
    }))
}

/// The outbox: rows waiting for Kafka, the oldest one's age, and recent throughput.
#[utoipa::path(get, path = "/admin/outbox", tag = "admin", security(("bearer" = [])),
    responses((status = 200, body = crate::outbox::relay::Backlog)))]
pub async fn outbox_status(
    State(state): State<AppState>,
    _admin: AdminUser,
) -> Result<Json<crate::outbox::relay::Backlog>, ApiError> {
    let mut conn = state.db.acquire().await?;
    Ok(Json(crate::outbox::relay::backlog(&mut conn).await?))
}

/// A positive id cursor, as the dead-letter listings issue them.
fn id_cursor(params: &HashMap<String, String>) -> Result<Option<i64>, ApiError> {
    match params.get("cursor").map(String::as_str) {
        None | Some("") => Ok(None),
        Some(c) => c
            .parse::<i64>()
            .ok()
            .filter(|v| *v > 0)
            .map(Some)
            .ok_or_else(|| ApiError::invalid_field("cursor", "cursor is not one this API issued")),
    }
}

/// Outbox rows Kafka refused for good (set aside by the relay), newest first; `payload` is the
/// envelope's beginning (`payloadTruncated`), the whole one is in `GET .../{id}`.
#[utoipa::path(get, path = "/admin/outbox/dead-letters", tag = "admin", security(("bearer" = [])),
    params(("limit" = Option<i64>, Query), ("cursor" = Option<String>, Query)),
    responses((status = 200, body = crate::outbox::dead::OutboxDeadLetterPage)))]
pub async fn list_outbox_dead_letters(
    State(state): State<AppState>,
    _admin: AdminUser,
    ApiQuery(params): Params,
) -> Result<Json<crate::outbox::dead::OutboxDeadLetterPage>, ApiError> {
    only(&params, &["limit", "cursor"])?;
    let limit = limit_param(&params, 50, 100)?;
    let before = id_cursor(&params)?;
    let mut conn = state.db.acquire().await?;
    Ok(Json(crate::outbox::dead::list(&mut conn, limit, before).await?))
}

fn outbox_dead_letter_id(raw: &str) -> Result<i64, ApiError> {
    raw.parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| ApiError::not_found("no such outbox dead letter"))
}

/// One set-aside outbox row with its whole envelope.
#[utoipa::path(get, path = "/admin/outbox/dead-letters/{id}", tag = "admin", security(("bearer" = [])),
    params(("id" = i64, Path)),
    responses((status = 200, body = crate::outbox::dead::OutboxDeadLetter), (status = 404)))]
pub async fn get_outbox_dead_letter(
    State(state): State<AppState>,
    _admin: AdminUser,
    Path(raw): Path<String>,
) -> Result<Json<crate::outbox::dead::OutboxDeadLetter>, ApiError> {
    let id = outbox_dead_letter_id(&raw)?;
    let mut conn = state.db.acquire().await?;
    crate::outbox::dead::get(&mut conn, id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("no such outbox dead letter"))
}

/// What an outbox replay did.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutboxReplayAnswer {
    /// The set-aside row.
    pub id: i64,
    /// `queued` (back in the outbox) or `already_queued` (an earlier replay's copy is still there).
    pub outcome: &'static str,
    /// The outbox row that carries it now.
    #[serde(rename = "outboxID")]
    pub outbox_id: i64,
}

/// Puts a set-aside row back in the outbox (same eventID), once the cause is fixed; harmless to
/// repeat.
#[utoipa::path(post, path = "/admin/outbox/dead-letters/{id}/replay", tag = "admin", security(("bearer" = [])),
    params(("id" = i64, Path)),
    responses((status = 200, body = OutboxReplayAnswer), (status = 404)))]
pub async fn replay_outbox_dead_letter(
    State(state): State<AppState>,
    AdminUser(claims): AdminUser,
    Path(raw): Path<String>,
) -> Result<Json<OutboxReplayAnswer>, ApiError> {
    use crate::outbox::dead::Replayed;
    let id = outbox_dead_letter_id(&raw)?;
    let (outcome, outbox_id) = match crate::outbox::dead::replay(&state.db, id).await? {
        None => return Err(ApiError::not_found("no such outbox dead letter")),
        Some(Replayed::Queued(n)) => ("queued", n),
        Some(Replayed::AlreadyQueued(n)) => ("already_queued", n),
    };
    let mut conn = state.db.acquire().await?;
    admin::audit(
        &mut conn,
        claims.user_id(),
        "outbox_dead_letter.replay",
        &format!("outbox_dead_letter:{id}"),
        None,
        Some(json!({"outcome": outcome, "outboxID": outbox_id})),
    )
    .await?;
    Ok(Json(OutboxReplayAnswer {
        id,
        outcome,
        outbox_id,
    }))
}

fn user_id_param(raw: &str) -> Result<i32, ApiError> {
    raw.parse::<i32>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| ApiError::not_found("no such user"))
}

/// A user account: status (`active`, `disabled`, `deleted`) and when it changed.
#[utoipa::path(get, path = "/admin/users/{userID}", tag = "admin", security(("bearer" = [])),
    params(("userID" = i32, Path)), responses((status = 200, body = Account), (status = 404)))]
pub async fn get_user(
    State(state): State<AppState>,
    _admin: AdminUser,
    Path(raw): Path<String>,
) -> Result<Json<Account>, ApiError> {
    let id = user_id_param(&raw)?;
    let mut conn = state.db.acquire().await?;
    users::account_by_id(&mut conn, id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("no such user"))
}

/// A user's orders, newest first, by pages (a deleted user's included).
#[utoipa::path(get, path = "/admin/users/{userID}/orders", tag = "admin", security(("bearer" = [])),
    params(("userID" = i32, Path), PageParams), responses((status = 200, body = OrderPage), (status = 404), (status = 422)))]
pub async fn list_user_orders(
    State(state): State<AppState>,
    _admin: AdminUser,
    Path(raw): Path<String>,
    ApiQuery(p): ApiQuery<PageParams>,
) -> Result<Json<OrderPage>, ApiError> {
    let id = user_id_param(&raw)?;
    let mut conn = state.db.acquire().await?;
    if users::account_by_id(&mut conn, id).await?.is_none() {
        return Err(ApiError::not_found("no such user"));
    }
    drop(conn);
    page_of_orders(&state, id, p).await
}

async fn change_user(
    state: &AppState,
    actor: i32,
    raw: &str,
    action: LifecycleAction,
) -> Result<Json<Account>, ApiError> {
    let id = user_id_param(raw)?;
    if id == actor && action != LifecycleAction::Enable {
        return Err(ApiError::conflict(
            "own-account",
            "an admin cannot disable or delete their own account through the API (the command line can)",
        ));
    }
    let mut tx = state.db.begin().await?;
    match admin::change_account(&mut tx, actor, id, action).await? {
        LifecycleOutcome::NotFound => Err(ApiError::not_found("no such user")),
        LifecycleOutcome::Deleted(_) => Err(ApiError::conflict(
            "user-deleted",
            "the user is deleted; a deleted user cannot be enabled",
        )
        .with("accountStatus", "deleted")),
        LifecycleOutcome::Done { after, .. } => {
            tx.commit().await?;
            // At once on this instance (others learn it from the NOTIFY of the commit).
            match after.status {
                AccountStatus::Active => state.auth.revocations.forget_inactive_user(id),
                _ => state.auth.revocations.remember_inactive_user(id),
            }
            Ok(Json(after))
        }
    }
}

/// Disables a user: no login, and every refresh token and access token of theirs is refused at
/// once. Harmless to repeat; audited.
#[utoipa::path(post, path = "/admin/users/{userID}/disable", tag = "admin", security(("bearer" = [])),
    params(("userID" = i32, Path)), responses((status = 200, body = Account), (status = 404), (status = 409, description = "the caller's own account")))]
pub async fn disable_user(
    State(state): State<AppState>,
    AdminUser(claims): AdminUser,
    Path(raw): Path<String>,
) -> Result<Json<Account>, ApiError> {
    change_user(&state, claims.user_id(), &raw, LifecycleAction::Disable).await
}

/// Enables a disabled user (sessions revoked by disabling stay revoked). 409 for a deleted user.
#[utoipa::path(post, path = "/admin/users/{userID}/enable", tag = "admin", security(("bearer" = [])),
    params(("userID" = i32, Path)), responses((status = 200, body = Account), (status = 404), (status = 409, description = "the user is deleted")))]
pub async fn enable_user(
    State(state): State<AppState>,
    AdminUser(claims): AdminUser,
    Path(raw): Path<String>,
) -> Result<Json<Account>, ApiError> {
    change_user(&state, claims.user_id(), &raw, LifecycleAction::Enable).await
}

/// Deletes a user: disabled for good, every session revoked; the account and its orders stay
/// readable here. Harmless to repeat; audited.
#[utoipa::path(delete, path = "/admin/users/{userID}", tag = "admin", security(("bearer" = [])),
    params(("userID" = i32, Path)), responses((status = 200, body = Account), (status = 404), (status = 409, description = "the caller's own account")))]
pub async fn delete_user(
    State(state): State<AppState>,
    AdminUser(claims): AdminUser,
    Path(raw): Path<String>,
) -> Result<Json<Account>, ApiError> {
    change_user(&state, claims.user_id(), &raw, LifecycleAction::Delete).await
}
