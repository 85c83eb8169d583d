//! A fresh database per test, copied from a migrated template.

use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};

/// The server tests connect to (override with TEST_DATABASE_URL; any database on it works).
pub fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// The test server's URL without a database name (`postgres://user@host:port`).
pub fn server_url() -> String {
    let base = admin_url();
    match base.rsplit_once('/') {
        Some((prefix, _)) => prefix.to_string(),
        None => base,
    }
}

/// The URL of database `db` on the test server.
pub fn url_for(db: &str) -> String {
    format!("{}/{db}", server_url())
}

fn template_name() -> String {
    let mut h: u64 = 1469598103934665603;
    for m in ostore_orders::db::MIGRATOR.iter() {
        // The version too: a migration renumbered with the same text is another template.
        for b in m.version.to_le_bytes().iter().chain(m.checksum.iter()) {
            h = (h ^ u64::from(*b)).wrapping_mul(1099511628211);
        }
    }
    format!("ostore_test_tmpl_{h:016x}")
}

async fn ensure_template() -> String {
    let name = template_name();
    let mut conn = PgConnection::connect(&admin_url())
        .await
        .expect("connect to the test PostgreSQL");
    sqlx::query("select pg_advisory_lock(727274)")
        .execute(&mut conn)
        .await
        .unwrap();
    let exists: bool = sqlx::query_scalar("select exists (select 1 from pg_database where datname = $1)")
        .bind(&name)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    if !exists {
        let building = format!("{name}_building");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "drop database if exists {building} with (force)"
        )))
        .execute(&mut conn)
        .await
        .unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("create database {building}")))
            .execute(&mut conn)
            .await
            .unwrap();
        {
            let pool = PgPoolOptions::new()
                .max_connections(1)
                .connect(&url_for(&building))
                .await
                .unwrap();
            ostore_orders::db::migrate(&pool).await.unwrap();
            pool.close().await;
        }
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "alter database {building} rename to {name}"
        )))
        .execute(&mut conn)
        .await
        .unwrap();
    }
    sqlx::query("select pg_advisory_unlock(727274)")
        .execute(&mut conn)
        .await
        .unwrap();
    let _ = conn.close().await;
    name
}

/// A database of its own for one test, dropped when the value is dropped.
pub struct TestDb {
    /// Database name.
    pub name: String,
    /// Connection string.
    pub url: String,
}

impl TestDb {
    /// Creates a migrated database.
    pub async fn new() -> Self {
        let template = ensure_template().await;
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        let mut conn = PgConnection::connect(&admin_url()).await.unwrap();
        let mut tries = 0;
        loop {
            let r = sqlx::query(sqlx::AssertSqlSafe(format!(
                "create database {name} template {template}"
            )))
            .execute(&mut conn)
            .await;
            match r {
                Ok(_) => break,
                Err(e) if tries < 20 => {
                    tries += 1;
                    eprintln!("create database retry: {e}");
                    tokio::time::sleep(Duration::from_millis(100 * tries)).await;
                }
                Err(e) => panic!("create test database: {e}"),
            }
        }
        let _ = conn.close().await;
        TestDb {
            url: url_for(&name),
            name,
        }
    }

    /// A small pool on this database.
    pub async fn pool(&self) -> PgPool {
        self.pool_of(4).await
    }

    /// A pool of `max_connections` on this database.
    pub async fn pool_of(&self, max_connections: u32) -> PgPool {
        PgPoolOptions::new()
            .max_connections(max_connections)
            .connect(&self.url)
            .await
            .unwrap()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                if let Ok(mut conn) = PgConnection::connect(&admin_url()).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "drop database if exists {name} with (force)"
                    )))
                    .execute(&mut conn)
                    .await;
                }
            });
        })
        .join();
    }
}
