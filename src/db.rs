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

/// Runs `work` on a thread of its own named `name` (a single-threaded runtime), with a pool of up to
/// `connections` connections of its own made like `pool`'s, so its round trips are answered as
/// soon as the OS runs the thread, never queued behind the shared runtime's other tasks
/// (docs/performance.md, finding 27). The returned future, to spawn on the shared runtime,
/// resolves once `work` has finished; dropped before that (its runtime ending without a shutdown)
/// it cancels `orphan`, which `work` is to stop on. Should the thread not start, `work` runs in
/// the returned future itself, on `pool`.
pub fn apart<F, Fut>(
    name: &str,
    pool: &PgPool,
    connections: u32,
    orphan: tokio_util::sync::CancellationToken,
    work: F,
) -> impl Future<Output = ()> + Send + 'static + use<F, Fut>
where
    F: FnOnce(PgPool) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (done, finished) = tokio::sync::oneshot::channel::<()>();
    let opts = (*pool.connect_options()).clone();
    let slot = std::sync::Arc::new(std::sync::Mutex::new(Some(work)));
    let taken = slot.clone();
    let started = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .and_then(|rt| {
            std::thread::Builder::new().name(name.to_string()).spawn(move || {
                let work = taken.lock().ok().and_then(|mut w| w.take());
                if let Some(work) = work {
                    rt.block_on(async move {
                        let own = pool_with(opts, connections);
                        work(own.clone()).await;
                        own.close().await;
                    });
                }
                let _ = done.send(());
            })
        });
    let fallback = match started {
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(error = %e, thread = name, "no thread of its own; it runs on the shared runtime");
            slot.lock()
                .ok()
                .and_then(|mut w| w.take())
                .map(|w| (w, pool.clone()))
        }
    };
    let orphaned = orphan.drop_guard();
    async move {
        match fallback {
            Some((work, pool)) => work(pool).await,
            None => {
                let _ = finished.await;
            }
        }
        // Finished: nothing is left to stop.
        drop(orphaned.disarm());
    }
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio_util::sync::CancellationToken;

    use super::*;

    fn lazy_pool() -> PgPool {
        // Never connected: the work here makes no round trip.
        connect_lazy("postgres://nobody@127.0.0.1:1/none", 2).expect("a valid URL")
    }

    #[tokio::test]
    async fn work_set_apart_runs_on_its_own_thread_with_a_pool_of_its_own() {
        let pool = lazy_pool();
        let (tx, rx) = std::sync::mpsc::channel();
        let shared = pool.clone();
        apart(
            "apart-test",
            &pool,
            3,
            CancellationToken::new(),
            move |own| async move {
                let name = std::thread::current().name().map(str::to_string);
                let _ = tx.send((name, own.options().get_max_connections(), own.is_closed()));
                drop(shared);
            },
        )
        .await;
        let (name, max, closed) = rx.recv().expect("the work ran");
        assert_eq!(name.as_deref(), Some("apart-test"));
        assert_eq!(max, 3, "its own pool, with the connections asked for");
        assert!(!closed);
        assert_eq!(
            pool.options().get_max_connections(),
            2,
            "the shared pool is untouched"
        );
    }

    #[tokio::test]
    async fn work_set_apart_is_told_to_stop_when_its_runtime_drops_it() {
        let pool = lazy_pool();
        let orphan = CancellationToken::new();
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = orphan.clone();
        let task = tokio::spawn(apart(
            "apart-orphan",
            &pool,
            1,
            orphan.clone(),
            move |_| async move {
                stop.cancelled().await;
                let _ = tx.send(());
            },
        ));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(rx.try_recv().is_err(), "the work runs on");
        task.abort();
        let _ = task.await;
        rx.recv_timeout(Duration::from_secs(5))
            .expect("dropped by its runtime, the work was told to stop");

        // Finished work leaves its token alone.
        let done = CancellationToken::new();
        apart("apart-done", &pool, 1, done.clone(), |_| async {}).await;
        assert!(!done.is_cancelled());
    }
}
