//! The users table (SQL): creation with a case-insensitively unique email, and look-ups.

use sqlx::PgConnection;

use super::Role;

/// A stored user.
#[derive(Debug, Clone)]
pub struct User {
    /// The user id.
    pub user_id: i32,
    /// Email as given at creation.
    pub email: String,
    /// argon2id PHC string.
    pub password_hash: String,
    /// Role name.
    pub role: String,
}

/// Why a user could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateUserError {
    #[error("a user with this email already exists")]
    EmailTaken,
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// Longest email accepted (RFC 5321 path limit).
pub const MAX_EMAIL_LEN: usize = 254;

/// A light check of an email's shape: one `@`, non-empty local part and domain, no spaces.
pub fn email_is_plausible(email: &str) -> bool {
    let email = email.trim();
    if email.is_empty() || email.len() > MAX_EMAIL_LEN || email.chars().any(char::is_whitespace) {
        return false;
    }
    match email.split_once('@') {
        Some((local, domain)) => !local.is_empty() && !domain.is_empty() && !domain.contains('@'),
        None => false,
    }
}

/// Inserts a user.
pub async fn create(
    conn: &mut PgConnection,
    email: &str,
    password_hash: &str,
    role: Role,
) -> Result<i32, CreateUserError> {
    let r = sqlx::query_scalar!(
        "insert into users (email, password_hash, role) values ($1, $2, $3) returning user_id",
        email.trim(),
        password_hash,
        role.as_str()
    )
    .fetch_one(&mut *conn)
    .await;
    match r {
        Ok(id) => Ok(id),
        Err(sqlx::Error::Database(e)) if e.constraint() == Some("users_email_lower_key") => {
            Err(CreateUserError::EmailTaken)
        }
        Err(e) => Err(e.into()),
    }
}

/// Finds a user by email, ignoring case.
pub async fn find_by_email(conn: &mut PgConnection, email: &str) -> Result<Option<User>, sqlx::Error> {
    sqlx::query_as!(
        User,
        "select user_id, email, password_hash, role from users where lower(email) = lower($1)",
        email.trim()
    )
    .fetch_optional(&mut *conn)
    .await
}

/// Finds a user by id.
pub async fn find_by_id(conn: &mut PgConnection, user_id: i32) -> Result<Option<User>, sqlx::Error> {
    sqlx::query_as!(
        User,
        "select user_id, email, password_hash, role from users where user_id = $1",
        user_id
    )
    .fetch_optional(&mut *conn)
    .await
}
