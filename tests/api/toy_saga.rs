//! A second saga, defined here (its own TOML and three toy steps in a registry), run through the
//! same engine as CreateOrder: a happy path, a refusal whose compensations run in reverse order,
//! and a worker that dies mid-saga while another finishes it with no step effect done twice. The
//! engine knows neither saga by name: were it to dispatch CreateOrder's steps, these would fail.
//! The toy saga places no order: no order row is written for it, and its sagas name none.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::support::TestDb;
use ostore_orders::outbox::Topics;
use ostore_orders::saga::definition::{SagaDef, StepImpl};
use ostore_orders::saga::engine::{Engine, EngineConfig, SagaType};
use ostore_orders::saga::failure::Downstream;
use ostore_orders::saga::machine::{
    Attempt, Effect, Failure, FailureClass, Outcome, Saga, SagaHooks, SagaState,
};
use ostore_orders::saga::registry::{LocalRun, LocalStep, Registry, RemoteRun, RemoteStep};
use ostore_orders::saga::store::NewSaga;
use ostore_orders::saga::views;

const TOY_FILE: &str = "tests/api/toy_saga.toml";
const TOY_TOML: &str = include_str!("toy_saga.toml");
/// A transfer from this account is refused by `notify`.
const REFUSED_ACCOUNT: i32 = 13;

/// What the toy "downstream" does, shared by one engine's steps.
#[derive(Default)]
struct Control {
    /// `notify` hangs (until its task is dropped) instead of acting.
    hang_notify: AtomicBool,
    /// Signalled when a hanging `notify` has started.
    notify_entered: Notify,
}

/// A remote toy step: records its effect (one row per call that took effect) with its own pool.
struct Remote {
    name: &'static str,
    pool: PgPool,
    control: Arc<Control>,
}

impl RemoteStep for Remote {
    fn run<'a>(&'a self, saga: &'a Saga, _timeout: Duration) -> RemoteRun<'a> {
        Box::pin(async move {
            if self.name == "notify" {
                if self.control.hang_notify.load(Ordering::SeqCst) {
                    self.control.notify_entered.notify_one();
                    std::future::pending::<()>().await;
                }
                if saga.input["account"] == REFUSED_ACCOUNT {
                    return Outcome::Refused {
                        class: FailureClass::Downstream(Downstream::Http4xx),
                        detail: "the toy downstream refuses account 13".into(),
                        status: Some(422),
                        refusal: None,
                    };
                }
            }
            match effect(&mut self.pool.acquire().await.unwrap(), saga.id, self.name).await {
                Ok(()) => Outcome::Succeeded(Value::Null),
                Err(e) => Outcome::Transient {
                    class: FailureClass::Downstream(Downstream::Connect),
                    detail: e.to_string(),
                    status: None,
                    retry_after: None,
                },
            }
        })
    }
}

/// A local toy step: its effect commits with the transition that ran it.
struct Local(&'static str);

impl LocalStep for Local {
    fn run<'a>(&'a self, conn: &'a mut PgConnection, saga: &'a Saga) -> LocalRun<'a> {
        Box::pin(async move {
            effect(conn, saga.id, self.0).await?;
            Ok(Outcome::Succeeded(Value::Null))
        })
    }
}

async fn effect(conn: &mut PgConnection, saga_id: Uuid, name: &str) -> Result<(), sqlx::Error> {
    sqlx::query("insert into toy_effects (saga_id, name) values ($1, $2)")
        .bind(saga_id)
        .bind(name)
        .execute(conn)
        .await?;
    Ok(())
}

/// The toy saga has no order to change and no one to answer.
struct ToyHooks;

impl SagaHooks for ToyHooks {
    fn keep_output(&self, _: &mut Saga, _: &Value) {}
    fn compensated(&self, _: &Saga, _: &Value, _: &mut Vec<Effect>) {}
    fn completed(&self, _: &Saga, _: &mut Vec<Effect>) -> Option<Value> {
        None
    }
    fn compensation_finished(&self, _: &Saga, _: &Failure, _: &mut Vec<Effect>) -> Option<Value> {
        None
    }
    fn refuses_cancellation(&self, _: &Saga, _: &Attempt, _: bool) -> bool {
        false
    }
}

fn toy_def() -> SagaDef {
    let impls = [
        ("debit", "refund"),
        ("record", "unrecord"),
        ("notify", "unnotify"),
    ]
    .map(|(action, compensation)| StepImpl { action, compensation });
    SagaDef::load(TOY_FILE, TOY_TOML, "toy_transfer", &impls).unwrap()
}

fn toy_engine(pool: &PgPool, drive: bool, lease: Duration, control: Arc<Control>) -> Engine {
    let mut registry = Registry::new();
    for name in ["debit", "refund", "notify", "unnotify"] {
        registry.remote(
            name,
            Remote {
                name,
                pool: pool.clone(),
                control: control.clone(),
            },
        );
    }
    registry
        .local("record", Local("record"))
        .local("unrecord", Local("unrecord"));
    let mut cfg = EngineConfig::new(1.0);
    cfg.lease = lease;
    cfg.poll_interval = Duration::from_millis(50);
    cfg.drive = drive;
    let saga = SagaType {
        file: TOY_FILE.into(),
        def: toy_def(),
        registry,
        hooks: Arc::new(ToyHooks),
    };
    Engine::new(pool.clone(), saga, cfg, Topics::default()).unwrap()
}

async fn toy_db() -> (TestDb, PgPool, i32) {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    sqlx::query(
        "create table toy_effects (id bigserial primary key, saga_id uuid not null, name text not null)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let user: i32 = sqlx::query_scalar(
        "insert into users (email, password_hash, role) values ('toy@example.com', 'x', 'user') returning user_id",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    (db, pool, user)
}

fn transfer(engine: &Engine, user_id: i32, account: i32) -> NewSaga {
    let def = engine.definition();
    NewSaga {
        saga_id: Uuid::now_v7(),
        user_id,
        idempotency_key: Uuid::now_v7().to_string(),
        request_hash: vec![1],
        input: json!({"account": account, "amount": 1}),
        trace: Default::default(),
        saga_type: def.name.clone(),
        version: def.version as i32,
        deadline: Duration::from_secs(def.deadline_seconds),
        first_step: def.steps[0].name.clone(),
    }
}

async fn effects(pool: &PgPool, saga_id: Uuid) -> Vec<String> {
    sqlx::query_scalar("select name from toy_effects where saga_id = $1 order by id")
        .bind(saga_id)
        .fetch_all(pool)
        .await
        .unwrap()
}

async fn history(pool: &PgPool, saga_id: Uuid) -> Vec<(String, String)> {
    sqlx::query_as("select step, outcome from saga_steps where saga_id = $1 order by id")
        .bind(saga_id)
        .fetch_all(pool)
        .await
        .unwrap()
}

/// The toy saga wrote no order, and its sagas (and their idempotency records) name none.
async fn assert_no_order(pool: &PgPool) {
    let orders: i64 = sqlx::query_scalar("select count(*) from orders")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(orders, 0, "the toy saga creates no order row");
    let with_order: i64 = sqlx::query_scalar(
        "select (select count(*) from sagas where order_id is not null)
              + (select count(*) from idempotency_keys where order_id is not null)",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(with_order, 0, "the toy sagas name no order");
    let sagas: i64 = sqlx::query_scalar("select count(*) from sagas")
        .fetch_one(pool)
        .await
        .unwrap();
    assert!(sagas > 0, "the toy sagas exist");
}

async fn run_to_end(engine: &Engine, new: NewSaga) -> SagaState {
    let waiter = engine.waiter(new.saga_id);
    engine.create(new).await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), waiter)
        .await
        .expect("the toy saga finishes")
        .unwrap()
        .state
}

#[tokio::test]
async fn a_second_saga_type_runs_every_step_through_the_same_engine() {
    let (_db, pool, user) = toy_db().await;
    let engine = toy_engine(&pool, true, Duration::from_secs(5), Default::default());
    let shutdown = CancellationToken::new();
    engine.start(&TaskTracker::new(), shutdown.clone());
    let new = transfer(&engine, user, 1);
    let id = new.saga_id;
    assert_eq!(run_to_end(&engine, new).await, SagaState::Completed);
    assert_eq!(effects(&pool, id).await, ["debit", "record", "notify"]);
    let (state, step_name, saga_type): (String, String, String) =
        sqlx::query_as("select state, step_name, saga_type from sagas where saga_id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        (state.as_str(), step_name.as_str(), saga_type.as_str()),
        ("completed", "notify", "toy_transfer")
    );
    assert_no_order(&pool).await;
    // The operators' views show it with no order.
    let mut conn = pool.acquire().await.unwrap();
    let detail = views::get_saga(&mut conn, id).await.unwrap().expect("the saga");
    assert_eq!(detail.summary.order_id, None);
    let listed = views::list_sagas(&mut conn, &views::SagaFilter::default(), None, 10)
        .await
        .unwrap();
    assert!(listed.iter().any(|s| s.saga_id == id && s.order_id.is_none()));
    drop(conn);
    // Its events are keyed by the saga, with no order member.
    let keys: Vec<(String, Option<String>)> =
        sqlx::query_as("select message_key, payload->>'orderID' from outbox where payload->>'sagaID' = $1")
            .bind(id.to_string())
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(!keys.is_empty());
    assert!(
        keys.iter().all(|(k, o)| *k == id.to_string() && o.is_none()),
        "{keys:?}"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn a_refused_toy_step_compensates_the_steps_before_it_in_reverse_order() {
    let (_db, pool, user) = toy_db().await;
    let engine = toy_engine(&pool, true, Duration::from_secs(5), Default::default());
    let shutdown = CancellationToken::new();
    engine.start(&TaskTracker::new(), shutdown.clone());
    let new = transfer(&engine, user, REFUSED_ACCOUNT);
    let id = new.saga_id;
    assert_eq!(run_to_end(&engine, new).await, SagaState::Failed);
    // The refused notify took no effect, so it is not undone; record then debit are.
    assert_eq!(
        effects(&pool, id).await,
        ["debit", "record", "unrecord", "refund"]
    );
    let steps: Vec<String> = history(&pool, id).await.into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, ["debit", "record", "notify", "unrecord", "refund"]);
    let class: Option<String> = sqlx::query_scalar("select last_error_class from sagas where saga_id = $1")
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(class.as_deref(), Some("http_4xx"));
    assert_no_order(&pool).await;
    shutdown.cancel();
}

#[tokio::test]
async fn a_toy_saga_whose_worker_dies_mid_step_is_finished_by_another_with_each_effect_once() {
    let (_db, pool, user) = toy_db().await;
    let lease = Duration::from_millis(1500);
    // The first worker: its notify hangs, and its tasks are dropped there (a crash: nothing of
    // the attempt is written, the lease stays until it expires).
    let control = Arc::new(Control::default());
    control.hang_notify.store(true, Ordering::SeqCst);
    let first = toy_engine(&pool, false, lease, control.clone());
    let first_stop = CancellationToken::new();
    first.start(&TaskTracker::new(), first_stop.clone());
    let new = transfer(&first, user, 1);
    let id = new.saga_id;
    first.create(new).await.unwrap();
    let entered = control.notify_entered.notified();
    let driving = tokio::spawn({
        let first = first.clone();
        async move { first.run_due_once().await }
    });
    tokio::time::timeout(Duration::from_secs(10), entered)
        .await
        .expect("the first worker reaches notify");
    driving.abort();
    let _ = driving.await;
    first_stop.cancel();
    drop(first);
    assert_eq!(
        effects(&pool, id).await,
        ["debit", "record"],
        "notify hung before its effect"
    );

    // A second worker on the same database takes the saga over once the lease has expired.
    let second = toy_engine(&pool, true, lease, Default::default());
    let second_stop = CancellationToken::new();
    second.start(&TaskTracker::new(), second_stop.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let state: String = sqlx::query_scalar("select state from sagas where saga_id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
        if state == "completed" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the second worker finishes the saga: {state}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(effects(&pool, id).await, ["debit", "record", "notify"]);
    let history = history(&pool, id).await;
    assert_eq!(
        history
            .iter()
            .map(|(s, o)| format!("{s} {o}"))
            .collect::<Vec<_>>(),
        ["debit succeeded", "record succeeded", "notify succeeded"],
        "each step ran to an outcome once"
    );
    assert_no_order(&pool).await;
    second_stop.cancel();
}
