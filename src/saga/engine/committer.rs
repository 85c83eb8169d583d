//! Group commit: every state change (a new saga, the outcome of an attempt) is a job sent to a
//! few committer tasks; each takes every job waiting and applies them in one transaction (local
//! steps run inside it), writing what all jobs write alike in one statement each (see
//! `store::Batch`). A failing batch is retried job by job, so one bad job never sinks the others.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::Value;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{Applied, Inner, Job, StepTrace, Trace, trace_of};
use crate::saga::machine::{Attempt, Effect, Kind, Next, Saga};
use crate::saga::store::{self, Created};

/// How long a committer lets jobs gather behind a commit in flight before it commits them anyway.
const COMMIT_STALL: Duration = Duration::from_millis(5);

/// A step job under way in a shared commit: its saga as it advances, and the effects so far, each
/// with the context of the span that produced it (its events carry it).
struct Advancing<'j> {
    saga: Saga,
    fx: Vec<(Effect, Arc<Trace>)>,
    /// The session's context, for what the engine decides on its own.
    session: Arc<Trace>,
    trace: &'j StepTrace,
}

impl Inner {
    /// Checks a step job against its saga's row as locked (`locked`) and records its attempt; None
    /// when the saga was taken over or moved on (fenced: the job writes nothing).
    fn begin_step<'j>(
        &self,
        saga: &Saga,
        attempt: Option<&Attempt>,
        trace: &'j StepTrace,
        locked: Option<&store::Locked>,
        now: OffsetDateTime,
    ) -> Option<Advancing<'j>> {
        let locked = locked.filter(|l| l.fence == saga.fence)?;
        if locked.state != saga.state.as_str()
            || locked.step != saga.step as i32
            || locked.attempt != saga.attempt as i32
        {
            return None;
        }
        let mut saga = saga.clone();
        saga.cancel_requested = locked.cancel_requested.clone();
        saga.answered_pending = locked.answered_pending;
        let session = trace_of(&trace.session, &saga.trace);
        let mut fx: Vec<(Effect, Arc<Trace>)> = Vec::new();
        if let Some(a) = attempt {
            let by = trace.attempt.clone().unwrap_or_else(|| session.clone());
            fx.extend(
                self.machine()
                    .record(&mut saga, a, now, rand::random())
                    .into_iter()
                    .map(|e| (e, by.clone())),
            );
        }
        Some(Advancing {
            saga,
            fx,
            session,
            trace,
        })
    }

    /// Passes a saga's boundaries (deadline, cancel request); the local step it must run next in
    /// this transaction, if any.
    fn settle(&self, a: &mut Advancing<'_>, now: OffsetDateTime) -> Option<(usize, Kind)> {
        let machine = self.machine();
        let session = a.session.clone();
        a.fx.extend(
            machine
                .check_boundary(&mut a.saga, now)
                .into_iter()
                .map(|e| (e, session.clone())),
        );
        match machine.next(&a.saga, now) {
            Next::Local(step, kind) => Some((step, kind)),
            _ => None,
        }
    }

    /// Runs the local steps the advancing sagas reach, until none is due: the sagas due for the same
    /// step run it together (one call of its handler, one statement for a step written for it).
    async fn run_locals(
        &self,
        conn: &mut sqlx::PgConnection,
        advancing: &mut [Advancing<'_>],
        now: OffsetDateTime,
    ) -> Result<(), sqlx::Error> {
        let mut due: Vec<Option<(usize, Kind)>> = advancing.iter_mut().map(|a| self.settle(a, now)).collect();
        while let Some(&next) = due.iter().flatten().next() {
            let these: Vec<usize> = (0..due.len()).filter(|&k| due[k] == Some(next)).collect();
            let sagas: Vec<&Saga> = these.iter().map(|&k| &advancing[k].saga).collect();
            let sessions: Vec<&tracing::Span> = these.iter().map(|&k| &advancing[k].trace.session).collect();
            let attempts = self
                .run_local_many(conn, &sagas, &sessions, next.0, next.1)
                .await?;
            for (k, (attempt, by)) in these.into_iter().zip(attempts) {
                let a = &mut advancing[k];
                a.fx.extend(
                    self.machine()
                        .record(&mut a.saga, &attempt, now, rand::random())
                        .into_iter()
                        .map(|e| (e, by.clone())),
                );
                due[k] = self.settle(a, now);
            }
        }
        Ok(())
    }

    /// Stages what an advanced saga writes (`store::stage_transition`); what the job answers.
    async fn stage_step(
        &self,
        conn: &mut sqlx::PgConnection,
        batch: &mut store::Batch,
        a: Advancing<'_>,
        now: OffsetDateTime,
    ) -> Result<JobResult, sqlx::Error> {
        let machine = self.machine();
        let keep = matches!(machine.next(&a.saga, now), Next::Remote(..));
        store::stage_transition(
            conn,
            batch,
            &a.saga,
            machine.step_name(&a.saga),
            &a.fx,
            keep,
            a.trace.persist_session.as_deref(),
            &self.topics,
            &self.cfg.worker_id,
        )
        .await?;
        let answer = a.fx.iter().find_map(|(e, _)| match e {
            Effect::Finished { answer } => Some(answer.clone()),
            _ => None,
        });
        let finished = answer.is_some();
        Ok(JobResult::Step(
            Applied::Written(Box::new(a.saga)),
            finished,
            answer.flatten(),
        ))
    }

    /// Writes the new sagas of `jobs` (one statement for all of them), in their order.
    async fn apply_creates(
        &self,
        conn: &mut sqlx::PgConnection,
        batch: &mut store::Batch,
        jobs: &[Job],
    ) -> Result<Vec<Created>, sqlx::Error> {
        let creates: Vec<store::ToCreate<'_>> = jobs
            .iter()
            .filter_map(|j| match j {
                Job::Create { new, lease, .. } => Some(store::ToCreate {
                    new,
                    worker: lease.then_some(self.cfg.worker_id.as_str()),
                }),
                Job::Step { .. } => None,
            })
            .collect();
        store::create_many(conn, batch, &creates, self.cfg.lease, &self.topics, &*self.hooks).await
    }

    /// Starts the committers on a thread of their own ("saga-commit"), with connections of their
    /// own (`db::apart`): a commit is a chain of round trips, and on the shared runtime each reply
    /// waited for a worker to come round to the committer among the HTTP requests, the steps and
    /// the relay (docs/performance.md, finding 27). Resolves once every committer has stopped.
    pub(super) fn start_committers(self: Arc<Self>) -> impl Future<Output = ()> + Send + 'static {
        let n = self.cfg.committers.max(1);
        let inner = self.clone();
        crate::db::apart(
            "saga-commit",
            &self.pool,
            u32::try_from(n).unwrap_or(u32::MAX),
            self.orphaned.clone(),
            move |pool| async move {
                let _ = inner.commit_pool.set(pool);
                futures::future::join_all((0..n).map(|_| inner.clone().committer())).await;
            },
        )
    }

    async fn committer(self: Arc<Self>) {
        loop {
            let mut batch = Vec::new();
            {
                let mut rx = self.job_rx.lock().await;
                let first = tokio::select! {
                    j = rx.recv() => j,
                    _ = self.orphaned.cancelled() => return,
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
                self.behind_the_commit_in_flight().await;
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

    /// With another committer's transaction in flight, jobs gather behind it until it has
    /// committed, so commits grow with the load instead of competing (docs/performance.md,
    /// findings 17 and 29); but never longer than [`COMMIT_STALL`]: one slow transaction (a lock
    /// wait) does not hold every saga up. With one committer nothing is ever in flight here.
    async fn behind_the_commit_in_flight(&self) {
        let until = tokio::time::Instant::now() + COMMIT_STALL;
        loop {
            let ended = self.commit_ended.notified();
            if self.committing.load(Ordering::SeqCst) == 0 {
                return;
            }
            if tokio::time::timeout_at(until, ended).await.is_err() {
                return;
            }
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
    /// writes what is its own (idempotency key, its type's rows: CreateOrder's order), and what
    /// every job writes alike (saga rows, history, outbox, NOTIFY) goes out in one statement each
    /// before the commit.
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
        // Counted until this function returns: committed, failed or cancelled.
        let _in_flight = InFlight::new(self);
        let ids: Vec<Uuid> = jobs
            .iter()
            .filter_map(|j| match j {
                Job::Step { saga, .. } => Some(saga.id),
                Job::Create { .. } => None,
            })
            .collect();
        let (mut tx, locked) =
            store::Commit::begin_locking(self.commit_pool.get().unwrap_or(&self.pool), &ids).await?;
        let mut batch = store::Batch::default();
        let mut created = self.apply_creates(&mut tx, &mut batch, jobs).await?.into_iter();
        let now = OffsetDateTime::now_utc();
        // Each job's answer in its place; the step jobs that write advance together, so the sagas
        // reaching the same local step run it in one call.
        let mut out: Vec<Option<JobResult>> = Vec::with_capacity(jobs.len());
        let mut advancing = Vec::new();
        let mut places = Vec::new();
        for (i, job) in jobs.iter().enumerate() {
            out.push(match job {
                Job::Create { .. } => {
                    Some(JobResult::Created(created.next().ok_or_else(|| {
                        sqlx::Error::Protocol("a new saga without its answer".into())
                    })?))
                }
                Job::Step {
                    saga, attempt, trace, ..
                } => match self.begin_step(saga, attempt.as_deref(), trace, locked.get(&saga.id), now) {
                    Some(a) => {
                        advancing.push(a);
                        places.push(i);
                        None
                    }
                    None => Some(JobResult::Step(Applied::Fenced, false, None)),
                },
            });
        }
        self.run_locals(&mut tx, &mut advancing, now).await?;
        for (a, i) in advancing.into_iter().zip(places) {
            out[i] = Some(self.stage_step(&mut tx, &mut batch, a, now).await?);
        }
        let out = out
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| sqlx::Error::Protocol("a job without its answer".into()))?;
        batch.flush(&mut tx, self.cfg.lease, &*self.hooks).await?;
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
                    self.waiters.finished(s.id, s.state, answer);
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

/// A transaction of the committers in flight (`Inner::committing`): counted from its start until
/// its COMMIT is answered (or it fails), so another committer's jobs gather behind the whole of it,
/// its wait for the disk included (docs/performance.md, finding 29; finding 21 had them start at
/// its COMMIT, which cost more than it saved once the committers had a thread of their own).
struct InFlight<'a>(&'a Inner);

impl<'a> InFlight<'a> {
    fn new(inner: &'a Inner) -> Self {
        inner.committing.fetch_add(1, Ordering::SeqCst);
        InFlight(inner)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.committing.fetch_sub(1, Ordering::SeqCst);
        self.0.commit_ended.notify_waiters();
    }
}

enum JobResult {
    Created(Created),
    Step(Applied, bool, Option<Value>),
}
