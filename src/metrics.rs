//! Metrics: OpenTelemetry instruments with the semantic conventions' names and units, read two ways
//! from one meter provider: pulled in Prometheus text format at `GET /metrics` (always), and pushed
//! over OTLP with the traces when `OTEL_EXPORTER_OTLP_ENDPOINT` (or the metrics endpoint) is set.
//!
//! RED per endpoint (`http.server.request.duration` by `http.route`, `http.request.method`,
//! `http.response.status_code`, `error.type`) and per downstream (`http.client.request.duration`
//! by `server.address`, `server.port`, method, status, `error.type`); sagas started and finished by
//! outcome; step latency and retries; and gauges read from the database by every process (stuck
//! sagas, outbox backlog and age, dead letters) or from librdkafka (the tracking consumer's lag).
//! Every duration histogram has the explicit boundaries of [`DURATION_BUCKETS`] (seconds).

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, MeterProvider as _};
use opentelemetry_sdk::metrics::{MeterProviderBuilder, SdkMeterProvider};

/// Bucket boundaries of every duration histogram, in seconds: the OpenTelemetry HTTP conventions'
/// advice, which spans what an order service sees, from a 5 ms read to a 10 s saga; a request
/// slower than the service's default order wait (3 s) lands above the 2.5 s boundary, so a p99
/// alert on it can fire.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

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
    /// Duration of HTTP requests served, by `http.route`, `http.request.method`,
    /// `http.response.status_code` and, for 5xx, `error.type` (seconds).
    pub http_duration: Histogram<f64>,
    /// Duration of HTTP calls to the downstream services, by `server.address`, `server.port`,
    /// `http.request.method`, `http.response.status_code` and `error.type` (seconds).
    pub client_duration: Histogram<f64>,
    gauges: Arc<Gauges>,
}

/// Values read periodically (from the database) or reported by librdkafka.
pub struct Gauges {
    /// Sagas in state `stuck`.
    pub stuck: AtomicI64,
    /// Unpublished outbox rows.
    pub outbox_pending: AtomicI64,
    /// Age of the oldest unpublished outbox row, in milliseconds.
    pub outbox_oldest_ms: AtomicI64,
    /// Dead-lettered tracking events not replayed.
    pub dead_letters: AtomicI64,
    /// Messages of the tracking topic not yet consumed by this process's group member (sum over
    /// its partitions); -1 while the member knows the lag of none of its partitions;
    /// [`NOT_REPORTED`] (no sample) while no consumer reports it.
    pub consumer_lag: AtomicI64,
}

/// A gauge not read yet (the database's before the first refresh; the consumer lag in a process
/// that runs no consumer, or before its first report): no sample. Not -1, which the consumer lag
/// reports as a value.
const NOT_REPORTED: i64 = i64::MIN;

impl Default for Gauges {
    fn default() -> Self {
        Gauges {
            stuck: AtomicI64::new(NOT_REPORTED),
            outbox_pending: AtomicI64::new(NOT_REPORTED),
            outbox_oldest_ms: AtomicI64::new(NOT_REPORTED),
            dead_letters: AtomicI64::new(NOT_REPORTED),
            consumer_lag: AtomicI64::new(NOT_REPORTED),
        }
    }
}

struct Readers {
    provider: SdkMeterProvider,
    registry: prometheus::Registry,
}

static READERS: OnceLock<Readers> = OnceLock::new();
static METRICS: OnceLock<Metrics> = OnceLock::new();

/// Builds the process's meter provider with the Prometheus reader plus whatever `configure` adds
/// (the OTLP reader, a resource), and makes it the global one. The first call wins: a later call
/// (or [`get`] before any call, in tests) leaves the provider in place and returns it.
pub fn install(configure: impl FnOnce(MeterProviderBuilder) -> MeterProviderBuilder) -> SdkMeterProvider {
    let mut configure = Some(configure);
    let readers = READERS.get_or_init(|| {
        let registry = prometheus::Registry::new();
        let mut builder = SdkMeterProvider::builder();
        match opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .without_target_info()
            .build()
        {
            Ok(exporter) => builder = builder.with_reader(exporter),
            Err(e) => eprintln!("Prometheus metrics reader not started: {e}"),
        }
        if let Some(f) = configure.take() {
            builder = f(builder);
        }
        let provider = builder.build();
        opentelemetry::global::set_meter_provider(provider.clone());
        Readers { provider, registry }
    });
    readers.provider.clone()
}

/// The current values in Prometheus text format (version 0.0.4), for `GET /metrics`.
pub fn prometheus_text() -> String {
    use prometheus::Encoder as _;
    install(|b| b);
    let Some(readers) = READERS.get() else {
        return String::new();
    };
    let families = readers.registry.gather();
    let mut out = Vec::new();
    if let Err(e) = prometheus::TextEncoder::new().encode(&families, &mut out) {
        tracing::warn!(error = %e, "encoding metrics failed");
    }
    String::from_utf8(out).unwrap_or_default()
}

fn duration_histogram(
    meter: &opentelemetry::metrics::Meter,
    name: &'static str,
    description: &'static str,
) -> Histogram<f64> {
    meter
        .f64_histogram(name)
        .with_unit("s")
        .with_description(description)
        .with_boundaries(DURATION_BUCKETS.to_vec())
        .build()
}

/// The instruments (created on first use; installs the Prometheus-only provider when
/// [`install`] has not run).
pub fn get() -> &'static Metrics {
    METRICS.get_or_init(|| {
        let meter = install(|b| b).meter("ostore-orders");
        let gauges = Arc::new(Gauges::default());
        let observe = |f: fn(&Gauges) -> &AtomicI64| {
            let g = gauges.clone();
            move |o: &dyn opentelemetry::metrics::AsyncInstrument<i64>| {
                let v = f(&g).load(Ordering::Relaxed);
                if v != NOT_REPORTED {
                    o.observe(v, &[]);
                }
            }
        };
        let _stuck = meter
            .i64_observable_gauge("ostore.sagas.stuck")
            .with_unit("{saga}")
            .with_description("Sagas waiting for an operator")
            .with_callback(observe(|g| &g.stuck))
            .build();
        let _pending = meter
            .i64_observable_gauge("ostore.outbox.pending")
            .with_unit("{event}")
            .with_description("Outbox rows not yet published to Kafka")
            .with_callback(observe(|g| &g.outbox_pending))
            .build();
        let g = gauges.clone();
        let _age = meter
            .f64_observable_gauge("ostore.outbox.oldest_age")
            .with_unit("s")
            .with_description("Age of the oldest unpublished outbox row")
            .with_callback(move |o| {
                let ms = g.outbox_oldest_ms.load(Ordering::Relaxed);
                if ms >= 0 {
                    o.observe(ms as f64 / 1000.0, &[]);
                }
            })
            .build();
        let _dl = meter
            .i64_observable_gauge("ostore.tracking.dead_letters")
            .with_unit("{event}")
            .with_description("Tracking events dead-lettered and not replayed")
            .with_callback(observe(|g| &g.dead_letters))
            .build();
        let _lag = meter
            .i64_observable_gauge("ostore.tracking.consumer.lag")
            .with_unit("{message}")
            .with_description("Tracking events on the broker not yet consumed by this process's group member")
            .with_callback(observe(|g| &g.consumer_lag))
            .build();
        Metrics {
            sagas_started: meter
                .u64_counter("ostore.sagas.started")
                .with_unit("{saga}")
                .with_description("Sagas created")
                .build(),
            sagas_finished: meter
                .u64_counter("ostore.sagas.finished")
                .with_unit("{saga}")
                .with_description("Sagas finished, by state")
                .build(),
            step_duration: duration_histogram(
                &meter,
                "ostore.saga.step.duration",
                "Duration of one saga step attempt",
            ),
            retries: meter
                .u64_counter("ostore.saga.retries")
                .with_unit("{retry}")
                .with_description("Retries scheduled")
                .build(),
            http_duration: duration_histogram(
                &meter,
                "http.server.request.duration",
                "Duration of HTTP server requests",
            ),
            client_duration: duration_histogram(
                &meter,
                "http.client.request.duration",
                "Duration of HTTP client requests to the downstream services",
            ),
            gauges,
        }
    })
}

impl Metrics {
    /// Records a finished saga.
    pub fn saga_finished(&self, state: &'static str) {
        self.sagas_finished.add(1, &[KeyValue::new("state", state)]);
    }

    /// Records one call to a downstream service: `status` is the answer's status code, `None`
    /// when no answer came (then `error` names why: `timeout`, `connect`, …).
    pub fn downstream_call(
        &self,
        method: &str,
        url: &reqwest::Url,
        status: Option<u16>,
        error: Option<&str>,
        elapsed: Duration,
    ) {
        let mut attrs = Vec::with_capacity(5);
        attrs.push(KeyValue::new("http.request.method", method_label(method)));
        if let Some(host) = url.host_str() {
            attrs.push(KeyValue::new("server.address", host.to_string()));
        }
        if let Some(port) = url.port_or_known_default() {
            attrs.push(KeyValue::new("server.port", i64::from(port)));
        }
        if let Some(s) = status {
            attrs.push(KeyValue::new("http.response.status_code", i64::from(s)));
        }
        match (error, status) {
            (Some(e), _) => attrs.push(KeyValue::new("error.type", e.to_string())),
            (None, Some(s)) if s >= 400 => attrs.push(KeyValue::new("error.type", s.to_string())),
            _ => {}
        }
        self.client_duration.record(elapsed.as_secs_f64(), &attrs);
    }

    /// Records one request the API served. `route` is the matched route template (`/orders/{id}`),
    /// `None` for a path no route matched (left out, as the conventions say, to keep the number
    /// of series bounded).
    pub fn http_request(&self, method: &str, route: Option<&str>, status: u16, elapsed: Duration) {
        let mut attrs = Vec::with_capacity(4);
        attrs.push(KeyValue::new("http.request.method", method_label(method)));
        if let Some(r) = route {
            attrs.push(KeyValue::new("http.route", r.to_string()));
        }
        attrs.push(KeyValue::new("http.response.status_code", i64::from(status)));
        if status >= 500 {
            attrs.push(KeyValue::new("error.type", status.to_string()));
        }
        self.http_duration.record(elapsed.as_secs_f64(), &attrs);
    }

    /// Sets the tracking consumer's lag (messages), as librdkafka's statistics report it.
    pub fn set_consumer_lag(&self, lag: i64) {
        self.gauges.consumer_lag.store(lag, Ordering::Relaxed);
    }
}

/// The method as the conventions name it: one of the known methods, else `_OTHER`.
fn method_label(method: &str) -> &'static str {
    match method {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        "CONNECT" => "CONNECT",
        "TRACE" => "TRACE",
        _ => "_OTHER",
    }
}

/// Refreshes the database-derived gauges every `every` until `shutdown`. Every process runs it,
/// whatever its roles, so each one's `/metrics` or OTLP export carries them.
pub async fn refresh_gauges(
    pool: sqlx::PgPool,
    every: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let g = get().gauges.clone();
    loop {
        let r: Result<(i64, i64, i64), sqlx::Error> = sqlx::query_as(
            r#"select (select count(*) from sagas where state = 'stuck'),
                      (select count(*) from outbox where id > outbox_published_through()),
                      coalesce((select (extract(epoch from now() - min(created_at)) * 1000)::bigint
                                  from outbox where id > outbox_published_through()), 0)"#,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_labels_follow_the_conventions() {
        assert_eq!(method_label("POST"), "POST");
        assert_eq!(method_label("BREW"), "_OTHER");
    }
}
