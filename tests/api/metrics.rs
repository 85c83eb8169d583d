//! `GET /metrics`: the Prometheus text format, with the conventions' names, units and labels, and
//! latencies in the right buckets.

use std::time::Duration;

use serde_json::json;

use crate::support::spawn_app;

/// The value of the sample `name{labels…}` whose labels include every one of `want`.
fn sample(text: &str, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, labels) = series.split_once('{').unwrap_or((series, "}"));
            (n == name).then_some((labels.trim_end_matches('}'), value))
        })
        .find(|(labels, _)| {
            want.iter()
                .all(|(k, v)| labels.split(',').any(|kv| kv == format!("{k}=\"{v}\"")))
        })
        .map(|(_, v)| v.parse().unwrap())
}

async fn scrape(app: &crate::support::TestApp) -> String {
    let resp = app.get("/metrics", None).await;
    assert_eq!(resp.status(), 200);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    resp.text().await.unwrap()
}

#[tokio::test]
async fn a_slow_catalog_lands_in_its_latency_bucket_per_downstream_and_per_route() {
    let app = spawn_app().await;
    app.product(1, 10, "1.00");
    // 300 ms at the catalog: above the 0.25 s boundary, below 0.5 s.
    app.catalog_faults(json!({"latencyMs": 300, "endpoint": "reserve"}))
        .await;
    let (_, token) = app.customer("metrics@example.com").await;
    let resp = app
        .place(&token, "metrics-1", json!([{"productID": 1, "quantity": 1}]))
        .await;
    assert_eq!(resp.status(), 201);
    let text = scrape(&app).await;

    let catalog_port = app.catalog_url.rsplit(':').next().unwrap().to_string();
    let client = |le: &str| {
        sample(
            &text,
            "http_client_request_duration_seconds_bucket",
            &[
                ("server_address", "127.0.0.1"),
                ("server_port", &catalog_port),
                ("http_request_method", "POST"),
                ("http_response_status_code", "201"),
                ("le", le),
            ],
        )
        .unwrap_or_else(|| panic!("no catalog bucket le={le} in\n{text}"))
    };
    assert_eq!(client("0.1"), 0.0);
    assert_eq!(client("0.25"), 0.0, "the 300 ms reservation is above 0.25 s");
    assert_eq!(client("0.5"), 1.0, "the 300 ms reservation is at most 0.5 s");
    assert_eq!(client("+Inf"), 1.0);

    let server = |le: &str| {
        sample(
            &text,
            "http_server_request_duration_seconds_bucket",
            &[
                ("http_route", "/orders"),
                ("http_request_method", "POST"),
                ("http_response_status_code", "201"),
                ("le", le),
            ],
        )
        .unwrap_or_else(|| panic!("no POST /orders bucket le={le} in\n{text}"))
    };
    assert_eq!(server("0.25"), 0.0, "the order waited for the 300 ms reservation");
    assert_eq!(server("+Inf"), 1.0);
    // The boundaries are the explicit ones, in seconds.
    for le in [
        "0.005", "0.01", "0.025", "0.05", "0.075", "0.1", "0.75", "1", "2.5", "5", "7.5", "10",
    ] {
        server(le);
    }
    assert!(
        sample(&text, "ostore_sagas_finished_total", &[("state", "completed")]) >= Some(1.0),
        "{text}"
    );
    assert!(text.contains("# TYPE http_server_request_duration_seconds histogram"));
}

#[tokio::test]
async fn unmatched_paths_share_one_series_without_a_route() {
    let app = spawn_app().await;
    for p in ["/no/such/a", "/no/such/b", "/no/such/c"] {
        assert_eq!(app.get(p, None).await.status(), 404);
    }
    let text = scrape(&app).await;
    assert!(
        !text.contains("/no/such"),
        "raw paths must not become labels:\n{text}"
    );
    let count = sample(
        &text,
        "http_server_request_duration_seconds_count",
        &[
            ("http_request_method", "GET"),
            ("http_response_status_code", "404"),
        ],
    );
    assert_eq!(count, Some(3.0), "{text}");
}

#[tokio::test]
async fn database_gauges_show_the_outbox_backlog() {
    let app = spawn_app().await;
    app.product(1, 10, "1.00");
    let (_, token) = app.customer("gauges@example.com").await;
    let resp = app
        .place(&token, "gauges-1", json!([{"productID": 1, "quantity": 1}]))
        .await;
    assert_eq!(resp.status(), 201);
    // This app runs no relay: the order's events wait in the outbox.
    let pending = app
        .count("select count(*) from outbox where id > outbox_published_through()")
        .await;
    assert!(pending > 0);
    tokio::spawn(ostore_orders::metrics::refresh_gauges(
        app.db.clone(),
        Duration::from_millis(100),
        app.shutdown.clone(),
    ));
    let mut text = String::new();
    for _ in 0..50 {
        text = scrape(&app).await;
        if sample(&text, "ostore_outbox_pending", &[]) == Some(pending as f64) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        sample(&text, "ostore_outbox_pending", &[]),
        Some(pending as f64),
        "{text}"
    );
    assert_eq!(sample(&text, "ostore_sagas_stuck", &[]), Some(0.0), "{text}");
    assert!(
        sample(&text, "ostore_outbox_oldest_age_seconds", &[]) >= Some(0.0),
        "{text}"
    );
}

#[tokio::test]
async fn a_process_without_the_api_role_still_refreshes_the_database_gauges() {
    let db = crate::support::TestDb::new().await;
    let cfg = std::sync::Arc::new(crate::support::test_config(&db.url, &[]));
    let pool = db.pool().await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let s = shutdown.clone();
    tokio::spawn(
        async move { ostore_orders::app::run(cfg, &[ostore_orders::app::Role::Worker], pool, s).await },
    );
    let mut text = String::new();
    for _ in 0..100 {
        text = ostore_orders::metrics::prometheus_text();
        // The refresh sets the gauges one query after another: wait for the last of them.
        if sample(&text, "ostore_sagas_stuck", &[]).is_some()
            && sample(&text, "ostore_tracking_dead_letters", &[]).is_some()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shutdown.cancel();
    // Gauges a worker-only process exports (over OTLP; it serves no /metrics of its own).
    assert_eq!(sample(&text, "ostore_sagas_stuck", &[]), Some(0.0), "{text}");
    assert_eq!(sample(&text, "ostore_outbox_pending", &[]), Some(0.0), "{text}");
    assert_eq!(
        sample(&text, "ostore_tracking_dead_letters", &[]),
        Some(0.0),
        "{text}"
    );
}

#[tokio::test]
async fn the_consumer_lag_gauge_counts_the_messages_past_the_committed_offset() {
    use rdkafka::Message as _;
    use rdkafka::consumer::{CommitMode, Consumer as _};
    let broker = ostore_orders::kafka::EmbeddedBroker::start_with(&["lag"], 1).unwrap();
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap_servers())
        .create()
        .unwrap();
    for i in 0..5 {
        producer
            .send(
                rdkafka::producer::FutureRecord::to("lag")
                    .key("k")
                    .payload(&format!("{i}")),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
    }
    let mut settings = ostore_orders::kafka::ConsumerSettings::new("lag-group");
    settings.session_timeout = Duration::from_secs(6);
    settings.heartbeat_interval = Duration::from_millis(500);
    let consumer = ostore_orders::kafka::consumer(broker.bootstrap_servers(), &settings).unwrap();
    consumer.subscribe(&["lag"]).unwrap();
    // Handle the first message only, as the tracking consumer does: store, then commit.
    let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.offset(), 0);
    consumer.store_offset_from_message(&m).unwrap();
    consumer.commit_consumer_state(CommitMode::Sync).unwrap();
    drop(m);
    // Keep polling (statistics arrive with the polls) without storing the other offsets.
    let consumer = std::sync::Arc::new(consumer);
    let c = consumer.clone();
    let polling = tokio::spawn(async move {
        loop {
            let _ = c.recv().await;
        }
    });
    // librdkafka reports every 5 s; four messages are past the committed offset.
    let mut lag = None;
    for _ in 0..150 {
        lag = sample(
            &ostore_orders::metrics::prometheus_text(),
            "ostore_tracking_consumer_lag",
            &[],
        );
        if lag == Some(4.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    polling.abort();
    assert_eq!(lag, Some(4.0));
}

#[tokio::test]
async fn the_consumer_lag_gauge_shows_minus_one_when_the_member_knows_no_lag() {
    // -1 is what `kafka::member_lag` reports for a member out of its group or given no
    // partition: the alert in docs/operations.md looks for it, so it must reach the scrape.
    ostore_orders::metrics::get().set_consumer_lag(-1);
    let text = ostore_orders::metrics::prometheus_text();
    assert_eq!(
        sample(&text, "ostore_tracking_consumer_lag", &[]),
        Some(-1.0),
        "{text}"
    );
    ostore_orders::metrics::get().set_consumer_lag(3);
    let text = ostore_orders::metrics::prometheus_text();
    assert_eq!(sample(&text, "ostore_tracking_consumer_lag", &[]), Some(3.0));
}
