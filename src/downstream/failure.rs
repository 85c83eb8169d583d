//! Failure classification of downstream calls: every way a call can fail becomes a
//! [`DownstreamError`] with a [`FailureClass`] (what happened) and a [`FailureKind`] (retry or not).
//! The class's persisted name ([`FailureClass::as_str`], the constants of [`class`]) is written to
//! the saga history as `errorClass`; in the code the class is the enum.
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

use std::fmt;
use std::time::Duration;

use reqwest::header::HeaderMap;

/// Longest `Retry-After` taken at face value; longer hints are clamped to it.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

/// Longest excerpt of an error answer kept in a [`DownstreamError`] message.
const MAX_ERROR_EXCERPT: usize = 200;

/// What went wrong with a downstream call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureClass {
    /// The connection could not be made (refused, reset, DNS).
    Connect,
    /// No complete answer within the call's timeout.
    Timeout,
    /// Any other transport failure (request could not be built or sent, body cut off).
    Request,
    /// The service answered 5xx.
    Http5xx,
    /// The service answered 429 Too Many Requests.
    Http429,
    /// The service answered another 4xx: a business refusal.
    Http4xx,
    /// The answer did not fit the contract (bad JSON, oversized, wrong values, unexpected status).
    ContractViolation,
}

impl FailureClass {
    /// The class's stable name, persisted in saga history as `errorClass` (never rename).
    pub const fn as_str(self) -> &'static str {
        match self {
            FailureClass::Connect => "connect",
            FailureClass::Timeout => "timeout",
            FailureClass::Request => "request",
            FailureClass::Http5xx => "http_5xx",
            FailureClass::Http429 => "http_429",
            FailureClass::Http4xx => "http_4xx",
            FailureClass::ContractViolation => "contract_violation",
        }
    }

    /// Whether a failure of this class may be retried: only another 4xx is a refusal.
    pub const fn kind(self) -> FailureKind {
        match self {
            FailureClass::Http4xx => FailureKind::Refused,
            _ => FailureKind::Transient,
        }
    }
}

impl fmt::Display for FailureClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The persisted names of the failure classes, for code that reads them back from saga history.
pub mod class {
    use super::FailureClass;

    /// [`FailureClass::Connect`].
    pub const CONNECT: &str = FailureClass::Connect.as_str();
    /// [`FailureClass::Timeout`].
    pub const TIMEOUT: &str = FailureClass::Timeout.as_str();
    /// [`FailureClass::Request`].
    pub const REQUEST: &str = FailureClass::Request.as_str();
    /// [`FailureClass::Http5xx`].
    pub const HTTP_5XX: &str = FailureClass::Http5xx.as_str();
    /// [`FailureClass::Http429`].
    pub const HTTP_429: &str = FailureClass::Http429.as_str();
    /// [`FailureClass::Http4xx`].
    pub const HTTP_4XX: &str = FailureClass::Http4xx.as_str();
    /// [`FailureClass::ContractViolation`].
    pub const CONTRACT_VIOLATION: &str = FailureClass::ContractViolation.as_str();
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
    /// What happened (its persisted name is [`FailureClass::as_str`]).
    pub class: FailureClass,
    /// What happened, for logs and the saga history; never contains request bodies or secrets,
    /// at most a short excerpt of the service's error answer.
    pub message: String,
    /// The HTTP status the service answered, when it answered.
    pub status: Option<u16>,
    /// The service's `Retry-After` hint (seconds or HTTP date), on 429 and 5xx answers.
    pub retry_after: Option<Duration>,
}

impl DownstreamError {
    /// A failure of the given class, retryable as the class says ([`FailureClass::kind`]).
    pub fn new(class: FailureClass, message: impl Into<String>) -> Self {
        DownstreamError {
            kind: class.kind(),
            class,
            message: message.into(),
            status: None,
            retry_after: None,
        }
    }

    /// An answer that does not fit the contract (retryable, class `contract_violation`).
    pub fn contract_violation(message: impl Into<String>) -> Self {
        Self::new(FailureClass::ContractViolation, message)
    }

    /// No complete answer within `after`.
    pub fn timeout(after: Duration) -> Self {
        Self::new(
            FailureClass::Timeout,
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
            FailureClass::Timeout
        } else if err.is_connect() {
            FailureClass::Connect
        } else {
            FailureClass::Request
        };
        let mut error = Self::new(class, error_chain(err));
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
        let class = match status {
            429 => FailureClass::Http429,
            500..=599 => FailureClass::Http5xx,
            400..=499 => FailureClass::Http4xx,
            _ => {
                return Self::contract_violation(format!("unexpected answer: {message}")).with_status(status);
            }
        };
        let kind = class.kind();
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
    use reqwest::header::HeaderValue;

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
        assert_eq!(error.class, FailureClass::Http5xx);
        assert_eq!(error.status, Some(503));
        assert_eq!(error.retry_after, Some(Duration::from_secs(7)));
    }

    #[test]
    fn too_many_requests_is_transient_with_its_retry_after() {
        let error = DownstreamError::from_status(429, &headers(&[("retry-after", "3")]), b"{}");
        assert_eq!(error.kind, FailureKind::Transient);
        assert_eq!(error.class, FailureClass::Http429);
        assert_eq!(error.retry_after, Some(Duration::from_secs(3)));
    }

    #[test]
    fn other_client_errors_are_refusals_without_retry_after() {
        let body = br#"{"error":"no such warehouse"}"#;
        let error = DownstreamError::from_status(422, &headers(&[("retry-after", "3")]), body);
        assert_eq!(error.kind, FailureKind::Refused);
        assert_eq!(error.class, FailureClass::Http4xx);
        assert_eq!(error.retry_after, None);
        assert_eq!(error.message, "HTTP 422 Unprocessable Entity: no such warehouse");
    }

    #[test]
    fn redirects_and_informational_answers_break_the_contract() {
        let error = DownstreamError::from_status(302, &HeaderMap::new(), b"");
        assert_eq!(error.kind, FailureKind::Transient);
        assert_eq!(error.class, FailureClass::ContractViolation);
    }

    #[test]
    fn persisted_class_names_never_change() {
        let names: Vec<&str> = [
            FailureClass::Connect,
            FailureClass::Timeout,
            FailureClass::Request,
            FailureClass::Http5xx,
            FailureClass::Http429,
            FailureClass::Http4xx,
            FailureClass::ContractViolation,
        ]
        .iter()
        .map(|c| c.as_str())
        .collect();
        assert_eq!(
            names,
            [
                "connect",
                "timeout",
                "request",
                "http_5xx",
                "http_429",
                "http_4xx",
                "contract_violation"
            ]
        );
        assert_eq!(class::HTTP_4XX, "http_4xx");
        assert_eq!(FailureClass::Http4xx.kind(), FailureKind::Refused);
        assert_eq!(FailureClass::Http429.kind(), FailureKind::Transient);
        assert_eq!(FailureClass::ContractViolation.to_string(), "contract_violation");
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
}
