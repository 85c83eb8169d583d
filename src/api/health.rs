//! `GET /livez`, `GET /readyz` and `GET /openapi.json`.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::api::AppState;
use crate::error::ApiError;

/// Health answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok` or `unavailable`.
    pub status: &'static str,
    /// Each check and its result.
    pub checks: serde_json::Value,
}

/// Liveness: the process is up and serving.
#[utoipa::path(get, path = "/livez", tag = "health", responses((status = 200, body = Health)))]
pub async fn livez() -> Json<Health> {
    Json(Health {
        status: "ok",
        checks: serde_json::json!({}),
    })
}

/// Readiness: PostgreSQL reachable with every migration applied, and the Kafka producer connected
/// when this process produces to Kafka. 503 otherwise.
#[utoipa::path(get, path = "/readyz", tag = "health", responses((status = 200, body = Health), (status = 503, description = "problem document with `checks`")))]
pub async fn readyz(State(state): State<AppState>) -> Response {
    let mut checks = serde_json::Map::new();
    let mut ok = true;
    match crate::db::check_ready(&state.db).await {
        Ok(()) => {
            checks.insert("postgres".into(), "ok".into());
        }
        Err(e) => {
            ok = false;
            checks.insert("postgres".into(), e.into());
        }
    }
    for probe in state.readiness.iter() {
        match (probe.check)() {
            Ok(()) => {
                checks.insert(probe.name.into(), "ok".into());
            }
            Err(e) => {
                ok = false;
                checks.insert(probe.name.into(), e.into());
            }
        }
    }
    if ok {
        let body = Health {
            status: "ok",
            checks: checks.into(),
        };
        (StatusCode::OK, Json(body)).into_response()
    } else {
        // Every error answer is a problem document; this one also lists the checks.
        ApiError::unavailable("the service is not ready")
            .with("checks", serde_json::Value::Object(checks))
            .into_response()
    }
}
