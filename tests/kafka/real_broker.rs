//! The same paths against a real Kafka-protocol broker.

use std::collections::HashMap;
use std::time::Duration;

use crate::fixture::*;
use crate::support::TestDb;
use ostore_orders::downstream::contract::TrackingStatus;
use ostore_orders::kafka::{self, ProducerSettings};
use ostore_orders::outbox::relay::{self};
use ostore_orders::tracking::{self};
use rdkafka::ClientConfig;
use rdkafka::producer::FutureRecord;
use tokio_util::sync::CancellationToken;

/// The same paths against a real Kafka-protocol broker (`scripts/kafka-broker start`, then
/// `TEST_KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092 cargo nextest run --test kafka`; scripts/test does both):
/// topics created through the Admin API, the relay publishing, the consumer group applying events.
#[tokio::test]
async fn the_relay_and_the_tracking_consumer_work_against_a_real_broker() {
    let bootstrap = std::env::var("TEST_KAFKA_BOOTSTRAP_SERVERS")
        .expect("TEST_KAFKA_BOOTSTRAP_SERVERS is not set: run scripts/test, which starts a real broker (scripts/kafka-broker)");
    let t = unique_topics();
    let names = topic_names(&t);
    kafka::ensure_topics_with(&bootstrap, &names, PARTITIONS, Duration::from_secs(10)).await;
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .unwrap();
    let metadata = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(10))
        .unwrap();
    for name in names {
        let topic = metadata.topics().iter().find(|m| m.name() == name);
        assert_eq!(
            topic.map(|m| m.partitions().len()),
            Some(PARTITIONS as usize),
            "topic {name}"
        );
    }

    let db = TestDb::new().await;
    let pool = db.pool_of(6).await;
    let settings = ProducerSettings {
        statistics_interval: Duration::from_millis(200),
        ..ProducerSettings::default()
    };
    let (producer, connectivity) = kafka::producer(&bootstrap, &settings).unwrap();
    let order = insert_order(&pool, "confirmed").await;
    let mut written = Vec::new();
    for event_type in ["OrderCreated", "OrderConfirmed"] {
        written.push(
            write_event(&pool, &t.order_events, event_type, order, &HashMap::new())
                .await
                .to_string(),
        );
    }
    assert_eq!(
        relay::run_once(&pool, &producer, &relay_config()).await.unwrap(),
        2
    );
    eventually(
        Duration::from_secs(20),
        "the producer to report connected",
        || async { connectivity.is_connected() },
    )
    .await;
    let messages = read_topic(&bootstrap, &t.order_events, 2).await;
    assert_eq!(
        messages.iter().map(Received::event_id).collect::<Vec<_>>(),
        written
    );

    let shutdown = CancellationToken::new();
    let consumer = {
        let (pool, bootstrap, topics, token) = (pool.clone(), bootstrap.clone(), t.clone(), shutdown.clone());
        tokio::spawn(async move {
            tracking::run(
                pool,
                consumer_config(Duration::from_secs(30)),
                &bootstrap,
                &topics,
                token,
            )
            .await
            .unwrap();
        })
    };
    let event = body(&tracking_event(order, TrackingStatus::PickedUp));
    producer
        .send(
            FutureRecord::to(&t.tracking_events)
                .key(&order.to_string())
                .payload(&event),
            Duration::from_secs(5),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    eventually(Duration::from_secs(60), "the order to ship", || async {
        order_status(&pool, order).await == "shipped"
    })
    .await;
    shutdown.cancel();
    consumer.await.unwrap();
    assert_eq!(outbox_events(&pool, &t.notifications, order).await.len(), 1);

    // The broker process is SIGKILLed while events are written (a private broker: the shared one
    // never stops under the other tests): they wait in the outbox, and once the same broker is
    // back on its data every one of them is published, by a relay that was never restarted.
    let own = Bus::own_kafka().await;
    let (producer, _) = kafka::producer(&own.bootstrap, &settings).unwrap();
    let before = write_event(
        &pool,
        &own.topics.order_events,
        "OrderCreated",
        order,
        &HashMap::new(),
    )
    .await
    .to_string();
    let stop_relay = CancellationToken::new();
    let relay_task = tokio::spawn(relay::run(
        pool.clone(),
        producer,
        relay_config(),
        stop_relay.clone(),
    ));
    eventually(
        Duration::from_secs(30),
        "the first row to be published",
        || async { pending(&pool).await == 0 },
    )
    .await;
    own.down().await;
    let mut during = Vec::new();
    for _ in 0..20 {
        during.push(
            write_event(
                &pool,
                &own.topics.order_events,
                "OrderStatusChanged",
                order,
                &HashMap::new(),
            )
            .await
            .to_string(),
        );
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let waiting = pending(&pool).await;
    assert!(
        waiting >= 20,
        "nothing can be published while the broker is down ({waiting} pending)"
    );
    own.up().await;
    eventually(
        Duration::from_secs(90),
        "every row published after the broker came back",
        || async { pending(&pool).await == 0 },
    )
    .await;
    stop_relay.cancel();
    relay_task.await.unwrap();
    let after = read_topic(&own.bootstrap, &own.topics.order_events, 21).await;
    let ids: Vec<String> = after.iter().map(Received::event_id).collect();
    for id in std::iter::once(&before).chain(during.iter()) {
        assert!(ids.contains(id), "event {id} lost across the broker's crash");
    }
    // In commit order, once duplicates are dropped.
    let by_key = first_occurrences_by_key(&after);
    let expected: Vec<String> = std::iter::once(before).chain(during).collect();
    assert_eq!(by_key[&order.to_string()], expected);
}
