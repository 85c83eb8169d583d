//! The answer of `POST /orders` once its saga has finished, typed. The saga machine decides which
//! answer a saga gives; only the HTTP layer (`api/orders.rs`) turns it into a status code and a
//! problem. The stored form (`sagas.answer`, replayed for a repeated Idempotency-Key) is the JSON of
//! earlier releases, unchanged: `{status, body}` or `{status, problem}`.

use serde_json::{Value, json};

use crate::downstream::contract::Unavailable;

/// The `detail` of a stock refusal.
pub const STOCK_DETAIL: &str =
    "some products are not available in the requested quantity; no order was placed";

/// How a finished CreateOrder saga answers its request.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// Every step succeeded: the confirmed order, as `GET /orders/{id}` shows it.
    Created(Value),
    /// The catalog refused the reservation: no order was placed (or it was rejected).
    InsufficientStock {
        /// The products short of stock.
        unavailable: Vec<Unavailable>,
    },
    /// The order's total is larger than an order may hold.
    TotalTooLarge {
        /// Why.
        detail: String,
    },
    /// The saga compensated (cancelled, or a step failed for good): the order is cancelled.
    Cancelled {
        /// What the customer is told.
        detail: String,
        /// The cancelled order.
        order_id: i32,
    },
}

impl Answer {
    /// The stored form (`sagas.answer`).
    pub fn to_stored(&self) -> Value {
        match self {
            Answer::Created(body) => json!({"status": 201, "body": body}),
            Answer::InsufficientStock { unavailable } => json!({"status": 409, "problem": {
                "slug": "insufficient-stock", "title": "Conflict", "detail": STOCK_DETAIL,
                "unavailable": unavailable,
            }}),
            Answer::TotalTooLarge { detail } => json!({"status": 422, "problem": {
                "slug": "validation", "title": "Invalid request", "field": "totalAmount", "detail": detail,
            }}),
            Answer::Cancelled { detail, order_id } => json!({"status": 409, "problem": {
                "slug": "order-cancelled", "title": "Conflict", "detail": detail, "orderID": order_id,
                "orderStatus": "cancelled",
            }}),
        }
    }

    /// Reads the stored form; None when it is not one this release writes.
    pub fn from_stored(v: &Value) -> Option<Answer> {
        let problem = &v["problem"];
        let detail = || problem["detail"].as_str().map(str::to_string);
        match (v["status"].as_u64()?, problem["slug"].as_str()) {
            (201, _) => Some(Answer::Created(v.get("body")?.clone())),
            (409, Some("insufficient-stock")) => Some(Answer::InsufficientStock {
                unavailable: serde_json::from_value(problem.get("unavailable").cloned().unwrap_or(json!([])))
                    .ok()?,
            }),
            (422, Some("validation")) => Some(Answer::TotalTooLarge { detail: detail()? }),
            (409, Some("order-cancelled")) => Some(Answer::Cancelled {
                detail: detail()?,
                order_id: i32::try_from(problem["orderID"].as_i64()?).ok()?,
            }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_answer_reads_back_from_its_stored_form() {
        let answers = [
            Answer::Created(json!({"orderID": 3, "status": "confirmed"})),
            Answer::InsufficientStock {
                unavailable: vec![Unavailable {
                    product_id: 1,
                    requested: 5,
                    available: 2,
                }],
            },
            Answer::TotalTooLarge {
                detail: "too big".into(),
            },
            Answer::Cancelled {
                detail: "cancelled: by the customer".into(),
                order_id: 9,
            },
        ];
        for a in answers {
            assert_eq!(Answer::from_stored(&a.to_stored()), Some(a));
        }
        assert_eq!(Answer::from_stored(&json!({"status": 500})), None);
    }

    #[test]
    fn the_stored_form_is_the_one_earlier_releases_wrote() {
        let stored = Answer::Cancelled {
            detail: "d".into(),
            order_id: 4,
        }
        .to_stored();
        assert_eq!(
            stored,
            json!({"status": 409, "problem": {"slug": "order-cancelled", "title": "Conflict", "detail": "d",
                   "orderID": 4, "orderStatus": "cancelled"}})
        );
    }
}
