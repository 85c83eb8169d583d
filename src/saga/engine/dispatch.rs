//! Driving a saga: a session runs what is due (remote attempts here, local steps inside the
//! committer's transaction) and hands every outcome to the committers, until the saga waits or
//! ends. Steps are run through the handlers the registry resolved at startup, by index.

use std::sync::Arc;

use time::OffsetDateTime;
use tracing::Instrument as _;

use super::{Applied, Inner, StepTrace, Trace, trace_of};
use crate::saga::machine::{Attempt, Kind, Next, Outcome, Saga, SagaState};
use crate::saga::registry::{Handler, idempotency_key};
use crate::saga::store;

impl Inner {
    pub(super) async fn drive(self: Arc<Self>, mut saga: Saga) {
        let span = tracing::info_span!(
            "saga",
            otel.name = self.span_name.as_str(),
            saga.id = %saga.id,
            saga.r#type = self.def.name.as_str(),
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

    /// Runs one attempt of a remote step in its own span; returns it with that span's context.
    pub(super) async fn run_remote(
        &self,
        saga: &Saga,
        step: usize,
        kind: Kind,
        number: u32,
    ) -> (Attempt, Arc<Trace>) {
        let resolved = &self.steps[step];
        let (name, handler) = match kind {
            Kind::Action => (resolved.shape.action, &resolved.action),
            Kind::Compensation => (resolved.shape.compensation, &resolved.compensation),
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
        let Handler::Remote(handler) = handler else {
            unreachable!("step {name} is not remote")
        };
        let fut = handler.run(saga, timeout);
        let started = std::time::Instant::now();
        let started_at = OffsetDateTime::now_utc();
        let (outcome, downstream_status) = crate::downstream::observed(fut.instrument(span.clone())).await;
        let duration = started.elapsed();
        // Every attempt of a step carries the same key; a skipped compensation called nothing.
        let key = (!matches!(outcome, Outcome::Skipped(_))).then(|| idempotency_key(saga.id, name));
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

    /// Runs a local step for `sagas` (those of a shared commit due to run it) in the commit's
    /// transaction, in one call of its handler, each in a span of its own under its session
    /// (`sessions`, in the same order); returns each attempt with its span's context.
    pub(super) async fn run_local_many(
        &self,
        conn: &mut sqlx::PgConnection,
        sagas: &[&Saga],
        sessions: &[&tracing::Span],
        step: usize,
        kind: Kind,
    ) -> Result<Vec<(Attempt, Arc<Trace>)>, sqlx::Error> {
        let resolved = &self.steps[step];
        let (name, handler) = match kind {
            Kind::Action => (resolved.shape.action, &resolved.action),
            Kind::Compensation => (resolved.shape.compensation, &resolved.compensation),
        };
        let Handler::Local(handler) = handler else {
            unreachable!("step {name} is not local")
        };
        let spans: Vec<tracing::Span> = sagas
            .iter()
            .zip(sessions)
            .map(|(saga, session)| {
                tracing::info_span!(
                    parent: *session,
                    "saga.step",
                    otel.name = format!("{} {}", kind.as_str(), name),
                    saga.step = name,
                    saga.step.kind = kind.as_str(),
                    saga.step.local = true,
                    saga.attempt = saga.attempt + 1,
                    saga.outcome = tracing::field::Empty,
                    error.r#type = tracing::field::Empty,
                    otel.status_code = tracing::field::Empty,
                )
            })
            .collect();
        let started = std::time::Instant::now();
        let started_at = OffsetDateTime::now_utc();
        let outcomes = match handler.run_many(conn, sagas).await {
            Ok(o) if o.len() == sagas.len() => o,
            Ok(o) => {
                return Err(sqlx::Error::Protocol(format!(
                    "local step {name} answered {} times for {} sagas",
                    o.len(),
                    sagas.len()
                )));
            }
            Err(e) => {
                for span in &spans {
                    span.record("error.type", "database");
                    span.record("otel.status_code", "error");
                }
                return Err(e);
            }
        };
        let duration = started.elapsed();
        Ok(outcomes
            .into_iter()
            .zip(sagas.iter().zip(spans))
            .map(|(outcome, (saga, span))| {
                let attempt = Attempt {
                    step,
                    kind,
                    number: saga.attempt + 1,
                    started_at,
                    idempotency_key: None,
                    downstream_status: None,
                    duration: Some(duration),
                    outcome,
                };
                let (label, class) = outcome_label(&attempt);
                span.record("saga.outcome", label);
                if let Some(c) = class {
                    span.record("error.type", c);
                    span.record("otel.status_code", "error");
                }
                (attempt, trace_of(&span, &saga.trace))
            })
            .collect())
    }
}

pub(super) fn outcome_label(a: &Attempt) -> (&'static str, Option<&'static str>) {
    match &a.outcome {
        Outcome::Succeeded(_) => ("succeeded", None),
        Outcome::Skipped(_) => ("skipped", None),
        // A local step's fatal outcome was labelled a refusal before it had a kind of its own:
        // the metric and span attribute keep that label.
        Outcome::Refused { class, .. } | Outcome::Fatal { class, .. } => ("refused", Some(class.as_str())),
        Outcome::Transient { class, .. } => ("transient", Some(class.as_str())),
    }
}
