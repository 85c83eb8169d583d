//! The transactional outbox: events are written in the same transaction as the state change they
//! describe (`enqueue`), and the relay publishes them to Kafka.
//!
//! Every event travels in one envelope `{eventID, eventType, eventVersion, occurredAt, orderID,
//! sagaID?, data}`, keyed by orderID, with headers `traceparent` (+ `tracestate`), `event-type` and
//! `event-id`. See docs/events.md.

pub mod dead;
pub mod relay;

use std::collections::HashMap;

use serde::Serialize;
use serde_json::Value;
use sqlx::PgConnection;
use time::OffsetDateTime;
use uuid::Uuid;

/// Topic names: defined in [`crate::topics`], re-exported here for the modules that stage events.
pub use crate::topics::Topics;

/// The envelope every produced message carries.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    /// Unique per event; consumers deduplicate on it.
    #[serde(rename = "eventID")]
    pub event_id: Uuid,
    /// Event type name (see docs/events.md).
    pub event_type: String,
    /// Schema version of `data`.
    pub event_version: u32,
    /// When the change happened (RFC 3339).
    #[serde(with = "time::serde::rfc3339")]
    pub occurred_at: OffsetDateTime,
    /// The order; also the message key. None only for an event of a saga that places no order
    /// (then the member is left out and the saga id is the key).
    #[serde(rename = "orderID", skip_serializing_if = "Option::is_none")]
    pub order_id: Option<i32>,
    /// The saga, when a saga made the change.
    #[serde(rename = "sagaID", skip_serializing_if = "Option::is_none")]
    pub saga_id: Option<Uuid>,
    /// Event-specific payload.
    pub data: Value,
}

/// An event to write to the outbox.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// Destination topic.
    pub topic: String,
    /// The envelope.
    pub envelope: Envelope,
    /// W3C trace context headers of the change.
    pub trace: HashMap<String, String>,
}

impl NewEvent {
    /// An event of `event_type` (version 1) about an order.
    pub fn new(
        topic: &str,
        event_type: &str,
        order_id: i32,
        saga_id: Option<Uuid>,
        data: Value,
        trace: &HashMap<String, String>,
    ) -> Self {
        NewEvent {
            topic: topic.to_string(),
            envelope: Envelope {
                event_id: Uuid::now_v7(),
                event_type: event_type.to_string(),
                event_version: 1,
                occurred_at: OffsetDateTime::now_utc(),
                order_id: Some(order_id),
                saga_id,
                data,
            },
            trace: trace.clone(),
        }
    }

    /// An event of `event_type` (version 1) that saga `saga_id` writes about its order, if it
    /// has one (keyed by the order, else by the saga).
    pub fn of_saga(
        topic: &str,
        event_type: &str,
        order_id: Option<i32>,
        saga_id: Uuid,
        data: Value,
        trace: &HashMap<String, String>,
    ) -> Self {
        let mut e = NewEvent::new(topic, event_type, 0, Some(saga_id), data, trace);
        e.envelope.order_id = order_id;
        e
    }

    /// The Kafka headers of the message.
    pub fn headers(&self) -> Value {
        let mut h = serde_json::Map::new();
        for (k, v) in &self.trace {
            if k == "traceparent" || k == "tracestate" {
                h.insert(k.clone(), Value::String(v.clone()));
            }
        }
        h.insert(
            "event-type".into(),
            Value::String(self.envelope.event_type.clone()),
        );
        h.insert(
            "event-id".into(),
            Value::String(self.envelope.event_id.to_string()),
        );
        Value::Object(h)
    }
}

/// Events as the columns of `outbox`, one array each, for an `insert … select … from unnest(…)`.
#[derive(Default)]
pub struct Columns {
    /// Topics.
    pub topics: Vec<String>,
    /// Message keys (the orderID).
    pub keys: Vec<String>,
    /// Event ids.
    pub ids: Vec<Uuid>,
    /// Event types.
    pub types: Vec<String>,
    /// Envelopes as JSON text.
    pub payloads: Vec<String>,
    /// Kafka headers.
    pub headers: Vec<Value>,
}

impl Columns {
    /// The columns of `events`.
    pub fn of(events: &[NewEvent]) -> Columns {
        let mut c = Columns {
            topics: Vec::with_capacity(events.len()),
            keys: Vec::with_capacity(events.len()),
            ids: Vec::with_capacity(events.len()),
            types: Vec::with_capacity(events.len()),
            payloads: Vec::with_capacity(events.len()),
            headers: Vec::with_capacity(events.len()),
        };
        for e in events {
            c.topics.push(e.topic.clone());
            c.keys.push(match (e.envelope.order_id, e.envelope.saga_id) {
                (Some(order), _) => order.to_string(),
                (None, Some(saga)) => saga.to_string(),
                (None, None) => String::new(),
            });
            c.ids.push(e.envelope.event_id);
            c.types.push(e.envelope.event_type.clone());
            // The envelope's text goes in as is (`payload` is `json`: the relay reads back these
            // bytes).
            c.payloads
                .push(serde_json::to_string(&e.envelope).unwrap_or_else(|_| "null".into()));
            c.headers.push(e.headers());
        }
        c
    }
}

/// Writes events in the caller's transaction (one statement for all of them).
pub async fn enqueue(conn: &mut PgConnection, events: &[NewEvent]) -> Result<(), sqlx::Error> {
    if events.is_empty() {
        return Ok(());
    }
    let c = Columns::of(events);
    sqlx::query!(
        r#"insert into outbox (topic, message_key, event_id, event_type, payload, headers)
           select t, k, i, e, p::json, h
             from unnest($1::text[], $2::text[], $3::uuid[], $4::text[], $5::text[], $6::jsonb[]) as u(t, k, i, e, p, h)"#,
        &c.topics,
        &c.keys,
        &c.ids,
        &c.types,
        &c.payloads,
        &c.headers
    )
    .execute(conn)
    .await?;
    Ok(())
}
