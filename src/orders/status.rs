//! Order statuses and the one transition table of the service. Nothing moves backwards.

use serde::{Deserialize, Serialize};

/// An order's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OrderStatus {
    /// The saga is still running.
    Pending,
    /// Stock reserved, order persisted, shipment created.
    Confirmed,
    /// The shipper picked it up.
    Shipped,
    /// Delivered to the customer.
    Delivered,
    /// Compensated, or cancelled by the customer.
    Cancelled,
    /// Stock refused after the order was acknowledged as pending.
    Rejected,
}

impl OrderStatus {
    /// Every status.
    pub const ALL: [OrderStatus; 6] = [
        OrderStatus::Pending,
        OrderStatus::Confirmed,
        OrderStatus::Shipped,
        OrderStatus::Delivered,
        OrderStatus::Cancelled,
        OrderStatus::Rejected,
    ];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Pending => "pending",
            OrderStatus::Confirmed => "confirmed",
            OrderStatus::Shipped => "shipped",
            OrderStatus::Delivered => "delivered",
            OrderStatus::Cancelled => "cancelled",
            OrderStatus::Rejected => "rejected",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<OrderStatus> {
        OrderStatus::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// The transition table: may an order move from `self` to `to`?
    pub fn can_move_to(self, to: OrderStatus) -> bool {
        use OrderStatus::*;
        matches!(
            (self, to),
            (Pending, Confirmed)
                | (Pending, Cancelled)
                | (Pending, Rejected)
                | (Confirmed, Shipped)
                | (Confirmed, Delivered)
                | (Confirmed, Cancelled)
                | (Shipped, Delivered)
        )
    }

    /// No transition leaves this status.
    pub fn is_terminal(self) -> bool {
        OrderStatus::ALL.into_iter().all(|to| !self.can_move_to(to))
    }

    /// A customer may still cancel (the order has not shipped).
    pub fn is_cancellable(self) -> bool {
        self.can_move_to(OrderStatus::Cancelled)
    }
}

impl std::fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::OrderStatus::{self, *};

    #[test]
    fn nothing_moves_backwards_or_leaves_a_terminal_status() {
        let rank = |s: OrderStatus| match s {
            Pending => 0,
            Confirmed => 1,
            Shipped => 2,
            Delivered | Cancelled | Rejected => 3,
        };
        for from in OrderStatus::ALL {
            for to in OrderStatus::ALL {
                if from.can_move_to(to) {
                    assert!(rank(to) > rank(from), "{from} -> {to} moves backwards");
                }
            }
        }
        for t in [Delivered, Cancelled, Rejected] {
            assert!(t.is_terminal());
        }
        assert!(!Shipped.is_cancellable() && Confirmed.is_cancellable() && Pending.is_cancellable());
        assert_eq!(OrderStatus::parse("shipped"), Some(Shipped));
        assert_eq!(OrderStatus::parse("lost"), None);
    }
}
