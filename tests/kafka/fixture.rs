//! What the tests of this binary start from: a database of their own and a broker (`Fixture`),
//! the brokers themselves (librdkafka's mock cluster, the shared Apache Kafka, a private one a test
//! may crash), and the helpers that write rows, publish TrackingEvents and read topics back.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::time::{Duration, Instant};

use crate::support::{TestDb, free_port_for_later};
use ostore_orders::downstream::contract::{TrackingEvent, TrackingStatus};
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
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The setup most tests share: a database of the test's own with a pool on it, and a broker with
/// its topics (librdkafka's mock cluster unless the test asks for Apache Kafka). Dropped in this
/// order: the broker, the pool, the database.
pub struct Fixture {
    bus: Option<Bus>,
    pub pool: PgPool,
    _db: TestDb,
}

impl Fixture {
    /// A fresh database (a pool of `connections`) and a mock cluster.
    pub async fn new(connections: u32) -> Fixture {
        Fixture::on(Bus::mock(), connections).await
    }

    /// A fresh database (a pool of `connections`) and the given broker.
    pub async fn on(bus: Bus, connections: u32) -> Fixture {
        Fixture::with(Some(bus), connections).await
    }

    /// A fresh database (a pool of `connections`) and no broker, for tests that apply events
    /// directly.
    pub async fn database(connections: u32) -> Fixture {
        Fixture::with(None, connections).await
    }

    async fn with(bus: Option<Bus>, connections: u32) -> Fixture {
        let db = TestDb::new().await;
        let pool = db.pool_of(connections).await;
        Fixture { bus, pool, _db: db }
    }

    /// The broker (panics for a fixture made without one).
    pub fn bus(&self) -> &Bus {
        self.bus.as_ref().expect("this fixture has no broker")
    }

    /// The topics: the broker's, or the default ones without a broker.
    pub fn topics(&self) -> Topics {
        self.bus.as_ref().map_or_else(topics, |b| b.topics.clone())
    }

    /// The broker's bootstrap servers.
    pub fn bootstrap(&self) -> &str {
        &self.bus().bootstrap
    }

    /// A producer with short timeouts on the broker.
    pub fn producer(&self) -> kafka::Producer {
        self.bus().producer()
    }

    /// The relay, running on the database and the broker until the token is cancelled.
    pub fn spawn_relay(&self, cfg: RelayConfig) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(relay::run(
            self.pool.clone(),
            self.producer(),
            cfg,
            shutdown.clone(),
        ));
        (shutdown, task)
    }

    /// The tracking consumer on the broker and the database, with an unknown-order window.
    pub fn start_consumer(&self, window: Duration) -> RunningConsumer {
        RunningConsumer::start_on(
            &self.pool,
            consumer_config(window),
            self.bootstrap(),
            &self.topics(),
        )
    }
}

pub const PARTITIONS: i32 = 3;

pub fn topics() -> Topics {
    Topics::default()
}

pub fn broker() -> EmbeddedBroker {
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

pub fn producer_to(bootstrap: &str) -> kafka::Producer {
    let settings = ProducerSettings {
        message_timeout: Duration::from_secs(5),
        statistics_interval: Duration::from_millis(200),
        ..ProducerSettings::default()
    };
    kafka::producer(bootstrap, &settings).unwrap().0
}

/// The broker a test meets: librdkafka's mock cluster in this process, the shared Apache Kafka
/// (topics of the test's own), or a private Apache Kafka the test may crash and restart.
pub struct Bus {
    pub bootstrap: String,
    pub topics: Topics,
    pub mock: Option<EmbeddedBroker>,
    pub own: Option<OwnKafka>,
}

/// Topics no other test uses (on the shared broker).
pub fn unique_topics() -> Topics {
    let suffix = Uuid::new_v4().simple().to_string();
    Topics {
        order_events: format!("orders.events.{suffix}"),
        saga_events: format!("orders.saga-events.{suffix}"),
        tracking_events: format!("shipments.tracking-events.{suffix}"),
        notifications: format!("users.notifications.{suffix}"),
        tracking_dlq: format!("shipments.tracking-events.dlq.{suffix}"),
    }
}

pub fn topic_names(t: &Topics) -> [&str; 5] {
    [
        t.order_events.as_str(),
        t.saga_events.as_str(),
        t.tracking_events.as_str(),
        t.notifications.as_str(),
        t.tracking_dlq.as_str(),
    ]
}

impl Bus {
    pub fn mock() -> Bus {
        let broker = broker();
        Bus {
            bootstrap: broker.bootstrap_servers().to_string(),
            topics: topics(),
            mock: Some(broker),
            own: None,
        }
    }

    /// The shared Apache Kafka of `scripts/test`, with fresh topics.
    pub async fn kafka() -> Bus {
        let bootstrap = std::env::var("TEST_KAFKA_BOOTSTRAP_SERVERS").expect(
            "TEST_KAFKA_BOOTSTRAP_SERVERS is not set: run scripts/test, which starts Apache Kafka (scripts/kafka-broker)",
        );
        Bus::real(bootstrap, unique_topics(), None).await
    }

    /// An Apache Kafka of the test's own (it may crash it), with the default topics.
    pub async fn own_kafka() -> Bus {
        let own = tokio::task::spawn_blocking(OwnKafka::start).await.unwrap();
        Bus::real(own.bootstrap.clone(), topics(), Some(own)).await
    }

    pub async fn real(bootstrap: String, topics: Topics, own: Option<OwnKafka>) -> Bus {
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

    pub fn producer(&self) -> kafka::Producer {
        producer_to(&self.bootstrap)
    }

    /// An outage: the mock closes every connection; Apache Kafka is SIGKILLed (a crash).
    pub async fn down(&self) {
        match (&self.mock, &self.own) {
            (Some(m), _) => m.down().unwrap(),
            (None, Some(k)) => k.run("kill").await,
            (None, None) => panic!("the shared broker never goes down"),
        }
    }

    /// The same broker back, with its records.
    pub async fn up(&self) {
        match (&self.mock, &self.own) {
            (Some(m), _) => m.up().unwrap(),
            (None, Some(k)) => k.run("start").await,
            (None, None) => panic!("the shared broker never goes down"),
        }
    }
}

/// A private Apache Kafka (`scripts/kafka-broker` on a port and directory of its own), stopped
/// and removed when dropped.
pub struct OwnKafka {
    pub script: String,
    pub port: u16,
    pub dir: std::path::PathBuf,
    pub bootstrap: String,
}

impl OwnKafka {
    pub fn start() -> OwnKafka {
        let script = std::env::var("TEST_KAFKA_BROKER_SCRIPT")
            .expect("TEST_KAFKA_BROKER_SCRIPT is not set: run scripts/test (it names scripts/kafka-broker)");
        let port = free_port_for_later();
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
    pub async fn run(&self, cmd: &'static str) {
        let (script, port, dir) = (self.script.clone(), self.port, self.dir.clone());
        tokio::task::spawn_blocking(move || broker_script(&script, port, &dir, cmd, true))
            .await
            .unwrap();
    }
}

pub fn broker_script(script: &str, port: u16, dir: &std::path::Path, cmd: &str, keep_data: bool) {
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

pub fn relay_config() -> RelayConfig {
    RelayConfig {
        batch_size: 100,
        poll_interval: Duration::from_millis(200),
        standby_interval: Duration::from_millis(200),
        backoff_min: Duration::from_millis(100),
        backoff_max: Duration::from_secs(1),
        ..RelayConfig::default()
    }
}

pub fn consumer_config(window: Duration) -> ConsumerConfig {
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

/// Waits until the relay's floor has passed every outbox row (nothing pending), or fails the test
/// after `timeout`.
pub async fn until_all_published(pool: &PgPool, timeout: Duration, what: &str) {
    eventually(timeout, what, || async {
        count(
            pool,
            "select count(*) from outbox where id > outbox_published_through()",
        )
        .await
            == 0
    })
    .await;
}

/// Polls `check` until it returns true, or fails the test after `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
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

/// Waits until `order` has `status` (or fails the test after 30 s).
pub async fn wait_status(pool: &PgPool, order: i32, status: &str, what: &str) {
    eventually(Duration::from_secs(30), what, || async {
        order_status(pool, order).await == status
    })
    .await;
}

/// A message's headers, their values as text.
pub fn headers_of(m: &impl Message) -> HashMap<String, String> {
    let mut headers = HashMap::new();
    if let Some(h) = m.headers() {
        for header in h.iter() {
            headers.insert(
                header.key.to_string(),
                String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned(),
            );
        }
    }
    headers
}

/// A message as read back from a topic.
#[derive(Debug, Clone)]
pub struct Received {
    pub partition: i32,
    pub key: String,
    pub value: Vec<u8>,
    pub headers: HashMap<String, String>,
}

impl Received {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.value).expect("a JSON value")
    }

    pub fn event_id(&self) -> String {
        self.json()["eventID"].as_str().unwrap().to_string()
    }
}

/// Reads every partition of `topic` from the beginning until `at_least` messages arrived (then
/// waits a little longer for any extra ones).
pub async fn read_topic(bootstrap: &str, topic: &str, at_least: usize) -> Vec<Received> {
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
                let headers = headers_of(&m);
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
pub fn first_occurrences_by_key(messages: &[Received]) -> HashMap<String, Vec<String>> {
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

pub async fn insert_user(pool: &PgPool) -> i32 {
    sqlx::query_scalar!(
        "insert into users (email, password_hash, role) values ($1, 'not-a-hash', 'user') returning user_id",
        format!("{}@example.test", Uuid::new_v4().simple())
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Inserts an order with `status` (and its user) the way the saga leaves it; returns its id.
pub async fn insert_order(pool: &PgPool, status: &str) -> i32 {
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

pub async fn insert_order_with_id(pool: &PgPool, order_id: i32, status: &str) {
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

pub async fn order_status(pool: &PgPool, order_id: i32) -> String {
    sqlx::query_scalar!("select status from orders where order_id = $1", order_id)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The outbox rows of one topic and order, oldest first: (eventType, payload).
pub async fn outbox_events(pool: &PgPool, topic: &str, order_id: i32) -> Vec<(String, Value)> {
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
pub async fn write_event(
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

pub fn tracking_event(order_id: i32, status: TrackingStatus) -> TrackingEvent {
    TrackingEvent {
        event_id: Uuid::now_v7().to_string(),
        shipment_id: "shp-1".into(),
        order_id,
        status,
        occurred_at: OffsetDateTime::now_utc(),
    }
}

pub fn body(event: &TrackingEvent) -> Vec<u8> {
    serde_json::to_vec(event).unwrap()
}

/// Publishes a TrackingEvent the way the shipper does (key = orderID) to one partition.
pub async fn publish_tracking(
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

pub async fn publish_tracking_to(
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
pub async fn publish_status(producer: &kafka::Producer, partition: i32, order: i32, status: TrackingStatus) {
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
pub struct RunningConsumer {
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
}

impl RunningConsumer {
    pub fn start_on(pool: &PgPool, cfg: ConsumerConfig, bootstrap: &str, topics: &Topics) -> Self {
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

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

/// Makes PostgreSQL refuse to record `status` events of `order` (a check constraint on the inbox,
/// SQLSTATE 23514), as it refuses any event it cannot store.
pub async fn refuse_in_database(pool: &PgPool, order: i32, status: &str) {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "alter table tracking_inbox add constraint refused_in_this_test
           check (not (order_id = {order} and tracking_status = '{status}'))"
    )))
    .execute(pool)
    .await
    .unwrap();
}

/// Rows the relay has not published yet.
pub async fn pending(pool: &PgPool) -> i64 {
    relay::backlog(&mut pool.acquire().await.unwrap())
        .await
        .unwrap()
        .pending
}

/// Applies one TrackingEvent (no Kafka headers) as the consumer does.
pub async fn apply(pool: &PgPool, cfg: &ConsumerConfig, event: &[u8]) -> Outcome {
    tracking::apply_event(pool, cfg, &topics(), event, &HashMap::new())
        .await
        .unwrap()
}

pub async fn count(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar::<_, i64>(sql).fetch_one(pool).await.unwrap()
}

/// A record as the consumer reads it from partition 0 at `offset`.
pub fn record_at(offset: i64, payload: Vec<u8>) -> Record {
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
pub async fn consumer_state(pool: &PgPool) -> Vec<String> {
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
