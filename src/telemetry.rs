//! Logging and OpenTelemetry: structured logs (pretty or JSON) filtered by `RUST_LOG`, W3C trace
//! context propagation, and OTLP export of traces and metrics when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! a signal-specific `OTEL_*` endpoint) is set. The OpenTelemetry layer has its own filter, so
//! `RUST_LOG=warn` quiets logs without silencing traces.

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithHttpConfig as _;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Log output format (`LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable, coloured when the terminal allows.
    Pretty,
    /// One JSON object per line, with the trace id.
    Json,
}

/// Flushes and stops exporters when dropped (at shutdown).
pub struct TelemetryGuard {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
}

impl TelemetryGuard {
    /// Exports every span and metric recorded so far (tests, and before a planned exit).
    pub fn flush(&self) {
        if let Some(t) = &self.tracer {
            let _ = t.force_flush();
        }
        if let Some(m) = &self.meter {
            let _ = m.force_flush();
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(t) = self.tracer.take() {
            let _ = t.shutdown();
        }
        if let Some(m) = self.meter.take() {
            let _ = m.shutdown();
        }
    }
}

/// The log filter when `RUST_LOG` is unset.
pub const DEFAULT_LOG_FILTER: &str = "info,sqlx=warn,rdkafka=warn";

fn export_configured(signal: &str) -> bool {
    let set = |k: &str| std::env::var(k).map(|v| !v.trim().is_empty()).unwrap_or(false);
    let disabled = std::env::var(format!("OTEL_{signal}_EXPORTER"))
        .map(|v| v.eq_ignore_ascii_case("none"))
        .unwrap_or(false);
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set(&format!("OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")))
}

/// How an OTLP export that failed with a retryable error (connection refused, 429, 502, 503, 504)
/// is tried again: up to 5 more times, from 200 ms doubling to at most 5 s, with jitter; the batch
/// is dropped (and logged by the SDK) only after that.
fn otlp_retry_policy() -> opentelemetry_otlp::RetryPolicy {
    opentelemetry_otlp::RetryPolicy::recommended()
        .with_max_retries(5)
        .with_initial_delay(std::time::Duration::from_millis(200))
        .with_max_delay(std::time::Duration::from_secs(5))
        .with_max_jitter(std::time::Duration::from_millis(100))
}

fn resource(default_service: &str) -> opentelemetry_sdk::Resource {
    let b = opentelemetry_sdk::Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_ok() {
        b.build()
    } else {
        b.with_service_name(default_service.to_string()).build()
    }
}

/// Installs the global subscriber. Call once per process; a second call is a no-op (tests).
pub fn init(default_service: &str, format: LogFormat) -> TelemetryGuard {
    let mut provider_builder = SdkTracerProvider::builder().with_resource(resource(default_service));
    if export_configured("TRACES") {
        match opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_retry_policy(otlp_retry_policy())
            .build()
        {
            Ok(exp) => provider_builder = provider_builder.with_batch_exporter(exp),
            Err(e) => eprintln!("OTLP trace exporter not started: {e}"),
        }
    }
    install(provider_builder.build(), default_service, format)
}

/// Installs the global subscriber with spans going synchronously to `exporter` (tests read the
/// spans back from it).
pub fn init_with_span_exporter<E>(default_service: &str, exporter: E) -> TelemetryGuard
where
    E: opentelemetry_sdk::trace::SpanExporter + 'static,
{
    let provider = SdkTracerProvider::builder()
        .with_resource(resource(default_service))
        .with_simple_exporter(exporter)
        .build();
    install(provider, default_service, LogFormat::Pretty)
}

fn install(provider: SdkTracerProvider, default_service: &str, format: LogFormat) -> TelemetryGuard {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    opentelemetry::global::set_tracer_provider(provider.clone());
    let tracer = provider.tracer("ostore-orders");

    // One meter provider: `GET /metrics` reads it in Prometheus format, and OTLP pushes it when
    // an endpoint is configured.
    let otlp_reader = if export_configured("METRICS") {
        match opentelemetry_otlp::MetricExporter::builder()
            .with_http()
            .with_retry_policy(otlp_retry_policy())
            .build()
        {
            Ok(exp) => Some(opentelemetry_sdk::metrics::PeriodicReader::builder(exp).build()),
            Err(e) => {
                eprintln!("OTLP metric exporter not started: {e}");
                None
            }
        }
    } else {
        None
    };
    let resource = resource(default_service);
    let meter = Some(crate::metrics::install(move |b| {
        let b = b.with_resource(resource);
        match otlp_reader {
            Some(r) => b.with_reader(r),
            None => b,
        }
    }));

    let log_filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    let otel_filter = EnvFilter::try_from_env("OTEL_TRACES_FILTER")
        .unwrap_or_else(|_| EnvFilter::new("ostore_orders=info,tower_http=info"));
    let otel_layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(otel_filter);
    let fmt_layer = match format {
        // One JSON object per line; inside a span, `openTelemetry` carries the trace id and span
        // id of the innermost span (the ids a trace viewer shows), not just on the request span.
        LogFormat::Json => json_subscriber::fmt::layer()
            .with_current_span(true)
            .with_span_list(false)
            .with_opentelemetry_ids(true)
            .with_filter(log_filter)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .compact()
            .with_filter(log_filter)
            .boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(otel_layer)
        .with(fmt_layer)
        .try_init();
    TelemetryGuard {
        tracer: Some(provider),
        meter,
    }
}

/// The trace id of a span as 32 hex digits (all zeros when tracing is off).
pub fn trace_id_of(span: &tracing::Span) -> String {
    span.context().span().span_context().trace_id().to_string()
}

/// The W3C context of a span, as `traceparent` (+ `tracestate`) entries.
pub fn context_headers(span: &tracing::Span) -> HashMap<String, String> {
    let mut map = HashMap::new();
    let cx = span.context();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut MapInjector(&mut map)));
    map
}

/// Makes `span` a child of the remote context in `headers` (a `traceparent` from a caller, an
/// outbox row or a Kafka message). Without a valid `traceparent` nothing changes.
pub fn set_remote_parent(span: &tracing::Span, headers: &dyn Extractor) {
    if headers.get("traceparent").is_none() {
        return;
    }
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(headers));
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// Adds to `span` a link to the span of a `traceparent` (an earlier session of the same work);
/// an unreadable value adds nothing.
pub fn add_link(span: &tracing::Span, traceparent: &str) {
    let mut headers = HashMap::new();
    headers.insert("traceparent".to_string(), traceparent.to_string());
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&MapExtractor(&headers)));
    let linked = cx.span().span_context().clone();
    if linked.is_valid() {
        span.add_link(linked);
    }
}

/// Puts `span` in the trace of `stored` (an order's or a saga's stored context) with a link to
/// the span current now (the request that caused it, in a trace of its own), and returns the
/// context of `span`: what an event written for that order on behalf of this request carries.
/// Without a valid stored context the span stays where it is.
pub fn in_stored_trace(span: &tracing::Span, stored: &HashMap<String, String>) -> HashMap<String, String> {
    let current = tracing::Span::current().context().span().span_context().clone();
    set_remote_parent(span, &MapExtractor(stored));
    if current.is_valid() {
        span.add_link(current);
    }
    let headers = context_headers(span);
    if headers.contains_key("traceparent") {
        headers
    } else {
        stored.clone()
    }
}

struct MapInjector<'a>(&'a mut HashMap<String, String>);

impl Injector for MapInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_string(), value);
    }
}

/// An extractor over a string map (for example a JSON object stored with a saga).
pub struct MapExtractor<'a>(pub &'a HashMap<String, String>);

impl Extractor for MapExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}
