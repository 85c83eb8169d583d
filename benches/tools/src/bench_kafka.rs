//! `ostore-tools bench-relay` and `ostore-tools bench-consumer`: the Kafka side of the
//! performance figures (docs/performance.md, "Kafka side").
//!
//! - **bench-relay** fills the outbox of a fresh database with N rows as the service writes them
//!   (the saga's and the order's events, `outbox::enqueue`), then measures (a) a raw producer with
//!   the relay's producer settings sending the same records (read once from the outbox; only the
//!   producing is timed, up to the last delivery report) to topics of their own on the same broker,
//!   and (b) the real relay ([`ostore_orders::outbox::relay::run`], started as the service starts it)
//!   draining the same rows, from its start until every row is acknowledged and marked. It prints
//!   both rates and their ratio.
//! - **bench-consumer** creates K confirmed orders (with their sagas and shipments), produces their
//!   TrackingEvents as the shipper does (`created` → `delivered`, interleaved across orders, some
//!   redelivered later), then starts the real tracking consumer ([`ostore_orders::tracking::run`]) and
//!   times how fast it applies them (the inbox is polled), and checks the result.
//!
//! The broker is `--kafka-bootstrap-servers` (KAFKA_BOOTSTRAP_SERVERS), or librdkafka's mock
//! cluster in this process when unset. Each run uses a database and topics of its own (unique
//! names), dropped at the end unless `--keep-database`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use futures::future::join_all;
use rand::Rng as _;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use ostore_orders::config::{DatabaseArgs, LogFormat};
use ostore_orders::downstream::contract::{TRACKING_EVENT_TYPE, TrackingEvent, TrackingStatus};
use ostore_orders::kafka::{self, EmbeddedBroker, ProducerSettings};
use ostore_orders::outbox::relay::{self, OutboxRow, RelayConfig};
use ostore_orders::outbox::{NewEvent, Topics, enqueue};
use ostore_orders::tracking::{self, ConsumerConfig};

/// Options both Kafka benchmarks share.
#[derive(Debug, Clone, Args)]
pub struct KafkaBenchCommon {
    /// PostgreSQL server (and connection parameters, e.g. `?sslmode=disable`); the benchmark
    /// creates a database of its own on it (`kbench_…`) and drops it afterwards.
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Kafka cluster to measure against; librdkafka's mock cluster in this process when unset.
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS")]
    pub kafka_bootstrap_servers: Option<String>,
    /// Partitions of the topics the benchmark creates.
    #[arg(long, default_value_t = kafka::DEFAULT_PARTITIONS)]
    pub partitions: i32,
    /// Keep the benchmark's database (its name is printed).
    #[arg(long)]
    pub keep_database: bool,
    /// Print only the JSON line.
    #[arg(long)]
    pub json: bool,
    /// Log format (set RUST_LOG=warn for quiet runs).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    pub log_format: LogFormat,
}

/// `bench-relay` options.
#[derive(Debug, Clone, Args)]
pub struct BenchRelayArgs {
    /// Outbox rows to publish (7 per order: the saga's and the order's events).
    #[arg(long, default_value_t = 50_000)]
    pub rows: usize,
    /// The relay's batch size (`RelayConfig::batch_size`).
    #[arg(long, default_value_t = RelayConfig::default().batch_size)]
    pub batch_size: usize,
    /// The relay's retention in seconds; 0 deletes rows as soon as they are acknowledged.
    #[arg(long, default_value_t = RelayConfig::default().retention.as_secs())]
    pub retention_secs: u64,
    /// Give up when the relay has not published every row after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_secs: u64,
    #[command(flatten)]
    pub common: KafkaBenchCommon,
}

/// `bench-consumer` options.
#[derive(Debug, Clone, Args)]
pub struct BenchConsumerArgs {
    /// Orders (each gets created, picked_up, in_transit, out_for_delivery and delivered).
    #[arg(long, default_value_t = 4000)]
    pub orders: usize,
    /// Share of events (0 to 1) sent a second time later in the stream (a redelivery), which the
    /// consumer must record once.
    #[arg(long, default_value_t = 0.1)]
    pub duplicate_share: f64,
    /// Most events the consumer applies per transaction (`ConsumerConfig::batch_size`).
    #[arg(long, default_value_t = ConsumerConfig::default().batch_size)]
    pub batch_size: usize,
    /// Give up when the events are not all applied after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_secs: u64,
    #[command(flatten)]
    pub common: KafkaBenchCommon,
}

/// Where the benchmark's broker is.
enum Broker {
    External(String),
    Embedded(EmbeddedBroker),
}

impl Broker {
    fn start(common: &KafkaBenchCommon) -> anyhow::Result<Broker> {
        Ok(match &common.kafka_bootstrap_servers {
            Some(b) => Broker::External(b.clone()),
            None => Broker::Embedded(EmbeddedBroker::start_with(&[], common.partitions)?),
        })
    }

    fn bootstrap(&self) -> &str {
        match self {
            Broker::External(b) => b,
            Broker::Embedded(b) => b.bootstrap_servers(),
        }
    }

    fn name(&self) -> String {
        match self {
            Broker::External(b) => format!("external ({b})"),
            Broker::Embedded(_) => "librdkafka mock cluster (in process)".into(),
        }
    }

    async fn create_topics(&self, names: &[&str], partitions: i32) -> anyhow::Result<()> {
        match self {
            Broker::Embedded(b) => {
                for name in names {
                    b.create_topic(name, partitions)?;
                }
            }
            Broker::External(b) => {
                kafka::ensure_topics_with(b, names, partitions, Duration::from_secs(20)).await;
            }
        }
        Ok(())
    }
}

/// Topics named after the run (`kbench.<run>.<role>.<topic>`), so runs never share records.
fn run_topics(run: &str, role: &str) -> Topics {
    Topics::default().renamed(|t| format!("kbench.{run}.{role}.{t}"))
}

/// `url` with its database replaced by `name`, keeping its query parameters.
pub(crate) fn database_url_for(url: &str, name: &str) -> anyhow::Result<String> {
    let (prefix, _, query) = split_database_url(url)?;
    Ok(match query {
        Some(query) => format!("{prefix}/{name}?{query}"),
        None => format!("{prefix}/{name}"),
    })
}

/// `url` as the part before its database, the database's name and the query, if any. The query
/// is split off first: it may hold a path (`?host=/var/run/postgresql`, a Unix socket).
pub(crate) fn split_database_url(url: &str) -> anyhow::Result<(&str, &str, Option<&str>)> {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let (prefix, name) = base
        .rsplit_once('/')
        .context("DATABASE_URL has no database name")?;
    Ok((prefix, name, query))
}

/// A fresh, migrated database on DATABASE_URL's server, dropped by [`BenchDb::finish`].
struct BenchDb {
    name: String,
    url: String,
    pool: PgPool,
}

impl BenchDb {
    async fn create(common: &KafkaBenchCommon, kind: &str, run: &str) -> anyhow::Result<BenchDb> {
        let name = format!("kbench_{kind}_{run}");
        let url = database_url_for(&common.database.database_url, &name)?;
        ostore_orders::db::create_database_if_missing(&url).await?;
        let pool = ostore_orders::db::connect(&url, 16).await?;
        ostore_orders::db::migrate(&pool).await?;
        Ok(BenchDb { name, url, pool })
    }

    async fn finish(self, keep: bool) -> anyhow::Result<()> {
        self.pool.close().await;
        if keep {
            eprintln!(
                "kept database {} ({})",
                self.name,
                ostore_orders::config::mask_url_password(&self.url)
            );
            return Ok(());
        }
        let opts: PgConnectOptions = self.url.parse()?;
        let admin = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect_with(opts.database("postgres"))
            .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "drop database if exists \"{}\" with (force)",
            self.name
        )))
        .execute(&admin)
        .await?;
        admin.close().await;
        Ok(())
    }
}

/// One benchmark's run: its broker (with the run's topics) and database, and whether it reports
/// progress on stderr.
struct Bench {
    /// `relay` or `consumer`: progress lines start `bench-<kind>:`.
    kind: &'static str,
    /// Only the JSON report is asked for: no progress lines, no summary.
    quiet: bool,
    broker: Broker,
    bootstrap: String,
    db: BenchDb,
}

impl Bench {
    /// Starts (or reaches) the broker, creates `topics` there, and creates the database.
    async fn start(
        common: &KafkaBenchCommon,
        kind: &'static str,
        run: &str,
        topics: &[&Topics],
    ) -> anyhow::Result<Bench> {
        let broker = Broker::start(common)?;
        let bootstrap = broker.bootstrap().to_string();
        for t in topics {
            broker.create_topics(&t.all(), common.partitions).await?;
        }
        let db = BenchDb::create(common, kind, run).await?;
        Ok(Bench {
            kind,
            quiet: common.json,
            broker,
            bootstrap,
            db,
        })
    }

    /// A progress line on stderr (unless only JSON is asked for).
    fn note(&self, line: impl std::fmt::Display) {
        if !self.quiet {
            eprintln!("bench-{}: {line}", self.kind);
        }
    }

    /// Drops the database (or keeps it, as asked) whatever the measurement gave, then prints its
    /// report: `summary` for people (unless only JSON is asked for), and the JSON.
    async fn finish(
        self,
        keep_database: bool,
        measured: anyhow::Result<Value>,
        summary: impl FnOnce(&Value),
    ) -> anyhow::Result<()> {
        self.db.finish(keep_database).await?;
        let report = measured?;
        if !self.quiet {
            summary(&report);
        }
        println!("{report}");
        Ok(())
    }
}

fn run_id() -> String {
    Uuid::new_v4().simple().to_string()[..10].to_string()
}

fn traceparent() -> String {
    let mut rng = rand::rng();
    format!(
        "00-{:032x}-{:016x}-01",
        rng.random::<u128>() | 1,
        rng.random::<u64>() | 1
    )
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

// ---------------------------------------------------------------------------------------------
// bench-relay
// ---------------------------------------------------------------------------------------------

/// The events a completed order leaves in the outbox, as the saga writes them (7 rows).
fn order_events(topics: &Topics, order_id: i32, user_id: i32) -> Vec<NewEvent> {
    let saga = Some(Uuid::now_v7());
    let trace = HashMap::from([("traceparent".to_string(), traceparent())]);
    let items: Vec<Value> = (0..3)
        .map(|i| json!({"productID": 1 + (order_id + i) % 20, "quantity": 1 + i}))
        .collect();
    let priced: Vec<Value> = (0..3)
        .map(|i| {
            json!({"orderItemID": order_id * 3 + i, "productID": 1 + (order_id + i) % 20,
                   "quantity": 1 + i, "price": format!("{}.99", 1 + (order_id + i) % 20)})
        })
        .collect();
    let shipment = format!("shp-{}", &Uuid::new_v4().simple().to_string()[..12]);
    let ev = |topic: &str, ty: &str, data: Value| NewEvent::new(topic, ty, order_id, saga, data, &trace);
    let step = |name: &str| json!({"step": name, "attempt": 1, "state": "running"});
    vec![
        ev(
            &topics.saga_events,
            "SagaStarted",
            json!({"sagaType": "create_order", "version": 1, "userID": user_id}),
        ),
        ev(
            &topics.order_events,
            "OrderCreated",
            json!({"userID": user_id, "status": "pending", "orderItems": items}),
        ),
        ev(&topics.saga_events, "StepSucceeded", step("reserve_inventory")),
        ev(&topics.saga_events, "StepSucceeded", step("persist_order")),
        ev(&topics.saga_events, "StepSucceeded", step("create_shipment")),
        ev(
            &topics.order_events,
            "OrderConfirmed",
            json!({"orderID": order_id, "userID": user_id, "orderDate": "2026-11-25T10:00:00.000Z",
                   "status": "confirmed", "totalAmount": "123.45", "currency": "USD",
                   "shipmentID": shipment, "orderItems": priced}),
        ),
        ev(
            &topics.saga_events,
            "SagaCompleted",
            json!({"state": "completed"}),
        ),
    ]
}

/// Writes `rows` outbox rows (whole orders, then a part of one), 700 per transaction.
async fn fill_outbox(pool: &PgPool, topics: &Topics, rows: usize) -> anyhow::Result<()> {
    let mut events = Vec::with_capacity(rows);
    let mut order_id = 0;
    while events.len() < rows {
        order_id += 1;
        events.extend(order_events(topics, order_id, 1 + order_id % 100));
    }
    events.truncate(rows);
    for chunk in events.chunks(700) {
        let mut tx = pool.begin().await?;
        enqueue(&mut tx, chunk).await?;
        tx.commit().await?;
    }
    Ok(())
}

async fn read_outbox(pool: &PgPool) -> anyhow::Result<Vec<OutboxRow>> {
    let mut conn = pool.acquire().await?;
    let mut rows: Vec<OutboxRow> = Vec::new();
    loop {
        let after = rows.last().map_or(0, |r| r.id);
        let batch = relay::rows_after(&mut conn, after, 10_000).await?;
        if batch.is_empty() {
            return Ok(rows);
        }
        rows.extend(batch);
    }
}

fn headers_of(headers: &Value) -> OwnedHeaders {
    let mut out = OwnedHeaders::new();
    if let Value::Object(map) = headers {
        for (key, value) in map {
            if let Value::String(s) = value {
                out = out.insert(Header {
                    key,
                    value: Some(s.as_bytes()),
                });
            }
        }
    }
    out
}

/// One record to each topic, so metadata, connections and the idempotent producer's id are in
/// place before the clock starts.
async fn warm_up<C>(producer: &FutureProducer<C>, topics: &[&str]) -> anyhow::Result<()>
where
    C: rdkafka::client::ClientContext + 'static,
{
    for topic in topics {
        producer
            .send(
                FutureRecord::to(topic).key("warm-up").payload("{}"),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .with_context(|| format!("warming up the producer on {topic}"))?;
    }
    Ok(())
}

/// The raw producer: every row sent as fast as the producer takes them, then every delivery
/// report awaited. Returns the time from the first send to the last report.
async fn raw_produce<C>(
    producer: &FutureProducer<C>,
    rows: &[OutboxRow],
    topic_of: &HashMap<String, String>,
) -> anyhow::Result<Duration>
where
    C: rdkafka::client::ClientContext + 'static,
{
    let started = Instant::now();
    let mut records = Vec::with_capacity(rows.len());
    for row in rows {
        let topic = topic_of.get(&row.topic).context("a row of an unknown topic")?;
        records.push(
            FutureRecord::to(topic)
                .key(row.message_key.as_bytes())
                .payload(row.payload.as_bytes())
                .headers(headers_of(&row.headers)),
        );
    }
    produce_all(producer, records, "raw producer").await?;
    Ok(started.elapsed())
}

/// Enqueues every record (waiting while librdkafka's queue is full), then awaits every delivery
/// report; the first failure is the error, labelled with `what`.
async fn produce_all<'a, C>(
    producer: &FutureProducer<C>,
    records: impl IntoIterator<Item = FutureRecord<'a, [u8], [u8]>>,
    what: &str,
) -> anyhow::Result<()>
where
    C: rdkafka::client::ClientContext + 'static,
{
    let mut deliveries = Vec::new();
    for mut record in records {
        loop {
            match producer.send_result(record) {
                Ok(d) => {
                    deliveries.push(d);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err((e, _)) => return Err(e).with_context(|| format!("{what}: enqueueing a record")),
            }
        }
    }
    for r in join_all(deliveries).await {
        match r {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => return Err(e).with_context(|| format!("{what}: a record was not delivered")),
            Err(_) => anyhow::bail!("{what}: a delivery report was lost"),
        }
    }
    Ok(())
}

/// Published rows as `outbox_relay_stats` counts them (marked or, with zero retention, deleted).
async fn published(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar::<_, i64>("select coalesce(sum(published), 0)::bigint from outbox_relay_stats")
            .fetch_one(pool)
            .await?,
    )
}

/// Runs `bench-relay`.
pub async fn run_relay(args: BenchRelayArgs) -> anyhow::Result<()> {
    let run = run_id();
    let relay_topics = run_topics(&run, "relay");
    let raw_topics = run_topics(&run, "raw");
    let bench = Bench::start(&args.common, "relay", &run, &[&relay_topics, &raw_topics]).await?;
    let measured = relay_measure(&args, &bench, &relay_topics, &raw_topics).await;
    bench
        .finish(args.common.keep_database, measured, |r| {
            println!(
                "\n== ostore-orders bench-relay ({} rows, {} B average record, {} partitions)",
                r["rows"], r["avgRecordBytes"], r["partitions"]
            );
            println!("  broker              {}", r["broker"].as_str().unwrap_or(""));
            println!("  {:<24} {:>12} {:>10}", "", "records/s", "seconds");
            println!(
                "  {:<24} {:>12.0} {:>10.3}",
                "raw producer",
                r["raw"]["perSecond"].as_f64().unwrap_or(0.0),
                r["raw"]["seconds"].as_f64().unwrap_or(0.0)
            );
            println!(
                "  {:<24} {:>12.0} {:>10.3}",
                format!("relay (retention {} s)", args.retention_secs),
                r["relay"]["perSecond"].as_f64().unwrap_or(0.0),
                r["relay"]["seconds"].as_f64().unwrap_or(0.0)
            );
            println!("  relay / raw         {:.2}×", r["ratio"].as_f64().unwrap_or(0.0));
        })
        .await
}

async fn relay_measure(
    args: &BenchRelayArgs,
    bench: &Bench,
    relay_topics: &Topics,
    raw_topics: &Topics,
) -> anyhow::Result<Value> {
    let (db, bootstrap) = (&bench.db, bench.bootstrap.as_str());
    let n = args.rows;
    bench.note(format_args!("writing {n} outbox rows to {}", db.name));
    fill_outbox(&db.pool, relay_topics, n).await?;
    sqlx::query("vacuum analyze outbox").execute(&db.pool).await?;
    let rows = read_outbox(&db.pool).await?;
    anyhow::ensure!(rows.len() == n, "read {} of {n} outbox rows", rows.len());
    let bytes: usize = rows
        .iter()
        .map(|r| r.payload.len() + r.message_key.len() + r.headers.to_string().len())
        .sum();
    let settings = ProducerSettings::default();

    // (a) The raw producer: same records, same producer settings, topics of its own.
    let topic_of: HashMap<String, String> = relay_topics
        .all()
        .into_iter()
        .zip(raw_topics.all())
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    let (raw_producer, _) = kafka::producer(bootstrap, &settings)?;
    warm_up(&raw_producer, &raw_topics.all()).await?;
    bench.note(format_args!("raw producer sending {n} records"));
    let raw = raw_produce(&raw_producer, &rows, &topic_of).await?;
    drop(raw_producer);
    drop(rows);

    // (b) The relay, as the service runs it, draining the same rows.
    let (producer, _) = kafka::producer(bootstrap, &settings)?;
    warm_up(&producer, &relay_topics.all()).await?;
    let cfg = RelayConfig {
        batch_size: args.batch_size,
        retention: Duration::from_secs(args.retention_secs),
        ..RelayConfig::default()
    };
    bench.note(format_args!(
        "relay publishing {n} rows (batch {}, retention {} s)",
        cfg.batch_size, args.retention_secs
    ));
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let task = tokio::spawn(relay::run(db.pool.clone(), producer, cfg, shutdown.clone()));
    let deadline = started + Duration::from_secs(args.timeout_secs);
    let relay_time = loop {
        if published(&db.pool).await? >= n as i64 {
            break started.elapsed();
        }
        if Instant::now() > deadline {
            shutdown.cancel();
            let _ = task.await;
            anyhow::bail!(
                "the relay published {} of {n} rows in {} s",
                published(&db.pool).await?,
                args.timeout_secs
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    // The floor follows the last pass within a pass or two.
    let mut pending = 0;
    for _ in 0..500 {
        pending = relay::backlog(&mut *db.pool.acquire().await?).await?.pending;
        if pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    shutdown.cancel();
    let _ = task.await;
    anyhow::ensure!(
        pending == 0,
        "{pending} rows still pending after the relay finished"
    );

    let raw_rate = rate(n, raw);
    let relay_rate = rate(n, relay_time);
    Ok(json!({
        "bench": "relay",
        "broker": bench.broker.name(),
        "rows": n,
        "avgRecordBytes": bytes / n.max(1),
        "partitions": args.common.partitions,
        "batchSize": args.batch_size,
        "retentionSecs": args.retention_secs,
        "raw": {"seconds": raw.as_secs_f64(), "perSecond": raw_rate.round()},
        "relay": {"seconds": relay_time.as_secs_f64(), "perSecond": relay_rate.round()},
        "ratio": (relay_rate / raw_rate * 100.0).round() / 100.0,
    }))
}

// ---------------------------------------------------------------------------------------------
// bench-consumer
// ---------------------------------------------------------------------------------------------

/// The lifecycle a shipment goes through, in order.
const LIFECYCLE: [TrackingStatus; 5] = [
    TrackingStatus::Created,
    TrackingStatus::PickedUp,
    TrackingStatus::InTransit,
    TrackingStatus::OutForDelivery,
    TrackingStatus::Delivered,
];

/// `orders` confirmed orders (ids 1..=orders) with their items, sagas and shipments, owned by 100
/// users, as the saga leaves them.
async fn create_orders(pool: &PgPool, orders: usize) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "insert into users (email, password_hash, role)
         select 'kbench' || g || '@example.test', 'not-a-hash', 'user' from generate_series(1, 100) g",
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "insert into orders (order_id, user_id, status, total_amount, currency, shipment_id, saga_id)
         select g, (select min(user_id) from users) + g % 100, 'confirmed', 29.97, 'USD',
                'shp-' || g, gen_random_uuid()
         from generate_series(1, $1) g",
    )
    .bind(orders as i32)
    .execute(&mut *tx)
    .await?;
    sqlx::query("select setval(pg_get_serial_sequence('orders', 'order_id'), $1)")
        .bind(orders as i64)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "insert into order_items (order_id, product_id, quantity, price)
         select order_id, 1 + order_id % 20, 3, 9.99 from orders",
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "insert into sagas (saga_id, saga_type, definition_version, order_id, user_id, state, step,
                            step_name, input, data, deadline_at, finished_at)
         select saga_id, 'create_order', 1, order_id, user_id, 'completed', 3, 'create_shipment',
                jsonb_build_object('orderItems', jsonb_build_array(jsonb_build_object(
                    'productID', 1 + order_id % 20, 'quantity', 3))),
                jsonb_build_object('shipmentID', shipment_id),
                now() + interval '15 minutes', now()
         from orders",
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    sqlx::query("vacuum analyze orders").execute(pool).await?;
    Ok(())
}

/// One TrackingEvent record as the shipper produces it.
#[derive(Clone)]
struct TrackingRecord {
    key: String,
    payload: Vec<u8>,
    event_id: String,
    traceparent: String,
}

/// The stream: round r carries lifecycle event r of every order (orders interleave, as a shipper's
/// traffic does); a redelivered copy of an event follows in the next round, after the event's
/// successor. Returns the records and how many distinct events they hold.
fn tracking_stream(orders: usize, duplicate_share: f64) -> (Vec<TrackingRecord>, usize) {
    let mut rng = rand::rng();
    let traces: Vec<String> = (0..orders).map(|_| traceparent()).collect();
    let mut out = Vec::new();
    let mut again: Vec<usize> = Vec::new();
    let mut distinct = 0;
    for status in LIFECYCLE {
        let mut next_again = Vec::new();
        for (i, trace) in traces.iter().enumerate() {
            let order_id = i as i32 + 1;
            let event = TrackingEvent {
                event_id: Uuid::new_v4().to_string(),
                shipment_id: format!("shp-{order_id}"),
                order_id,
                status,
                occurred_at: OffsetDateTime::now_utc(),
            };
            out.push(TrackingRecord {
                key: order_id.to_string(),
                payload: serde_json::to_vec(&event).expect("a TrackingEvent serializes"),
                event_id: event.event_id.to_string(),
                traceparent: trace.clone(),
            });
            distinct += 1;
            if rng.random_bool(duplicate_share.clamp(0.0, 1.0)) {
                next_again.push(out.len() - 1);
            }
        }
        for idx in again.drain(..) {
            out.push(out[idx].clone());
        }
        again = next_again;
    }
    for idx in again {
        out.push(out[idx].clone());
    }
    (out, distinct)
}

async fn produce_tracking(bootstrap: &str, topic: &str, records: &[TrackingRecord]) -> anyhow::Result<()> {
    let (producer, _) = kafka::producer(bootstrap, &ProducerSettings::default())?;
    let records = records.iter().map(|r| {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "event-type",
                value: Some(TRACKING_EVENT_TYPE),
            })
            .insert(Header {
                key: "event-id",
                value: Some(r.event_id.as_str()),
            })
            .insert(Header {
                key: "traceparent",
                value: Some(r.traceparent.as_str()),
            });
        FutureRecord::to(topic)
            .key(r.key.as_bytes())
            .payload(r.payload.as_slice())
            .headers(headers)
    });
    produce_all(&producer, records, "producing TrackingEvents").await
}

/// A consumer-group member that only reads (no database): how fast the broker hands the same
/// records to a consumer with the tracking consumer's settings. Returns (time to the first
/// message, time from the first to the last).
async fn raw_consume(bootstrap: &str, topic: &str, messages: usize) -> anyhow::Result<(Duration, Duration)> {
    use rdkafka::consumer::Consumer as _;
    let settings = kafka::ConsumerSettings::new(&format!("kbench-raw-{}", run_id()));
    let consumer = kafka::consumer(bootstrap, &settings)?;
    consumer.subscribe(&[topic])?;
    let started = Instant::now();
    let mut first = None;
    let mut n = 0;
    while n < messages {
        match tokio::time::timeout(Duration::from_secs(120), consumer.recv()).await {
            Ok(Ok(_)) => {
                first.get_or_insert_with(Instant::now);
                n += 1;
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "raw consumer: receive failed"),
            Err(_) => anyhow::bail!("raw consumer: read {n} of {messages} messages, then nothing for 120 s"),
        }
    }
    let first = first.unwrap_or(started);
    Ok((first - started, first.elapsed()))
}

async fn scalar(pool: &PgPool, sql: &'static str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar::<_, i64>(sql).fetch_one(pool).await?)
}

/// Runs `bench-consumer`.
pub async fn run_consumer(args: BenchConsumerArgs) -> anyhow::Result<()> {
    let run = run_id();
    let topics = run_topics(&run, "consumer");
    let bench = Bench::start(&args.common, "consumer", &run, &[&topics]).await?;
    let measured = consumer_measure(&args, &bench, &topics).await;
    bench.finish(args.common.keep_database, measured, |r| {
        println!(
            "\n== ostore-orders bench-consumer ({} orders, {} messages: {} events + {} redelivered copies, {} partitions, batches of {})",
            r["orders"], r["messages"], r["events"], r["duplicates"], r["partitions"], r["batchSize"]
        );
        println!("  broker                  {}", r["broker"].as_str().unwrap_or(""));
        println!(
            "  until the first apply   {:.2} s (group join)",
            r["joinSeconds"].as_f64().unwrap_or(0.0)
        );
        println!(
            "  applying                {:.2} s",
            r["applySeconds"].as_f64().unwrap_or(0.0)
        );
        println!(
            "  events/s                {:.0}   (messages/s incl. duplicates {:.0})",
            r["eventsPerSecond"].as_f64().unwrap_or(0.0),
            r["messagesPerSecond"].as_f64().unwrap_or(0.0)
        );
        println!(
            "  plain consumer          {:.0} messages/s (first message after {:.2} s; reads only)",
            r["rawConsumer"]["messagesPerSecond"].as_f64().unwrap_or(0.0),
            r["rawConsumer"]["joinSeconds"].as_f64().unwrap_or(0.0)
        );
        println!("  checked                 {}", r["check"].as_str().unwrap_or(""));
    })
    .await
}

async fn consumer_measure(args: &BenchConsumerArgs, bench: &Bench, topics: &Topics) -> anyhow::Result<Value> {
    let (db, bootstrap) = (&bench.db, bench.bootstrap.as_str());
    let k = args.orders;
    bench.note(format_args!("creating {k} confirmed orders in {}", db.name));
    create_orders(&db.pool, k).await?;
    let (records, distinct) = tracking_stream(k, args.duplicate_share);
    let messages = records.len();
    bench.note(format_args!(
        "producing {messages} TrackingEvents ({distinct} distinct) to {}",
        topics.tracking_events
    ));
    produce_tracking(bootstrap, &topics.tracking_events, &records).await?;
    drop(records);
    bench.note("reading them with a plain consumer (no database)");
    let (raw_join, raw_read) = raw_consume(bootstrap, &topics.tracking_events, messages).await?;

    let cfg = ConsumerConfig {
        group_id: format!("kbench-{}", run_id()),
        batch_size: args.batch_size,
        ..ConsumerConfig::default()
    };
    bench.note(format_args!(
        "starting the tracking consumer (group {})",
        cfg.group_id
    ));
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let task = {
        let (pool, bootstrap, topics, token) = (
            db.pool.clone(),
            bootstrap.to_string(),
            topics.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move { tracking::run(pool, cfg, &bootstrap, &topics, token).await })
    };
    let deadline = started + Duration::from_secs(args.timeout_secs);
    let mut first: Option<(Instant, i64)> = None;
    let mut last_report = Instant::now();
    let done = loop {
        let n = scalar(&db.pool, "select count(*) from tracking_inbox").await?;
        let now = Instant::now();
        if n > 0 && first.is_none() {
            first = Some((now, n));
        }
        if n >= distinct as i64 {
            break now;
        }
        if now > deadline || task.is_finished() {
            shutdown.cancel();
            let _ = task.await;
            anyhow::bail!(
                "the consumer applied {n} of {distinct} events in {} s",
                args.timeout_secs
            );
        }
        if !bench.quiet && last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            eprintln!(
                "  {:>5.1}s  {n} of {distinct} events applied",
                started.elapsed().as_secs_f64()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // Let the redelivered copies at the end of the stream go through too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    shutdown.cancel();
    task.await
        .context("the consumer task failed")?
        .context("the tracking consumer")?;

    let (t_first, n_first) = first.unwrap_or((started, 0));
    let apply = done.saturating_duration_since(t_first);
    let applied_in_window = distinct - n_first as usize;
    let events_per_second = rate(applied_in_window, apply);
    let messages_per_second = events_per_second * messages as f64 / distinct as f64;

    // The result must be what applying each event once, in order, gives.
    let delivered = scalar(&db.pool, "select count(*) from orders where status = 'delivered'").await?;
    let notifications = scalar(
        &db.pool,
        "select count(*) from outbox where event_type = 'OrderStatusChanged'",
    )
    .await?;
    let parked = scalar(&db.pool, "select count(*) from tracking_retries").await?;
    let dead = scalar(&db.pool, "select count(*) from dead_letters").await?;
    let inbox = scalar(&db.pool, "select count(*) from tracking_inbox").await?;
    let ok = delivered == k as i64
        && notifications == 4 * k as i64
        && parked == 0
        && dead == 0
        && inbox == distinct as i64;
    let check = format!(
        "{}: {delivered}/{k} orders delivered, {notifications} status-change events (expected {}), \
         {inbox} inbox rows, {parked} parked, {dead} dead letters",
        if ok { "ok" } else { "MISMATCH" },
        4 * k
    );
    Ok(json!({
        "bench": "consumer",
        "broker": bench.broker.name(),
        "orders": k,
        "events": distinct,
        "duplicates": messages - distinct,
        "messages": messages,
        "partitions": args.common.partitions,
        "batchSize": args.batch_size,
        "joinSeconds": t_first.saturating_duration_since(started).as_secs_f64(),
        "applySeconds": apply.as_secs_f64(),
        "eventsPerSecond": events_per_second.round(),
        "rawConsumer": {"joinSeconds": raw_join.as_secs_f64(), "readSeconds": raw_read.as_secs_f64(),
                        "messagesPerSecond": rate(messages, raw_read).round()},
        "messagesPerSecond": messages_per_second.round(),
        "check": check,
        "ok": ok,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_url_keeps_its_parameters() {
        assert_eq!(
            database_url_for("postgres://u@h:5432/ostore?sslmode=disable", "kbench_x").unwrap(),
            "postgres://u@h:5432/kbench_x?sslmode=disable"
        );
        assert_eq!(
            database_url_for("postgres://u@h/ostore", "kbench_x").unwrap(),
            "postgres://u@h/kbench_x"
        );
        // A Unix socket's directory in the query: the database is the path's last part before it.
        let socket = "postgres://postgres@localhost/ostore?host=/var/run/postgresql";
        assert_eq!(
            database_url_for(socket, "kbench_x").unwrap(),
            "postgres://postgres@localhost/kbench_x?host=/var/run/postgresql"
        );
        assert_eq!(split_database_url(socket).unwrap().1, "ostore");
    }

    #[test]
    fn the_tracking_stream_keeps_each_orders_lifecycle_in_order_with_copies_after_the_original() {
        let (records, distinct) = tracking_stream(50, 0.3);
        assert_eq!(distinct, 250);
        let mut seen: HashMap<String, Vec<TrackingStatus>> = HashMap::new();
        let mut ids = std::collections::HashSet::new();
        for r in &records {
            let e: TrackingEvent = serde_json::from_slice(&r.payload).unwrap();
            if ids.insert(e.event_id) {
                seen.entry(r.key.clone()).or_default().push(e.status);
            }
        }
        assert_eq!(ids.len(), distinct);
        for statuses in seen.values() {
            assert_eq!(statuses.as_slice(), LIFECYCLE.as_slice());
        }
    }
}
