//! The asynchronous half end to end: outbox → relay → Kafka; the shipper's TrackingEvents → the
//! consumer → order status and customer notifications on Kafka.

use std::time::Duration;

use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Headers;
use serde_json::{Value, json};

use crate::support::{AppOptions, spawn_app, spawn_app_with};

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

/// A record Kafka refuses for good must not stop the relay. The case as it was found: a 780 KB
/// malformed TrackingEvent is dead-lettered, and its DLQ copy (base64 of all of it) was an outbox
/// row over the producer's 1 MB limit, on which the relay then failed at every pass, publishing
/// nothing else. Now the DLQ copy carries at most 64 KiB of the record, and a row that is refused
/// anyway (here, one written too large on purpose) is set aside in `outbox_dead_letters`, listed
/// by the admin API and replayable, while every other event flows.
#[tokio::test]
async fn a_row_kafka_refuses_is_set_aside_and_every_other_event_is_still_published() {
    let app = spawn_app_with(AppOptions {
        kafka: true,
        ..Default::default()
    })
    .await;
    let bootstrap = app.broker.as_ref().unwrap().bootstrap_servers().to_string();
    let (admin, admin_token) = app.admin().await;
    assert!(admin > 0);

    // The poison as found: 780 KB that are not a TrackingEvent, on the tracking topic.
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .unwrap();
    let junk = format!("{{\"orderID\": 7, \"status\": \"{}", "x".repeat(780_000));
    producer
        .send(
            rdkafka::producer::FutureRecord::to("shipments.tracking-events")
                .key("7")
                .payload(&junk),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    app.eventually_eq("select count(*)::text from dead_letters", "1", 30)
        .await;
    // And a row larger than any producer takes, as a future event type could write.
    app.count(
        "insert into outbox (topic, message_key, event_id, event_type, payload)
         values ('orders.events', '999', gen_random_uuid(), 'Huge',
                 jsonb_build_object('data', repeat('y', 1500000))) returning 1::bigint",
    )
    .await;

    app.product(1, 10, "4.00");
    let (_, token) = app.customer("poison@example.com").await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let r = app
            .place(&token, &format!("p{i}"), json!([{"productID": 1, "quantity": 1}]))
            .await;
        assert_eq!(r.status(), 201);
        ids.push(r.json::<Value>().await.unwrap()["orderID"].as_i64().unwrap());
    }
    for id in &ids {
        app.eventually_eq(
            &format!("select status from orders where order_id = {id}"),
            "confirmed",
            30,
        )
        .await;
    }
    // Nothing stays pending: the DLQ copy and every order event are published; the huge row is
    // set aside.
    app.eventually_eq(
        "select count(*)::text from outbox where id > outbox_published_through()",
        "0",
        20,
    )
    .await;
    let confirmed = read_until(&bootstrap, "orders.events", 20, |s| {
        ids.iter().all(|id| {
            s.iter()
                .any(|(k, v, _)| *k == id.to_string() && v["eventType"] == "OrderConfirmed")
        })
    })
    .await;
    assert!(
        confirmed.iter().all(|(_, v, _)| v["eventType"] != "Huge"),
        "the refused row never reaches the topic"
    );
    let dlq = read_until(&bootstrap, "shipments.tracking-events.dlq", 20, |s| !s.is_empty()).await;
    let copy = &dlq[0].1["data"];
    assert_eq!(copy["payloadTruncated"], true, "{copy}");
    assert_eq!(copy["payloadBytes"].as_u64(), Some(junk.len() as u64));
    assert_eq!(
        copy["payload"].as_str().unwrap().len(),
        (64 * 1024usize).div_ceil(3) * 4,
        "base64 of the first 64 KiB"
    );

    // Operators see it: counted in /admin/outbox, listed, readable whole, replayable.
    let outbox: Value = app.get_json("/admin/outbox", Some(&admin_token)).await;
    assert_eq!(outbox["pending"], 0, "{outbox}");
    assert_eq!(outbox["deadLettered"], 1, "{outbox}");
    let page: Value = app
        .get_json("/admin/outbox/dead-letters", Some(&admin_token))
        .await;
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{page}");
    let item = &items[0];
    assert_eq!(item["eventType"], "Huge");
    assert_eq!(item["key"], "999");
    assert_eq!(item["payloadTruncated"], true);
    assert!(item["payloadBytes"].as_i64().unwrap() > 1_500_000, "{item}");
    assert!(
        item["error"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("too large"),
        "{item}"
    );
    let id = item["id"].as_i64().unwrap();
    let whole: Value = app
        .get_json(&format!("/admin/outbox/dead-letters/{id}"), Some(&admin_token))
        .await;
    assert_eq!(whole["payloadTruncated"], false);
    assert_eq!(
        whole["payload"].as_str().unwrap().len() as i64,
        item["payloadBytes"].as_i64().unwrap()
    );
    assert_eq!(
        app.get("/admin/outbox/dead-letters/123456789", Some(&admin_token))
            .await
            .status(),
        404
    );
    assert_eq!(app.get("/admin/outbox/dead-letters", None).await.status(), 401);

    // A replay puts it back (same eventID); the cause is not fixed, so the relay sets the copy
    // aside again, and nothing else waits meanwhile.
    let r = app
        .post_json(
            &format!("/admin/outbox/dead-letters/{id}/replay"),
            &json!({}),
            Some(&admin_token),
        )
        .await;
    assert_eq!(r.status(), 200);
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["outcome"], "queued", "{answer}");
    assert_ne!(answer["outboxID"].as_i64().unwrap(), id);
    app.eventually_eq(
        "select count(*)::text from outbox_dead_letters where event_type = 'Huge'",
        "2",
        20,
    )
    .await;
    assert_eq!(
        app.count("select count(distinct event_id) from outbox_dead_letters where event_type = 'Huge'")
            .await,
        1,
        "the replayed copy carries the same eventID"
    );
    assert_eq!(
        app.count("select count(*) from audit_log where action = 'outbox_dead_letter.replay'")
            .await,
        1
    );
    app.eventually_eq(
        "select count(*)::text from outbox where id > outbox_published_through()",
        "0",
        20,
    )
    .await;
}

/// Issue 19, end to end: a customer cancels just as the shipper picks the parcel up. Whichever wins
/// the race to the order (the cancel asking the shipper, or the tracking consumer applying
/// `picked_up`), the answer is 409 and the order is never `cancelled`: the tracking consumer moves
/// it to `shipped` and `delivered`, the saga stays (or is back) `completed`, never `stuck`, and no
/// `OrderCancelled` is published.
#[tokio::test]
async fn a_cancel_racing_the_pick_up_is_refused_and_the_order_keeps_travelling() {
    let app = spawn_app_with(AppOptions {
        kafka: true,
        ..Default::default()
    })
    .await;
    app.product(1, 10, "4.00");
    let (_, token) = app.customer("race@example.com").await;
    let r = app
        .place(&token, "k", json!([{"productID": 1, "quantity": 1}]))
        .await;
    assert_eq!(r.status(), 201);
    let body: Value = r.json().await.unwrap();
    let id = body["orderID"].as_i64().unwrap();
    let shipment = body["shipmentID"].as_str().unwrap().to_string();
    let advance = |status: &'static str| {
        let (http, url) = (
            app.http.clone(),
            format!("{}/sim/shipments/{shipment}/advance", app.shipments_url),
        );
        async move {
            let r = http
                .post(url)
                .json(&json!({"status": status}))
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success());
        }
    };
    advance("picked_up").await;
    let c = app.cancel(&token, id).await;
    let p = crate::support::assert_problem(c, 409).await;
    assert!(
        matches!(p["orderStatus"].as_str(), Some("confirmed" | "shipped")),
        "{p}"
    );
    app.eventually_eq(
        &format!("select status from orders where order_id = {id}"),
        "shipped",
        30,
    )
    .await;
    advance("delivered").await;
    app.eventually_eq(
        &format!("select status from orders where order_id = {id}"),
        "delivered",
        30,
    )
    .await;
    app.eventually_eq(
        &format!("select state from sagas where order_id = {id}"),
        "completed",
        10,
    )
    .await;
    assert_eq!(
        app.count("select count(*) from outbox where event_type = 'OrderCancelled'")
            .await,
        0
    );
    assert_eq!(app.reservations().await[0]["status"], "active");
}

/// Replaying a dead letter twice queues one copy: the second replay finds the first copy still in
/// the outbox (by the id it remembered) and does nothing more; once that copy is gone, a replay
/// queues a new one.
#[tokio::test]
async fn a_dead_letter_replayed_twice_is_queued_once() {
    let app = spawn_app().await;
    let id: i64 = sqlx::query_scalar(
        "insert into outbox_dead_letters (id, topic, message_key, event_id, event_type, payload, headers, created_at, error)
         values (-1, 'orders.events', '7', gen_random_uuid(), 'Huge', '{\"x\": 1}', '{}', now(), 'too large')
         returning id",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    let first = ostore_orders::outbox::dead::replay(&app.db, id).await.unwrap();
    let Some(ostore_orders::outbox::dead::Replayed::Queued(copy)) = first else {
        panic!("first replay: {first:?}");
    };
    let second = ostore_orders::outbox::dead::replay(&app.db, id).await.unwrap();
    assert_eq!(
        second,
        Some(ostore_orders::outbox::dead::Replayed::AlreadyQueued(copy))
    );
    assert_eq!(
        app.count("select count(*) from outbox where event_type = 'Huge'")
            .await,
        1
    );
    sqlx::query("delete from outbox where id = $1")
        .bind(copy)
        .execute(&app.db)
        .await
        .unwrap();
    let third = ostore_orders::outbox::dead::replay(&app.db, id).await.unwrap();
    assert!(
        matches!(third, Some(ostore_orders::outbox::dead::Replayed::Queued(n)) if n != copy),
        "{third:?}"
    );
}
