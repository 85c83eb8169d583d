//! The ops console at `/console`: server-rendered pages over the admin API's own functions, for
//! finding, reading and re-driving sagas in a browser (docs/operations.md, "The console").
//!
//! * Sign-in goes through the API's login (same accounts, rate limits and tokens); only the `admin`
//!   role gets a session. The session is the access token in an `HttpOnly`, `SameSite=Strict`
//!   cookie scoped to `/console`, checked like a Bearer token (signature, expiry, revocation, role)
//!   on every request.
//! * Every form that changes something carries a CSRF token derived from the session token (a
//!   page of another site cannot read it), and the `Origin` of the request must be this host.
//! * Actions call the admin API's functions (`crate::api::admin`), so they are audited the same
//!   way; the console adds the reason it asks for to the audit row (`after.reason`).
//! * No JavaScript; one embedded stylesheet; a Content-Security-Policy that allows nothing else.
//!   Every shown value is escaped ([`html::esc`]).

pub mod html;
pub mod lag;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Form, FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::admin::{self, AuditItem, SagaFilter};
use crate::api::AppState;
use crate::api::admin::BulkRetryRequest;
use crate::api::extract::{AdminUser, ApiJson, AuthUser};
use crate::auth::{Claims, Role};
use crate::error::ApiError;
use crate::saga::machine::SagaState;
use html::{Who, cell, columns, esc, kv_table, page, select, state_badge, text_of, url_enc};

/// Name of the session cookie.
pub const COOKIE: &str = "ostore_console";

/// The Content-Security-Policy of every console answer: the embedded stylesheet and nothing else
/// (no script at all, no frames, forms only to this origin).
pub const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; \
                       frame-ancestors 'none'; base-uri 'none'";

const CSS: &str = include_str!("console.css");

/// Saga states, in the order the counts are shown (stuck first).
const STATES: [SagaState; 6] = [
    SagaState::Stuck,
    SagaState::Running,
    SagaState::Compensating,
    SagaState::Failed,
    SagaState::Compensated,
    SagaState::Completed,
];

/// Step names offered by the filter (free text is accepted too).
const STEPS: [&str; 6] = [
    "reserve_inventory",
    "persist_order",
    "create_shipment",
    "release_reservation",
    "cancel_order",
    "cancel_shipment",
];

/// Error classes offered by the filter (free text is accepted too).
const ERROR_CLASSES: [&str; 11] = [
    "connect",
    "timeout",
    "http_5xx",
    "http_429",
    "http_4xx",
    "contract_violation",
    "insufficient_stock",
    "total_overflow",
    "deadline_exceeded",
    "cancelled",
    "cancel_refused",
];

/// Longest reason kept with an action.
const MAX_REASON: usize = 500;

/// Sagas per page.
const PAGE: i64 = 50;

/// How many of the newest outbox rows a saga page searches for the saga's events (the outbox has
/// no index on the order; published rows are deleted after `OUTBOX_RETENTION_SECONDS` anyway).
const OUTBOX_WINDOW: i64 = 200_000;

/// The console's routes (merged into the API's router).
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/console", get(|| async { Redirect::to("/console/sagas") }))
        .route("/console/", get(|| async { Redirect::to("/console/sagas") }))
        .route("/console/assets/console.css", get(css))
        .route("/console/login", get(login_page).post(login_submit))
        .route("/console/logout", post(logout))
        .route("/console/sagas", get(sagas_page))
        .route("/console/sagas/retry", post(bulk_retry))
        .route("/console/sagas/{id}", get(saga_page))
        .route(
            "/console/sagas/{id}/retry",
            post(|state, id, form| saga_action(state, id, form, "saga.retry")),
        )
        .route(
            "/console/sagas/{id}/cancel",
            post(|state, id, form| saga_action(state, id, form, "saga.cancel")),
        )
        .route("/console/pipeline", get(pipeline_page))
        .route(
            "/console/dead-letters/{id}/replay",
            post(|state, id, form| replay(state, id, form, DeadLetter::Tracking)),
        )
        .route(
            "/console/outbox/dead-letters/{id}/replay",
            post(|state, id, form| replay(state, id, form, DeadLetter::Outbox)),
        )
        .route("/console/audit", get(audit_page))
        .layer(axum::middleware::map_response(security_headers))
}

async fn security_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // Not `no-referrer`: under it browsers send `Origin: null` on form posts, which the origin
    // check must refuse. `same-origin` still sends nothing (no saga ids) to other sites.
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

async fn css() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], CSS).into_response()
}

// ---------------------------------------------------------------------------------------------
// Sessions, CSRF, errors
// ---------------------------------------------------------------------------------------------

/// A signed-in admin.
pub struct Session {
    claims: Claims,
    csrf: String,
}

impl Session {
    fn who(&self) -> Who<'_> {
        Who {
            email: &self.claims.email,
            csrf: &self.csrf,
        }
    }
}

/// The CSRF token of a session: a digest of its token, which only pages of this origin (that
/// received it in a form) know.
pub fn csrf_of(token: &str) -> String {
    let d = Sha256::digest(format!("ostore-console-csrf\0{token}").as_bytes());
    d.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim().to_string())
}

/// Why a request gets no page.
pub enum Refusal {
    /// Not signed in (or the session ended): to the sign-in page.
    SignIn,
    /// Shown as an error page.
    Page(StatusCode, String, Option<(String, String)>),
}

impl Refusal {
    fn of(e: ApiError, who: Option<&Who<'_>>) -> Refusal {
        let status = e.0.status;
        if status.is_server_error() {
            tracing::error!(detail = %e.0.detail, "console request failed");
        }
        Refusal::Page(
            status,
            e.0.detail.clone(),
            who.map(|w| (w.email.to_string(), w.csrf.to_string())),
        )
    }
}

impl From<sqlx::Error> for Refusal {
    fn from(e: sqlx::Error) -> Self {
        Refusal::of(ApiError::from(e), None)
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::SignIn => Redirect::to("/console/login").into_response(),
            Refusal::Page(status, detail, who) => {
                let who = who.as_ref().map(|(e, c)| Who { email: e, csrf: c });
                let body = format!(
                    r#"<p class="error" role="alert">{}</p><p><a href="/console/sagas">Back to the sagas</a></p>"#,
                    esc(&detail)
                );
                let title = status.canonical_reason().unwrap_or("Error");
                (status, Html(page(title, who.as_ref(), &body))).into_response()
            }
        }
    }
}

impl FromRequestParts<AppState> for Session {
    type Rejection = Refusal;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let token = cookie_value(&parts.headers, COOKIE).ok_or(Refusal::SignIn)?;
        let claims = state
            .auth
            .verify_access_token(&token)
            .map_err(|_| Refusal::SignIn)?;
        if state.auth.is_revoked(&state.db, &claims).await? {
            return Err(Refusal::SignIn);
        }
        if !claims.has_role(Role::Admin) {
            return Err(Refusal::Page(
                StatusCode::FORBIDDEN,
                "the console requires the admin role".into(),
                None,
            ));
        }
        tracing::Span::current().record("user_id", claims.user_id());
        Ok(Session {
            claims,
            csrf: csrf_of(&token),
        })
    }
}

/// True when a form post comes from a page of this origin: its `Origin` (or, without one,
/// `Sec-Fetch-Site`) names this host. Browsers send `Origin` on every cross-site POST.
fn same_origin(headers: &HeaderMap) -> bool {
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    match headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        Some(origin) => {
            host.is_some_and(|h| origin == format!("http://{h}") || origin == format!("https://{h}"))
        }
        None => headers
            .get("sec-fetch-site")
            .and_then(|v| v.to_str().ok())
            .is_none_or(|s| s == "same-origin" || s == "none"),
    }
}

/// Checks a state-changing form: same origin and the session's CSRF token.
fn check_form(headers: &HeaderMap, s: &Session, form: &HashMap<String, String>) -> Result<(), Refusal> {
    let token_ok = form
        .get("csrf")
        .is_some_and(|t| constant_time_eq(t.as_bytes(), s.csrf.as_bytes()));
    if !same_origin(headers) || !token_ok {
        return Err(Refusal::Page(
            StatusCode::FORBIDDEN,
            "this form was not sent from a console page of this session (CSRF check); reload the page and try again".into(),
            Some((s.claims.email.clone(), s.csrf.clone())),
        ));
    }
    Ok(())
}

/// A state-changing form posted in a console session, checked before any handler sees it: sent
/// from a page of this origin and carrying the session's CSRF token ([`check_form`]).
struct SessionForm {
    /// The session that posted it.
    s: Session,
    /// Its fields.
    form: HashMap<String, String>,
}

impl FromRequest<AppState> for SessionForm {
    type Rejection = Response;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let (mut parts, body) = req.into_parts();
        let s = Session::from_request_parts(&mut parts, state)
            .await
            .map_err(IntoResponse::into_response)?;
        let headers = parts.headers.clone();
        let Form(form) =
            Form::<HashMap<String, String>>::from_request(Request::from_parts(parts, body), state)
                .await
                .map_err(IntoResponse::into_response)?;
        check_form(&headers, &s, &form).map_err(IntoResponse::into_response)?;
        Ok(SessionForm { s, form })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The reason of an action: required, at most 500 characters.
fn reason(form: &HashMap<String, String>, s: &Session) -> Result<String, Refusal> {
    let r = form.get("reason").map(|r| r.trim()).unwrap_or("");
    if r.is_empty() || r.chars().count() > MAX_REASON {
        return Err(Refusal::Page(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("give a reason for the action (1 to {MAX_REASON} characters); nothing was changed"),
            Some((s.claims.email.clone(), s.csrf.clone())),
        ));
    }
    Ok(r.to_string())
}

fn html(s: &Session, title: &str, body: &str) -> Response {
    Html(page(title, Some(&s.who()), body)).into_response()
}

fn fail(s: &Session, e: ApiError) -> Refusal {
    Refusal::of(e, Some(&s.who()))
}

// ---------------------------------------------------------------------------------------------
// Sign-in
// ---------------------------------------------------------------------------------------------

fn login_form(error: Option<&str>) -> String {
    let err = error
        .map(|e| format!(r#"<p class="error" role="alert">{}</p>"#, esc(e)))
        .unwrap_or_default();
    page(
        "Sign in",
        None,
        &format!(
            r#"{err}<form method="post" action="/console/login" class="stack narrow">
<label>Email <input type="email" name="email" autocomplete="username" required autofocus></label>
<label>Password <input type="password" name="password" autocomplete="current-password" required></label>
<button type="submit">Sign in</button></form>
<p class="muted">Admin accounts only; the same account as the admin API.</p>"#
        ),
    )
}

async fn login_page() -> Response {
    Html(login_form(None)).into_response()
}

async fn login_submit(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if !same_origin(&headers) {
        return (
            StatusCode::FORBIDDEN,
            Html(login_form(Some("sign in from the console's own page"))),
        )
            .into_response();
    }
    let req = crate::api::auth::LoginRequest {
        email: form.get("email").cloned().unwrap_or_default(),
        password: form.get("password").cloned().unwrap_or_default(),
    };
    let pair = match crate::api::auth::login(State(state.clone()), ConnectInfo(peer), ApiJson(req)).await {
        Ok(p) => p.0,
        Err(e) => {
            let mut resp = (e.0.status, Html(login_form(Some(&e.0.detail)))).into_response();
            if let Some(v) = e.0.headers.get(header::RETRY_AFTER) {
                resp.headers_mut().insert(header::RETRY_AFTER, v.clone());
            }
            return resp;
        }
    };
    let claims = match state.auth.verify_access_token(&pair.token) {
        Ok(c) => c,
        Err(_) => {
            return Refusal::of(ApiError::internal("a fresh token did not verify"), None).into_response();
        }
    };
    if !claims.has_role(Role::Admin) {
        // Not kept: the tokens just issued are revoked at once.
        let _ = crate::api::auth::logout(State(state.clone()), AuthUser(claims)).await;
        return (
            StatusCode::FORBIDDEN,
            Html(login_form(Some("the console requires the admin role"))),
        )
            .into_response();
    }
    let secure = if state.config.console_secure_cookie {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{COOKIE}={}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        pair.token, pair.expires_in
    );
    let mut resp = Redirect::to("/console/sagas").into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

async fn logout(
    State(state): State<AppState>,
    SessionForm { s, .. }: SessionForm,
) -> Result<Response, Refusal> {
    let _logged_out = crate::api::auth::logout(State(state), AuthUser(s.claims.clone()))
        .await
        .map_err(|e| fail(&s, e))?;
    let mut resp = Redirect::to("/console/login").into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("ostore_console=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    Ok(resp)
}

// ---------------------------------------------------------------------------------------------
// Sagas
// ---------------------------------------------------------------------------------------------

fn summary_rows(items: &[admin::SagaSummary]) -> String {
    if items.is_empty() {
        return r#"<p class="muted">No saga matches.</p>"#.into();
    }
    let mut out = String::from(
        r#"<table class="list"><thead><tr><th scope="col">Saga</th><th scope="col">Order</th><th scope="col">State</th><th scope="col">Step</th><th scope="col">Attempt</th><th scope="col">Error class</th><th scope="col">Last error</th><th scope="col">Updated</th><th scope="col">Next attempt</th></tr></thead><tbody>"#,
    );
    for s in items {
        let _ = write!(
            out,
            r#"<tr><td><a href="/console/sagas/{id}">{id}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class="wrap">{}</td><td>{}</td><td>{}</td></tr>"#,
            s.order_id.map_or_else(|| "—".to_string(), |o| o.to_string()),
            state_badge(&s.state),
            esc(&s.step),
            s.attempt,
            esc(s.error_class.as_deref().unwrap_or("")),
            esc(s.last_error.as_deref().unwrap_or("")),
            esc(&s.updated_at),
            esc(s.next_attempt_at.as_deref().unwrap_or("")),
            id = s.saga_id,
        );
    }
    out.push_str("</tbody></table>");
    out
}

fn datalist(id: &str, options: &[&str]) -> String {
    let mut out = format!(r#"<datalist id="{id}">"#);
    for o in options {
        let _ = write!(out, r#"<option value="{}">"#, esc(o));
    }
    out.push_str("</datalist>");
    out
}

fn filter_form(p: &HashMap<String, String>) -> String {
    let v = |k: &str| esc(p.get(k).map(String::as_str).unwrap_or(""));
    format!(
        r#"<form method="get" action="/console/sagas" class="filters" aria-label="Filter sagas">
{}
<label>Step <input name="step" list="steps" value="{}"></label>
<label>Error class <input name="errorClass" list="classes" value="{}"></label>
<label>Not updated for (s) <input name="olderThanSeconds" inputmode="decimal" size="8" value="{}"></label>
<label>Order <input name="orderID" inputmode="numeric" size="8" value="{}"></label>
<button type="submit">Filter</button> <a href="/console/sagas">Clear</a>
{}{}</form>"#,
        select(
            "state",
            "State",
            &STATES.map(SagaState::as_str),
            p.get("state").map(String::as_str)
        ),
        v("step"),
        v("errorClass"),
        v("olderThanSeconds"),
        v("orderID"),
        datalist("steps", &STEPS),
        datalist("classes", &ERROR_CLASSES),
    )
}

fn bulk_form(s: &Session, p: &HashMap<String, String>) -> String {
    let v = |k: &str| esc(p.get(k).map(String::as_str).unwrap_or(""));
    let state = p
        .get("state")
        .map(String::as_str)
        .filter(|s| !s.is_empty())
        .unwrap_or(SagaState::Stuck.as_str());
    let mut states = String::new();
    for st in [SagaState::Stuck, SagaState::Running, SagaState::Compensating].map(SagaState::as_str) {
        let sel = if st == state { " selected" } else { "" };
        let _ = write!(states, r#"<option value="{st}"{sel}>{st}</option>"#);
    }
    format!(
        r#"<details><summary>Bulk re-drive (a dry run first)</summary>
<form method="post" action="/console/sagas/retry" class="stack">
<input type="hidden" name="csrf" value="{}"><input type="hidden" name="mode" value="dry-run">
<label>State <select name="state">{states}</select></label>
<label>Step <input name="step" list="steps" value="{}"></label>
<label>Error class <input name="errorClass" list="classes" value="{}"></label>
<label>Not updated for (s) <input name="olderThanSeconds" inputmode="decimal" value="{}"></label>
<label>At most <input name="limit" inputmode="numeric" value="100"></label>
<label>Reason <textarea name="reason" required maxlength="{MAX_REASON}" rows="2"></textarea></label>
<button type="submit">Dry run</button></form></details>"#,
        esc(&s.csrf),
        v("step"),
        v("errorClass"),
        v("olderThanSeconds"),
    )
}

async fn sagas_page(
    State(state): State<AppState>,
    s: Session,
    Query(raw): Query<HashMap<String, String>>,
) -> Result<Response, Refusal> {
    // Empty form fields mean "any".
    let p: HashMap<String, String> = raw
        .into_iter()
        .map(|(k, v)| (k, v.trim().to_string()))
        .filter(|(_, v)| !v.is_empty())
        .collect();
    let mut body = filter_form(&p);
    let filter = match crate::api::admin::filter_from(&p) {
        Ok(f) => f,
        Err(e) => {
            let _ = write!(body, r#"<p class="error" role="alert">{}</p>"#, esc(&e.0.detail));
            return Ok((StatusCode::UNPROCESSABLE_ENTITY, html(&s, "Sagas", &body)).into_response());
        }
    };
    let after = match p.get("cursor") {
        None => None,
        Some(c) => Some(admin::decode_cursor(c).ok_or_else(|| {
            fail(
                &s,
                ApiError::invalid_field("cursor", "cursor is not one this console issued"),
            )
        })?),
    };
    let mut conn = state.db.acquire().await?;
    // Counts per state under the other filters.
    let mut counts = String::from(r#"<ul class="counts" aria-label="Sagas per state">"#);
    for st in STATES.map(SagaState::as_str) {
        let f = SagaFilter {
            state: Some(st.to_string()),
            ..filter.clone()
        };
        let n = admin::count_sagas(&mut conn, &f).await?;
        let mut q = p.clone();
        q.insert("state".into(), st.to_string());
        q.remove("cursor");
        let _ = write!(
            counts,
            r#"<li><a href="/console/sagas?{}">{} <strong>{n}</strong></a></li>"#,
            query_string(&q),
            state_badge(st)
        );
    }
    counts.push_str("</ul>");
    body.push_str(&counts);
    // Stuck ones first (when no state is chosen), then the rest newest first.
    let mut items = Vec::new();
    if filter.state.is_none() && after.is_none() {
        let stuck = SagaFilter {
            state: Some(SagaState::Stuck.as_str().into()),
            ..filter.clone()
        };
        items = admin::list_sagas(&mut conn, &stuck, None, PAGE).await?;
    }
    let mut rest = admin::list_sagas(&mut conn, &filter, after, PAGE + 1).await?;
    let next = if rest.len() as i64 > PAGE {
        rest.truncate(PAGE as usize);
        rest.last().map(admin::encode_cursor)
    } else {
        None
    };
    let stuck_shown = items.len();
    items.extend(
        rest.into_iter()
            .filter(|x| filter.state.is_some() || x.state != SagaState::Stuck.as_str()),
    );
    if stuck_shown > 0 {
        let _ = write!(
            body,
            r#"<p class="muted">The first {stuck_shown} rows are stuck sagas (an operator must act); the rest follow newest first.</p>"#
        );
    }
    body.push_str(&summary_rows(&items));
    if let Some(c) = next {
        let mut q = p.clone();
        q.insert("cursor".into(), c);
        let _ = write!(
            body,
            r#"<p><a href="/console/sagas?{}" rel="next">Older sagas</a></p>"#,
            query_string(&q)
        );
    }
    body.push_str(&bulk_form(&s, &p));
    Ok(html(&s, "Sagas", &body))
}

fn query_string(q: &HashMap<String, String>) -> String {
    let mut keys: Vec<&String> = q.keys().collect();
    keys.sort();
    keys.iter()
        .map(|k| format!("{}={}", url_enc(k), url_enc(&q[*k])))
        .collect::<Vec<_>>()
        .join("&amp;")
}

async fn bulk_retry(
    State(state): State<AppState>,
    SessionForm { s, form: raw }: SessionForm,
) -> Result<Response, Refusal> {
    let reason = reason(&raw, &s)?;
    let form: HashMap<String, String> = raw
        .into_iter()
        .map(|(k, v)| (k, v.trim().to_string()))
        .filter(|(_, v)| !v.is_empty())
        .collect();
    let get = |k: &str| form.get(k).cloned();
    let older = match get("olderThanSeconds") {
        None => None,
        Some(v) => Some(v.parse::<f64>().map_err(|_| {
            fail(
                &s,
                ApiError::invalid_field("olderThanSeconds", "olderThanSeconds must be a number of seconds"),
            )
        })?),
    };
    let limit = get("limit")
        .unwrap_or_else(|| "100".into())
        .parse::<i64>()
        .map_err(|_| {
            fail(
                &s,
                ApiError::invalid_field("limit", "limit must be an integer from 1 to 1000"),
            )
        })?;
    let dry_run = get("mode").as_deref() != Some("run");
    let req = BulkRetryRequest {
        state: get("state").unwrap_or_else(|| SagaState::Stuck.as_str().into()),
        step: get("step"),
        error_class: get("errorClass"),
        older_than_seconds: older,
        limit,
        dry_run,
    };
    let (answer, audit_id) =
        crate::api::admin::run_bulk_retry(&state, s.claims.user_id(), &req, Some(&reason))
            .await
            .map_err(|e| fail(&s, e))?;
    let mut body = String::new();
    let list = |ids: &[Uuid]| {
        let mut out = String::from(r#"<ul class="ids">"#);
        for id in ids {
            let _ = write!(out, r#"<li><a href="/console/sagas/{id}">{id}</a></li>"#);
        }
        out.push_str("</ul>");
        out
    };
    let filter_desc = kv_table(
        &json!({"state": req.state, "step": req.step, "errorClass": req.error_class,
                "olderThanSeconds": req.older_than_seconds, "limit": req.limit}),
        &[],
    );
    if answer.dry_run {
        let _ = write!(
            body,
            r#"<p>Dry run: nothing was changed. The filter selects <strong>{}</strong> saga(s); these <strong>{}</strong> would be re-driven:</p>{}{}
<form method="post" action="/console/sagas/retry" class="stack">
<input type="hidden" name="csrf" value="{}"><input type="hidden" name="mode" value="run">"#,
            answer.matched,
            answer.retried.len(),
            filter_desc,
            list(&answer.retried),
            esc(&s.csrf)
        );
        for k in ["state", "step", "errorClass", "olderThanSeconds", "limit"] {
            if let Some(v) = form.get(k) {
                let _ = write!(body, r#"<input type="hidden" name="{k}" value="{}">"#, esc(v));
            }
        }
        let _ = write!(
            body,
            r#"<label>Reason <textarea name="reason" required maxlength="{MAX_REASON}" rows="2">{}</textarea></label>
<button type="submit">Re-drive these sagas</button> <a href="/console/sagas">Cancel</a></form>"#,
            esc(&reason)
        );
        return Ok(html(&s, "Bulk re-drive: dry run", &body));
    }
    let _ = write!(
        body,
        r#"<p class="ok" role="status">Re-drove <strong>{}</strong> of the <strong>{}</strong> saga(s) the filter selects.</p>{}{}"#,
        answer.retried.len(),
        answer.matched,
        filter_desc,
        list(&answer.retried)
    );
    if let Some(id) = audit_id {
        let mut conn = state.db.acquire().await?;
        let entry = admin::audit_entry(&mut conn, id).await?;
        body.push_str("<h2>The audit entry written</h2>");
        body.push_str(&audit_table(&entry.into_iter().collect::<Vec<_>>(), Some(id)));
    }
    Ok(html(&s, "Bulk re-drive: done", &body))
}

fn audit_table(items: &[AuditItem], highlight: Option<i64>) -> String {
    if items.is_empty() {
        return r#"<p class="muted">No audit entries.</p>"#.into();
    }
    let mut out = String::from(
        r#"<table class="list audit"><thead><tr><th scope="col">#</th><th scope="col">At</th><th scope="col">Actor</th><th scope="col">Action</th><th scope="col">Target</th><th scope="col">Reason</th><th scope="col">Before</th><th scope="col">After</th></tr></thead><tbody>"#,
    );
    for a in items {
        let mark = if Some(a.id) == highlight {
            r#" class="highlight" id="written""#
        } else {
            ""
        };
        let reason = a
            .after
            .as_ref()
            .and_then(|v| v.get("reason"))
            .map(text_of)
            .unwrap_or_default();
        let _ = write!(
            out,
            r#"<tr{mark}><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class="wrap">{}</td><td class="wrap">{}</td><td>{}</td><td>{}</td></tr>"#,
            a.id,
            esc(&a.at),
            a.actor,
            esc(&a.action),
            esc(&a.target),
            esc(&reason),
            a.before.as_ref().map(cell).unwrap_or_default(),
            a.after.as_ref().map(cell).unwrap_or_default(),
        );
    }
    out.push_str("</tbody></table>");
    out
}

/// The timeline: every attempt, in the order they ran. Known fields first; any other field the
/// admin API returns is shown in a column of its own.
fn timeline(history: &[Value]) -> String {
    if history.is_empty() {
        return r#"<p class="muted">No attempt yet.</p>"#.into();
    }
    let preferred = [
        "startedAt",
        "finishedAt",
        "durationMs",
        "kind",
        "step",
        "attempt",
        "outcome",
        "downstreamStatus",
        "errorClass",
        "error",
        "idempotencyKey",
        "worker",
    ];
    let cols = columns(history, &preferred);
    let mut out = String::from(r#"<table class="list timeline"><thead><tr>"#);
    for c in &cols {
        let _ = write!(out, r#"<th scope="col">{}</th>"#, esc(c));
    }
    out.push_str("</tr></thead><tbody>");
    for h in history {
        let kind = h.get("kind").map(text_of).unwrap_or_default();
        let outcome = h.get("outcome").map(text_of).unwrap_or_default();
        let _ = write!(
            out,
            r#"<tr class="k-{} o-{}">"#,
            esc(&kind.replace(|c: char| !c.is_ascii_alphanumeric(), "_")),
            esc(&outcome.replace(|c: char| !c.is_ascii_alphanumeric(), "_"))
        );
        for c in &cols {
            let v = h.get(c).unwrap_or(&Value::Null);
            let class = if c == "error" { r#" class="wrap""# } else { "" };
            let _ = write!(out, "<td{class}>{}</td>", cell(v));
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table>");
    out
}

fn action_forms(s: &Session, id: Uuid, saga_state: &str) -> String {
    let state = SagaState::parse(saga_state);
    if state.is_some_and(SagaState::is_terminal) {
        return format!(
            r#"<p class="muted">The saga is {}: nothing can change it any more.</p>"#,
            esc(saga_state)
        );
    }
    let retry_label = if state == Some(SagaState::Stuck) {
        "Re-drive (continue the compensation)"
    } else {
        "Run the next attempt now"
    };
    format!(
        r#"<div class="actions">
<form method="post" action="/console/sagas/{id}/retry" class="stack">
<input type="hidden" name="csrf" value="{csrf}">
<label>Reason for the re-drive <textarea name="reason" required maxlength="{MAX_REASON}" rows="2"></textarea></label>
<button type="submit">{retry_label}</button></form>
<form method="post" action="/console/sagas/{id}/cancel" class="stack">
<input type="hidden" name="csrf" value="{csrf}">
<label>Reason for the cancellation <textarea name="reason" required maxlength="{MAX_REASON}" rows="2"></textarea></label>
<button type="submit" class="danger">Cancel (compensate) the saga</button></form>
</div>"#,
        csrf = esc(&s.csrf),
    )
}

fn parse_saga_id(s: &Session, raw: &str) -> Result<Uuid, Refusal> {
    Uuid::parse_str(raw).map_err(|_| fail(s, ApiError::not_found("no such saga")))
}

#[derive(sqlx::FromRow)]
struct OutboxEvent {
    id: i64,
    topic: String,
    event_type: String,
    event_id: Uuid,
    created_at: time::OffsetDateTime,
    published_at: Option<time::OffsetDateTime>,
}

#[derive(sqlx::FromRow)]
struct SetAside {
    id: i64,
    topic: String,
    event_type: String,
    event_id: Uuid,
    failed_at: time::OffsetDateTime,
    error: String,
    replayed_at: Option<time::OffsetDateTime>,
}

/// The cells of an event's row in the saga page's outbox table but the last (where it stands):
/// outbox id, event, topic, eventID, and when it was written (or set aside).
fn event_cells(id: i64, event_type: &str, topic: &str, event_id: Uuid, at: time::OffsetDateTime) -> String {
    format!(
        "<td>{id}</td><td>{}</td><td>{}</td><td>{event_id}</td><td>{}</td>",
        esc(event_type),
        esc(topic),
        esc(&crate::saga::machine::rfc3339(at))
    )
}

async fn outbox_events(conn: &mut sqlx::PgConnection, key: &str) -> Result<String, sqlx::Error> {
    let rows: Vec<OutboxEvent> = sqlx::query_as(
        r#"select id, topic, event_type, event_id, created_at, outbox_published_at(id) as published_at from outbox
            where id > (select coalesce(max(id), 0) from outbox) - $2 and message_key = $1
            order by id"#,
    )
    .bind(key)
    .bind(OUTBOX_WINDOW)
    .fetch_all(&mut *conn)
    .await?;
    let aside: Vec<SetAside> = sqlx::query_as(
        r#"select id, topic, event_type, event_id, failed_at, error, replayed_at from outbox_dead_letters
            where message_key = $1 order by id"#,
    )
    .bind(key)
    .fetch_all(&mut *conn)
    .await?;
    let t = crate::saga::machine::rfc3339;
    let mut out = String::new();
    if rows.is_empty() && aside.is_empty() {
        out.push_str(r#"<p class="muted">No event of this order in the outbox (published rows are deleted after the retention).</p>"#);
        return Ok(out);
    }
    out.push_str(r#"<table class="list"><thead><tr><th scope="col">Outbox id</th><th scope="col">Event</th><th scope="col">Topic</th><th scope="col">eventID</th><th scope="col">Written</th><th scope="col">Where it stands</th></tr></thead><tbody>"#);
    for r in &rows {
        let stands = match r.published_at {
            Some(p) => format!("published {}", t(p)),
            None => "waiting for the relay".into(),
        };
        let cells = event_cells(r.id, &r.event_type, &r.topic, r.event_id, r.created_at);
        let _ = write!(out, "<tr>{cells}<td>{}</td></tr>", esc(&stands));
    }
    for r in &aside {
        let stands = match r.replayed_at {
            Some(p) => format!("refused by Kafka ({}), replayed {}", r.error, t(p)),
            None => format!("refused by Kafka, set aside: {}", r.error),
        };
        let cells = event_cells(r.id, &r.event_type, &r.topic, r.event_id, r.failed_at);
        let _ = write!(
            out,
            r#"<tr class="o-failed">{cells}<td class="wrap">{} <a href="/console/pipeline">(dead letters)</a></td></tr>"#,
            esc(&stands)
        );
    }
    out.push_str("</tbody></table>");
    Ok(out)
}

async fn order_section(
    conn: &mut sqlx::PgConnection,
    saga_id: Uuid,
    order_id: i32,
) -> Result<String, sqlx::Error> {
    let user: Option<i32> = sqlx::query_scalar("select user_id from sagas where saga_id = $1")
        .bind(saga_id)
        .fetch_optional(&mut *conn)
        .await?;
    let order = match user {
        Some(u) => crate::orders::store::get(conn, order_id, u).await?,
        None => None,
    };
    Ok(match order {
        None => r#"<p class="muted">No order row (a stock refusal answered at once removes it).</p>"#.into(),
        Some(o) => {
            let v = serde_json::to_value(&o).unwrap_or(Value::Null);
            let mut out = kv_table(&v, &["orderItems"]);
            if let Some(Value::Array(items)) = v.get("orderItems") {
                out.push_str(&generic_table(
                    items,
                    &["orderItemID", "productID", "quantity", "price"],
                ));
            }
            out
        }
    })
}

async fn saga_page(
    State(state): State<AppState>,
    s: Session,
    Path(raw): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, Refusal> {
    let id = parse_saga_id(&s, &raw)?;
    let mut conn = state.db.acquire().await?;
    let detail = admin::get_saga(&mut conn, id)
        .await?
        .ok_or_else(|| fail(&s, ApiError::not_found("no such saga")))?;
    let highlight = q.get("audit").and_then(|a| a.parse::<i64>().ok());
    let v = serde_json::to_value(&detail).unwrap_or(Value::Null);
    let history: Vec<Value> = v
        .get("history")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut body = String::new();
    let st = &detail.summary.state;
    let _ = write!(
        body,
        r#"<p>{} at <strong>{}</strong>, attempt {}. Order <strong>{}</strong>.</p>"#,
        state_badge(st),
        esc(&detail.summary.step),
        detail.summary.attempt,
        detail
            .summary
            .order_id
            .map_or_else(|| "none".to_string(), |o| o.to_string())
    );
    let trace = match &detail.summary.trace_id {
        Some(t) if !state.config.trace_ui_url.is_empty() => format!(
            r#"<p>Trace <a href="{}" rel="noopener noreferrer">{}</a></p>"#,
            esc(&state.config.trace_ui_url.replace("{traceID}", &url_enc(t))),
            esc(t)
        ),
        Some(t) => format!("<p>Trace <code>{}</code></p>", esc(t)),
        None => r#"<p class="muted">No trace id recorded.</p>"#.into(),
    };
    body.push_str(&trace);
    if let Some(h) = highlight {
        let _ = write!(
            body,
            r##"<p class="ok" role="status">Done. The audit entry it wrote is <a href="#written">#{h}</a> (below).</p>"##
        );
    }
    body.push_str("<h2>Actions</h2>");
    body.push_str(&action_forms(&s, id, st));
    body.push_str("<h2>Saga</h2>");
    body.push_str(&kv_table(&v, &["history"]));
    body.push_str("<h2>Timeline</h2>");
    body.push_str(&timeline(&history));
    body.push_str("<h2>Order</h2>");
    // A saga of a type that places no order has none to show; its events are keyed by the saga.
    let key = match detail.summary.order_id {
        Some(order_id) => {
            body.push_str(&order_section(&mut conn, id, order_id).await?);
            order_id.to_string()
        }
        None => {
            body.push_str(r#"<p class="muted">This saga places no order.</p>"#);
            id.to_string()
        }
    };
    body.push_str("<h2>Outbox events</h2>");
    body.push_str(&outbox_events(&mut conn, &key).await?);
    body.push_str("<h2>Audit</h2>");
    let audit = admin::audit_of_saga(&mut conn, id, 100).await?;
    body.push_str(&audit_table(&audit, highlight));
    Ok(html(&s, &format!("Saga {id}"), &body))
}

/// A saga's retry or cancel form (`action` is the admin API's action, `saga.retry` or
/// `saga.cancel`): on success, back to the saga's page at the audit entry written.
async fn saga_action(
    State(state): State<AppState>,
    Path(raw): Path<String>,
    SessionForm { s, form }: SessionForm,
    action: &'static str,
) -> Result<Response, Refusal> {
    let id = parse_saga_id(&s, &raw)?;
    let reason = reason(&form, &s)?;
    let (_, audit_id) = crate::api::admin::act(&state, s.claims.user_id(), id, action, Some(&reason))
        .await
        .map_err(|e| fail(&s, e))?;
    Ok(Redirect::to(&format!("/console/sagas/{id}?audit={audit_id}#written")).into_response())
}

// ---------------------------------------------------------------------------------------------
// Outbox, dead letters, lag
// ---------------------------------------------------------------------------------------------

fn replay_form(s: &Session, action: &str) -> String {
    format!(
        r#"<form method="post" action="{}" class="inline"><input type="hidden" name="csrf" value="{}"><button type="submit">Replay</button></form>"#,
        esc(action),
        esc(&s.csrf)
    )
}

async fn consumer_lag(state: &AppState) -> String {
    let Some(bootstrap) = state.config.kafka_bootstrap_servers.clone() else {
        return r#"<p class="muted">KAFKA_BOOTSTRAP_SERVERS is not set: no Kafka cluster to ask.</p>"#.into();
    };
    let group = crate::tracking::ConsumerConfig::default().group_id;
    let topic = state.config.topics.tracking_events.clone();
    let (g, t) = (group.clone(), topic.clone());
    let r =
        tokio::task::spawn_blocking(move || lag::group_lag(&bootstrap, &g, &t, Duration::from_secs(3))).await;
    match r {
        Ok(Ok(parts)) => {
            let total: i64 = parts.iter().map(|p| p.lag).sum();
            let rows: Vec<Value> = parts
                .iter()
                .map(|p| serde_json::to_value(p).unwrap_or(Value::Null))
                .collect();
            let mut out = format!(
                r#"<p>Group <code>{}</code> on <code>{}</code>: <strong>{total}</strong> record(s) behind.</p>"#,
                esc(&group),
                esc(&topic)
            );
            out.push_str(&generic_table(
                &rows,
                &["partition", "committed", "highWatermark", "lag"],
            ));
            out
        }
        Ok(Err(e)) => format!(r#"<p class="error">The lag could not be read: {}</p>"#, esc(&e)),
        Err(e) => format!(
            r#"<p class="error">The lag could not be read: {}</p>"#,
            esc(&e.to_string())
        ),
    }
}

fn generic_table(rows: &[Value], preferred: &[&str]) -> String {
    if rows.is_empty() {
        return r#"<p class="muted">None.</p>"#.into();
    }
    let cols = columns(rows, preferred);
    let mut out = String::from(r#"<table class="list"><thead><tr>"#);
    for c in &cols {
        let _ = write!(out, r#"<th scope="col">{}</th>"#, esc(c));
    }
    out.push_str("</tr></thead><tbody>");
    for r in rows {
        out.push_str("<tr>");
        for c in &cols {
            let _ = write!(
                out,
                r#"<td class="wrap">{}</td>"#,
                cell(r.get(c).unwrap_or(&Value::Null))
            );
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table>");
    out
}

async fn pipeline_page(State(state): State<AppState>, s: Session) -> Result<Response, Refusal> {
    let mut conn = state.db.acquire().await?;
    let backlog = crate::outbox::relay::backlog(&mut conn).await?;
    let mut body = String::from("<h2>Outbox backlog</h2>");
    body.push_str(&kv_table(
        &serde_json::to_value(&backlog).unwrap_or(Value::Null),
        &[],
    ));
    body.push_str("<h2>Tracking consumer lag</h2>");
    body.push_str(&consumer_lag(&state).await);

    body.push_str("<h2>Tracking dead letters</h2><p class=\"muted\">TrackingEvents that could not be applied, newest first (payload shown as text).</p>");
    let dl = crate::tracking::list_dead_letters(&mut conn, 50, None).await?;
    let mut rows = Vec::new();
    for d in &dl.items {
        let mut v = serde_json::to_value(d).unwrap_or(Value::Null);
        if let Some(obj) = v.as_object_mut() {
            let text = base64::engine::general_purpose::STANDARD
                .decode(&d.payload)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_else(|_| d.payload.clone());
            obj.insert("payload".into(), Value::String(text));
        }
        rows.push((d.id, v));
    }
    body.push_str(&rows_with_replay(
        &s,
        &rows,
        "/console/dead-letters",
        &[
            "id",
            "at",
            "reason",
            "topic",
            "partition",
            "offset",
            "key",
            "payload",
        ],
    ));

    body.push_str("<h2>Outbox dead letters</h2><p class=\"muted\">Outbox rows Kafka refused for good, set aside by the relay.</p>");
    let od = crate::outbox::dead::list(&mut conn, 50, None).await?;
    let rows: Vec<(i64, Value)> = od
        .items
        .iter()
        .map(|d| {
            let v = serde_json::to_value(d).unwrap_or(Value::Null);
            (v.get("id").and_then(Value::as_i64).unwrap_or(0), v)
        })
        .collect();
    body.push_str(&rows_with_replay(
        &s,
        &rows,
        "/console/outbox/dead-letters",
        &["id", "failedAt", "error", "topic", "key", "eventType", "payload"],
    ));
    Ok(html(&s, "Outbox, dead letters, lag", &body))
}

fn rows_with_replay(s: &Session, rows: &[(i64, Value)], base: &str, preferred: &[&str]) -> String {
    if rows.is_empty() {
        return r#"<p class="muted">None.</p>"#.into();
    }
    let values: Vec<Value> = rows.iter().map(|(_, v)| v.clone()).collect();
    let cols = columns(&values, preferred);
    let mut out = String::from(r#"<table class="list"><thead><tr><th scope="col">Replay</th>"#);
    for c in &cols {
        let _ = write!(out, r#"<th scope="col">{}</th>"#, esc(c));
    }
    out.push_str("</tr></thead><tbody>");
    for (id, v) in rows {
        let _ = write!(
            out,
            "<tr><td>{}</td>",
            replay_form(s, &format!("{base}/{id}/replay"))
        );
        for c in &cols {
            let val = v.get(c).unwrap_or(&Value::Null);
            if c == "payload" {
                let _ = write!(
                    out,
                    "<td><pre class=\"payload\">{}</pre></td>",
                    esc(&text_of(val))
                );
            } else {
                let _ = write!(out, r#"<td class="wrap">{}</td>"#, cell(val));
            }
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table>");
    out
}

async fn replay_result(
    state: &AppState,
    s: &Session,
    what: &str,
    target: &str,
    answer: Value,
) -> Result<Response, Refusal> {
    let mut conn = state.db.acquire().await?;
    let recent = admin::list_audit(&mut conn, None, 50).await?;
    let mine: Vec<AuditItem> = recent
        .into_iter()
        .filter(|a| a.target == target && a.actor == s.claims.user_id())
        .take(1)
        .collect();
    let id = mine.first().map(|a| a.id);
    let body = format!(
        r#"<p class="ok" role="status">{} replayed.</p>{}<h2>The audit entry written</h2>{}<p><a href="/console/pipeline">Back to the outbox and dead letters</a></p>"#,
        esc(what),
        kv_table(&answer, &[]),
        audit_table(&mine, id)
    );
    Ok(html(s, "Replay", &body))
}

/// The two kinds of dead letter the console replays (through the admin API's handlers).
#[derive(Clone, Copy)]
enum DeadLetter {
    /// A TrackingEvent the consumer set aside.
    Tracking,
    /// An outbox row the relay set aside.
    Outbox,
}

impl DeadLetter {
    /// Its name on the page, and the kind of its audit target.
    fn names(self) -> (&'static str, &'static str) {
        match self {
            DeadLetter::Tracking => ("Dead letter", "dead_letter"),
            DeadLetter::Outbox => ("Outbox dead letter", "outbox_dead_letter"),
        }
    }
}

/// A dead letter's replay form: replays it as the admin API does and shows the answer with the
/// audit entry written.
async fn replay(
    State(state): State<AppState>,
    Path(raw): Path<String>,
    SessionForm { s, .. }: SessionForm,
    kind: DeadLetter,
) -> Result<Response, Refusal> {
    let (admin_state, admin, id) = (State(state.clone()), AdminUser(s.claims.clone()), Path(raw));
    // Its id and the answer.
    let replayed = match kind {
        DeadLetter::Tracking => crate::api::admin::replay_dead_letter(admin_state, admin, id)
            .await
            .map(|answer| (answer.id, serde_json::to_value(&answer.0))),
        DeadLetter::Outbox => crate::api::admin::replay_outbox_dead_letter(admin_state, admin, id)
            .await
            .map(|answer| (answer.id, serde_json::to_value(&answer.0))),
    };
    let (id, answer) = replayed.map_err(|e| fail(&s, e))?;
    let (what, target) = kind.names();
    replay_result(
        &state,
        &s,
        &format!("{what} {id}"),
        &format!("{target}:{id}"),
        answer.unwrap_or(Value::Null),
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// Audit
// ---------------------------------------------------------------------------------------------

async fn audit_page(
    State(state): State<AppState>,
    s: Session,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, Refusal> {
    let before = match q.get("before").map(String::as_str) {
        None | Some("") => None,
        Some(b) => Some(b.parse::<i64>().ok().filter(|v| *v > 0).ok_or_else(|| {
            fail(
                &s,
                ApiError::invalid_field("before", "before must be an audit entry number"),
            )
        })?),
    };
    let mut conn = state.db.acquire().await?;
    let mut items = admin::list_audit(&mut conn, before, PAGE + 1).await?;
    let next = if items.len() as i64 > PAGE {
        items.truncate(PAGE as usize);
        items.last().map(|a| a.id)
    } else {
        None
    };
    let mut body = audit_table(&items, None);
    if let Some(n) = next {
        let _ = write!(
            body,
            r#"<p><a href="/console/audit?before={n}" rel="next">Older entries</a></p>"#
        );
    }
    Ok(html(&s, "Audit", &body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn a_post_from_another_origin_is_refused() {
        assert!(same_origin(&headers(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "http://127.0.0.1:8080")
        ])));
        assert!(!same_origin(&headers(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "https://evil.example")
        ])));
        assert!(!same_origin(&headers(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "null")
        ])));
        assert!(!same_origin(&headers(&[
            ("host", "127.0.0.1:8080"),
            ("sec-fetch-site", "cross-site")
        ])));
        assert!(same_origin(&headers(&[
            ("host", "127.0.0.1:8080"),
            ("sec-fetch-site", "same-origin")
        ])));
    }

    #[test]
    fn the_csrf_token_depends_on_the_session() {
        assert_eq!(csrf_of("a").len(), 64);
        assert_ne!(csrf_of("a"), csrf_of("b"));
        assert!(constant_time_eq(csrf_of("a").as_bytes(), csrf_of("a").as_bytes()));
        assert!(!constant_time_eq(b"abc", b"abd"));
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let h = headers(&[("cookie", "a=1; ostore_console=tok.en; b=2")]);
        assert_eq!(cookie_value(&h, COOKIE).as_deref(), Some("tok.en"));
        assert_eq!(cookie_value(&headers(&[("cookie", "a=1")]), COOKIE), None);
    }

    #[test]
    fn the_timeline_shows_fields_it_does_not_know() {
        let h = vec![
            json!({"startedAt": "2026-01-01T00:00:00Z", "finishedAt": "2026-01-01T00:00:01.5Z",
                            "durationMs": 1500, "step": "reserve_inventory", "outcome": "succeeded",
                            "newField": "<b>x</b>"}),
        ];
        let t = timeline(&h);
        assert!(t.contains("<th scope=\"col\">durationMs</th>"));
        assert!(t.contains("<td>1500</td>"));
        assert!(t.contains("newField"));
        assert!(t.contains("&lt;b&gt;x&lt;/b&gt;"));
        assert!(!t.contains("<b>x"));
    }
}
