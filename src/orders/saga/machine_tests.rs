//! The machine's rules as CreateOrder runs them: its steps' shapes and its hooks, on a saga in
//! memory (no I/O). The engine's own test with another saga type: `tests/api/toy_saga.rs`.

use std::collections::HashMap;
use std::time::Duration;

use rust_decimal::Decimal;
use serde_json::{Value, json};
use time::OffsetDateTime;
use uuid::Uuid;

use super::steps::{CREATE_ORDER, create_order_impls};
use super::{CreateOrder, CreateOrderData, OrderChange, Output, input};
use crate::downstream::contract::{Reservation, ReservedItem, Shipment};
use crate::orders::OrderStatus;
use crate::orders::validate::Line;
use crate::saga::definition::SagaDef;
use crate::saga::failure::Downstream;
use crate::saga::machine::*;

fn succeeded(o: Output) -> Outcome {
    Outcome::Succeeded(o.into())
}

fn with_data(s: &mut Saga, f: impl FnOnce(&mut CreateOrderData)) {
    let mut d = CreateOrderData::of(s);
    f(&mut d);
    s.data = d.to_value();
}

fn def() -> SagaDef {
    SagaDef::load(
        super::steps::CREATE_ORDER_FILE,
        super::steps::CREATE_ORDER_TOML,
        "create_order",
        &create_order_impls(),
    )
    .unwrap()
}

fn machine(d: &SagaDef) -> Machine<'_> {
    Machine {
        def: d,
        shapes: &CREATE_ORDER,
        hooks: &CreateOrder,
        retry_scale: 1.0,
    }
}

fn saga() -> Saga {
    let now = OffsetDateTime::now_utc();
    Saga {
        id: Uuid::now_v7(),
        order_id: Some(7),
        user_id: 3,
        fence: 1,
        state: SagaState::Running,
        step: 0,
        attempt: 0,
        input: input(&[Line {
            product_id: 1,
            quantity: 2,
        }]),
        data: json!({}),
        failure: None,
        cancel_requested: None,
        answered_pending: false,
        trace: HashMap::new(),
        deadline_at: now + Duration::from_secs(600),
        next_attempt_at: Some(now),
        created_at: now,
        last_error: None,
        last_error_class: None,
    }
}

fn attempt(step: usize, kind: Kind, number: u32, outcome: Outcome) -> Attempt {
    Attempt {
        step,
        kind,
        number,
        started_at: OffsetDateTime::now_utc(),
        idempotency_key: Some("k".into()),
        downstream_status: None,
        duration: None,
        outcome,
    }
}

fn transient() -> Outcome {
    Outcome::Transient {
        class: FailureClass::Downstream(Downstream::Http5xx),
        detail: "503".into(),
        status: Some(503),
        retry_after: None,
    }
}

fn reservation() -> Outcome {
    succeeded(Output::Reservation(Reservation {
        reservation_id: "r".into(),
        items: vec![ReservedItem {
            product_id: 1,
            quantity: 2,
            unit_price: Decimal::new(250, 2),
            currency: "USD".into(),
        }],
    }))
}

fn events(fx: &[Effect]) -> Vec<&'static str> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Event { event_type, .. } => Some(*event_type),
            _ => None,
        })
        .collect()
}

fn history(fx: &[Effect]) -> Vec<&HistoryRow> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::History(h) => Some(h),
            _ => None,
        })
        .collect()
}

#[test]
fn every_attempt_records_its_downstream_status_and_duration_successes_included() {
    let d = def();
    let m = machine(&d);
    let mut s = saga();
    let now = OffsetDateTime::now_utc();
    let mut failed = attempt(0, Kind::Action, 1, transient());
    failed.downstream_status = Some(503);
    failed.duration = Some(Duration::from_millis(7));
    let fx = m.record(&mut s, &failed, now, 0.5);
    let rows = history(&fx);
    assert_eq!(
        (rows[0].downstream_status, rows[0].duration_ms),
        (Some(503), Some(7))
    );
    let mut ok = attempt(0, Kind::Action, 2, reservation());
    ok.downstream_status = Some(201);
    ok.duration = Some(Duration::from_micros(12_400));
    let fx = m.record(&mut s, &ok, now, 0.5);
    let rows = history(&fx);
    assert_eq!(rows[0].outcome, "succeeded");
    assert_eq!(
        (rows[0].downstream_status, rows[0].duration_ms),
        (Some(201), Some(12))
    );
}

#[test]
fn a_transient_failure_schedules_a_retry_until_the_policy_is_exhausted() {
    let d = def();
    let m = machine(&d);
    let mut s = saga();
    let now = OffsetDateTime::now_utc();
    let fx = m.record(&mut s, &attempt(0, Kind::Action, 1, transient()), now, 0.5);
    assert_eq!(s.state, SagaState::Running);
    assert_eq!(s.next_attempt_at, Some(now + Duration::from_millis(200)));
    assert_eq!(events(&fx), ["RetryScheduled"]);
    // A longer Retry-After wins over the computed delay.
    let mut ra = transient();
    if let Outcome::Transient { retry_after, .. } = &mut ra {
        *retry_after = Some(Duration::from_secs(3));
    }
    m.record(&mut s, &attempt(0, Kind::Action, 2, ra), now, 0.5);
    assert_eq!(s.next_attempt_at, Some(now + Duration::from_secs(3)));
    // The last allowed attempt fails: compensation includes the step itself.
    m.record(&mut s, &attempt(0, Kind::Action, 8, transient()), now, 0.5);
    assert_eq!((s.state, s.step), (SagaState::Compensating, 0));
    assert_eq!(m.next(&s, now), Next::Remote(0, Kind::Compensation));
}

#[test]
fn a_reservation_moves_to_the_local_persist_step_and_a_stock_refusal_fails_without_compensation() {
    let d = def();
    let m = machine(&d);
    let now = OffsetDateTime::now_utc();
    let mut s = saga();
    m.record(&mut s, &attempt(0, Kind::Action, 1, reservation()), now, 0.5);
    assert_eq!(m.next(&s, now), Next::Local(1, Kind::Action));

    let mut s = saga();
    let refused = Outcome::Refused {
        class: FailureClass::InsufficientStock,
        detail: "no".into(),
        status: Some(409),
        refusal: Some(json!([])),
    };
    let fx = m.record(&mut s, &attempt(0, Kind::Action, 1, refused), now, 0.5);
    assert_eq!(s.state, SagaState::Failed);
    assert!(
        fx.contains(&OrderChange::Delete.effect()),
        "a synchronous stock-out places no order"
    );
    let answer = fx.iter().find_map(|e| match e {
        Effect::Finished { answer } => answer.clone(),
        _ => None,
    });
    assert_eq!(answer.unwrap()["status"], 409);
}

#[test]
fn a_stock_refusal_after_a_202_rejects_the_order_instead_of_deleting_it() {
    let d = def();
    let m = machine(&d);
    let mut s = saga();
    s.answered_pending = true;
    let refused = Outcome::Refused {
        class: FailureClass::InsufficientStock,
        detail: "no".into(),
        status: Some(409),
        refusal: None,
    };
    let fx = m.record(
        &mut s,
        &attempt(0, Kind::Action, 1, refused),
        OffsetDateTime::now_utc(),
        0.5,
    );
    assert!(
        fx.contains(
            &OrderChange::Status {
                to: OrderStatus::Rejected,
                reason: Some("some products are not available in the requested quantity".into())
            }
            .effect()
        )
    );
    assert!(events(&fx).contains(&"OrderRejected"));
}

#[test]
fn a_shipment_refusal_compensates_in_reverse_order_and_ends_failed() {
    let d = def();
    let m = machine(&d);
    let now = OffsetDateTime::now_utc();
    let mut s = saga();
    s.step = 2;
    with_data(&mut s, |d| d.items = Some(vec![]));
    let refused = Outcome::Refused {
        class: FailureClass::Downstream(Downstream::Http4xx),
        detail: "422".into(),
        status: Some(422),
        refusal: None,
    };
    m.record(&mut s, &attempt(2, Kind::Action, 1, refused), now, 0.5);
    // The shipment was refused, so its compensation is skipped: cancel_order (local) is next.
    assert_eq!(
        (s.state, m.next(&s, now)),
        (SagaState::Compensating, Next::Local(1, Kind::Compensation))
    );
    let fx = m.record(
        &mut s,
        &attempt(1, Kind::Compensation, 1, succeeded(Output::OrderCancelled(true))),
        now,
        0.5,
    );
    assert!(events(&fx).contains(&"OrderCancelled"));
    assert_eq!(m.next(&s, now), Next::Remote(0, Kind::Compensation));
    let fx = m.record(
        &mut s,
        &attempt(0, Kind::Compensation, 1, Outcome::Succeeded(Value::Null)),
        now,
        0.5,
    );
    assert_eq!(s.state, SagaState::Failed);
    assert!(events(&fx).contains(&"SagaFailed"));
    assert_eq!(m.step_name(&s), "create_shipment");
}

#[test]
fn an_exhausted_compensation_leaves_the_saga_stuck() {
    let d = def();
    let m = machine(&d);
    let mut s = saga();
    s.state = SagaState::Compensating;
    let fx = m.record(
        &mut s,
        &attempt(0, Kind::Compensation, 12, transient()),
        OffsetDateTime::now_utc(),
        0.5,
    );
    assert_eq!(s.state, SagaState::Stuck);
    assert_eq!(s.next_attempt_at, None);
    assert!(
        s.last_error
            .as_deref()
            .unwrap()
            .contains("release_reservation failed after 12 attempts")
    );
    assert!(events(&fx).contains(&"SagaStuck"));
    assert_eq!(m.step_name(&s), "release_reservation");
}

#[test]
fn a_retry_after_beyond_the_deadline_wakes_the_saga_at_its_deadline() {
    let d = def();
    let m = machine(&d);
    let now = OffsetDateTime::now_utc();
    let mut s = saga();
    s.deadline_at = now + Duration::from_secs(600);
    let mut ra = transient();
    if let Outcome::Transient { retry_after, .. } = &mut ra {
        *retry_after = Some(Duration::from_secs(24 * 3600));
    }
    m.record(&mut s, &attempt(0, Kind::Action, 1, ra), now, 0.5);
    let next = s.next_attempt_at.unwrap();
    assert!(
        next > s.deadline_at && next <= s.deadline_at + Duration::from_millis(1),
        "woken at the deadline, not a day later: {next} vs {}",
        s.deadline_at
    );
    // Then the boundary check compensates.
    m.check_boundary(&mut s, next);
    assert_eq!(s.failure.as_ref().unwrap().class, FailureClass::DeadlineExceeded);
}

#[test]
fn cancellation_and_deadline_turn_a_running_saga_at_the_boundary() {
    let d = def();
    let m = machine(&d);
    let now = OffsetDateTime::now_utc();
    let mut s = saga();
    s.step = 2;
    s.cancel_requested = Some("customer".into());
    m.check_boundary(&mut s, now);
    // The remote step in progress may have taken effect with no attempt recorded (its commit
    // lost): its compensation runs too.
    assert_eq!((s.state, s.step), (SagaState::Compensating, 2));
    assert_eq!(s.failure.as_ref().unwrap().class, FailureClass::Cancelled);

    let mut s = saga();
    s.deadline_at = now - Duration::from_secs(1);
    m.check_boundary(&mut s, now);
    assert_eq!(s.failure.as_ref().unwrap().class, FailureClass::DeadlineExceeded);
    assert_eq!(
        (s.state, s.step),
        (SagaState::Compensating, 0),
        "a reservation may exist even without a recorded attempt: release it"
    );

    // Cancelled while its last step was in flight: the completed saga compensates everything.
    let mut s = saga();
    s.step = 2;
    s.cancel_requested = Some("customer".into());
    with_data(&mut s, |d| {
        d.shipment = Some(Shipment {
            shipment_id: "shp".into(),
            status: "created".into(),
        })
    });
    m.record(
        &mut s,
        &attempt(
            2,
            Kind::Action,
            1,
            succeeded(Output::Shipment(Shipment {
                shipment_id: "shp".into(),
                status: "created".into(),
            })),
        ),
        now,
        0.5,
    );
    assert_eq!(s.state, SagaState::Completed);
    m.check_boundary(&mut s, now);
    assert_eq!((s.state, s.step), (SagaState::Compensating, 2));
}

fn cancelling_a_completed_saga() -> Saga {
    let mut s = saga();
    s.state = SagaState::Compensating;
    s.step = 2;
    with_data(&mut s, |d| d.items = Some(vec![]));
    with_data(&mut s, |d| {
        d.shipment = Some(Shipment {
            shipment_id: "shp".into(),
            status: "created".into(),
        })
    });
    s.cancel_requested = Some("by the customer".into());
    s.failure = Some(Failure {
        class: FailureClass::Cancelled,
        detail: "cancelled: by the customer".into(),
        step: "create_shipment".into(),
        refusal: None,
        after_completion: true,
    });
    s
}

fn picked_up() -> Outcome {
    Outcome::Refused {
        class: FailureClass::Downstream(Downstream::Http4xx),
        detail: "HTTP 409 Conflict: shipment is already picked_up".into(),
        status: Some(409),
        refusal: None,
    }
}

#[test]
fn a_shipper_refusing_a_customer_cancellation_returns_the_saga_to_completed() {
    let d = def();
    let m = machine(&d);
    let now = OffsetDateTime::now_utc();
    let mut s = cancelling_a_completed_saga();
    let fx = m.record(&mut s, &attempt(2, Kind::Compensation, 1, picked_up()), now, 0.5);
    assert_eq!(s.state, SagaState::Completed);
    assert_eq!(s.step, 3);
    assert_eq!(s.failure, None);
    assert_eq!(s.cancel_requested, None);
    assert_eq!(s.next_attempt_at, None);
    assert_eq!(s.last_error_class, Some(FailureClass::CancelRefused));
    assert_eq!(events(&fx), ["CancellationRefused"]);
    assert!(fx.contains(&Effect::ClearCancelRequest));
    assert!(fx.contains(&Effect::Finished { answer: None }));
    assert!(
        !fx.iter().any(|e| matches!(e, Effect::Hook(_))),
        "the order keeps its status: {fx:?}"
    );
    let row = fx.iter().find_map(|e| match e {
        Effect::History(h) => Some(h.clone()),
        _ => None,
    });
    assert_eq!(row.unwrap().outcome, "failed");
    // Nothing more to do, and no boundary check undoes it again.
    assert!(m.check_boundary(&mut s, now).is_empty());
    assert_eq!(m.next(&s, now), Next::Done);
    assert_eq!(m.step_name(&s), "create_shipment");
}

#[test]
fn other_compensation_refusals_are_still_retried() {
    let d = def();
    let m = machine(&d);
    let now = OffsetDateTime::now_utc();
    // A refusal that is not "can no longer be cancelled" (422) is retried.
    let mut s = cancelling_a_completed_saga();
    let refused = Outcome::Refused {
        class: FailureClass::Downstream(Downstream::Http4xx),
        detail: "422".into(),
        status: Some(422),
        refusal: None,
    };
    m.record(&mut s, &attempt(2, Kind::Compensation, 1, refused), now, 0.5);
    assert_eq!((s.state, s.step), (SagaState::Compensating, 2));
    // A cancellation while the order was pending (already cancelled for the customer) keeps
    // compensating: a 409 is retried and, exhausted, leaves the saga stuck for ops.
    let mut s = cancelling_a_completed_saga();
    s.failure.as_mut().unwrap().after_completion = false;
    let fx = m.record(&mut s, &attempt(2, Kind::Compensation, 1, picked_up()), now, 0.5);
    assert_eq!((s.state, s.step), (SagaState::Compensating, 2));
    assert_eq!(events(&fx), ["RetryScheduled"]);
}

#[test]
fn a_failure_reads_without_the_after_completion_flag() {
    let f: Failure =
        serde_json::from_value(json!({"class": "cancelled", "detail": "d", "step": "create_shipment"}))
            .unwrap();
    assert!(!f.after_completion);
    let f: Failure = serde_json::from_value(
        json!({"class": "cancelled", "detail": "d", "step": "create_shipment", "afterCompletion": true}),
    )
    .unwrap();
    assert!(f.after_completion);
    assert_eq!(serde_json::to_value(&f).unwrap()["afterCompletion"], true);
}

#[test]
fn money_has_exactly_two_places() {
    assert_eq!(money(Decimal::new(5, 0)), "5.00");
    assert_eq!(money(Decimal::new(59980, 3)), "59.98");
    assert_eq!(money(Decimal::new(1, 3)), "0.00");
}

#[test]
fn create_order_data_keeps_the_stored_field_names() {
    // `sagas.data` and `sagas.input` as earlier releases wrote them: the admin API, the console and
    // operators read these names.
    let stored = json!({
        "reservation": {"reservationID": "r", "items": [
            {"productID": 1, "quantity": 2, "unitPrice": "2.50", "currency": "USD"}]},
        "items": [{"orderItemID": 5, "productID": 1, "quantity": 2, "price": "2.50"}],
        "total": "5.00",
        "currency": "USD",
        "shipment": {"shipmentID": "shp", "status": "created"},
    });
    let mut s = saga();
    s.data = stored.clone();
    let d = CreateOrderData::of(&s);
    assert_eq!(d.items.as_ref().map(Vec::len), Some(1));
    assert_eq!(d.shipment.as_ref().map(|x| x.shipment_id.as_str()), Some("shp"));
    assert_eq!(d.to_value(), stored);
    assert_eq!(CreateOrderData::default().to_value(), json!({}));
    assert_eq!(s.input, json!({"items": [{"productID": 1, "quantity": 2}]}));
}
