//! `POST /orders`, `GET /orders/{orderID}`, `GET /orders`, `POST /orders/{orderID}/cancel`.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};

use crate::api::AppState;
use crate::api::extract::{ApiJson, ApiQuery, AuthUser};
use crate::error::ApiError;
use crate::orders::OrderStatus;
use crate::orders::answer::Answer;
use crate::orders::cancel::{CancelOutcome, cancel};
use crate::orders::place::{Placed, place};
use crate::orders::store::{self, OrderView};
use crate::orders::validate::{CreateOrderBody, idempotency_key_is_valid, validate_lines};
use crate::saga::machine::SagaState;
use crate::saga::store as saga_store;

/// The header that makes `POST /orders` safe to retry.
pub const IDEMPOTENCY_KEY: &str = "Idempotency-Key";

/// One page of orders.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrderPage {
    /// Orders, newest first.
    pub items: Vec<OrderView>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// Paging parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct PageParams {
    /// 1–100 (default 20).
    pub limit: Option<String>,
    /// From the previous page's `nextCursor`.
    pub cursor: Option<String>,
}

fn location(order_id: i32) -> HeaderValue {
    HeaderValue::from_str(&format!("/orders/{order_id}")).expect("ascii")
}

/// The response to a finished saga's answer: 201 with the order, or its problem.
fn answer_response(a: Answer) -> Result<Response, ApiError> {
    match a {
        Answer::Created(body) => {
            let id = body["orderID"].as_i64().unwrap_or(0) as i32;
            Ok((
                StatusCode::CREATED,
                [(header::LOCATION, location(id))],
                Json(body),
            )
                .into_response())
        }
        Answer::InsufficientStock { unavailable } => Err(ApiError::new(
            StatusCode::CONFLICT,
            "insufficient-stock",
            "Conflict",
            crate::orders::answer::STOCK_DETAIL,
        )
        .with("unavailable", json!(unavailable))),
        Answer::TotalTooLarge { detail } => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            "Invalid request",
            detail,
        )
        .with("field", "totalAmount")),
        Answer::Cancelled { detail, order_id } => {
            Err(
                ApiError::new(StatusCode::CONFLICT, "order-cancelled", "Conflict", detail)
                    .with("orderID", order_id)
                    .with("orderStatus", OrderStatus::Cancelled.as_str()),
            )
        }
    }
}

/// Places an order. Waits for the saga up to `ORDER_WAIT_MS`: 201 when it completed, 409 when stock
/// was refused (each unavailable product listed) or the order was compensated, 202 while it is still
/// running. A repeated `Idempotency-Key` replays the first answer.
#[utoipa::path(post, path = "/orders", tag = "orders", request_body = CreateOrderBody, security(("bearer" = [])),
    params(("Idempotency-Key" = String, Header, description = "required; 1–255 visible ASCII characters")),
    responses((status = 201, body = OrderView, description = "completed"), (status = 202, description = "still running; poll Location"),
              (status = 400, description = "missing Idempotency-Key"), (status = 403, description = "userID is not the caller"),
              (status = 409, description = "stock refused (`unavailable`), order cancelled (`orderID`), or the key's first request is in flight"),
              (status = 422, description = "invalid body or key reused with another body; `field` names it"), (status = 429)))]
pub async fn create_order(
    State(state): State<AppState>,
    user: AuthUser,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CreateOrderBody>,
) -> Result<Response, ApiError> {
    let key = headers
        .get(IDEMPOTENCY_KEY)
        .ok_or_else(|| {
            ApiError::bad_request("the Idempotency-Key header is required").with("header", IDEMPOTENCY_KEY)
        })?
        .to_str()
        .ok()
        .filter(|k| idempotency_key_is_valid(k))
        .ok_or_else(|| {
            ApiError::bad_request("the Idempotency-Key header must be 1–255 visible ASCII characters")
                .with("header", IDEMPOTENCY_KEY)
        })?
        .to_string();
    let lines = validate_lines(&body).map_err(|i| ApiError::invalid_field(&i.field, i.detail))?;
    if let Some(uid) = body.user_id
        && uid != i64::from(user.user_id())
    {
        return Err(ApiError::forbidden("userID must be the caller's own id"));
    }
    if let Err(wait) = state.order_limiter.check(user.user_id()) {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        return Err(ApiError::too_many_requests(
            secs,
            "too many orders; try again later",
        ));
    }
    let trace = crate::telemetry::context_headers(&tracing::Span::current());
    let placed = place(
        &state.engine,
        &state.db,
        user.user_id(),
        &key,
        lines,
        trace,
        state.config.order_wait(),
    )
    .await?;
    match placed {
        Placed::Answer(a) => answer_response(a),
        Placed::Pending(order_id) => {
            let mut conn = state.db.acquire().await?;
            let view = store::get(&mut conn, order_id, user.user_id()).await?;
            let body = match view {
                Some(v) => serde_json::to_value(accepted(v)).unwrap_or(json!({})),
                None => json!({"orderID": order_id, "status": "pending"}),
            };
            Ok((
                StatusCode::ACCEPTED,
                [(header::LOCATION, location(order_id))],
                Json(body),
            )
                .into_response())
        }
        Placed::InFlight => Err(ApiError::conflict(
            "request-in-flight",
            "a request with this Idempotency-Key is still being processed; retry shortly",
        )
        .header(header::RETRY_AFTER, HeaderValue::from_static("1"))),
        Placed::KeyReused => Err(ApiError::invalid_field(
            IDEMPOTENCY_KEY,
            "this Idempotency-Key was already used with a different request body",
        )),
    }
}

/// The body of a 202: the order as it was accepted (its id, customer, date and lines as asked
/// for), `pending`; what the saga settles later (prices, total, shipment, outcome) is left out, so
/// the first answer and every replay of its Idempotency-Key are the same whatever happened since.
/// GET `Location` shows the order as it is.
fn accepted(mut v: OrderView) -> OrderView {
    v.status = OrderStatus::Pending;
    v.total_amount = None;
    v.currency = None;
    v.shipment_id = None;
    v.status_reason = None;
    for item in &mut v.order_items {
        item.order_item_id = None;
        item.price = None;
    }
    v
}

fn parse_order_id(raw: &str) -> Option<i32> {
    raw.parse::<i32>().ok().filter(|id| *id > 0)
}

/// One of the caller's orders (another user's order is 404, the same as a missing one).
#[utoipa::path(get, path = "/orders/{orderID}", tag = "orders", security(("bearer" = [])),
    params(("orderID" = i32, Path)), responses((status = 200, body = OrderView), (status = 404)))]
pub async fn get_order(
    State(state): State<AppState>,
    user: AuthUser,
    Path(raw): Path<String>,
) -> Result<Json<OrderView>, ApiError> {
    let not_found = || ApiError::not_found("no such order");
    let id = parse_order_id(&raw).ok_or_else(not_found)?;
    let mut conn = state.db.acquire().await?;
    store::get(&mut conn, id, user.user_id())
        .await?
        .map(Json)
        .ok_or_else(not_found)
}

fn decode_cursor(c: &str) -> Option<i32> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(c).ok()?;
    let s = String::from_utf8(bytes).ok()?;
    s.strip_prefix("o:")?.parse::<i32>().ok().filter(|v| *v > 0)
}

fn encode_cursor(order_id: i32) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("o:{order_id}"))
}

/// The caller's orders, newest first, by pages.
#[utoipa::path(get, path = "/orders", tag = "orders", security(("bearer" = [])), params(PageParams),
    responses((status = 200, body = OrderPage), (status = 422, description = "bad limit or cursor")))]
pub async fn list_orders(
    State(state): State<AppState>,
    user: AuthUser,
    ApiQuery(p): ApiQuery<PageParams>,
) -> Result<Json<OrderPage>, ApiError> {
    page_of_orders(&state, user.user_id(), p).await
}

/// One page of a user's orders, newest first (the caller's own, or any user's for the admin API).
pub(crate) async fn page_of_orders(
    state: &AppState,
    user_id: i32,
    p: PageParams,
) -> Result<Json<OrderPage>, ApiError> {
    let limit = match p.limit.as_deref() {
        None => 20,
        Some(s) => s
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=100).contains(l))
            .ok_or_else(|| ApiError::invalid_field("limit", "limit must be an integer from 1 to 100"))?,
    };
    let before = match p.cursor.as_deref() {
        None | Some("") => None,
        Some(c) => Some(
            decode_cursor(c)
                .ok_or_else(|| ApiError::invalid_field("cursor", "cursor is not one this API issued"))?,
        ),
    };
    let mut conn = state.db.acquire().await?;
    let mut items = store::list(&mut conn, user_id, before, limit + 1).await?;
    let next_cursor = if items.len() as i64 > limit {
        items.truncate(limit as usize);
        items.last().map(|o| encode_cursor(o.order_id))
    } else {
        None
    };
    Ok(Json(OrderPage { items, next_cursor }))
}

/// Cancels an order before it ships. A pending order is cancelled at once (200). A confirmed one
/// (its shipment exists) is cancelled once the shipper has cancelled the shipment: the request waits
/// up to `ORDER_WAIT_MS` and answers 200 with the cancelled order, 409 when the shipper refused
/// (the parcel was picked up; `orderStatus` is the order's status, which stays as it is), or 202
/// with the order (not cancelled yet) while the shipper has not answered: poll `Location`.
/// Repeating it answers the same. 409 once shipped.
#[utoipa::path(post, path = "/orders/{orderID}/cancel", tag = "orders", security(("bearer" = [])),
    params(("orderID" = i32, Path)),
    responses((status = 200, body = OrderView, description = "cancelled"),
              (status = 202, body = OrderView, description = "the cancellation is under way; poll Location"),
              (status = 404),
              (status = 409, description = "too late (shipped, or the shipper refused to cancel the shipment); `orderStatus` says why")))]
pub async fn cancel_order(
    State(state): State<AppState>,
    user: AuthUser,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let not_found = || ApiError::not_found("no such order");
    let id = parse_order_id(&raw).ok_or_else(not_found)?;
    let last_step = state.engine.definition().steps.len() as i32 - 1;
    let mut tx = state.db.begin().await?;
    let outcome = cancel(
        &mut tx,
        id,
        Some(user.user_id()),
        "by the customer",
        last_step,
        &state.config.topics,
    )
    .await?;
    let waiter = match &outcome {
        CancelOutcome::Cancelled {
            saga_id,
            already: false,
        }
        | CancelOutcome::Requested { saga_id } => Some((*saga_id, state.engine.waiter(*saga_id))),
        _ => None,
    };
    tx.commit().await?;
    let requested = match outcome {
        CancelOutcome::NotFound => return Err(not_found()),
        CancelOutcome::NotCancellable(status) => return Err(not_cancellable(status)),
        CancelOutcome::RefusedByShipper(status) => return Err(refused_by_shipper(status)),
        CancelOutcome::Cancelled { .. } => None,
        CancelOutcome::Requested { saga_id } => Some(saga_id),
    };
    if let Some((saga_id, rx)) = waiter {
        let mut conn = state.db.acquire().await?;
        // A stuck saga (a repeated request) will not finish by itself: no point waiting.
        let waits = saga_store::state(&mut conn, saga_id)
            .await?
            .is_some_and(|s| !s.is_finished());
        drop(conn);
        if waits {
            state.engine.nudge();
            // Give the compensations a chance to finish before answering; they continue regardless.
            let _ = tokio::time::timeout(state.config.order_wait(), rx).await;
        }
        state.engine.forget_waiters(saga_id);
    }
    let mut conn = state.db.acquire().await?;
    let view = store::get(&mut conn, id, user.user_id())
        .await?
        .ok_or_else(not_found)?;
    let Some(saga_id) = requested else {
        return Ok(Json(view).into_response());
    };
    if view.status == OrderStatus::Cancelled {
        return Ok(Json(view).into_response());
    }
    if saga_store::state(&mut conn, saga_id).await? == Some(SagaState::Completed) {
        // The saga went back to `completed`: the shipper refused (the parcel was picked up).
        return Err(refused_by_shipper(view.status));
    }
    if !view.status.is_cancellable() {
        return Err(not_cancellable(view.status));
    }
    Ok((
        StatusCode::ACCEPTED,
        [
            (header::LOCATION, location(id)),
            (header::RETRY_AFTER, HeaderValue::from_static("1")),
        ],
        Json(view),
    )
        .into_response())
}

fn not_cancellable(status: OrderStatus) -> ApiError {
    ApiError::conflict(
        "not-cancellable",
        format!("the order is {status} and can no longer be cancelled"),
    )
    .with("orderStatus", status.as_str())
}

fn refused_by_shipper(status: OrderStatus) -> ApiError {
    ApiError::conflict(
        "not-cancellable",
        "the shipper has already picked the order up; it can no longer be cancelled",
    )
    .with("orderStatus", status.as_str())
}
