//! How every call to an outside HTTP service is made.
//!
//! Both clients ([`super::catalog`], [`super::shipments`]) send through [`send`], which opens an
//! HTTP CLIENT span (OpenTelemetry conventions), adds the `Idempotency-Key` header and that span's
//! W3C trace context, bounds the whole exchange (connect, headers and body) by the caller's
//! timeout, and reads at most [`MAX_RESPONSE_BYTES`] of the answer. Anything that goes wrong
//! becomes a [`DownstreamError`], classified as [`super::failure`] describes.
//!
//! Trace propagation uses the global OpenTelemetry propagator, so the telemetry set-up must install
//! `opentelemetry_sdk::propagation::TraceContextPropagator` for `traceparent` to be written.

use std::time::Duration;

use opentelemetry_http::HeaderInjector;
use reqwest::header::{HeaderMap, HeaderValue};
use serde::de::DeserializeOwned;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::failure::{DownstreamError, FailureClass};

/// Largest answer body read from a downstream service; a larger one is a contract violation.
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// Name of the header that makes a downstream call idempotent.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

/// Reads an answer's body, refusing to hold more than `cap` bytes: a larger body (announced or
/// actual) is a `contract_violation`, and reading stops as soon as the cap is passed.
pub async fn read_body_capped(
    mut response: reqwest::Response,
    cap: usize,
) -> Result<Vec<u8>, DownstreamError> {
    let too_big = |status: u16| {
        DownstreamError::contract_violation(format!("answer body larger than {cap} bytes"))
            .with_status(status)
    };
    let status = response.status().as_u16();
    if response.content_length().is_some_and(|len| len > cap as u64) {
        return Err(too_big(status));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| DownstreamError::from_transport(&e).with_status(status))?
    {
        if body.len() + chunk.len() > cap {
            return Err(too_big(status));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A complete downstream answer: status, headers and (capped) body.
#[derive(Debug, Clone)]
pub struct DownstreamResponse {
    /// HTTP status code.
    pub status: u16,
    /// Response headers.
    pub headers: HeaderMap,
    /// The body, at most [`MAX_RESPONSE_BYTES`].
    pub body: Vec<u8>,
}

impl DownstreamResponse {
    /// True for a 2xx status.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// Parses the body as JSON; a body that does not parse is a `contract_violation`.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, DownstreamError> {
        serde_json::from_slice(&self.body).map_err(|e| {
            DownstreamError::contract_violation(format!(
                "HTTP {} answer is not the expected JSON: {e}",
                self.status
            ))
            .with_status(self.status)
        })
    }

    /// Classifies this answer as a failure (see [`DownstreamError::from_status`]).
    pub fn into_error(self) -> DownstreamError {
        DownstreamError::from_status(self.status, &self.headers, &self.body)
    }
}

/// Sends `request` with the `Idempotency-Key` header and the trace context of its own CLIENT span,
/// and reads the whole answer within `timeout` (connect, headers and body together).
///
/// `route` is the URL template of the call (`/inventory/reservations/{reservationID}`): the span is
/// named `{method} {route}` and carries the OpenTelemetry HTTP client attributes
/// (`http.request.method`, `url.full`, `url.template`, `server.address`, `server.port`,
/// `http.response.status_code`, `error.type`), so a trace viewer draws the dependency and the
/// downstream's SERVER span hangs under it. The status is also left for [`observed`].
///
/// Only transport failures are errors here; every HTTP answer, whatever its status, is returned
/// for the caller to interpret.
pub async fn send(
    request: reqwest::RequestBuilder,
    route: &'static str,
    idempotency_key: &str,
    timeout: Duration,
) -> Result<DownstreamResponse, DownstreamError> {
    let key = HeaderValue::from_str(idempotency_key).map_err(|_| {
        DownstreamError::new(
            FailureClass::Request,
            "idempotency key is not a valid header value",
        )
    })?;
    let (client, request) = request
        .header(IDEMPOTENCY_KEY_HEADER, key)
        .header(reqwest::header::ACCEPT, "application/json")
        .timeout(timeout)
        .build_split();
    let mut request = request.map_err(|e| DownstreamError::from_transport(&e))?;
    let (method, url) = (request.method().clone(), request.url().clone());
    let started = std::time::Instant::now();
    let span = client_span(&request, route);
    let cx = span.context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&cx, &mut HeaderInjector(request.headers_mut()));
    });
    let exchange = async {
        let response = client
            .execute(request)
            .await
            .map_err(|e| DownstreamError::from_transport(&e))?;
        let status = response.status().as_u16();
        tracing::Span::current().record("http.response.status_code", status);
        let _ = LAST_STATUS.try_with(|s| s.set(Some(status)));
        let headers = response.headers().clone();
        let body = read_body_capped(response, MAX_RESPONSE_BYTES).await?;
        Ok(DownstreamResponse {
            status,
            headers,
            body,
        })
    };
    let result = match tokio::time::timeout(timeout, exchange.instrument(span.clone())).await {
        Ok(result) => result,
        Err(_) => Err(DownstreamError::timeout(timeout)),
    };
    // `error.type`: the status code for an error answer (the conventions' choice), the failure
    // class when no answer came.
    match &result {
        Ok(r) if r.status >= 400 => {
            span.record("error.type", r.status.to_string());
            span.record("otel.status_code", "error");
        }
        Ok(_) => {}
        Err(e) => {
            span.record("error.type", e.class.as_str());
            span.record("otel.status_code", "error");
        }
    }
    let (status, error) = match &result {
        Ok(r) => (Some(r.status), None),
        Err(e) => (e.status, Some(e.class.as_str())),
    };
    crate::metrics::get().downstream_call(method.as_str(), &url, status, error, started.elapsed());
    result
}

/// Sends a call that undoes something (a release, a cancellation) as [`send`] does: any 2xx, and
/// 404 (never made, or already gone), mean it is undone; any other answer is classified.
pub(crate) async fn undo(
    request: reqwest::RequestBuilder,
    route: &'static str,
    idempotency_key: &str,
    timeout: Duration,
) -> Result<(), DownstreamError> {
    let response = send(request, route, idempotency_key, timeout).await?;
    if response.is_success() || response.status == 404 {
        Ok(())
    } else {
        Err(response.into_error())
    }
}

/// The CLIENT span of one downstream call.
fn client_span(request: &reqwest::Request, route: &'static str) -> tracing::Span {
    let url = request.url();
    let method = request.method().as_str();
    let port = url.port_or_known_default();
    tracing::info_span!(
        "http.client",
        otel.name = format!("{method} {route}"),
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        http.request.method = method,
        url.full = %url,
        url.template = route,
        server.address = url.host_str().unwrap_or(""),
        server.port = port,
        http.response.status_code = tracing::field::Empty,
        error.r#type = tracing::field::Empty,
    )
}

tokio::task_local! {
    /// The status of the last downstream answer within an [`observed`] future.
    static LAST_STATUS: std::cell::Cell<Option<u16>>;
}

/// Runs `call` and returns its output with the HTTP status of the last downstream answer it got
/// (None when no answer came): the saga history records it for successes and failures alike.
pub async fn observed<F: std::future::Future>(call: F) -> (F::Output, Option<u16>) {
    LAST_STATUS
        .scope(std::cell::Cell::new(None), async {
            let out = call.await;
            (out, LAST_STATUS.with(|s| s.get()))
        })
        .await
}

/// Percent-encodes one URL path segment (everything but RFC 3986 unreserved characters).
pub(crate) fn encode_path_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The URL of `route`, a template with one `{name}` segment (`/shipments/{shipmentID}/cancel`),
/// below `base`, with `id` percent-encoded in that segment.
pub(crate) fn url_of(base: &str, route: &str, id: &str) -> String {
    let (head, rest) = route.split_once('{').unwrap_or((route, "}"));
    let tail = rest.split_once('}').map_or("", |(_, tail)| tail);
    join_url(base, &format!("{head}{}{tail}", encode_path_segment(id)))
}

/// Joins a base URL (with or without a trailing slash) and a path starting with `/`.
pub(crate) fn join_url(base: &str, path: &str) -> String {
    format!("{}{}", base.trim_end_matches('/'), path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(encode_path_segment("a b/c?d"), "a%20b%2Fc%3Fd");
        assert_eq!(
            encode_path_segment("0b5e-AZ_~.9"),
            "0b5e-AZ_~.9",
            "unreserved characters pass"
        );
        assert_eq!(join_url("http://h:1/", "/x"), "http://h:1/x");
        assert_eq!(join_url("http://h:1", "/x"), "http://h:1/x");
        assert_eq!(
            url_of("http://h:1/", "/shipments/{shipmentID}/cancel", "a b/c"),
            "http://h:1/shipments/a%20b%2Fc/cancel"
        );
        assert_eq!(
            url_of("http://h:1", "/inventory/reservations/{reservationID}", "r-1"),
            "http://h:1/inventory/reservations/r-1"
        );
    }
}
