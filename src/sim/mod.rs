//! Simulators of the downstream services of SPEC §4, for development, tests and benchmarks.
//!
//! [`catalog::CatalogSim`] plays the Product Catalog (stock and reservations) and
//! [`shipments::ShipmentsSim`] the Shipment Tracking service (shipments, and their TrackingEvents
//! on Kafka). Both are real axum HTTP servers with in-memory state: they honour the business
//! contracts the service relies on, idempotency on `Idempotency-Key` included, and expose the
//! `/sim` control API through which tests, demos and benchmarks steer them (products, listings,
//! manual advances, and the fault injection of [`faults`]).
//!
//! Every business handler continues the caller's trace: the W3C `traceparent` of the request
//! becomes the parent of the handler's span (through the global OpenTelemetry propagator).
//!
//! The simulators share only the wire types of [`crate::downstream::contract`] with the service.

pub mod catalog;
pub mod faults;
pub mod shipments;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::Context as _;
use axum::Json;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_http::HeaderExtractor;
use tokio_util::sync::CancellationToken;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// How long [`serve`] lets in-flight calls finish after shutdown was requested.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves a router on a bound listener until `shutdown` is cancelled.
///
/// After cancellation, in-flight calls get a few seconds to finish (a call held by a `hang` fault
/// would otherwise keep the server alive forever); then the function returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let addr = listener.local_addr().ok();
    let server = axum::serve(listener, router).with_graceful_shutdown(shutdown.clone().cancelled_owned());
    let grace = async {
        shutdown.cancelled().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        result = server => result.with_context(|| format!("simulator server on {addr:?} failed")),
        () = grace => {
            tracing::warn!(?addr, "simulator calls still in flight after the shutdown grace period; leaving them");
            Ok(())
        }
    }
}

/// The SERVER span of one simulator call (`endpoint` names it in logs; `method` and `route` name it
/// in traces, as the OpenTelemetry HTTP conventions do), whose parent is the caller's trace when
/// the request carried a `traceparent`.
pub(crate) fn request_span(
    endpoint: &'static str,
    method: &'static str,
    route: &'static str,
    headers: &HeaderMap,
) -> tracing::Span {
    let span = tracing::info_span!(
        "sim.call",
        otel.name = format!("{method} {route}"),
        otel.kind = "server",
        endpoint,
        http.request.method = method,
        http.route = route,
        idempotency_key = tracing::field::Empty,
    );
    if let Some(key) = idempotency_key(headers) {
        span.record("idempotency_key", key.as_str());
    }
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(headers))
    });
    if parent.span().span_context().is_valid() {
        // Fails only when no OpenTelemetry layer is installed, and then there is no trace to join.
        let _ = span.set_parent(parent);
    }
    span
}

/// The W3C trace context of the current span, as header name/value pairs (empty without one).
pub(crate) fn current_trace_headers() -> HashMap<String, String> {
    let mut headers = HashMap::new();
    let cx = tracing::Span::current().context();
    if cx.span().span_context().is_valid() {
        opentelemetry::global::get_text_map_propagator(|propagator| {
            propagator.inject_context(&cx, &mut headers);
        });
    }
    headers
}

/// The request's `Idempotency-Key`, when present and printable.
pub(crate) fn idempotency_key(headers: &HeaderMap) -> Option<String> {
    headers
        .get("idempotency-key")
        .and_then(|value| value.to_str().ok())
        .map(str::trim)
        .filter(|key| !key.is_empty())
        .map(str::to_string)
}

/// A JSON error answer `{"error": message}`.
pub(crate) fn json_error(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

/// The 400 answer to a business call without `Idempotency-Key`.
pub(crate) fn missing_idempotency_key() -> Response {
    json_error(StatusCode::BAD_REQUEST, "the Idempotency-Key header is required")
}

/// A refused control or business request: status and message, rendered as `{"error": message}`.
#[derive(Debug)]
pub(crate) struct Rejection {
    status: StatusCode,
    message: String,
}

impl Rejection {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Rejection {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        json_error(self.status, &self.message)
    }
}

/// Parses a JSON request body: 400 for bad JSON, 422 for JSON of the wrong shape.
pub(crate) fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Rejection> {
    serde_json::from_slice(body).map_err(|e| {
        let status = if e.is_syntax() || e.is_eof() {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::UNPROCESSABLE_ENTITY
        };
        Rejection::new(status, format!("invalid request body: {e}"))
    })
}

/// Counts every business request per endpoint and `Idempotency-Key`, faulted ones included.
#[derive(Debug, Default)]
pub(crate) struct CallLog {
    calls: BTreeMap<&'static str, BTreeMap<String, u64>>,
}

impl CallLog {
    /// Counts one request.
    pub(crate) fn count(&mut self, endpoint: &'static str, key: &str) {
        *self
            .calls
            .entry(endpoint)
            .or_default()
            .entry(key.to_string())
            .or_default() += 1;
    }

    /// How many requests `key` made to `endpoint`.
    pub(crate) fn get(&self, endpoint: &'static str, key: &str) -> u64 {
        self.calls
            .get(endpoint)
            .and_then(|keys| keys.get(key))
            .copied()
            .unwrap_or(0)
    }

    /// `{key: count}` for the given keys of `endpoint`.
    pub(crate) fn for_keys(&self, endpoint: &'static str, keys: &[String]) -> BTreeMap<String, u64> {
        keys.iter()
            .map(|key| (key.clone(), self.get(endpoint, key)))
            .collect()
    }

    /// `{endpoint: {key: count}}` of every request counted.
    pub(crate) fn all(&self) -> &BTreeMap<&'static str, BTreeMap<String, u64>> {
        &self.calls
    }
}

/// The control API's answers to `PUT`, `GET` and `DELETE /sim/faults`.
pub(crate) mod fault_routes {
    use axum::Json;
    use axum::body::Bytes;
    use axum::http::StatusCode;
    use axum::response::{IntoResponse, Response};

    use super::faults::Faults;
    use super::json_error;

    /// `PUT /sim/faults`: one fault or a list; replaces the set; answers the new set.
    pub(crate) fn put(faults: &Faults, body: &Bytes) -> Response {
        match Faults::parse(body).and_then(|parsed| faults.replace(parsed)) {
            Ok(()) => (StatusCode::OK, Json(faults.list())).into_response(),
            Err(e) => json_error(StatusCode::UNPROCESSABLE_ENTITY, &e.0),
        }
    }

    /// `GET /sim/faults`: the current set.
    pub(crate) fn get(faults: &Faults) -> Response {
        (StatusCode::OK, Json(faults.list())).into_response()
    }

    /// `DELETE /sim/faults`: clears the set and releases hanging calls.
    pub(crate) fn delete(faults: &Faults) -> Response {
        faults.clear();
        StatusCode::NO_CONTENT.into_response()
    }
}
