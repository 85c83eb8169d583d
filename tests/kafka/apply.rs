//! TrackingEvents applied to the database without a broker: one at a time, replayed, parked and
//! dead-lettered, and in batches.

use std::time::{Duration, Instant};

use crate::fixture::*;
use crate::support::TestDb;
use ostore_orders::downstream::contract::TrackingStatus;
use ostore_orders::tracking::{self, Outcome, Record};

#[tokio::test]
async fn the_same_event_twice_makes_one_notification() {
    let f = Fixture::database(4).await;
    let (pool, t) = (f.pool.clone(), f.topics());
    let cfg = consumer_config(Duration::from_secs(30));
    let order = insert_order(&pool, "confirmed").await;
    let event = body(&tracking_event(order, TrackingStatus::PickedUp));

    let first = apply(&pool, &cfg, &event).await;
    let second = apply(&pool, &cfg, &event).await;
    assert!(matches!(first, Outcome::Applied { .. }), "{first:?}");
    assert!(matches!(second, Outcome::Duplicate { .. }), "{second:?}");
    assert_eq!(order_status(&pool, order).await, "shipped");
    assert_eq!(outbox_events(&pool, &t.notifications, order).await.len(), 1);
}

#[tokio::test]
async fn a_shippers_own_event_ids_need_not_be_uuids() {
    let f = Fixture::database(4).await;
    let (pool, t) = (f.pool.clone(), f.topics());
    let cfg = consumer_config(Duration::from_secs(30));
    let order = insert_order(&pool, "confirmed").await;
    let event = |id: &str, status: &str| {
        serde_json::to_vec(
            &serde_json::json!({"eventID": id, "shipmentID": "shp-1", "orderID": order,
            "status": status, "occurredAt": "2026-12-06T10:00:00Z"}),
        )
        .unwrap()
    };
    let first = apply(&pool, &cfg, &event("evt-123", "picked_up")).await;
    assert!(matches!(first, Outcome::Applied { .. }), "{first:?}");
    assert_eq!(order_status(&pool, order).await, "shipped");
    let again = apply(&pool, &cfg, &event("evt-123", "picked_up")).await;
    assert!(
        matches!(&again, Outcome::Duplicate { event_id } if event_id == "evt-123"),
        "{again:?}"
    );
    // Ids differing in case are different events.
    let next = apply(&pool, &cfg, &event("EVT-123", "delivered")).await;
    assert!(matches!(next, Outcome::Applied { .. }), "{next:?}");
    assert_eq!(order_status(&pool, order).await, "delivered");
    assert_eq!(outbox_events(&pool, &t.notifications, order).await.len(), 2);
    // Empty, over-long or control characters: malformed, dead-lettered at once.
    for bad in [String::new(), "x".repeat(201), "evt\n1".to_string()] {
        let outcome = apply(&pool, &cfg, &event(&bad, "delivered")).await;
        assert!(
            matches!(&outcome, Outcome::DeadLettered { reason, .. } if reason.contains("eventID")),
            "{bad:?}: {outcome:?}"
        );
    }
    // A numeric eventID is not text.
    let numeric = serde_json::to_vec(&serde_json::json!({"eventID": 7, "shipmentID": "shp-1",
        "orderID": order, "status": "delivered", "occurredAt": "2026-12-06T10:00:00Z"}))
    .unwrap();
    let outcome = apply(&pool, &cfg, &numeric).await;
    assert!(matches!(outcome, Outcome::DeadLettered { .. }), "{outcome:?}");
    assert_eq!(count(&pool, "select count(*) from dead_letters").await, 4);
}

#[tokio::test]
async fn a_late_in_transit_after_delivered_leaves_the_order_delivered() {
    let f = Fixture::database(4).await;
    let (pool, t) = (f.pool.clone(), f.topics());
    let cfg = consumer_config(Duration::from_secs(30));
    let order = insert_order(&pool, "confirmed").await;

    let delivered = body(&tracking_event(order, TrackingStatus::Delivered));
    let late = body(&tracking_event(order, TrackingStatus::InTransit));
    let first = apply(&pool, &cfg, &delivered).await;
    let second = apply(&pool, &cfg, &late).await;
    assert!(matches!(first, Outcome::Applied { .. }), "{first:?}");
    assert!(matches!(second, Outcome::NoChange { .. }), "{second:?}");
    assert_eq!(order_status(&pool, order).await, "delivered");
    assert_eq!(outbox_events(&pool, &t.notifications, order).await.len(), 1);
    assert_eq!(
        count(&pool, "select count(*) from tracking_inbox").await,
        2,
        "the late event is recorded"
    );
}

#[tokio::test]
async fn an_exception_changes_no_status_but_notifies_the_customer() {
    let f = Fixture::database(4).await;
    let (pool, t) = (f.pool.clone(), f.topics());
    let cfg = consumer_config(Duration::from_secs(30));
    let order = insert_order(&pool, "shipped").await;
    let outcome = apply(
        &pool,
        &cfg,
        &body(&tracking_event(order, TrackingStatus::Exception)),
    )
    .await;
    assert!(
        matches!(
            outcome,
            Outcome::Notified {
                event_type: "ShipmentException",
                ..
            }
        ),
        "{outcome:?}"
    );
    assert_eq!(order_status(&pool, order).await, "shipped");
    let notifications = outbox_events(&pool, &t.notifications, order).await;
    assert_eq!(notifications.len(), 1);
    assert_eq!(notifications[0].0, "ShipmentException");
    assert_eq!(notifications[0].1["data"]["status"], "shipped");
    assert_eq!(notifications[0].1["data"]["previousStatus"], "shipped");
}

#[tokio::test]
async fn an_event_whose_order_never_appears_is_dead_lettered_after_the_window_and_can_be_replayed() {
    let f = Fixture::database(4).await;
    let (pool, t) = (f.pool.clone(), f.topics());
    let cfg = consumer_config(Duration::from_secs(2));
    let unknown = 900_002;
    let event = body(&tracking_event(unknown, TrackingStatus::Delivered));

    let parked_at = Instant::now();
    let outcome = apply(&pool, &cfg, &event).await;
    assert!(matches!(outcome, Outcome::Parked { .. }), "{outcome:?}");
    // Retried with backoff while the window is open...
    eventually(Duration::from_secs(10), "a retry", || async {
        tracking::process_due(&pool, &cfg, &t).await.unwrap();
        count(&pool, "select count(*) from tracking_retries where attempts >= 1").await == 1
    })
    .await;
    if parked_at.elapsed() < Duration::from_millis(1500) {
        assert_eq!(count(&pool, "select count(*) from dead_letters").await, 0);
    }
    // ...then dead-lettered.
    eventually(
        Duration::from_secs(10),
        "the event to be dead-lettered",
        || async {
            tracking::process_due(&pool, &cfg, &t).await.unwrap();
            count(&pool, "select count(*) from dead_letters").await == 1
        },
    )
    .await;
    assert_eq!(count(&pool, "select count(*) from tracking_retries").await, 0);
    let letter = sqlx::query!("select id, payload, reason from dead_letters")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(letter.payload, event);
    assert!(letter.reason.contains("not known"), "{}", letter.reason);
    assert_eq!(
        outbox_events(&pool, &t.tracking_dlq, unknown).await.len(),
        1,
        "a copy goes to the DLQ topic"
    );

    // Replaying while the order is still unknown changes nothing; once it exists, it applies once.
    assert!(matches!(
        tracking::replay_dead_letter(&pool, &t, letter.id).await,
        Err(tracking::ReplayError::StillFailing(_))
    ));
    assert!(matches!(
        tracking::replay_dead_letter(&pool, &t, letter.id + 1000).await,
        Err(tracking::ReplayError::NotFound(_))
    ));
    insert_order_with_id(&pool, unknown, "shipped").await;
    let replayed = tracking::replay_dead_letter(&pool, &t, letter.id).await.unwrap();
    assert!(matches!(replayed, Outcome::Applied { .. }), "{replayed:?}");
    let again = tracking::replay_dead_letter(&pool, &t, letter.id).await.unwrap();
    assert!(matches!(again, Outcome::Duplicate { .. }), "{again:?}");
    assert_eq!(order_status(&pool, unknown).await, "delivered");
    assert_eq!(outbox_events(&pool, &t.notifications, unknown).await.len(), 1);
    let replayed_at = sqlx::query_scalar!("select replayed_at from dead_letters where id = $1", letter.id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(replayed_at.is_some());
}

#[tokio::test]
async fn a_redelivered_record_is_dead_lettered_once_and_another_record_at_its_offset_is_not_lost() {
    let f = Fixture::database(4).await;
    let (pool, t) = (f.pool.clone(), f.topics());
    let cfg = consumer_config(Duration::ZERO);
    let first = record_at(7, b"{\"eventID\": malformed".to_vec());
    let dead = |o: &Outcome| match o {
        Outcome::DeadLettered { id, .. } => *id,
        other => panic!("dead-lettered, not {other:?}"),
    };
    let a = dead(&tracking::apply_record(&pool, &cfg, &t, &first).await.unwrap());
    // Redelivered after a crash: the same record, the same dead letter, no second DLQ message.
    let again = dead(&tracking::apply_record(&pool, &cfg, &t, &first).await.unwrap());
    assert_eq!(again, a);
    let dlq = "select count(*) from outbox where event_type = 'TrackingEventDeadLettered'";
    assert_eq!(count(&pool, "select count(*) from dead_letters").await, 1);
    assert_eq!(count(&pool, dlq).await, 1);
    // The topic recreated (a new broker, the same database): a different record at offset 7.
    let other = record_at(7, b"not json at all".to_vec());
    let b = dead(&tracking::apply_record(&pool, &cfg, &t, &other).await.unwrap());
    assert_ne!(b, a, "a different record is a dead letter of its own");
    assert_eq!(count(&pool, "select count(*) from dead_letters").await, 2);
    assert_eq!(count(&pool, dlq).await, 2);
    let stored = sqlx::query_scalar!("select payload from dead_letters where id = $1", b)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(stored, b"not json at all");
    // And in a batch alike.
    let third = record_at(7, b"{\"orderID\": \"x\"}".to_vec());
    let outcomes = tracking::apply_records(&pool, &cfg, &t, &[first, third])
        .await
        .unwrap();
    assert_eq!(dead(&outcomes[0]), a);
    assert!(![a, b].contains(&dead(&outcomes[1])));
    assert_eq!(count(&pool, "select count(*) from dead_letters").await, 3);
    assert_eq!(count(&pool, dlq).await, 3);
}

#[tokio::test]
async fn a_batch_has_the_outcome_of_its_events_applied_one_by_one() {
    let t = topics();
    let (confirmed, shipped, pending, unknown) = (101, 102, 103, 900_010);
    let ev = |order_id: i32, status: TrackingStatus| body(&tracking_event(order_id, status));
    let picked_up = ev(confirmed, TrackingStatus::PickedUp);
    let payloads: Vec<Vec<u8>> = vec![
        ev(confirmed, TrackingStatus::Created),
        picked_up.clone(),
        // Redelivered in the same batch.
        picked_up,
        ev(unknown, TrackingStatus::PickedUp),
        ev(unknown, TrackingStatus::Delivered),
        // Not confirmed yet: parked, and the order's next event waits behind it.
        ev(pending, TrackingStatus::PickedUp),
        ev(pending, TrackingStatus::Created),
        b"{\"eventID\": malformed".to_vec(),
        ev(shipped, TrackingStatus::Exception),
        ev(confirmed, TrackingStatus::InTransit),
        ev(confirmed, TrackingStatus::Delivered),
        // Late.
        ev(confirmed, TrackingStatus::InTransit),
        ev(shipped, TrackingStatus::Delivered),
    ];
    let records: Vec<Record> = payloads
        .into_iter()
        .enumerate()
        .map(|(i, p)| record_at(i as i64, p))
        .collect();
    // With a window, events that cannot apply yet are parked; without, dead-lettered at once.
    for window in [Duration::from_secs(30), Duration::ZERO] {
        let cfg = consumer_config(window);
        let (one_by_one, batched) = (TestDb::new().await, TestDb::new().await);
        let (one_pool, batch_pool) = (one_by_one.pool().await, batched.pool().await);
        for pool in [&one_pool, &batch_pool] {
            insert_order_with_id(pool, confirmed, "confirmed").await;
            insert_order_with_id(pool, shipped, "shipped").await;
            insert_order_with_id(pool, pending, "pending").await;
        }
        let mut expected = Vec::new();
        for record in &records {
            expected.push(tracking::apply_record(&one_pool, &cfg, &t, record).await.unwrap());
        }
        let outcomes = tracking::apply_records(&batch_pool, &cfg, &t, &records)
            .await
            .unwrap();
        assert_eq!(outcomes, expected, "window {window:?}");
        assert_eq!(
            consumer_state(&batch_pool).await,
            consumer_state(&one_pool).await,
            "window {window:?}"
        );

        let names: Vec<&str> = outcomes.iter().map(Outcome::name).collect();
        let not_yet = if window.is_zero() {
            "dead_lettered"
        } else {
            "parked"
        };
        let pending_created = if window.is_zero() { "no_change" } else { "parked" };
        assert_eq!(
            names,
            [
                "no_change",
                "applied",
                "duplicate",
                not_yet,
                not_yet,
                not_yet,
                pending_created,
                "dead_lettered",
                "notified",
                "no_change",
                "applied",
                "no_change",
                "applied"
            ],
            "window {window:?}"
        );
        assert_eq!(order_status(&batch_pool, confirmed).await, "delivered");
        assert_eq!(order_status(&batch_pool, shipped).await, "delivered");
        assert_eq!(order_status(&batch_pool, pending).await, "pending");
        assert_eq!(
            outbox_events(&batch_pool, &t.notifications, confirmed)
                .await
                .len(),
            2
        );
    }
}
