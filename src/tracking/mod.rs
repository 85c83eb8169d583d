//! The tracking consumer: applies the shipper's TrackingEvents to orders and notifies customers.
//!
//! A member of a Kafka consumer group on `shipments.tracking-events`. The consumer takes the
//! messages it has already fetched, up to [`ConsumerConfig::batch_size`] (one when traffic is
//! light, full batches while it works off a backlog), and handles them in one PostgreSQL
//! transaction ([`apply::apply_records`]) with the outcome handling them one after the other would
//! have: each event is decided against its order as the events before it left it, then the inbox
//! rows, status changes and outbox messages of the whole batch are written in a few statements.
//! Per event:
//! 1. the order row is locked; an order not known yet (or still `pending`, so its saga has not
//!    confirmed it) **parks** the event in `tracking_retries` ([`retries`]): it is retried with
//!    backoff for [`ConsumerConfig::unknown_order_window`] and then dead-lettered, while the
//!    consumer moves on. Later events of an order with parked events queue behind them, so an
//!    order's events still apply in their partition order;
//! 2. the eventID goes into `tracking_inbox`; an eventID already there is a duplicate and changes
//!    nothing;
//! 3. the tracking status maps to an order status (`picked_up`, `in_transit`, `out_for_delivery` →
//!    `shipped`; `delivered` → `delivered`); the order moves only when
//!    [`OrderStatus::can_move_to`](crate::orders::OrderStatus::can_move_to) allows it, so late and
//!    repeated statuses are logged no-ops. `exception` and `returned` change no status but notify;
//!    `created` changes nothing;
//! 4. the notification (`OrderStatusChanged`, `ShipmentException`, `ShipmentReturned`) goes to the
//!    outbox for `users.notifications`, and a status change also to `orders.events`.
//!
//! Only after the commit are the records' offsets stored; stored offsets are committed every
//! [`ConsumerConfig::commit_interval`], before a rebalance and at shutdown. A crash between the
//! database commit and the offset commit redelivers the event, and the inbox makes that harmless.
//! A malformed event is dead-lettered at once (a `dead_letters` row with the raw
//! bytes and the reason, plus a `TrackingEventDeadLettered` message to the DLQ topic through the
//! outbox) and its offset committed, and so is an event whose data the database refuses (SQLSTATE
//! classes 22 and 23): no kind of bad event holds up its partition. (A batch the database refuses
//! is rolled back and each half is tried as a batch of its own, down to the bad event alone, so
//! only that event is dead-lettered.) Only an unreachable database holds partitions up: the
//! consumer then retries the same event with backoff.
//!
//! Each event is handled in a span of its own (`tracking.apply`, lasting its batch's transaction)
//! that continues the trace of the message's `traceparent`, and the notifications it writes carry
//! that trace on.
//!
//! The parts, each depending only on those above it:
//! - [`record`]: a record as received and its parsing into a typed TrackingEvent;
//! - [`rules`]: the transition rules, pure (what a tracking status does to an order);
//! - [`outcome`]: what handling an event did, and what the rules decided;
//! - `plan`: deciding a batch against its locked orders, and its inbox rows and status changes;
//! - [`dead_letters`]: writing a dead letter (with its DLQ message) and listing them;
//! - [`apply`]: handling a batch in one transaction (the consumer's entry point), parking the
//!   events that must wait in `tracking_retries`;
//! - [`retries`]: the loop that retries parked events; [`replay`]: replaying a dead letter.

pub mod apply;
pub mod dead_letters;
pub mod outcome;
mod plan;
pub mod record;
pub mod replay;
pub mod retries;
pub mod rules;

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context as _;
use backon::{BackoffBuilder as _, ExponentialBuilder};
use futures::StreamExt as _;
use rdkafka::Message as _;
use rdkafka::consumer::{CommitMode, Consumer as _};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{BorrowedMessage, Headers as _};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub use apply::{apply_event, apply_record, apply_records};
pub use dead_letters::{DeadLetterPage, DeadLetterView, list_dead_letters};
pub use outcome::Outcome;
pub use record::Record;
pub use replay::{ReplayError, replay_dead_letter};
pub use retries::process_due;

use crate::kafka::{self, ConsumerSettings, GroupConsumer};
use crate::outbox::Topics;

/// Settings of the tracking consumer.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// Kafka consumer group.
    pub group_id: String,
    /// How long an event whose order is unknown (or still pending) is retried before it is
    /// dead-lettered.
    pub unknown_order_window: Duration,
    /// First delay before a parked event is retried.
    pub retry_initial_delay: Duration,
    /// Longest delay between retries of a parked event.
    pub retry_max_delay: Duration,
    /// How often parked events are checked for being due.
    pub retry_poll_interval: Duration,
    /// How often stored offsets are committed.
    pub commit_interval: Duration,
    /// Group session timeout (`session.timeout.ms`).
    pub session_timeout: Duration,
    /// Group heartbeat (`heartbeat.interval.ms`).
    pub heartbeat_interval: Duration,
    /// Most records applied in one transaction: the consumer takes whatever it has already
    /// fetched, up to this many, so a backlog is worked off in batches and light traffic is
    /// applied one event at a time without waiting.
    pub batch_size: usize,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            group_id: "ostore-orders-tracking".into(),
            unknown_order_window: Duration::from_secs(300),
            retry_initial_delay: Duration::from_secs(1),
            retry_max_delay: Duration::from_secs(30),
            retry_poll_interval: Duration::from_millis(500),
            commit_interval: Duration::from_secs(1),
            session_timeout: Duration::from_secs(45),
            heartbeat_interval: Duration::from_secs(3),
            batch_size: 500,
        }
    }
}

impl ConsumerConfig {
    /// The defaults with the service's `TRACKING_*` windows.
    pub fn from_config(cfg: &crate::config::ServiceConfig) -> ConsumerConfig {
        let (retry_initial_delay, retry_max_delay) = cfg.tracking_retry_delays();
        ConsumerConfig {
            unknown_order_window: cfg.tracking_unknown_order_window(),
            retry_initial_delay,
            retry_max_delay,
            ..Default::default()
        }
    }

    /// The delay before retry number `attempt` (0-based) of a parked event.
    pub fn retry_delay(&self, attempt: u32) -> Duration {
        ExponentialBuilder::default()
            .with_min_delay(self.retry_initial_delay)
            .with_max_delay(self.retry_max_delay)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build()
            .nth(attempt as usize)
            .unwrap_or(self.retry_max_delay)
    }
}

/// Runs the consumer group member and the retry of parked events until `shutdown` is cancelled.
/// Fails only when the consumer cannot be created or subscribed.
pub async fn run(
    pool: PgPool,
    cfg: ConsumerConfig,
    bootstrap: &str,
    topics: &Topics,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut settings = ConsumerSettings::new(&cfg.group_id);
    settings.session_timeout = cfg.session_timeout;
    settings.heartbeat_interval = cfg.heartbeat_interval;
    let consumer = kafka::consumer(bootstrap, &settings)?;
    consumer
        .subscribe(&[topics.tracking_events.as_str()])
        .with_context(|| format!("subscribing to {}", topics.tracking_events))?;
    tracing::info!(topic = %topics.tracking_events, group = %cfg.group_id, "tracking consumer started");
    tokio::join!(
        consume(&consumer, &pool, &cfg, topics, &shutdown),
        retries::run(pool.clone(), cfg.clone(), topics.clone(), shutdown.clone()),
    );
    commit(&consumer, CommitMode::Sync);
    tracing::info!("tracking consumer stopped");
    Ok(())
}

async fn consume(
    consumer: &GroupConsumer,
    pool: &PgPool,
    cfg: &ConsumerConfig,
    topics: &Topics,
    shutdown: &CancellationToken,
) {
    let mut commit_tick = tokio::time::interval(cfg.commit_interval);
    commit_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stored = false;
    // Whatever the consumer has fetched already, up to a batch: one message when traffic is light,
    // full batches when there is a backlog.
    let mut messages = consumer.stream().ready_chunks(cfg.batch_size.max(1));
    loop {
        let received = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = commit_tick.tick() => {
                if std::mem::take(&mut stored) {
                    commit(consumer, CommitMode::Async);
                }
                continue;
            }
            m = messages.next() => m.unwrap_or_default(),
        };
        let mut batch = Vec::with_capacity(received.len());
        let mut failed = false;
        for m in received {
            match m {
                Ok(m) => batch.push(m),
                Err(e) => {
                    failed = true;
                    tracing::warn!(error = %e, "tracking consumer: receive failed");
                }
            }
        }
        if batch.is_empty() {
            if failed {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
            continue;
        }
        let records: Vec<Record> = batch.iter().map(record_of).collect();
        let started = std::time::Instant::now();
        let handled = handle_batch(pool, cfg, topics, &records, shutdown).await;
        tracing::debug!(
            events = records.len(),
            handled,
            elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
            "tracking consumer: batch handled"
        );
        for message in &batch[..handled] {
            match consumer.store_offset_from_message(message) {
                Ok(()) => stored = true,
                // The partition was revoked meanwhile; its next owner redelivers (the inbox dedupes).
                Err(e) => tracing::debug!(error = %e, "tracking consumer: offset not stored"),
            }
        }
        if handled < batch.len() {
            // Shutting down before every event was handled: the rest is redelivered to the next
            // owner.
            return;
        }
    }
}

/// Applies a batch of records in one transaction. When the database refuses the batch's data, each
/// half is tried as a batch of its own, so an event it refuses ends up alone (and is dead-lettered)
/// while the others stay batched; on any other failure the records are applied one by one (an
/// unreachable database is waited for). Returns how many records, from the first, were handled
/// (fewer than all only at shutdown).
async fn handle_batch(
    pool: &PgPool,
    cfg: &ConsumerConfig,
    topics: &Topics,
    records: &[Record],
    shutdown: &CancellationToken,
) -> usize {
    if records.len() > 1 {
        match apply_records(pool, cfg, topics, records).await {
            Ok(_) => return records.len(),
            Err(e) if refused_data(&e) => {
                tracing::info!(error = %e, events = records.len(),
                    "tracking consumer: the database refused the batch; trying each half");
                let (first, second) = records.split_at(records.len() / 2);
                let done = Box::pin(handle_batch(pool, cfg, topics, first, shutdown)).await;
                if done < first.len() {
                    return done;
                }
                return done + Box::pin(handle_batch(pool, cfg, topics, second, shutdown)).await;
            }
            Err(e) => tracing::info!(error = %e, events = records.len(),
                "tracking consumer: the batch failed; handling its events one by one"),
        }
    }
    for (i, record) in records.iter().enumerate() {
        if !handle(pool, cfg, topics, record, shutdown).await {
            return i;
        }
    }
    records.len()
}

/// Applies one record, retrying while the database is unreachable. False when shutdown came first.
async fn handle(
    pool: &PgPool,
    cfg: &ConsumerConfig,
    topics: &Topics,
    record: &Record,
    shutdown: &CancellationToken,
) -> bool {
    let mut backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times()
        .build();
    loop {
        match apply_record(pool, cfg, topics, record).await {
            Ok(_) => return true,
            // The database refuses this event's data (not a passing failure): retrying would
            // block the partition forever, so it is dead-lettered instead.
            Err(e) if refused_data(&e) => {
                let reason = format!("the database refused the event: {e}");
                match dead_letters::dead_letter_now(pool, topics, record, &reason).await {
                    Ok(id) => {
                        tracing::warn!(dead_letter_id = id, reason = %reason, "tracking event dead-lettered");
                        return true;
                    }
                    Err(e) => tracing::warn!(error = %e, "tracking consumer: dead-lettering failed"),
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return false,
                    _ = tokio::time::sleep(backoff.next().unwrap_or(Duration::from_secs(10))) => {}
                }
            }
            Err(e) => {
                let delay = backoff.next().unwrap_or(Duration::from_secs(10));
                tracing::warn!(error = %e, partition = ?record.partition, offset = ?record.offset,
                    retry_in_ms = delay.as_millis() as u64,
                    "tracking consumer: database error; retrying the event");
                tokio::select! {
                    _ = shutdown.cancelled() => return false,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// A data exception (SQLSTATE class 22) or an integrity violation (23): the same event would fail
/// again, unlike a lost connection, a timeout, a deadlock or a serialization failure.
fn refused_data(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|code| code.starts_with("22") || code.starts_with("23"))
}

fn commit(consumer: &GroupConsumer, mode: CommitMode) {
    match consumer.commit_consumer_state(mode) {
        Ok(()) => {}
        Err(e) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::NoOffset) => {}
        Err(e) => tracing::warn!(error = %e, "tracking consumer: offset commit failed"),
    }
}

/// Copies what the consumer needs out of a Kafka message.
fn record_of(message: &BorrowedMessage<'_>) -> Record {
    let mut headers = HashMap::new();
    if let Some(h) = message.headers() {
        for header in h.iter() {
            if let Some(value) = header.value {
                headers.insert(
                    header.key.to_string(),
                    String::from_utf8_lossy(value).into_owned(),
                );
            }
        }
    }
    Record {
        topic: message.topic().to_string(),
        partition: Some(message.partition()),
        offset: Some(message.offset()),
        key: message.key().map(<[u8]>::to_vec),
        payload: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        headers,
    }
}
