//! A saga's trace as an OTLP receiver gets it: the service exports over OTLP/HTTP (the real
//! exporter set up by `OTEL_EXPORTER_OTLP_ENDPOINT`) to a receiver in this test, which decodes the
//! protobuf batches; the test then checks the tree, the span kinds and the OpenTelemetry
//! semantic-convention attributes of every hop. (Its own binary: it installs the global
//! subscriber and sets the exporter's environment.)

mod support;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::response::IntoResponse as _;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message as _;
use tokio_util::sync::CancellationToken;

use support::spans::SpanLine;
use support::{place_traced_order_retried_once, serve_router};

/// One span as received, flattened.
#[derive(Debug, Clone)]
struct Received {
    trace_id: String,
    span_id: String,
    parent: String,
    name: String,
    kind: &'static str,
    attributes: HashMap<String, String>,
    links: Vec<String>,
    error: bool,
}

impl Received {
    fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Received>>>);

impl Receiver {
    fn take(&self, request: ExportTraceServiceRequest) {
        let mut spans = self.0.lock().unwrap();
        for rs in request.resource_spans {
            for ss in rs.scope_spans {
                for s in ss.spans {
                    let attributes = s
                        .attributes
                        .iter()
                        .map(|kv| {
                            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                                Some(AnyValue::StringValue(v)) => v.clone(),
                                Some(AnyValue::IntValue(v)) => v.to_string(),
                                Some(AnyValue::BoolValue(v)) => v.to_string(),
                                Some(AnyValue::DoubleValue(v)) => v.to_string(),
                                other => format!("{other:?}"),
                            };
                            (kv.key.clone(), value)
                        })
                        .collect();
                    spans.push(Received {
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent: hex(&s.parent_span_id),
                        name: s.name.clone(),
                        kind: match s.kind {
                            1 => "INTERNAL",
                            2 => "SERVER",
                            3 => "CLIENT",
                            4 => "PRODUCER",
                            5 => "CONSUMER",
                            _ => "UNSPECIFIED",
                        },
                        attributes,
                        links: s.links.iter().map(|l| hex(&l.span_id)).collect(),
                        error: s.status.as_ref().is_some_and(|st| st.code == 2),
                    });
                }
            }
        }
    }

    fn in_trace(&self, trace_id: &str) -> Vec<Received> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The trace as an indented tree: name [KIND], siblings by name.
fn tree(spans: &[Received]) -> String {
    let mut sorted: Vec<&Received> = spans.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let lines: Vec<SpanLine> = sorted
        .into_iter()
        .map(|s| {
            let links = if s.links.is_empty() {
                String::new()
            } else {
                format!(" (link → {})", s.links.join(", "))
            };
            SpanLine {
                id: s.span_id.clone(),
                parent: s.parent.clone(),
                label: format!("{} [{}] {}{links}", s.name, s.kind, s.span_id),
            }
        })
        .collect();
    support::spans::tree(&lines)
}

async fn otlp_receiver(receiver: Receiver, shutdown: CancellationToken) -> String {
    let router = axum::Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| {
            let receiver = receiver.clone();
            async move {
                match ExportTraceServiceRequest::decode(body) {
                    Ok(request) => {
                        receiver.take(request);
                        (
                            [("content-type", "application/x-protobuf")],
                            ExportTraceServiceResponse::default().encode_to_vec(),
                        )
                            .into_response()
                    }
                    Err(e) => panic!("not an OTLP trace export: {e}"),
                }
            }
        }),
    );
    serve_router(router, shutdown).await
}

#[tokio::test]
async fn a_sagas_trace_reaches_an_otlp_receiver_as_one_tree_with_the_conventions_kinds_and_attributes() {
    let receiver = Receiver::default();
    let stop = CancellationToken::new();
    let endpoint = otlp_receiver(receiver.clone(), stop.clone()).await;
    // SAFETY: set before the exporter reads them and before any other thread of this test binary
    // reads the environment (this binary holds this one test).
    unsafe {
        std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint);
        std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "200");
        std::env::set_var("OTEL_METRICS_EXPORTER", "none");
    }
    let guard = ostore_orders::telemetry::init("ostore-orders", ostore_orders::telemetry::LogFormat::Pretty);
    let trace_id = "5af7651916cd43dd8448eb211c80319d";
    let caller = "00f067aa0ba902b8";
    // The catalog answers 503 once: the reservation is retried by a later session of the saga.
    let (app, r) =
        place_traced_order_retried_once("otlp@example.com", "otlp", &format!("00-{trace_id}-{caller}-01"))
            .await;
    assert!(r.status().is_success(), "{}", r.status());
    app.wait_delivered_and_published().await;
    // Every notification of the delivery went out (the last hop of the trace).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    guard.flush();
    let mut spans = Vec::new();
    for _ in 0..50 {
        spans = receiver.in_trace(trace_id);
        let consumers: BTreeSet<&str> = spans
            .iter()
            .filter(|s| s.kind == "CONSUMER")
            .map(|s| s.span_id.as_str())
            .collect();
        let notified = spans
            .iter()
            .filter(|s| s.kind == "PRODUCER" && consumers.contains(s.parent.as_str()))
            .count();
        if notified >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        guard.flush();
    }
    let tree_text = tree(&spans);
    println!("trace {trace_id}:\n{tree_text}");
    let by_id: HashMap<&str, &Received> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let parent_of = |s: &Received| by_id.get(s.parent.as_str()).copied();
    let named = |name: &str| spans.iter().filter(|s| s.name == name).collect::<Vec<_>>();

    // One tree: the caller's span is the only parent outside the trace.
    let roots: BTreeSet<&str> = spans
        .iter()
        .map(|s| s.parent.as_str())
        .filter(|p| !by_id.contains_key(p))
        .collect();
    assert_eq!(
        roots,
        BTreeSet::from([caller]),
        "more than one root:\n{tree_text}"
    );

    // HTTP server → saga sessions.
    let request = named("POST /orders");
    assert_eq!(request.len(), 1, "{tree_text}");
    let request = request[0];
    assert_eq!(request.kind, "SERVER");
    assert_eq!(request.attr("http.request.method"), Some("POST"));
    assert_eq!(request.attr("http.route"), Some("/orders"));
    let sessions = named("saga create_order");
    assert!(
        sessions.len() >= 2,
        "the retry runs in a later session:\n{tree_text}"
    );
    for s in &sessions {
        assert_eq!(
            s.parent, request.span_id,
            "a saga session hangs under the request"
        );
        assert_eq!(s.kind, "INTERNAL");
    }
    // Every later session links to an earlier one.
    let session_ids: BTreeSet<&str> = sessions.iter().map(|s| s.span_id.as_str()).collect();
    let linked: Vec<_> = sessions.iter().filter(|s| !s.links.is_empty()).collect();
    assert_eq!(linked.len(), sessions.len() - 1, "{tree_text}");
    for s in linked {
        assert!(
            s.links
                .iter()
                .all(|l| session_ids.contains(l.as_str()) && l != &s.span_id),
            "a session links to an earlier session of the saga:\n{tree_text}"
        );
    }

    // Every shared commit a saga rode in shows in its trace as a database CLIENT span.
    let commits = named("COMMIT");
    assert!(
        commits.iter().any(|c| c.parent == request.span_id),
        "the commit that created the saga is under the request:\n{tree_text}"
    );
    for c in &commits {
        assert_eq!(c.kind, "CLIENT");
        assert_eq!(c.attr("db.system.name"), Some("postgresql"));
        assert!(
            c.attr("db.operation.batch.size")
                .is_some_and(|n| n.parse::<u32>().is_ok_and(|n| n >= 1))
        );
        assert!(c.parent == request.span_id || session_ids.contains(c.parent.as_str()));
    }
    for s in &sessions {
        assert!(
            commits.iter().any(|c| c.parent == s.span_id),
            "every session that wrote shows its commits:\n{tree_text}"
        );
    }

    // Three steps, one span per attempt, each under a session, with its outcome.
    let reserve = named("action reserve_inventory");
    assert_eq!(reserve.len(), 2, "{tree_text}");
    let outcomes: BTreeSet<&str> = reserve.iter().filter_map(|s| s.attr("saga.outcome")).collect();
    assert_eq!(outcomes, BTreeSet::from(["transient", "succeeded"]));
    for name in [
        "action reserve_inventory",
        "action persist_order",
        "action create_shipment",
    ] {
        let steps = named(name);
        assert!(!steps.is_empty(), "{name} missing:\n{tree_text}");
        for s in steps {
            assert_eq!(s.kind, "INTERNAL");
            assert!(
                session_ids.contains(s.parent.as_str()),
                "{name} is not under a session"
            );
            assert!(s.attr("saga.outcome").is_some(), "{name} has no outcome");
        }
    }

    // Each remote attempt → an HTTP CLIENT span → the simulator's SERVER span.
    for (step, route, statuses) in [
        (
            "action reserve_inventory",
            "/inventory/reservations",
            vec!["503", "201"],
        ),
        ("action create_shipment", "/shipments", vec!["201"]),
    ] {
        let clients: Vec<_> = spans
            .iter()
            .filter(|s| s.kind == "CLIENT" && parent_of(s).is_some_and(|p| p.name == step))
            .collect();
        assert_eq!(
            clients.len(),
            statuses.len(),
            "{step}: one CLIENT span per attempt\n{tree_text}"
        );
        let mut got: Vec<&str> = clients
            .iter()
            .map(|c| c.attr("http.response.status_code").unwrap_or("none"))
            .collect();
        got.sort();
        let mut want = statuses.clone();
        want.sort();
        assert_eq!(got, want, "{step}");
        for c in clients {
            assert_eq!(c.name, format!("POST {route}"));
            assert_eq!(c.attr("http.request.method"), Some("POST"));
            assert_eq!(c.attr("url.template"), Some(route));
            assert!(
                c.attr("url.full")
                    .is_some_and(|u| u.starts_with("http://127.0.0.1:") && u.ends_with(route))
            );
            assert_eq!(c.attr("server.address"), Some("127.0.0.1"));
            assert!(c.attr("server.port").is_some_and(|p| p.parse::<u16>().is_ok()));
            if c.attr("http.response.status_code") == Some("503") {
                assert_eq!(c.attr("error.type"), Some("503"));
                assert!(c.error, "a failed call's span has the error status");
            } else {
                assert_eq!(c.attr("error.type"), None);
            }
            let servers: Vec<_> = spans.iter().filter(|s| s.parent == c.span_id).collect();
            assert_eq!(
                servers.len(),
                1,
                "the simulator's span hangs under the CLIENT span"
            );
            assert_eq!(servers[0].kind, "SERVER");
            assert_eq!(servers[0].name, format!("POST {route}"));
        }
    }

    // The admin history records the status and duration of every attempt, successes included.
    let history: Vec<(String, Option<i32>, Option<i32>)> =
        sqlx::query_as("select step, downstream_status, duration_ms from saga_steps order by id")
            .fetch_all(&app.db)
            .await
            .unwrap();
    let statuses: Vec<(&str, Option<i32>)> = history.iter().map(|(s, st, _)| (s.as_str(), *st)).collect();
    assert_eq!(
        statuses,
        vec![
            ("reserve_inventory", Some(503)),
            ("reserve_inventory", Some(201)),
            ("persist_order", None),
            ("create_shipment", Some(201)),
        ]
    );
    assert!(history.iter().all(|(_, _, d)| d.is_some_and(|d| d >= 0)));
    let backwards: i64 = sqlx::query_scalar("select count(*) from saga_steps where finished_at < started_at")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(backwards, 0, "an attempt finishes after it starts");

    // Outbox → relay PRODUCER spans, each under the span that wrote the event.
    let producers: Vec<_> = spans
        .iter()
        .filter(|s| s.kind == "PRODUCER" && s.attr("outbox.id").is_some())
        .collect();
    assert!(!producers.is_empty(), "{tree_text}");
    for p in &producers {
        let topic = p.attr("messaging.destination.name").expect("destination");
        assert_eq!(p.name, format!("send {topic}"));
        assert_eq!(p.attr("messaging.system"), Some("kafka"));
        assert_eq!(p.attr("messaging.operation.type"), Some("send"));
        assert!(p.attr("messaging.destination.partition.id").is_some(), "{p:?}");
        assert!(p.attr("messaging.kafka.offset").is_some(), "{p:?}");
        assert!(p.attr("messaging.message.id").is_some_and(|id| !id.is_empty()));
        assert!(parent_of(p).is_some(), "a publication's parent is in the trace");
    }
    let confirmed = producers
        .iter()
        .find(|p| {
            p.attr("messaging.destination.name") == Some("orders.events")
                && parent_of(p).is_some_and(|q| q.name == "action create_shipment")
        })
        .map(|_| ());
    assert!(
        confirmed.is_some(),
        "OrderConfirmed is published under the step that confirmed it:\n{tree_text}"
    );

    // The shipper's TrackingEvents → the consumer's CONSUMER spans → the notifications' PRODUCER spans.
    let consumers: Vec<_> = spans.iter().filter(|s| s.kind == "CONSUMER").collect();
    assert!(consumers.len() >= 3, "{tree_text}");
    for c in &consumers {
        let topic = c.attr("messaging.destination.name").expect("destination");
        assert_eq!(c.name, format!("process {topic}"));
        assert_eq!(c.attr("messaging.operation.type"), Some("process"));
        assert_eq!(c.attr("messaging.system"), Some("kafka"));
        assert!(c.attr("messaging.destination.partition.id").is_some());
        assert!(c.attr("messaging.kafka.offset").is_some());
        let parent = parent_of(c).expect("the consumer continues the producer's trace");
        assert_eq!(parent.kind, "PRODUCER");
    }
    let notifications: Vec<_> = producers
        .iter()
        .filter(|p| parent_of(p).is_some_and(|q| q.kind == "CONSUMER"))
        .collect();
    assert!(
        notifications.len() >= 3,
        "every notification is published under the consumer span that produced it:\n{tree_text}"
    );
    stop.cancel();
}
