//! Authentication: users, argon2id passwords, short-lived access JWTs (HS256 pinned), rotating
//! refresh tokens grouped in families, the access-token deny list, and the login rate limits.
//!
//! HTTP handlers live in `api::auth`; this module knows nothing of axum.

pub mod limiter;
pub mod password;
pub mod revocations;
pub mod tokens;
pub mod users;

use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use crate::config::ServiceConfig;

pub use limiter::LoginLimiter;
pub use password::PasswordHasher;

/// A user's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A customer.
    User,
    /// An operator allowed on `/admin`.
    Admin,
}

impl Role {
    /// The name stored in the database and carried in tokens.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Admin => "admin",
        }
    }

    /// Parses a stored role name.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "user" => Some(Role::User),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// Claims of an access token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// Issuer; must equal `JWT_ISSUER`.
    pub iss: String,
    /// Audience; must equal `JWT_AUDIENCE`.
    pub aud: String,
    /// The user id, as a decimal string.
    pub sub: String,
    /// Expiry (seconds since the epoch).
    pub exp: i64,
    /// Issued at (seconds since the epoch).
    pub iat: i64,
    /// Unique token id; logout denies it until `exp`.
    pub jti: Uuid,
    /// Role names.
    pub roles: Vec<String>,
    /// The caller's email.
    pub email: String,
    /// The refresh family this token was issued with (revoked by logout).
    pub fam: Uuid,
}

impl Claims {
    /// The user id (validated as a positive integer when the token was verified).
    pub fn user_id(&self) -> i32 {
        self.sub.parse().unwrap_or(0)
    }

    /// Whether the token carries a role.
    pub fn has_role(&self, role: Role) -> bool {
        self.roles.iter().any(|r| r == role.as_str())
    }
}

/// An issued token pair.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenPair {
    /// Access JWT for `Authorization: Bearer`.
    pub token: String,
    /// Opaque refresh token for `POST /auth/refresh`; single use.
    pub refresh_token: String,
    /// Seconds until the access token expires.
    pub expires_in: u64,
}

/// Why a token was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// Token issuing and verification, plus the password hasher and login limits.
#[derive(Clone)]
pub struct AuthService {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    issuer: String,
    audience: String,
    /// Access token lifetime.
    pub access_ttl: Duration,
    /// Refresh token lifetime.
    pub refresh_ttl: Duration,
    /// Password hashing off the async workers.
    pub hasher: PasswordHasher,
    /// Login rate limits.
    pub limiter: LoginLimiter,
    /// Revoked tokens and families in memory ([`revocations`]).
    pub revocations: std::sync::Arc<revocations::Revocations>,
}

impl AuthService {
    /// Builds the service from the configuration (the key is used as its raw bytes).
    pub fn new(cfg: &ServiceConfig) -> Self {
        let key = cfg.jwt_key();
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[cfg.jwt_issuer.as_str()]);
        validation.set_audience(&[cfg.jwt_audience.as_str()]);
        validation.set_required_spec_claims(&["exp", "iat", "sub", "iss", "aud"]);
        validation.leeway = 0;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        Self {
            encoding: EncodingKey::from_secret(key),
            decoding: DecodingKey::from_secret(key),
            validation,
            issuer: cfg.jwt_issuer.clone(),
            audience: cfg.jwt_audience.clone(),
            access_ttl: Duration::from_secs(cfg.access_token_ttl_seconds),
            refresh_ttl: Duration::from_secs(cfg.refresh_token_ttl_seconds),
            hasher: PasswordHasher::new(std::thread::available_parallelism().map_or(2, |n| n.get())),
            limiter: LoginLimiter::new(cfg.login_limit_per_account, cfg.login_limit_per_address),
            revocations: Default::default(),
        }
    }

    /// Signs an access token for a user in a refresh family.
    pub fn issue_access_token(
        &self,
        user_id: i32,
        email: &str,
        role: Role,
        family: Uuid,
    ) -> anyhow::Result<String> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let claims = Claims {
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            sub: user_id.to_string(),
            iat: now,
            exp: now + self.access_ttl.as_secs() as i64,
            jti: Uuid::new_v4(),
            roles: vec![role.as_str().to_string()],
            email: email.to_string(),
            fam: family,
        };
        Ok(jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &self.encoding,
        )?)
    }

    /// Verifies signature, algorithm, issuer, audience and expiry of an access token.
    pub fn verify_access_token(&self, token: &str) -> Result<Claims, TokenError> {
        if token.len() > 8192 {
            return Err(TokenError::Invalid("token too long".into()));
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| TokenError::Invalid(e.to_string()))?;
        if data.header.alg != Algorithm::HS256 {
            return Err(TokenError::Invalid("unexpected algorithm".into()));
        }
        let claims = data.claims;
        if claims.sub.parse::<i32>().map(|id| id <= 0).unwrap_or(true) {
            return Err(TokenError::Invalid("bad subject".into()));
        }
        Ok(claims)
    }

    /// Whether the token was denied by logout, its refresh family revoked, or its user disabled,
    /// deleted or unknown: from memory while the revocation cache is current and knows the user,
    /// else from the database in one query.
    pub async fn is_revoked(&self, db: &PgPool, claims: &Claims) -> Result<bool, sqlx::Error> {
        let user_id = claims.user_id();
        if self.revocations.knows_user(user_id) {
            return Ok(self.revocations.refuses(claims.jti, claims.fam, user_id));
        }
        let mut conn = db.acquire().await?;
        let check = tokens::access_check(&mut conn, claims.jti, claims.fam, user_id).await?;
        if check.user_exists {
            self.revocations.saw_user(user_id);
        }
        Ok(check.revoked)
    }
}

#[cfg(test)]
mod tests {
    //! Property tests of the token parser: no input makes it panic, and no change to a valid
    //! token yields other claims.
    use proptest::prelude::*;

    use super::*;

    fn service() -> &'static AuthService {
        static SERVICE: std::sync::OnceLock<AuthService> = std::sync::OnceLock::new();
        SERVICE.get_or_init(build)
    }

    fn build() -> AuthService {
        use clap::Parser;
        #[derive(Parser)]
        struct Args {
            #[command(flatten)]
            cfg: ServiceConfig,
        }
        let args = Args::parse_from(["test", "--jwt-secret", "0123456789abcdef0123456789abcdef-props"]);
        AuthService::new(&args.cfg)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn any_text_is_refused_without_a_panic(token in any::<String>()) {
            prop_assert!(service().verify_access_token(&token).is_err());
        }

        #[test]
        fn token_shaped_text_is_refused(a in "[A-Za-z0-9_-]{0,60}", b in "[A-Za-z0-9_-]{0,200}", c in "[A-Za-z0-9_-]{0,60}") {
            let token = format!("{a}.{b}.{c}");
            prop_assert!(service().verify_access_token(&token).is_err());
        }

        #[test]
        fn a_changed_token_is_refused_or_reads_the_same(pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let auth = service();
            let token = auth.issue_access_token(7, "a@b.c", Role::User, uuid::Uuid::new_v4()).unwrap();
            let original = auth.verify_access_token(&token).unwrap();
            let mut bytes = token.into_bytes();
            let i = pos.index(bytes.len());
            bytes[i] = byte;
            let Ok(changed) = String::from_utf8(bytes) else { return Ok(()) };
            if let Ok(c) = auth.verify_access_token(&changed) {
                prop_assert_eq!(
                    (c.sub, c.jti, c.fam, c.exp, c.roles),
                    (original.sub, original.jti, original.fam, original.exp, original.roles)
                );
            }
        }
    }
}
