//! Crashes and outages: a relay or a consumer killed halfway, the broker down and back, the
//! producer noticing, topics that cannot be created.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::fixture::*;
use ostore_orders::downstream::contract::TrackingStatus;
use ostore_orders::kafka::{self, ProducerSettings};
use ostore_orders::outbox::relay::{self};
use ostore_orders::tracking::{self, Outcome, Record};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[tokio::test]
async fn a_relay_killed_between_producing_and_marking_republishes_and_loses_nothing() {
    relay_killed_between_producing_and_marking(Bus::mock()).await;
}

#[tokio::test]
async fn a_relay_killed_between_producing_and_marking_republishes_and_loses_nothing_on_apache_kafka() {
    relay_killed_between_producing_and_marking(Bus::kafka().await).await;
}

async fn relay_killed_between_producing_and_marking(bus: Bus) {
    let f = Fixture::on(bus, 4).await;
    let (pool, producer, t) = (f.pool.clone(), f.producer(), f.topics());
    let mut written = Vec::new();
    for i in 0..5 {
        written.push(
            write_event(
                &pool,
                &t.order_events,
                "OrderCreated",
                100 + i % 2,
                &HashMap::new(),
            )
            .await,
        );
    }

    // A relay that produced the batch and died before marking it.
    let rows = relay::pending_rows(&mut pool.acquire().await.unwrap(), 100)
        .await
        .unwrap();
    let delivered = relay::produce_rows(&producer, &rows).await;
    assert_eq!(delivered.ids.len(), 5);
    assert!(delivered.failure.is_none());
    let backlog = relay::backlog(&mut pool.acquire().await.unwrap()).await.unwrap();
    assert_eq!(backlog.pending, 5, "nothing is marked before the relay marks it");

    // The next relay publishes them again.
    assert_eq!(
        relay::run_once(&pool, &producer, &relay_config()).await.unwrap(),
        5
    );
    let messages = read_topic(f.bootstrap(), &t.order_events, 10).await;
    assert_eq!(messages.len(), 10);
    let mut copies: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
    for m in &messages {
        copies.entry(m.event_id()).or_default().push(m.value.clone());
    }
    assert_eq!(copies.len(), 5, "no event lost");
    for id in &written {
        let c = &copies[&id.to_string()];
        assert_eq!(c.len(), 2, "each event published twice");
        assert_eq!(
            c[0], c[1],
            "a duplicate is the same message, with the same eventID"
        );
    }
    let by_key = first_occurrences_by_key(&messages);
    let expected_100: Vec<String> = written.iter().step_by(2).map(Uuid::to_string).collect();
    assert_eq!(by_key["100"], expected_100);
}

#[tokio::test]
async fn rows_added_while_kafka_is_down_are_all_published_once_it_is_back() {
    rows_added_while_the_broker_is_down(Bus::mock()).await;
}

/// The outage is a crash of the broker process (SIGKILL) and a restart on its data.
#[tokio::test]
async fn rows_added_while_kafka_is_down_are_all_published_once_it_is_back_on_apache_kafka() {
    rows_added_while_the_broker_is_down(Bus::own_kafka().await).await;
}

async fn rows_added_while_the_broker_is_down(bus: Bus) {
    let f = Fixture::on(bus, 6).await;
    let (pool, producer, t) = (f.pool.clone(), f.producer(), f.topics());
    let shutdown = CancellationToken::new();
    let relay_task = tokio::spawn(relay::run(
        pool.clone(),
        producer.clone(),
        relay_config(),
        shutdown.clone(),
    ));

    write_event(&pool, &t.order_events, "OrderCreated", 1, &HashMap::new()).await;
    eventually(
        Duration::from_secs(20),
        "the first row to be published",
        || async {
            count(
                &pool,
                "select count(*) from outbox where id <= outbox_published_through()",
            )
            .await
                == 1
        },
    )
    .await;

    f.bus().down().await;
    let mut written = Vec::new();
    for i in 0..20 {
        written.push(
            write_event(
                &pool,
                &t.order_events,
                "OrderConfirmed",
                2 + i % 4,
                &HashMap::new(),
            )
            .await,
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let backlog = relay::backlog(&mut pool.acquire().await.unwrap()).await.unwrap();
    assert_eq!(
        backlog.pending, 20,
        "nothing is marked published while Kafka is down"
    );
    assert!(backlog.oldest_pending_age_seconds.unwrap() >= 2.0);

    f.bus().up().await;
    until_all_published(
        &pool,
        Duration::from_secs(90),
        "the backlog to drain after the outage",
    )
    .await;
    shutdown.cancel();
    relay_task.await.unwrap();

    let messages = read_topic(f.bootstrap(), &t.order_events, 21).await;
    let ids: HashSet<String> = messages.iter().map(Received::event_id).collect();
    for id in &written {
        assert!(ids.contains(&id.to_string()), "event {id} was lost");
    }
}

#[tokio::test]
async fn a_consumer_killed_after_the_database_commit_and_before_the_offset_commit_gets_the_event_again_and_applies_it_once()
 {
    consumer_killed_after_the_database_commit(Bus::mock()).await;
}

#[tokio::test]
async fn a_consumer_killed_after_the_database_commit_and_before_the_offset_commit_gets_the_event_again_and_applies_it_once_on_apache_kafka()
 {
    consumer_killed_after_the_database_commit(Bus::kafka().await).await;
}

async fn consumer_killed_after_the_database_commit(bus: Bus) {
    let f = Fixture::on(bus, 6).await;
    let (pool, producer, t) = (f.pool.clone(), f.producer(), f.topics());
    let cfg = consumer_config(Duration::from_secs(30));
    let order = insert_order(&pool, "confirmed").await;
    let event = body(&tracking_event(order, TrackingStatus::PickedUp));
    publish_tracking_to(&producer, &t.tracking_events, 0, &order.to_string(), &event, None).await;

    // A member of the group handles the event, commits the database transaction, and dies before
    // committing its offset.
    {
        let mut settings = kafka::ConsumerSettings::new(&cfg.group_id);
        settings.session_timeout = cfg.session_timeout;
        settings.heartbeat_interval = cfg.heartbeat_interval;
        let doomed = kafka::consumer(f.bootstrap(), &settings).unwrap();
        doomed.subscribe(&[t.tracking_events.as_str()]).unwrap();
        let m = tokio::time::timeout(Duration::from_secs(30), doomed.recv())
            .await
            .unwrap()
            .unwrap();
        let headers = headers_of(&m);
        let record = Record {
            topic: m.topic().to_string(),
            partition: Some(m.partition()),
            offset: Some(m.offset()),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().unwrap_or_default().to_vec(),
            headers,
        };
        let outcome = tracking::apply_record(&pool, &cfg, &t, &record).await.unwrap();
        assert!(matches!(outcome, Outcome::Applied { .. }), "{outcome:?}");
    }

    // Its successor in the group gets the event again, and it changes nothing the second time.
    let consumer = RunningConsumer::start_on(&pool, cfg.clone(), f.bootstrap(), &t);
    let probe: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", f.bootstrap())
        .set("group.id", &cfg.group_id)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&t.tracking_events, 0);
    eventually(
        Duration::from_secs(40),
        "the successor to commit past the redelivered event",
        || async {
            let committed = probe.committed_offsets(tpl.clone(), Duration::from_secs(2));
            committed
                .ok()
                .and_then(|c| c.find_partition(&t.tracking_events, 0).map(|p| p.offset()))
                == Some(Offset::Offset(1))
        },
    )
    .await;
    consumer.stop().await;
    assert_eq!(order_status(&pool, order).await, "shipped");
    assert_eq!(
        outbox_events(&pool, &t.notifications, order).await.len(),
        1,
        "applied once"
    );
    assert_eq!(count(&pool, "select count(*) from tracking_inbox").await, 1);
}

#[tokio::test]
async fn the_producer_reports_connected_and_notices_an_outage() {
    let broker = broker();
    let settings = ProducerSettings {
        statistics_interval: Duration::from_millis(200),
        ..ProducerSettings::default()
    };
    let (_producer, connectivity) = kafka::producer(broker.bootstrap_servers(), &settings).unwrap();
    eventually(Duration::from_secs(20), "the producer to connect", || async {
        connectivity.is_connected()
    })
    .await;
    assert!(connectivity.check().is_ok());
    broker.down().unwrap();
    eventually(
        Duration::from_secs(20),
        "the producer to notice the outage",
        || async { !connectivity.is_connected() },
    )
    .await;
    assert!(connectivity.check().is_err());
    broker.up().unwrap();
    eventually(Duration::from_secs(30), "the producer to reconnect", || async {
        connectivity.is_connected()
    })
    .await;
}

#[tokio::test]
async fn ensuring_topics_never_fails_when_the_broker_cannot_create_them() {
    let broker = broker();
    let started = Instant::now();
    // The mock cluster does not implement CreateTopics; an absent broker answers nothing at all.
    kafka::ensure_topics_with(
        broker.bootstrap_servers(),
        &["brand.new"],
        1,
        Duration::from_secs(2),
    )
    .await;
    kafka::ensure_topics_with("127.0.0.1:1", &["brand.new"], 1, Duration::from_secs(2)).await;
    // Topics that exist are left alone without asking the Admin API.
    kafka::ensure_topics(broker.bootstrap_servers(), &[topics().order_events.as_str()]).await;
    assert!(started.elapsed() < Duration::from_secs(20));
}
