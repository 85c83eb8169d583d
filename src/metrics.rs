//! Metrics (OpenTelemetry, exported over OTLP with the traces when `OTEL_EXPORTER_OTLP_ENDPOINT` is
//! set; a no-op otherwise): sagas by outcome, step latency, retries, stuck sagas, outbox backlog and
//! age, dead letters, HTTP latency. Database-derived gauges are refreshed by a periodic task.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};

/// The service's instruments.
pub struct Metrics {
    /// Sagas created.
    pub sagas_started: Counter<u64>,
    /// Sagas that finished, by `state` (completed, failed, compensated, stuck).
    pub sagas_finished: Counter<u64>,
    /// Duration of one step attempt, by `step`, `kind`, `outcome` (seconds).
    pub step_duration: Histogram<f64>,
    /// Retries scheduled, by `step` and `kind`.
    pub retries: Counter<u64>,
    /// Duration of HTTP requests, by `http.route`, `http.request.method`, `http.response.status_code`.
    pub http_duration: Histogram<f64>,
    gauges: Arc<Gauges>,
}

/// Values read from the database periodically.
#[derive(Default)]
pub struct Gauges {
    /// Sagas in state `stuck`.
    pub stuck: AtomicI64,
    /// Unpublished outbox rows.
    pub outbox_pending: AtomicI64,
    /// Age of the oldest unpublished outbox row, in milliseconds.
    pub outbox_oldest_ms: AtomicI64,
    /// Dead-lettered tracking events not replayed.
    pub dead_letters: AtomicI64,
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// The instruments (created on first use from the global meter provider).
pub fn get() -> &'static Metrics {
    METRICS.get_or_init(|| {
        let meter = opentelemetry::global::meter("ostore-orders");
        let gauges = Arc::new(Gauges::default());
        let g = gauges.clone();
        let _stuck = meter
            .i64_observable_gauge("ostore.sagas.stuck")
            .with_description("Sagas waiting for an operator")
            .with_callback(move |o| o.observe(g.stuck.load(Ordering::Relaxed), &[]))
            .build();
        let g = gauges.clone();
        let _pending = meter
            .i64_observable_gauge("ostore.outbox.pending")
            .with_description("Outbox rows not yet published to Kafka")
            .with_callback(move |o| o.observe(g.outbox_pending.load(Ordering::Relaxed), &[]))
            .build();
        let g = gauges.clone();
        let _age = meter
            .f64_observable_gauge("ostore.outbox.oldest_age")
            .with_unit("s")
            .with_description("Age of the oldest unpublished outbox row")
            .with_callback(move |o| {
                o.observe(g.outbox_oldest_ms.load(Ordering::Relaxed) as f64 / 1000.0, &[])
            })
            .build();
        let g = gauges.clone();
        let _dl = meter
            .i64_observable_gauge("ostore.tracking.dead_letters")
            .with_description("Tracking events dead-lettered and not replayed")
            .with_callback(move |o| o.observe(g.dead_letters.load(Ordering::Relaxed), &[]))
            .build();
        Metrics {
            sagas_started: meter
                .u64_counter("ostore.sagas.started")
                .with_description("Sagas created")
                .build(),
            sagas_finished: meter
                .u64_counter("ostore.sagas.finished")
                .with_description("Sagas finished, by state")
                .build(),
            step_duration: meter
                .f64_histogram("ostore.saga.step.duration")
                .with_unit("s")
                .with_description("Duration of one step attempt")
                .build(),
            retries: meter
                .u64_counter("ostore.saga.retries")
                .with_description("Retries scheduled")
                .build(),
            http_duration: meter
                .f64_histogram("http.server.request.duration")
                .with_unit("s")
                .with_description("Duration of HTTP requests")
                .build(),
            gauges,
        }
    })
}

impl Metrics {
    /// Records a finished saga.
    pub fn saga_finished(&self, state: &'static str) {
        self.sagas_finished.add(1, &[KeyValue::new("state", state)]);
    }
}

/// Refreshes the database-derived gauges every `every` until `shutdown`.
pub async fn refresh_gauges(
    pool: sqlx::PgPool,
    every: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let g = get().gauges.clone();
    loop {
        let r: Result<(i64, i64, i64), sqlx::Error> = sqlx::query_as(
            r#"select (select count(*) from sagas where state = 'stuck'),
                      (select count(*) from outbox where published_at is null),
                      coalesce((select (extract(epoch from now() - min(created_at)) * 1000)::bigint
                                  from outbox where published_at is null), 0)"#,
        )
        .fetch_one(&pool)
        .await;
        if let Ok((stuck, pending, oldest)) = r {
            g.stuck.store(stuck, Ordering::Relaxed);
            g.outbox_pending.store(pending, Ordering::Relaxed);
            g.outbox_oldest_ms.store(oldest, Ordering::Relaxed);
        }
        if let Ok(n) =
            sqlx::query_scalar::<_, i64>("select count(*) from dead_letters where replayed_at is null")
                .fetch_one(&pool)
                .await
        {
            g.dead_letters.store(n, Ordering::Relaxed);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}
