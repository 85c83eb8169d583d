//! The users table (SQL): creation with a case-insensitively unique email, look-ups, and the
//! account lifecycle (disable, enable, delete).
//!
//! - **Disabling** marks the user and revokes every refresh family of theirs in one transaction:
//!   their refresh tokens stop at once, and every access token of theirs is refused by the check
//!   every protected request makes ([`super::revocations`]: the inactive users are kept in memory,
//!   told by NOTIFY from a trigger on `users.disabled_at`, migration 0011).
//! - **Enabling** lets the user log in again; the sessions revoked by disabling stay revoked.
//! - **Deleting** disables for good: the row stays (orders reference it and stay readable to
//!   admins), no login finds it, it cannot be enabled, and its e-mail may go to a new account.

use serde::Serialize;
use sqlx::PgConnection;
use time::OffsetDateTime;

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
    /// Another account has this email (ignoring case): the unique index refused it.
    #[error("a user with this email already exists")]
    EmailTaken,
    /// The password could not be hashed.
    #[error(transparent)]
    Hash(anyhow::Error),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// Longest email accepted (RFC 5321 path limit).
pub const MAX_EMAIL_LEN: usize = 254;

/// A light check of an email's shape: one `@`, non-empty local part and domain, no spaces and no
/// control characters.
pub fn email_is_plausible(email: &str) -> bool {
    let email = email.trim();
    if email.is_empty()
        || email.len() > MAX_EMAIL_LEN
        || email.chars().any(|c| c.is_whitespace() || c.is_control())
    {
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
        // Told by the database's error (a unique violation of the email index), not its text.
        Err(sqlx::Error::Database(e))
            if e.is_unique_violation() && e.constraint() == Some("users_email_lower_key") =>
        {
            Err(CreateUserError::EmailTaken)
        }
        Err(e) => Err(e.into()),
    }
}

/// Hashes `password` (argon2id) and inserts the user. The caller checks the email's and the
/// password's shape first (as the CLI does).
pub async fn create_with_password(
    pool: &sqlx::PgPool,
    email: &str,
    password: &str,
    role: Role,
) -> Result<i32, CreateUserError> {
    let hash = super::password::hash_blocking(password).map_err(CreateUserError::Hash)?;
    let mut conn = pool.acquire().await?;
    create(&mut conn, email, &hash, role).await
}

/// Finds a user who can log in (neither disabled nor deleted) by email, ignoring case.
pub async fn find_active_by_email(conn: &mut PgConnection, email: &str) -> Result<Option<User>, sqlx::Error> {
    let row: Option<(i32, String, String, String)> = sqlx::query_as(
        "select user_id, email, password_hash, role from users \
          where lower(email) = lower($1) and disabled_at is null",
    )
    .bind(email.trim())
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map(|(user_id, email, password_hash, role)| User {
        user_id,
        email,
        password_hash,
        role,
    }))
}

/// Whether a user is active, locking the row for share until the transaction ends (a concurrent
/// disable waits for it).
pub async fn lock_if_active(conn: &mut PgConnection, user_id: i32) -> Result<bool, sqlx::Error> {
    let r: Option<i32> =
        sqlx::query_scalar("select user_id from users where user_id = $1 and disabled_at is null for share")
            .bind(user_id)
            .fetch_optional(&mut *conn)
            .await?;
    Ok(r.is_some())
}

/// Whether an account may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AccountStatus {
    /// Logs in; its tokens are accepted.
    Active,
    /// Refused until enabled again.
    Disabled,
    /// Refused for good; the row stays for the orders that reference it.
    Deleted,
}

/// A user as operators see it (no password hash).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Account {
    /// The user id.
    #[serde(rename = "userID")]
    pub user_id: i32,
    /// Email.
    pub email: String,
    /// Role name.
    pub role: String,
    /// Active, disabled or deleted.
    pub status: AccountStatus,
    /// When the account was created.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When it was disabled (null while active).
    #[serde(with = "time::serde::rfc3339::option")]
    pub disabled_at: Option<OffsetDateTime>,
    /// When it was deleted (null unless deleted).
    #[serde(with = "time::serde::rfc3339::option")]
    pub deleted_at: Option<OffsetDateTime>,
}

type AccountRow = (
    i32,
    String,
    String,
    OffsetDateTime,
    Option<OffsetDateTime>,
    Option<OffsetDateTime>,
);

fn account(r: AccountRow) -> Account {
    let (user_id, email, role, created_at, disabled_at, deleted_at) = r;
    let status = match (disabled_at, deleted_at) {
        (_, Some(_)) => AccountStatus::Deleted,
        (Some(_), None) => AccountStatus::Disabled,
        (None, None) => AccountStatus::Active,
    };
    Account {
        user_id,
        email,
        role,
        status,
        created_at,
        disabled_at,
        deleted_at,
    }
}

const ACCOUNT_BY_ID: &str =
    "select user_id, email, role, created_at, disabled_at, deleted_at from users where user_id = $1";
const ACCOUNT_BY_ID_FOR_UPDATE: &str = "select user_id, email, role, created_at, disabled_at, deleted_at from users where user_id = $1 for update";

/// An account by id (deleted ones included).
pub async fn account_by_id(conn: &mut PgConnection, user_id: i32) -> Result<Option<Account>, sqlx::Error> {
    let r: Option<AccountRow> = sqlx::query_as(ACCOUNT_BY_ID)
        .bind(user_id)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(r.map(account))
}

/// The id of the account that is not deleted with this email (ignoring case).
pub async fn id_by_email(conn: &mut PgConnection, email: &str) -> Result<Option<i32>, sqlx::Error> {
    sqlx::query_scalar("select user_id from users where lower(email) = lower($1) and deleted_at is null")
        .bind(email.trim())
        .fetch_optional(&mut *conn)
        .await
}

/// A lifecycle action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LifecycleAction {
    /// Refuse the account until enabled; revoke every session.
    Disable,
    /// Let a disabled account log in again.
    Enable,
    /// Refuse the account for good; revoke every session; keep the row.
    Delete,
}

impl LifecycleAction {
    /// The audit action name (`user.disable` ...).
    pub fn audit_name(self) -> &'static str {
        match self {
            LifecycleAction::Disable => "user.disable",
            LifecycleAction::Enable => "user.enable",
            LifecycleAction::Delete => "user.delete",
        }
    }
}

/// What a lifecycle action did.
#[derive(Debug)]
pub enum LifecycleOutcome {
    /// No such user.
    NotFound,
    /// A deleted account cannot be enabled.
    Deleted(Account),
    /// Applied (`changed` false when the account already was in that state: nothing written).
    Done {
        /// The account before.
        before: Account,
        /// The account after.
        after: Account,
        /// Whether anything changed.
        changed: bool,
        /// How many refresh families this revoked.
        families_revoked: u64,
    },
}

/// Applies a lifecycle action in the caller's transaction (commit it to take effect; the
/// triggers' NOTIFY goes out with the commit).
pub async fn apply_lifecycle(
    conn: &mut PgConnection,
    user_id: i32,
    action: LifecycleAction,
) -> Result<LifecycleOutcome, sqlx::Error> {
    let before: Option<AccountRow> = sqlx::query_as(ACCOUNT_BY_ID_FOR_UPDATE)
        .bind(user_id)
        .fetch_optional(&mut *conn)
        .await?;
    let Some(before) = before.map(account) else {
        return Ok(LifecycleOutcome::NotFound);
    };
    let sql = match (action, before.status) {
        (LifecycleAction::Enable, AccountStatus::Deleted) => return Ok(LifecycleOutcome::Deleted(before)),
        (LifecycleAction::Enable, AccountStatus::Active)
        | (LifecycleAction::Disable, AccountStatus::Disabled | AccountStatus::Deleted)
        | (LifecycleAction::Delete, AccountStatus::Deleted) => None,
        (LifecycleAction::Enable, AccountStatus::Disabled) => {
            Some("update users set disabled_at = null where user_id = $1")
        }
        (LifecycleAction::Disable, AccountStatus::Active) => {
            Some("update users set disabled_at = now() where user_id = $1")
        }
        (LifecycleAction::Delete, _) => Some(
            "update users set disabled_at = coalesce(disabled_at, now()), deleted_at = now() where user_id = $1",
        ),
    };
    let Some(sql) = sql else {
        return Ok(LifecycleOutcome::Done {
            after: before.clone(),
            before,
            changed: false,
            families_revoked: 0,
        });
    };
    sqlx::query(sql).bind(user_id).execute(&mut *conn).await?;
    let families_revoked = if action == LifecycleAction::Enable {
        0
    } else {
        sqlx::query(
            "update refresh_families set revoked_at = now(), revoked_reason = $2 \
              where user_id = $1 and revoked_at is null",
        )
        .bind(user_id)
        .bind(action.audit_name())
        .execute(&mut *conn)
        .await?
        .rows_affected()
    };
    let after: AccountRow = sqlx::query_as(ACCOUNT_BY_ID)
        .bind(user_id)
        .fetch_one(&mut *conn)
        .await?;
    Ok(LifecycleOutcome::Done {
        before,
        after: account(after),
        changed: true,
        families_revoked,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plausible_emails_have_one_at_and_no_spaces_or_control_characters() {
        assert!(email_is_plausible("ann@example.com"));
        assert!(email_is_plausible(" ann@example.com "));
        for bad in [
            "",
            "ann",
            "@example.com",
            "ann@",
            "a@b@c",
            "an n@example.com",
            "ann\u{1}@example.com",
            "ann@example.com\u{85}x",
        ] {
            assert!(!email_is_plausible(bad), "{bad:?}");
        }
        assert!(!email_is_plausible(&format!("{}@example.com", "a".repeat(250))));
    }
}
