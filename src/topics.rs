//! The Kafka topics the service produces to and consumes from: their default names, defined here
//! once, and the settings that rename them (`TOPIC_*`). A leaf: configuration, the outbox, the
//! tracking consumer, the simulators and the tools all read the names from here.

/// Default topic of the order lifecycle events.
pub const ORDER_EVENTS: &str = "orders.events";
/// Default topic of the saga transitions, retries and compensations.
pub const SAGA_EVENTS: &str = "orders.saga-events";
/// Default topic of the shipper's TrackingEvents.
pub const TRACKING_EVENTS: &str = "shipments.tracking-events";
/// Default topic of the customer notifications.
pub const NOTIFICATIONS: &str = "users.notifications";
/// Default topic of the tracking events that could not be applied.
pub const TRACKING_DLQ: &str = "shipments.tracking-events.dlq";

/// Topic names (configurable).
#[derive(Debug, Clone, clap::Args)]
pub struct Topics {
    /// Order lifecycle events.
    #[arg(long = "topic-order-events", env = "TOPIC_ORDER_EVENTS", default_value = ORDER_EVENTS)]
    pub order_events: String,
    /// Saga transitions, retries and compensations.
    #[arg(long = "topic-saga-events", env = "TOPIC_SAGA_EVENTS", default_value = SAGA_EVENTS)]
    pub saga_events: String,
    /// TrackingEvents consumed from the shipper.
    #[arg(long = "topic-tracking-events", env = "TOPIC_TRACKING_EVENTS", default_value = TRACKING_EVENTS)]
    pub tracking_events: String,
    /// Customer notifications produced.
    #[arg(long = "topic-notifications", env = "TOPIC_NOTIFICATIONS", default_value = NOTIFICATIONS)]
    pub notifications: String,
    /// Tracking events that could not be applied.
    #[arg(long = "topic-tracking-dlq", env = "TOPIC_TRACKING_DLQ", default_value = TRACKING_DLQ)]
    pub tracking_dlq: String,
}

impl Default for Topics {
    fn default() -> Self {
        Topics {
            order_events: ORDER_EVENTS.into(),
            saga_events: SAGA_EVENTS.into(),
            tracking_events: TRACKING_EVENTS.into(),
            notifications: NOTIFICATIONS.into(),
            tracking_dlq: TRACKING_DLQ.into(),
        }
    }
}

impl Topics {
    /// Every topic, in a fixed order (the ones a broker of the service's own must have).
    pub fn all(&self) -> [&str; 5] {
        [
            &self.order_events,
            &self.saga_events,
            &self.tracking_events,
            &self.notifications,
            &self.tracking_dlq,
        ]
    }

    /// The same topics, each name passed through `rename` (e.g. a per-run prefix).
    pub fn renamed(&self, rename: impl Fn(&str) -> String) -> Topics {
        Topics {
            order_events: rename(&self.order_events),
            saga_events: rename(&self.saga_events),
            tracking_events: rename(&self.tracking_events),
            notifications: rename(&self.notifications),
            tracking_dlq: rename(&self.tracking_dlq),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_every_topic_once_and_renamed_keeps_the_order() {
        let t = Topics::default();
        let mut names = t.all().to_vec();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), 5);
        let r = t.renamed(|n| format!("x.{n}"));
        assert_eq!(r.all().map(|n| n.to_string()), t.all().map(|n| format!("x.{n}")));
    }
}
