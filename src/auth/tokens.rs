//! Refresh tokens and the access-token deny list (SQL).
//!
//! A refresh token is 32 random bytes (base64url, `rt_` prefix) stored only as its SHA-256 hash.
//! Each login opens a family; every refresh marks the presented token used and issues the next one
//! in the same family. Presenting a used token again is taken as theft: the whole family is revoked.

use base64::Engine as _;
use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use time::OffsetDateTime;
use uuid::Uuid;

/// A new random refresh token (never stored in clear).
pub fn new_refresh_token() -> String {
    let bytes: [u8; 32] = rand::random();
    format!(
        "rt_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// The stored form of a refresh token.
pub fn hash_token(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// Opens a refresh family for a login and stores its first token.
pub async fn start_family(
    conn: &mut PgConnection,
    user_id: i32,
    token: &str,
    expires_at: OffsetDateTime,
) -> Result<Uuid, sqlx::Error> {
    let family = Uuid::now_v7();
    sqlx::query!(
        "insert into refresh_families (family_id, user_id) values ($1, $2)",
        family,
        user_id
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query!(
        "insert into refresh_tokens (token_hash, family_id, expires_at) values ($1, $2, $3)",
        hash_token(token),
        family,
        expires_at
    )
    .execute(&mut *conn)
    .await?;
    Ok(family)
}

/// The user a refresh succeeded for.
#[derive(Debug)]
pub struct Rotated {
    /// The family the new token belongs to.
    pub family_id: Uuid,
    /// The user.
    pub user_id: i32,
    /// The user's email.
    pub email: String,
    /// The user's role name.
    pub role: String,
}

/// Outcome of presenting a refresh token.
#[derive(Debug)]
pub enum RefreshOutcome {
    /// The token was live; it is now used and `next` is stored in its family.
    Rotated(Rotated),
    /// The token had been used before: its family is now revoked.
    Reused {
        /// The revoked family.
        family_id: Uuid,
    },
    /// Unknown, expired, or of a revoked family.
    Invalid,
}

/// Uses a refresh token once: marks it used and stores `next` in its family. Exactly one of several
/// concurrent presentations of one token can win the conditional update.
pub async fn rotate(
    conn: &mut PgConnection,
    presented: &str,
    next: &str,
    next_expires_at: OffsetDateTime,
) -> Result<RefreshOutcome, sqlx::Error> {
    let hash = hash_token(presented);
    let row = sqlx::query!(
        r#"
        update refresh_tokens t set used_at = now()
          from refresh_families f, users u
         where t.token_hash = $1
           and t.used_at is null
           and t.expires_at > now()
           and f.family_id = t.family_id
           and f.revoked_at is null
           and u.user_id = f.user_id
        returning t.family_id, u.user_id, u.email, u.role
        "#,
        hash
    )
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(r) = row {
        sqlx::query!(
            "insert into refresh_tokens (token_hash, family_id, expires_at) values ($1, $2, $3)",
            hash_token(next),
            r.family_id,
            next_expires_at
        )
        .execute(&mut *conn)
        .await?;
        return Ok(RefreshOutcome::Rotated(Rotated {
            family_id: r.family_id,
            user_id: r.user_id,
            email: r.email,
            role: r.role,
        }));
    }
    let used = sqlx::query!(
        "select family_id from refresh_tokens where token_hash = $1 and used_at is not null",
        hash
    )
    .fetch_optional(&mut *conn)
    .await?;
    match used {
        Some(u) => {
            revoke_family(conn, u.family_id, "refresh token reused").await?;
            Ok(RefreshOutcome::Reused {
                family_id: u.family_id,
            })
        }
        None => Ok(RefreshOutcome::Invalid),
    }
}

/// Revokes a refresh family (idempotent).
pub async fn revoke_family(
    conn: &mut PgConnection,
    family_id: Uuid,
    reason: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "update refresh_families set revoked_at = now(), revoked_reason = $2 where family_id = $1 and revoked_at is null",
        family_id,
        reason
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Denies an access token until it expires (idempotent).
pub async fn deny_access_token(
    conn: &mut PgConnection,
    jti: Uuid,
    expires_at: OffsetDateTime,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "insert into denied_access_tokens (jti, expires_at) values ($1, $2) on conflict (jti) do nothing",
        jti,
        expires_at
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// What the database says of an access token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccessCheck {
    /// Denied, its family revoked, or its user disabled, deleted or unknown.
    pub revoked: bool,
    /// Whether the token's user has a row (active or not).
    pub user_exists: bool,
}

/// Whether an access token was denied, its family revoked, or its user is not active, in one query.
pub async fn access_check(
    conn: &mut PgConnection,
    jti: Uuid,
    family_id: Uuid,
    user_id: i32,
) -> Result<AccessCheck, sqlx::Error> {
    let (denied, user_active): (bool, Option<bool>) = sqlx::query_as(
        "select (exists (select 1 from denied_access_tokens where jti = $1) \
                or exists (select 1 from refresh_families where family_id = $2 and revoked_at is not null)), \
                (select disabled_at is null from users where user_id = $3)",
    )
    .bind(jti)
    .bind(family_id)
    .bind(user_id)
    .fetch_one(&mut *conn)
    .await?;
    Ok(AccessCheck {
        revoked: denied || user_active != Some(true),
        user_exists: user_active.is_some(),
    })
}

/// Deletes refresh families nothing can use any more: no refresh token of theirs is left (each is
/// purged a day after it expired), and every access token issued with them has expired too, which
/// holds when an access token lives less than a refresh token plus that day (else none is
/// deleted: a revoked family must outlive its access tokens, or they would pass again).
pub async fn purge_families(
    conn: &mut PgConnection,
    access_ttl: u64,
    refresh_ttl: u64,
) -> Result<u64, sqlx::Error> {
    if access_ttl >= refresh_ttl.saturating_add(86_400) {
        return Ok(0);
    }
    let r = sqlx::query(
        "delete from refresh_families f
          where f.created_at < now() - interval '1 day'
            and not exists (select 1 from refresh_tokens t where t.family_id = f.family_id)",
    )
    .execute(conn)
    .await?;
    Ok(r.rows_affected())
}

/// Deletes deny-list entries and refresh tokens past their expiry.
pub async fn purge_expired(conn: &mut PgConnection) -> Result<u64, sqlx::Error> {
    let a = sqlx::query!("delete from denied_access_tokens where expires_at < now()")
        .execute(&mut *conn)
        .await?
        .rows_affected();
    let b = sqlx::query!("delete from refresh_tokens where expires_at < now() - interval '1 day'")
        .execute(&mut *conn)
        .await?
        .rows_affected();
    Ok(a + b)
}
