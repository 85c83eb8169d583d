//! Orders SQL: the order view (one query with its lines), the caller's orders newest first with a
//! cursor, and the cancellation of an order with its saga.

use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::PgConnection;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::orders::OrderStatus;
use crate::saga::machine::{FailureClass, SagaState, money, rfc3339};

/// One line of an order as clients see it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct OrderItemView {
    /// Order item id (null while the order is pending and not yet priced).
    #[serde(rename = "orderItemID")]
    pub order_item_id: Option<i32>,
    /// Product.
    #[serde(rename = "productID")]
    pub product_id: i32,
    /// Quantity.
    pub quantity: i32,
    /// Unit price from the catalog, a decimal string with two places (null while pending).
    pub price: Option<String>,
}

/// An order as clients see it (the seed's body plus `currency` and `shipmentID`).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct OrderView {
    /// Order id.
    #[serde(rename = "orderID")]
    pub order_id: i32,
    /// Customer.
    #[serde(rename = "userID")]
    pub user_id: i32,
    /// When it was placed (RFC 3339).
    #[serde(rename = "orderDate")]
    pub order_date: String,
    /// Status.
    pub status: OrderStatus,
    /// Total, a decimal string with two places (null until priced).
    #[serde(rename = "totalAmount")]
    pub total_amount: Option<String>,
    /// ISO 4217 currency of the prices (null until priced).
    pub currency: Option<String>,
    /// The shipment (null until created).
    #[serde(rename = "shipmentID")]
    pub shipment_id: Option<String>,
    /// Why the order is cancelled or rejected, when it is.
    #[serde(rename = "statusReason", skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<String>,
    /// Lines.
    #[serde(rename = "orderItems")]
    pub order_items: Vec<OrderItemView>,
}

struct Row {
    order_id: i32,
    user_id: i32,
    order_date: OffsetDateTime,
    status: String,
    total_amount: Option<Decimal>,
    currency: Option<String>,
    shipment_id: Option<String>,
    status_reason: Option<String>,
    items: Value,
    input: Value,
}

fn to_view(r: Row) -> OrderView {
    let mut items: Vec<OrderItemView> = serde_json::from_value::<Vec<Value>>(r.items)
        .unwrap_or_default()
        .into_iter()
        .map(|v| OrderItemView {
            order_item_id: v["orderItemID"].as_i64().map(|x| x as i32),
            product_id: v["productID"].as_i64().unwrap_or(0) as i32,
            quantity: v["quantity"].as_i64().unwrap_or(0) as i32,
            price: v["price"].as_str().map(str::to_string),
        })
        .collect();
    if items.is_empty() {
        // Not priced yet: the requested lines.
        items = r.input["items"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|v| OrderItemView {
                        order_item_id: None,
                        product_id: v["productID"].as_i64().unwrap_or(0) as i32,
                        quantity: v["quantity"].as_i64().unwrap_or(0) as i32,
                        price: None,
                    })
                    .collect()
            })
            .unwrap_or_default();
    }
    OrderView {
        order_id: r.order_id,
        user_id: r.user_id,
        order_date: rfc3339(r.order_date),
        status: OrderStatus::parse(&r.status).unwrap_or(OrderStatus::Pending),
        total_amount: r.total_amount.map(money),
        currency: r.currency,
        shipment_id: r.shipment_id,
        status_reason: r.status_reason,
        order_items: items,
    }
}

/// The caller's order, or None when it does not exist or belongs to someone else.
pub async fn get(
    conn: &mut PgConnection,
    order_id: i32,
    user_id: i32,
) -> Result<Option<OrderView>, sqlx::Error> {
    let r = sqlx::query_as!(
        Row,
        r#"select o.order_id, o.user_id, o.order_date, o.status, o.total_amount, o.currency, o.shipment_id,
                  o.status_reason,
                  coalesce((select json_agg(json_build_object('orderItemID', i.order_item_id, 'productID', i.product_id,
                                                              'quantity', i.quantity, 'price', i.price::text)
                                            order by i.order_item_id)
                              from order_items i where i.order_id = o.order_id), '[]'::json)::jsonb as "items!",
                  s.input as "input!"
             from orders o join sagas s on s.saga_id = o.saga_id
            where o.order_id = $1 and o.user_id = $2"#,
        order_id,
        user_id
    )
    .fetch_optional(&mut *conn)
    .await?;
    Ok(r.map(to_view))
}

/// The caller's orders, newest first, after `before` (an order id from the previous page).
pub async fn list(
    conn: &mut PgConnection,
    user_id: i32,
    before: Option<i32>,
    limit: i64,
) -> Result<Vec<OrderView>, sqlx::Error> {
    let rows = sqlx::query_as!(
        Row,
        r#"select o.order_id, o.user_id, o.order_date, o.status, o.total_amount, o.currency, o.shipment_id,
                  o.status_reason,
                  coalesce((select json_agg(json_build_object('orderItemID', i.order_item_id, 'productID', i.product_id,
                                                              'quantity', i.quantity, 'price', i.price::text)
                                            order by i.order_item_id)
                              from order_items i where i.order_id = o.order_id), '[]'::json)::jsonb as "items!",
                  s.input as "input!"
             from orders o join sagas s on s.saga_id = o.saga_id
            where o.user_id = $1 and ($2::int is null or o.order_id < $2)
            order by o.order_id desc
            limit $3"#,
        user_id,
        before,
        limit
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().map(to_view).collect())
}

/// Result of a cancellation request.
#[derive(Debug)]
pub enum CancelOutcome {
    /// No such order for this user.
    NotFound,
    /// Cancelled now (or already); the saga compensates.
    Cancelled {
        /// The saga to wait for.
        saga_id: Uuid,
        /// It was already cancelled before this request.
        already: bool,
    },
    /// The order's shipment exists (its saga completed): the cancellation is stored as an intent and
    /// the saga compensates; the order is cancelled only once the shipper cancelled the shipment,
    /// and stays as it is if the shipper refuses (the parcel was picked up).
    Requested {
        /// The saga to wait for.
        saga_id: Uuid,
    },
    /// Too late: the order's status does not allow it.
    NotCancellable(OrderStatus),
    /// Too late: the shipper already refused to cancel the shipment (picked up).
    RefusedByShipper(OrderStatus),
}

struct CancelRow {
    status: String,
    user_id: i32,
    saga_id: Uuid,
    state: String,
    trace_context: Value,
    failure: Option<Value>,
    last_error_class: Option<String>,
}

/// Cancels an order before it ships. A pending order becomes `cancelled` at once and its saga
/// compensates at its next step boundary. A confirmed order (its saga completed, the shipment
/// exists) keeps its status: the cancellation is stored on the saga, which compensates from its
/// last step; the order is cancelled when the shipper has cancelled the shipment, and a shipper's
/// refusal returns the saga to `completed`. Idempotent.
pub async fn cancel(
    conn: &mut PgConnection,
    order_id: i32,
    user_id: Option<i32>,
    reason: &str,
    last_step: i32,
    topics: &crate::outbox::Topics,
) -> Result<CancelOutcome, sqlx::Error> {
    // One lock order everywhere: the saga's row, then its order's (the saga committer locks the
    // sagas of a shared commit, then writes their orders). Locking the order first, as a join
    // `for update of o, s` does, could deadlock with a commit of the same saga: PostgreSQL would
    // then abort one of the two (a 500 here, or a whole shared commit rolled back).
    let Some(saga_id) = sqlx::query_scalar::<_, Uuid>(
        "select saga_id from orders where order_id = $1 and ($2::int is null or user_id = $2)",
    )
    .bind(order_id)
    .bind(user_id)
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(CancelOutcome::NotFound);
    };
    let (state, trace_context, failure, last_error_class): (String, Value, Option<Value>, Option<String>) =
        sqlx::query_as(
            "select state, trace_context, failure, last_error_class from sagas where saga_id = $1 for update",
        )
        .bind(saga_id)
        .fetch_one(&mut *conn)
        .await?;
    let (status, owner): (String, i32) =
        sqlx::query_as("select status, user_id from orders where order_id = $1 for update")
            .bind(order_id)
            .fetch_one(&mut *conn)
            .await?;
    let row = CancelRow {
        status,
        user_id: owner,
        saga_id,
        state,
        trace_context,
        failure,
        last_error_class,
    };
    let status = OrderStatus::parse(&row.status).unwrap_or(OrderStatus::Pending);
    if status == OrderStatus::Cancelled {
        return Ok(CancelOutcome::Cancelled {
            saga_id: row.saga_id,
            already: true,
        });
    }
    if !status.is_cancellable() {
        return Ok(CancelOutcome::NotCancellable(status));
    }
    let intent_pending = row
        .failure
        .as_ref()
        .is_some_and(|f| f["class"] == FailureClass::Cancelled.as_str() && f["afterCompletion"] == true);
    match SagaState::parse(&row.state) {
        Some(SagaState::Running) => {
            sqlx::query!(
                r#"update sagas set cancel_requested = $2, updated_at = now(),
                          next_attempt_at = case when lease_expires_at is null or lease_expires_at < now()
                                                 then now() else next_attempt_at end
                    where saga_id = $1"#,
                row.saga_id,
                reason
            )
            .execute(&mut *conn)
            .await?;
        }
        Some(SagaState::Completed) => {
            if row.last_error_class.as_deref() == Some(FailureClass::CancelRefused.as_str()) {
                // The shipper refused a cancellation before: the parcel is on its way for good.
                return Ok(CancelOutcome::RefusedByShipper(status));
            }
            let failure = json!({"class": FailureClass::Cancelled, "detail": format!("cancelled: {reason}"),
                                 "step": "create_shipment", "afterCompletion": true});
            sqlx::query!(
                r#"update sagas set state = 'compensating', step = $2, attempt = 0, next_attempt_at = now(),
                          cancel_requested = $3, failure = $4, lease_owner = null, lease_expires_at = null,
                          finished_at = null, updated_at = now()
                    where saga_id = $1"#,
                row.saga_id,
                last_step,
                reason,
                failure
            )
            .execute(&mut *conn)
            .await?;
            wake_workers(conn).await?;
            return Ok(CancelOutcome::Requested { saga_id: row.saga_id });
        }
        // A cancellation of the completed saga is under way (or stuck, for ops): the order follows
        // when the shipment is cancelled.
        Some(SagaState::Compensating | SagaState::Stuck) if intent_pending => {
            return Ok(CancelOutcome::Requested { saga_id: row.saga_id });
        }
        // Already compensating (or finished compensating): the order just follows.
        _ => {}
    }
    crate::saga::store::set_order_status(
        conn,
        order_id,
        OrderStatus::Cancelled,
        Some(&format!("cancelled: {reason}")),
    )
    .await?;
    let stored: std::collections::HashMap<String, String> =
        serde_json::from_value(row.trace_context).unwrap_or_default();
    // The event is produced in the order's trace, linked to the cancelling request.
    let span = tracing::info_span!("order.cancel", otel.name = "cancel order", order.id = order_id);
    let trace = crate::telemetry::in_stored_trace(&span, &stored);
    crate::outbox::enqueue(
        conn,
        &[crate::outbox::NewEvent::new(
            &topics.order_events,
            "OrderCancelled",
            order_id,
            Some(row.saga_id),
            json!({"userID": row.user_id, "status": "cancelled", "previousStatus": status.as_str(), "reason": format!("cancelled: {reason}")}),
            &trace,
        )],
    )
    .await?;
    wake_workers(conn).await?;
    Ok(CancelOutcome::Cancelled {
        saga_id: row.saga_id,
        already: false,
    })
}

/// The state of an order's saga (after a cancellation's wait: `completed` again means the shipper
/// refused it).
pub async fn saga_state(conn: &mut PgConnection, saga_id: Uuid) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("select state from sagas where saga_id = $1")
        .bind(saga_id)
        .fetch_optional(&mut *conn)
        .await
}

/// What a saga's row says for an idempotent replay.
#[derive(Debug)]
pub struct ReplayState {
    /// The stored answer, once finished.
    pub answer: Option<Value>,
    /// The first request answered 202.
    pub answered_pending: bool,
    /// The order.
    pub order_id: i32,
}

/// Reads what a replay needs.
pub async fn replay_state(
    conn: &mut PgConnection,
    saga_id: Uuid,
) -> Result<Option<ReplayState>, sqlx::Error> {
    let r = sqlx::query!(
        "select answer, answered_pending, order_id from sagas where saga_id = $1",
        saga_id
    )
    .fetch_optional(&mut *conn)
    .await?;
    Ok(r.map(|r| ReplayState {
        answer: r.answer,
        answered_pending: r.answered_pending,
        order_id: r.order_id,
    }))
}

/// Records that the creating request answers 202, if the saga has not finished with an answer;
/// returns false when it has (the caller then answers the outcome instead).
pub async fn mark_answered_pending(conn: &mut PgConnection, saga_id: Uuid) -> Result<bool, sqlx::Error> {
    let r = sqlx::query!(
        "update sagas set answered_pending = true where saga_id = $1 and answer is null",
        saga_id
    )
    .execute(&mut *conn)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Tells the saga workers that a saga is due now.
async fn wake_workers(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("select pg_notify($1, $2)")
        .bind(crate::wake::CHANNEL)
        .bind(crate::wake::Wake::Due.payload())
        .execute(&mut *conn)
        .await?;
    Ok(())
}
