//! Validation of a new order's body: every rule names the field it guards, and nothing is written
//! before the body passed all of them.

use std::collections::HashSet;

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Most lines in one order.
pub const MAX_LINES: usize = 100;
/// Largest quantity of one line.
pub const MAX_QUANTITY: i64 = 10_000;

/// `POST /orders` body as sent (wide integer types so out-of-range values get a clear message).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, remote = "Self")]
pub struct CreateOrderBody {
    /// Optional; must equal the caller's id.
    #[serde(rename = "userID", default)]
    pub user_id: Option<i64>,
    /// 1–100 lines with distinct products.
    #[serde(rename = "orderItems")]
    pub order_items: Vec<ItemBody>,
}

/// One requested line.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, remote = "Self")]
pub struct ItemBody {
    /// Positive 32-bit product id.
    #[serde(rename = "productID")]
    pub product_id: i64,
    /// 1–10,000.
    pub quantity: i64,
}

crate::api::extract::object_only!(CreateOrderBody);
crate::api::extract::object_only!(ItemBody);

/// A validated line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Line {
    /// Product id.
    #[serde(rename = "productID")]
    pub product_id: i32,
    /// Quantity.
    pub quantity: i32,
}

/// A rule broken: the field and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// JSON path of the field (`orderItems[2].quantity`).
    pub field: String,
    /// Why.
    pub detail: String,
}

/// Checks the lines of a body.
pub fn validate_lines(body: &CreateOrderBody) -> Result<Vec<Line>, Invalid> {
    let n = body.order_items.len();
    if n == 0 || n > MAX_LINES {
        return Err(Invalid {
            field: "orderItems".into(),
            detail: format!("orderItems must hold 1 to {MAX_LINES} lines (got {n})"),
        });
    }
    let mut seen = HashSet::with_capacity(n);
    let mut lines = Vec::with_capacity(n);
    for (i, item) in body.order_items.iter().enumerate() {
        if item.product_id <= 0 || item.product_id > i64::from(i32::MAX) {
            return Err(Invalid {
                field: format!("orderItems[{i}].productID"),
                detail: format!("orderItems[{i}].productID must be a positive 32-bit integer"),
            });
        }
        if !(1..=MAX_QUANTITY).contains(&item.quantity) {
            return Err(Invalid {
                field: format!("orderItems[{i}].quantity"),
                detail: format!("orderItems[{i}].quantity must be an integer from 1 to {MAX_QUANTITY}"),
            });
        }
        if !seen.insert(item.product_id) {
            return Err(Invalid {
                field: format!("orderItems[{i}].productID"),
                detail: format!(
                    "orderItems[{i}].productID {} appears more than once",
                    item.product_id
                ),
            });
        }
        lines.push(Line {
            product_id: item.product_id as i32,
            quantity: item.quantity as i32,
        });
    }
    Ok(lines)
}

/// The fingerprint of a request for idempotency: the same lines in the same order give the same hash.
pub fn request_hash(lines: &[Line]) -> Vec<u8> {
    let mut h = Sha256::new();
    for l in lines {
        h.update(l.product_id.to_be_bytes());
        h.update(l.quantity.to_be_bytes());
    }
    h.finalize().to_vec()
}

/// Checks an `Idempotency-Key` header value: 1–255 visible ASCII characters.
pub fn idempotency_key_is_valid(key: &str) -> bool {
    !key.is_empty() && key.len() <= 255 && key.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(items: &[(i64, i64)]) -> CreateOrderBody {
        CreateOrderBody {
            user_id: None,
            order_items: items
                .iter()
                .map(|&(p, q)| ItemBody {
                    product_id: p,
                    quantity: q,
                })
                .collect(),
        }
    }

    #[test]
    fn each_rule_names_its_field() {
        assert_eq!(validate_lines(&body(&[])).unwrap_err().field, "orderItems");
        assert_eq!(
            validate_lines(&body(&[(1, 0)])).unwrap_err().field,
            "orderItems[0].quantity"
        );
        assert_eq!(
            validate_lines(&body(&[(1, 1), (2, -3)])).unwrap_err().field,
            "orderItems[1].quantity"
        );
        assert_eq!(
            validate_lines(&body(&[(1, 10_001)])).unwrap_err().field,
            "orderItems[0].quantity"
        );
        assert_eq!(
            validate_lines(&body(&[(0, 1)])).unwrap_err().field,
            "orderItems[0].productID"
        );
        assert_eq!(
            validate_lines(&body(&[(1 << 31, 1)])).unwrap_err().field,
            "orderItems[0].productID"
        );
        assert_eq!(
            validate_lines(&body(&[(5, 1), (5, 2)])).unwrap_err().field,
            "orderItems[1].productID"
        );
        let many: Vec<(i64, i64)> = (1..=101).map(|p| (p, 1)).collect();
        assert_eq!(validate_lines(&body(&many)).unwrap_err().field, "orderItems");
        let ok: Vec<(i64, i64)> = (1..=100).map(|p| (p, 10_000)).collect();
        assert_eq!(validate_lines(&body(&ok)).unwrap().len(), 100);
    }

    #[test]
    fn hash_depends_on_lines_only() {
        let a = validate_lines(&body(&[(1, 2), (3, 4)])).unwrap();
        let b = validate_lines(&body(&[(1, 2), (3, 5)])).unwrap();
        assert_eq!(request_hash(&a), request_hash(&a.clone()));
        assert_ne!(request_hash(&a), request_hash(&b));
    }

    #[test]
    fn idempotency_keys_are_visible_ascii() {
        assert!(idempotency_key_is_valid("order-2026-11-25-abc"));
        assert!(!idempotency_key_is_valid(""));
        assert!(!idempotency_key_is_valid("has space"));
        assert!(!idempotency_key_is_valid(&"k".repeat(256)));
    }
}
