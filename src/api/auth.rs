//! `POST /auth/login`, `/auth/refresh`, `/auth/logout` and `GET /me`.

use std::net::SocketAddr;

use axum::Json;
use axum::extract::{ConnectInfo, State};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;

use crate::api::AppState;
use crate::api::extract::{ApiJson, AuthUser};
use crate::auth::tokens::{self, RefreshOutcome};
use crate::auth::{Role, TokenPair, password, users};
use crate::error::ApiError;

/// Credentials.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, remote = "Self")]
pub struct LoginRequest {
    /// The account's email (case-insensitive).
    pub email: String,
    /// The password.
    pub password: String,
}
crate::api::extract::object_only!(LoginRequest);

/// A refresh token to exchange. SPEC §2: "anything but a live refresh token sent to
/// `/auth/refresh` → 401", so a body without `token`, or with one that is not text, is read (and
/// then refused with 401) instead of answering 422; malformed JSON is still 400 and an unknown
/// field still 422.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, remote = "Self")]
pub struct RefreshRequest {
    /// The refresh token from the last login or refresh.
    #[serde(default, deserialize_with = "text_or_none")]
    #[schema(value_type = String)]
    pub token: Option<String>,
}

/// A JSON value as text when it is a string, else None.
fn text_or_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => Some(s),
        _ => None,
    })
}
crate::api::extract::object_only!(RefreshRequest);

/// The caller.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Me {
    /// The user id.
    #[serde(rename = "userID")]
    pub user_id: i32,
    /// Email.
    pub email: String,
    /// Role names.
    pub roles: Vec<String>,
}

/// Answer to a logout.
#[derive(Debug, Serialize, ToSchema)]
pub struct LoggedOut {
    /// Always `"logged out"`.
    pub status: &'static str,
}

fn bad_credentials() -> ApiError {
    // One body for unknown email and wrong password.
    ApiError::new(
        axum::http::StatusCode::UNAUTHORIZED,
        "invalid-credentials",
        "Unauthorized",
        "invalid email or password",
    )
}

fn expiry(d: std::time::Duration) -> OffsetDateTime {
    OffsetDateTime::now_utc() + d
}

/// Exchanges credentials for an access token and a refresh token.
#[utoipa::path(post, path = "/auth/login", tag = "auth", request_body = LoginRequest,
    responses((status = 200, body = TokenPair), (status = 401, description = "unknown email or wrong password"),
              (status = 422, description = "an over-long email or password"), (status = 429, description = "rate limited; see Retry-After")))]
pub async fn login(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiJson(req): ApiJson<LoginRequest>,
) -> Result<Json<TokenPair>, ApiError> {
    if let Err(wait) = state.auth.limiter.check(&req.email, peer.ip()) {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        return Err(ApiError::too_many_requests(
            secs,
            "too many login attempts; try again later",
        ));
    }
    if req.password.len() > password::MAX_PASSWORD_BYTES {
        return Err(ApiError::invalid_field(
            "password",
            "password: at most 1024 bytes",
        ));
    }
    if req.email.len() > users::MAX_EMAIL_LEN {
        return Err(ApiError::invalid_field("email", "email: at most 254 characters"));
    }
    let mut conn = state.db.acquire().await?;
    // Disabled and deleted users are not found: the same 401 as an unknown email.
    let user = users::find_active_by_email(&mut conn, &req.email).await?;
    drop(conn);
    let ok = state
        .auth
        .hasher
        .verify(req.password, user.as_ref().map(|u| u.password_hash.clone()))
        .await?;
    let Some(user) = user.filter(|_| ok) else {
        tracing::info!("login refused");
        return Err(bad_credentials());
    };
    let role = Role::parse(&user.role).ok_or_else(|| ApiError::internal("user has an unknown role"))?;
    let refresh = tokens::new_refresh_token();
    let mut tx = state.db.begin().await?;
    // Disabled meanwhile? The share lock also makes a concurrent disable wait for this commit, and
    // then revoke the family started here.
    if !users::lock_if_active(&mut tx, user.user_id).await? {
        return Err(bad_credentials());
    }
    let family =
        tokens::start_family(&mut tx, user.user_id, &refresh, expiry(state.auth.refresh_ttl)).await?;
    tx.commit().await?;
    let token = state
        .auth
        .issue_access_token(user.user_id, &user.email, role, family)?;
    tracing::info!(user_id = user.user_id, "login");
    Ok(Json(TokenPair {
        token,
        refresh_token: refresh,
        expires_in: state.auth.access_ttl.as_secs(),
    }))
}

/// Exchanges a live refresh token for a new pair; the presented token is spent. Presenting a spent
/// token revokes its whole family.
#[utoipa::path(post, path = "/auth/refresh", tag = "auth", request_body = RefreshRequest,
    responses((status = 200, body = TokenPair), (status = 401, description = "not a live refresh token")))]
pub async fn refresh(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<RefreshRequest>,
) -> Result<Json<TokenPair>, ApiError> {
    let invalid = || ApiError::unauthorized("the refresh token is invalid, expired or revoked");
    let Some(token) = req.token.filter(|t| t.starts_with("rt_") && t.len() <= 128) else {
        return Err(invalid());
    };
    let next = tokens::new_refresh_token();
    let mut tx = state.db.begin().await?;
    let outcome = tokens::rotate(&mut tx, &token, &next, expiry(state.auth.refresh_ttl)).await?;
    tx.commit().await?;
    match outcome {
        RefreshOutcome::Rotated(r) => {
            let role = Role::parse(&r.role).ok_or_else(|| ApiError::internal("user has an unknown role"))?;
            let token = state
                .auth
                .issue_access_token(r.user_id, &r.email, role, r.family_id)?;
            Ok(Json(TokenPair {
                token,
                refresh_token: next,
                expires_in: state.auth.access_ttl.as_secs(),
            }))
        }
        RefreshOutcome::Reused { family_id } => {
            // At once on this instance (others learn it from the NOTIFY of the commit).
            state.auth.revocations.remember_family(family_id);
            tracing::warn!("a spent refresh token was presented again; its family is revoked");
            Err(invalid())
        }
        RefreshOutcome::Invalid => Err(invalid()),
    }
}

/// Revokes the caller's refresh family and denies the presented access token until it expires.
#[utoipa::path(post, path = "/auth/logout", tag = "auth", security(("bearer" = [])),
    responses((status = 200, body = LoggedOut), (status = 401)))]
pub async fn logout(
    State(state): State<AppState>,
    AuthUser(claims): AuthUser,
) -> Result<Json<LoggedOut>, ApiError> {
    let exp = OffsetDateTime::from_unix_timestamp(claims.exp).unwrap_or_else(|_| OffsetDateTime::now_utc());
    let mut tx = state.db.begin().await?;
    tokens::revoke_family(&mut tx, claims.fam, "logout").await?;
    tokens::deny_access_token(&mut tx, claims.jti, exp).await?;
    tx.commit().await?;
    // At once on this instance (others learn it from the NOTIFY of the commit).
    state.auth.revocations.remember_family(claims.fam);
    state.auth.revocations.remember_jti(claims.jti);
    Ok(Json(LoggedOut { status: "logged out" }))
}

/// The caller's identity.
#[utoipa::path(get, path = "/me", tag = "auth", security(("bearer" = [])), responses((status = 200, body = Me), (status = 401)))]
pub async fn me(AuthUser(claims): AuthUser) -> Json<Me> {
    Json(Me {
        user_id: claims.user_id(),
        email: claims.email.clone(),
        roles: claims.roles.clone(),
    })
}
