//! PostgreSQL: the connection pool, migrations (embedded from `migrations/`, applied under sqlx's
//! advisory lock so several instances may start at once), and the readiness probe.

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context as _;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions as _, Connection as _, PgPool};

/// The embedded migrations.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How long a pooled connection may sit idle before it is checked (a round trip) on its next use.
const PING_AFTER_IDLE: Duration = Duration::from_secs(1);

/// Opens a pool. Connections are made lazily, so a service starts (and answers `/readyz` with 503)
/// while the database is still down.
pub fn connect_lazy(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    let opts = PgConnectOptions::from_str(url)
        .context("DATABASE_URL is not a valid PostgreSQL connection string")?
        .application_name("ostore-orders")
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(1));
    Ok(pool_with(opts, max_connections))
}

/// A pool of up to `max_connections` connections made with `opts`, lazily: each on the runtime
/// that first needs it (the saga committers' thread has a pool of its own this way).
pub fn pool_with(opts: PgConnectOptions, max_connections: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(3))
        .idle_timeout(Duration::from_secs(300))
        // A connection is checked before use only after it sat idle a while: under load every
        // transaction began with a round trip of its own (sqlx pings on every acquire by default),
        // about a fifth of a shared commit's time (docs/performance.md, finding 19). A connection
        // that broke while in steady use fails its statement, is dropped, and the work is retried.
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for > PING_AFTER_IDLE {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
        .connect_lazy_with(opts)
}

/// Opens a pool and checks that the database answers.
pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    let pool = connect_lazy(url, max_connections)?;
    sqlx::query("select 1").execute(&pool).await.with_context(|| {
        format!(
            "cannot reach PostgreSQL at {}",
            crate::config::mask_url_password(url)
        )
    })?;
    Ok(pool)
}

/// Applies pending migrations (idempotent; safe when several instances start at once).
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR.run(pool).await.context("applying database migrations")?;
    Ok(())
}

/// Creates the database named in `url` when it does not exist (used by `dev`).
pub async fn create_database_if_missing(url: &str) -> anyhow::Result<()> {
    let opts = PgConnectOptions::from_str(url)
        .context("DATABASE_URL is not a valid PostgreSQL connection string")?;
    let name = opts.get_database().unwrap_or("postgres").to_string();
    let admin = opts.clone().database("postgres");
    let mut conn = sqlx::PgConnection::connect_with(&admin).await.with_context(|| {
        format!(
            "cannot reach PostgreSQL at {}",
            crate::config::mask_url_password(url)
        )
    })?;
    let exists: bool = sqlx::query_scalar("select exists (select 1 from pg_database where datname = $1)")
        .bind(&name)
        .fetch_one(&mut conn)
        .await?;
    if !exists {
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        // The name is quoted as an identifier (embedded quotes doubled) above.
        match sqlx::query(sqlx::AssertSqlSafe(format!("create database {quoted}")))
            .execute(&mut conn)
            .await
        {
            Ok(_) => tracing::info!(database = %name, "created database"),
            // Another process created it meanwhile.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
            Err(e) => return Err(e).context("creating the database"),
        }
    }
    conn.close().await.ok();
    Ok(())
}

/// Readiness: the database answers and every embedded migration is applied.
pub async fn check_ready(pool: &PgPool) -> Result<(), String> {
    let check = async {
        let applied: Vec<i64> =
            sqlx::query_scalar("select version from _sqlx_migrations where success order by version")
                .fetch_all(pool)
                .await
                .map_err(|_| "database unreachable".to_string())?;
        let missing = MIGRATOR.iter().filter(|m| !applied.contains(&m.version)).count();
        if missing > 0 {
            return Err(format!("{missing} migration(s) not applied"));
        }
        Ok(())
    };
    match tokio::time::timeout(Duration::from_secs(2), check).await {
        Ok(r) => r,
        Err(_) => Err("database did not answer in time".into()),
    }
}
