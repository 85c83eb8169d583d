//! The one API error type. Every error the service answers is `application/problem+json`
//! (RFC 9457: `type`, `title`, `status`, `detail`) and also carries the seed's `error` string member,
//! so clients written against the seed keep working. Internal causes are logged once, here, and never
//! reach a client.

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

/// Media type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// The shape of every error body, for the OpenAPI document (`components.schemas.Problem`); the
/// answers themselves are built by [`ApiError::body`].
#[derive(utoipa::ToSchema)]
#[schema(as = Problem)]
#[allow(dead_code)]
pub struct ProblemSchema {
    /// `/problems/{slug}`: a stable identifier of the problem type (docs/errors.md lists them).
    #[schema(example = "/problems/validation")]
    r#type: String,
    /// Short, fixed summary of the problem type.
    title: String,
    /// The HTTP status, repeated.
    #[schema(minimum = 400, maximum = 599)]
    status: u16,
    /// What went wrong in this occurrence.
    detail: String,
    /// The same text as `detail` (the seed's member, kept for its clients).
    error: String,
    /// 422: the JSON path of the offending field (`orderItems[2].quantity`).
    field: Option<String>,
    /// 429: seconds until the limit lets a request through (also in `Retry-After`).
    #[schema(rename = "retryAfterSeconds")]
    retry_after_seconds: Option<u64>,
    /// 409 from `POST /orders`: the products out of stock, with what was asked and what is left.
    unavailable: Option<Vec<serde_json::Value>>,
    /// 409 from `POST /orders`: the order the request's saga cancelled.
    #[schema(rename = "orderID")]
    order_id: Option<i64>,
    /// 409 from a cancel: the order's status that forbids it.
    #[schema(rename = "orderStatus")]
    order_status: Option<String>,
    /// 503 from `/readyz`: each failed check and why.
    checks: Option<serde_json::Value>,
}

/// An error answer (boxed: it travels in every handler's `Result`).
#[derive(Debug)]
pub struct ApiError(pub Box<Problem>);

/// The content of an error answer: status, a stable problem type slug, and what the client may know.
#[derive(Debug)]
pub struct Problem {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable slug of the problem type; the `type` member is `/problems/{slug}`.
    pub slug: &'static str,
    /// Short, fixed summary of the problem type.
    pub title: &'static str,
    /// What went wrong in this occurrence (safe to show).
    pub detail: String,
    /// Extra members (for example `field`, `unavailable`, `orderStatus`).
    pub extra: Map<String, Value>,
    /// Extra response headers (for example `Retry-After`, `WWW-Authenticate`).
    pub headers: HeaderMap,
}

impl ApiError {
    /// A new error with no extra members.
    pub fn new(
        status: StatusCode,
        slug: &'static str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Self(Box::new(Problem {
            status,
            slug,
            title,
            detail: detail.into(),
            extra: Map::new(),
            headers: HeaderMap::new(),
        }))
    }

    /// Adds a member to the problem body.
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.0.extra.insert(key.to_string(), value.into());
        self
    }

    /// Adds a response header.
    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.0.headers.insert(name, value);
        self
    }

    /// 400: the request cannot be read (malformed JSON, a missing required header).
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad-request", "Bad request", detail)
    }

    /// 422 naming the offending field.
    pub fn invalid_field(field: &str, detail: impl Into<String>) -> Self {
        let detail = detail.into();
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            "Invalid request",
            detail,
        )
        .with("field", field)
    }

    /// 401 for a request that brought no credentials: `WWW-Authenticate: Bearer` without an error
    /// code (RFC 6750 §3.1).
    pub fn unauthenticated(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized", detail).header(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"ostore\""),
        )
    }

    /// 401 for credentials that were refused: `WWW-Authenticate: Bearer` with
    /// `error="invalid_token"`.
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized", detail).header(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"ostore\", error=\"invalid_token\""),
        )
    }

    /// 403.
    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", "Forbidden", detail)
    }

    /// 404.
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", "Not found", detail)
    }

    /// 409.
    pub fn conflict(slug: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, slug, "Conflict", detail)
    }

    /// 429 with `Retry-After` in whole seconds (at least 1).
    pub fn too_many_requests(retry_after_secs: u64, detail: impl Into<String>) -> Self {
        let secs = retry_after_secs.max(1);
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate-limited",
            "Too many requests",
            detail,
        )
        .header(header::RETRY_AFTER, HeaderValue::from(secs))
        .with("retryAfterSeconds", secs)
    }

    /// 503.
    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "Service unavailable",
            detail,
        )
    }

    /// 500: logs the cause once and answers a generic body.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal server error",
            "the service could not complete the request; it has been logged",
        )
    }

    /// The problem document.
    pub fn body(&self) -> Value {
        let p = &self.0;
        let mut body = json!({
            "type": format!("/problems/{}", p.slug),
            "title": p.title,
            "status": p.status.as_u16(),
            "detail": p.detail,
            "error": p.detail,
        });
        if let Value::Object(map) = &mut body {
            for (k, v) in &p.extra {
                map.insert(k.clone(), v.clone());
            }
        }
        body
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.0.status.as_u16(), self.0.slug, self.0.detail)
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::Io(_)
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::WorkerCrashed => {
                tracing::error!(error = %e, "database unavailable");
                Self::unavailable("the service is temporarily unavailable; try again shortly")
                    .header(header::RETRY_AFTER, HeaderValue::from_static("1"))
            }
            // The server is shutting down or restarting (SQLSTATE class 57P: admin_shutdown,
            // crash_shutdown, cannot_connect_now) or the connection failed (class 08): as
            // unavailable as a refused connection (scripts/chaos saw 500s during `pg_ctl restart`).
            sqlx::Error::Database(db)
                if db
                    .code()
                    .is_some_and(|c| c.starts_with("57P") || c.starts_with("08")) =>
            {
                tracing::error!(error = %e, "database unavailable");
                Self::unavailable("the service is temporarily unavailable; try again shortly")
                    .header(header::RETRY_AFTER, HeaderValue::from_static("1"))
            }
            // A character PostgreSQL cannot store (NUL in `text`): client text that missed the
            // check of `api::text`. A client error all the same, never a 500; logged so the
            // path that missed it is found.
            sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("22021" | "22P05")) => {
                tracing::warn!(error = %e, "a value the database refuses reached a query unchecked");
                Self::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "validation",
                    "Invalid request",
                    "the request holds a character the service does not accept",
                )
            }
            _ => Self::internal(e),
        }
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        Self::internal(format!("{e:#}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.body().to_string();
        let mut resp = (self.0.status, body).into_response();
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        for (k, v) in self.0.headers.iter() {
            resp.headers_mut().insert(k.clone(), v.clone());
        }
        resp
    }
}

/// Turns any error answer the framework produced in another format (404, 405, 413, 415 ...) into a
/// problem document, so every error a client sees has one shape.
pub async fn problem_for_framework_errors(resp: Response) -> Response {
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_problem = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with(PROBLEM_JSON));
    // The ops console's own error pages are HTML and stay so.
    let is_html = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/html"));
    if is_problem || is_html {
        return resp;
    }
    let (slug, title, detail) = match status {
        StatusCode::NOT_FOUND => ("not-found", "Not found", "no such resource"),
        StatusCode::METHOD_NOT_ALLOWED => (
            "method-not-allowed",
            "Method not allowed",
            "this method is not allowed on this resource",
        ),
        StatusCode::PAYLOAD_TOO_LARGE => (
            "payload-too-large",
            "Payload too large",
            "the request body is larger than 64 KiB",
        ),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => (
            "unsupported-media-type",
            "Unsupported media type",
            "send the body as application/json",
        ),
        StatusCode::REQUEST_TIMEOUT => ("timeout", "Request timeout", "the request took too long"),
        s if s.is_server_error() => (
            "internal",
            "Internal server error",
            "the service could not complete the request",
        ),
        _ => ("bad-request", "Bad request", "the request could not be processed"),
    };
    let (mut parts, _) = resp.into_parts();
    let err = ApiError::new(status, slug, title, detail);
    parts.headers.remove(header::CONTENT_LENGTH);
    let mut new = err.into_response();
    for (k, v) in parts.headers.iter() {
        if k != header::CONTENT_TYPE {
            new.headers_mut().insert(k.clone(), v.clone());
        }
    }
    new
}
