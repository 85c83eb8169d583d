//! The asynchronous half end to end: outbox → relay → Kafka; the shipper's TrackingEvents → the
//! consumer → order status and customer notifications on Kafka.

use std::time::Duration;

use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Headers;
use serde_json::{Value, json};

use crate::helpers::{AppOptions, spawn_app_with};

/// Reads every message of a topic from the beginning until `pred` holds (or panics after `secs`).
async fn read_until(
    bootstrap: &str,
    topic: &str,
    secs: u64,
    pred: impl Fn(&[(String, Value, Vec<String>)]) -> bool,
) -> Vec<(String, Value, Vec<String>)> {
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("test-{}", uuid::Uuid::new_v4()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !pred(&seen) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{topic}: condition not met; saw {seen:#?}"
        );
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await {
            let key = String::from_utf8_lossy(m.key().unwrap_or_default()).to_string();
            let value: Value = serde_json::from_slice(m.payload().unwrap_or_default()).unwrap_or(Value::Null);
            let headers = m
                .headers()
                .map(|h| h.iter().map(|x| x.key.to_string()).collect())
                .unwrap_or_default();
            seen.push((key, value, headers));
        }
    }
    seen
}

#[tokio::test]
async fn an_order_walks_to_delivered_with_its_events_and_two_notifications_on_kafka() {
    let app = spawn_app_with(AppOptions {
        kafka: true,
        auto_advance_ms: Some(300),
        ..Default::default()
    })
    .await;
    let bootstrap = app.broker.as_ref().unwrap().bootstrap_servers().to_string();
    app.product(1, 10, "4.00");
    let (uid, token) = app.customer("kafka@example.com").await;
    let r = app
        .place(&token, "k", json!([{"productID": 1, "quantity": 1}]))
        .await;
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().await.unwrap()["orderID"].as_i64().unwrap();
    app.eventually_eq(
        &format!("select status from orders where order_id = {id}"),
        "delivered",
        30,
    )
    .await;

    // Order events, keyed by orderID, in commit order, in the envelope, with trace headers.
    let key = id.to_string();
    let orders = read_until(&bootstrap, "orders.events", 20, |s| {
        s.iter()
            .any(|(k, v, _)| *k == key && v["eventType"] == "OrderConfirmed")
    })
    .await;
    let types: Vec<&str> = orders
        .iter()
        .filter(|(k, _, _)| *k == key)
        .map(|(_, v, _)| v["eventType"].as_str().unwrap())
        .collect();
    assert_eq!(&types[..2], ["OrderCreated", "OrderConfirmed"]);
    let (_, first, headers) = &orders[0];
    for f in [
        "eventID",
        "eventType",
        "eventVersion",
        "occurredAt",
        "orderID",
        "sagaID",
        "data",
    ] {
        assert!(first.get(f).is_some(), "envelope field {f} missing: {first}");
    }
    // (`traceparent` is checked by tests/trace.rs, which installs the OpenTelemetry layer.)
    for h in ["event-type", "event-id"] {
        assert!(headers.iter().any(|x| x == h), "header {h} missing: {headers:?}");
    }
    let saga = read_until(&bootstrap, "orders.saga-events", 20, |s| {
        s.iter().any(|(_, v, _)| v["eventType"] == "SagaCompleted")
    })
    .await;
    assert_eq!(saga[0].1["eventType"], "SagaStarted");

    // Notifications: shipped, then delivered.
    let notes = read_until(&bootstrap, "users.notifications", 30, |s| {
        s.iter().any(|(_, v, _)| v["data"]["status"] == "delivered")
    })
    .await;
    let statuses: Vec<(&str, &str)> = notes
        .iter()
        .filter(|(k, _, _)| *k == key)
        .filter(|(_, v, _)| v["eventType"] == "OrderStatusChanged")
        .map(|(_, v, _)| {
            (
                v["data"]["previousStatus"].as_str().unwrap(),
                v["data"]["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(statuses, [("confirmed", "shipped"), ("shipped", "delivered")]);
    assert!(notes.iter().all(|(_, v, _)| v["data"]["userID"] == uid));
}
