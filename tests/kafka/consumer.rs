//! The tracking consumer reading TrackingEvents from the broker: statuses, notifications, dead
//! letters, parked events, batches.

use std::time::Duration;

use crate::fixture::*;
use ostore_orders::downstream::contract::TrackingStatus;
use ostore_orders::outbox::relay::{self};
use ostore_orders::tracking::{self};
use serde_json::Value;

#[tokio::test]
async fn picked_up_and_in_transit_then_delivered_ship_and_deliver_the_order_with_two_notifications() {
    let _telemetry =
        ostore_orders::telemetry::init("ostore-orders-test", ostore_orders::telemetry::LogFormat::Pretty);
    let f = Fixture::new(6).await;
    let (pool, producer, t) = (f.pool.clone(), f.producer(), f.topics());
    let order = insert_order(&pool, "confirmed").await;
    let consumer = f.start_consumer(Duration::from_secs(30));

    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let key = order.to_string();
    for status in [
        TrackingStatus::Created,
        TrackingStatus::PickedUp,
        TrackingStatus::InTransit,
    ] {
        publish_tracking(
            &producer,
            1,
            &key,
            &body(&tracking_event(order, status)),
            Some(traceparent),
        )
        .await;
    }
    wait_status(&pool, order, "shipped", "the order to ship").await;
    publish_tracking(
        &producer,
        1,
        &key,
        &body(&tracking_event(order, TrackingStatus::Delivered)),
        Some(traceparent),
    )
    .await;
    wait_status(&pool, order, "delivered", "the order to be delivered").await;
    consumer.stop().await;

    let notifications = outbox_events(&pool, &t.notifications, order).await;
    assert_eq!(notifications.len(), 2, "{notifications:?}");
    let user: i32 = sqlx::query_scalar!("select user_id from orders where order_id = $1", order)
        .fetch_one(&pool)
        .await
        .unwrap();
    for ((event_type, payload), (status, previous)) in notifications
        .iter()
        .zip([("shipped", "confirmed"), ("delivered", "shipped")])
    {
        assert_eq!(event_type, "OrderStatusChanged");
        assert_eq!(payload["eventType"], "OrderStatusChanged");
        assert_eq!(payload["orderID"], order);
        assert_eq!(payload["data"]["userID"], user);
        assert_eq!(payload["data"]["status"], status);
        assert_eq!(payload["data"]["previousStatus"], previous);
        assert!(payload["data"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let lifecycle = outbox_events(&pool, &t.order_events, order).await;
    assert_eq!(
        lifecycle.len(),
        2,
        "status changes also go to the order lifecycle topic"
    );
    // The notifications continue the shipper's trace.
    let headers: Vec<Value> = sqlx::query_scalar!(
        "select headers from outbox where topic = $1 and message_key = $2",
        t.notifications,
        key
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    for h in headers {
        let tp = h["traceparent"]
            .as_str()
            .expect("a traceparent on the notification");
        assert!(
            tp.contains("0af7651916cd43dd8448eb211c80319c"),
            "{tp} is not in the shipper's trace"
        );
    }
    assert_eq!(count(&pool, "select count(*) from tracking_inbox").await, 4);
}

#[tokio::test]
async fn a_malformed_event_is_dead_lettered_and_the_next_event_on_its_partition_is_applied() {
    let f = Fixture::new(6).await;
    let (pool, producer, t) = (f.pool.clone(), f.producer(), f.topics());
    let order = insert_order(&pool, "confirmed").await;
    let consumer = f.start_consumer(Duration::from_secs(30));

    let garbage = b"{\"eventID\": not json at all \xff";
    publish_tracking(&producer, 0, &order.to_string(), garbage, None).await;
    publish_status(&producer, 0, order, TrackingStatus::PickedUp).await;
    wait_status(
        &pool,
        order,
        "shipped",
        "the event after the malformed one to apply",
    )
    .await;
    consumer.stop().await;

    let letter =
        sqlx::query!(r#"select id, topic, partition, "offset", key, payload, reason from dead_letters"#)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(letter.payload, garbage.to_vec(), "the raw bytes are kept");
    assert_eq!(
        (letter.topic.as_str(), letter.partition, letter.offset),
        (t.tracking_events.as_str(), Some(0), Some(0))
    );
    assert_eq!(letter.key, Some(order.to_string().into_bytes()));
    assert!(letter.reason.contains("malformed"), "{}", letter.reason);

    let page = tracking::list_dead_letters(&mut pool.acquire().await.unwrap(), 10, None)
        .await
        .unwrap();
    assert_eq!(page.items.len(), 1);
    assert_eq!(page.items[0].id, letter.id);
    assert!(page.next_cursor.is_none());

    // The copy on the DLQ topic.
    relay::run_once(&pool, &producer, &relay_config()).await.unwrap();
    let dlq = read_topic(f.bootstrap(), &t.tracking_dlq, 1).await;
    assert_eq!(dlq.len(), 1);
    let v = dlq[0].json();
    assert_eq!(v["eventType"], "TrackingEventDeadLettered");
    assert_eq!(v["orderID"], order);
    assert_eq!(v["data"]["deadLetterID"], letter.id);
    use base64::Engine as _;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(v["data"]["payload"].as_str().unwrap())
        .unwrap();
    assert_eq!(raw, garbage.to_vec());
}

#[tokio::test]
async fn an_event_the_database_refuses_is_dead_lettered_instead_of_blocking_its_partition() {
    let f = Fixture::new(6).await;
    let (pool, producer) = (f.pool.clone(), f.producer());
    let (first, second) = (
        insert_order(&pool, "confirmed").await,
        insert_order(&pool, "confirmed").await,
    );
    refuse_in_database(&pool, first, "picked_up").await;
    let consumer = f.start_consumer(Duration::from_secs(30));

    let refused = tracking_event(first, TrackingStatus::PickedUp);
    publish_tracking(&producer, 1, &first.to_string(), &body(&refused), None).await;
    publish_status(&producer, 1, second, TrackingStatus::PickedUp).await;
    wait_status(
        &pool,
        second,
        "shipped",
        "the event behind the refused one to apply",
    )
    .await;
    consumer.stop().await;
    let reason: String = sqlx::query_scalar!("select reason from dead_letters")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(reason.contains("database refused"), "{reason}");
    assert_eq!(
        order_status(&pool, first).await,
        "confirmed",
        "nothing of the refused event was applied"
    );
}

#[tokio::test]
async fn an_event_for_an_unknown_order_is_applied_once_the_order_appears_and_holds_up_nothing() {
    let f = Fixture::new(6).await;
    let (pool, producer) = (f.pool.clone(), f.producer());
    let known = insert_order(&pool, "confirmed").await;
    let unknown = 900_001;
    let consumer = f.start_consumer(Duration::from_secs(60));

    publish_status(&producer, 2, unknown, TrackingStatus::PickedUp).await;
    publish_status(&producer, 2, known, TrackingStatus::PickedUp).await;
    wait_status(
        &pool,
        known,
        "shipped",
        "the event behind the unknown order's to apply",
    )
    .await;
    assert_eq!(
        count(&pool, "select count(*) from tracking_retries").await,
        1,
        "the unknown order's event waits"
    );

    insert_order_with_id(&pool, unknown, "confirmed").await;
    wait_status(&pool, unknown, "shipped", "the parked event to apply").await;
    consumer.stop().await;
    assert_eq!(count(&pool, "select count(*) from tracking_retries").await, 0);
    assert_eq!(count(&pool, "select count(*) from dead_letters").await, 0);
    assert_eq!(
        outbox_events(&pool, &topics().notifications, unknown).await.len(),
        1
    );
}

#[tokio::test]
async fn an_event_for_an_order_another_transaction_holds_waits_without_blocking_and_applies_after() {
    let f = Fixture::new(6).await;
    let (pool, producer) = (f.pool.clone(), f.producer());
    let held = insert_order(&pool, "confirmed").await;
    let free = insert_order(&pool, "confirmed").await;
    // A saga's transaction holds the order row (as when it confirms the order).
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("select 1 from orders where order_id = $1 for update")
        .bind(held)
        .execute(&mut *holder)
        .await
        .unwrap();
    let consumer = f.start_consumer(Duration::from_secs(60));
    for order in [held, free] {
        publish_status(&producer, 2, order, TrackingStatus::PickedUp).await;
    }
    // The other order's event is applied while the row is held: the consumer did not wait on it.
    wait_status(&pool, free, "shipped", "the free order's event to apply").await;
    eventually(
        Duration::from_secs(30),
        "the held order's event to be parked",
        || async { count(&pool, "select count(*) from tracking_retries").await == 1 },
    )
    .await;
    holder.rollback().await.unwrap();
    wait_status(&pool, held, "shipped", "the parked event to apply").await;
    consumer.stop().await;
    assert_eq!(count(&pool, "select count(*) from tracking_retries").await, 0);
    assert_eq!(count(&pool, "select count(*) from dead_letters").await, 0);
    assert_eq!(outbox_events(&pool, &topics().notifications, held).await.len(), 1);
}

#[tokio::test]
async fn a_backlog_with_a_refused_event_duplicates_and_an_unknown_order_is_applied_in_batches() {
    let f = Fixture::new(6).await;
    let (pool, producer, t) = (f.pool.clone(), f.producer(), f.topics());
    let mut orders = Vec::new();
    for _ in 0..30 {
        orders.push(insert_order(&pool, "confirmed").await);
    }
    let refused_order = orders[7];
    refuse_in_database(&pool, refused_order, "picked_up").await;
    let unknown = 900_011;
    // The whole backlog is on the topic before the consumer starts, so it comes in batches.
    for status in [TrackingStatus::PickedUp, TrackingStatus::Delivered] {
        for &order in &orders {
            let event = tracking_event(order, status);
            let payload = body(&event);
            let partition = order % PARTITIONS;
            publish_tracking(&producer, partition, &order.to_string(), &payload, None).await;
            if order % 4 == 0 && order != refused_order {
                publish_tracking(&producer, partition, &order.to_string(), &payload, None).await;
            }
        }
        publish_tracking(
            &producer,
            0,
            &unknown.to_string(),
            &body(&tracking_event(unknown, status)),
            None,
        )
        .await;
    }
    let consumer = f.start_consumer(Duration::from_secs(60));
    eventually(Duration::from_secs(60), "every order to be delivered", || async {
        count(&pool, "select count(*) from orders where status = 'delivered'").await == 30
    })
    .await;
    consumer.stop().await;
    let letters: Vec<String> = sqlx::query_scalar("select reason from dead_letters")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert!(letters[0].contains("database refused"), "{letters:?}");
    assert_eq!(
        count(&pool, "select count(*) from tracking_retries").await,
        2,
        "the unknown order's events wait"
    );
    assert_eq!(
        count(&pool, "select count(*) from tracking_inbox").await,
        59,
        "each applied event once, the refused one not at all"
    );
    assert!(
        count(&pool, "select count(distinct processed_at) from tracking_inbox").await < 59,
        "events share transactions (their inbox rows share a transaction timestamp)"
    );
    for &order in &orders {
        let n = outbox_events(&pool, &t.notifications, order).await.len();
        assert_eq!(n, if order == refused_order { 1 } else { 2 }, "order {order}");
    }
}
