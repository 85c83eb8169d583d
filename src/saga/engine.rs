//! The saga engine: creates sagas, advances them step by step, and shares commits across sagas.
//!
//! Shape (SPEC §3 "Throughput by design"):
//! - **Group commit.** Every state change (a new saga, the outcome of an attempt) is a job sent to a
//!   few committer tasks; each committer takes every job waiting and applies them in one
//!   transaction, so under load many sagas share a commit while an idle system commits a lone job at
//!   once (no batch timer). A failing job never sinks the others: the batch is retried job by job.
//! - **Local steps ride along.** A local step (`persist_order`, `cancel_order`) runs inside the
//!   transaction that records the remote outcome before it: an order costs three commits.
//! - **No sleeping on a connection.** Remote calls run without a database connection; a retry is a
//!   stored `next_attempt_at` and the lease is given back; the poller (woken by a timer, NOTIFY, or
//!   its polling interval) claims due sagas with `FOR UPDATE SKIP LOCKED`.
//! - **Leases and fencing.** A saga is driven by the worker holding its lease; every claim bumps the
//!   fence, and every write first locks the row with the fence (and the state it expects), so a
//!   worker whose lease was taken over cannot commit anything.
//! - **Waiting.** `POST /orders` waits through an in-process notification (or LISTEN `saga_events`
//!   when another instance drives the saga), never by polling.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use sqlx::PgPool;
use time::OffsetDateTime;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::catalog::CatalogClient;
use crate::outbox::Topics;
use crate::saga::definition::{CREATE_ORDER_FILE, CREATE_ORDER_TOML, DefinitionError, SagaDef};
use crate::saga::machine::{Attempt, Effect, Kind, Machine, Next, Outcome, Saga, SagaState};
use crate::saga::steps::{self, CREATE_ORDER, create_shipment, persist_order, reserve_inventory};
use crate::saga::store::{self, Created, NewSaga};
use crate::shipments::ShipmentsClient;

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// This worker's name in leases.
    pub worker_id: String,
    /// How long a claim holds a saga without a write.
    pub lease: Duration,
    /// SAGA_RETRY_SCALE.
    pub retry_scale: f64,
    /// Most sagas driven at once by this process.
    pub max_in_flight: usize,
    /// Committer tasks (each one connection at a time).
    pub committers: usize,
    /// Most jobs in one transaction.
    pub batch_max: usize,
    /// Poller fallback interval.
    pub poll_interval: Duration,
    /// Drive sagas in this process (the `worker` role); without it sagas are only created here.
    pub drive: bool,
}

impl EngineConfig {
    /// Defaults with a fresh worker id.
    pub fn new(retry_scale: f64) -> Self {
        EngineConfig {
            worker_id: format!(
                "{}-{}-{}",
                std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".into()),
                std::process::id(),
                &Uuid::new_v4().simple().to_string()[..8]
            ),
            lease: Duration::from_secs(30),
            retry_scale,
            max_in_flight: 2048,
            committers: 3,
            batch_max: 128,
            poll_interval: Duration::from_millis(500),
            drive: true,
        }
    }
}

/// What happened to a job that advances a saga.
#[derive(Debug, Clone)]
pub enum Applied {
    /// Written; the saga as it now stands.
    Written(Box<Saga>),
    /// The saga was taken over by another worker (or changed under us): nothing was written.
    Fenced,
}

/// How a saga finished, as seen by a waiter.
#[derive(Debug, Clone)]
pub struct Finished {
    /// The state it finished in.
    pub state: SagaState,
    /// The answer for `POST /orders` (None when learnt from another instance: read the row).
    pub answer: Option<Value>,
}

enum Job {
    Create {
        new: Box<NewSaga>,
        lease: bool,
        /// The span asking (the request's): the shared commit's span hangs under it.
        span: tracing::Span,
        reply: oneshot::Sender<Result<Created, sqlx::Error>>,
    },
    Step {
        saga: Box<Saga>,
        attempt: Option<Box<Attempt>>,
        /// Who is writing: the session's span, the attempt's trace context, and (on the session's
        /// first write) the session's own context to persist for the next session's link.
        trace: Box<StepTrace>,
        reply: oneshot::Sender<Result<Applied, sqlx::Error>>,
    },
}

/// W3C trace context entries (`traceparent`, `tracestate`).
type Trace = HashMap<String, String>;

/// The tracing side of a step job.
struct StepTrace {
    /// The saga session's span (parent of the local steps' spans).
    session: tracing::Span,
    /// The context of the span that produced the attempt (its events carry it).
    attempt: Option<Arc<Trace>>,
    /// Set on a session's first write: its `traceparent`, stored in the saga row.
    persist_session: Option<String>,
}

impl StepTrace {
    fn none() -> Self {
        StepTrace {
            session: tracing::Span::none(),
            attempt: None,
            persist_session: None,
        }
    }
}

/// The trace context of `span`, or `fallback` when the span has none (tracing off).
fn trace_of(span: &tracing::Span, fallback: &Trace) -> Arc<Trace> {
    let t = crate::telemetry::context_headers(span);
    Arc::new(if t.contains_key("traceparent") {
        t
    } else {
        fallback.clone()
    })
}

type Waiters = HashMap<Uuid, Vec<oneshot::Sender<Finished>>>;

struct Inner {
    pool: PgPool,
    def: SagaDef,
    cfg: EngineConfig,
    topics: Topics,
    catalog: CatalogClient,
    shipments: ShipmentsClient,
    jobs: mpsc::Sender<Job>,
    job_rx: tokio::sync::Mutex<mpsc::Receiver<Job>>,
    waiters: Mutex<Waiters>,
    wake: Notify,
    in_flight: Arc<Semaphore>,
    drives: TaskTracker,
    shutdown: CancellationToken,
    /// Cancelled once the drives have finished at shutdown: the committers close the job queue,
    /// commit what is left in it, and stop.
    jobs_closed: CancellationToken,
}

/// The saga engine (cheap to clone).
#[derive(Clone)]
pub struct Engine(Arc<Inner>);

/// Loads and validates the CreateOrder definition embedded in the binary.
pub fn load_create_order() -> Result<SagaDef, DefinitionError> {
    SagaDef::load(
        CREATE_ORDER_FILE,
        CREATE_ORDER_TOML,
        "create_order",
        &steps::create_order_impls(),
    )
}

impl Engine {
    /// A new engine; call `start` to run its committers, poller and listener.
    pub fn new(
        pool: PgPool,
        def: SagaDef,
        cfg: EngineConfig,
        topics: Topics,
        catalog: CatalogClient,
        shipments: ShipmentsClient,
    ) -> anyhow::Result<Engine> {
        for (i, s) in def.steps.iter().enumerate() {
            for p in [&s.retry, &s.compensation_retry] {
                if p.attempt_timeout() + Duration::from_secs(1) > cfg.lease {
                    anyhow::bail!(
                        "{CREATE_ORDER_FILE}: steps[{i}] attempt_timeout_ms must be at least 1 s shorter than the saga lease (SAGA_LEASE_MS = {} ms)",
                        cfg.lease.as_millis()
                    );
                }
            }
        }
        let (tx, rx) = mpsc::channel(cfg.max_in_flight * 2 + 1024);
        Ok(Engine(Arc::new(Inner {
            pool,
            def,
            in_flight: Arc::new(Semaphore::new(cfg.max_in_flight)),
            cfg,
            topics,
            catalog,
            shipments,
            jobs: tx,
            job_rx: tokio::sync::Mutex::new(rx),
            waiters: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            drives: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            jobs_closed: CancellationToken::new(),
        })))
    }

    /// The definition in use.
    pub fn definition(&self) -> &SagaDef {
        &self.0.def
    }

    /// The worker id used in leases.
    pub fn worker_id(&self) -> &str {
        &self.0.cfg.worker_id
    }

    /// Starts committers, and (for a worker) the poller; a listener wakes waiters and the poller on
    /// NOTIFY from other instances. Everything stops when `shutdown` is cancelled; in-flight sagas give
    /// their leases back.
    pub fn start(&self, tracker: &TaskTracker, shutdown: CancellationToken) {
        let inner = self.0.clone();
        // Committers outlive the shutdown signal until drives have finished writing.
        for _ in 0..inner.cfg.committers.max(1) {
            let i = inner.clone();
            tracker.spawn(async move { i.committer().await });
        }
        if inner.cfg.drive {
            let i = inner.clone();
            tracker.spawn(async move { i.poll_loop().await });
        }
        let i = inner.clone();
        tracker.spawn(async move { i.listen_loop().await });
        let i = inner.clone();
        tracker.spawn(async move {
            shutdown.cancelled().await;
            i.shutdown.cancel();
            i.drives.close();
            if tokio::time::timeout(Duration::from_secs(15), i.drives.wait())
                .await
                .is_err()
            {
                tracing::warn!("some sagas were still being driven at shutdown; their leases will expire");
            }
            // Not `job_rx.lock().close()`: a committer waiting for a job holds that lock, so the
            // close waited for ever and every shutdown ran into the process's time limit.
            i.jobs_closed.cancel();
        });
    }

    /// Creates a saga (with its order placeholder and idempotency record) in a shared commit. When
    /// this process drives sagas and has room, it takes the lease and starts at once.
    pub async fn create(&self, new: NewSaga) -> Result<Created, sqlx::Error> {
        let permit = if self.0.cfg.drive && !self.0.shutdown.is_cancelled() {
            self.0.in_flight.clone().try_acquire_owned().ok()
        } else {
            None
        };
        let (reply, rx) = oneshot::channel();
        let job = Job::Create {
            new: Box::new(new),
            lease: permit.is_some(),
            span: tracing::Span::current(),
            reply,
        };
        if self.0.jobs.send(job).await.is_err() {
            return Err(sqlx::Error::PoolClosed);
        }
        let created = rx.await.map_err(|_| sqlx::Error::PoolClosed)??;
        if matches!(created, Created::New(_)) {
            crate::metrics::get().sagas_started.add(1, &[]);
        }
        match (&created, permit) {
            (Created::New(saga), Some(permit)) => self.0.clone().spawn_drive((**saga).clone(), permit),
            (Created::New(_), None) => self.nudge(),
            _ => {}
        }
        Ok(created)
    }

    /// Registers interest in a saga finishing (register before the saga can finish).
    pub fn waiter(&self, saga_id: Uuid) -> oneshot::Receiver<Finished> {
        let (tx, rx) = oneshot::channel();
        self.0
            .waiters
            .lock()
            .expect("waiters")
            .entry(saga_id)
            .or_default()
            .push(tx);
        rx
    }

    /// Drops the waiters of a saga (after a timeout).
    pub fn forget_waiters(&self, saga_id: Uuid) {
        let mut w = self.0.waiters.lock().expect("waiters");
        if let Some(list) = w.get_mut(&saga_id) {
            list.retain(|s| !s.is_closed());
            if list.is_empty() {
                w.remove(&saga_id);
            }
        }
    }

    /// Wakes the poller (a saga became due).
    pub fn nudge(&self) {
        self.0.wake.notify_one();
    }

    /// Claims due sagas and drives them to their next wait or end, returning how many were claimed
    /// (for tests and tools; the poller does the same continuously).
    pub async fn run_due_once(&self) -> anyhow::Result<usize> {
        let mut conn = self.0.pool.acquire().await?;
        let sagas = store::claim_due(&mut conn, &self.0.cfg.worker_id, self.0.cfg.lease, 1000).await?;
        drop(conn);
        let n = sagas.len();
        let mut set = tokio::task::JoinSet::new();
        for s in sagas {
            let i = self.0.clone();
            set.spawn(async move { i.drive(s).await });
        }
        while set.join_next().await.is_some() {}
        Ok(n)
    }

    /// Claims due sagas without driving them (tests: a worker that stalls).
    pub async fn claim(&self, limit: i64) -> anyhow::Result<Vec<Saga>> {
        let mut conn = self.0.pool.acquire().await?;
        Ok(store::claim_due(&mut conn, &self.0.cfg.worker_id, self.0.cfg.lease, limit).await?)
    }

    /// Records an attempt's outcome through the committers (tests use it to play a stalled worker).
    pub async fn apply(&self, saga: Saga, attempt: Option<Attempt>) -> Result<Applied, sqlx::Error> {
        self.0.submit(saga, attempt, StepTrace::none()).await
    }

    /// Runs one attempt of whatever is due for a claimed saga, without recording it.
    pub async fn attempt(&self, saga: &Saga) -> Option<Attempt> {
        match self.0.machine().next(saga, OffsetDateTime::now_utc()) {
            Next::Remote(step, kind) => Some(self.0.run_remote(saga, step, kind, saga.attempt + 1).await.0),
            _ => None,
        }
    }

    /// Drives one claimed saga to its next wait or end (tests).
    pub async fn drive(&self, saga: Saga) {
        self.0.clone().drive(saga).await
    }
}

impl Inner {
    fn machine(&self) -> Machine<'_> {
        Machine {
            def: &self.def,
            shapes: &CREATE_ORDER,
            retry_scale: self.cfg.retry_scale,
        }
    }

    fn spawn_drive(self: Arc<Self>, saga: Saga, permit: OwnedSemaphorePermit) {
        let i = self.clone();
        self.drives.spawn(async move {
            i.drive(saga).await;
            drop(permit);
        });
    }

    async fn submit(
        &self,
        saga: Saga,
        attempt: Option<Attempt>,
        trace: StepTrace,
    ) -> Result<Applied, sqlx::Error> {
        let (reply, rx) = oneshot::channel();
        let job = Job::Step {
            saga: Box::new(saga),
            attempt: attempt.map(Box::new),
            trace: Box::new(trace),
            reply,
        };
        if self.jobs.send(job).await.is_err() {
            return Err(sqlx::Error::PoolClosed);
        }
        rx.await.map_err(|_| sqlx::Error::PoolClosed)?
    }

    async fn drive(self: Arc<Self>, mut saga: Saga) {
        let span = tracing::info_span!(
            "saga",
            otel.name = "saga create_order",
            saga.id = %saga.id,
            saga.r#type = "create_order",
            order.id = saga.order_id,
            saga.state = tracing::field::Empty,
            saga.session.previous = tracing::field::Empty,
        );
        // Every session is a child of the request that started the saga (one tree), and a later
        // session (a retry picked up by the poller, a saga resumed after a crash) links to the
        // session that wrote before it.
        crate::telemetry::set_remote_parent(&span, &crate::telemetry::MapExtractor(&saga.trace));
        if let Some(previous) = saga.trace.get(store::SESSION_TRACE_KEY) {
            span.record("saga.session.previous", previous.as_str());
            crate::telemetry::add_link(&span, previous);
        }
        let mut persist_session = crate::telemetry::context_headers(&span).remove("traceparent");
        let this = self.clone();
        async move {
            loop {
                let now = OffsetDateTime::now_utc();
                let next = this.machine().next(&saga, now);
                let (attempt, attempt_trace) = match next {
                    Next::Done => break,
                    Next::WaitUntil(at) => {
                        this.wake_at(at);
                        break;
                    }
                    Next::Local(..) => (None, None),
                    Next::Remote(step, kind) => {
                        if this.shutdown.is_cancelled() {
                            this.give_back(&saga).await;
                            break;
                        }
                        let boundary = saga.state == SagaState::Running
                            && (saga.cancel_requested.is_some() || now > saga.deadline_at);
                        if boundary {
                            (None, None)
                        } else {
                            let (a, t) = this.run_remote(&saga, step, kind, saga.attempt + 1).await;
                            (Some(a), Some(t))
                        }
                    }
                };
                let trace = StepTrace {
                    session: tracing::Span::current(),
                    attempt: attempt_trace,
                    persist_session: persist_session.take(),
                };
                match this.submit(saga.clone(), attempt, trace).await {
                    Ok(Applied::Written(s)) => saga = *s,
                    Ok(Applied::Fenced) => {
                        tracing::warn!(saga_id = %saga.id, "lease lost to another worker; stopping");
                        break;
                    }
                    Err(e) => {
                        tracing::error!(saga_id = %saga.id, error = %e, "recording a saga transition failed; the lease will expire and the saga resume");
                        break;
                    }
                }
            }
            tracing::Span::current().record("saga.state", saga.state.as_str());
        }
        .instrument(span)
        .await
    }

    async fn give_back(&self, saga: &Saga) {
        if let Ok(mut conn) = self.pool.acquire().await {
            let _ = store::release_lease(&mut conn, saga.id, saga.fence).await;
        }
    }

    fn wake_at(self: &Arc<Self>, at: OffsetDateTime) {
        let delay = (at - OffsetDateTime::now_utc()).max(time::Duration::ZERO);
        let delay = Duration::from_secs_f64(delay.as_seconds_f64()) + Duration::from_millis(2);
        let i = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(delay) => i.wake.notify_one(),
                _ = i.shutdown.cancelled() => {}
            }
        });
    }

    /// Runs one attempt of a remote step in its own span; returns it with that span's context.
    async fn run_remote(&self, saga: &Saga, step: usize, kind: Kind, number: u32) -> (Attempt, Arc<Trace>) {
        let shape = CREATE_ORDER[step];
        let name = match kind {
            Kind::Action => shape.action,
            Kind::Compensation => shape.compensation,
        };
        let policy = match kind {
            Kind::Action => &self.def.steps[step].retry,
            Kind::Compensation => &self.def.steps[step].compensation_retry,
        };
        let timeout = policy.attempt_timeout();
        let span = tracing::info_span!(
            "saga.step",
            otel.name = format!("{} {}", kind.as_str(), name),
            saga.step = name,
            saga.step.kind = kind.as_str(),
            saga.attempt = number,
            saga.outcome = tracing::field::Empty,
            error.r#type = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let fut = async {
            match (shape.action, kind) {
                (reserve_inventory::ACTION, Kind::Action) => {
                    reserve_inventory::action(&self.catalog, saga, timeout).await
                }
                (reserve_inventory::ACTION, Kind::Compensation) => {
                    reserve_inventory::compensation(&self.catalog, saga, timeout).await
                }
                (create_shipment::ACTION, Kind::Action) => {
                    create_shipment::action(&self.shipments, saga, timeout).await
                }
                (create_shipment::ACTION, Kind::Compensation) => {
                    create_shipment::compensation(&self.shipments, saga, timeout).await
                }
                _ => unreachable!("step {name} is not remote"),
            }
        };
        let started = std::time::Instant::now();
        let started_at = OffsetDateTime::now_utc();
        let (outcome, downstream_status) = crate::downstream::observed(fut.instrument(span.clone())).await;
        let duration = started.elapsed();
        // Every attempt of a step carries the same key; a skipped compensation called nothing.
        let key = (!matches!(outcome, Outcome::Skipped(_))).then(|| steps::idempotency_key(saga.id, name));
        let attempt = Attempt {
            step,
            kind,
            number,
            started_at,
            idempotency_key: key,
            downstream_status,
            duration: Some(duration),
            outcome,
        };
        let (outcome, class) = outcome_label(&attempt);
        let m = crate::metrics::get();
        let attrs = [
            opentelemetry::KeyValue::new("step", name),
            opentelemetry::KeyValue::new("kind", kind.as_str()),
            opentelemetry::KeyValue::new("outcome", outcome),
        ];
        m.step_duration.record(duration.as_secs_f64(), &attrs);
        if outcome == "transient" || (outcome == "refused" && kind == Kind::Compensation) {
            m.retries.add(1, &attrs[..2]);
        }
        span.record("saga.outcome", outcome);
        if let Some(c) = class {
            span.record("error.type", c);
            span.record("otel.status_code", "error");
        }
        let trace = trace_of(&span, &saga.trace);
        (attempt, trace)
    }

    /// Runs a local step in the shared commit's transaction, in a span of its own under the
    /// saga's session; returns the attempt with that span's context.
    async fn run_local(
        &self,
        conn: &mut sqlx::PgConnection,
        saga: &Saga,
        step: usize,
        kind: Kind,
        session: &tracing::Span,
    ) -> Result<(Attempt, Arc<Trace>), sqlx::Error> {
        let shape = CREATE_ORDER[step];
        let name = match kind {
            Kind::Action => shape.action,
            Kind::Compensation => shape.compensation,
        };
        let number = saga.attempt + 1;
        let span = tracing::info_span!(
            parent: session,
            "saga.step",
            otel.name = format!("{} {}", kind.as_str(), name),
            saga.step = name,
            saga.step.kind = kind.as_str(),
            saga.step.local = true,
            saga.attempt = number,
            saga.outcome = tracing::field::Empty,
            error.r#type = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let started = std::time::Instant::now();
        let started_at = OffsetDateTime::now_utc();
        let work = async {
            match (shape.action, kind) {
                (persist_order::ACTION, Kind::Action) => persist_order::action(conn, saga).await,
                (persist_order::ACTION, Kind::Compensation) => persist_order::compensation(conn, saga).await,
                (other, _) => unreachable!("step {other} is not local"),
            }
        };
        let outcome = match work.instrument(span.clone()).await {
            Ok(o) => o,
            Err(e) => {
                span.record("error.type", "database");
                span.record("otel.status_code", "error");
                return Err(e);
            }
        };
        let attempt = Attempt {
            step,
            kind,
            number,
            started_at,
            idempotency_key: None,
            downstream_status: None,
            duration: Some(started.elapsed()),
            outcome,
        };
        let (label, class) = outcome_label(&attempt);
        span.record("saga.outcome", label);
        if let Some(c) = class {
            span.record("error.type", c);
            span.record("otel.status_code", "error");
        }
        Ok((attempt, trace_of(&span, &saga.trace)))
    }

    /// Applies one step job in `conn`'s transaction (the saga row is locked: `locked`).
    async fn apply_step(
        &self,
        conn: &mut sqlx::PgConnection,
        batch: &mut store::Batch,
        saga: &Saga,
        attempt: Option<&Attempt>,
        trace: &StepTrace,
        locked: Option<&store::Locked>,
    ) -> Result<(Applied, bool, Option<Value>), sqlx::Error> {
        let Some(locked) = locked.filter(|l| l.fence == saga.fence) else {
            return Ok((Applied::Fenced, false, None));
        };
        if locked.state != saga.state.as_str()
            || locked.step != saga.step as i32
            || locked.attempt != saga.attempt as i32
        {
            return Ok((Applied::Fenced, false, None));
        }
        let mut saga = saga.clone();
        saga.cancel_requested = locked.cancel_requested.clone();
        saga.answered_pending = locked.answered_pending;
        let machine = self.machine();
        let now = OffsetDateTime::now_utc();
        // Each effect with the context of the span that produced it (its events carry it): the
        // attempt's, a local step's, or the session's for what the engine decides on its own.
        let session = trace_of(&trace.session, &saga.trace);
        let mut fx: Vec<(Effect, Arc<Trace>)> = Vec::new();
        if let Some(a) = attempt {
            let by = trace.attempt.clone().unwrap_or_else(|| session.clone());
            fx.extend(
                machine
                    .record(&mut saga, a, now, rand::random())
                    .into_iter()
                    .map(|e| (e, by.clone())),
            );
        }
        loop {
            fx.extend(
                machine
                    .check_boundary(&mut saga, now)
                    .into_iter()
                    .map(|e| (e, session.clone())),
            );
            match machine.next(&saga, now) {
                Next::Local(step, kind) => {
                    let (a, by) = self.run_local(conn, &saga, step, kind, &trace.session).await?;
                    fx.extend(
                        machine
                            .record(&mut saga, &a, now, rand::random())
                            .into_iter()
                            .map(|e| (e, by.clone())),
                    );
                }
                _ => break,
            }
        }
        let keep = matches!(machine.next(&saga, now), Next::Remote(..));
        store::stage_transition(
            conn,
            batch,
            &saga,
            machine.step_name(&saga),
            &fx,
            keep,
            trace.persist_session.as_deref(),
            &self.topics,
            &self.cfg.worker_id,
        )
        .await?;
        let answer = fx.iter().find_map(|(e, _)| match e {
            Effect::Finished { answer } => Some(answer.clone()),
            _ => None,
        });
        let finished = answer.is_some();
        Ok((Applied::Written(Box::new(saga)), finished, answer.flatten()))
    }

    async fn apply_create(
        &self,
        conn: &mut sqlx::PgConnection,
        batch: &mut store::Batch,
        new: &NewSaga,
        lease: bool,
    ) -> Result<Created, sqlx::Error> {
        let worker = if lease {
            Some(self.cfg.worker_id.as_str())
        } else {
            None
        };
        store::create(conn, batch, new, worker, self.cfg.lease, &self.topics).await
    }

    async fn committer(self: Arc<Self>) {
        loop {
            let mut batch = Vec::new();
            {
                let mut rx = self.job_rx.lock().await;
                let first = tokio::select! {
                    j = rx.recv() => j,
                    _ = self.jobs_closed.cancelled() => {
                        // What is queued is still committed; then recv answers None.
                        rx.close();
                        rx.recv().await
                    }
                };
                match first {
                    Some(j) => batch.push(j),
                    None => return,
                }
                while batch.len() < self.cfg.batch_max {
                    match rx.try_recv() {
                        Ok(j) => batch.push(j),
                        Err(_) => break,
                    }
                }
            }
            self.commit_batch(batch).await;
        }
    }

    async fn commit_batch(&self, batch: Vec<Job>) {
        if batch.len() > 1 {
            match self.try_batch(&batch).await {
                Ok(results) => {
                    for (job, r) in batch.into_iter().zip(results) {
                        self.deliver(job, Ok(r));
                    }
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, jobs = batch.len(), "shared commit failed; committing jobs one by one")
                }
            }
        }
        for job in batch {
            let r = self
                .try_batch(std::slice::from_ref(&job))
                .await
                .map(|mut v| v.remove(0));
            self.deliver(job, r);
        }
    }

    /// One transaction for `jobs`: the saga rows they advance are locked in one statement, each job
    /// writes what is its own (idempotency key, order rows), and what every job writes alike (saga
    /// rows, history, outbox, NOTIFY) goes out in one statement each before the commit.
    async fn try_batch(&self, jobs: &[Job]) -> Result<Vec<JobResult>, sqlx::Error> {
        // A CLIENT span for the shared commit in the trace of every saga riding in it.
        let spans: Vec<tracing::Span> = jobs
            .iter()
            .map(|j| match j {
                Job::Create { span, .. } => span,
                Job::Step { trace, .. } => &trace.session,
            })
            .filter(|parent| !parent.is_none())
            .map(|parent| commit_span(parent, jobs.len()))
            .collect();
        let result = self.try_batch_in(jobs).await;
        if let Err(e) = &result {
            for span in &spans {
                span.record("error.type", db_error_type(e));
                span.record("otel.status_code", "error");
            }
        }
        result
    }

    async fn try_batch_in(&self, jobs: &[Job]) -> Result<Vec<JobResult>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let ids: Vec<Uuid> = jobs
            .iter()
            .filter_map(|j| match j {
                Job::Step { saga, .. } => Some(saga.id),
                Job::Create { .. } => None,
            })
            .collect();
        let locked = store::lock_many(&mut tx, &ids).await?;
        let mut batch = store::Batch::default();
        let mut out = Vec::with_capacity(jobs.len());
        for job in jobs {
            let r = match job {
                Job::Create { new, lease, .. } => {
                    JobResult::Created(self.apply_create(&mut tx, &mut batch, new, *lease).await?)
                }
                Job::Step {
                    saga, attempt, trace, ..
                } => {
                    let (applied, finished, answer) = self
                        .apply_step(
                            &mut tx,
                            &mut batch,
                            saga,
                            attempt.as_deref(),
                            trace,
                            locked.get(&saga.id),
                        )
                        .await?;
                    JobResult::Step(applied, finished, answer)
                }
            };
            out.push(r);
        }
        batch.flush(&mut tx, self.cfg.lease).await?;
        tx.commit().await?;
        Ok(out)
    }

    fn deliver(&self, job: Job, r: Result<JobResult, sqlx::Error>) {
        match (job, r) {
            (Job::Create { reply, .. }, Ok(JobResult::Created(c))) => {
                let _ = reply.send(Ok(c));
            }
            (Job::Step { reply, .. }, Ok(JobResult::Step(applied, finished, answer))) => {
                if finished && let Applied::Written(s) = &applied {
                    crate::metrics::get().saga_finished(s.state.as_str());
                    self.notify_finished(s.id, s.state, answer);
                }
                let _ = reply.send(Ok(applied));
            }
            (Job::Create { reply, .. }, Err(e)) => {
                let _ = reply.send(Err(e));
            }
            (Job::Step { reply, .. }, Err(e)) => {
                let _ = reply.send(Err(e));
            }
            _ => unreachable!("job and result kinds always match"),
        }
    }

    fn notify_finished(&self, saga_id: Uuid, state: SagaState, answer: Option<Value>) {
        let list = self.waiters.lock().expect("waiters").remove(&saga_id);
        for w in list.into_iter().flatten() {
            let _ = w.send(Finished {
                state,
                answer: answer.clone(),
            });
        }
    }

    async fn poll_loop(self: Arc<Self>) {
        loop {
            if self.shutdown.is_cancelled() {
                return;
            }
            let free = self.in_flight.available_permits().min(256);
            let mut claimed = 0;
            if free > 0 {
                match self.pool.acquire().await {
                    Ok(mut conn) => {
                        match store::claim_due(&mut conn, &self.cfg.worker_id, self.cfg.lease, free as i64)
                            .await
                        {
                            Ok(sagas) => {
                                drop(conn);
                                claimed = sagas.len();
                                for s in sagas {
                                    match self.in_flight.clone().try_acquire_owned() {
                                        Ok(p) => self.clone().spawn_drive(s, p),
                                        Err(_) => self.give_back(&s).await,
                                    }
                                }
                            }
                            Err(e) => tracing::warn!(error = %e, "claiming due sagas failed"),
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "saga poller: database unavailable"),
                }
            }
            if claimed > 0 && claimed == free {
                continue;
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(self.cfg.poll_interval) => {}
            }
        }
    }

    async fn listen_loop(self: Arc<Self>) {
        loop {
            let mut listener = match sqlx::postgres::PgListener::connect_with(&self.pool).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::debug!(error = %e, "saga listener: cannot connect");
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            if listener.listen(store::CHANNEL).await.is_err() {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            loop {
                let n = tokio::select! {
                    _ = self.shutdown.cancelled() => return,
                    n = listener.recv() => n,
                };
                match n {
                    Ok(n) => {
                        let payload = n.payload();
                        // `finished:<saga> <worker>`: a saga this process drove has woken its
                        // waiters already, with the answer; only another worker's news is read here.
                        let finished = payload.strip_prefix("finished:").map(|rest| {
                            let (id, worker) = rest.split_once(' ').unwrap_or((rest, ""));
                            (Uuid::parse_str(id).ok(), worker)
                        });
                        if let Some((Some(id), worker)) = finished
                            && worker != self.cfg.worker_id
                        {
                            let has = self.waiters.lock().expect("waiters").contains_key(&id);
                            if has {
                                // Learnt from another instance: the waiter reads the row.
                                let list = self.waiters.lock().expect("waiters").remove(&id);
                                for w in list.into_iter().flatten() {
                                    let _ = w.send(Finished {
                                        state: SagaState::Completed,
                                        answer: None,
                                    });
                                }
                            }
                        } else if payload == "due" {
                            self.wake.notify_one();
                        }
                    }
                    Err(_) => break,
                }
            }
        }
    }
}

/// The span of one shared commit as one saga sees it (OpenTelemetry database conventions): it
/// lasts from `BEGIN` to `COMMIT`, and says how many jobs shared it.
fn commit_span(parent: &tracing::Span, jobs: usize) -> tracing::Span {
    tracing::info_span!(
        parent: parent,
        "saga.commit",
        otel.name = "COMMIT",
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        db.system.name = "postgresql",
        db.operation.name = "COMMIT",
        db.operation.batch.size = jobs,
        error.r#type = tracing::field::Empty,
    )
}

/// `error.type` of a failed commit: the SQLSTATE when the database answered, else the error kind.
fn db_error_type(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(d) => d
            .code()
            .map(|c| c.into_owned())
            .unwrap_or_else(|| "database".into()),
        sqlx::Error::PoolTimedOut => "pool_timed_out".into(),
        sqlx::Error::Io(_) => "io".into(),
        _ => "database".into(),
    }
}

enum JobResult {
    Created(Created),
    Step(Applied, bool, Option<Value>),
}

fn outcome_label(a: &Attempt) -> (&'static str, Option<String>) {
    match &a.outcome {
        Outcome::Succeeded(_) => ("succeeded", None),
        Outcome::Skipped(_) => ("skipped", None),
        Outcome::Refused { class, .. } => ("refused", Some(class.clone())),
        Outcome::Transient { class, .. } => ("transient", Some(class.clone())),
    }
}
