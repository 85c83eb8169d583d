//! The outbox relay: publishes committed outbox rows to Kafka, in id order, and raises the floor
//! through which every row is published once the broker acknowledged them.
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
//! - **Acknowledged, then counted published.** A row is published once its delivery report
//!   succeeded (idempotent producer, `acks=all`); nothing in the row is written for it (see
//!   "Published through a floor"). A relay killed before its floor passed a row publishes it again:
//!   delivery is at-least-once and the duplicates carry the same `eventID`.
//! - **Wake-up.** LISTEN on channel `outbox` (a statement trigger NOTIFYs on insert), with a poll
//!   every [`RelayConfig::poll_interval`] as a fallback for lost notifications.
//! - **Outages.** When Kafka is unreachable the pass fails, rows stay unpublished, and the relay
//!   retries with exponential backoff (`backon`) until publishing works again, by itself.
//! - **Poison rows.** A row Kafka refuses for good (too large, an invalid topic:
//!   [`dead::is_permanent`]) is moved to `outbox_dead_letters` and the pass goes on; one bad row
//!   never holds the others.
//! - **Retention.** Rows published longer than [`RelayConfig::retention`] ago are deleted in
//!   chunks by the leader every [`RelayConfig::cleanup_interval`] (when a row was published is
//!   known to the second from `outbox_relay_stats`, which records how far the floor had risen
//!   each second); with a zero retention, the rows a rising floor passes are deleted at once.
//!   Each pass also adds to a per-second count that [`backlog`] reads.
//! - **Published through a floor.** The relay marks no row: marking cost every row a second,
//!   non-HOT row version and index entries (half of what the outbox cost PostgreSQL; docs/
//!   performance.md, finding 15). Instead the leader keeps a [`Floor`], the id through which
//!   every row is published, stored in `outbox_relay_floor` (migration 0014;
//!   `outbox_published_through()` in SQL), and remembers in memory the rows it published above
//!   it. A pass reads every row above the floor in one snapshot and sends those it has not sent.
//!   A row can only show up late below what a pass saw if its transaction was still running at
//!   that pass's snapshot (ids are drawn in order, and migration 0013 makes a transaction take its
//!   xid before its outbox id); once every transaction running then has ended, the next pass
//!   raises the floor past what the earlier pass saw. A long-running writing transaction anywhere
//!   in the database only holds the floor where it is (the scan rereads more, and sends nothing
//!   twice); it never lets the floor pass a row that is not published. A new leader starts from
//!   the stored floor and publishes again what its predecessor sent above it.

use std::collections::{BTreeSet, VecDeque};
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
use tokio_util::sync::CancellationToken;

use super::dead;

/// Key of the session advisory lock whose holder is the publishing relay (`"ostore"` in ASCII,
/// then 1). Never change it: instances of different versions must contend for the same lock.
pub const RELAY_LOCK_KEY: i64 = 0x6f73_746f_7265_0001;

/// The NOTIFY channel the outbox trigger signals.
pub const CHANNEL: &str = "outbox";

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

/// The leader's knowledge of which rows are certainly published (see the module's "Published
/// through a floor").
#[derive(Debug, Default)]
pub struct Floor {
    /// Every row with an id up to this one is published (or set aside, or will never be visible).
    done_through: i64,
    /// Passes that published every row they saw, up to `max_id`: those ids are done once every
    /// transaction that was running at the pass's snapshot has ended (its `horizon` is at most a
    /// later snapshot's `xmin`). Oldest first.
    checkpoints: VecDeque<Checkpoint>,
    /// Rows above `done_through` the broker acknowledged under this leadership: a later pass
    /// reads them again (it scans from the floor, for rows committed late) and skips them.
    delivered: BTreeSet<i64>,
    /// The floor as `outbox_relay_floor` has it.
    stored: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Checkpoint {
    max_id: i64,
    /// Above every transaction id assigned when the pass took its snapshot (the next xid to be
    /// assigned, read after it). Not the snapshot's `xmax`: that is one past the newest
    /// *completed* transaction, and a transaction that took a higher xid and then an outbox id
    /// below a row the pass saw runs on invisible to the snapshot and absent from its in-progress
    /// list (finding 26 in docs/performance.md).
    horizon: i64,
    /// When the floor was held: the transactions (full xids) that may have written to the outbox
    /// before the pass, the only ones that could still add a row below `max_id`.
    writers: Option<Vec<i64>>,
    /// When the pass ran.
    at: Instant,
}

/// How long a checkpoint waits for every transaction of the cluster before the relay asks which
/// of them write to the outbox (a long transaction elsewhere, in another database say, then does
/// not hold the floor).
const HELD: Duration = Duration::from_millis(20);

/// Most ids below the newest row sent that a pass looks up one by one (see [`Floor::unsent`]).
const MAX_GAPS: usize = 10_000;

/// Most checkpoints kept; older ones are merged (conservatively) when a writing transaction
/// holds the floor for long.
const MAX_CHECKPOINTS: usize = 64;

/// What a pass's snapshot says of the cluster's transactions (full 64-bit xids).
#[derive(Debug, Clone, Default)]
struct Snapshot {
    /// Every transaction below it had ended when the snapshot was taken.
    xmin: i64,
    /// One past the newest transaction that had ended; it and everything above counts in
    /// progress for the snapshot.
    xmax: i64,
    /// When the floor is held ([`Floor::held`]): the transactions below `xmax` in progress.
    running: Option<Vec<i64>>,
}

impl Floor {
    /// A floor starting from the stored one (a new leadership: what the previous leader published
    /// above it is published again, which at-least-once delivery allows).
    pub fn resume(stored: i64) -> Floor {
        Floor {
            done_through: stored,
            stored,
            ..Floor::default()
        }
    }

    /// The id a pass starts after.
    pub fn start(&self) -> i64 {
        self.done_through
    }

    /// Whether this leadership already published row `id` (above the floor).
    fn is_delivered(&self, id: i64) -> bool {
        self.delivered.contains(&id)
    }

    /// What a pass has to read above the floor: every row above the returned id, and below it
    /// only the returned ids, the ones this leadership has not sent (ids it never saw: their
    /// transactions were still running, or rolled back). Too many of those, and the pass reads
    /// everything above the floor (skipping what was sent).
    fn unsent(&self) -> (i64, Vec<i64>) {
        let Some(&hi) = self.delivered.last() else {
            return (self.done_through, Vec::new());
        };
        let missing = usize::try_from(hi - self.done_through).unwrap_or(usize::MAX) - self.delivered.len();
        if missing > MAX_GAPS {
            return (self.done_through, Vec::new());
        }
        let mut gaps = Vec::with_capacity(missing);
        let mut next = self.done_through + 1;
        for &id in &self.delivered {
            gaps.extend(next..id);
            next = id + 1;
        }
        (hi, gaps)
    }

    /// Rows the broker acknowledged (or that were set aside).
    fn delivered(&mut self, ids: impl IntoIterator<Item = i64>) {
        let floor = self.done_through;
        self.delivered.extend(ids.into_iter().filter(|id| *id > floor));
    }

    /// Whether the oldest checkpoint has waited long enough that the next pass should name the
    /// transactions writing to the outbox (see [`Checkpoint::writers`]).
    fn held(&self) -> bool {
        self.checkpoints.front().is_some_and(|c| c.at.elapsed() >= HELD)
    }

    /// After a pass whose snapshot `now` shows every row above the floor published: raises the
    /// floor past every checkpoint whose transactions have all ended as `now` sees them (their
    /// rows, committed before `now` was taken, were read by this pass), or, when `now` lists the
    /// transactions in progress ([`Floor::held`]), whose outbox writers have.
    fn advance(&mut self, now: &Snapshot) {
        while let Some(c) = self.checkpoints.front() {
            if c.horizon > now.xmin {
                break;
            }
            self.done_through = self.done_through.max(c.max_id);
            self.checkpoints.pop_front();
        }
        if let Some(running) = now.running.as_deref() {
            // The newest checkpoint whose outbox writers have all ended: everything up to its
            // max_id is published (its pass read every row above the floor it could see). A
            // writer has ended when `now` counts it completed: below its xmax and not in progress.
            let ended = |x: &i64| *x < now.xmax && !running.contains(x);
            let done = self
                .checkpoints
                .iter()
                .rposition(|c| c.writers.as_ref().is_some_and(|w| w.iter().all(ended)));
            if let Some(i) = done {
                for c in self.checkpoints.drain(..=i) {
                    self.done_through = self.done_through.max(c.max_id);
                }
            }
        }
        if self.delivered.first().is_some_and(|id| *id <= self.done_through) {
            self.delivered = self.delivered.split_off(&(self.done_through + 1));
        }
    }

    /// After a pass whose snapshot had `horizon` (see [`Checkpoint::horizon`]) published every
    /// row it saw (it read ids above `start()` up to `max_read`, none left behind): records the
    /// pass as a checkpoint.
    fn drained(&mut self, horizon: i64, max_read: Option<i64>, writers: Option<Vec<i64>>) {
        if let Some(max_id) = max_read.filter(|m| *m > self.done_through) {
            if self.checkpoints.len() == MAX_CHECKPOINTS {
                // Merge the two oldest: waiting for the later one's transactions covers both
                // (and its writers only when both named theirs).
                let first = self.checkpoints.pop_front().expect("full");
                if let Some(second) = self.checkpoints.front_mut() {
                    second.max_id = second.max_id.max(first.max_id);
                    second.writers = match (first.writers, second.writers.take()) {
                        (Some(mut a), Some(b)) => {
                            a.extend(b);
                            Some(a)
                        }
                        _ => None,
                    };
                }
            }
            self.checkpoints.push_back(Checkpoint {
                max_id,
                horizon,
                writers,
                at: Instant::now(),
            });
        }
    }

    /// [`Floor::advance`] then [`Floor::drained`]: a whole pass that left nothing behind.
    #[cfg(test)]
    fn passed(&mut self, xmin: i64, horizon: i64, max_read: Option<i64>) {
        self.advance(&Snapshot {
            xmin,
            xmax: horizon,
            running: None,
        });
        self.drained(horizon, max_read, None);
    }

    /// Whether passes are still owed before the floor reaches what was read.
    fn behind(&self) -> bool {
        !self.checkpoints.is_empty()
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
    let publisher = Publisher {
        pool: &pool,
        producer: &producer,
        cfg: &cfg,
        shutdown: Some(&shutdown),
    };
    tracing::info!(batch_size = cfg.batch_size, "outbox relay started");
    while !shutdown.is_cancelled() {
        if !leading {
            match try_lead(&pool, &mut session).await {
                Ok(Some(stored)) => {
                    leading = true;
                    floor = Floor::resume(stored);
                    tracing::info!(
                        published_through = stored,
                        "outbox relay: leading (holds the relay lock)"
                    );
                }
                Ok(None) => {
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
            r = publish_pending(conn, &publisher, &mut floor) => r,
        };
        // Rows published by this pass: the next pass follows.
        let mut again = None;
        match pass {
            Ok(n) => {
                backoff = cfg.backoff();
                if n > 0 {
                    tracing::debug!(published = n, "outbox relay: published");
                    // The next pass raises the floor past these rows (or publishes more).
                    again = Some(n);
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
                let delay = backoff.next().unwrap_or(cfg.backoff_max);
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64,
                    "outbox relay: database error; leadership released");
                pause(delay, &shutdown).await;
                continue;
            }
        }
        if last_cleanup.is_none_or(|t| t.elapsed() >= cfg.cleanup_interval) {
            last_cleanup = Some(Instant::now());
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
        if let Some(published) = again {
            if published < cfg.batch_size {
                pause(LINGER, &shutdown).await;
            }
            continue;
        }
        // Rows read but not yet under the floor wait for the transactions that were running then.
        let poll = if floor.behind() {
            cfg.poll_interval.min(BEHIND_POLL)
        } else {
            cfg.poll_interval
        };
        wait_for_work(&mut listener, poll, &shutdown).await;
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
    let Some(stored) = try_lead(pool, &mut session).await? else {
        tracing::debug!("outbox relay: another relay holds the lock");
        return Ok(0);
    };
    let Some(mut conn) = session else { return Ok(0) };
    let publisher = Publisher {
        pool,
        producer,
        cfg,
        shutdown: None,
    };
    let result = async {
        let mut floor = Floor::resume(stored);
        let mut total = 0;
        // Passes until one publishes nothing and the floor has caught up with what was read (a
        // bounded number: writers running beside may keep it from settling).
        for _ in 0..RUN_ONCE_PASSES {
            let n = publish_pending(&mut conn, &publisher, &mut floor).await?;
            total += n;
            if n == 0 && !floor.behind() {
                break;
            }
            if n == 0 {
                tokio::time::sleep(HELD).await;
            }
        }
        Ok::<_, RelayError>(total)
    }
    .await;
    let _ = conn.close().await;
    Ok(result?)
}

/// Passes [`run_once`] makes at most.
const RUN_ONCE_PASSES: usize = 50;

/// How soon a pass follows one that left rows above the floor (it raises the floor once the
/// transactions running at that pass have ended).
const BEHIND_POLL: Duration = Duration::from_millis(50);

/// After a pass that published rows but did not fill a batch, the next pass waits this long, so
/// that the commits of the next milliseconds are read and produced together.
const LINGER: Duration = Duration::from_millis(5);

/// The floor the leader stored (`outbox_relay_floor`, migration 0014): every row up to the
/// returned id is published (or set aside).
pub async fn published_through(conn: &mut PgConnection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("select through from outbox_relay_floor")
        .fetch_one(conn)
        .await
}

/// Takes (or keeps) the leadership lock on a connection of its own (detached from the pool, so
/// the lock dies with the connection). Holding it: the floor the last leader stored, which the new
/// leader starts from; `Ok(None)` while another relay leads.
async fn try_lead(pool: &PgPool, session: &mut Option<PgConnection>) -> Result<Option<i64>, sqlx::Error> {
    if session.is_none() {
        let mut conn = pool.acquire().await?.detach();
        // What the leader writes (the floor, the counts) may be lost to a database crash: rows are
        // then published again.
        sqlx::query("set synchronous_commit = off")
            .execute(&mut conn)
            .await?;
        *session = Some(conn);
    }
    let Some(conn) = session.as_mut() else {
        return Ok(None);
    };
    let got = sqlx::query_scalar!(r#"select pg_try_advisory_lock($1) as "got!""#, RELAY_LOCK_KEY)
        .fetch_one(&mut *conn)
        .await?;
    if !got {
        return Ok(None);
    }
    Ok(Some(published_through(conn).await?))
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

/// Reads up to `limit` rows above `after` that are above `hi` or among `gaps`, oldest first: a
/// pass's read, which skips the rows this leadership sent between the floor and `hi` (two index
/// scans of the primary key).
async fn unsent_rows(
    conn: &mut PgConnection,
    after: i64,
    hi: i64,
    gaps: &[i64],
    limit: usize,
) -> Result<Vec<OutboxRow>, sqlx::Error> {
    if hi <= after || gaps.is_empty() {
        return rows_after(conn, after.max(hi), limit).await;
    }
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = sqlx::query_as::<_, (i64, String, String, String, Value)>(
        "select * from (
             (select id, topic, message_key, payload::text, headers from outbox
               where id = any($3) and id > $1)
             union all
             (select id, topic, message_key, payload::text, headers from outbox
               where id > $2 order by id limit $4)) r
          order by id limit $4",
    )
    .bind(after)
    .bind(hi)
    .bind(gaps)
    .bind(limit)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(OutboxRow::from).collect())
}

/// Reads up to `limit` rows with an id above `after`, oldest first (published or not: the
/// caller knows which of those above the floor it published).
pub async fn rows_after(
    conn: &mut PgConnection,
    after: i64,
    limit: usize,
) -> Result<Vec<OutboxRow>, sqlx::Error> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = sqlx::query_as::<_, (i64, String, String, String, Value)>(
        "select id, topic, message_key, payload::text, headers from outbox where id > $1 order by id limit $2",
    )
    .bind(after)
    .bind(limit)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(OutboxRow::from).collect())
}

impl From<(i64, String, String, String, Value)> for OutboxRow {
    fn from((id, topic, message_key, payload, headers): (i64, String, String, String, Value)) -> Self {
        OutboxRow {
            id,
            topic,
            message_key,
            payload,
            headers,
        }
    }
}

/// Reads up to `limit` unpublished rows (above the stored floor), oldest first.
pub async fn pending_rows(conn: &mut PgConnection, limit: usize) -> Result<Vec<OutboxRow>, sqlx::Error> {
    let floor = published_through(conn).await?;
    rows_after(conn, floor, limit).await
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

/// What a publishing pass works with, besides the leader's connection and the floor.
struct Publisher<'a, C: ClientContext + 'static> {
    /// Where rows Kafka refused for good are set aside (outside the pass's snapshot).
    pool: &'a PgPool,
    producer: &'a FutureProducer<C>,
    cfg: &'a RelayConfig,
    /// When cancelled, the pass ends after the batches in flight (`None`: it runs to the end).
    shutdown: Option<&'a CancellationToken>,
}

/// Publishes every unpublished row in id order, a batch at a time, and returns how many were
/// published. A pipeline: while batch k is in flight, batch k+1 is read (on the leader's
/// connection) and sent; so the database and the broker work at the same time. On the first
/// failed delivery it stops and reports the failure; everything else stays pending for the next
/// pass. Afterwards one statement stores the floor and the count (no row of the outbox is
/// written).
async fn publish_pending<C>(
    conn: &mut PgConnection,
    publisher: &Publisher<'_, C>,
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
    // The pass's statements have the same shapes at every pass, yet a custom plan was made for
    // each at every call (the snapshot's 0.1 ms, more than it runs; docs/performance.md, finding
    // 30): inside the pass their generic plans, key ranges of the primary key, are made once.
    sqlx::raw_sql(
        "begin isolation level repeatable read read only; set local plan_cache_mode = force_generic_plan",
    )
    .execute(&mut *conn)
    .await?;
    let mut published = 0;
    let pass = publish_in_snapshot(conn, publisher, floor, &mut published).await;
    // Ends the snapshot whatever happened (after a failed statement too).
    let end = sqlx::query("rollback").execute(&mut *conn).await;
    let n = pass?;
    end?;
    record(conn, floor, published, publisher.cfg.retention.is_zero()).await?;
    Ok(n)
}

async fn publish_in_snapshot<C>(
    conn: &mut PgConnection,
    publisher: &Publisher<'_, C>,
    floor: &mut Floor,
    published: &mut u64,
) -> Result<usize, RelayError>
where
    C: ClientContext + 'static,
{
    let Publisher {
        pool,
        producer,
        cfg,
        shutdown,
    } = *publisher;
    let batch_size = cfg.batch_size.max(1);
    // What the snapshot says of the cluster's transactions, for the floor (xid8 as bigint: exact
    // below 2^63), and the horizon above every xid assigned by then: `age()` measures from the
    // next xid to be assigned, read once per transaction, after the snapshot (this read-only
    // transaction takes no xid of its own). When the floor is held, also the transactions in
    // progress, and those that may have written to the outbox before the snapshot: the ones in
    // progress for it but for those that, when the lock table is read (after the snapshot), run
    // without a write lock on the outbox (one that drew an outbox id holds that lock until it
    // ends, and one that ended in between stays counted), and the ones with a higher xid than the
    // snapshot's xmax that hold that lock (in progress, yet not listed by the snapshot). One that
    // takes the lock after the snapshot draws its ids above every row this pass can see.
    let held = floor.held();
    let (xmin, xmax, horizon, running, writers): (i64, i64, i64, Option<Vec<i64>>, Option<Vec<i64>>) =
        sqlx::query_as(
            "with locks as materialized (
                  select locktype, database, relation, mode, granted, virtualtransaction, transactionid
                    from pg_locks where $1),
              snap as materialized (
                  select pg_snapshot_xmin(s)::text::bigint as xmin, pg_snapshot_xmax(s)::text::bigint as xmax,
                         age(pg_snapshot_xmin(s)::xid) as ahead, s
                    from pg_current_snapshot() s),
              xids as materialized (
                  select l.virtualtransaction,
                         snap.xmax + (l.transactionid::text::bigint - snap.xmax % 4294967296
                                      + 6442450944) % 4294967296 - 2147483648 as xid
                    from locks l, snap
                   where l.locktype = 'transactionid' and l.mode = 'ExclusiveLock' and l.granted),
              outbox_writers as materialized (
                  select r.virtualtransaction from locks r
                   where r.locktype = 'relation' and r.relation = 'outbox'::regclass
                     and r.mode = 'RowExclusiveLock'
                     and r.database = (select oid from pg_database where datname = current_database()))
             select xmin, xmax, xmin + ahead,
                    case when $1 then array(select x::text::bigint from pg_snapshot_xip(s) x) end,
                    case when $1 then array(
                        (select x::text::bigint from pg_snapshot_xip(s) x
                         except
                         select xid from xids
                          where virtualtransaction not in (select virtualtransaction from outbox_writers))
                        union
                        select xid from xids
                         where xid >= snap.xmax
                           and virtualtransaction in (select virtualtransaction from outbox_writers)) end
               from snap",
        )
        .bind(held)
        .fetch_one(&mut *conn)
        .await?;
    let now = Snapshot { xmin, xmax, running };
    let mut total = 0;
    let mut after = floor.start();
    // Rows sent between the floor and `hi` are not read again; the pass saw everything up to it.
    let (hi, gaps) = floor.unsent();
    let mut max_read: Option<i64> = (hi > after).then_some(hi);
    // True once a read came back short: every row the snapshot shows above the floor was read.
    let mut drained = false;
    let mut exhausted = false;
    let mut in_flight: Option<Flight> = None;
    loop {
        let read = if exhausted {
            Vec::new()
        } else {
            unsent_rows(conn, after, hi, &gaps, batch_size).await?
        };
        if !exhausted && read.len() < batch_size {
            drained = true;
        }
        if read.len() < batch_size || shutdown.is_some_and(|s| s.is_cancelled()) {
            exhausted = true;
        }
        if let Some(last) = read.last() {
            after = last.id;
            max_read = max_read.max(Some(last.id));
        }
        // When the pass reads everything above the floor (too many gaps), rows this leadership
        // sent are read again and not sent twice.
        let rows: Vec<OutboxRow> = read.into_iter().filter(|r| !floor.is_delivered(r.id)).collect();
        let next = if rows.is_empty() {
            None
        } else {
            Some(send_rows(producer, &rows).await)
        };
        let Some(current) = std::mem::replace(&mut in_flight, next) else {
            if in_flight.is_none() && exhausted {
                if drained {
                    floor.advance(&now);
                    floor.drained(horizon, max_read, writers);
                }
                return Ok(total);
            }
            continue;
        };
        let delivered = current.wait().await;
        set_aside(pool, &delivered.refused).await?;
        floor.delivered(delivered.refused.iter().map(|(id, _)| *id));
        if let Some(e) = delivered.failure {
            // Keep what did get through, including the batch sent after this one.
            *published += delivered.ids.len() as u64;
            floor.delivered(delivered.ids);
            if let Some(next) = in_flight.take() {
                let next = next.wait().await;
                set_aside(pool, &next.refused).await?;
                floor.delivered(next.refused.iter().map(|(id, _)| *id));
                *published += next.ids.len() as u64;
                floor.delivered(next.ids);
            }
            return Err(RelayError::Kafka(e));
        }
        total += delivered.ids.len();
        *published += delivered.ids.len() as u64;
        floor.delivered(delivered.ids);
        if in_flight.is_none() && exhausted {
            // Every row this snapshot showed above the floor is published (a refused one is set
            // aside, which is as final).
            if drained {
                floor.advance(&now);
                floor.drained(horizon, max_read, writers);
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

/// Stores what a pass changed, in one statement on the leader's connection: the floor when it
/// rose (and, with a zero retention, deletes the rows it passed), and the per-second count of
/// published rows with how far the floor had risen by then (`outbox_relay_stats`: the
/// retention cleanup and `outbox_published_at` read it). The leader's session does not wait for
/// the WAL flush (`synchronous_commit = off`, set when it took the lead): a floor lost to a
/// database crash only means rows are published again, which at-least-once delivery allows.
async fn record(
    conn: &mut PgConnection,
    floor: &mut Floor,
    published: u64,
    delete: bool,
) -> Result<(), sqlx::Error> {
    let through = floor.start();
    if published == 0 && through <= floor.stored {
        return Ok(());
    }
    let from = floor.stored;
    sqlx::query(
        "with f as (update outbox_relay_floor set through = greatest(through, $2) where $2 > $3),
              d as (delete from outbox where $4 and id > $3 and id <= $2)
         insert into outbox_relay_stats (second, published, published_through)
         values (date_trunc('second', now()), $1, $2)
         on conflict (second) do update
             set published = outbox_relay_stats.published + excluded.published,
                 published_through = greatest(outbox_relay_stats.published_through, excluded.published_through)",
    )
    .bind(i64::try_from(published).unwrap_or(i64::MAX))
    .bind(through)
    .bind(from)
    .bind(delete)
    .execute(conn)
    .await?;
    floor.stored = floor.stored.max(through);
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
    // How far the floor had risen by the last second that is past retention.
    let through: Option<i64> = sqlx::query_scalar(
        "select max(published_through) from outbox_relay_stats where second < now() - make_interval(secs => $1)",
    )
    .bind(secs)
    .fetch_one(&mut *conn)
    .await?;
    let mut total = 0;
    if let Some(through) = through {
        loop {
            let deleted = sqlx::query(
                "delete from outbox where id in (select id from outbox where id <= $1 order by id limit $2)",
            )
            .bind(through)
            .bind(chunk)
            .execute(&mut *conn)
            .await?
            .rows_affected();
            total += deleted;
            if deleted < u64::try_from(chunk).unwrap_or(u64::MAX) {
                break;
            }
        }
    }
    // The statistics say when rows were published: kept as long as the rows they date (and an
    // hour for `publishedLastMinute` and the console).
    sqlx::query(
        "delete from outbox_relay_stats
          where second < now() - make_interval(secs => $1) - interval '1 hour'
            and second < (select max(second) from outbox_relay_stats where published_through is not null)",
    )
    .bind(secs)
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
    let (pending, oldest_age, published_last_minute): (i64, Option<f64>, i64) = sqlx::query_as(
        "select
             (select count(*) from outbox where id > outbox_published_through()),
             (select extract(epoch from now() - min(created_at))::float8 from outbox
                 where id > outbox_published_through()),
             (select coalesce(sum(published), 0)::bigint from outbox_relay_stats
                 where second > now() - interval '1 minute')",
    )
    .fetch_one(&mut *conn)
    .await?;
    let dead_lettered = dead::waiting(conn).await?;
    Ok(Backlog {
        dead_lettered,
        pending,
        oldest_pending_age_seconds: oldest_age.map(|s| (s.max(0.0) * 1000.0).round() / 1000.0),
        published_last_minute,
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
    }

    #[test]
    fn a_long_transaction_that_does_not_write_the_outbox_holds_the_floor_only_until_the_writers_are_named() {
        let mut f = Floor::default();
        // xid 7 runs for ever (another database's, say): xmin stays at 7.
        let at = |xmax: i64, running: Option<&[i64]>| Snapshot {
            xmin: 7,
            xmax,
            running: running.map(<[i64]>::to_vec),
        };
        f.advance(&at(20, None));
        f.drained(20, Some(50), None);
        assert_eq!(f.start(), 0);
        // A held pass names the outbox writers (xids 15 and 18, and 26, which took its xid after
        // the newest completed one, 24: in progress, yet above the snapshot's xmax) and reads up
        // to 60.
        f.advance(&at(25, Some(&[7, 15, 18])));
        assert_eq!(f.start(), 0, "the first checkpoint named no writers");
        f.drained(27, Some(60), Some(vec![15, 18, 26]));
        // 18 still runs: nothing moves. Then 15 and 18 end, 7 goes on; 26 is not yet counted
        // completed (the snapshot's xmax is not above it).
        f.advance(&at(26, Some(&[7, 18])));
        assert_eq!(f.start(), 0);
        f.advance(&at(26, Some(&[7, 21])));
        assert_eq!(f.start(), 0, "xid 26 may still write below 60");
        f.advance(&at(30, Some(&[7, 21, 26])));
        assert_eq!(f.start(), 0, "xid 26 runs");
        f.advance(&at(30, Some(&[7, 21])));
        assert_eq!(
            f.start(),
            60,
            "the newest checkpoint whose writers ended covers the older ones"
        );
        assert!(!f.behind());
    }

    #[test]
    fn rows_published_above_the_floor_are_skipped_until_the_floor_passes_them() {
        let mut f = Floor::resume(10);
        assert_eq!(f.start(), 10);
        // Delivered (11, 12, 14); 13 was not visible yet (its transaction runs, xid 104).
        f.delivered([9, 11, 12, 14]);
        assert!(!f.is_delivered(9), "below the floor: nothing to remember");
        assert!(f.is_delivered(11) && f.is_delivered(14) && !f.is_delivered(13));
        // The next pass reads above 14, and below it only 13 (not sent: not seen yet).
        assert_eq!(f.unsent(), (14, vec![13]));
        f.passed(100, 105, Some(14));
        assert_eq!(f.start(), 10, "the floor waits for xid 104");
        assert!(f.behind());
        // 13 shows up late and is published; then every transaction below 105 has ended.
        f.delivered([13]);
        f.passed(105, 106, None);
        assert_eq!(f.start(), 14);
        assert!(f.delivered.is_empty(), "what the floor passed is forgotten");
        assert_eq!(f.unsent(), (14, vec![]));
        assert!(!f.behind());
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
