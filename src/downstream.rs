//! How calls to outside HTTP services are made and how their failures are classified.
//!
//! Every downstream client ([`crate::catalog`], [`crate::shipments`]) sends through [`send`], which
//! opens an HTTP CLIENT span (OpenTelemetry conventions), adds the `Idempotency-Key` header and that
//! span's W3C trace context, bounds the whole exchange (connect, headers and body) by the caller's
//! timeout, and reads at most [`MAX_RESPONSE_BYTES`] of the answer. Anything that goes wrong becomes a [`DownstreamError`] whose
//! [`FailureKind`] tells the saga engine whether to retry:
//!
//! | cause | kind | class |
//! |---|---|---|
//! | connection refused / reset, DNS failure | Transient | `connect` |
//! | no complete answer within the timeout | Transient | `timeout` |
//! | other transport failure | Transient | `request` |
//! | 5xx | Transient (honouring `Retry-After`) | `http_5xx` |
//! | 429 | Transient (honouring `Retry-After`) | `http_429` |
//! | any other 4xx | Refused | `http_4xx` |
//! | bad JSON, a body over 1 MiB, values outside the contract, an unexpected status | Transient | `contract_violation` |
//!
//! Trace propagation uses the global OpenTelemetry propagator, so the telemetry set-up must install
//! `opentelemetry_sdk::propagation::TraceContextPropagator` for `traceparent` to be written.

use std::fmt;
use std::time::Duration;

use opentelemetry_http::HeaderInjector;
use reqwest::header::{HeaderMap, HeaderValue};
use serde::de::DeserializeOwned;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Largest answer body read from a downstream service; a larger one is a contract violation.
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// Name of the header that makes a downstream call idempotent.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

/// Longest `Retry-After` taken at face value; longer hints are clamped to it.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

/// Longest excerpt of an error answer kept in a [`DownstreamError`] message.
const MAX_ERROR_EXCERPT: usize = 200;

/// Stable names of failure classes (persisted in saga history as `errorClass`; never rename).
pub mod class {
    /// The connection could not be made (refused, reset, DNS).
    pub const CONNECT: &str = "connect";
    /// No complete answer within the call's timeout.
    pub const TIMEOUT: &str = "timeout";
    /// Any other transport failure (request could not be built or sent, body cut off).
    pub const REQUEST: &str = "request";
    /// The service answered 5xx.
    pub const HTTP_5XX: &str = "http_5xx";
    /// The service answered 429 Too Many Requests.
    pub const HTTP_429: &str = "http_429";
    /// The service answered another 4xx: a business refusal.
    pub const HTTP_4XX: &str = "http_4xx";
    /// The answer did not fit the contract (bad JSON, oversized, wrong values, unexpected status).
    pub const CONTRACT_VIOLATION: &str = "contract_violation";
}

/// Whether a failed call may be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Retry with backoff (connect errors, timeouts, 5xx, 429, contract violations).
    Transient,
    /// A business refusal: do not retry, compensate.
    Refused,
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FailureKind::Transient => "transient",
            FailureKind::Refused => "refused",
        })
    }
}

/// A failed call to an outside service, classified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{class}: {message}")]
pub struct DownstreamError {
    /// Retry or not.
    pub kind: FailureKind,
    /// One of the names in [`class`].
    pub class: &'static str,
    /// What happened, for logs and the saga history; never contains request bodies or secrets,
    /// at most a short excerpt of the service's error answer.
    pub message: String,
    /// The HTTP status the service answered, when it answered.
    pub status: Option<u16>,
    /// The service's `Retry-After` hint (seconds or HTTP date), on 429 and 5xx answers.
    pub retry_after: Option<Duration>,
}

impl DownstreamError {
    /// A retryable failure of the given class.
    pub fn transient(class: &'static str, message: impl Into<String>) -> Self {
        DownstreamError {
            kind: FailureKind::Transient,
            class,
            message: message.into(),
            status: None,
            retry_after: None,
        }
    }

    /// An answer that does not fit the contract (retryable, class `contract_violation`).
    pub fn contract_violation(message: impl Into<String>) -> Self {
        Self::transient(class::CONTRACT_VIOLATION, message)
    }

    /// No complete answer within `after`.
    pub fn timeout(after: Duration) -> Self {
        Self::transient(
            class::TIMEOUT,
            format!("no complete answer within {} ms", after.as_millis()),
        )
    }

    /// Records the HTTP status the service answered.
    pub fn with_status(mut self, status: u16) -> Self {
        self.status = Some(status);
        self
    }

    /// True when the call may be retried.
    pub fn is_transient(&self) -> bool {
        self.kind == FailureKind::Transient
    }

    /// Classifies a transport error from `reqwest` (no HTTP answer was received, or its body was
    /// cut off).
    pub fn from_transport(err: &reqwest::Error) -> Self {
        let class = if err.is_timeout() {
            class::TIMEOUT
        } else if err.is_connect() {
            class::CONNECT
        } else {
            class::REQUEST
        };
        let mut error = Self::transient(class, error_chain(err));
        error.status = err.status().map(|s| s.as_u16());
        error
    }

    /// Classifies an HTTP answer the caller did not expect, from its status, headers and body.
    ///
    /// 429 and 5xx are transient (with `Retry-After` when given); other 4xx are refusals; anything
    /// else (1xx, 3xx, an unexpected 2xx) breaks the contract.
    pub fn from_status(status: u16, headers: &HeaderMap, body: &[u8]) -> Self {
        let reason = http::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("");
        let excerpt = error_excerpt(body);
        let mut message = format!("HTTP {status} {reason}").trim_end().to_string();
        if !excerpt.is_empty() {
            message.push_str(": ");
            message.push_str(&excerpt);
        }
        let (kind, class) = match status {
            429 => (FailureKind::Transient, class::HTTP_429),
            500..=599 => (FailureKind::Transient, class::HTTP_5XX),
            400..=499 => (FailureKind::Refused, class::HTTP_4XX),
            _ => {
                return Self::contract_violation(format!("unexpected answer: {message}")).with_status(status);
            }
        };
        let retry_after = match kind {
            FailureKind::Transient => headers
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_retry_after),
            FailureKind::Refused => None,
        };
        DownstreamError {
            kind,
            class,
            message,
            status: Some(status),
            retry_after,
        }
    }
}

/// Parses a `Retry-After` value: delay in seconds, or an HTTP date (a date in the past gives 0).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds).min(MAX_RETRY_AFTER));
    }
    let at = time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc2822).ok()?;
    let delay = at - time::OffsetDateTime::now_utc();
    Some(
        Duration::try_from(delay)
            .unwrap_or(Duration::ZERO)
            .min(MAX_RETRY_AFTER),
    )
}

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
        DownstreamError::transient(class::REQUEST, "idempotency key is not a valid header value")
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
            span.record("error.type", e.class);
            span.record("otel.status_code", "error");
        }
    }
    let (status, error) = match &result {
        Ok(r) => (Some(r.status), None),
        Err(e) => (e.status, Some(e.class)),
    };
    crate::metrics::get().downstream_call(method.as_str(), &url, status, error, started.elapsed());
    result
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

/// Joins a base URL (with or without a trailing slash) and a path starting with `/`.
pub(crate) fn join_url(base: &str, path: &str) -> String {
    format!("{}{}", base.trim_end_matches('/'), path)
}

/// The error and its sources, joined with `": "`.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

/// A short, printable excerpt of an error answer: its JSON `error`/`detail`/`title` member when
/// there is one, else the start of the body.
fn error_excerpt(body: &[u8]) -> String {
    let from_json = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|value| {
            ["error", "detail", "title"]
                .iter()
                .find_map(|member| value.get(member).and_then(|v| v.as_str()).map(str::to_string))
        });
    let text = from_json.unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    let mut excerpt: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_ERROR_EXCERPT)
        .collect();
    if text.chars().count() > MAX_ERROR_EXCERPT {
        excerpt.push('…');
    }
    excerpt.trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn server_errors_are_transient_and_keep_retry_after() {
        let error = DownstreamError::from_status(503, &headers(&[("retry-after", "7")]), b"");
        assert_eq!(error.kind, FailureKind::Transient);
        assert_eq!(error.class, class::HTTP_5XX);
        assert_eq!(error.status, Some(503));
        assert_eq!(error.retry_after, Some(Duration::from_secs(7)));
    }

    #[test]
    fn too_many_requests_is_transient_with_its_retry_after() {
        let error = DownstreamError::from_status(429, &headers(&[("retry-after", "3")]), b"{}");
        assert_eq!(error.kind, FailureKind::Transient);
        assert_eq!(error.class, class::HTTP_429);
        assert_eq!(error.retry_after, Some(Duration::from_secs(3)));
    }

    #[test]
    fn other_client_errors_are_refusals_without_retry_after() {
        let body = br#"{"error":"no such warehouse"}"#;
        let error = DownstreamError::from_status(422, &headers(&[("retry-after", "3")]), body);
        assert_eq!(error.kind, FailureKind::Refused);
        assert_eq!(error.class, class::HTTP_4XX);
        assert_eq!(error.retry_after, None);
        assert_eq!(error.message, "HTTP 422 Unprocessable Entity: no such warehouse");
    }

    #[test]
    fn redirects_and_informational_answers_break_the_contract() {
        let error = DownstreamError::from_status(302, &HeaderMap::new(), b"");
        assert_eq!(error.kind, FailureKind::Transient);
        assert_eq!(error.class, class::CONTRACT_VIOLATION);
    }

    #[test]
    fn retry_after_accepts_seconds_and_http_dates() {
        assert_eq!(parse_retry_after(" 2 "), Some(Duration::from_secs(2)));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO)
        );
        let later = time::OffsetDateTime::now_utc() + time::Duration::seconds(120);
        let formatted = later
            .format(&time::format_description::well_known::Rfc2822)
            .unwrap();
        let parsed = parse_retry_after(&formatted).unwrap();
        assert!(parsed > Duration::from_secs(100) && parsed <= Duration::from_secs(120));
        assert_eq!(parse_retry_after("soon"), None);
        assert_eq!(
            parse_retry_after("99999999999"),
            Some(MAX_RETRY_AFTER),
            "absurd hints are clamped"
        );
    }

    #[test]
    fn error_excerpts_are_short_and_printable() {
        let body = format!("line\none{}", "x".repeat(1000));
        let excerpt = error_excerpt(body.as_bytes());
        assert!(excerpt.starts_with("line one"));
        assert!(excerpt.chars().count() <= MAX_ERROR_EXCERPT + 1);
    }

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
    }
}
