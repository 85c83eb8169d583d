//! The outbox relay: publishes committed outbox rows to Kafka, in id order, and marks them published
//! once the broker acknowledged them.
//!
//! - **One leader.** Relays coordinate through a PostgreSQL session advisory lock
//!   ([`RELAY_LOCK_KEY`]): the instance holding it publishes, the others stand by and try again
//!   every [`RelayConfig::standby_interval`]. The leader reads rows on the connection that holds
//!   the lock, so once its session ends (crash, network loss) it reads nothing more, and another
//!   instance takes over from the oldest unpublished row. (Marks go through pool connections:
//!   marking a row the broker acknowledged is right whoever does it.) One publisher
//!   reading in id order is what keeps each order's events in commit order (rows of one order are
//!   written by transactions that hold the order's row lock, so their ids follow their commits).
//!   Sharding by key hash was the alternative; it buys parallel publishers at the price of
//!   rebalancing shards between instances, and a single relay publishing in batches already goes
//!   well beyond the rate at which sagas write rows. See docs/outbox.md.
//! - **Batches, pipelined.** A pass reads up to [`RelayConfig::batch_size`] rows and hands them
//!   all to the producer; while they are in flight it reads and sends the next batch, then awaits
//!   the first batch's delivery reports and marks its delivered rows in a background task while the
//!   loop goes on. So PostgreSQL reads, PostgreSQL writes and the broker work at the same time.
//! - **Acknowledged, then marked.** `published_at` is set only for rows whose delivery report
//!   succeeded (idempotent producer, `acks=all`). A relay killed between the two republishes the
//!   batch: delivery is at-least-once and the duplicates carry the same `eventID`.
//! - **Wake-up.** LISTEN on channel `outbox` (a statement trigger NOTIFYs on insert), with a poll
//!   every [`RelayConfig::poll_interval`] as a fallback for lost notifications.
//! - **Outages.** When Kafka is unreachable the pass fails, rows stay unpublished, and the relay
//!   retries with exponential backoff (`backon`) until publishing works again, by itself.
//! - **Poison rows.** A row Kafka refuses for good (too large, an invalid topic:
//!   [`dead::is_permanent`]) is moved to `outbox_dead_letters` and the pass goes on; one bad row
//!   never holds the others.
//! - **Retention.** Published rows older than [`RelayConfig::retention`] are deleted in chunks by
//!   the leader every [`RelayConfig::cleanup_interval`]; with a zero retention, rows are deleted as
//!   soon as they are acknowledged instead of being marked. Each batch also adds to a per-second
//!   count (`outbox_relay_stats`) that [`backlog`] reads.
//! - **A floor under the scan.** Marked (or deleted) rows leave dead entries in the index of
//!   unpublished rows until VACUUM removes them, and on a large table VACUUM may skip that index
//!   for a long time; a pass that read from id 0 would walk all of them, every pass. So the leader
//!   keeps a [`Floor`]: the id through which every row is known to be published. A row can only
//!   show up late below what a pass saw if its transaction was still running at that pass's
//!   snapshot (ids are drawn in order, and migration 0013 makes a transaction take its xid before
//!   its outbox id); once every transaction running then has ended, the next pass that publishes
//!   everything it sees raises the floor past what the earlier pass saw. A long-running writing
//!   transaction anywhere in the database only holds the floor where it is (the scan walks more);
//!   it never skips a row. As a safety net the floor goes back to 0 every
//!   [`RelayConfig::cleanup_interval`] (a warning is logged if a row is ever found below it).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder as _, ExponentialBackoff, ExponentialBuilder};
use futures::future::join_all;
use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use serde::Serialize;
use serde_json::Value;
use sqlx::postgres::PgListener;
use sqlx::{Connection as _, PgConnection, PgPool};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::dead;

/// Key of the session advisory lock whose holder is the publishing relay (`"ostore"` in ASCII,
/// then 1). Never change it: instances of different versions must contend for the same lock.
pub const RELAY_LOCK_KEY: i64 = 0x6f73_746f_7265_0001;

/// The NOTIFY channel the outbox trigger signals.
pub const CHANNEL: &str = "outbox";

/// Ids per marking statement (12 bytes each on the wire).
const MARK_CHUNK: usize = 1000;

/// Rows deleted per statement by the retention cleanup.
const CLEANUP_CHUNK: i64 = 10_000;

/// Settings of the relay.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Most rows read and produced per batch.
    pub batch_size: usize,
    /// Polling fallback: a pass runs at least this often even without a notification.
    pub poll_interval: Duration,
    /// Published rows older than this are deleted. Zero deletes each row as soon as the broker
    /// acknowledged it instead of marking it (no audit trail in the table, but about twice the
    /// publishing rate: a delete costs PostgreSQL a fifth of an update).
    pub retention: Duration,
    /// How often the leader deletes expired rows.
    pub cleanup_interval: Duration,
    /// How often a standby relay tries to become the leader.
    pub standby_interval: Duration,
    /// First delay after a failed pass (Kafka or PostgreSQL unreachable).
    pub backoff_min: Duration,
    /// Longest delay between retries of a failed pass.
    pub backoff_max: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            batch_size: 2000,
            poll_interval: Duration::from_secs(1),
            retention: Duration::from_secs(24 * 3600),
            cleanup_interval: Duration::from_secs(60),
            standby_interval: Duration::from_secs(2),
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
        }
    }
}

impl RelayConfig {
    /// The defaults with the service's settings (`OUTBOX_RETENTION_SECONDS`).
    pub fn from_config(cfg: &crate::config::ServiceConfig) -> RelayConfig {
        RelayConfig {
            retention: cfg.outbox_retention(),
            ..Default::default()
        }
    }

    fn backoff(&self) -> ExponentialBackoff {
        ExponentialBuilder::default()
            .with_min_delay(self.backoff_min)
            .with_max_delay(self.backoff_max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build()
    }
}

/// Why a publishing pass stopped.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// PostgreSQL failed (the leader's connection is dropped, which releases leadership).
    #[error("outbox database access failed: {0}")]
    Database(#[from] sqlx::Error),
    /// A message could not be produced or was not acknowledged; its row stays unpublished.
    #[error("publishing to Kafka failed: {0}")]
    Kafka(#[from] KafkaError),
}

/// The leader's knowledge of which rows are certainly published (see the module's "A floor under
/// the scan").
#[derive(Debug, Default)]
pub struct Floor {
    /// Every row with an id up to this one is published (or will never be visible).
    done_through: i64,
    /// Passes that published every row they saw, up to `max_id`: those ids are done once every
    /// transaction that was running at the pass's snapshot has ended (its `xmax` is at most a
    /// later snapshot's `xmin`). Oldest first.
    checkpoints: VecDeque<Checkpoint>,
    /// After a reset, the floor the leader had: a row found at or below it is reported.
    audit_below: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Checkpoint {
    max_id: i64,
    xmax: i64,
}

/// Most checkpoints kept; older ones are merged (conservatively) when a writing transaction
/// holds the floor for long.
const MAX_CHECKPOINTS: usize = 64;

impl Floor {
    /// The id a pass starts after.
    pub fn start(&self) -> i64 {
        self.done_through
    }

    /// Forgets everything: the next pass reads from the first row (the safety net).
    pub fn reset(&mut self) {
        *self = Floor {
            audit_below: self.done_through.max(self.audit_below),
            ..Floor::default()
        };
    }

    /// After a pass in a snapshot with `xmin`/`xmax` published every row it saw (it read ids
    /// above `start()` up to `max_read`, none left behind): raises the floor past every checkpoint
    /// whose transactions have all ended, and records this pass as a checkpoint.
    fn passed(&mut self, xmin: i64, xmax: i64, max_read: Option<i64>) {
        self.audit_below = 0;
        while let Some(c) = self.checkpoints.front().copied() {
            if c.xmax > xmin {
                break;
            }
            self.checkpoints.pop_front();
            self.done_through = self.done_through.max(c.max_id);
        }
        if let Some(max_id) = max_read.filter(|m| *m > self.done_through) {
            if self.checkpoints.len() == MAX_CHECKPOINTS {
                // Merge the two oldest: waiting for the later one's transactions covers both.
                let first = self.checkpoints.pop_front().expect("full");
                if let Some(second) = self.checkpoints.front_mut() {
                    second.max_id = second.max_id.max(first.max_id);
                }
            }
            self.checkpoints.push_back(Checkpoint { max_id, xmax });
        }
    }
}

/// Runs the relay until `shutdown` is cancelled: stands by until it holds the leadership lock, then
/// publishes on every notification and poll. Never returns an error: failures are logged and
/// retried with backoff, and every row stays in the outbox until it was acknowledged.
pub async fn run<C>(pool: PgPool, producer: FutureProducer<C>, cfg: RelayConfig, shutdown: CancellationToken)
where
    C: ClientContext + 'static,
{
    let mut session: Option<PgConnection> = None;
    let mut leading = false;
    let mut listener: Option<PgListener> = None;
    let mut backoff = cfg.backoff();
    let mut last_cleanup: Option<Instant> = None;
    let mut floor = Floor::default();
    tracing::info!(batch_size = cfg.batch_size, "outbox relay started");
    while !shutdown.is_cancelled() {
        if !leading {
            match try_lead(&pool, &mut session).await {
                Ok(true) => {
                    leading = true;
                    floor.reset();
                    tracing::info!("outbox relay: leading (holds the relay lock)");
                }
                Ok(false) => {
                    pause(cfg.standby_interval, &shutdown).await;
                    continue;
                }
                Err(e) => {
                    session = None;
                    tracing::warn!(error = %e, "outbox relay: cannot reach PostgreSQL");
                    pause(backoff.next().unwrap_or(cfg.backoff_max), &shutdown).await;
                    continue;
                }
            }
        }
        if listener.is_none() {
            listener = listen(&pool).await;
        }
        // Notifications that arrived before this pass are covered by it.
        if let Some(l) = listener.as_mut() {
            while l.next_buffered().is_some() {}
        }
        let Some(conn) = session.as_mut() else {
            leading = false;
            continue;
        };
        let pass = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = publish_pending(conn, &pool, &producer, &cfg, Some(&shutdown), &mut floor) => r,
        };
        match pass {
            Ok(n) => {
                backoff = cfg.backoff();
                if n > 0 {
                    tracing::debug!(published = n, "outbox relay: published");
                }
            }
            Err(RelayError::Kafka(e)) => {
                let delay = backoff.next().unwrap_or(cfg.backoff_max);
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64,
                    "outbox relay: publishing failed; the rows are kept and retried");
                pause(delay, &shutdown).await;
                continue;
            }
            Err(RelayError::Database(e)) => {
                // Dropping the session closes it, which releases the lock for another instance.
                session = None;
                leading = false;
                floor.reset();
                let delay = backoff.next().unwrap_or(cfg.backoff_max);
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64,
                    "outbox relay: database error; leadership released");
                pause(delay, &shutdown).await;
                continue;
            }
        }
        if last_cleanup.is_none_or(|t| t.elapsed() >= cfg.cleanup_interval) {
            last_cleanup = Some(Instant::now());
            floor.reset();
            if let Some(conn) = session.as_mut() {
                match delete_expired(conn, cfg.retention).await {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::info!(deleted = n, "outbox relay: deleted published rows past retention")
                    }
                    Err(e) => tracing::warn!(error = %e, "outbox relay: retention cleanup failed"),
                }
            }
        }
        wait_for_work(&mut listener, cfg.poll_interval, &shutdown).await;
    }
    if let Some(conn) = session {
        let _ = conn.close().await;
    }
    tracing::info!("outbox relay stopped");
}

/// Publishes everything pending now (for tests and tools) and returns how many rows were
/// published. Takes the relay lock for the duration; returns `Ok(0)` when another relay holds it.
pub async fn run_once<C>(
    pool: &PgPool,
    producer: &FutureProducer<C>,
    cfg: &RelayConfig,
) -> anyhow::Result<usize>
where
    C: ClientContext + 'static,
{
    let mut session = None;
    if !try_lead(pool, &mut session).await? {
        tracing::debug!("outbox relay: another relay holds the lock");
        return Ok(0);
    }
    let Some(mut conn) = session else { return Ok(0) };
    let result = publish_pending(&mut conn, pool, producer, cfg, None, &mut Floor::default()).await;
    let _ = conn.close().await;
    Ok(result?)
}

/// Takes (or keeps) the leadership lock on a connection of its own (detached from the pool, so
/// the lock dies with the connection). `Ok(false)` while another relay leads.
async fn try_lead(pool: &PgPool, session: &mut Option<PgConnection>) -> Result<bool, sqlx::Error> {
    if session.is_none() {
        *session = Some(pool.acquire().await?.detach());
    }
    let Some(conn) = session.as_mut() else {
        return Ok(false);
    };
    let got = sqlx::query_scalar!(r#"select pg_try_advisory_lock($1) as "got!""#, RELAY_LOCK_KEY)
        .fetch_one(conn)
        .await?;
    Ok(got)
}

async fn listen(pool: &PgPool) -> Option<PgListener> {
    let r = async {
        let mut l = PgListener::connect_with(pool).await?;
        l.listen(CHANNEL).await?;
        Ok::<_, sqlx::Error>(l)
    }
    .await;
    match r {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(error = %e, "outbox relay: LISTEN failed; polling only");
            None
        }
    }
}

async fn wait_for_work(listener: &mut Option<PgListener>, poll: Duration, shutdown: &CancellationToken) {
    let lost = match listener.as_mut() {
        Some(l) => tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(poll) => false,
            r = l.recv() => r.is_err(),
        },
        None => {
            pause(poll, shutdown).await;
            false
        }
    };
    if lost {
        tracing::debug!("outbox relay: listener lost; reconnecting on the next pass");
        *listener = None;
    }
}

async fn pause(delay: Duration, shutdown: &CancellationToken) {
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(delay) => {}
    }
}

/// One outbox row as the relay produces it.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    /// Outbox id (commit order within one order).
    pub id: i64,
    /// Destination topic.
    pub topic: String,
    /// Message key (the orderID).
    pub message_key: String,
    /// The envelope as JSON text.
    pub payload: String,
    /// Kafka headers (a JSON object of strings).
    pub headers: Value,
}

/// Reads up to `limit` unpublished rows with an id above `after`, oldest first.
pub async fn pending_rows(
    conn: &mut PgConnection,
    after: i64,
    limit: usize,
) -> Result<Vec<OutboxRow>, sqlx::Error> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = sqlx::query_as!(
        OutboxRow,
        r#"select id, topic, message_key, payload::text as "payload!", headers
           from outbox where published_at is null and id > $1 order by id limit $2"#,
        after,
        limit
    )
    .fetch_all(conn)
    .await?;
    Ok(rows)
}

/// Marks rows published (after their delivery was acknowledged) and counts them in
/// `outbox_relay_stats`.
pub async fn mark_published(conn: &mut PgConnection, ids: &[i64]) -> Result<u64, sqlx::Error> {
    let mut marked = 0;
    // One statement per chunk keeps each message below 16 KiB, a TLS record: a larger one is sent
    // as two records, and Nagle's algorithm meeting the server's delayed ACK stalls it ~40 ms.
    for chunk in ids.chunks(MARK_CHUNK) {
        let r = sqlx::query!(
            "update outbox set published_at = now() where id = any($1) and published_at is null",
            chunk
        )
        .execute(&mut *conn)
        .await?;
        marked += r.rows_affected();
    }
    count_published(conn, marked).await?;
    Ok(marked)
}

/// The delivery reports of one batch.
#[derive(Debug, Default)]
pub struct Delivered {
    /// Rows the broker acknowledged, in id order.
    pub ids: Vec<i64>,
    /// Rows Kafka refused for good ([`dead::is_permanent`]), with the error; they are set aside.
    pub refused: Vec<(i64, KafkaError)>,
    /// The first failure that may pass (the rows after it may or may not have been delivered).
    pub failure: Option<KafkaError>,
}

struct Flight {
    sent: Vec<(i64, DeliveryFuture, tracing::Span)>,
    refused: Vec<(i64, KafkaError)>,
    enqueue_error: Option<KafkaError>,
}

impl Flight {
    async fn wait(self) -> Delivered {
        let mut ids = Vec::with_capacity(self.sent.len());
        let mut futures = Vec::with_capacity(self.sent.len());
        let mut spans = Vec::with_capacity(self.sent.len());
        for (id, future, span) in self.sent {
            ids.push(id);
            futures.push(future);
            spans.push(span);
        }
        let mut out = Delivered {
            refused: self.refused,
            ..Delivered::default()
        };
        for ((id, result), span) in ids.into_iter().zip(join_all(futures).await).zip(spans) {
            match &result {
                Ok(Ok(d)) => {
                    span.record("messaging.destination.partition.id", d.partition.to_string());
                    span.record("messaging.kafka.offset", d.offset);
                }
                Ok(Err((e, _))) => {
                    span.record("error.type", error_type(e));
                    span.record("otel.status_code", "error");
                }
                Err(_) => {
                    span.record("error.type", "canceled");
                    span.record("otel.status_code", "error");
                }
            }
            match result {
                Ok(Ok(_)) => out.ids.push(id),
                Ok(Err((e, _))) if dead::is_permanent(&e) => out.refused.push((id, e)),
                Ok(Err((e, _))) => {
                    out.failure.get_or_insert(e);
                }
                Err(_) => {
                    out.failure.get_or_insert(KafkaError::Canceled);
                }
            }
        }
        if let Some(e) = self.enqueue_error {
            out.failure.get_or_insert(e);
        }
        out
    }
}

/// Hands every row to the producer (no waiting for acknowledgements); a row the producer refuses
/// for good (too large, say) is noted and skipped; any other refusal stops the batch there.
async fn send_rows<C>(producer: &FutureProducer<C>, rows: &[OutboxRow]) -> Flight
where
    C: ClientContext + 'static,
{
    let mut flight = Flight {
        sent: Vec::with_capacity(rows.len()),
        refused: Vec::new(),
        enqueue_error: None,
    };
    for row in rows {
        let span = publish_span(row);
        let mut record = FutureRecord::to(&row.topic)
            .key(row.message_key.as_bytes())
            .payload(row.payload.as_bytes())
            .headers(kafka_headers(&row.headers, &span));
        let mut waited = Duration::ZERO;
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    flight.sent.push((row.id, delivery, span));
                    break;
                }
                // The local queue is full: give librdkafka a moment to drain it.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if waited < Duration::from_secs(30) =>
                {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    waited += Duration::from_millis(10);
                }
                Err((e, _)) if dead::is_permanent(&e) => {
                    span.record("error.type", error_type(&e));
                    span.record("otel.status_code", "error");
                    flight.refused.push((row.id, e));
                    break;
                }
                Err((e, _)) => {
                    span.record("error.type", error_type(&e));
                    span.record("otel.status_code", "error");
                    flight.enqueue_error = Some(e);
                    return flight;
                }
            }
        }
    }
    flight
}

/// Produces one batch of rows and waits for every delivery report, without marking anything
/// (what a relay killed between producing and marking leaves behind). Most callers want
/// [`run_once`].
pub async fn produce_rows<C>(producer: &FutureProducer<C>, rows: &[OutboxRow]) -> Delivered
where
    C: ClientContext + 'static,
{
    send_rows(producer, rows).await.wait().await
}

/// Publishes every unpublished row in id order, a batch at a time, and returns how many were
/// published. A pipeline: while batch k is in flight, batch k+1 is read (on the leader's
/// connection) and sent, and batch k-1 is marked (on another connection); so the database and the
/// broker work at the same time. On the first failed delivery it stops, marks what was delivered,
/// and reports the failure; everything else stays pending for the next pass.
async fn publish_pending<C>(
    conn: &mut PgConnection,
    pool: &PgPool,
    producer: &FutureProducer<C>,
    cfg: &RelayConfig,
    shutdown: Option<&CancellationToken>,
    floor: &mut Floor,
) -> Result<usize, RelayError>
where
    C: ClientContext + 'static,
{
    // One snapshot for the whole pass. Read batch by batch with a snapshot each, a pass could be
    // past a row whose transaction took its id early and committed late, then read a later row
    // of the same order committed after it, and publish that one first (the late row waits for
    // the next pass). In one snapshot an order's visible rows are a prefix of its rows in commit
    // order (they are written under the order's row lock), so nothing overtakes: the late row and
    // everything after it wait for the next pass together.
    sqlx::query("begin isolation level repeatable read read only")
        .execute(&mut *conn)
        .await?;
    let pass = publish_in_snapshot(conn, pool, producer, cfg, shutdown, floor).await;
    // Ends the snapshot whatever happened (after a failed statement too).
    let end = sqlx::query("rollback").execute(&mut *conn).await;
    let n = pass?;
    end?;
    Ok(n)
}

async fn publish_in_snapshot<C>(
    conn: &mut PgConnection,
    pool: &PgPool,
    producer: &FutureProducer<C>,
    cfg: &RelayConfig,
    shutdown: Option<&CancellationToken>,
    floor: &mut Floor,
) -> Result<usize, RelayError>
where
    C: ClientContext + 'static,
{
    let batch_size = cfg.batch_size.max(1);
    let delete = cfg.retention.is_zero();
    // The snapshot's transaction horizon, for the floor (xid8 as bigint: exact below 2^63).
    let (xmin, xmax): (i64, i64) = sqlx::query_as(
        "select pg_snapshot_xmin(s)::text::bigint, pg_snapshot_xmax(s)::text::bigint from pg_current_snapshot() s",
    )
    .fetch_one(&mut *conn)
    .await?;
    let start = floor.start();
    let mut total = 0;
    let mut after = start;
    let mut max_read: Option<i64> = None;
    // True once a read came back short: every row the snapshot shows above the floor was read.
    let mut drained = false;
    let mut exhausted = false;
    let mut in_flight: Option<Flight> = None;
    let mut marking: Option<JoinHandle<Result<u64, sqlx::Error>>> = None;
    loop {
        let rows = if exhausted {
            Vec::new()
        } else {
            pending_rows(conn, after, batch_size).await?
        };
        if !exhausted && rows.len() < batch_size {
            drained = true;
        }
        if rows.len() < batch_size || shutdown.is_some_and(|s| s.is_cancelled()) {
            exhausted = true;
        }
        if let Some(last) = rows.last() {
            after = last.id;
            max_read = Some(last.id);
        }
        if let Some(row) = rows.first().filter(|r| r.id <= floor.audit_below) {
            // The safety net's pass found a row under the floor the leader had: it is published
            // now, but possibly after later rows of its order.
            tracing::warn!(
                outbox_id = row.id,
                floor = floor.audit_below,
                "outbox relay: an unpublished row was found below the relay's floor; publishing it now"
            );
            floor.audit_below = 0;
        }
        let next = if rows.is_empty() {
            None
        } else {
            Some(send_rows(producer, &rows).await)
        };
        let Some(current) = std::mem::replace(&mut in_flight, next) else {
            if in_flight.is_none() {
                if drained {
                    floor.passed(xmin, xmax, max_read);
                }
                return Ok(total);
            }
            continue;
        };
        let delivered = current.wait().await;
        finish(&mut marking).await?;
        set_aside(pool, &delivered.refused).await?;
        if let Some(e) = delivered.failure {
            // Keep what did get through, including the batch sent after this one.
            let mut ids = delivered.ids;
            if let Some(next) = in_flight.take() {
                let next = next.wait().await;
                set_aside(pool, &next.refused).await?;
                ids.extend(next.ids);
            }
            acknowledge(pool, &ids, delete).await?;
            return Err(RelayError::Kafka(e));
        }
        total += delivered.ids.len();
        let pool = pool.clone();
        marking = Some(tokio::spawn(async move {
            acknowledge(&pool, &delivered.ids, delete).await
        }));
        if in_flight.is_none() {
            finish(&mut marking).await?;
            // Every row this snapshot showed above the floor is published (a refused one is set
            // aside, which is as final).
            if drained {
                floor.passed(xmin, xmax, max_read);
            }
            return Ok(total);
        }
    }
}

/// Moves rows Kafka refused for good out of the outbox, saying so in the log.
async fn set_aside(pool: &PgPool, refused: &[(i64, KafkaError)]) -> Result<(), sqlx::Error> {
    if refused.is_empty() {
        return Ok(());
    }
    let rows: Vec<(i64, String)> = refused.iter().map(|(id, e)| (*id, e.to_string())).collect();
    dead::set_aside(pool, &rows).await?;
    for (id, error) in &rows {
        tracing::error!(outbox_id = id, %error,
            "outbox relay: Kafka refuses this row for good; set aside in outbox_dead_letters \
             (GET /admin/outbox/dead-letters), the other rows go on");
    }
    Ok(())
}

/// Waits for the marking of the previous batch.
async fn finish(marking: &mut Option<JoinHandle<Result<u64, sqlx::Error>>>) -> Result<(), sqlx::Error> {
    if let Some(task) = marking.take() {
        task.await
            .map_err(|e| sqlx::Error::Protocol(format!("marking task failed: {e}")))??;
    }
    Ok(())
}

/// Marks (or, with `delete`, deletes) acknowledged rows in a transaction that does not wait for its
/// WAL flush (`synchronous_commit = off`): a mark lost to a database crash only means the rows are
/// published again, which at-least-once delivery allows, and not waiting speeds the relay up.
async fn acknowledge(pool: &PgPool, ids: &[i64], delete: bool) -> Result<u64, sqlx::Error> {
    if ids.is_empty() {
        return Ok(0);
    }
    let mut tx = pool.begin().await?;
    sqlx::query!("select set_config('synchronous_commit', 'off', true)")
        .fetch_one(&mut *tx)
        .await?;
    let n = if delete {
        delete_published(&mut tx, ids).await?
    } else {
        mark_published(&mut tx, ids).await?
    };
    tx.commit().await?;
    Ok(n)
}

/// Deletes acknowledged rows (zero retention) and counts them as published.
async fn delete_published(conn: &mut PgConnection, ids: &[i64]) -> Result<u64, sqlx::Error> {
    let mut deleted = 0;
    for chunk in ids.chunks(MARK_CHUNK) {
        let r = sqlx::query!(
            "delete from outbox where id = any($1) and published_at is null",
            chunk
        )
        .execute(&mut *conn)
        .await?;
        deleted += r.rows_affected();
    }
    count_published(conn, deleted).await?;
    Ok(deleted)
}

/// Adds to the per-second count of published rows.
async fn count_published(conn: &mut PgConnection, n: u64) -> Result<(), sqlx::Error> {
    if n == 0 {
        return Ok(());
    }
    sqlx::query!(
        "insert into outbox_relay_stats (second, published) values (date_trunc('second', now()), $1)
         on conflict (second) do update set published = outbox_relay_stats.published + excluded.published",
        i64::try_from(n).unwrap_or(i64::MAX)
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// The PRODUCER span of one row's publication (OpenTelemetry messaging conventions), a child of
/// the span that wrote the row (its `traceparent`); it ends with the broker's acknowledgement.
fn publish_span(row: &OutboxRow) -> tracing::Span {
    let span = tracing::info_span!(
        "outbox.publish",
        otel.name = format!("send {}", row.topic),
        otel.kind = "producer",
        otel.status_code = tracing::field::Empty,
        messaging.system = "kafka",
        messaging.operation.type = "send",
        messaging.operation.name = "send",
        messaging.destination.name = %row.topic,
        messaging.message.id = row.headers.get("event-id").and_then(serde_json::Value::as_str).unwrap_or(""),
        messaging.kafka.message.key = %row.message_key,
        messaging.destination.partition.id = tracing::field::Empty,
        messaging.kafka.offset = tracing::field::Empty,
        error.r#type = tracing::field::Empty,
        outbox.id = row.id,
    );
    crate::telemetry::set_remote_parent(&span, &JsonHeaders(&row.headers));
    span
}

/// Reads `traceparent`/`tracestate` out of a row's JSON headers.
struct JsonHeaders<'a>(&'a Value);

impl opentelemetry::propagation::Extractor for JsonHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(Value::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .as_object()
            .map(|m| m.keys().map(String::as_str).collect())
            .unwrap_or_default()
    }
}

/// `error.type` of a failed publication: librdkafka's error code name.
fn error_type(e: &KafkaError) -> String {
    match e.rdkafka_error_code() {
        Some(code) => format!("{code:?}"),
        None => "kafka_error".to_string(),
    }
}

/// The Kafka headers of a row: its stored headers, with the trace context of `span` (the PRODUCER
/// span) in place of the row's, so the consumer's span hangs under the publication.
fn kafka_headers(headers: &Value, span: &tracing::Span) -> OwnedHeaders {
    let mut out = OwnedHeaders::new();
    let trace = crate::telemetry::context_headers(span);
    let traced = trace.contains_key("traceparent");
    for (key, value) in &trace {
        out = out.insert(Header {
            key,
            value: Some(value.as_bytes()),
        });
    }
    if let Value::Object(map) = headers {
        for (key, value) in map {
            if traced && (key == "traceparent" || key == "tracestate") {
                continue;
            }
            let text = match value {
                Value::String(s) => s.clone(),
                Value::Null => continue,
                other => other.to_string(),
            };
            out = out.insert(Header {
                key,
                value: Some(text.as_bytes()),
            });
        }
    }
    out
}

/// Deletes published rows older than `retention`, in chunks, and per-second counts older than an
/// hour; returns how many rows. Each chunk looks at the oldest [`CLEANUP_CHUNK`] rows only and
/// deletes the expired ones; rows are published about in id order, so once the newest row of a
/// chunk is not expired, the rest are younger and the cleanup stops. (Asking for "expired rows in
/// id order" instead walked the whole table whenever none had expired: a full scan a minute with a
/// day's rows kept.)
pub async fn delete_expired(conn: &mut PgConnection, retention: Duration) -> Result<u64, sqlx::Error> {
    delete_expired_by(conn, retention, CLEANUP_CHUNK).await
}

/// [`delete_expired`] with chunks of `chunk` rows (tests).
pub async fn delete_expired_by(
    conn: &mut PgConnection,
    retention: Duration,
    chunk: i64,
) -> Result<u64, sqlx::Error> {
    let secs = retention.as_secs_f64();
    let mut total = 0;
    loop {
        let (deleted, more): (i64, bool) = sqlx::query_as(
            "with w as (select id, published_at from outbox order by id limit $2),
                  d as (delete from outbox o using w
                         where o.id = w.id and w.published_at < now() - make_interval(secs => $1)
                        returning 1)
             select (select count(*) from d),
                    coalesce((select published_at < now() - make_interval(secs => $1)
                                from w order by id desc limit 1), false)",
        )
        .bind(secs)
        .bind(chunk)
        .fetch_one(&mut *conn)
        .await?;
        total += deleted as u64;
        if !more {
            break;
        }
    }
    sqlx::query!("delete from outbox_relay_stats where second < now() - interval '1 hour'")
        .execute(&mut *conn)
        .await?;
    Ok(total)
}

/// The outbox's state for `GET /admin/outbox` and the backlog metrics.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Backlog {
    /// Rows not yet published.
    pub pending: i64,
    /// Age of the oldest unpublished row in seconds; null when nothing is pending.
    pub oldest_pending_age_seconds: Option<f64>,
    /// Rows published during the last minute.
    pub published_last_minute: i64,
    /// Rows Kafka refused for good, set aside and not replayed (`GET /admin/outbox/dead-letters`).
    pub dead_lettered: i64,
}

/// Reads the outbox backlog.
pub async fn backlog(conn: &mut PgConnection) -> Result<Backlog, sqlx::Error> {
    let r = sqlx::query!(
        r#"select
             (select count(*) from outbox where published_at is null) as "pending!",
             (select extract(epoch from now() - min(created_at))::float8 from outbox where published_at is null)
                 as "oldest_age",
             (select coalesce(sum(published), 0)::bigint from outbox_relay_stats
                 where second > now() - interval '1 minute') as "published_last_minute!""#
    )
    .fetch_one(&mut *conn)
    .await?;
    let dead_lettered = dead::waiting(conn).await?;
    Ok(Backlog {
        dead_lettered,
        pending: r.pending,
        oldest_pending_age_seconds: r.oldest_age.map(|s| (s.max(0.0) * 1000.0).round() / 1000.0),
        published_last_minute: r.published_last_minute,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use clap::Parser as _;

    #[derive(clap::Parser)]
    struct T {
        #[command(flatten)]
        c: crate::config::ServiceConfig,
    }

    fn cfg(args: &[&str]) -> crate::config::ServiceConfig {
        let mut v = vec!["t"];
        v.extend_from_slice(args);
        T::parse_from(v).c
    }

    #[test]
    fn outbox_retention_reaches_the_relay_and_zero_means_delete_on_acknowledgement() {
        assert_eq!(
            RelayConfig::from_config(&cfg(&[])).retention,
            Duration::from_secs(86_400)
        );
        let zero = cfg(&["--outbox-retention-seconds", "0"]);
        assert!(RelayConfig::from_config(&zero).retention.is_zero());
        assert!(format!("{:?}", zero.describe()).contains("(\"OUTBOX_RETENTION_SECONDS\", \"0\")"));
        assert!(
            T::try_parse_from(["t", "--outbox-retention-seconds", "-1"]).is_err(),
            "a negative retention is refused"
        );
    }

    #[test]
    fn the_floor_rises_only_once_every_transaction_running_at_a_pass_has_ended() {
        let mut f = Floor::default();
        assert_eq!(f.start(), 0);
        // Pass 1 (xmin 100, xmax 105) published up to id 50: done once xid 104 and older ended.
        f.passed(100, 105, Some(50));
        assert_eq!(f.start(), 0);
        // Pass 2: a transaction older than 105 still runs (xmin 103): the floor stays.
        f.passed(103, 110, Some(80));
        assert_eq!(f.start(), 0);
        // Pass 3: every transaction below 106 ended: ids up to 50 are done, not yet up to 80.
        f.passed(106, 112, None);
        assert_eq!(f.start(), 50);
        // Pass 4: past 110: up to 80.
        f.passed(110, 115, Some(90));
        assert_eq!(f.start(), 80);
        // The safety net starts over from the first row and remembers the floor it had.
        f.reset();
        assert_eq!((f.start(), f.audit_below), (0, 80));
        f.passed(120, 121, Some(95));
        assert_eq!(f.audit_below, 0);
    }

    #[test]
    fn a_long_transaction_holds_the_floor_and_the_checkpoints_stay_bounded() {
        let mut f = Floor::default();
        for i in 0..1000 {
            // xmin stuck at 7 (a transaction that never ends), the passes go on.
            f.passed(7, 8 + i, Some(10 + i));
        }
        assert_eq!(f.start(), 0);
        assert!(f.checkpoints.len() <= MAX_CHECKPOINTS);
        // Once it ends, everything seen is done: merging lost nothing.
        f.passed(2000, 2001, None);
        assert_eq!(f.start(), 1009);
        assert!(f.checkpoints.is_empty());
    }
}
