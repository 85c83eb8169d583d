//! The saga state machine, pure: given a saga and the outcome of one attempt, it decides the next
//! state and lists the effects to write in the same transaction (history rows, outbox events, and
//! what the saga's [`SagaHooks`] add: for CreateOrder, order changes and the answer for
//! `POST /orders`). No I/O here, so every rule is unit-tested (CreateOrder's run of them:
//! `orders/saga/machine_tests.rs`). The rules are the same for every saga; a saga's input, the
//! data its steps produce, its step outputs, its own effects and its answer are JSON to the
//! machine, read and written by its hooks (`orders/saga/` for CreateOrder).

use std::collections::HashMap;
use std::time::Duration;

use futures::future::BoxFuture;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::PgConnection;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::saga::definition::SagaDef;
pub use crate::saga::failure::FailureClass;

/// A saga's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SagaState {
    /// Moving forward.
    Running,
    /// Undoing completed steps in reverse order.
    Compensating,
    /// Every step succeeded.
    Completed,
    /// Compensated after a cancellation (customer, admin).
    Compensated,
    /// Compensated after a fatal error.
    Failed,
    /// A compensation exhausted its retries; waits for an operator.
    Stuck,
}

impl SagaState {
    /// Every state.
    pub const ALL: [SagaState; 6] = [
        SagaState::Running,
        SagaState::Compensating,
        SagaState::Completed,
        SagaState::Compensated,
        SagaState::Failed,
        SagaState::Stuck,
    ];

    /// Stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            SagaState::Running => "running",
            SagaState::Compensating => "compensating",
            SagaState::Completed => "completed",
            SagaState::Compensated => "compensated",
            SagaState::Failed => "failed",
            SagaState::Stuck => "stuck",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<SagaState> {
        SagaState::ALL.into_iter().find(|x| x.as_str() == s)
    }

    /// No further work will happen by itself (terminal, or stuck waiting for ops).
    pub fn is_finished(self) -> bool {
        !matches!(self, SagaState::Running | SagaState::Compensating)
    }

    /// Completed, compensated or failed: nothing can change it any more.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            SagaState::Completed | SagaState::Compensated | SagaState::Failed
        )
    }
}

/// Whether an attempt ran a step's action or its compensation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The step's action.
    Action,
    /// The step's compensation.
    Compensation,
}

impl Kind {
    /// Stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Action => "action",
            Kind::Compensation => "compensation",
        }
    }
}

/// Why a saga compensates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    /// Error class (`insufficient_stock`, `total_overflow`, `cancelled`, `deadline_exceeded`,
    /// `http_4xx`, a transient class when retries ran out, ...).
    pub class: FailureClass,
    /// Human-readable reason.
    pub detail: String,
    /// The step that failed (or the step at which the saga was cancelled).
    pub step: String,
    /// What the refusal named, for the saga type's answer (CreateOrder: the unavailable products of
    /// a stock refusal); stored as `unavailable`, the name earlier releases wrote.
    #[serde(default, rename = "unavailable", skip_serializing_if = "Option::is_none")]
    pub refusal: Option<Value>,
    /// A customer's cancellation of a completed saga (the shipment exists): the order stays as it
    /// is until `cancel_shipment` succeeds (then `cancel_order` cancels it), and a shipper that
    /// refuses the cancellation (409: the parcel was picked up) returns the saga to `completed`.
    #[serde(
        default,
        rename = "afterCompletion",
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub after_completion: bool,
}

/// A saga as a worker holds it.
#[derive(Debug, Clone)]
pub struct Saga {
    /// Saga id.
    pub id: Uuid,
    /// The order it is about (`sagas.order_id`; CreateOrder's sagas always have one, a saga of a
    /// type that places no order has none). Events of the saga are keyed by it, else by the saga.
    pub order_id: Option<i32>,
    /// The customer.
    pub user_id: i32,
    /// Lease fencing token held by this worker.
    pub fence: i64,
    /// State.
    pub state: SagaState,
    /// Step index whose action (running) or compensation (compensating) runs next.
    pub step: usize,
    /// Attempts already made of that action/compensation.
    pub attempt: u32,
    /// What the saga was asked to do (`sagas.input`, as its creator wrote it; CreateOrder:
    /// `{"items": [lines]}`).
    pub input: Value,
    /// What its steps produced so far (`sagas.data`, kept by its hooks; `{}` at the start).
    pub data: Value,
    /// Why it compensates.
    pub failure: Option<Failure>,
    /// A cancellation was asked for (the reason).
    pub cancel_requested: Option<String>,
    /// The creating request answered 202.
    pub answered_pending: bool,
    /// W3C trace context of the request that started it.
    pub trace: HashMap<String, String>,
    /// Forward progress must finish before this.
    pub deadline_at: OffsetDateTime,
    /// When the next attempt is due (None when finished).
    pub next_attempt_at: Option<OffsetDateTime>,
    /// Creation time (also the order date).
    pub created_at: OffsetDateTime,
    /// Last error text.
    pub last_error: Option<String>,
    /// Last error class.
    pub last_error_class: Option<FailureClass>,
}

/// The outcome of one attempt, classified by the step where the cause is known.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// It worked, with what the step produced (the saga's hooks keep it: `keep_output`,
    /// `compensated`); `Value::Null` when there is nothing to keep.
    Succeeded(Value),
    /// A compensation had nothing to undo (for example no shipment was ever created).
    Skipped(String),
    /// A business refusal by a downstream service: an action is not retried (the saga
    /// compensates); a compensation is retried (compensations must eventually succeed).
    Refused {
        /// Error class.
        class: FailureClass,
        /// Reason.
        detail: String,
        /// HTTP status of the downstream answer.
        status: Option<u16>,
        /// What the refusal named, kept in the saga's failure for its hooks (CreateOrder: the
        /// unavailable products of a stock refusal).
        refusal: Option<Value>,
    },
    /// Our own failure that no retry can mend (the saga's data does not allow the step): an
    /// action compensates at once; a compensation leaves the saga stuck for an operator.
    Fatal {
        /// Error class.
        class: FailureClass,
        /// Reason.
        detail: String,
    },
    /// A transient failure: retried with backoff.
    Transient {
        /// Error class.
        class: FailureClass,
        /// Reason.
        detail: String,
        /// HTTP status of the downstream answer.
        status: Option<u16>,
        /// The downstream's Retry-After.
        retry_after: Option<Duration>,
    },
}

/// One attempt of an action or compensation.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// Step index.
    pub step: usize,
    /// Action or compensation.
    pub kind: Kind,
    /// 1-based attempt number.
    pub number: u32,
    /// When it started.
    pub started_at: OffsetDateTime,
    /// The Idempotency-Key sent downstream.
    pub idempotency_key: Option<String>,
    /// The HTTP status of the downstream's last answer (None for a local step, or when no answer
    /// came).
    pub downstream_status: Option<u16>,
    /// How long the attempt took.
    pub duration: Option<Duration>,
    /// What happened.
    pub outcome: Outcome,
}

/// A step-history row.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryRow {
    /// Step name (action or compensation name).
    pub step: String,
    /// Action or compensation.
    pub kind: Kind,
    /// Attempt number.
    pub attempt: u32,
    /// Start.
    pub started_at: OffsetDateTime,
    /// `succeeded`, `retry_scheduled`, `failed`, `skipped`, `interrupted`.
    pub outcome: &'static str,
    /// Error class.
    pub error_class: Option<FailureClass>,
    /// Error text.
    pub error: Option<String>,
    /// Idempotency key used.
    pub idempotency_key: Option<String>,
    /// Downstream HTTP status.
    pub downstream_status: Option<u16>,
    /// How long the attempt took, in milliseconds.
    pub duration_ms: Option<i32>,
}

/// Which topic an event goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// `orders.saga-events`.
    Saga,
    /// The topic of the saga's subject (`orders.events` for CreateOrder): an event there is
    /// written only when the hook effect before it changed something.
    Order,
}

/// An effect to write with the transition.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// A history row.
    History(HistoryRow),
    /// An outbox event.
    Event {
        /// Topic.
        stream: Stream,
        /// Event type.
        event_type: &'static str,
        /// Payload.
        data: Value,
    },
    /// A change of the saga type's own rows (CreateOrder: the order's status), written in the
    /// shared commit's transaction by [`SagaHooks::apply_many`]; the JSON is the hooks' own.
    Hook(Value),
    /// The shipper refused a customer's cancellation of a completed saga: the saga's stored
    /// cancellation request is cleared (the saga is `completed` again).
    ClearCancelRequest,
    /// The saga finished (terminal or stuck): store the answer (if any) and wake waiters.
    Finished {
        /// The answer the saga's creator gives (its hooks decide it; stored as `sagas.answer`).
        answer: Option<Value>,
    },
}

/// Step names and whether each action / compensation runs locally (inside the transaction).
#[derive(Debug, Clone, Copy)]
pub struct StepShape {
    /// Action name.
    pub action: &'static str,
    /// Compensation name.
    pub compensation: &'static str,
    /// The action runs in the database transaction.
    pub local_action: bool,
    /// The compensation runs in the database transaction.
    pub local_compensation: bool,
}

/// What a worker should do next with a saga.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Call a downstream service.
    Remote(usize, Kind),
    /// Run a local step in the transaction.
    Local(usize, Kind),
    /// Nothing is due before this time.
    WaitUntil(OffsetDateTime),
    /// Finished (terminal or stuck).
    Done,
}

/// One [`Effect::Hook`] of a shared commit, with the saga that made it.
#[derive(Debug, Clone, PartialEq)]
pub struct HookEffect {
    /// The saga.
    pub saga_id: Uuid,
    /// The order it places, if any.
    pub order_id: Option<i32>,
    /// The saga type's JSON.
    pub effect: Value,
}

/// What one saga type adds to the engine's rules at its ends: how a step's output is kept, what a
/// completed or compensated saga writes besides its own row and saga events (order changes, order
/// events) and answers, how its own effects are written, and when a refused compensation ends a
/// cancellation. The engine and the machine know nothing else of a saga type.
pub trait SagaHooks: Send + Sync {
    /// The statement that creates a saga of this type, with the binds and result of
    /// `saga::store::CREATE_SQL` (None: that generic insert, which names no order).
    fn create_sql(&self) -> Option<&'static str> {
        None
    }
    /// The saga was created: effects it adds after `SagaStarted` (events only; CreateOrder:
    /// `OrderCreated`).
    fn started(&self, _s: &Saga, _fx: &mut Vec<Effect>) {}
    /// Keeps what a successful action produced in the saga's data.
    fn keep_output(&self, s: &mut Saga, out: &Value);
    /// A compensation succeeded with `out`: effects it adds (after `CompensationSucceeded`).
    fn compensated(&self, s: &Saga, out: &Value, fx: &mut Vec<Effect>);
    /// Every step succeeded: effects it adds (before `SagaCompleted`), and the answer.
    fn completed(&self, s: &Saga, fx: &mut Vec<Effect>) -> Option<Value>;
    /// Compensation finished (`s.state` is `compensated` or `failed`): effects it adds (before
    /// `SagaCompensated` / `SagaFailed`), and the answer.
    fn compensation_finished(&self, s: &Saga, failure: &Failure, fx: &mut Vec<Effect>) -> Option<Value>;
    /// Writes a shared commit's [`Effect::Hook`]s in its transaction, all of them at once (so a
    /// type can write them in one statement each of a kind), before the commit's outbox rows;
    /// returns for each, in the order given, whether it changed anything (the [`Stream::Order`]
    /// events staged after it in its transition are written only then). A saga type that emits no
    /// hook effect keeps this default, which writes nothing.
    fn apply_many<'a>(
        &'a self,
        _conn: &'a mut PgConnection,
        effects: &'a [HookEffect],
    ) -> BoxFuture<'a, Result<Vec<bool>, sqlx::Error>> {
        Box::pin(async move { Ok(vec![false; effects.len()]) })
    }
    /// Whether this refused compensation attempt ends a cancellation for good: the saga returns to
    /// `completed` instead of retrying.
    fn refuses_cancellation(&self, s: &Saga, a: &Attempt, last_step: bool) -> bool;
}

/// The rules of one saga type.
pub struct Machine<'a> {
    /// The definition (policies, names).
    pub def: &'a SagaDef,
    /// The step implementations' shapes, in order.
    pub shapes: &'a [StepShape],
    /// What the saga type adds at its ends.
    pub hooks: &'a dyn SagaHooks,
    /// SAGA_RETRY_SCALE.
    pub retry_scale: f64,
}

impl Machine<'_> {
    /// What is due next.
    pub fn next(&self, s: &Saga, now: OffsetDateTime) -> Next {
        if s.state.is_finished() {
            return Next::Done;
        }
        if let Some(at) = s.next_attempt_at
            && at > now
        {
            return Next::WaitUntil(at);
        }
        let kind = if s.state == SagaState::Running {
            Kind::Action
        } else {
            Kind::Compensation
        };
        let shape = &self.shapes[s.step];
        let local = match kind {
            Kind::Action => shape.local_action,
            Kind::Compensation => shape.local_compensation,
        };
        if local {
            Next::Local(s.step, kind)
        } else {
            Next::Remote(s.step, kind)
        }
    }

    /// Checks at a step boundary (before an action starts): a requested cancellation or a passed
    /// deadline turns a running saga to compensation. Returns the effects, empty when nothing changes.
    pub fn check_boundary(&self, s: &mut Saga, now: OffsetDateTime) -> Vec<Effect> {
        if s.state == SagaState::Completed && s.failure.is_none() {
            // Cancelled while its last step was in flight: undo everything.
            if let Some(reason) = s.cancel_requested.clone() {
                let mut fx = Vec::new();
                let last = self.shapes.len() - 1;
                s.failure = Some(Failure {
                    class: FailureClass::Cancelled,
                    detail: format!("cancelled: {reason}"),
                    step: self.shapes[last].action.into(),
                    refusal: None,
                    after_completion: false,
                });
                self.begin_compensation(s, Some(last), now, &mut fx);
                return fx;
            }
        }
        if s.state != SagaState::Running {
            return Vec::new();
        }
        let (class, detail) = if let Some(reason) = &s.cancel_requested {
            (FailureClass::Cancelled, format!("cancelled: {reason}"))
        } else if now > s.deadline_at {
            (
                FailureClass::DeadlineExceeded,
                "the saga did not finish before its deadline".to_string(),
            )
        } else {
            return Vec::new();
        };
        let mut fx = Vec::new();
        s.failure = Some(Failure {
            class,
            detail: detail.clone(),
            step: self.shapes[s.step].action.into(),
            refusal: None,
            after_completion: false,
        });
        s.last_error = Some(detail);
        s.last_error_class = Some(class);
        // A remote action may have taken effect even with no attempt recorded (the process died,
        // or its commit failed, after the call): undo it too. Remote compensations are safe when
        // the action never happened (a release of an unknown reservation answers 204; a shipment
        // cancel without a recorded shipment is skipped). Found by scripts/chaos: a reservation
        // leaked when a PostgreSQL restart lost the reservation's commit and the customer cancelled.
        let step_may_have_effect = !self.shapes[s.step].local_action;
        let from = if step_may_have_effect {
            Some(s.step)
        } else {
            s.step.checked_sub(1)
        };
        self.begin_compensation(s, from, now, &mut fx);
        fx
    }

    /// Applies the outcome of one attempt to the saga and returns what to write with it.
    pub fn record(&self, s: &mut Saga, a: &Attempt, now: OffsetDateTime, jitter_unit: f64) -> Vec<Effect> {
        let mut fx = Vec::new();
        let shape = self.shapes[a.step];
        let name = match a.kind {
            Kind::Action => shape.action,
            Kind::Compensation => shape.compensation,
        };
        let policy = match a.kind {
            Kind::Action => &self.def.steps[a.step].retry,
            Kind::Compensation => &self.def.steps[a.step].compensation_retry,
        };
        let mut row = HistoryRow {
            step: name.into(),
            kind: a.kind,
            attempt: a.number,
            started_at: a.started_at,
            outcome: "succeeded",
            error_class: None,
            error: None,
            idempotency_key: a.idempotency_key.clone(),
            downstream_status: a.downstream_status,
            duration_ms: a
                .duration
                .map(|d| i32::try_from(d.as_millis()).unwrap_or(i32::MAX)),
        };
        s.attempt = a.number;
        match (&a.outcome, a.kind) {
            (Outcome::Succeeded(out), Kind::Action) => {
                fx.push(Effect::History(row));
                self.hooks.keep_output(s, out);
                fx.push(saga_event(
                    "StepSucceeded",
                    json!({"step": name, "attempt": a.number}),
                ));
                s.step += 1;
                s.attempt = 0;
                s.next_attempt_at = Some(now);
                if s.step == self.shapes.len() {
                    self.complete(s, &mut fx);
                }
            }
            (Outcome::Succeeded(_) | Outcome::Skipped(_), Kind::Compensation) => {
                if let Outcome::Skipped(why) = &a.outcome {
                    row.outcome = "skipped";
                    row.error = Some(why.clone());
                }
                fx.push(Effect::History(row));
                fx.push(saga_event(
                    "CompensationSucceeded",
                    json!({"step": name, "attempt": a.number}),
                ));
                if let Outcome::Succeeded(out) = &a.outcome {
                    self.hooks.compensated(s, out, &mut fx);
                }
                s.attempt = 0;
                s.next_attempt_at = Some(now);
                match s.step.checked_sub(1) {
                    Some(prev) => s.step = prev,
                    None => self.finish_compensation(s, &mut fx),
                }
            }
            (Outcome::Skipped(why), Kind::Action) => {
                // Actions are never skipped; treat as a refusal so nothing is silently lost.
                row.outcome = "failed";
                row.error = Some(why.clone());
                fx.push(Effect::History(row));
                self.fail_forward(s, a.step, FailureClass::Skipped, why, None, false, now, &mut fx);
            }
            (
                Outcome::Refused {
                    class,
                    detail,
                    status,
                    refusal,
                },
                Kind::Action,
            ) => {
                row.outcome = "failed";
                row.error_class = Some(*class);
                row.error = Some(detail.clone());
                row.downstream_status = *status;
                fx.push(Effect::History(row));
                fx.push(saga_event(
                    "StepFailed",
                    json!({"step": name, "attempt": a.number, "errorClass": class, "error": detail}),
                ));
                self.fail_forward(s, a.step, *class, detail, refusal.clone(), false, now, &mut fx);
            }
            (Outcome::Fatal { class, detail }, Kind::Action) => {
                row.outcome = "failed";
                row.error_class = Some(*class);
                row.error = Some(detail.clone());
                fx.push(Effect::History(row));
                fx.push(saga_event(
                    "StepFailed",
                    json!({"step": name, "attempt": a.number, "errorClass": class, "error": detail}),
                ));
                self.fail_forward(s, a.step, *class, detail, None, false, now, &mut fx);
            }
            (Outcome::Fatal { class, detail }, Kind::Compensation) => {
                row.outcome = "failed";
                row.error_class = Some(*class);
                row.error = Some(detail.clone());
                fx.push(Effect::History(row));
                let why = format!("{name} failed: {detail}");
                self.get_stuck(s, *class, &why, &mut fx);
            }
            (
                Outcome::Refused {
                    class,
                    detail,
                    status,
                    ..
                },
                Kind::Compensation,
            ) if self
                .hooks
                .refuses_cancellation(s, a, a.step + 1 == self.shapes.len()) =>
            {
                // The cancellation cannot happen any more (for CreateOrder: the parcel was picked
                // up): a cancellation of a completed saga loses, the order keeps its status.
                row.outcome = "failed";
                row.error_class = Some(*class);
                row.error = Some(detail.clone());
                row.downstream_status = *status;
                fx.push(Effect::History(row));
                self.refuse_cancellation(s, name, *class, detail, &mut fx);
            }
            (Outcome::Transient { .. }, _) | (Outcome::Refused { .. }, Kind::Compensation) => {
                let (class, detail, status, retry_after) = match &a.outcome {
                    Outcome::Transient {
                        class,
                        detail,
                        status,
                        retry_after,
                    } => (*class, detail, status, *retry_after),
                    // Compensations must eventually succeed: a refusal is retried like a transient error.
                    Outcome::Refused {
                        class,
                        detail,
                        status,
                        ..
                    } => (*class, detail, status, None),
                    _ => unreachable!("matched above"),
                };
                row.error_class = Some(class);
                row.error = Some(detail.clone());
                row.downstream_status = *status;
                s.last_error = Some(detail.clone());
                s.last_error_class = Some(class);
                if a.number < policy.max_attempts {
                    row.outcome = "retry_scheduled";
                    fx.push(Effect::History(row));
                    let computed = policy.delay_after(a.number, self.retry_scale, jitter_unit);
                    let mut delay = retry_after.map_or(computed, |ra| ra.max(computed));
                    // An action never waits past the saga's deadline (a Retry-After of a day
                    // would): it wakes just after it, and the boundary check compensates.
                    if a.kind == Kind::Action && s.state == SagaState::Running {
                        let until_deadline = s.deadline_at + Duration::from_millis(1) - now;
                        if until_deadline < delay {
                            delay = until_deadline.try_into().unwrap_or(Duration::ZERO);
                        }
                    }
                    s.next_attempt_at = Some(now + delay);
                    fx.push(saga_event(
                        "RetryScheduled",
                        json!({"step": name, "kind": a.kind.as_str(), "attempt": a.number, "errorClass": class, "error": detail, "delayMs": delay.as_millis() as u64}),
                    ));
                } else {
                    row.outcome = "failed";
                    fx.push(Effect::History(row));
                    let why = format!("{name} failed after {} attempts: {detail}", a.number);
                    match a.kind {
                        Kind::Action => {
                            fx.push(saga_event("StepFailed", json!({"step": name, "attempt": a.number, "errorClass": class, "error": detail})));
                            // The call may have taken effect before failing: undo this step too.
                            self.fail_forward(s, a.step, class, &why, None, true, now, &mut fx);
                        }
                        Kind::Compensation => self.get_stuck(s, class, &why, &mut fx),
                    }
                }
            }
        }
        fx
    }

    #[allow(clippy::too_many_arguments)]
    fn fail_forward(
        &self,
        s: &mut Saga,
        step: usize,
        class: FailureClass,
        detail: &str,
        refusal: Option<Value>,
        may_have_effect: bool,
        now: OffsetDateTime,
        fx: &mut Vec<Effect>,
    ) {
        s.failure = Some(Failure {
            class,
            detail: detail.into(),
            step: self.shapes[step].action.into(),
            refusal,
            after_completion: false,
        });
        s.last_error = Some(detail.into());
        s.last_error_class = Some(class);
        let undo_this = may_have_effect && !self.shapes[step].local_action;
        let from = if undo_this {
            Some(step)
        } else {
            step.checked_sub(1)
        };
        self.begin_compensation(s, from, now, fx);
    }

    fn begin_compensation(
        &self,
        s: &mut Saga,
        from: Option<usize>,
        now: OffsetDateTime,
        fx: &mut Vec<Effect>,
    ) {
        let f = s.failure.clone();
        fx.push(saga_event(
            "CompensationStarted",
            json!({"fromStep": from.map(|i| self.shapes[i].compensation), "errorClass": f.as_ref().map(|f| f.class), "reason": f.as_ref().map(|f| f.detail.clone())}),
        ));
        s.state = SagaState::Compensating;
        s.attempt = 0;
        s.next_attempt_at = Some(now);
        match from {
            Some(i) => s.step = i,
            None => {
                s.step = 0;
                self.finish_compensation(s, fx);
            }
        }
    }

    fn complete(&self, s: &mut Saga, fx: &mut Vec<Effect>) {
        s.state = SagaState::Completed;
        s.next_attempt_at = None;
        s.step = self.shapes.len();
        let answer = self.hooks.completed(s, fx);
        fx.push(saga_event("SagaCompleted", json!({})));
        fx.push(Effect::Finished { answer });
    }

    fn finish_compensation(&self, s: &mut Saga, fx: &mut Vec<Effect>) {
        let failure = s.failure.clone().unwrap_or(Failure {
            class: FailureClass::Unknown,
            detail: "compensated".into(),
            step: String::new(),
            refusal: None,
            after_completion: false,
        });
        let cancelled = failure.class == FailureClass::Cancelled;
        s.state = if cancelled {
            SagaState::Compensated
        } else {
            SagaState::Failed
        };
        s.next_attempt_at = None;
        s.step = 0;
        let answer = self.hooks.compensation_finished(s, &failure, fx);
        fx.push(saga_event(
            if cancelled {
                "SagaCompensated"
            } else {
                "SagaFailed"
            },
            json!({"errorClass": failure.class, "reason": failure.detail}),
        ));
        fx.push(Effect::Finished { answer });
    }

    /// A cancellation of a completed saga refused downstream (for CreateOrder: by the shipper):
    /// back to `completed` with the order as it is (confirmed, or whatever the tracking events made
    /// it), no `OrderCancelled`; waiters learn it (the cancel answers 409).
    fn refuse_cancellation(
        &self,
        s: &mut Saga,
        name: &str,
        class: FailureClass,
        detail: &str,
        fx: &mut Vec<Effect>,
    ) {
        let reason = s.failure.as_ref().map(|f| f.detail.clone());
        s.state = SagaState::Completed;
        s.step = self.shapes.len();
        s.attempt = 0;
        s.next_attempt_at = None;
        s.failure = None;
        s.cancel_requested = None;
        s.last_error = Some(format!("the cancellation was refused by the shipper: {detail}"));
        s.last_error_class = Some(FailureClass::CancelRefused);
        fx.push(Effect::ClearCancelRequest);
        fx.push(saga_event(
            "CancellationRefused",
            json!({"step": name, "errorClass": class, "error": detail, "reason": reason}),
        ));
        fx.push(Effect::Finished { answer: None });
    }

    fn get_stuck(&self, s: &mut Saga, class: FailureClass, why: &str, fx: &mut Vec<Effect>) {
        s.state = SagaState::Stuck;
        s.next_attempt_at = None;
        s.last_error = Some(why.into());
        s.last_error_class = Some(class);
        fx.push(saga_event(
            "SagaStuck",
            json!({"step": self.shapes[s.step].compensation, "errorClass": class, "reason": why}),
        ));
        fx.push(Effect::Finished { answer: None });
    }

    /// The name ops see as the saga's step: the action (running) or compensation (compensating,
    /// stuck) that runs next; for a finished saga, the action that failed, or the last one.
    pub fn step_name(&self, s: &Saga) -> &'static str {
        let last = self.shapes.len() - 1;
        match s.state {
            SagaState::Running => self.shapes[s.step.min(last)].action,
            SagaState::Compensating | SagaState::Stuck => self.shapes[s.step.min(last)].compensation,
            SagaState::Completed => self.shapes[last].action,
            SagaState::Failed | SagaState::Compensated => s
                .failure
                .as_ref()
                .and_then(|f| self.shapes.iter().find(|sh| sh.action == f.step))
                .map_or(self.shapes[0].action, |sh| sh.action),
        }
    }
}

/// Formats money with exactly two decimal places.
pub fn money(d: Decimal) -> String {
    let mut d = d.round_dp(2);
    d.rescale(2);
    d.to_string()
}

/// Formats a timestamp as RFC 3339.
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn saga_event(event_type: &'static str, data: Value) -> Effect {
    Effect::Event {
        stream: Stream::Saga,
        event_type,
        data,
    }
}

/// An event for the order's topic.
pub fn order_event(event_type: &'static str, data: Value) -> Effect {
    Effect::Event {
        stream: Stream::Order,
        event_type,
        data,
    }
}
