//! The real app on 127.0.0.1 port 0 with both simulators (and, on request, an embedded Kafka
//! broker, the outbox relay and the tracking consumer), and an HTTP client on it.

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use ostore_orders::config::ServiceConfig;
use ostore_orders::sim::catalog::CatalogSim;
use ostore_orders::sim::shipments::{ShipmentsSim, ShipmentsSimConfig};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::client;
use super::db::TestDb;
use super::net::serve_router;

#[derive(Parser)]
struct ConfigOnly {
    #[command(flatten)]
    c: ServiceConfig,
}

/// The key tests sign with.
pub const TEST_JWT_SECRET: &str = "test-secret-test-secret-test-secret-0123456789";

/// A configuration for tests: the given database, port 0, explicit values for everything else.
pub fn test_config(db_url: &str, extra: &[&str]) -> ServiceConfig {
    let mut args = vec![
        "test",
        "--database-url",
        db_url,
        "--listen-addr",
        "127.0.0.1:0",
        "--jwt-secret",
        TEST_JWT_SECRET,
        "--database-max-connections",
        "8",
    ];
    args.extend_from_slice(extra);
    ConfigOnly::parse_from(args).c
}

/// A running app.
pub struct TestApp {
    /// The Product Catalog simulator the app calls.
    pub catalog: CatalogSim,
    /// Its base URL.
    pub catalog_url: String,
    /// Its base URL.
    pub shipments_url: String,
    /// The app's saga engine.
    pub engine: ostore_orders::saga::engine::Engine,
    /// The embedded broker, when the app runs with Kafka.
    pub broker: Option<ostore_orders::kafka::EmbeddedBroker>,
    /// `http://127.0.0.1:port`.
    pub base: String,
    /// Pool on the app's database (for assertions).
    pub db: PgPool,
    /// HTTP client.
    pub http: reqwest::Client,
    /// Stops the app.
    pub shutdown: CancellationToken,
    /// Keeps the database alive for the test's duration.
    pub _testdb: Option<TestDb>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Options for `spawn_app_with`.
#[derive(Default)]
pub struct AppOptions<'a> {
    /// Extra config flags.
    pub flags: Vec<&'a str>,
    /// Use this database URL for the app instead of the test database's own.
    pub app_db_url: Option<String>,
    /// Run an embedded Kafka broker, the outbox relay and the tracking consumer; the shipments
    /// simulator publishes its TrackingEvents there.
    pub kafka: bool,
    /// Auto-advance of the shipments simulator, in milliseconds.
    pub auto_advance_ms: Option<u64>,
}

/// Starts the app with default options.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(AppOptions::default()).await
}

/// Starts the app with these extra config flags.
pub async fn spawn_app_with_flags(flags: &[&str]) -> TestApp {
    spawn_app_with(AppOptions {
        flags: flags.to_vec(),
        ..Default::default()
    })
    .await
}

/// Starts the app with Kafka (the shipper advancing every 200 ms) and one product whose first
/// reservation the catalog answers with a 503, then places one unit of it as a new customer, in
/// the trace of `traceparent`: the retry is part of the trace too. Returns the app and the answer.
pub async fn place_traced_order_retried_once(
    email: &str,
    key: &str,
    traceparent: &str,
) -> (TestApp, reqwest::Response) {
    let app = spawn_app_with(AppOptions {
        kafka: true,
        auto_advance_ms: Some(200),
        ..Default::default()
    })
    .await;
    app.product(1, 10, "1.00");
    app.catalog_faults(serde_json::json!({"failNext": 1, "endpoint": "reserve"}))
        .await;
    let (_, token) = app.customer(email).await;
    let r = app
        .place_traced(
            &token,
            key,
            traceparent,
            serde_json::json!([{"productID": 1, "quantity": 1}]),
        )
        .await;
    (app, r)
}

/// Starts the app (and both simulators) on a fresh database.
pub async fn spawn_app_with(opts: AppOptions<'_>) -> TestApp {
    let testdb = TestDb::new().await;
    let shutdown = CancellationToken::new();
    let catalog = CatalogSim::new();
    let catalog_url = serve_router(catalog.router(), shutdown.clone()).await;
    let topics = ostore_orders::outbox::Topics::default();
    let broker = opts.kafka.then(|| {
        ostore_orders::kafka::EmbeddedBroker::start(&[
            &topics.order_events,
            &topics.saga_events,
            &topics.tracking_events,
            &topics.notifications,
            &topics.tracking_dlq,
        ])
        .unwrap()
    });
    let bootstrap = broker.as_ref().map(|b| b.bootstrap_servers().to_string());
    let shipments = ShipmentsSim::new(ShipmentsSimConfig {
        kafka_bootstrap_servers: bootstrap.clone(),
        auto_advance_ms: opts.auto_advance_ms,
        ..ShipmentsSimConfig::default()
    })
    .unwrap();
    let shipments_url = serve_router(shipments.router(), shutdown.clone()).await;
    let app_url = opts.app_db_url.clone().unwrap_or_else(|| testdb.url.clone());
    let mut flags = vec![
        "--catalog-url",
        &catalog_url,
        "--shipments-url",
        &shipments_url,
        "--saga-retry-scale",
        "0.01",
    ];
    if let Some(b) = &bootstrap {
        flags.extend(["--kafka-bootstrap-servers", b.as_str()]);
    }
    flags.extend(opts.flags.iter().copied());
    let cfg = Arc::new(test_config(&app_url, &flags));
    let pool = ostore_orders::db::connect_lazy(&app_url, cfg.database_max_connections).unwrap();
    let state = ostore_orders::app::build_state(cfg.clone(), pool.clone(), true).unwrap();
    let engine = state.engine.clone();
    let tracker = tokio_util::task::TaskTracker::new();
    engine.start(&tracker, shutdown.clone());
    if let Some(b) = bootstrap.clone() {
        let (producer, _) =
            ostore_orders::kafka::producer(&b, &ostore_orders::kafka::ProducerSettings::default()).unwrap();
        let relay = ostore_orders::outbox::relay::RelayConfig {
            poll_interval: Duration::from_millis(200),
            ..Default::default()
        };
        tokio::spawn(ostore_orders::outbox::relay::run(
            pool.clone(),
            producer,
            relay,
            shutdown.clone(),
        ));
        let consumer = ostore_orders::tracking::ConsumerConfig {
            session_timeout: Duration::from_secs(6),
            heartbeat_interval: Duration::from_millis(500),
            unknown_order_window: Duration::from_secs(5),
            retry_initial_delay: Duration::from_millis(100),
            retry_poll_interval: Duration::from_millis(100),
            commit_interval: Duration::from_millis(200),
            ..Default::default()
        };
        let (p, s, t) = (pool.clone(), shutdown.clone(), topics.clone());
        tokio::spawn(async move { ostore_orders::tracking::run(p, consumer, &b, &t, s).await });
    }
    // The revocation cache, as the API role runs it (requests check the database until it is
    // current).
    let (revocations, p, s) = (state.auth.revocations.clone(), pool.clone(), shutdown.clone());
    tokio::spawn(async move { revocations.run(p, s).await });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(ostore_orders::app::serve_api(listener, state, shutdown.clone()));
    TestApp {
        catalog,
        catalog_url: catalog_url.clone(),
        shipments_url: shipments_url.clone(),
        engine,
        broker,
        base: format!("http://{addr}"),
        db: testdb.pool().await,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap(),
        shutdown,
        _testdb: Some(testdb),
    }
}

impl TestApp {
    /// Full URL of a path.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Creates a user directly and returns its id.
    pub async fn create_user(&self, email: &str, password: &str, role: ostore_orders::auth::Role) -> i32 {
        ostore_orders::cli::create_user_in(&self.db, email, password, role)
            .await
            .unwrap()
    }

    /// POSTs JSON.
    pub async fn post_json(
        &self,
        path: &str,
        body: &serde_json::Value,
        token: Option<&str>,
    ) -> reqwest::Response {
        let mut rb = self.http.post(self.url(path)).json(body);
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        rb.send().await.unwrap()
    }

    /// GETs with an optional bearer token.
    pub async fn get(&self, path: &str, token: Option<&str>) -> reqwest::Response {
        let mut rb = self.http.get(self.url(path));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        rb.send().await.unwrap()
    }

    /// GETs with an optional bearer token and reads the answer as JSON.
    pub async fn get_json(&self, path: &str, token: Option<&str>) -> serde_json::Value {
        self.get(path, token).await.json().await.unwrap()
    }

    /// DELETEs with a bearer token.
    pub async fn delete(&self, path: &str, token: &str) -> reqwest::Response {
        self.http
            .delete(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    /// `POST /orders` as the customer holding `token`, with an idempotency key; the caller adds
    /// the body (and any other header) and sends it.
    pub fn order_request(&self, token: &str, key: &str) -> reqwest::RequestBuilder {
        self.http
            .post(self.url("/orders"))
            .bearer_auth(token)
            .header("Idempotency-Key", key)
    }

    /// `POST /auth/login` with these credentials, whatever it answers.
    pub async fn try_login(&self, email: &str, password: &str) -> reqwest::Response {
        self.post_json(
            "/auth/login",
            &serde_json::json!({"email": email, "password": password}),
            None,
        )
        .await
    }

    /// Logs in and returns `(access, refresh)`.
    pub async fn login(&self, email: &str, password: &str) -> (String, String) {
        client::login(&self.http, &self.base, email, password).await
    }

    /// Creates the admin `ops@example.com` and logs in: `(user_id, access token)`.
    pub async fn admin(&self) -> (i32, String) {
        let id = self
            .create_user(
                "ops@example.com",
                "password-123",
                ostore_orders::auth::Role::Admin,
            )
            .await;
        let (t, _) = self.login("ops@example.com", "password-123").await;
        (id, t)
    }

    /// Creates a customer and logs in: `(user_id, access token)`.
    pub async fn customer(&self, email: &str) -> (i32, String) {
        let id = self
            .create_user(email, "password-123", ostore_orders::auth::Role::User)
            .await;
        let (t, _) = self.login(email, "password-123").await;
        (id, t)
    }
}

/// Asserts an answer is a problem document with the given status, and returns its body.
pub async fn assert_problem(resp: reqwest::Response, status: u16) -> serde_json::Value {
    assert_eq!(resp.status().as_u16(), status, "unexpected status");
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    assert!(
        ct.starts_with("application/problem+json"),
        "content-type was {ct:?}"
    );
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["status"], status);
    assert!(body["type"].is_string() && body["title"].is_string() && body["detail"].is_string());
    assert!(
        body["error"].is_string(),
        "the seed's `error` member is missing: {body}"
    );
    body
}

impl TestApp {
    /// Sets a product at the catalog simulator.
    pub fn product(&self, id: i32, stock: i64, price: &str) {
        self.catalog.put_product(id, stock, price.parse().unwrap(), "USD");
    }

    /// `PUT /sim/faults` on the catalog simulator.
    pub async fn catalog_faults(&self, faults: serde_json::Value) {
        client::put_faults(&self.http, &self.catalog_url, faults).await;
    }

    /// `PUT /sim/faults` on the shipments simulator.
    pub async fn shipment_faults(&self, faults: serde_json::Value) {
        client::put_faults(&self.http, &self.shipments_url, faults).await;
    }

    /// GETs a simulator path as JSON.
    pub async fn sim_get(&self, base: &str, path: &str) -> serde_json::Value {
        client::get_json(&self.http, &format!("{base}{path}")).await
    }

    /// Every reservation the catalog simulator holds.
    pub async fn reservations(&self) -> Vec<serde_json::Value> {
        serde_json::from_value(self.sim_get(&self.catalog_url, "/sim/reservations").await).unwrap()
    }

    /// Every shipment the shipments simulator holds.
    pub async fn sim_shipments(&self) -> Vec<serde_json::Value> {
        serde_json::from_value(self.sim_get(&self.shipments_url, "/sim/shipments").await).unwrap()
    }

    /// Places an order with a key.
    pub async fn place(&self, token: &str, key: &str, items: serde_json::Value) -> reqwest::Response {
        client::place(&self.http, &self.base, token, key, items).await
    }

    /// Places an order with a key, in the trace of `traceparent`.
    pub async fn place_traced(
        &self,
        token: &str,
        key: &str,
        traceparent: &str,
        items: serde_json::Value,
    ) -> reqwest::Response {
        client::place_traced(&self.http, &self.base, token, key, Some(traceparent), items).await
    }

    /// `POST /orders/{id}/cancel` as the customer holding `token`.
    pub async fn cancel(&self, token: &str, id: i64) -> reqwest::Response {
        self.post_json(
            &format!("/orders/{id}/cancel"),
            &serde_json::json!({}),
            Some(token),
        )
        .await
    }

    /// Waits until a SQL scalar query returns the expected text (or panics after `secs`).
    pub async fn eventually_eq(&self, sql: &str, expected: &str, secs: u64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let got: Option<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
                .fetch_optional(&self.db)
                .await
                .unwrap();
            if got.as_deref() == Some(expected) {
                return;
            }
            if std::time::Instant::now() > deadline {
                panic!("{sql} gave {got:?}, expected {expected:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs one SQL statement on the test database (a test's shortcut past the API).
    pub async fn exec(&self, sql: &str) {
        sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
            .execute(&self.db)
            .await
            .unwrap();
    }

    /// Waits until the (only) order is delivered and every outbox row is published: the shipper's
    /// TrackingEvents came back through Kafka and their notifications went out.
    pub async fn wait_delivered_and_published(&self) {
        self.eventually_eq("select status from orders", "delivered", 30)
            .await;
        self.eventually_eq(
            "select (count(*) = 0)::text from outbox where id > outbox_published_through()",
            "true",
            20,
        )
        .await;
    }

    /// A count from SQL.
    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
            .fetch_one(&self.db)
            .await
            .unwrap()
    }
}
