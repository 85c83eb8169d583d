//! The saga engine: creates sagas of one type, advances them step by step, and shares commits
//! across sagas. It runs any definition in `sagas/`: the steps come from a [`Registry`] (by their
//! persisted names), what the saga type does at its ends from its [`SagaHooks`]; nothing here
//! names a step or a saga type.
//!
//! One file per job: [`committer`] (group commit), [`poller`] (due sagas, LISTEN, timers),
//! [`waiters`] (the in-process wake-ups of `POST /orders`), [`dispatch`] (driving a saga and
//! running its steps).
//!
//! Shape (SPEC §3 "Throughput by design"):
//! - **Group commit.** Every state change (a new saga, the outcome of an attempt) is a job sent to a
//!   few committer tasks; each committer takes every job waiting and applies them in one
//!   transaction, so under load many sagas share a commit while an idle system commits a lone job at
//!   once (no batch timer). A failing job never sinks the others: the batch is retried job by job.
//!   The committers run on a thread of their own, with connections of their own, so a commit's
//!   round trips never wait in the runtime's queue behind HTTP requests, steps and the relay.
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

mod committer;
mod dispatch;
mod poller;
mod waiters;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use time::OffsetDateTime;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::outbox::Topics;
use crate::saga::definition::SagaDef;
use crate::saga::machine::{Attempt, Machine, Next, Saga, SagaHooks, SagaState, StepShape};
use crate::saga::registry::{Registry, Resolved};
use crate::saga::store::{self, Created, NewSaga};

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
            committers: 2,
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
    /// The answer to the saga's creator as its hooks gave it (CreateOrder: `POST /orders`'s,
    /// `orders::answer`); None when learnt from another instance: read the row.
    pub answer: Option<serde_json::Value>,
}

/// One saga type as the engine runs it: its definition, the handlers of its steps and its hooks.
pub struct SagaType {
    /// The definition's file (for messages).
    pub file: String,
    /// The definition.
    pub def: SagaDef,
    /// Handlers by persisted step name (every name of `def` must be there).
    pub registry: Registry,
    /// What the saga type adds at its ends.
    pub hooks: Arc<dyn SagaHooks>,
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

struct Inner {
    pool: PgPool,
    /// The committers' connections, made on their thread ([`committer`]); until it runs (or if it
    /// could not be started), they use `pool`.
    commit_pool: std::sync::OnceLock<PgPool>,
    /// The runtime of the thread the sagas are driven on (their steps' outside calls); until it
    /// runs (or if it could not be started), they are driven on the runtime that asks.
    drive_rt: std::sync::OnceLock<tokio::runtime::Handle>,
    /// Cancelled when the runtime that started the engine drops it without a shutdown (a test's
    /// runtime ending): the committers' and the drives' threads then stop too.
    orphaned: CancellationToken,
    def: SagaDef,
    /// The steps of `def`, resolved in the registry (shape and handlers), in order.
    steps: Vec<Resolved>,
    /// Their shapes, as the machine reads them.
    shapes: Vec<StepShape>,
    hooks: Arc<dyn SagaHooks>,
    /// `saga <type>`: the name of a saga session's span.
    span_name: String,
    cfg: EngineConfig,
    topics: Topics,
    jobs: mpsc::Sender<Job>,
    job_rx: tokio::sync::Mutex<mpsc::Receiver<Job>>,
    waiters: waiters::Waiters,
    wake: Notify,
    in_flight: Arc<Semaphore>,
    drives: TaskTracker,
    shutdown: CancellationToken,
    /// Cancelled once the drives have finished at shutdown: the committers close the job queue,
    /// commit what is left in it, and stop.
    jobs_closed: CancellationToken,
    /// The committers' transactions in flight, and a signal when one has ended
    /// (`committer::InFlight`).
    committing: std::sync::atomic::AtomicUsize,
    commit_ended: Notify,
}

/// The saga engine (cheap to clone).
#[derive(Clone)]
pub struct Engine(Arc<Inner>);

impl Engine {
    /// A new engine; call `start` to run its committers, poller and listener.
    pub fn new(pool: PgPool, saga: SagaType, cfg: EngineConfig, topics: Topics) -> anyhow::Result<Engine> {
        let SagaType {
            file,
            def,
            registry,
            hooks,
        } = saga;
        for (i, s) in def.steps.iter().enumerate() {
            for p in [&s.retry, &s.compensation_retry] {
                if p.attempt_timeout() + Duration::from_secs(1) > cfg.lease {
                    anyhow::bail!(
                        "{file}: steps[{i}] attempt_timeout_ms must be at least 1 s shorter than the saga lease (SAGA_LEASE_MS = {} ms)",
                        cfg.lease.as_millis()
                    );
                }
            }
        }
        let steps = registry.resolve(&def, &file)?;
        let shapes = steps.iter().map(|s| s.shape).collect();
        let (tx, rx) = mpsc::channel(cfg.max_in_flight * 2 + 1024);
        Ok(Engine(Arc::new(Inner {
            pool,
            commit_pool: std::sync::OnceLock::new(),
            drive_rt: std::sync::OnceLock::new(),
            orphaned: CancellationToken::new(),
            span_name: format!("saga {}", def.name),
            def,
            steps,
            shapes,
            hooks,
            in_flight: Arc::new(Semaphore::new(cfg.max_in_flight)),
            cfg,
            topics,
            jobs: tx,
            job_rx: tokio::sync::Mutex::new(rx),
            waiters: waiters::Waiters::default(),
            wake: Notify::new(),
            drives: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            jobs_closed: CancellationToken::new(),
            committing: std::sync::atomic::AtomicUsize::new(0),
            commit_ended: Notify::new(),
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
        tracker.spawn(inner.clone().start_committers());
        if inner.cfg.drive {
            let i = inner.clone();
            tracker.spawn(async move { i.poll_loop().await });
            // The sagas' steps run on a thread of their own too: a step's reply from a downstream
            // service no longer waits behind the HTTP requests (docs/performance.md, finding 28).
            let i = inner.clone();
            tracker.spawn(crate::db::apart(
                "saga-drive",
                &inner.pool,
                1,
                inner.orphaned.clone(),
                |_| async move {
                    let _ = i.drive_rt.set(tokio::runtime::Handle::current());
                    tokio::select! {
                        _ = i.orphaned.cancelled() => {}
                        // Once the drives have finished at shutdown (or were given up on).
                        _ = i.jobs_closed.cancelled() => {}
                    }
                },
            ));
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

    /// Creates a saga (with its idempotency record, and what its type's new-saga statement adds:
    /// CreateOrder's order placeholder) in a shared commit. When
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
        self.0.waiters.register(saga_id)
    }

    /// Drops the waiters of a saga (after a timeout).
    pub fn forget_waiters(&self, saga_id: Uuid) {
        self.0.waiters.forget(saga_id)
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
            shapes: &self.shapes,
            hooks: &*self.hooks,
            retry_scale: self.cfg.retry_scale,
        }
    }

    fn spawn_drive(self: Arc<Self>, saga: Saga, permit: OwnedSemaphorePermit) {
        let i = self.clone();
        let drive = async move {
            i.drive(saga).await;
            drop(permit);
        };
        match self.drive_rt.get() {
            Some(rt) => self.drives.spawn_on(drive, rt),
            None => self.drives.spawn(drive),
        };
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
}
