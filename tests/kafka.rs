//! The asynchronous half of the service against real PostgreSQL (a fresh database per test): the
//! outbox relay publishing to Kafka, and the tracking consumer applying TrackingEvents.
//!
//! Most tests use librdkafka's mock cluster in process (the broker `dev` embeds). The ones that
//! replay the relay after a crash, take the broker down, or kill a consumer group member run
//! against **Apache Kafka** as well (`..._on_apache_kafka`): the shared broker `scripts/test` starts
//! (`TEST_KAFKA_BOOTSTRAP_SERVERS`, with topics of the test's own), or, for an outage, a private
//! broker the test starts and crashes itself (`TEST_KAFKA_BROKER_SCRIPT`), so the shared one never
//! stops under the other tests.

mod support;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::time::{Duration, Instant};

use ostore_orders::contract::{TrackingEvent, TrackingStatus};
use ostore_orders::kafka::{self, EmbeddedBroker, ProducerSettings};
use ostore_orders::outbox::relay::{self, RelayConfig};
use ostore_orders::outbox::{NewEvent, Topics, enqueue};
use ostore_orders::tracking::{self, ConsumerConfig, Outcome, Record};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::{Value, json};
use sqlx::PgPool;
use support::TestDb;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const PARTITIONS: i32 = 3;

fn topics() -> Topics {
    Topics::default()
}

fn broker() -> EmbeddedBroker {
    let t = topics();
    EmbeddedBroker::start_with(
        &[
            &t.order_events,
            &t.saga_events,
            &t.tracking_events,
            &t.notifications,
            &t.tracking_dlq,
        ],
        PARTITIONS,
    )
    .unwrap()
}

fn producer(broker: &EmbeddedBroker) -> kafka::Producer {
    producer_to(broker.bootstrap_servers())
}

fn producer_to(bootstrap: &str) -> kafka::Producer {
    let settings = ProducerSettings {
        message_timeout: Duration::from_secs(5),
        statistics_interval: Duration::from_millis(200),
        ..ProducerSettings::default()
    };
    kafka::producer(bootstrap, &settings).unwrap().0
}

/// The broker a test meets: librdkafka's mock cluster in this process, the shared Apache Kafka
/// (topics of the test's own), or a private Apache Kafka the test may crash and restart.
struct Bus {
    bootstrap: String,
    topics: Topics,
    mock: Option<EmbeddedBroker>,
    own: Option<OwnKafka>,
}

/// Topics no other test uses (on the shared broker).
fn unique_topics() -> Topics {
    let suffix = Uuid::new_v4().simple().to_string();
    Topics {
        order_events: format!("orders.events.{suffix}"),
        saga_events: format!("orders.saga-events.{suffix}"),
        tracking_events: format!("shipments.tracking-events.{suffix}"),
        notifications: format!("users.notifications.{suffix}"),
        tracking_dlq: format!("shipments.tracking-events.dlq.{suffix}"),
    }
}

fn topic_names(t: &Topics) -> [&str; 5] {
    [
        t.order_events.as_str(),
        t.saga_events.as_str(),
        t.tracking_events.as_str(),
        t.notifications.as_str(),
        t.tracking_dlq.as_str(),
    ]
}

impl Bus {
    fn mock() -> Bus {
        let broker = broker();
        Bus {
            bootstrap: broker.bootstrap_servers().to_string(),
            topics: topics(),
            mock: Some(broker),
            own: None,
        }
    }

    /// The shared Apache Kafka of `scripts/test`, with fresh topics.
    async fn kafka() -> Bus {
        let bootstrap = std::env::var("TEST_KAFKA_BOOTSTRAP_SERVERS").expect(
            "TEST_KAFKA_BOOTSTRAP_SERVERS is not set: run scripts/test, which starts Apache Kafka (scripts/kafka-broker)",
        );
        Bus::real(bootstrap, unique_topics(), None).await
    }

    /// An Apache Kafka of the test's own (it may crash it), with the default topics.
    async fn own_kafka() -> Bus {
        let own = tokio::task::spawn_blocking(OwnKafka::start).await.unwrap();
        Bus::real(own.bootstrap.clone(), topics(), Some(own)).await
    }

    async fn real(bootstrap: String, topics: Topics, own: Option<OwnKafka>) -> Bus {
        kafka::ensure_topics_with(
            &bootstrap,
            &topic_names(&topics),
            PARTITIONS,
            Duration::from_secs(20),
        )
        .await;
        Bus {
            bootstrap,
            topics,
            mock: None,
            own,
        }
    }

    fn producer(&self) -> kafka::Producer {
        producer_to(&self.bootstrap)
    }

    /// An outage: the mock closes every connection; Apache Kafka is SIGKILLed (a crash).
    async fn down(&self) {
        match (&self.mock, &self.own) {
            (Some(m), _) => m.down().unwrap(),
            (None, Some(k)) => k.run("kill").await,
            (None, None) => panic!("the shared broker never goes down"),
        }
    }

    /// The same broker back, with its records.
    async fn up(&self) {
        match (&self.mock, &self.own) {
            (Some(m), _) => m.up().unwrap(),
            (None, Some(k)) => k.run("start").await,
            (None, None) => panic!("the shared broker never goes down"),
        }
    }
}

/// A private Apache Kafka (`scripts/kafka-broker` on a port and directory of its own), stopped
/// and removed when dropped.
struct OwnKafka {
    script: String,
    port: u16,
    dir: std::path::PathBuf,
    bootstrap: String,
}

impl OwnKafka {
    fn start() -> OwnKafka {
        let script = std::env::var("TEST_KAFKA_BROKER_SCRIPT")
            .expect("TEST_KAFKA_BROKER_SCRIPT is not set: run scripts/test (it names scripts/kafka-broker)");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("ostore-test-kafka-{}", Uuid::new_v4().simple()));
        let own = OwnKafka {
            script,
            port,
            dir,
            bootstrap: format!("127.0.0.1:{port}"),
        };
        broker_script(&own.script, own.port, &own.dir, "start", false);
        own
    }

    /// Runs a command of the script on this broker (`kill`, `start`: its data is kept).
    async fn run(&self, cmd: &'static str) {
        let (script, port, dir) = (self.script.clone(), self.port, self.dir.clone());
        tokio::task::spawn_blocking(move || broker_script(&script, port, &dir, cmd, true))
            .await
            .unwrap();
    }
}

fn broker_script(script: &str, port: u16, dir: &std::path::Path, cmd: &str, keep_data: bool) {
    let mut c = std::process::Command::new(script);
    c.arg(cmd)
        .env("KAFKA_BROKER_PORT", port.to_string())
        .env("KAFKA_BROKER_DIR", dir)
        .stdout(std::process::Stdio::null());
    if keep_data {
        c.env("KAFKA_BROKER_KEEP_DATA", "1");
    }
    let ok = c.status().unwrap().success();
    assert!(
        ok,
        "kafka-broker {cmd} failed (log: {})",
        dir.join("log").display()
    );
}

impl Drop for OwnKafka {
    fn drop(&mut self) {
        let _ = std::process::Command::new(&self.script)
            .arg("stop")
            .env("KAFKA_BROKER_PORT", self.port.to_string())
            .env("KAFKA_BROKER_DIR", &self.dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn relay_config() -> RelayConfig {
    RelayConfig {
        batch_size: 100,
        poll_interval: Duration::from_millis(200),
        standby_interval: Duration::from_millis(200),
        backoff_min: Duration::from_millis(100),
        backoff_max: Duration::from_secs(1),
        ..RelayConfig::default()
    }
}

fn consumer_config(window: Duration) -> ConsumerConfig {
    ConsumerConfig {
        group_id: format!("tracking-{}", Uuid::new_v4().simple()),
        unknown_order_window: window,
        retry_initial_delay: Duration::from_millis(100),
        retry_max_delay: Duration::from_millis(300),
        retry_poll_interval: Duration::from_millis(100),
        commit_interval: Duration::from_millis(200),
        session_timeout: Duration::from_secs(6),
        heartbeat_interval: Duration::from_millis(500),
        batch_size: 500,
    }
}

/// Polls `check` until it returns true, or fails the test after `timeout`.
async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A message as read back from a topic.
#[derive(Debug, Clone)]
struct Received {
    partition: i32,
    key: String,
    value: Vec<u8>,
    headers: HashMap<String, String>,
}

impl Received {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.value).expect("a JSON value")
    }

    fn event_id(&self) -> String {
        self.json()["eventID"].as_str().unwrap().to_string()
    }
}

/// Reads every partition of `topic` from the beginning until `at_least` messages arrived (then
/// waits a little longer for any extra ones).
async fn read_topic(bootstrap: &str, topic: &str, at_least: usize) -> Vec<Received> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("reader-{}", Uuid::new_v4().simple()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut settle: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if settle.is_some_and(|s| now >= s) || now >= deadline {
            break;
        }
        let until = settle.unwrap_or(deadline);
        match tokio::time::timeout(until - now, consumer.recv()).await {
            Ok(Ok(m)) => {
                let mut headers = HashMap::new();
                if let Some(h) = m.headers() {
                    for header in h.iter() {
                        headers.insert(
                            header.key.to_string(),
                            String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned(),
                        );
                    }
                }
                out.push(Received {
                    partition: m.partition(),
                    key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                    value: m.payload().unwrap_or_default().to_vec(),
                    headers,
                });
                if out.len() >= at_least && settle.is_none() {
                    settle = Some(Instant::now() + Duration::from_millis(500));
                }
            }
            Ok(Err(e)) => panic!("reading {topic}: {e}"),
            Err(_) => break,
        }
    }
    assert!(
        out.len() >= at_least,
        "read {} of {at_least} messages from {topic}",
        out.len()
    );
    out
}

/// Groups messages by key, keeping each key's eventIDs in log order with duplicates removed
/// (what a consumer that deduplicates by eventID sees).
fn first_occurrences_by_key(messages: &[Received]) -> HashMap<String, Vec<String>> {
    let mut seen = HashSet::new();
    let mut by_key: HashMap<String, Vec<String>> = HashMap::new();
    for m in messages {
        let id = m.event_id();
        if seen.insert(id.clone()) {
            by_key.entry(m.key.clone()).or_default().push(id);
        }
    }
    by_key
}

async fn insert_user(pool: &PgPool) -> i32 {
    sqlx::query_scalar!(
        "insert into users (email, password_hash, role) values ($1, 'not-a-hash', 'user') returning user_id",
        format!("{}@example.test", Uuid::new_v4().simple())
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Inserts an order with `status` (and its user) the way the saga leaves it; returns its id.
async fn insert_order(pool: &PgPool, status: &str) -> i32 {
    let user = insert_user(pool).await;
    sqlx::query_scalar!(
        "insert into orders (user_id, status, saga_id, shipment_id) values ($1, $2, $3, 'shp-1') returning order_id",
        user,
        status,
        Uuid::new_v4()
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn insert_order_with_id(pool: &PgPool, order_id: i32, status: &str) {
    let user = insert_user(pool).await;
    sqlx::query!(
        "insert into orders (order_id, user_id, status, saga_id) values ($1, $2, $3, $4)",
        order_id,
        user,
        status,
        Uuid::new_v4()
    )
    .execute(pool)
    .await
    .unwrap();
}

async fn order_status(pool: &PgPool, order_id: i32) -> String {
    sqlx::query_scalar!("select status from orders where order_id = $1", order_id)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The outbox rows of one topic and order, oldest first: (eventType, payload).
async fn outbox_events(pool: &PgPool, topic: &str, order_id: i32) -> Vec<(String, Value)> {
    sqlx::query!(
        "select event_type, payload from outbox where topic = $1 and message_key = $2 order by id",
        topic,
        order_id.to_string()
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .map(|r| (r.event_type, r.payload))
    .collect()
}

/// Writes one event for `order_id` in a transaction of its own.
async fn write_event(
    pool: &PgPool,
    topic: &str,
    event_type: &str,
    order_id: i32,
    trace: &HashMap<String, String>,
) -> Uuid {
    let event = NewEvent::new(
        topic,
        event_type,
        order_id,
        Some(Uuid::now_v7()),
        json!({"n": event_type}),
        trace,
    );
    let id = event.envelope.event_id;
    let mut tx = pool.begin().await.unwrap();
    enqueue(&mut tx, &[event]).await.unwrap();
    tx.commit().await.unwrap();
    id
}

fn tracking_event(order_id: i32, status: TrackingStatus) -> TrackingEvent {
    TrackingEvent {
        event_id: Uuid::now_v7(),
        shipment_id: "shp-1".into(),
        order_id,
        status,
        occurred_at: OffsetDateTime::now_utc(),
    }
}

fn body(event: &TrackingEvent) -> Vec<u8> {
    serde_json::to_vec(event).unwrap()
}

/// Publishes a TrackingEvent the way the shipper does (key = orderID) to one partition.
async fn publish_tracking(
    producer: &kafka::Producer,
    partition: i32,
    key: &str,
    payload: &[u8],
    traceparent: Option<&str>,
) {
    publish_tracking_to(
        producer,
        &topics().tracking_events,
        partition,
        key,
        payload,
        traceparent,
    )
    .await;
}

async fn publish_tracking_to(
    producer: &kafka::Producer,
    topic: &str,
    partition: i32,
    key: &str,
    payload: &[u8],
    traceparent: Option<&str>,
) {
    let mut headers = OwnedHeaders::new().insert(Header {
        key: "event-type",
        value: Some("TrackingEvent"),
    });
    if let Some(tp) = traceparent {
        headers = headers.insert(Header {
            key: "traceparent",
            value: Some(tp),
        });
    }
    producer
        .send(
            FutureRecord::to(topic)
                .partition(partition)
                .key(key)
                .payload(payload)
                .headers(headers),
            Duration::from_secs(5),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
}

/// Publishes a well-formed TrackingEvent for `order` (keyed by the order, no traceparent).
async fn publish_status(producer: &kafka::Producer, partition: i32, order: i32, status: TrackingStatus) {
    publish_tracking(
        producer,
        partition,
        &order.to_string(),
        &body(&tracking_event(order, status)),
        None,
    )
    .await;
}

/// The tracking consumer, running until dropped.
struct RunningConsumer {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl RunningConsumer {
    fn start(pool: &PgPool, cfg: ConsumerConfig, broker: &EmbeddedBroker) -> Self {
        Self::start_on(pool, cfg, broker.bootstrap_servers(), &topics())
    }

    fn start_on(pool: &PgPool, cfg: ConsumerConfig, bootstrap: &str, topics: &Topics) -> Self {
        let shutdown = CancellationToken::new();
        let (pool, bootstrap, topics, token) = (
            pool.clone(),
            bootstrap.to_string(),
            topics.clone(),
            shutdown.clone(),
        );
        let task = tokio::spawn(async move {
            tracking::run(pool, cfg, &bootstrap, &topics, token)
                .await
                .unwrap();
        });
        RunningConsumer { shutdown, task }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

/// Makes PostgreSQL refuse to record `status` events of `order` (a check constraint on the inbox,
/// SQLSTATE 23514), as it refuses any event it cannot store.
async fn refuse_in_database(pool: &PgPool, order: i32, status: &str) {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "alter table tracking_inbox add constraint refused_in_this_test
           check (not (order_id = {order} and tracking_status = '{status}'))"
    )))
    .execute(pool)
    .await
    .unwrap();
}

/// Rows the relay has not published yet.
async fn pending(pool: &PgPool) -> i64 {
    relay::backlog(&mut pool.acquire().await.unwrap())
        .await
        .unwrap()
        .pending
}

/// Applies one TrackingEvent (no Kafka headers) as the consumer does.
async fn apply(pool: &PgPool, cfg: &ConsumerConfig, event: &[u8]) -> Outcome {
    tracking::apply_event(pool, cfg, &topics(), event, &HashMap::new())
        .await
        .unwrap()
}

async fn count(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar::<_, i64>(sql).fetch_one(pool).await.unwrap()
}

// ---------------------------------------------------------------------------------------------
// Outbox relay
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_orders_outbox_rows_arrive_in_commit_order_keyed_by_order_id_with_envelope_and_headers() {
    let db = TestDb::new().await;
    let pool = db.pool_of(4).await;
    let broker = broker();
    let producer = producer(&broker);
    let t = topics();
    let trace = HashMap::from([(
        "traceparent".to_string(),
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_string(),
    )]);
    let mut expected = Vec::new();
    for event_type in ["OrderCreated", "OrderConfirmed", "OrderCancelled"] {
        expected.push(write_event(&pool, &t.order_events, event_type, 42, &trace).await);
    }
    // Another order's event in between, on the same topic.
    write_event(&pool, &t.order_events, "OrderCreated", 7, &trace).await;

    let published = relay::run_once(&pool, &producer, &relay_config()).await.unwrap();
    assert_eq!(published, 4);
    let backlog = relay::backlog(&mut pool.acquire().await.unwrap()).await.unwrap();
    assert_eq!((backlog.pending, backlog.oldest_pending_age_seconds), (0, None));
    assert_eq!(backlog.published_last_minute, 4);

    let messages = read_topic(broker.bootstrap_servers(), &t.order_events, 4).await;
    assert_eq!(messages.len(), 4, "each row is published once");
    let of_42: Vec<&Received> = messages.iter().filter(|m| m.key == "42").collect();
    let ids: Vec<String> = of_42.iter().map(|m| m.event_id()).collect();
    let expected: Vec<String> = expected.iter().map(Uuid::to_string).collect();
    assert_eq!(ids, expected, "one order's events arrive in commit order");
    assert!(of_42.iter().all(|m| m.partition == of_42[0].partition));
    for (m, event_type) in of_42
        .iter()
        .zip(["OrderCreated", "OrderConfirmed", "OrderCancelled"])
    {
        let v = m.json();
        assert_eq!(v["eventType"], event_type);
        assert_eq!(v["eventVersion"], 1);
        assert_eq!(v["orderID"], 42);
        assert!(v["sagaID"].is_string() && v["occurredAt"].is_string());
        assert_eq!(v["data"], json!({"n": event_type}));
        assert_eq!(m.headers["event-type"], event_type);
        assert_eq!(m.headers["event-id"], v["eventID"].as_str().unwrap());
        assert_eq!(m.headers["traceparent"], trace["traceparent"]);
    }
}

#[tokio::test]
async fn a_relay_killed_between_producing_and_marking_republishes_and_loses_nothing() {
    relay_killed_between_producing_and_marking(Bus::mock()).await;
}

#[tokio::test]
async fn a_relay_killed_between_producing_and_marking_republishes_and_loses_nothing_on_apache_kafka() {
    relay_killed_between_producing_and_marking(Bus::kafka().await).await;
}

async fn relay_killed_between_producing_and_marking(bus: Bus) {
    let db = TestDb::new().await;
    let pool = db.pool_of(4).await;
    let producer = bus.producer();
    let t = bus.topics.clone();
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
    let rows = relay::pending_rows(&mut pool.acquire().await.unwrap(), 0, 100)
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
    let messages = read_topic(&bus.bootstrap, &t.order_events, 10).await;
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
    let db = TestDb::new().await;
    let pool = db.pool_of(6).await;
    let producer = bus.producer();
    let t = bus.topics.clone();
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
                "select count(*) from outbox where published_at is not null",
            )
            .await
                == 1
        },
    )
    .await;

    bus.down().await;
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

    bus.up().await;
    eventually(
        Duration::from_secs(90),
        "the backlog to drain after the outage",
        || async { count(&pool, "select count(*) from outbox where published_at is null").await == 0 },
    )
    .await;
    shutdown.cancel();
    relay_task.await.unwrap();

    let messages = read_topic(&bus.bootstrap, &t.order_events, 21).await;
    let ids: HashSet<String> = messages.iter().map(Received::event_id).collect();
    for id in &written {
        assert!(ids.contains(&id.to_string()), "event {id} was lost");
    }
}

#[tokio::test]
async fn two_relays_at_once_keep_each_orders_events_in_order() {
    let db = TestDb::new().await;
    let pool = db.pool_of(12).await;
    let broker = broker();
    let t = topics();
    let (shutdown_a, shutdown_b) = (CancellationToken::new(), CancellationToken::new());

    // 500 orders, 3 events each, written by 5 concurrent writers in transactions of their own.
    let mut writers = Vec::new();
    for w in 0..5 {
        let (pool, topic) = (pool.clone(), t.order_events.clone());
        writers.push(tokio::spawn(async move {
            let mut expected: Vec<(i32, Uuid)> = Vec::new();
            for step in ["OrderCreated", "OrderConfirmed", "OrderStatusChanged"] {
                for order in (1 + w * 100)..=(100 + w * 100) {
                    expected.push((
                        order,
                        write_event(&pool, &topic, step, order, &HashMap::new()).await,
                    ));
                }
            }
            expected
        }));
    }
    // Relay A starts first, so it leads; B stands by.
    let relay_a = tokio::spawn(relay::run(
        pool.clone(),
        producer(&broker),
        relay_config(),
        shutdown_a.clone(),
    ));
    eventually(Duration::from_secs(20), "relay A to publish", || async {
        count(
            &pool,
            "select count(*) from outbox where published_at is not null",
        )
        .await
            > 0
    })
    .await;
    let relay_b = tokio::spawn(relay::run(
        pool.clone(),
        producer(&broker),
        relay_config(),
        shutdown_b.clone(),
    ));
    // While rows are still being written, the leader stops and the standby takes over.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let published_by_a = count(
        &pool,
        "select count(*) from outbox where published_at is not null",
    )
    .await;
    shutdown_a.cancel();
    relay_a.await.unwrap();
    assert!(
        published_by_a < 1500,
        "the failover happened too late to test anything"
    );
    let mut expected: HashMap<String, Vec<String>> = HashMap::new();
    for w in writers {
        for (order, id) in w.await.unwrap() {
            expected
                .entry(order.to_string())
                .or_default()
                .push(id.to_string());
        }
    }
    eventually(Duration::from_secs(60), "every row to be published", || async {
        count(&pool, "select count(*) from outbox where published_at is null").await == 0
    })
    .await;
    shutdown_b.cancel();
    relay_b.await.unwrap();

    let messages = read_topic(broker.bootstrap_servers(), &t.order_events, 1500).await;
    let by_key = first_occurrences_by_key(&messages);
    assert_eq!(by_key.len(), 500);
    for (order, ids) in &expected {
        assert_eq!(&by_key[order], ids, "events of order {order} out of order");
    }
}

/// The relay keeps a floor under its scan (rows known to be published); a row whose transaction
/// drew its id before later rows were published, and committed after them, is still published,
/// and before the later rows of its own order.
#[tokio::test]
async fn a_row_committed_late_below_published_rows_is_still_published_in_its_orders_order() {
    let db = TestDb::new().await;
    let pool = db.pool_of(6).await;
    let broker = broker();
    let t = topics();
    let shutdown = CancellationToken::new();
    let relay_task = tokio::spawn(relay::run(
        pool.clone(),
        producer(&broker),
        relay_config(),
        shutdown.clone(),
    ));
    let published = || async {
        count(
            &pool,
            "select count(*) from outbox where published_at is not null",
        )
        .await
    };
    for order in 1..=20 {
        write_event(&pool, &t.order_events, "OrderCreated", order, &HashMap::new()).await;
    }
    eventually(
        Duration::from_secs(20),
        "the first rows to be published",
        || async { published().await == 20 },
    )
    .await;
    // A transaction draws its outbox id and stays open…
    let mut late = pool.begin().await.unwrap();
    let event = NewEvent::new(
        &t.order_events,
        "OrderCreated",
        99,
        Some(Uuid::now_v7()),
        json!({"n": "late"}),
        &HashMap::new(),
    );
    let late_id = event.envelope.event_id.to_string();
    enqueue(&mut late, &[event]).await.unwrap();
    // …while other orders' rows are written and published, over many passes of the relay.
    for order in 21..=60 {
        write_event(&pool, &t.order_events, "OrderCreated", order, &HashMap::new()).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eventually(
        Duration::from_secs(20),
        "the later rows to be published",
        || async { published().await == 60 },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    late.commit().await.unwrap();
    let confirmed = write_event(&pool, &t.order_events, "OrderConfirmed", 99, &HashMap::new()).await;
    // Well inside the relay's safety-net rescan (RelayConfig::cleanup_interval, 60 s).
    eventually(
        Duration::from_secs(15),
        "the late row to be published",
        || async { count(&pool, "select count(*) from outbox where published_at is null").await == 0 },
    )
    .await;
    shutdown.cancel();
    relay_task.await.unwrap();
    let messages = read_topic(broker.bootstrap_servers(), &t.order_events, 62).await;
    let by_key = first_occurrences_by_key(&messages);
    assert_eq!(by_key["99"], vec![late_id, confirmed.to_string()]);
}

#[tokio::test]
async fn published_rows_past_retention_are_deleted_and_pending_rows_kept() {
    let db = TestDb::new().await;
    let pool = db.pool_of(4).await;
    let t = topics();
    for i in 0..3 {
        write_event(&pool, &t.order_events, "OrderCreated", i, &HashMap::new()).await;
    }
    sqlx::query!(
        "update outbox set published_at = now() - interval '2 hours' where id in (select id from outbox order by id limit 2)"
    )
    .execute(&pool)
    .await
    .unwrap();
    let mut conn = pool.acquire().await.unwrap();
    assert_eq!(
        relay::delete_expired(&mut conn, Duration::from_secs(3 * 3600))
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        relay::delete_expired(&mut conn, Duration::from_secs(3600))
            .await
            .unwrap(),
        2
    );
    let backlog = relay::backlog(&mut conn).await.unwrap();
    assert_eq!((backlog.pending, backlog.published_last_minute), (1, 0));
    assert!(backlog.oldest_pending_age_seconds.is_some());
}

/// The retention cleanup reads the oldest rows a chunk at a time and stops at the first chunk
/// whose newest row has not expired: expired rows across several chunks all go, and the cost of a
/// cleanup with nothing to delete is one chunk, not the table.
#[tokio::test]
async fn the_retention_cleanup_goes_chunk_by_chunk_from_the_oldest_and_stops_at_young_rows() {
    let db = TestDb::new().await;
    let pool = db.pool_of(4).await;
    let t = topics();
    for i in 0..7 {
        write_event(&pool, &t.order_events, "OrderCreated", i, &HashMap::new()).await;
    }
    // The five oldest published two hours ago, the sixth just now, the seventh pending.
    sqlx::query(
        "update outbox set published_at = now() - interval '2 hours' where id in (select id from outbox order by id limit 5)",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "update outbox set published_at = now() where id = (select id from outbox order by id offset 5 limit 1)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let mut conn = pool.acquire().await.unwrap();
    assert_eq!(
        relay::delete_expired_by(&mut conn, Duration::from_secs(3600), 2)
            .await
            .unwrap(),
        5,
        "three chunks: two expired, two expired, one expired and one young"
    );
    assert_eq!(count(&pool, "select count(*) from outbox").await, 2);
    assert_eq!(
        relay::delete_expired_by(&mut conn, Duration::from_secs(3600), 2)
            .await
            .unwrap(),
        0
    );
}

#[tokio::test]
async fn with_zero_retention_acknowledged_rows_are_deleted_and_still_counted() {
    let db = TestDb::new().await;
    let pool = db.pool_of(4).await;
    let broker = broker();
    let producer = producer(&broker);
    let t = topics();
    let mut written = Vec::new();
    for i in 0..30 {
        written.push(write_event(&pool, &t.order_events, "OrderCreated", i % 3, &HashMap::new()).await);
    }
    let cfg = RelayConfig {
        retention: Duration::ZERO,
        batch_size: 7,
        ..relay_config()
    };
    assert_eq!(relay::run_once(&pool, &producer, &cfg).await.unwrap(), 30);
    assert_eq!(count(&pool, "select count(*) from outbox").await, 0);
    let backlog = relay::backlog(&mut pool.acquire().await.unwrap()).await.unwrap();
    assert_eq!((backlog.pending, backlog.published_last_minute), (0, 30));
    let messages = read_topic(broker.bootstrap_servers(), &t.order_events, 30).await;
    assert_eq!(messages.len(), 30);
    let by_key = first_occurrences_by_key(&messages);
    let expected: Vec<String> = written.iter().step_by(3).map(Uuid::to_string).collect();
    assert_eq!(by_key["0"], expected);
}

// ---------------------------------------------------------------------------------------------
// Kafka plumbing
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// Tracking consumer
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn picked_up_and_in_transit_then_delivered_ship_and_deliver_the_order_with_two_notifications() {
    let _telemetry =
        ostore_orders::telemetry::init("ostore-orders-test", ostore_orders::config::LogFormat::Pretty);
    let db = TestDb::new().await;
    let pool = db.pool_of(6).await;
    let broker = broker();
    let producer = producer(&broker);
    let t = topics();
    let order = insert_order(&pool, "confirmed").await;
    let consumer = RunningConsumer::start(&pool, consumer_config(Duration::from_secs(30)), &broker);

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
    eventually(Duration::from_secs(30), "the order to ship", || async {
        order_status(&pool, order).await == "shipped"
    })
    .await;
    publish_tracking(
        &producer,
        1,
        &key,
        &body(&tracking_event(order, TrackingStatus::Delivered)),
        Some(traceparent),
    )
    .await;
    eventually(Duration::from_secs(30), "the order to be delivered", || async {
        order_status(&pool, order).await == "delivered"
    })
    .await;
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
async fn the_same_event_twice_makes_one_notification() {
    let db = TestDb::new().await;
    let pool = db.pool_of(4).await;
    let t = topics();
    let cfg = consumer_config(Duration::from_secs(30));
    let order = insert_order(&pool, "confirmed").await;
    let event = body(&tracking_event(order, TrackingStatus::PickedUp));

    let first = apply(&pool, &cfg, &event).await;
    let second = apply(&pool, &cfg, &event).await;
    assert!(matches!(first, Outcome::Applied { .. }), "{first:?}");
    assert!(matches!(second, Outcome::Duplicate { .. }), "{second:?}");
    assert_eq!(order_status(&pool, order).await, "shipped");
    assert_eq!(outbox_events(&pool, &t.notifications, order).await.len(), 1);
}

#[tokio::test]
async fn a_late_in_transit_after_delivered_leaves_the_order_delivered() {
    let db = TestDb::new().await;
    let pool = db.pool_of(4).await;
    let t = topics();
    let cfg = consumer_config(Duration::from_secs(30));
    let order = insert_order(&pool, "confirmed").await;

    let delivered = body(&tracking_event(order, TrackingStatus::Delivered));
    let late = body(&tracking_event(order, TrackingStatus::InTransit));
    let first = apply(&pool, &cfg, &delivered).await;
    let second = apply(&pool, &cfg, &late).await;
    assert!(matches!(first, Outcome::Applied { .. }), "{first:?}");
    assert!(matches!(second, Outcome::NoChange { .. }), "{second:?}");
    assert_eq!(order_status(&pool, order).await, "delivered");
    assert_eq!(outbox_events(&pool, &t.notifications, order).await.len(), 1);
    assert_eq!(
        count(&pool, "select count(*) from tracking_inbox").await,
        2,
        "the late event is recorded"
    );
}

#[tokio::test]
async fn an_exception_changes_no_status_but_notifies_the_customer() {
    let db = TestDb::new().await;
    let pool = db.pool_of(4).await;
    let t = topics();
    let cfg = consumer_config(Duration::from_secs(30));
    let order = insert_order(&pool, "shipped").await;
    let outcome = apply(
        &pool,
        &cfg,
        &body(&tracking_event(order, TrackingStatus::Exception)),
    )
    .await;
    assert!(
        matches!(
            outcome,
            Outcome::Notified {
                event_type: "ShipmentException",
                ..
            }
        ),
        "{outcome:?}"
    );
    assert_eq!(order_status(&pool, order).await, "shipped");
    let notifications = outbox_events(&pool, &t.notifications, order).await;
    assert_eq!(notifications.len(), 1);
    assert_eq!(notifications[0].0, "ShipmentException");
    assert_eq!(notifications[0].1["data"]["status"], "shipped");
    assert_eq!(notifications[0].1["data"]["previousStatus"], "shipped");
}

#[tokio::test]
async fn a_malformed_event_is_dead_lettered_and_the_next_event_on_its_partition_is_applied() {
    let db = TestDb::new().await;
    let pool = db.pool_of(6).await;
    let broker = broker();
    let producer = producer(&broker);
    let t = topics();
    let order = insert_order(&pool, "confirmed").await;
    let consumer = RunningConsumer::start(&pool, consumer_config(Duration::from_secs(30)), &broker);

    let garbage = b"{\"eventID\": not json at all \xff";
    publish_tracking(&producer, 0, &order.to_string(), garbage, None).await;
    publish_status(&producer, 0, order, TrackingStatus::PickedUp).await;
    eventually(
        Duration::from_secs(30),
        "the event after the malformed one to apply",
        || async { order_status(&pool, order).await == "shipped" },
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
    let dlq = read_topic(broker.bootstrap_servers(), &t.tracking_dlq, 1).await;
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
    let db = TestDb::new().await;
    let pool = db.pool_of(6).await;
    let broker = broker();
    let producer = producer(&broker);
    let (first, second) = (
        insert_order(&pool, "confirmed").await,
        insert_order(&pool, "confirmed").await,
    );
    refuse_in_database(&pool, first, "picked_up").await;
    let consumer = RunningConsumer::start(&pool, consumer_config(Duration::from_secs(30)), &broker);

    let refused = tracking_event(first, TrackingStatus::PickedUp);
    publish_tracking(&producer, 1, &first.to_string(), &body(&refused), None).await;
    publish_status(&producer, 1, second, TrackingStatus::PickedUp).await;
    eventually(
        Duration::from_secs(30),
        "the event behind the refused one to apply",
        || async { order_status(&pool, second).await == "shipped" },
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
    let db = TestDb::new().await;
    let pool = db.pool_of(6).await;
    let broker = broker();
    let producer = producer(&broker);
    let known = insert_order(&pool, "confirmed").await;
    let unknown = 900_001;
    let consumer = RunningConsumer::start(&pool, consumer_config(Duration::from_secs(60)), &broker);

    publish_status(&producer, 2, unknown, TrackingStatus::PickedUp).await;
    publish_status(&producer, 2, known, TrackingStatus::PickedUp).await;
    eventually(
        Duration::from_secs(30),
        "the event behind the unknown order's to apply",
        || async { order_status(&pool, known).await == "shipped" },
    )
    .await;
    assert_eq!(
        count(&pool, "select count(*) from tracking_retries").await,
        1,
        "the unknown order's event waits"
    );

    insert_order_with_id(&pool, unknown, "confirmed").await;
    eventually(Duration::from_secs(30), "the parked event to apply", || async {
        order_status(&pool, unknown).await == "shipped"
    })
    .await;
    consumer.stop().await;
    assert_eq!(count(&pool, "select count(*) from tracking_retries").await, 0);
    assert_eq!(count(&pool, "select count(*) from dead_letters").await, 0);
    assert_eq!(
        outbox_events(&pool, &topics().notifications, unknown).await.len(),
        1
    );
}

#[tokio::test]
async fn an_event_whose_order_never_appears_is_dead_lettered_after_the_window_and_can_be_replayed() {
    let db = TestDb::new().await;
    let pool = db.pool_of(4).await;
    let t = topics();
    let cfg = consumer_config(Duration::from_secs(2));
    let unknown = 900_002;
    let event = body(&tracking_event(unknown, TrackingStatus::Delivered));

    let parked_at = Instant::now();
    let outcome = apply(&pool, &cfg, &event).await;
    assert!(matches!(outcome, Outcome::Parked { .. }), "{outcome:?}");
    // Retried with backoff while the window is open...
    eventually(Duration::from_secs(10), "a retry", || async {
        tracking::process_due(&pool, &cfg, &t).await.unwrap();
        count(&pool, "select count(*) from tracking_retries where attempts >= 1").await == 1
    })
    .await;
    if parked_at.elapsed() < Duration::from_millis(1500) {
        assert_eq!(count(&pool, "select count(*) from dead_letters").await, 0);
    }
    // ...then dead-lettered.
    eventually(
        Duration::from_secs(10),
        "the event to be dead-lettered",
        || async {
            tracking::process_due(&pool, &cfg, &t).await.unwrap();
            count(&pool, "select count(*) from dead_letters").await == 1
        },
    )
    .await;
    assert_eq!(count(&pool, "select count(*) from tracking_retries").await, 0);
    let letter = sqlx::query!("select id, payload, reason from dead_letters")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(letter.payload, event);
    assert!(letter.reason.contains("not known"), "{}", letter.reason);
    assert_eq!(
        outbox_events(&pool, &t.tracking_dlq, unknown).await.len(),
        1,
        "a copy goes to the DLQ topic"
    );

    // Replaying while the order is still unknown changes nothing; once it exists, it applies once.
    assert!(matches!(
        tracking::replay_dead_letter(&pool, &t, letter.id).await,
        Err(tracking::ReplayError::StillFailing(_))
    ));
    assert!(matches!(
        tracking::replay_dead_letter(&pool, &t, letter.id + 1000).await,
        Err(tracking::ReplayError::NotFound(_))
    ));
    insert_order_with_id(&pool, unknown, "shipped").await;
    let replayed = tracking::replay_dead_letter(&pool, &t, letter.id).await.unwrap();
    assert!(matches!(replayed, Outcome::Applied { .. }), "{replayed:?}");
    let again = tracking::replay_dead_letter(&pool, &t, letter.id).await.unwrap();
    assert!(matches!(again, Outcome::Duplicate { .. }), "{again:?}");
    assert_eq!(order_status(&pool, unknown).await, "delivered");
    assert_eq!(outbox_events(&pool, &t.notifications, unknown).await.len(), 1);
    let replayed_at = sqlx::query_scalar!("select replayed_at from dead_letters where id = $1", letter.id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(replayed_at.is_some());
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
    let db = TestDb::new().await;
    let pool = db.pool_of(6).await;
    let producer = bus.producer();
    let t = bus.topics.clone();
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
        let doomed = kafka::consumer(&bus.bootstrap, &settings).unwrap();
        doomed.subscribe(&[t.tracking_events.as_str()]).unwrap();
        let m = tokio::time::timeout(Duration::from_secs(30), doomed.recv())
            .await
            .unwrap()
            .unwrap();
        let mut headers = HashMap::new();
        if let Some(h) = m.headers() {
            for header in h.iter() {
                headers.insert(
                    header.key.to_string(),
                    String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned(),
                );
            }
        }
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
    let consumer = RunningConsumer::start_on(&pool, cfg.clone(), &bus.bootstrap, &t);
    let probe: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bus.bootstrap)
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

/// A record as the consumer reads it from partition 0 at `offset`.
fn record_at(offset: i64, payload: Vec<u8>) -> Record {
    Record {
        topic: topics().tracking_events,
        partition: Some(0),
        offset: Some(offset),
        key: None,
        payload,
        headers: HashMap::new(),
    }
}

/// What a database holds after the consumer handled events: order statuses, inbox outcomes,
/// parked events, dead letters, and the outbox rows in order (without their generated ids).
async fn consumer_state(pool: &PgPool) -> Vec<String> {
    let mut out = Vec::new();
    for (what, sql) in [
        (
            "orders",
            "select order_id || ' ' || status || ' ' || coalesce(status_reason, '') from orders order by order_id",
        ),
        (
            "inbox",
            "select event_id || ' ' || order_id || ' ' || tracking_status || ' ' || outcome from tracking_inbox order by event_id",
        ),
        (
            "parked",
            "select event_id || ' ' || order_id from tracking_retries order by id",
        ),
        ("dead", "select id || ' ' || reason from dead_letters order by id"),
        (
            "outbox",
            // Per order (key), in commit order: what consumers can rely on.
            "select message_key || ' ' || topic || ' ' || event_type || ' ' || (payload -> 'data')::text
             from outbox order by message_key, id",
        ),
    ] {
        let rows: Vec<String> = sqlx::query_scalar(sql).fetch_all(pool).await.unwrap();
        out.extend(rows.into_iter().map(|r| format!("{what}: {r}")));
    }
    out
}

#[tokio::test]
async fn a_batch_has_the_outcome_of_its_events_applied_one_by_one() {
    let t = topics();
    let (confirmed, shipped, pending, unknown) = (101, 102, 103, 900_010);
    let ev = |order_id: i32, status: TrackingStatus| body(&tracking_event(order_id, status));
    let picked_up = ev(confirmed, TrackingStatus::PickedUp);
    let payloads: Vec<Vec<u8>> = vec![
        ev(confirmed, TrackingStatus::Created),
        picked_up.clone(),
        // Redelivered in the same batch.
        picked_up,
        ev(unknown, TrackingStatus::PickedUp),
        ev(unknown, TrackingStatus::Delivered),
        // Not confirmed yet: parked, and the order's next event waits behind it.
        ev(pending, TrackingStatus::PickedUp),
        ev(pending, TrackingStatus::Created),
        b"{\"eventID\": malformed".to_vec(),
        ev(shipped, TrackingStatus::Exception),
        ev(confirmed, TrackingStatus::InTransit),
        ev(confirmed, TrackingStatus::Delivered),
        // Late.
        ev(confirmed, TrackingStatus::InTransit),
        ev(shipped, TrackingStatus::Delivered),
    ];
    let records: Vec<Record> = payloads
        .into_iter()
        .enumerate()
        .map(|(i, p)| record_at(i as i64, p))
        .collect();
    // With a window, events that cannot apply yet are parked; without, dead-lettered at once.
    for window in [Duration::from_secs(30), Duration::ZERO] {
        let cfg = consumer_config(window);
        let (one_by_one, batched) = (TestDb::new().await, TestDb::new().await);
        let (one_pool, batch_pool) = (one_by_one.pool().await, batched.pool().await);
        for pool in [&one_pool, &batch_pool] {
            insert_order_with_id(pool, confirmed, "confirmed").await;
            insert_order_with_id(pool, shipped, "shipped").await;
            insert_order_with_id(pool, pending, "pending").await;
        }
        let mut expected = Vec::new();
        for record in &records {
            expected.push(tracking::apply_record(&one_pool, &cfg, &t, record).await.unwrap());
        }
        let outcomes = tracking::apply_records(&batch_pool, &cfg, &t, &records)
            .await
            .unwrap();
        assert_eq!(outcomes, expected, "window {window:?}");
        assert_eq!(
            consumer_state(&batch_pool).await,
            consumer_state(&one_pool).await,
            "window {window:?}"
        );

        let names: Vec<&str> = outcomes.iter().map(Outcome::name).collect();
        let not_yet = if window.is_zero() {
            "dead_lettered"
        } else {
            "parked"
        };
        let pending_created = if window.is_zero() { "no_change" } else { "parked" };
        assert_eq!(
            names,
            [
                "no_change",
                "applied",
                "duplicate",
                not_yet,
                not_yet,
                not_yet,
                pending_created,
                "dead_lettered",
                "notified",
                "no_change",
                "applied",
                "no_change",
                "applied"
            ],
            "window {window:?}"
        );
        assert_eq!(order_status(&batch_pool, confirmed).await, "delivered");
        assert_eq!(order_status(&batch_pool, shipped).await, "delivered");
        assert_eq!(order_status(&batch_pool, pending).await, "pending");
        assert_eq!(
            outbox_events(&batch_pool, &t.notifications, confirmed)
                .await
                .len(),
            2
        );
    }
}

#[tokio::test]
async fn a_backlog_with_a_refused_event_duplicates_and_an_unknown_order_is_applied_in_batches() {
    let db = TestDb::new().await;
    let pool = db.pool_of(6).await;
    let broker = broker();
    let producer = producer(&broker);
    let t = topics();
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
    let consumer = RunningConsumer::start(&pool, consumer_config(Duration::from_secs(60)), &broker);
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

// ---------------------------------------------------------------------------------------------
// A real broker
// ---------------------------------------------------------------------------------------------

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

#[tokio::test]
async fn an_event_for_an_order_another_transaction_holds_waits_without_blocking_and_applies_after() {
    let db = TestDb::new().await;
    let pool = db.pool_of(6).await;
    let broker = broker();
    let producer = producer(&broker);
    let held = insert_order(&pool, "confirmed").await;
    let free = insert_order(&pool, "confirmed").await;
    // A saga's transaction holds the order row (as when it confirms the order).
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("select 1 from orders where order_id = $1 for update")
        .bind(held)
        .execute(&mut *holder)
        .await
        .unwrap();
    let consumer = RunningConsumer::start(&pool, consumer_config(Duration::from_secs(60)), &broker);
    for order in [held, free] {
        publish_status(&producer, 2, order, TrackingStatus::PickedUp).await;
    }
    // The other order's event is applied while the row is held: the consumer did not wait on it.
    eventually(
        Duration::from_secs(30),
        "the free order's event to apply",
        || async { order_status(&pool, free).await == "shipped" },
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "the held order's event to be parked",
        || async { count(&pool, "select count(*) from tracking_retries").await == 1 },
    )
    .await;
    holder.rollback().await.unwrap();
    eventually(Duration::from_secs(30), "the parked event to apply", || async {
        order_status(&pool, held).await == "shipped"
    })
    .await;
    consumer.stop().await;
    assert_eq!(count(&pool, "select count(*) from tracking_retries").await, 0);
    assert_eq!(count(&pool, "select count(*) from dead_letters").await, 0);
    assert_eq!(outbox_events(&pool, &topics().notifications, held).await.len(), 1);
}

/// Per-order order within one relay pass, under a backlog larger than a batch: a transaction that
/// took a lower outbox id may commit while the relay is already past it, after a later row of the
/// same order was committed. Each pass must not publish that later row before the earlier one.
/// Writers here hold each order's row lock (as the saga and the consumer do) and linger before
/// committing, while a relay with tiny batches runs beside them.
#[tokio::test]
async fn late_commits_never_let_a_later_event_of_an_order_overtake_an_earlier_one() {
    let db = TestDb::new().await;
    let pool = db.pool_of(40).await;
    let broker = broker();
    let t = topics();
    let mut orders = Vec::new();
    for _ in 0..24 {
        orders.push(insert_order(&pool, "confirmed").await);
    }
    let shutdown = CancellationToken::new();
    let relay_task = tokio::spawn(relay::run(
        pool.clone(),
        producer(&broker),
        RelayConfig {
            batch_size: 2,
            poll_interval: Duration::from_millis(5),
            ..relay_config()
        },
        shutdown.clone(),
    ));
    let mut writers = Vec::new();
    for (w, &order) in orders.iter().enumerate() {
        let (pool, topic) = (pool.clone(), t.order_events.clone());
        writers.push(tokio::spawn(async move {
            let mut written = Vec::new();
            for i in 0..4u64 {
                let mut tx = pool.begin().await.unwrap();
                sqlx::query("select 1 from orders where order_id = $1 for update")
                    .bind(order)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                let event = NewEvent::new(
                    &topic,
                    "OrderStatusChanged",
                    order,
                    None,
                    json!({"i": i}),
                    &HashMap::new(),
                );
                written.push(event.envelope.event_id.to_string());
                enqueue(&mut tx, &[event]).await.unwrap();
                // Linger, holding an id the relay may already be past.
                tokio::time::sleep(Duration::from_millis(((w as u64 * 7 + i * 13) % 40) + 5)).await;
                tx.commit().await.unwrap();
            }
            (order, written)
        }));
    }
    let mut expected = HashMap::new();
    for w in writers {
        let (order, written) = w.await.unwrap();
        expected.insert(order.to_string(), written);
    }
    eventually(Duration::from_secs(60), "every row published", || async {
        pending(&pool).await == 0
    })
    .await;
    shutdown.cancel();
    relay_task.await.unwrap();
    let messages = read_topic(broker.bootstrap_servers(), &t.order_events, 96).await;
    let by_key = first_occurrences_by_key(&messages);
    for (key, written) in &expected {
        assert_eq!(&by_key[key], written, "order {key}: events out of commit order");
    }
}
