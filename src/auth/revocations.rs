//! Revoked access tokens and refresh families, and users who are no longer active (disabled or
//! deleted), kept in memory so that an authenticated request costs no query.
//!
//! - **Kept current by LISTEN/NOTIFY.** Triggers on `denied_access_tokens` (insert) and
//!   `refresh_families` (`revoked_at` set) NOTIFY channel [`CHANNEL`] with `jti:<uuid>` or
//!   `fam:<uuid>` in the writing transaction, whichever instance or tool writes (migration 0010);
//!   a trigger on `users.disabled_at` sends `user-off:<id>` and `user-on:<id>` (migration 0011).
//! - **Users the snapshot did not know** (created after it, on any instance) have ids above the
//!   highest it saw: their requests ask the database, which also raises that mark. Users are never
//!   removed (a trigger refuses it), so an id at or below the mark names a row.
//! - **LISTEN first, then the snapshot.** The task listens before it reads every live revocation,
//!   so a revocation committed while it reads arrives as a notification: nothing falls in between.
//!   It reads the snapshot again every [`RELOAD_EVERY`], which also forgets expired entries.
//! - **The database answers while the cache is not current**: before the first snapshot, and from
//!   the moment the listening connection fails until a new one has read a new snapshot.
//! - **This instance's own revocations count at once** (`remember_*` after the logout's commit); another
//!   instance's count once its NOTIFY arrives, a few milliseconds after the commit.

use std::collections::HashSet;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The NOTIFY channel of revocations.
pub const CHANNEL: &str = "auth_revocations";

/// How often the whole set is read again (drops entries past their expiry).
pub const RELOAD_EVERY: Duration = Duration::from_secs(300);

#[derive(Default)]
struct Sets {
    jtis: HashSet<Uuid>,
    families: HashSet<Uuid>,
    /// Users disabled or deleted.
    inactive_users: HashSet<i32>,
}

/// The in-memory revocation sets and whether they are current.
#[derive(Default)]
pub struct Revocations {
    sets: RwLock<Sets>,
    current: AtomicBool,
    /// The highest user id known to exist: the sets answer for users up to it.
    highest_user: AtomicI32,
}

impl Revocations {
    /// Whether the sets are current (else ask the database).
    pub fn is_current(&self) -> bool {
        self.current.load(Ordering::Acquire)
    }

    /// Whether the token or its family is revoked, by the sets alone.
    pub fn contains(&self, jti: Uuid, family: Uuid) -> bool {
        let s = self.sets.read().expect("revocations");
        s.jtis.contains(&jti) || s.families.contains(&family)
    }

    /// Whether the sets can answer for this user: they are current and the user is not newer than
    /// the snapshot (else ask the database).
    pub fn knows_user(&self, user_id: i32) -> bool {
        self.is_current() && user_id <= self.highest_user.load(Ordering::Acquire)
    }

    /// Whether a user is disabled or deleted, by the sets alone.
    pub fn user_is_inactive(&self, user_id: i32) -> bool {
        self.sets
            .read()
            .expect("revocations")
            .inactive_users
            .contains(&user_id)
    }

    /// Whether a token is refused by the sets alone: denied, its family revoked, or its user
    /// inactive (one read of the sets).
    pub fn refuses(&self, jti: Uuid, family: Uuid, user_id: i32) -> bool {
        let s = self.sets.read().expect("revocations");
        s.jtis.contains(&jti) || s.families.contains(&family) || s.inactive_users.contains(&user_id)
    }

    /// Records that a user exists (the database said so): the sets answer for them from now on.
    pub fn saw_user(&self, user_id: i32) {
        self.highest_user.fetch_max(user_id, Ordering::AcqRel);
    }

    /// Counts a user as disabled or deleted (after the transaction committed).
    pub fn remember_inactive_user(&self, user_id: i32) {
        self.sets
            .write()
            .expect("revocations")
            .inactive_users
            .insert(user_id);
    }

    /// Counts a user as active again (after the enabling transaction committed).
    pub fn forget_inactive_user(&self, user_id: i32) {
        self.sets
            .write()
            .expect("revocations")
            .inactive_users
            .remove(&user_id);
    }

    /// Counts an access token as denied (after the denying transaction committed).
    pub fn remember_jti(&self, jti: Uuid) {
        self.sets.write().expect("revocations").jtis.insert(jti);
    }

    /// Counts a refresh family as revoked (after the revoking transaction committed).
    pub fn remember_family(&self, family: Uuid) {
        self.sets.write().expect("revocations").families.insert(family);
    }

    fn apply(&self, payload: &str) {
        if let Some(id) = payload.strip_prefix("jti:").and_then(|s| Uuid::parse_str(s).ok()) {
            self.remember_jti(id);
        } else if let Some(id) = payload.strip_prefix("fam:").and_then(|s| Uuid::parse_str(s).ok()) {
            self.remember_family(id);
        } else if let Some(id) = payload.strip_prefix("user-off:").and_then(|s| s.parse().ok()) {
            self.remember_inactive_user(id);
        } else if let Some(id) = payload.strip_prefix("user-on:").and_then(|s| s.parse().ok()) {
            self.forget_inactive_user(id);
        }
    }

    async fn reload(&self, db: &PgPool) -> Result<(), sqlx::Error> {
        let jtis: Vec<Uuid> =
            sqlx::query_scalar("select jti from denied_access_tokens where expires_at > now()")
                .fetch_all(db)
                .await?;
        let families: Vec<Uuid> =
            sqlx::query_scalar("select family_id from refresh_families where revoked_at is not null")
                .fetch_all(db)
                .await?;
        let inactive: Vec<i32> =
            sqlx::query_scalar("select user_id from users where disabled_at is not null")
                .fetch_all(db)
                .await?;
        let highest: i32 = sqlx::query_scalar("select coalesce(max(user_id), 0) from users")
            .fetch_one(db)
            .await?;
        let mut s = self.sets.write().expect("revocations");
        self.highest_user.fetch_max(highest, Ordering::AcqRel);
        // Entries added by this instance meanwhile are in the snapshot too (their commits
        // preceded it) or arrive as notifications, which are applied after this.
        s.jtis = jtis.into_iter().collect();
        s.families = families.into_iter().collect();
        s.inactive_users = inactive.into_iter().collect();
        Ok(())
    }

    /// Keeps the sets current until `shutdown`: listen, read the snapshot, apply notifications;
    /// on any failure the database answers again until a new listener has read a new snapshot.
    pub async fn run(&self, db: PgPool, shutdown: CancellationToken) {
        loop {
            self.current.store(false, Ordering::Release);
            if shutdown.is_cancelled() {
                return;
            }
            let followed = self.follow(&db, &shutdown).await;
            self.current.store(false, Ordering::Release);
            if let Err(e) = followed {
                tracing::warn!(error = %e, "revocation cache: listening failed; tokens are checked in the database meanwhile");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    async fn follow(&self, db: &PgPool, shutdown: &CancellationToken) -> Result<(), sqlx::Error> {
        let mut listener = PgListener::connect_with(db).await?;
        listener.listen(CHANNEL).await?;
        loop {
            self.reload(db).await?;
            self.current.store(true, Ordering::Release);
            let reload = tokio::time::sleep(RELOAD_EVERY);
            tokio::pin!(reload);
            loop {
                let n = tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = &mut reload => break,
                    n = listener.try_recv() => n?,
                };
                match n {
                    Some(n) => self.apply(n.payload()),
                    // The connection was lost (and would reconnect without the notifications sent
                    // meanwhile): the cache is no longer current.
                    None => {
                        return Err(sqlx::Error::Protocol("the LISTEN connection was lost".into()));
                    }
                }
            }
        }
    }
}
