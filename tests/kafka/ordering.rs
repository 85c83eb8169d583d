//! Each order's events in commit order, whatever the relays and the writers' transactions do.

use std::collections::HashMap;
use std::time::Duration;

use crate::fixture::*;
use ostore_orders::outbox::relay::{self, RelayConfig};
use ostore_orders::outbox::{NewEvent, enqueue};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[tokio::test]
async fn two_relays_at_once_keep_each_orders_events_in_order() {
    let f = Fixture::new(12).await;
    let (pool, t) = (f.pool.clone(), f.topics());
    let (shutdown_a, shutdown_b) = (CancellationToken::new(), CancellationToken::new());

    // 500 orders, 3 events each, written by 5 concurrent writers in transactions of their own.
    let mut writers = Vec::new();
    for w in 0..5 {
        let (pool, topic) = (pool.clone(), t.order_events.clone());
        writers.push(tokio::spawn(async move {
            let mut expected: Vec<(i32, Uuid)> = Vec::new();
            for step in ["OrderCreated", "OrderConfirmed", "OrderStatusChanged"] {
                for order in (1 + w * 100)..=(100 + w * 100) {
                    expected.push((
                        order,
                        write_event(&pool, &topic, step, order, &HashMap::new()).await,
                    ));
                }
            }
            expected
        }));
    }
    // Relay A starts first, so it leads; B stands by.
    let relay_a = tokio::spawn(relay::run(
        pool.clone(),
        f.producer(),
        relay_config(),
        shutdown_a.clone(),
    ));
    eventually(Duration::from_secs(20), "relay A to publish", || async {
        count(
            &pool,
            "select count(*) from outbox where id <= outbox_published_through()",
        )
        .await
            > 0
    })
    .await;
    let relay_b = tokio::spawn(relay::run(
        pool.clone(),
        f.producer(),
        relay_config(),
        shutdown_b.clone(),
    ));
    // While rows are still being written, the leader stops and the standby takes over.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let published_by_a = count(
        &pool,
        "select count(*) from outbox where id <= outbox_published_through()",
    )
    .await;
    shutdown_a.cancel();
    relay_a.await.unwrap();
    assert!(
        published_by_a < 1500,
        "the failover happened too late to test anything"
    );
    let mut expected: HashMap<String, Vec<String>> = HashMap::new();
    for w in writers {
        for (order, id) in w.await.unwrap() {
            expected
                .entry(order.to_string())
                .or_default()
                .push(id.to_string());
        }
    }
    until_all_published(&pool, Duration::from_secs(60), "every row to be published").await;
    shutdown_b.cancel();
    relay_b.await.unwrap();

    let messages = read_topic(f.bootstrap(), &t.order_events, 1500).await;
    let by_key = first_occurrences_by_key(&messages);
    assert_eq!(by_key.len(), 500);
    for (order, ids) in &expected {
        assert_eq!(&by_key[order], ids, "events of order {order} out of order");
    }
}

/// The relay keeps a floor under its scan (rows known to be published); a row whose transaction
/// drew its id before later rows were published, and committed after them, is still published,
/// and before the later rows of its own order.
#[tokio::test]
async fn a_row_committed_late_below_published_rows_is_still_published_in_its_orders_order() {
    let f = Fixture::new(6).await;
    let (pool, t) = (f.pool.clone(), f.topics());
    let (shutdown, relay_task) = f.spawn_relay(relay_config());
    // Rows the relay published (the floor cannot pass the late row while it is open).
    let published = || async {
        count(
            &pool,
            "select coalesce(sum(published), 0)::bigint from outbox_relay_stats",
        )
        .await
    };
    for order in 1..=20 {
        write_event(&pool, &t.order_events, "OrderCreated", order, &HashMap::new()).await;
    }
    eventually(
        Duration::from_secs(20),
        "the first rows to be published",
        || async { published().await == 20 },
    )
    .await;
    // A transaction draws its outbox id and stays open…
    let mut late = pool.begin().await.unwrap();
    let event = NewEvent::new(
        &t.order_events,
        "OrderCreated",
        99,
        Some(Uuid::now_v7()),
        json!({"n": "late"}),
        &HashMap::new(),
    );
    let late_id = event.envelope.event_id.to_string();
    enqueue(&mut late, &[event]).await.unwrap();
    // …while other orders' rows are written and published, over many passes of the relay.
    for order in 21..=60 {
        write_event(&pool, &t.order_events, "OrderCreated", order, &HashMap::new()).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eventually(
        Duration::from_secs(20),
        "the later rows to be published",
        || async { published().await == 60 },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    late.commit().await.unwrap();
    let confirmed = write_event(&pool, &t.order_events, "OrderConfirmed", 99, &HashMap::new()).await;
    // Well inside the relay's safety-net rescan (RelayConfig::cleanup_interval, 60 s).
    until_all_published(&pool, Duration::from_secs(15), "the late row to be published").await;
    shutdown.cancel();
    relay_task.await.unwrap();
    let messages = read_topic(f.bootstrap(), &t.order_events, 62).await;
    let by_key = first_occurrences_by_key(&messages);
    assert_eq!(by_key["99"], vec![late_id, confirmed.to_string()]);
}

/// A transaction that took its xid after another one, drew its outbox id before the other's, and
/// runs on after the other committed: a relay snapshot then counts it neither completed nor in
/// progress (its xid is not below the snapshot's xmax, one past the newest completed xid), and
/// the floor must wait for it all the same. (The chaos suite lost a consumer transaction's first
/// rows this way, the floor passing them while the transaction was still writing.)
#[tokio::test]
async fn a_row_drawn_before_a_published_one_by_a_transaction_with_a_newer_xid_is_published() {
    let f = Fixture::new(6).await;
    let (pool, t) = (f.pool.clone(), f.topics());
    let xid = "select pg_current_xact_id()::text::bigint";
    let mut older = pool.begin().await.unwrap();
    let a: i64 = sqlx::query_scalar(xid).fetch_one(&mut *older).await.unwrap();
    let mut late = pool.begin().await.unwrap();
    let b: i64 = sqlx::query_scalar(xid).fetch_one(&mut *late).await.unwrap();
    assert!(b > a);
    let event = |order: i32, n: &str| {
        NewEvent::new(
            &t.order_events,
            "OrderCreated",
            order,
            Some(Uuid::now_v7()),
            json!({ "n": n }),
            &HashMap::new(),
        )
    };
    let late_event = event(7, "late");
    let late_id = late_event.envelope.event_id.to_string();
    enqueue(&mut late, &[late_event]).await.unwrap();
    enqueue(&mut older, &[event(8, "older")]).await.unwrap();
    older.commit().await.unwrap();
    // The relay publishes the older transaction's row, above the late one's, and passes on.
    let (shutdown, relay_task) = f.spawn_relay(RelayConfig {
        poll_interval: Duration::from_millis(5),
        ..relay_config()
    });
    eventually(
        Duration::from_secs(20),
        "the older row to be published",
        || async {
            count(
                &pool,
                "select coalesce(sum(published), 0)::bigint from outbox_relay_stats",
            )
            .await
                == 1
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        count(
            &pool,
            "select count(*) from outbox where id <= outbox_published_through()"
        )
        .await,
        0,
        "the floor passed a row of a transaction still running"
    );
    late.commit().await.unwrap();
    until_all_published(&pool, Duration::from_secs(15), "the late row to be published").await;
    shutdown.cancel();
    relay_task.await.unwrap();
    let messages = read_topic(f.bootstrap(), &t.order_events, 2).await;
    assert_eq!(first_occurrences_by_key(&messages)["7"], vec![late_id]);
}

/// A long transaction that writes nothing to the outbox (a report, a migration, another
/// database's work on the same server) does not keep published rows counted as pending: the
/// relay names the transactions that write to the outbox and waits for those alone.
#[tokio::test]
async fn a_long_transaction_that_writes_no_outbox_row_does_not_hold_the_published_floor() {
    let f = Fixture::new(6).await;
    let (pool, t) = (f.pool.clone(), f.topics());
    let mut long = pool.begin().await.unwrap();
    sqlx::query("select pg_current_xact_id()")
        .execute(&mut *long)
        .await
        .unwrap();
    let (shutdown, relay_task) = f.spawn_relay(relay_config());
    for order in 1..=10 {
        write_event(&pool, &t.order_events, "OrderCreated", order, &HashMap::new()).await;
    }
    until_all_published(
        &pool,
        Duration::from_secs(15),
        "the floor to pass every row while the long transaction runs",
    )
    .await;
    long.rollback().await.unwrap();
    shutdown.cancel();
    relay_task.await.unwrap();
    assert_eq!(read_topic(f.bootstrap(), &t.order_events, 10).await.len(), 10);
}

/// Per-order order within one relay pass, under a backlog larger than a batch: a transaction that
/// took a lower outbox id may commit while the relay is already past it, after a later row of the
/// same order was committed. Each pass must not publish that later row before the earlier one.
/// Writers here hold each order's row lock (as the saga and the consumer do) and linger before
/// committing, while a relay with tiny batches runs beside them.
#[tokio::test]
async fn late_commits_never_let_a_later_event_of_an_order_overtake_an_earlier_one() {
    let f = Fixture::new(40).await;
    let (pool, t) = (f.pool.clone(), f.topics());
    let mut orders = Vec::new();
    for _ in 0..24 {
        orders.push(insert_order(&pool, "confirmed").await);
    }
    let (shutdown, relay_task) = f.spawn_relay(RelayConfig {
        batch_size: 2,
        poll_interval: Duration::from_millis(5),
        ..relay_config()
    });
    let mut writers = Vec::new();
    for (w, &order) in orders.iter().enumerate() {
        let (pool, topic) = (pool.clone(), t.order_events.clone());
        writers.push(tokio::spawn(async move {
            let mut written = Vec::new();
            for i in 0..4u64 {
                let mut tx = pool.begin().await.unwrap();
                sqlx::query("select 1 from orders where order_id = $1 for update")
                    .bind(order)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                let event = NewEvent::new(
                    &topic,
                    "OrderStatusChanged",
                    order,
                    None,
                    json!({"i": i}),
                    &HashMap::new(),
                );
                written.push(event.envelope.event_id.to_string());
                enqueue(&mut tx, &[event]).await.unwrap();
                // Linger, holding an id the relay may already be past.
                tokio::time::sleep(Duration::from_millis(((w as u64 * 7 + i * 13) % 40) + 5)).await;
                tx.commit().await.unwrap();
            }
            (order, written)
        }));
    }
    let mut expected = HashMap::new();
    for w in writers {
        let (order, written) = w.await.unwrap();
        expected.insert(order.to_string(), written);
    }
    eventually(Duration::from_secs(60), "every row published", || async {
        pending(&pool).await == 0
    })
    .await;
    shutdown.cancel();
    relay_task.await.unwrap();
    let messages = read_topic(f.bootstrap(), &t.order_events, 96).await;
    let by_key = first_occurrences_by_key(&messages);
    for (key, written) in &expected {
        assert_eq!(&by_key[key], written, "order {key}: events out of commit order");
    }
}
