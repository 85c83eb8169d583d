//! `ostore-orders dev`: the whole stack in one process on 127.0.0.1 with demo data and a printed
//! quick start.

use std::sync::Arc;

use crate::auth::{Role, users};
use crate::config::ServiceConfig;

/// Demo accounts created by `dev` (email, password, role).
pub const DEMO_USERS: [(&str, &str, Role); 3] = [
    ("alice@ostore.dev", "alice-password", Role::User),
    ("bob@ostore.dev", "bob-password", Role::User),
    ("admin@ostore.dev", "admin-password", Role::Admin),
];

/// Creates the demo users that do not exist yet.
pub async fn seed_users(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    for (email, pw, role) in DEMO_USERS {
        let mut conn = pool.acquire().await?;
        if users::find_by_email(&mut conn, email).await?.is_none() {
            drop(conn);
            match crate::cli::create_user_in(pool, email, pw, role).await {
                Ok(_) => {}
                Err(e) if e.to_string().contains("already exists") => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// Runs the development stack.
pub async fn run(cfg: ServiceConfig) -> anyhow::Result<()> {
    cfg.validate(true)?;
    let _telemetry = crate::telemetry::init("ostore-orders", cfg.log_format);
    crate::db::create_database_if_missing(&cfg.database_url).await?;
    let pool = crate::db::connect(&cfg.database_url, cfg.database_max_connections).await?;
    crate::db::migrate(&pool).await?;
    seed_users(&pool).await?;
    cfg.print("ostore-orders dev: effective configuration");
    let base = format!("http://{}", cfg.listen_addr);
    print_quick_start(&base);
    let shutdown = tokio_util::sync::CancellationToken::new();
    crate::app::cancel_on_signals(shutdown.clone());
    crate::app::run(Arc::new(cfg), &crate::app::ALL_ROLES, pool, shutdown).await
}

fn print_quick_start(base: &str) {
    let (email, pw, _) = DEMO_USERS[0];
    let (admin, admin_pw, _) = DEMO_USERS[2];
    println!(
        r#"
== OStore orders: development stack ==
API            {base}      (OpenAPI: {base}/openapi.json)
Demo users     {email} / {pw}    bob@ostore.dev / bob-password    {admin} / {admin_pw} (admin)

Quick start (copy-paste):
  TOKEN=$(curl -s -X POST {base}/auth/login -H 'content-type: application/json' \
      -d '{{"email":"{email}","password":"{pw}"}}' | sed -E 's/.*"token":"([^"]+)".*/\1/')
  curl -s {base}/me -H "authorization: Bearer $TOKEN"
"#
    );
}
