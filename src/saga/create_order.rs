//! The CreateOrder saga's hooks: what the engine writes for it besides the saga's own row and saga
//! events. Its steps' outputs land in [`SagaData`]; a completed saga confirms the order
//! (`OrderConfirmed`, 201 answer); a compensated one cancels or rejects it (or removes the
//! placeholder of an order never placed) and answers with the matching problem; a shipper that
//! will not cancel a picked-up parcel ends a customer's cancellation of a completed saga.

use serde_json::{Value, json};

use crate::orders::OrderStatus;
use crate::orders::answer::Answer;
use crate::saga::failure::Downstream;
use crate::saga::machine::{
    Attempt, Effect, Failure, FailureClass, Kind, OrderChange, Outcome, Saga, SagaHooks, StepOutput, money,
    order_event, rfc3339,
};

/// The CreateOrder saga's hooks.
#[derive(Debug, Clone, Copy, Default)]
pub struct CreateOrder;

impl SagaHooks for CreateOrder {
    fn keep_output(&self, s: &mut Saga, out: &StepOutput) {
        match out {
            StepOutput::Reservation(r) => s.data.reservation = Some(r.clone()),
            StepOutput::Persisted {
                items,
                total,
                currency,
            } => {
                s.data.items = Some(items.clone());
                s.data.total = Some(*total);
                s.data.currency = Some(currency.clone());
            }
            StepOutput::Shipment(sh) => s.data.shipment = Some(sh.clone()),
            StepOutput::OrderCancelled(_) | StepOutput::Done => {}
        }
    }

    fn compensated(&self, s: &Saga, out: &StepOutput, fx: &mut Vec<Effect>) {
        if *out == StepOutput::OrderCancelled(true) {
            let mut data = order_data(s, OrderStatus::Cancelled);
            data["reason"] = json!(s.failure.as_ref().map(customer_text));
            fx.push(order_event("OrderCancelled", data));
        }
    }

    fn completed(&self, s: &Saga, fx: &mut Vec<Effect>) -> Option<Answer> {
        let shipment_id = s
            .data
            .shipment
            .as_ref()
            .map(|x| x.shipment_id.clone())
            .unwrap_or_default();
        fx.push(Effect::Order(OrderChange::Confirm { shipment_id }));
        let body = order_data(s, OrderStatus::Confirmed);
        fx.push(order_event("OrderConfirmed", body.clone()));
        Some(Answer::Created(body))
    }

    fn compensation_finished(&self, s: &Saga, failure: &Failure, fx: &mut Vec<Effect>) -> Option<Answer> {
        let persisted = s.data.items.is_some();
        let stock = failure.class == FailureClass::InsufficientStock;
        let no_order_placed =
            !persisted && !s.answered_pending && (stock || failure.class == FailureClass::TotalOverflow);
        let answer = match failure.class {
            FailureClass::InsufficientStock => Answer::InsufficientStock {
                unavailable: failure.unavailable.clone().unwrap_or_default(),
            },
            FailureClass::TotalOverflow => Answer::TotalTooLarge {
                detail: failure.detail.clone(),
            },
            _ => Answer::Cancelled {
                detail: customer_text(failure),
                order_id: s.order_id,
            },
        };
        if no_order_placed {
            fx.push(Effect::Order(OrderChange::Delete));
        } else if !persisted {
            // persist_order never ran, so cancel_order did not either: settle the order here.
            let to = if stock {
                OrderStatus::Rejected
            } else {
                OrderStatus::Cancelled
            };
            fx.push(Effect::Order(OrderChange::Status {
                to,
                reason: Some(customer_text(failure)),
            }));
            let ev = if to == OrderStatus::Rejected {
                "OrderRejected"
            } else {
                "OrderCancelled"
            };
            let mut data = order_data(s, to);
            data["reason"] = json!(customer_text(failure));
            fx.push(order_event(ev, data));
        }
        Some(answer)
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
            && s.data.shipment.is_some()
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
    let items: Vec<Value> = match &s.data.items {
            Some(items) => items
                .iter()
                .map(|i| json!({"orderItemID": i.order_item_id, "productID": i.product_id, "quantity": i.quantity, "price": money(i.price)}))
                .collect(),
            None => s
                .input
                .iter()
                .map(|l| json!({"orderItemID": null, "productID": l.product_id, "quantity": l.quantity, "price": null}))
                .collect(),
        };
    json!({
        "orderID": s.order_id,
        "userID": s.user_id,
        "orderDate": rfc3339(s.created_at),
        "status": status.as_str(),
        "totalAmount": s.data.total.map(money),
        "currency": s.data.currency,
        "shipmentID": s.data.shipment.as_ref().map(|x| x.shipment_id.clone()),
        "orderItems": items,
    })
}
