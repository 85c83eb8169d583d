//! One OpenTelemetry trace per saga: the caller's trace is continued through the request, the saga,
//! every step attempt, the downstream calls and the simulators' handling of them; a saga resumed by
//! another worker stays in its original trace. (Its own binary: it installs the global subscriber.)

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use serde_json::json;

use support::spans::SpanLine;
use support::{place_traced_order_retried_once, spawn_app_with_flags};

#[derive(Debug, Clone, Default)]
struct Collector(Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for Collector {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.0.lock().unwrap().extend(batch);
        Ok(())
    }
}

impl Collector {
    fn in_trace(&self, trace_id: &str) -> Vec<SpanData> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.span_context.trace_id().to_string() == trace_id)
            .cloned()
            .collect()
    }

    /// The spans of a trace once `ready` holds of them, or as they are after `secs`: a span is
    /// exported when it ends, which can be a moment after what the test waited for (a drive's
    /// session ends after its last commit is visible).
    async fn in_trace_once(
        &self,
        trace_id: &str,
        secs: u64,
        ready: impl Fn(&[SpanData]) -> bool,
    ) -> Vec<SpanData> {
        let until = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let spans = self.in_trace(trace_id);
            if ready(&spans) || tokio::time::Instant::now() >= until {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The spans of a trace as an indented tree (name, span id, parent id), siblings by start time.
fn tree(spans: &[SpanData]) -> String {
    let mut sorted: Vec<&SpanData> = spans.iter().collect();
    sorted.sort_by_key(|s| s.start_time);
    let lines: Vec<SpanLine> = sorted
        .into_iter()
        .map(|s| {
            let id = s.span_context.span_id().to_string();
            let parent = s.parent_span_id.to_string();
            SpanLine {
                label: format!("{} [{id} ← {parent}]", s.name),
                id,
                parent,
            }
        })
        .collect();
    support::spans::tree(&lines)
}

#[tokio::test]
async fn one_trace_spans_the_request_the_steps_the_downstream_services_kafka_and_the_consumer() {
    let collector = Collector::default();
    let _guard = ostore_orders::telemetry::init_with_span_exporter("ostore-orders-test", collector.clone());
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    // The catalog fails once, so a retry is part of the trace too.
    let (app, r) = place_traced_order_retried_once(
        "trace@example.com",
        "traced",
        &format!("00-{trace_id}-00f067aa0ba902b7-01"),
    )
    .await;
    assert_eq!(r.status(), 201);
    app.eventually_eq("select state from sagas", "completed", 10)
        .await;
    // The shipper's TrackingEvents come back through Kafka to the consumer, still in the trace.
    app.wait_delivered_and_published().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let spans = collector.in_trace(trace_id);
    let names: Vec<String> = spans.iter().map(|s| s.name.to_string()).collect();
    println!("trace {trace_id}:\n{}", tree(&spans));
    for expected in [
        "POST /orders",
        "saga create_order",
        "action reserve_inventory",
        "action create_shipment",
        "action persist_order",
        "POST /inventory/reservations",
        "POST /shipments",
        "process shipments.tracking-events",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from the trace: {names:?}"
        );
    }
    // Two reserve attempts (a retry), both in the trace.
    assert_eq!(
        names.iter().filter(|n| *n == "action reserve_inventory").count(),
        2
    );
    // The simulator's handling of the call is a child of the client call (W3C traceparent injected).
    let sim = spans
        .iter()
        .filter(|s| {
            s.name == "POST /inventory/reservations"
                && s.span_kind == opentelemetry::trace::SpanKind::Server
                && s.parent_span_is_remote
        })
        .count();
    assert!(sim >= 1, "the simulator did not continue the trace");
    // The consumer's spans continue the trace from the TrackingEvents' Kafka headers.
    let applied = spans
        .iter()
        .filter(|s| s.name == "process shipments.tracking-events" && s.parent_span_is_remote)
        .count();
    assert!(applied >= 3, "consumer spans in the trace: {applied}");
    // The outbox rows carry the trace into Kafka headers.
    let headers: Vec<serde_json::Value> = sqlx::query_scalar("select headers from outbox")
        .fetch_all(&app.db)
        .await
        .unwrap();
    assert!(
        headers
            .iter()
            .all(|h| h["traceparent"].as_str().unwrap().contains(trace_id))
    );
}

#[tokio::test]
async fn a_saga_resumed_by_another_worker_stays_in_its_trace_and_links_to_the_session_before() {
    let collector = Collector::default();
    let _guard = ostore_orders::telemetry::init_with_span_exporter("ostore-orders-test", collector.clone());
    let app = spawn_app_with_flags(&["--order-wait-ms", "100", "--saga-lease-ms", "6000"]).await;
    app.product(1, 10, "1.00");
    let (_, token) = app.customer("resume@example.com").await;
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    // The saga's first worker reserves the stock and persists the order, then "dies" in the middle
    // of creating the shipment: its lease is taken over and another claim resumes the saga.
    app.shipment_faults(json!({"latencyMs": 1500, "endpoint": "create"}))
        .await;
    let r = app
        .place_traced(
            &token,
            "resumed",
            &format!("00-{trace_id}-b7ad6b7169203331-01"),
            json!([{"productID": 1, "quantity": 1}]),
        )
        .await;
    assert_eq!(r.status(), 202);
    app.eventually_eq("select step_name from sagas", "create_shipment", 10)
        .await;
    // Resume from the database, as a restarted worker would: the trace context comes from the row.
    app.exec("update sagas set lease_owner = null, lease_expires_at = null, fence = fence + 1, next_attempt_at = now()").await;
    app.engine.run_due_once().await.unwrap();
    app.eventually_eq("select state from sagas", "completed", 10)
        .await;
    let spans = collector
        .in_trace_once(trace_id, 5, |spans| {
            spans.iter().filter(|s| s.name == "saga create_order").count() >= 2
        })
        .await;
    let sessions: Vec<_> = spans.iter().filter(|s| s.name == "saga create_order").collect();
    assert!(
        sessions.len() >= 2,
        "the resumed drive must join the original trace:\n{}",
        tree(&spans)
    );
    // The first session wrote (reservation, order) before it died: the resumed one links to it.
    let first = sessions
        .iter()
        .find(|s| s.links.is_empty())
        .expect("the first session has no earlier one");
    let resumed: Vec<_> = sessions.iter().filter(|s| !s.links.is_empty()).collect();
    assert!(!resumed.is_empty(), "{}", tree(&spans));
    assert!(
        resumed.iter().any(|s| s
            .links
            .iter()
            .any(|l| l.span_context.span_id() == first.span_context.span_id())),
        "the resumed session links to the session that wrote before it:\n{}",
        tree(&spans)
    );
}

#[tokio::test]
async fn an_event_written_for_a_customers_cancel_is_in_the_orders_trace_linked_to_the_cancel_request() {
    let collector = Collector::default();
    let _guard = ostore_orders::telemetry::init_with_span_exporter("ostore-orders-test", collector.clone());
    let app = spawn_app_with_flags(&["--order-wait-ms", "100"]).await;
    app.product(1, 10, "1.00");
    let (_, token) = app.customer("cancel-trace@example.com").await;
    let order_trace = "1af7651916cd43dd8448eb211c80319e";
    let cancel_trace = "2af7651916cd43dd8448eb211c80319f";
    // The shipment is slow to create: the order is still pending when the customer cancels.
    app.shipment_faults(json!({"latencyMs": 1500, "endpoint": "create"}))
        .await;
    let r = app
        .place_traced(
            &token,
            "cancel-trace",
            &format!("00-{order_trace}-b7ad6b7169203332-01"),
            json!([{"productID": 1, "quantity": 1}]),
        )
        .await;
    assert_eq!(r.status(), 202);
    let order_id: i64 = r.json::<serde_json::Value>().await.unwrap()["orderID"]
        .as_i64()
        .unwrap();
    let r = app
        .http
        .post(app.url(&format!("/orders/{order_id}/cancel")))
        .bearer_auth(&token)
        .header("traceparent", format!("00-{cancel_trace}-c7ad6b7169203333-01"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let headers: serde_json::Value =
        sqlx::query_scalar("select headers from outbox where event_type = 'OrderCancelled'")
            .fetch_one(&app.db)
            .await
            .unwrap();
    let traceparent = headers["traceparent"].as_str().unwrap().to_string();
    assert!(
        traceparent.contains(order_trace),
        "OrderCancelled is in the order's trace: {traceparent}"
    );
    let spans = collector
        .in_trace_once(order_trace, 5, |spans| {
            spans
                .iter()
                .any(|s| traceparent.contains(&s.span_context.span_id().to_string()))
        })
        .await;
    let producing = spans
        .iter()
        .find(|s| traceparent.contains(&s.span_context.span_id().to_string()))
        .unwrap_or_else(|| {
            panic!(
                "the span that wrote OrderCancelled is exported:\n{}",
                tree(&spans)
            )
        });
    assert_eq!(producing.name, "cancel order");
    let request = collector
        .in_trace(cancel_trace)
        .into_iter()
        .find(|s| s.name == "POST /orders/{orderID}/cancel")
        .expect("the cancel request's span");
    assert!(
        producing
            .links
            .iter()
            .any(|l| l.span_context.span_id() == request.span_context.span_id()),
        "the span links to the cancel request"
    );
}
