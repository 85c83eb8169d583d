//! The SQL of the `orders` and `order_items` tables (their one owner): the order view (one query
//! with its lines), the caller's orders newest first with a cursor, and the writes of the saga's
//! order steps and of a cancellation (in the caller's transaction), and CreateOrder's one-statement
//! new-saga insert ([`CREATE_ORDER_SAGA_SQL`]).

use std::collections::HashMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgConnection;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::orders::OrderStatus;
use crate::saga::machine::{money, rfc3339};

/// A persisted order line (with its id and catalog price).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PersistedItem {
    /// Order item id.
    #[serde(rename = "orderItemID")]
    pub order_item_id: i32,
    /// Product.
    #[serde(rename = "productID")]
    pub product_id: i32,
    /// Quantity.
    pub quantity: i32,
    /// Unit price from the catalog.
    pub price: Decimal,
}

/// CreateOrder's new sagas: for each, the idempotency record, the placeholder order (`pending`)
/// and the saga, in one statement for every new saga of a shared commit; a saga whose key exists
/// writes nothing and is missing from the result (binds and result: `saga::store::CREATE_SQL`'s;
/// the saga store runs it through CreateOrder's hooks). Unit of work: it writes
/// `idempotency_keys`, `orders` and `sagas` together (docs/performance.md, findings 9 and 18);
/// this store owns it because the order row is the reason for it, although `sagas` is the saga
/// store's table.
pub const CREATE_ORDER_SAGA_SQL: &str = r#"with n as (
               select * from unnest($1::int[], $2::text[], $3::bytea[], $4::uuid[], $7::text[], $9::jsonb[],
                                    $10::jsonb[])
                   as n(user_id, key, hash, saga_id, worker, input, trace)),
           k as (
               insert into idempotency_keys (user_id, key, request_hash, saga_id, order_id)
               select user_id, key, hash, saga_id, nextval('orders_order_id_seq')::int from n
               on conflict (user_id, key) do nothing
               returning saga_id, order_id),
           o as (
               insert into orders (order_id, user_id, status, saga_id)
               select k.order_id, n.user_id, 'pending', k.saga_id from k join n using (saga_id)
               returning saga_id, order_id, order_date),
           s as (
               insert into sagas (saga_id, saga_type, definition_version, order_id, user_id, state, step, attempt,
                                  next_attempt_at, lease_owner, lease_expires_at, fence, input, trace_context,
                                  deadline_at, created_at, step_name)
               select o.saga_id, $5, $6, o.order_id, n.user_id, 'running', 0, 0, o.order_date, n.worker,
                      case when n.worker is not null then now() + $8 end, 1, n.input, n.trace,
                      o.order_date + $11, o.order_date, $12
                 from o join n using (saga_id))
           select saga_id, order_id, order_date, order_date + $11 as deadline_at from o"#;

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

#[derive(sqlx::FromRow)]
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

/// An order as the API shows it: its row, its lines (as JSON, in id order) and its saga's input
/// (the requested lines, shown until the order is priced). Followed by each reader's `where`.
macro_rules! order_view_select {
    () => {
        r#"select o.order_id, o.user_id, o.order_date, o.status, o.total_amount, o.currency, o.shipment_id,
                  o.status_reason,
                  coalesce((select json_agg(json_build_object('orderItemID', i.order_item_id, 'productID', i.product_id,
                                                              'quantity', i.quantity, 'price', i.price::text)
                                            order by i.order_item_id)
                              from order_items i where i.order_id = o.order_id), '[]'::json)::jsonb as items,
                  s.input
             from orders o join sagas s on s.saga_id = o.saga_id"#
    };
}

/// The caller's order, or None when it does not exist or belongs to someone else.
pub async fn get(
    conn: &mut PgConnection,
    order_id: i32,
    user_id: i32,
) -> Result<Option<OrderView>, sqlx::Error> {
    let r: Option<Row> = sqlx::query_as(concat!(
        order_view_select!(),
        " where o.order_id = $1 and o.user_id = $2"
    ))
    .bind(order_id)
    .bind(user_id)
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
    let rows: Vec<Row> = sqlx::query_as(concat!(
        order_view_select!(),
        " where o.user_id = $1 and ($2::int is null or o.order_id < $2) order by o.order_id desc limit $3"
    ))
    .bind(user_id)
    .bind(before)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().map(to_view).collect())
}

/// The saga of an order (the caller's when `user_id` is given).
pub async fn saga_of(
    conn: &mut PgConnection,
    order_id: i32,
    user_id: Option<i32>,
) -> Result<Option<Uuid>, sqlx::Error> {
    sqlx::query_scalar("select saga_id from orders where order_id = $1 and ($2::int is null or user_id = $2)")
        .bind(order_id)
        .bind(user_id)
        .fetch_optional(&mut *conn)
        .await
}

/// Locks an order's row; returns its status and owner.
pub async fn lock(conn: &mut PgConnection, order_id: i32) -> Result<(OrderStatus, i32), sqlx::Error> {
    let (status, owner): (String, i32) =
        sqlx::query_as("select status, user_id from orders where order_id = $1 for update")
            .bind(order_id)
            .fetch_one(&mut *conn)
            .await?;
    Ok((OrderStatus::parse(&status).unwrap_or(OrderStatus::Pending), owner))
}

/// Largest total an order can hold (NUMERIC(10,2)).
pub fn max_total() -> Decimal {
    Decimal::new(9_999_999_999, 2)
}

// The statements of the saga's write path on this module's tables, one definition each: the
// functions below run them, and the benchmark (`ostore-tools bench`) renders them into the pgbench
// script of the PostgreSQL ceiling.

/// The priced lines and totals of a shared commit's orders in one call (`insert_lines_many`, the
/// `persist_order` step): $1–$4 the lines (order, product, quantity, price), $5–$7 the orders
/// (order, total, currency). The function (migration 0017) locks the order rows in key order first,
/// as every writer of `orders` does, and looks rows up by key only.
pub const PERSIST_ORDER_SQL: &str = "select item_id, item_order, item_product, item_quantity, item_price
                                       from order_persist_many($1::int[], $2::int[], $3::int[], $4::numeric[],
                                                               $5::int[], $6::numeric[], $7::text[])";
/// The shipments on their orders, and `pending` → `confirmed` (`confirm_many`): $1 the orders,
/// $2 their shipments; returns each order with whether it was pending. The function (migration
/// 0017) locks the rows in key order first, as every writer of `orders` does, and looks rows up by
/// key only.
pub const CONFIRM_ORDER_SQL: &str =
    "select confirmed_order, was_pending from order_confirm_many($1::int[], $2::text[])";

/// One order's priced lines (product, quantity, unit price), its total and currency, as the
/// `persist_order` step writes them.
#[derive(Debug, Clone)]
pub struct PricedOrder {
    /// The order.
    pub order_id: i32,
    /// Its lines: product, quantity, unit price.
    pub lines: Vec<(i32, i32, Decimal)>,
    /// Their total.
    pub total: Decimal,
    /// The prices' currency.
    pub currency: String,
}

/// Writes the priced lines and totals of `orders` (the `persist_order` step of every saga in a
/// shared commit) in the caller's transaction, in one statement; returns each order's lines with
/// their ids, in id order.
pub async fn insert_lines_many(
    conn: &mut PgConnection,
    orders: &[PricedOrder],
) -> Result<HashMap<i32, Vec<PersistedItem>>, sqlx::Error> {
    if orders.is_empty() {
        return Ok(HashMap::new());
    }
    let lines = orders
        .iter()
        .flat_map(|o| o.lines.iter().map(move |l| (o.order_id, l)));
    let (line_orders, products, quantities, prices) = lines.fold(
        (Vec::new(), Vec::new(), Vec::new(), Vec::new()),
        |(mut o, mut p, mut q, mut c), (id, &(product, quantity, price))| {
            o.push(id);
            p.push(product);
            q.push(quantity);
            c.push(price);
            (o, p, q, c)
        },
    );
    let rows: Vec<(i32, i32, i32, i32, Decimal)> = sqlx::query_as(PERSIST_ORDER_SQL)
        .bind(&line_orders)
        .bind(&products)
        .bind(&quantities)
        .bind(&prices)
        .bind(orders.iter().map(|o| o.order_id).collect::<Vec<_>>())
        .bind(orders.iter().map(|o| o.total).collect::<Vec<_>>())
        .bind(orders.iter().map(|o| o.currency.as_str()).collect::<Vec<_>>())
        .fetch_all(&mut *conn)
        .await?;
    let mut out: HashMap<i32, Vec<PersistedItem>> = orders.iter().map(|o| (o.order_id, Vec::new())).collect();
    for (order_item_id, order_id, product_id, quantity, price) in rows {
        out.entry(order_id).or_default().push(PersistedItem {
            order_item_id,
            product_id,
            quantity,
            price,
        });
    }
    for items in out.values_mut() {
        items.sort_by_key(|i| i.order_item_id);
    }
    Ok(out)
}

/// Moves an order to `to` if the transition table allows it from its current status; returns
/// whether it moved.
pub async fn set_status(
    conn: &mut PgConnection,
    order_id: i32,
    to: OrderStatus,
    reason: Option<&str>,
) -> Result<bool, sqlx::Error> {
    let from: Vec<String> = OrderStatus::ALL
        .into_iter()
        .filter(|s| s.can_move_to(to))
        .map(|s| s.as_str().to_string())
        .collect();
    let r = sqlx::query!(
        "update orders set status = $2, status_reason = coalesce($3, status_reason) where order_id = $1 and status = any($4)",
        order_id,
        to.as_str(),
        reason,
        &from
    )
    .execute(&mut *conn)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Stores the shipment of each order and confirms it (`orders[i]` gets `shipments[i]`), in one
/// statement; returns, by order, whether it was confirmed now. Only an order really going from
/// pending to confirmed changes: a customer who cancelled while the shipment was being created
/// keeps a cancelled order, and no OrderConfirmed may follow its OrderCancelled.
pub async fn confirm_many(
    conn: &mut PgConnection,
    orders: &[i32],
    shipments: &[&str],
) -> Result<HashMap<i32, bool>, sqlx::Error> {
    let rows: Vec<(i32, bool)> = sqlx::query_as(CONFIRM_ORDER_SQL)
        .bind(orders)
        .bind(shipments)
        .fetch_all(&mut *conn)
        .await?;
    Ok(rows.into_iter().collect())
}

/// Removes the placeholder of an order that was never placed (still `pending`).
pub async fn delete_placeholder(conn: &mut PgConnection, order_id: i32) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "delete from orders where order_id = $1 and status = 'pending'",
        order_id
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}
