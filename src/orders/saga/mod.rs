//! The CreateOrder saga, the engine's one saga type that places orders: its steps (`steps/`, one
//! file each), the shapes of its JSON in the saga row (its input [`lines`], its data
//! [`CreateOrderData`], its step outputs [`Output`], its order changes [`OrderChange`]), and its
//! hooks: what the engine writes for it besides the saga's own row and saga events. The engine
//! knows none of this: the dependency runs one way, orders → saga.
//!
//! Its steps' outputs land in [`CreateOrderData`]; a completed saga confirms the order
//! (`OrderConfirmed`, 201 answer); a compensated one cancels or rejects it (or removes the
//! placeholder of an order never placed) and answers with the matching problem; a shipper that
//! will not cancel a picked-up parcel ends a customer's cancellation of a completed saga.

#[cfg(test)]
mod machine_tests;
pub mod steps;

use futures::future::BoxFuture;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::PgConnection;

use crate::downstream::contract::{Reservation, Shipment, Unavailable};
use crate::orders::OrderStatus;
use crate::orders::answer::Answer;
use crate::orders::store as order_store;
use crate::orders::store::PersistedItem;
use crate::orders::validate::Line;
use crate::saga::failure::Downstream;
use crate::saga::machine::{
    Attempt, Effect, Failure, FailureClass, HookEffect, Kind, Outcome, Saga, SagaHooks, money, order_event,
    rfc3339,
};

/// What CreateOrder's steps produced so far: `sagas.data` of a CreateOrder saga (its field names
/// are the stored JSON's, read by operators, the admin API and the console: never renamed).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CreateOrderData {
    /// The catalog's reservation (reserve_inventory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservation: Option<Reservation>,
    /// The persisted lines (persist_order).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items: Option<Vec<PersistedItem>>,
    /// Order total (persist_order).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<Decimal>,
    /// Currency of the prices (persist_order).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    /// The created shipment (create_shipment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shipment: Option<Shipment>,
}

impl CreateOrderData {
    /// The data of a CreateOrder saga (empty when the row holds something else: a step then
    /// finds what it needs missing and fails as inconsistent).
    pub fn of(s: &Saga) -> CreateOrderData {
        CreateOrderData::deserialize(&s.data).unwrap_or_else(|e| {
            tracing::warn!(saga.id = %s.id, error = %e, "unreadable CreateOrder saga data");
            CreateOrderData::default()
        })
    }

    /// As stored in `sagas.data`.
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or_else(|_| json!({}))
    }
}

/// The order of a CreateOrder saga (its new-saga insert always names one; a row without is
/// unreadable as CreateOrder's).
pub fn order_id(s: &Saga) -> Result<i32, sqlx::Error> {
    s.order_id
        .ok_or_else(|| sqlx::Error::Decode(format!("saga {} names no order", s.id).into()))
}

/// The input of a CreateOrder saga as stored in `sagas.input`.
pub fn input(lines: &[Line]) -> Value {
    json!({"items": lines})
}

/// The requested lines of a CreateOrder saga (its `input`).
pub fn lines(s: &Saga) -> Vec<Line> {
    Vec::<Line>::deserialize(&s.input["items"]).unwrap_or_else(|e| {
        tracing::warn!(saga.id = %s.id, error = %e, "unreadable CreateOrder saga input");
        Vec::new()
    })
}

/// What a CreateOrder step produced (the JSON of `Outcome::Succeeded`; never stored, so its shape
/// is free). A compensation with nothing to keep succeeds with `Value::Null`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Output {
    /// reserve_inventory.
    Reservation(Reservation),
    /// persist_order.
    Persisted {
        /// Lines with ids and prices.
        items: Vec<PersistedItem>,
        /// Total.
        total: Decimal,
        /// Currency.
        currency: String,
    },
    /// create_shipment.
    Shipment(Shipment),
    /// cancel_order: whether the order's status changed (false when it already was cancelled).
    OrderCancelled(bool),
}

impl From<Output> for Value {
    fn from(o: Output) -> Value {
        serde_json::to_value(o).unwrap_or(Value::Null)
    }
}

impl Output {
    /// The output in a step's outcome (None for `Value::Null` or anything else).
    pub fn of(v: &Value) -> Option<Output> {
        Output::deserialize(v).ok()
    }
}

/// A change to the order row that a transition makes (the JSON of `Effect::Hook`, applied by
/// [`CreateOrder`]'s `apply_many` with the orders store's SQL in the shared commit's transaction).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OrderChange {
    /// Move to a status (only if the transition table allows it).
    Status {
        /// Target status.
        to: OrderStatus,
        /// Why.
        reason: Option<String>,
    },
    /// The shipment exists: store its id and confirm the order.
    Confirm {
        /// Shipment id.
        shipment_id: String,
    },
    /// No order was placed after all (a stock refusal answered synchronously): remove the
    /// placeholder row.
    Delete,
}

impl OrderChange {
    /// The engine's effect for it.
    pub fn effect(self) -> Effect {
        Effect::Hook(serde_json::to_value(self).unwrap_or(Value::Null))
    }
}

/// The CreateOrder saga's hooks.
#[derive(Debug, Clone, Copy, Default)]
pub struct CreateOrder;

impl SagaHooks for CreateOrder {
    fn create_sql(&self) -> Option<&'static str> {
        Some(order_store::CREATE_ORDER_SAGA_SQL)
    }

    fn started(&self, s: &Saga, fx: &mut Vec<Effect>) {
        let items = json!(lines(s));
        fx.push(order_event(
            "OrderCreated",
            json!({"userID": s.user_id, "status": "pending", "orderItems": items}),
        ));
    }

    fn keep_output(&self, s: &mut Saga, out: &Value) {
        let Some(out) = Output::of(out) else { return };
        let mut d = CreateOrderData::of(s);
        match out {
            Output::Reservation(r) => d.reservation = Some(r),
            Output::Persisted {
                items,
                total,
                currency,
            } => {
                d.items = Some(items);
                d.total = Some(total);
                d.currency = Some(currency);
            }
            Output::Shipment(sh) => d.shipment = Some(sh),
            Output::OrderCancelled(_) => return,
        }
        s.data = d.to_value();
    }

    fn compensated(&self, s: &Saga, out: &Value, fx: &mut Vec<Effect>) {
        if Output::of(out) == Some(Output::OrderCancelled(true)) {
            let mut data = order_data(s, OrderStatus::Cancelled);
            data["reason"] = json!(s.failure.as_ref().map(customer_text));
            fx.push(order_event("OrderCancelled", data));
        }
    }

    fn completed(&self, s: &Saga, fx: &mut Vec<Effect>) -> Option<Value> {
        let shipment_id = CreateOrderData::of(s)
            .shipment
            .map(|x| x.shipment_id)
            .unwrap_or_default();
        fx.push(OrderChange::Confirm { shipment_id }.effect());
        let body = order_data(s, OrderStatus::Confirmed);
        fx.push(order_event("OrderConfirmed", body.clone()));
        Some(Answer::Created(body).to_stored())
    }

    fn compensation_finished(&self, s: &Saga, failure: &Failure, fx: &mut Vec<Effect>) -> Option<Value> {
        let persisted = CreateOrderData::of(s).items.is_some();
        let stock = failure.class == FailureClass::InsufficientStock;
        let no_order_placed =
            !persisted && !s.answered_pending && (stock || failure.class == FailureClass::TotalOverflow);
        let answer = match failure.class {
            FailureClass::InsufficientStock => Answer::InsufficientStock {
                unavailable: failure
                    .refusal
                    .as_ref()
                    .and_then(|v| Vec::<Unavailable>::deserialize(v).ok())
                    .unwrap_or_default(),
            },
            FailureClass::TotalOverflow => Answer::TotalTooLarge {
                detail: failure.detail.clone(),
            },
            _ => Answer::Cancelled {
                detail: customer_text(failure),
                // Always set for CreateOrder (see `order_id`).
                order_id: s.order_id.unwrap_or_default(),
            },
        };
        if no_order_placed {
            fx.push(OrderChange::Delete.effect());
        } else if !persisted {
            // persist_order never ran, so cancel_order did not either: settle the order here.
            let to = if stock {
                OrderStatus::Rejected
            } else {
                OrderStatus::Cancelled
            };
            fx.push(
                OrderChange::Status {
                    to,
                    reason: Some(customer_text(failure)),
                }
                .effect(),
            );
            let ev = if to == OrderStatus::Rejected {
                "OrderRejected"
            } else {
                "OrderCancelled"
            };
            let mut data = order_data(s, to);
            data["reason"] = json!(customer_text(failure));
            fx.push(order_event(ev, data));
        }
        Some(answer.to_stored())
    }

    fn apply_many<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        effects: &'a [HookEffect],
    ) -> BoxFuture<'a, Result<Vec<bool>, sqlx::Error>> {
        Box::pin(async move {
            // The order's rows are the orders store's: it writes them in the engine's transaction,
            // the confirmations of the whole commit in one statement, the rarer changes one by one.
            let mut changed = vec![false; effects.len()];
            let mut confirms: Vec<(usize, i32, String)> = Vec::new();
            for (i, e) in effects.iter().enumerate() {
                let change = OrderChange::deserialize(&e.effect).map_err(|err| {
                    sqlx::Error::Decode(
                        format!("saga {}: order change {}: {err}", e.saga_id, e.effect).into(),
                    )
                })?;
                let order = e.order_id.ok_or_else(|| {
                    sqlx::Error::Decode(format!("saga {} names no order", e.saga_id).into())
                })?;
                changed[i] = match change {
                    OrderChange::Status { to, reason } => {
                        order_store::set_status(conn, order, to, reason.as_deref()).await?
                    }
                    OrderChange::Confirm { shipment_id } => {
                        confirms.push((i, order, shipment_id));
                        continue;
                    }
                    OrderChange::Delete => {
                        order_store::delete_placeholder(conn, order).await?;
                        false
                    }
                };
            }
            if !confirms.is_empty() {
                let orders: Vec<i32> = confirms.iter().map(|c| c.1).collect();
                let shipments: Vec<&str> = confirms.iter().map(|c| c.2.as_str()).collect();
                let confirmed = order_store::confirm_many(conn, &orders, &shipments).await?;
                for (i, order, _) in &confirms {
                    changed[*i] = confirmed.get(order).copied().unwrap_or(false);
                }
            }
            Ok(changed)
        })
    }

    fn refuses_cancellation(&self, s: &Saga, a: &Attempt, last_step: bool) -> bool {
        // The shipper will not cancel the shipment (409: the parcel was picked up) of a saga the
        // customer cancelled after it completed.
        a.kind == Kind::Compensation
            && matches!(
                a.outcome,
                Outcome::Refused {
                    status: Some(409),
                    ..
                }
            )
            && last_step
            && CreateOrderData::of(s).shipment.is_some()
            && s.failure.as_ref().is_some_and(|f| f.after_completion)
    }
}

/// What a customer is told (the 409's `detail`, the order's `statusReason`, the `reason` of
/// `OrderCancelled`/`OrderRejected`): a fixed text per kind of failure, never a downstream's
/// error text, URL or body, which stay in `detail` for operators (the saga, its history, the
/// saga events).
pub fn customer_text(failure: &Failure) -> String {
    match failure.class {
        // Our own words: "cancelled: by the customer" / "cancelled: by admin 7" / a reason the
        // API checked.
        FailureClass::Cancelled if failure.detail.starts_with("cancelled: by admin") => {
            "cancelled by OStore".into()
        }
        FailureClass::Cancelled => failure.detail.clone(),
        FailureClass::InsufficientStock => "some products are not available in the requested quantity".into(),
        FailureClass::TotalOverflow => "the order's total is larger than an order may be".into(),
        FailureClass::DeadlineExceeded => "the order could not be completed in time".into(),
        _ => {
            let what = match failure.step.as_str() {
                "reserve_inventory" => "the products could not be reserved",
                "create_shipment" => "the shipment could not be arranged",
                _ => "the order could not be completed",
            };
            let why = if failure.class == FailureClass::Downstream(Downstream::Http4xx) {
                "it was refused"
            } else {
                "a service it needs was unavailable"
            };
            format!("{what}: {why}")
        }
    }
}

/// The order as events and the 201 answer show it.
pub fn order_data(s: &Saga, status: OrderStatus) -> Value {
    let data = CreateOrderData::of(s);
    let items: Vec<Value> = match &data.items {
            Some(items) => items
                .iter()
                .map(|i| json!({"orderItemID": i.order_item_id, "productID": i.product_id, "quantity": i.quantity, "price": money(i.price)}))
                .collect(),
            None => lines(s)
                .iter()
                .map(|l| json!({"orderItemID": null, "productID": l.product_id, "quantity": l.quantity, "price": null}))
                .collect(),
        };
    json!({
        "orderID": s.order_id,
        "userID": s.user_id,
        "orderDate": rfc3339(s.created_at),
        "status": status.as_str(),
        "totalAmount": data.total.map(money),
        "currency": data.currency,
        "shipmentID": data.shipment.as_ref().map(|x| x.shipment_id.clone()),
        "orderItems": items,
    })
}
