//! A TrackingEvent record as it arrives (from Kafka, or back from the retry and dead-letter
//! tables) and its parsing into a typed [`TrackingEvent`]: what the rest of the consumer works on.
//! Also the span an event is handled in, continuing the record's trace.

use std::collections::HashMap;

use tracing::field::Empty;

use crate::downstream::contract::{MAX_EVENT_ID_LEN, TrackingEvent};
use crate::telemetry::{MapExtractor, set_remote_parent};

/// A TrackingEvent as received: the raw bytes and where they came from.
#[derive(Debug, Clone, Default)]
pub struct Record {
    /// Topic it was read from.
    pub topic: String,
    /// Partition, when it came from Kafka.
    pub partition: Option<i32>,
    /// Offset, when it came from Kafka.
    pub offset: Option<i64>,
    /// The record's key (the orderID as text, by contract).
    pub key: Option<Vec<u8>>,
    /// The value, exactly as received.
    pub payload: Vec<u8>,
    /// Record headers (`traceparent`, `event-type`, `event-id`, …), values as UTF-8 text.
    pub headers: HashMap<String, String>,
}

/// The [`Record`] kept in a row of `tracking_retries` or `dead_letters` (sqlx's anonymous row
/// types differ per query; both have these columns).
macro_rules! stored_record {
    ($row:expr) => {
        $crate::tracking::record::Record::stored(
            $row.topic,
            $row.partition,
            $row.offset,
            $row.key,
            $row.payload,
            $row.headers,
        )
    };
}
pub(crate) use stored_record;

impl Record {
    /// A record as the retry and dead-letter tables keep it (headers as a JSON object).
    pub(crate) fn stored(
        topic: String,
        partition: Option<i32>,
        offset: Option<i64>,
        key: Option<Vec<u8>>,
        payload: Vec<u8>,
        headers: serde_json::Value,
    ) -> Record {
        Record {
            topic,
            partition,
            offset,
            key,
            payload,
            headers: serde_json::from_value(headers).unwrap_or_default(),
        }
    }
}

/// Parses and checks a TrackingEvent; the error is the dead-letter reason.
pub(crate) fn parse(payload: &[u8]) -> Result<TrackingEvent, String> {
    let event: TrackingEvent =
        serde_json::from_slice(payload).map_err(|e| format!("malformed TrackingEvent: {e}"))?;
    let id = &event.event_id;
    if id.is_empty() || id.len() > MAX_EVENT_ID_LEN || id.chars().any(char::is_control) {
        return Err(format!(
            "malformed TrackingEvent: eventID must be non-empty text of at most {MAX_EVENT_ID_LEN} bytes \
             without control characters"
        ));
    }
    if event.order_id <= 0 {
        return Err(format!(
            "malformed TrackingEvent: orderID {} is not a positive integer",
            event.order_id
        ));
    }
    Ok(event)
}

/// The span one event is handled in, continuing the trace of the record's `traceparent`.
pub(crate) fn event_span(record: &Record) -> tracing::Span {
    let span = tracing::info_span!(
        "tracking.apply",
        otel.name = format!("process {}", record.topic),
        otel.kind = "consumer",
        messaging.system = "kafka",
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.destination.name = %record.topic,
        messaging.destination.partition.id = record.partition.map(|p| p.to_string()),
        messaging.kafka.offset = record.offset,
        messaging.batch.message_count = Empty,
        event_id = Empty,
        order_id = Empty,
        tracking_status = Empty,
        outcome = Empty,
    );
    set_remote_parent(&span, &MapExtractor(&record.headers));
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_events_are_refused_with_a_reason() {
        assert!(
            parse(b"{not json")
                .unwrap_err()
                .starts_with("malformed TrackingEvent")
        );
        let unknown_status = br#"{"eventID":"00000000-0000-0000-0000-000000000001","shipmentID":"s",
            "orderID":1,"status":"lost","occurredAt":"2026-01-01T00:00:00Z"}"#;
        assert!(parse(unknown_status).is_err());
        let zero_order = br#"{"eventID":"00000000-0000-0000-0000-000000000001","shipmentID":"s",
            "orderID":0,"status":"delivered","occurredAt":"2026-01-01T00:00:00Z"}"#;
        assert!(parse(zero_order).unwrap_err().contains("orderID 0"));
        let event = |id: &str| {
            format!(
                r#"{{"eventID":{},"shipmentID":"s","orderID":1,"status":"delivered","occurredAt":"2026-01-01T00:00:00Z"}}"#,
                serde_json::Value::from(id)
            )
        };
        assert_eq!(parse(event("evt-1").as_bytes()).unwrap().event_id, "evt-1");
        assert_eq!(
            parse(event(&"é".repeat(100)).as_bytes()).unwrap().event_id.len(),
            200
        );
        for bad in [String::new(), "é".repeat(100) + "x", "a\u{7}b".to_string()] {
            assert!(
                parse(event(&bad).as_bytes()).unwrap_err().contains("eventID"),
                "{bad:?}"
            );
        }
    }
}
