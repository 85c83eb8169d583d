//! The outbox relay publishing, and the retention of published rows.

use std::collections::HashMap;
use std::time::Duration;

use crate::fixture::*;
use ostore_orders::outbox::relay::{self, RelayConfig};
use serde_json::json;
use uuid::Uuid;

#[tokio::test]
async fn an_orders_outbox_rows_arrive_in_commit_order_keyed_by_order_id_with_envelope_and_headers() {
    let f = Fixture::new(4).await;
    let (pool, producer, t) = (f.pool.clone(), f.producer(), f.topics());
    let trace = HashMap::from([(
        "traceparent".to_string(),
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_string(),
    )]);
    let mut expected = Vec::new();
    for event_type in ["OrderCreated", "OrderConfirmed", "OrderCancelled"] {
        expected.push(write_event(&pool, &t.order_events, event_type, 42, &trace).await);
    }
    // Another order's event in between, on the same topic.
    write_event(&pool, &t.order_events, "OrderCreated", 7, &trace).await;

    let published = relay::run_once(&pool, &producer, &relay_config()).await.unwrap();
    assert_eq!(published, 4);
    let backlog = relay::backlog(&mut pool.acquire().await.unwrap()).await.unwrap();
    assert_eq!((backlog.pending, backlog.oldest_pending_age_seconds), (0, None));
    assert_eq!(backlog.published_last_minute, 4);

    let messages = read_topic(f.bootstrap(), &t.order_events, 4).await;
    assert_eq!(messages.len(), 4, "each row is published once");
    let of_42: Vec<&Received> = messages.iter().filter(|m| m.key == "42").collect();
    let ids: Vec<String> = of_42.iter().map(|m| m.event_id()).collect();
    let expected: Vec<String> = expected.iter().map(Uuid::to_string).collect();
    assert_eq!(ids, expected, "one order's events arrive in commit order");
    assert!(of_42.iter().all(|m| m.partition == of_42[0].partition));
    for (m, event_type) in of_42
        .iter()
        .zip(["OrderCreated", "OrderConfirmed", "OrderCancelled"])
    {
        let v = m.json();
        assert_eq!(v["eventType"], event_type);
        assert_eq!(v["eventVersion"], 1);
        assert_eq!(v["orderID"], 42);
        assert!(v["sagaID"].is_string() && v["occurredAt"].is_string());
        assert_eq!(v["data"], json!({"n": event_type}));
        assert_eq!(m.headers["event-type"], event_type);
        assert_eq!(m.headers["event-id"], v["eventID"].as_str().unwrap());
        assert_eq!(m.headers["traceparent"], trace["traceparent"]);
    }
}

#[tokio::test]
async fn published_rows_past_retention_are_deleted_and_pending_rows_kept() {
    let f = Fixture::database(4).await;
    let (pool, t) = (f.pool.clone(), f.topics());
    for i in 0..3 {
        write_event(&pool, &t.order_events, "OrderCreated", i, &HashMap::new()).await;
    }
    // The two oldest published two hours ago (the floor passed them then), the third pending.
    published_through(&pool, 2, "2 hours").await;
    let mut conn = pool.acquire().await.unwrap();
    assert_eq!(
        relay::delete_expired(&mut conn, Duration::from_secs(3 * 3600))
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        relay::delete_expired(&mut conn, Duration::from_secs(3600))
            .await
            .unwrap(),
        2
    );
    let backlog = relay::backlog(&mut conn).await.unwrap();
    assert_eq!((backlog.pending, backlog.published_last_minute), (1, 0));
    assert!(backlog.oldest_pending_age_seconds.is_some());
}

/// The retention cleanup deletes the rows the floor had passed by the last expired second, a chunk
/// at a time from the oldest: expired rows across several chunks all go, rows published since
/// stay, and a cleanup with nothing to delete reads one index entry, not the table.
#[tokio::test]
async fn the_retention_cleanup_goes_chunk_by_chunk_from_the_oldest_and_stops_at_young_rows() {
    let f = Fixture::database(4).await;
    let (pool, t) = (f.pool.clone(), f.topics());
    for i in 0..7 {
        write_event(&pool, &t.order_events, "OrderCreated", i, &HashMap::new()).await;
    }
    // The five oldest published two hours ago, the sixth just now, the seventh pending.
    published_through(&pool, 5, "2 hours").await;
    published_through(&pool, 6, "0 seconds").await;
    let mut conn = pool.acquire().await.unwrap();
    assert_eq!(
        relay::delete_expired_by(&mut conn, Duration::from_secs(3600), 2)
            .await
            .unwrap(),
        5,
        "three chunks: two expired, two expired, one expired and one young"
    );
    assert_eq!(count(&pool, "select count(*) from outbox").await, 2);
    assert_eq!(
        relay::delete_expired_by(&mut conn, Duration::from_secs(3600), 2)
            .await
            .unwrap(),
        0
    );
}

#[tokio::test]
async fn with_zero_retention_acknowledged_rows_are_deleted_and_still_counted() {
    let f = Fixture::new(4).await;
    let (pool, producer, t) = (f.pool.clone(), f.producer(), f.topics());
    let mut written = Vec::new();
    for i in 0..30 {
        written.push(write_event(&pool, &t.order_events, "OrderCreated", i % 3, &HashMap::new()).await);
    }
    let cfg = RelayConfig {
        retention: Duration::ZERO,
        batch_size: 7,
        ..relay_config()
    };
    assert_eq!(relay::run_once(&pool, &producer, &cfg).await.unwrap(), 30);
    assert_eq!(count(&pool, "select count(*) from outbox").await, 0);
    let backlog = relay::backlog(&mut pool.acquire().await.unwrap()).await.unwrap();
    assert_eq!((backlog.pending, backlog.published_last_minute), (0, 30));
    let messages = read_topic(f.bootstrap(), &t.order_events, 30).await;
    assert_eq!(messages.len(), 30);
    let by_key = first_occurrences_by_key(&messages);
    let expected: Vec<String> = written.iter().step_by(3).map(Uuid::to_string).collect();
    assert_eq!(by_key["0"], expected);
}

/// Records, as the relay does, that the floor passed the `n` oldest rows `ago` (an interval).
async fn published_through(pool: &sqlx::PgPool, n: i64, ago: &str) {
    sqlx::query(
        "with t as (select id from outbox order by id offset $1 - 1 limit 1),
              f as (update outbox_relay_floor set through = (select id from t))
         insert into outbox_relay_stats (second, published, published_through)
         select date_trunc('second', now() - $2::interval), $1, id from t",
    )
    .bind(n)
    .bind(ago)
    .execute(pool)
    .await
    .unwrap();
}
