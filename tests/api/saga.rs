//! The saga engine under concurrency: several engines on one database, and a worker whose lease
//! was taken over.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use crate::support::{spawn_app_with_flags, test_config};
use ostore_orders::orders::validate::Line;
use ostore_orders::saga::engine::{Applied, Engine};
use ostore_orders::saga::store::NewSaga;

async fn second_engine(
    app: &crate::support::TestApp,
    drive: bool,
    extra: &[&str],
) -> (Engine, tokio_util::sync::CancellationToken) {
    let url = app
        .db
        .connect_options()
        .get_database()
        .map(|d| format!("postgres://postgres@127.0.0.1:5432/{d}"))
        .unwrap();
    let mut flags = vec![
        "--catalog-url",
        &app.catalog_url,
        "--shipments-url",
        &app.shipments_url,
        "--saga-retry-scale",
        "0.01",
    ];
    flags.extend_from_slice(extra);
    let cfg = Arc::new(test_config(&url, &flags));
    let pool = ostore_orders::db::connect_lazy(&url, 8).unwrap();
    let engine = ostore_orders::app::build_engine(&cfg, pool, drive).unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    engine.start(&tokio_util::task::TaskTracker::new(), shutdown.clone());
    (engine, shutdown)
}

fn new_saga(user_id: i32, key: &str) -> NewSaga {
    NewSaga {
        saga_id: Uuid::now_v7(),
        user_id,
        idempotency_key: key.into(),
        request_hash: vec![1],
        input: ostore_orders::orders::saga::input(&[Line {
            product_id: 1,
            quantity: 1,
        }]),
        trace: Default::default(),
        saga_type: "create_order".into(),
        version: 1,
        deadline: Duration::from_secs(600),
        first_step: "reserve_inventory".into(),
    }
}

#[tokio::test]
async fn two_engines_on_one_database_run_each_step_once_per_saga() {
    // Each worker drives at most 16 sagas at a time, so neither can take every saga at once.
    let app = spawn_app_with_flags(&["--saga-max-in-flight", "16"]).await;
    app.product(1, 1000, "1.00");
    let (uid, _) = app.customer("two@example.com").await;
    let (b, stop_b) = second_engine(&app, true, &["--saga-max-in-flight", "16"]).await;
    // A creator that does not drive: every saga is left for the two workers' pollers.
    let (creator, stop_c) = second_engine(&app, false, &[]).await;
    let creates = (0..200).map(|i| creator.create(new_saga(uid, &format!("k{i}"))));
    for r in futures::future::join_all(creates).await {
        r.unwrap();
    }
    app.eventually_eq(
        "select count(*)::text from sagas where state = 'completed'",
        "200",
        60,
    )
    .await;
    let dup: i64 = app
        .count("select count(*) from (select saga_id, step from saga_steps where outcome = 'succeeded' group by 1, 2 having count(*) > 1) d")
        .await;
    assert_eq!(dup, 0, "a step succeeded twice for some saga");
    assert_eq!(
        app.count("select count(*) from saga_steps where outcome = 'succeeded'")
            .await,
        600
    );
    let workers: Vec<String> = sqlx::query_scalar("select distinct worker from saga_steps")
        .fetch_all(&app.db)
        .await
        .unwrap();
    let workers: HashSet<String> = workers.into_iter().collect();
    assert!(
        workers.contains(b.worker_id()) && workers.contains(app.engine.worker_id()),
        "{workers:?}"
    );
    let res = app.reservations().await;
    assert_eq!(res.len(), 200);
    assert!(
        res.iter()
            .all(|r| r["calls"].as_object().unwrap().values().all(|c| c == 1))
    );
    assert_eq!(app.sim_shipments().await.len(), 200);
    stop_b.cancel();
    stop_c.cancel();
}

#[tokio::test]
async fn a_worker_whose_lease_was_taken_over_cannot_commit() {
    // The app's own poller sleeps; this test decides who claims when.
    let app = spawn_app_with_flags(&["--saga-poll-interval-ms", "600000"]).await;
    app.product(1, 10, "1.00");
    let (uid, _) = app.customer("lease@example.com").await;
    let (creator, stop_c) = second_engine(&app, false, &[]).await;
    let (stalled, stop_s) = second_engine(&app, false, &[]).await;
    creator.create(new_saga(uid, "k")).await.unwrap();
    // The stalled worker claims the saga and runs its first call, then pauses past its lease.
    let mut claimed = stalled.claim(10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    let saga = claimed.remove(0);
    let attempt = stalled.attempt(&saga).await.expect("a remote step is due");
    app.exec("update sagas set lease_expires_at = now() - interval '1 second'")
        .await;
    // Another worker takes it over and finishes it.
    app.engine.run_due_once().await.unwrap();
    app.eventually_eq("select state from sagas", "completed", 10)
        .await;
    let before: i64 = app.count("select count(*) from saga_steps").await;
    let outbox_before: i64 = app.count("select count(*) from outbox").await;
    // The stalled worker wakes up: its write is fenced off, nothing changes.
    let r = stalled.apply(saga, Some(attempt)).await.unwrap();
    assert!(matches!(r, Applied::Fenced), "{r:?}");
    assert_eq!(app.count("select count(*) from saga_steps").await, before);
    assert_eq!(app.count("select count(*) from outbox").await, outbox_before);
    assert_eq!(
        app.reservations().await.len(),
        1,
        "the reservation was made once, whoever called"
    );
    let res = &app.reservations().await[0];
    assert_eq!(
        res["calls"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_i64().unwrap())
            .sum::<i64>(),
        2
    );
    stop_c.cancel();
    stop_s.cancel();
}

/// Sagas that reach `persist_order` in the same shared commit write their orders in one statement:
/// each order still gets exactly its own lines, prices and total, and an order whose total does
/// not fit is refused without touching the others.
#[tokio::test]
async fn orders_persisted_in_one_shared_commit_each_get_their_own_lines_and_total() {
    use serde_json::json;
    let app = crate::support::spawn_app().await;
    for (id, price) in [
        (1, "1.50"),
        (2, "2.25"),
        (3, "10.00"),
        (4, "0.99"),
        (9, "99999999.99"),
    ] {
        app.product(id, 1000, price);
    }
    // Every reservation answers after the same delay, so their outcomes reach the committer
    // together and the orders are persisted by one call of the step.
    app.catalog_faults(json!({"latencyMs": 300, "endpoint": "reserve"}))
        .await;
    let mut customers = Vec::new();
    for i in 0..12 {
        customers.push(app.customer(&format!("batch{i}@example.com")).await.1);
    }
    let lines = |i: i64| {
        if i % 6 == 5 {
            json!([{"productID": 1, "quantity": 1}, {"productID": 9, "quantity": 2}])
        } else {
            json!([{"productID": 1 + i % 4, "quantity": 1 + i}, {"productID": 1 + (i + 1) % 4, "quantity": 2}])
        }
    };
    let places = customers
        .iter()
        .enumerate()
        .map(|(i, token)| app.place(token, "batch", lines(i as i64)));
    let answers = futures::future::join_all(places).await;
    let price = |p: i64| {
        ["1.50", "2.25", "10.00", "0.99"][(p - 1) as usize]
            .parse::<rust_decimal::Decimal>()
            .unwrap()
    };
    for (i, r) in answers.into_iter().enumerate() {
        let i = i as i64;
        if i % 6 == 5 {
            assert_eq!(r.status(), 422, "order {i}: the total does not fit");
            continue;
        }
        assert_eq!(r.status(), 201, "order {i}");
        let body: serde_json::Value = r.json().await.unwrap();
        let id = body["orderID"].as_i64().unwrap();
        let got: serde_json::Value = app
            .get(&format!("/orders/{id}"), Some(&customers[i as usize]))
            .await
            .json()
            .await
            .unwrap();
        let want: Vec<(i64, i64, rust_decimal::Decimal)> = lines(i)
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                let p = l["productID"].as_i64().unwrap();
                (p, l["quantity"].as_i64().unwrap(), price(p))
            })
            .collect();
        let items: Vec<(i64, i64, rust_decimal::Decimal)> = got["orderItems"]
            .as_array()
            .unwrap()
            .iter()
            .map(|it| {
                (
                    it["productID"].as_i64().unwrap(),
                    it["quantity"].as_i64().unwrap(),
                    it["price"].as_str().unwrap().parse().unwrap(),
                )
            })
            .collect();
        assert_eq!(items, want, "order {i}'s lines");
        let total: rust_decimal::Decimal = want
            .iter()
            .map(|(_, q, p)| p * rust_decimal::Decimal::from(*q))
            .sum();
        assert_eq!(
            got["totalAmount"]
                .as_str()
                .unwrap()
                .parse::<rust_decimal::Decimal>()
                .unwrap(),
            total,
            "order {i}'s total"
        );
        assert_eq!(got["status"], "confirmed");
    }
    assert_eq!(app.count("select count(*) from order_items").await, 10 * 2);
    // The orders were persisted together: history rows of one call share their start.
    let shared = app
        .count(
            "select coalesce(max(n), 0) from (select count(*) n from saga_steps
              where step = 'persist_order' group by started_at) c",
        )
        .await;
    assert!(shared >= 2, "no two orders were persisted by one call ({shared})");
}

/// The functions a shared commit (and the tracking consumer's batch) calls keep their plans for
/// the session, and those plans can only look rows up by key: a generic plan made while a table
/// was small would otherwise scan it whole for as long as the session lives, and a custom plan is
/// made again at every call (docs/performance.md, findings 8, 20 and 30). A migration that
/// recreates one of them without its settings fails here.
#[tokio::test]
async fn the_commit_functions_plan_once_per_session_and_only_by_key() {
    let app = crate::support::spawn_app().await;
    let functions = [
        "saga_update_many",
        "order_persist_many",
        "order_confirm_many",
        "order_status_many",
    ];
    for name in functions {
        let config: Option<Vec<String>> =
            sqlx::query_scalar("select proconfig from pg_proc where proname = $1")
                .bind(name)
                .fetch_optional(&app.db)
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("function {name} is missing"));
        let config = config.unwrap_or_default();
        for setting in [
            "plan_cache_mode=force_generic_plan",
            "enable_seqscan=off",
            "enable_hashjoin=off",
            "enable_mergejoin=off",
        ] {
            assert!(
                config.iter().any(|c| c == setting),
                "{name} runs without {setting}: {config:?}"
            );
        }
    }
}

/// Autovacuum's `ANALYZE` of the sagas and the outbox computes no statistics for the columns that
/// hold documents (migration 0020): their JSON cost a core for a second a minute under load, and
/// no statement filters, joins or sorts on them. The other columns keep theirs, sampled for a
/// statistics target of 10 (migration 0021).
#[tokio::test]
async fn analyze_keeps_no_statistics_for_the_document_columns() {
    let app = crate::support::spawn_app().await;
    app.product(1, 10, "19.99");
    let (_, token) = app.customer("stats@example.com").await;
    for k in ["k-1", "k-2", "k-3"] {
        let r = app
            .place(&token, k, serde_json::json!([{"productID": 1, "quantity": 1}]))
            .await;
        assert_eq!(r.status(), 201);
    }
    app.exec("analyze sagas, outbox").await;
    let columns: Vec<(String, String)> = sqlx::query_as(
        "select tablename::text, attname::text from pg_stats
          where schemaname = current_schema() and tablename in ('sagas', 'outbox')",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    let has = |t: &str, c: &str| columns.iter().any(|(tt, cc)| tt == t && cc == c);
    const SAGA_DOCUMENTS: [&str; 6] = [
        "input",
        "data",
        "failure",
        "last_error",
        "answer",
        "trace_context",
    ];
    const OUTBOX_DOCUMENTS: [&str; 2] = ["payload", "headers"];
    for c in SAGA_DOCUMENTS {
        assert!(!has("sagas", c), "statistics for sagas.{c}");
    }
    for c in OUTBOX_DOCUMENTS {
        assert!(!has("outbox", c), "statistics for outbox.{c}");
    }
    for (t, c) in [("sagas", "state"), ("sagas", "created_at"), ("outbox", "topic")] {
        assert!(has(t, c), "no statistics for {t}.{c}: {columns:?}");
    }
    // Migration 0021: every other column of the tables each order writes samples for a target of
    // 10 (ANALYZE reads 300 rows per unit of the largest target), none is left at the default.
    let targets: Vec<(String, String, i32)> = sqlx::query_as(
        "select c.relname::text, a.attname::text, a.attstattarget::int
           from pg_attribute a join pg_class c on c.oid = a.attrelid
          where c.relname in ('sagas', 'saga_steps', 'outbox', 'orders', 'order_items', 'idempotency_keys')
            and c.relnamespace = current_schema()::regnamespace
            and a.attnum > 0 and not a.attisdropped",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert!(targets.len() > 40, "{targets:?}");
    for (t, c, target) in &targets {
        let documents = (t == "sagas" && SAGA_DOCUMENTS.contains(&c.as_str()))
            || (t == "outbox" && OUTBOX_DOCUMENTS.contains(&c.as_str()));
        let wanted = if documents { 0 } else { 10 };
        assert_eq!(*target, wanted, "statistics target of {t}.{c}");
    }
}
