//! docs/asyncapi.json against the events the service really writes: scenarios that produce every
//! event type but `SagaStuck` and `OrderRejected` (their schemas are the documented ones, unexercised
//! here) run against the app with Kafka, and every outbox row (envelope, `data`, headers) is
//! validated with the JSON Schema of its topic's message for its `eventType`, formats included. The
//! consumed TrackingEvent's schema is checked against the Rust type.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{AppOptions, TestApp, spawn_app_with};

fn asyncapi() -> Value {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/asyncapi.json"))
        .expect("docs/asyncapi.json");
    serde_json::from_str(&text).expect("docs/asyncapi.json is JSON")
}

/// A validator for the schema at `pointer` inside the AsyncAPI document (its `$ref`s resolve
/// against the document itself).
fn validator(doc: &Value, pointer: &str) -> jsonschema::Validator {
    let mut schema = doc.clone();
    let root = schema.as_object_mut().unwrap();
    root.insert(
        "$schema".into(),
        json!("https://json-schema.org/draft/2020-12/schema"),
    );
    root.insert("$ref".into(), json!(format!("#{pointer}")));
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .unwrap_or_else(|e| panic!("schema at {pointer}: {e}"))
}

async fn advance(app: &TestApp, shipment: &str, status: &str) {
    let r = app
        .http
        .post(format!("{}/sim/shipments/{shipment}/advance", app.shipments_url))
        .json(&json!({"status": status}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "advance {status}: {}", r.status());
}

async fn order_status_is(app: &TestApp, id: i64, status: &str) {
    app.eventually_eq(
        &format!("select status from orders where order_id = {id}"),
        status,
        30,
    )
    .await;
}

/// Runs orders through every path but a stuck compensation and returns the outbox rows:
/// `(topic, eventType, payload, headers)`.
async fn produce_every_event(app: &TestApp) -> Vec<(String, String, Value, Value)> {
    app.product(1, 100, "4.00");
    app.product(2, 0, "9.50");
    let (_, token) = app.customer("contract@example.com").await;
    let place = |key: &'static str, product: i64| {
        let token = token.clone();
        async move {
            app.place(&token, key, json!([{"productID": product, "quantity": 1}]))
                .await
        }
    };
    // Confirmed, shipped and delivered; then an exception and a return on another order.
    let r = place("c-1", 1).await;
    assert_eq!(r.status(), 201);
    let body: Value = r.json().await.unwrap();
    let (id, shipment) = (
        body["orderID"].as_i64().unwrap(),
        body["shipmentID"].as_str().unwrap().to_string(),
    );
    advance(app, &shipment, "picked_up").await;
    order_status_is(app, id, "shipped").await;
    advance(app, &shipment, "delivered").await;
    order_status_is(app, id, "delivered").await;
    let r = place("c-2", 1).await;
    let body: Value = r.json().await.unwrap();
    let shipment = body["shipmentID"].as_str().unwrap().to_string();
    advance(app, &shipment, "exception").await;
    advance(app, &shipment, "returned").await;
    // Out of stock: refused and compensated.
    assert_eq!(place("c-3", 2).await.status(), 409);
    // One 503 from the shipper: a retry, then confirmed.
    app.shipment_faults(json!({"failNext": 1, "endpoint": "create"}))
        .await;
    assert_eq!(place("c-4", 1).await.status(), 201);
    // Cancelled by the customer before shipping.
    let r = place("c-5", 1).await;
    let id5 = r.json::<Value>().await.unwrap()["orderID"].as_i64().unwrap();
    assert_eq!(app.cancel(&token, id5).await.status(), 200);
    // A cancel the shipper refuses (409: already picked up on its side).
    let r = place("c-6", 1).await;
    let id6 = r.json::<Value>().await.unwrap()["orderID"].as_i64().unwrap();
    app.shipment_faults(json!({"failNext": 1, "failStatus": 409, "endpoint": "cancel"}))
        .await;
    assert_eq!(app.cancel(&token, id6).await.status(), 409);
    // A record that is no TrackingEvent: dead-lettered, with a copy on the DLQ topic.
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set(
            "bootstrap.servers",
            app.broker.as_ref().unwrap().bootstrap_servers(),
        )
        .create()
        .unwrap();
    producer
        .send(
            rdkafka::producer::FutureRecord::to("shipments.tracking-events")
                .key("42")
                .payload("{\"eventID\": not json"),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    // Wait for the notifications of the exception and the return, and the dead letter's copy.
    for t in [
        "ShipmentException",
        "ShipmentReturned",
        "TrackingEventDeadLettered",
    ] {
        for _ in 0..100 {
            if app
                .count(&format!("select count(*) from outbox where event_type = '{t}'"))
                .await
                > 0
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let rows: Vec<(String, String, String, String)> =
        sqlx::query_as("select topic, event_type, payload::text, headers::text from outbox order by id")
            .fetch_all(&app.db)
            .await
            .unwrap();
    rows.into_iter()
        .map(|(t, e, p, h)| {
            (
                t,
                e,
                serde_json::from_str(&p).unwrap(),
                serde_json::from_str(&h).unwrap(),
            )
        })
        .collect()
}

#[tokio::test]
async fn every_event_the_service_writes_matches_the_asyncapi_document() {
    let doc = asyncapi();
    assert_eq!(doc["asyncapi"], "3.0.0");
    let app = spawn_app_with(AppOptions {
        kafka: true,
        ..Default::default()
    })
    .await;
    let rows = produce_every_event(&app).await;
    let mut seen = BTreeSet::new();
    for (topic, event_type, payload, headers) in &rows {
        // The channel whose address is the topic, and its message for this event type.
        let (channel, _) = doc["channels"]
            .as_object()
            .unwrap()
            .iter()
            .find(|(_, c)| c["address"] == *topic)
            .unwrap_or_else(|| panic!("no channel for topic {topic}"));
        let message = doc["channels"][channel]["messages"][event_type.as_str()]["$ref"]
            .as_str()
            .unwrap_or_else(|| panic!("channel {channel} has no message {event_type}"))
            .trim_start_matches('#')
            .to_string();
        let payload_errors: Vec<String> = validator(&doc, &format!("{message}/payload"))
            .iter_errors(payload)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(
            payload_errors.is_empty(),
            "{event_type} on {topic} does not match {message}: {payload_errors:?}\n{payload}"
        );
        assert_eq!(payload["eventType"], *event_type);
        let header_errors: Vec<String> = validator(&doc, &format!("{message}/headers"))
            .iter_errors(headers)
            .map(|e| e.to_string())
            .collect();
        assert!(
            header_errors.is_empty(),
            "{event_type} headers: {header_errors:?}\n{headers}"
        );
        seen.insert(event_type.clone());
    }
    let expected: BTreeSet<String> = [
        "SagaStarted",
        "StepSucceeded",
        "StepFailed",
        "RetryScheduled",
        "CompensationStarted",
        "CompensationSucceeded",
        "SagaCompleted",
        "SagaFailed",
        "SagaCompensated",
        "CancellationRefused",
        "OrderCreated",
        "OrderConfirmed",
        "OrderCancelled",
        "OrderStatusChanged",
        "ShipmentException",
        "ShipmentReturned",
        "TrackingEventDeadLettered",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    let missing: Vec<_> = expected.difference(&seen).collect();
    assert!(missing.is_empty(), "the scenarios did not produce {missing:?}");
}

#[test]
fn the_consumed_tracking_event_schema_matches_the_rust_type() {
    use ostore_orders::downstream::contract::{TrackingEvent, TrackingStatus};
    let doc = asyncapi();
    let schema = validator(&doc, "/components/messages/TrackingEvent/payload");
    for status in TrackingStatus::ALL {
        let event = TrackingEvent {
            event_id: uuid::Uuid::now_v7().to_string(),
            shipment_id: "shp-1".into(),
            order_id: 42,
            status,
            occurred_at: time::OffsetDateTime::now_utc(),
        };
        let value = serde_json::to_value(&event).unwrap();
        let errors: Vec<String> = schema.iter_errors(&value).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{value}: {errors:?}");
    }
    // The documented statuses are exactly the type's.
    let documented: BTreeSet<&str> = doc["components"]["schemas"]["TrackingStatus"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let rust: BTreeSet<&str> = TrackingStatus::ALL.iter().map(|s| s.as_str()).collect();
    assert_eq!(documented, rust);
    // A shipper's own ids need not be UUIDs (SPEC §5 names the field, not its form); an empty one
    // is refused by the schema as by the consumer (`tracking::record::parse`).
    let own_id = json!({"eventID": "evt-123", "shipmentID": "s", "orderID": 1, "status": "picked_up", "occurredAt": "2026-01-01T00:00:00Z"});
    assert!(serde_json::from_value::<TrackingEvent>(own_id.clone()).is_ok());
    assert!(schema.is_valid(&own_id), "{own_id}");
    let mut empty_id = own_id.clone();
    empty_id["eventID"] = json!("");
    assert!(!schema.is_valid(&empty_id));
    // What the consumer refuses, the schema refuses too.
    for bad in [
        json!({"eventID": 7, "shipmentID": "s", "orderID": 1, "status": "picked_up", "occurredAt": "2026-01-01T00:00:00Z"}),
        json!({"eventID": uuid::Uuid::nil(), "shipmentID": "s", "orderID": 1, "status": "lost", "occurredAt": "2026-01-01T00:00:00Z"}),
        json!({"eventID": uuid::Uuid::nil(), "shipmentID": "s", "status": "created", "occurredAt": "2026-01-01T00:00:00Z"}),
    ] {
        assert!(
            serde_json::from_value::<TrackingEvent>(bad.clone()).is_err(),
            "{bad}"
        );
        assert!(!schema.is_valid(&bad), "{bad}");
    }
}
