//! The HTTP API: routes, shared state, and the middleware every request passes through (request id,
//! one span per request continuing the caller's W3C trace, 64 KiB body limit, problem+json errors).

pub mod admin;
pub mod auth;
pub mod extract;
pub mod health;
pub mod orders;
pub mod text;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, Request, Response};
use sqlx::PgPool;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use tracing::Span;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::AuthService;
use crate::config::ServiceConfig;
use crate::error::{ApiError, problem_for_framework_errors};

/// A named readiness check beyond the database (for example the Kafka producer).
#[derive(Clone)]
pub struct ReadinessProbe {
    /// Name shown in `/readyz`.
    pub name: &'static str,
    /// `Err(reason)` while not ready.
    pub check: Arc<dyn Fn() -> Result<(), String> + Send + Sync>,
}

/// State shared by all handlers.
#[derive(Clone)]
pub struct AppState {
    /// The database pool.
    pub db: PgPool,
    /// Tokens, passwords, login limits.
    pub auth: AuthService,
    /// Effective configuration.
    pub config: Arc<ServiceConfig>,
    /// Extra readiness checks.
    pub readiness: Arc<Vec<ReadinessProbe>>,
    /// The saga engine (creates sagas; drives them in a worker).
    pub engine: crate::saga::engine::Engine,
    /// Orders per user per minute.
    pub order_limiter: crate::auth::limiter::UserLimiter,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "OStore Order Management Service", description = "Orders placed through a persisted saga; see docs/ for the contracts."),
    components(schemas(crate::error::ProblemSchema)),
    modifiers(&SecurityAddon)
)]
struct ApiDoc;

/// Gives every 4xx and 5xx response of every operation the `application/problem+json` body
/// (`#/components/schemas/Problem`), which is what the service answers for each of them. Applied
/// to the finished document ([`openapi`]), once the routes have added their operations.
struct ProblemResponses;

impl utoipa::Modify for ProblemResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{Content, Ref, RefOr};
        for item in openapi.paths.paths.values_mut() {
            let ops = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ];
            for op in ops.into_iter().flatten() {
                for (status, response) in op.responses.responses.iter_mut() {
                    if !(status.starts_with('4') || status.starts_with('5')) {
                        continue;
                    }
                    if let RefOr::T(response) = response {
                        response.content.clear();
                        response.content.insert(
                            crate::error::PROBLEM_JSON.to_string(),
                            RefOr::T(Content::new(Some(Ref::from_schema_name("Problem")))),
                        );
                    }
                }
            }
        }
    }
}

struct SecurityAddon;

impl utoipa::Modify for SecurityAddon {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// Routes and their OpenAPI description.
fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(health::livez))
        .routes(routes!(health::readyz))
        .routes(routes!(auth::login))
        .routes(routes!(auth::refresh))
        .routes(routes!(auth::logout))
        .routes(routes!(auth::me))
        .routes(routes!(orders::create_order, orders::list_orders))
        .routes(routes!(orders::get_order))
        .routes(routes!(orders::cancel_order))
        .routes(routes!(admin::list_sagas))
        .routes(routes!(admin::get_saga))
        .routes(routes!(admin::retry_saga))
        .routes(routes!(admin::cancel_saga))
        .routes(routes!(admin::bulk_retry))
        .routes(routes!(admin::list_audit))
        .routes(routes!(admin::list_dead_letters))
        .routes(routes!(admin::replay_dead_letter))
        .routes(routes!(admin::outbox_status))
        .routes(routes!(admin::list_outbox_dead_letters))
        .routes(routes!(admin::get_outbox_dead_letter))
        .routes(routes!(admin::replay_outbox_dead_letter))
        .routes(routes!(admin::get_user, admin::delete_user))
        .routes(routes!(admin::list_user_orders))
        .routes(routes!(admin::disable_user))
        .routes(routes!(admin::enable_user))
}

/// The OpenAPI document of the API.
pub fn openapi() -> utoipa::openapi::OpenApi {
    finish_spec(routes().split_for_parts().1)
}

fn finish_spec(mut spec: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    use utoipa::Modify as _;
    ProblemResponses.modify(&mut spec);
    spec
}

/// What a process without the `api` role serves on `LISTEN_ADDR` for its operators: `/metrics`
/// (its own instruments: a worker's saga outcomes and step latency, a consumer's lag), `/livez` and
/// `/readyz`; every other path answers 404.
pub fn ops_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", axum::routing::get(metrics))
        .route("/livez", axum::routing::get(health::livez))
        .route("/readyz", axum::routing::get(health::readyz))
        .fallback(|| async {
            ApiError::not_found("no such resource: this process serves /metrics, /livez and /readyz")
        })
        .with_state(state)
}

static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Builds the application router: the API, with `pages` (the ops console, which the caller
/// passes in so that the API does not depend on it) behind the same layers and fallbacks.
pub fn router(state: AppState, pages: Router<AppState>) -> Router {
    let (router, spec) = routes().split_for_parts();
    let spec = Arc::new(finish_spec(spec));
    let router = router
        .merge(pages)
        .route(
            "/openapi.json",
            axum::routing::get(move || {
                let spec = spec.clone();
                async move { axum::Json(spec.as_ref().clone()) }
            }),
        )
        .route("/metrics", axum::routing::get(metrics))
        // A browsable page for the document (Swagger UI, its assets compiled into the binary).
        .merge(
            utoipa_swagger_ui::SwaggerUi::new("/docs")
                .config(utoipa_swagger_ui::Config::from("/openapi.json")),
        )
        .fallback(|| async { ApiError::not_found("no such resource") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "Method not allowed",
                "this method is not allowed on this resource",
            )
        })
        .with_state(state);

    router
        .layer(DefaultBodyLimit::max(extract::MAX_BODY_BYTES))
        .layer(axum::middleware::map_response(problem_for_framework_errors))
        .layer(axum::middleware::from_fn(record_request_metrics))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(make_request_span)
                .on_response(|resp: &Response<_>, latency: Duration, span: &Span| {
                    span.record("http.response.status_code", resp.status().as_u16());
                    tracing::info!(
                        status = resp.status().as_u16(),
                        latency_ms = latency.as_millis() as u64,
                        "request finished"
                    );
                })
                .on_request(())
                .on_failure(()),
        )
        .layer(PropagateRequestIdLayer::new(REQUEST_ID.clone()))
        .layer(SetRequestIdLayer::new(REQUEST_ID.clone(), MakeRequestUuid))
}

/// `GET /metrics`: every instrument in Prometheus text format (the scrape endpoint; unauthenticated
/// like the health checks, so keep the port off the public internet or filter the path).
async fn metrics() -> impl axum::response::IntoResponse {
    // Gathering walks the instruments; off the order path, on a blocking thread.
    let text = tokio::task::spawn_blocking(crate::metrics::prometheus_text)
        .await
        .unwrap_or_default();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
}

/// Records `http.server.request.duration` with the matched route, method and status.
async fn record_request_metrics(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let started = std::time::Instant::now();
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_string());
    let resp = next.run(req).await;
    crate::metrics::get().http_request(
        method.as_str(),
        route.as_deref(),
        resp.status().as_u16(),
        started.elapsed(),
    );
    resp
}

fn make_request_span<B>(req: &Request<B>) -> Span {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| req.uri().path().to_string());
    let request_id = req
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let span = tracing::info_span!(
        "http.request",
        otel.name = format!("{} {}", req.method(), route),
        otel.kind = "server",
        http.request.method = %req.method(),
        url.path = %req.uri().path(),
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
        request_id = %request_id,
        trace_id = tracing::field::Empty,
        user_id = tracing::field::Empty,
    );
    crate::telemetry::set_remote_parent(&span, &opentelemetry_http::HeaderExtractor(req.headers()));
    span.record("trace_id", crate::telemetry::trace_id_of(&span));
    span
}
