//! The transition rules, pure: what a tracking status does to an order in a given status (the
//! order status it moves to, the notification it sends, or nothing), and when an event must wait.
//! `plan` applies them to the orders it has locked.

use crate::downstream::contract::{TrackingEvent, TrackingStatus};
use crate::orders::OrderStatus;

/// Event type of a status change (notification and order lifecycle).
pub const ORDER_STATUS_CHANGED: &str = "OrderStatusChanged";
/// Event type of the notification for a tracking `exception`.
pub const SHIPMENT_EXCEPTION: &str = "ShipmentException";
/// Event type of the notification for a tracking `returned`.
pub const SHIPMENT_RETURNED: &str = "ShipmentReturned";

/// The order status a tracking status moves an order to, if any.
pub fn target_status(status: TrackingStatus) -> Option<OrderStatus> {
    match status {
        TrackingStatus::PickedUp | TrackingStatus::InTransit | TrackingStatus::OutForDelivery => {
            Some(OrderStatus::Shipped)
        }
        TrackingStatus::Delivered => Some(OrderStatus::Delivered),
        TrackingStatus::Created | TrackingStatus::Exception | TrackingStatus::Returned => None,
    }
}

/// Why `event` cannot be applied to an order in `current` status yet, if it cannot: an order
/// still `pending` (its saga has not confirmed it) takes nothing but `created`.
pub(crate) fn must_wait(current: OrderStatus, event: &TrackingEvent) -> Option<String> {
    (current == OrderStatus::Pending && event.status != TrackingStatus::Created)
        .then(|| format!("order {} is still pending", event.order_id))
}

/// What the transition table says an event does to an order in `current` status.
pub(crate) enum Effect {
    /// The order moves to this status (and the customer is told).
    Move(OrderStatus),
    /// No status change, but the customer is told (`exception`, `returned`).
    Notify(&'static str, String),
    /// Nothing: `created`, a status the order already has, or a late one.
    Nothing,
}

/// The transition table: what `event` does to an order in `current` status (it moves only when
/// [`OrderStatus::can_move_to`] allows it, so nothing moves backwards).
pub(crate) fn effect(current: OrderStatus, event: &TrackingEvent) -> Effect {
    match (event.status, target_status(event.status)) {
        (_, Some(to)) if current.can_move_to(to) => Effect::Move(to),
        (TrackingStatus::Exception, _) => Effect::Notify(
            SHIPMENT_EXCEPTION,
            format!(
                "The carrier reported a problem with the delivery of order {}; we are looking into it.",
                event.order_id
            ),
        ),
        (TrackingStatus::Returned, _) => Effect::Notify(
            SHIPMENT_RETURNED,
            format!("Order {} is being returned to us by the carrier.", event.order_id),
        ),
        _ => Effect::Nothing,
    }
}

/// The message of the notification of a status change.
pub(crate) fn status_message(order_id: i32, to: OrderStatus) -> String {
    match to {
        OrderStatus::Shipped => format!("Order {order_id} is on its way."),
        OrderStatus::Delivered => format!("Order {order_id} was delivered."),
        other => format!("Order {order_id} is now {other}."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracking_statuses_map_to_order_statuses_as_the_contract_says() {
        use TrackingStatus::*;
        assert_eq!(target_status(PickedUp), Some(OrderStatus::Shipped));
        assert_eq!(target_status(InTransit), Some(OrderStatus::Shipped));
        assert_eq!(target_status(OutForDelivery), Some(OrderStatus::Shipped));
        assert_eq!(target_status(Delivered), Some(OrderStatus::Delivered));
        for s in [Created, Exception, Returned] {
            assert_eq!(target_status(s), None);
        }
    }

    fn event(status: TrackingStatus) -> TrackingEvent {
        TrackingEvent {
            event_id: "e-1".into(),
            shipment_id: "shp-1".into(),
            order_id: 42,
            status,
            occurred_at: time::OffsetDateTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn orders_move_forward_only() {
        use TrackingStatus::*;
        let moves = |current, status| matches!(effect(current, &event(status)), Effect::Move(_));
        assert!(matches!(
            effect(OrderStatus::Confirmed, &event(PickedUp)),
            Effect::Move(OrderStatus::Shipped)
        ));
        assert!(matches!(
            effect(OrderStatus::Shipped, &event(Delivered)),
            Effect::Move(OrderStatus::Delivered)
        ));
        assert!(matches!(
            effect(OrderStatus::Confirmed, &event(Delivered)),
            Effect::Move(OrderStatus::Delivered)
        ));
        // A status the order already has, a late one, one after the end: nothing.
        assert!(!moves(OrderStatus::Shipped, InTransit));
        assert!(!moves(OrderStatus::Delivered, OutForDelivery));
        assert!(!moves(OrderStatus::Cancelled, Delivered));
        assert!(matches!(
            effect(OrderStatus::Confirmed, &event(Created)),
            Effect::Nothing
        ));
    }

    #[test]
    fn exceptions_and_returns_notify_without_moving() {
        for current in [
            OrderStatus::Confirmed,
            OrderStatus::Shipped,
            OrderStatus::Delivered,
        ] {
            match effect(current, &event(TrackingStatus::Exception)) {
                Effect::Notify(kind, message) => {
                    assert_eq!(kind, SHIPMENT_EXCEPTION);
                    assert!(message.contains("order 42"), "{message}");
                }
                _ => panic!("an exception notifies"),
            }
            assert!(matches!(
                effect(current, &event(TrackingStatus::Returned)),
                Effect::Notify(SHIPMENT_RETURNED, _)
            ));
        }
    }

    #[test]
    fn a_pending_order_takes_only_created() {
        assert_eq!(
            must_wait(OrderStatus::Pending, &event(TrackingStatus::Created)),
            None
        );
        assert_eq!(
            must_wait(OrderStatus::Pending, &event(TrackingStatus::PickedUp)).as_deref(),
            Some("order 42 is still pending")
        );
        assert_eq!(
            must_wait(OrderStatus::Confirmed, &event(TrackingStatus::PickedUp)),
            None
        );
    }

    #[test]
    fn status_messages_name_the_order() {
        assert_eq!(status_message(7, OrderStatus::Shipped), "Order 7 is on its way.");
        assert_eq!(
            status_message(7, OrderStatus::Delivered),
            "Order 7 was delivered."
        );
    }
}
