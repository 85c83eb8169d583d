//! Crash recovery with the real binary: the service process is SIGKILLed while a saga waits on a
//! slow downstream call (during each step and during a compensation), restarted, and every saga
//! must then finish with exactly one reservation and at most one shipment. And graceful shutdown:
//! `serve` and `dev` stop within 5 s of a SIGTERM, with in-flight sagas kept.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ostore_orders::auth::Role;
use ostore_orders::sim::catalog::CatalogSim;
use ostore_orders::sim::shipments::{ShipmentsSim, ShipmentsSimConfig};
use serde_json::{Value, json};
use support::client::{self, put_faults as faults, wait_ready};
use support::{TestDb, free_port, serve_router};
use tokio_util::sync::CancellationToken;

struct Service {
    child: Option<Child>,
    port: u16,
    env: Vec<(String, String)>,
}

impl Service {
    fn start(&mut self) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ostore-orders"));
        cmd.args(["serve", "--roles", "api,worker"])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("start the service"));
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGKILL: no shutdown code runs.
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Sends SIGTERM and waits for the exit (at most 30 s): how long it took, and whether the
    /// process exited successfully.
    async fn terminate(&mut self) -> (Duration, bool) {
        let mut c = self.child.take().expect("running");
        terminate(&mut c).await
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts the service and waits until it answers ready.
    async fn start_ready(&mut self, http: &reqwest::Client) {
        self.start();
        wait_ready(http, &self.base()).await;
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

/// SIGTERM to a child, then its exit: (time taken, success). SIGKILL after 30 s. Async: the
/// simulators of the test run on this runtime and must keep answering meanwhile.
async fn terminate(c: &mut Child) -> (Duration, bool) {
    let t0 = Instant::now();
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
    loop {
        if let Some(status) = c.try_wait().unwrap() {
            return (t0.elapsed(), status.success());
        }
        if t0.elapsed() > Duration::from_secs(30) {
            let _ = c.kill();
            let _ = c.wait();
            return (t0.elapsed(), false);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How long a SIGTERMed process may take: the 5 s the service promises, plus room for a loaded
/// machine (this is a bound, not a speed measurement).
const STOP_BOUND: Duration = Duration::from_secs(7);

/// The crash tests' customer (created with `users create` before the service starts).
async fn login(http: &reqwest::Client, base: &str) -> String {
    client::login(http, base, "crash@example.com", "password-123")
        .await
        .0
}

/// Places an order of one unit of product 1; returns the answer's status.
async fn place(http: &reqwest::Client, base: &str, token: &str, key: &str) -> reqwest::StatusCode {
    client::place(http, base, token, key, json!([{"productID": 1, "quantity": 1}]))
        .await
        .status()
}

async fn wait_all_finished(pool: &sqlx::PgPool, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done: i64 = sqlx::query_scalar(
            "select count(*) from sagas where state in ('completed', 'failed', 'compensated')",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if done == n {
            return;
        }
        let states: Vec<(String, String)> =
            sqlx::query_as("select state, coalesce(last_error, '') from sagas")
                .fetch_all(pool)
                .await
                .unwrap();
        assert!(
            Instant::now() < deadline,
            "sagas did not finish after the restart: {states:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Stock of product 1 when a stack starts.
const INITIAL_STOCK: i64 = 1000;

/// The invariants of the drained system ([`ostore_orders::verify`]), against the simulators.
async fn verify(
    pool: &sqlx::PgPool,
    catalog_url: &str,
    shipments_url: &str,
) -> ostore_orders::verify::Report {
    let options = ostore_orders::verify::Options {
        simulators: Some(ostore_orders::verify::Simulators {
            catalog_url: catalog_url.to_string(),
            shipments_url: shipments_url.to_string(),
        }),
        initial_stock: [(1, INITIAL_STOCK)].into(),
        topic_records: None,
        topics: Default::default(),
    };
    ostore_orders::verify::run(pool, &options).await.unwrap()
}

/// A database with one customer, both simulators (product 1 in stock), and a service (not started
/// yet) pointed at them, with a short lease and fast retries.
struct Stack {
    /// The database and the simulators, kept for the test's whole run (the database is dropped
    /// with it; the simulators' servers serve their state).
    _keep: (TestDb, CatalogSim, ShipmentsSim),
    pool: sqlx::PgPool,
    stop: CancellationToken,
    catalog_url: String,
    shipments_url: String,
    svc: Service,
    http: reqwest::Client,
}

impl Stack {
    async fn new() -> Stack {
        let db = TestDb::new().await;
        let pool = db.pool().await;
        ostore_orders::cli::create_user_in(&pool, "crash@example.com", "password-123", Role::User)
            .await
            .unwrap();
        let stop = CancellationToken::new();
        let catalog = CatalogSim::new();
        catalog.put_product(1, INITIAL_STOCK, "2.00".parse().unwrap(), "USD");
        let catalog_url = serve_router(catalog.router(), stop.clone()).await;
        let shipments = ShipmentsSim::new(ShipmentsSimConfig::default()).unwrap();
        let shipments_url = serve_router(shipments.router(), stop.clone()).await;
        let port = free_port();
        let svc = Service {
            child: None,
            port,
            env: vec![
                ("DATABASE_URL".into(), db.url.clone()),
                ("LISTEN_ADDR".into(), format!("127.0.0.1:{port}")),
                ("JWT_SECRET".into(), support::TEST_JWT_SECRET.into()),
                ("CATALOG_URL".into(), catalog_url.clone()),
                ("SHIPMENTS_URL".into(), shipments_url.clone()),
                ("SAGA_LEASE_MS".into(), "6000".into()),
                ("SAGA_RETRY_SCALE".into(), "0.01".into()),
                ("ORDER_WAIT_MS".into(), "100".into()),
            ],
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();
        Stack {
            _keep: (db, catalog, shipments),
            pool,
            stop,
            catalog_url,
            shipments_url,
            svc,
            http,
        }
    }
}

#[tokio::test]
async fn a_service_killed_mid_saga_resumes_every_saga_without_duplicates() {
    let Stack {
        _keep,
        pool,
        stop,
        catalog_url,
        shipments_url,
        mut svc,
        http,
    } = Stack::new().await;
    svc.start_ready(&http).await;
    let token = login(&http, &svc.base()).await;

    // Killed while one call of a saga waits on a slow service: the faults that set it up, the
    // service held up (its faults are lifted before the restart), the order's key, and how long
    // after placing it the kill comes.
    let slow = |endpoint: &str| json!({"latencyMs": 1500, "endpoint": endpoint});
    let refuse_shipment = json!({"failNext": 1, "failStatus": 422, "endpoint": "create"});
    let kills = [
        // 1. While reserve_inventory waits on the catalog.
        (vec![], &catalog_url, slow("reserve"), "during-reserve", 300),
        // 2. While create_shipment waits on the shipper.
        (vec![], &shipments_url, slow("create"), "during-shipment", 400),
        // 3. During a compensation (release after a fatal shipment refusal).
        (
            vec![(&shipments_url, refuse_shipment)],
            &catalog_url,
            slow("release"),
            "during-compensation",
            500,
        ),
    ];
    for (finished, (other_faults, held_up, held_up_fault, key, kill_after_ms)) in (1..).zip(kills) {
        for (url, fault) in other_faults {
            faults(&http, url, fault).await;
        }
        faults(&http, held_up, held_up_fault).await;
        assert_eq!(place(&http, &svc.base(), &token, key).await, 202, "{key}");
        tokio::time::sleep(Duration::from_millis(kill_after_ms)).await;
        svc.kill();
        faults(&http, held_up, json!([])).await;
        svc.start_ready(&http).await;
        wait_all_finished(&pool, finished).await;
    }

    // 4. Killed at arbitrary instants while several orders are in flight.
    faults(&http, &catalog_url, json!({"latencyMs": 150})).await;
    faults(&http, &shipments_url, json!({"latencyMs": 150})).await;
    for round in 0..3 {
        let base = svc.base();
        let placing = (0..5)
            .map(|i| {
                let (http, base, token) = (http.clone(), base.clone(), token.clone());
                async move { place(&http, &base, &token, &format!("r{round}-{i}")).await }
            })
            .collect::<Vec<_>>();
        let _ = tokio::time::timeout(
            Duration::from_millis(250 + 90 * round),
            futures::future::join_all(placing),
        )
        .await;
        svc.kill();
        svc.start_ready(&http).await;
    }
    faults(&http, &catalog_url, json!([])).await;
    faults(&http, &shipments_url, json!([])).await;
    let total: i64 = sqlx::query_scalar("select count(*) from sagas")
        .fetch_one(&pool)
        .await
        .unwrap();
    wait_all_finished(&pool, total).await;

    // Exactly one reservation per saga, at most one shipment per order, and the catalog agrees:
    // the invariants the fault-injection suite checks too (sagas settled, no double reservation
    // or shipment, reservations and shipments matching the live orders, stock adding up, orders
    // agreeing with their sagas). Without a broker, the outbox and tracking checks do not apply.
    verify(&pool, &catalog_url, &shipments_url)
        .await
        .assert_hold(&[1, 2, 3, 7]);
    let sagas: Vec<(uuid::Uuid, i32, String)> = sqlx::query_as("select saga_id, order_id, state from sagas")
        .fetch_all(&pool)
        .await
        .unwrap();
    let completed = sagas.iter().filter(|s| s.2 == "completed").count() as i64;
    let product: Value = client::get_json(&http, &format!("{catalog_url}/sim/products/1")).await;
    assert_eq!(
        product["reserved"].as_i64().unwrap(),
        completed,
        "reserved stock must match completed orders"
    );
    assert_eq!(
        sqlx::query_scalar::<_, i64>("select count(*) from sagas where state = 'failed'")
            .fetch_one(&pool)
            .await
            .unwrap(),
        1
    );
    svc.kill();
    stop.cancel();
}

#[tokio::test]
async fn serve_stops_within_five_seconds_of_sigterm_keeping_its_in_flight_sagas() {
    let mut stack = Stack::new().await;
    let (http, pool) = (stack.http.clone(), stack.pool.clone());

    // Idle: stops at once.
    stack.svc.start_ready(&http).await;
    let (took, ok) = stack.svc.terminate().await;
    assert!(ok, "serve exited with a failure after SIGTERM");
    assert!(took < STOP_BOUND, "an idle serve took {took:?} to stop");

    // Busy: one saga waits on a shipper that never answers, three on a slow catalog, when the
    // signal comes.
    stack.svc.start_ready(&http).await;
    let token = login(&http, &stack.svc.base()).await;
    faults(
        &http,
        &stack.shipments_url,
        json!({"hang": true, "endpoint": "create"}),
    )
    .await;
    assert_eq!(place(&http, &stack.svc.base(), &token, "hanging").await, 202);
    faults(
        &http,
        &stack.catalog_url,
        json!({"latencyMs": 1500, "endpoint": "reserve"}),
    )
    .await;
    for i in 0..3 {
        assert_eq!(
            place(&http, &stack.svc.base(), &token, &format!("busy-{i}")).await,
            202
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (took, ok) = stack.svc.terminate().await;
    assert!(ok, "serve exited with a failure after SIGTERM");
    assert!(took < STOP_BOUND, "a busy serve took {took:?} to stop");
    // The sagas whose catalog call answered committed their step and gave their lease back; only
    // the one whose call never answered keeps its lease, to expire.
    let leased: i64 = sqlx::query_scalar("select count(*) from sagas where lease_owner is not null")
        .fetch_one(&pool)
        .await
        .unwrap();
    let rows: Vec<(String, i32, Option<String>, Option<String>)> =
        sqlx::query_as("select state, step, last_error, lease_owner from sagas order by created_at")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(
        leased <= 1,
        "{leased} sagas kept their lease after a graceful stop ({took:?}): {rows:?}"
    );

    // Nothing lost: after a restart every saga finishes, each with exactly one reservation and
    // one shipment.
    for sim in [&stack.catalog_url, &stack.shipments_url] {
        let _ = http.delete(format!("{sim}/sim/faults")).send().await;
    }
    stack.svc.start_ready(&http).await;
    wait_all_finished(&pool, 4).await;
    let completed: i64 = sqlx::query_scalar("select count(*) from orders where status = 'confirmed'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(completed, 4, "every order placed before the signal is confirmed");
    let reservations: Vec<Value> =
        client::get_json(&http, &format!("{}/sim/reservations", stack.catalog_url)).await;
    let active = reservations.iter().filter(|r| r["status"] == "active").count();
    assert_eq!(active, 4, "one reservation per order: {reservations:?}");
    let shipped: Vec<Value> =
        client::get_json(&http, &format!("{}/sim/shipments", stack.shipments_url)).await;
    let created = shipped.iter().filter(|s| s["status"] == "created").count();
    assert_eq!(created, 4, "one shipment per order: {shipped:?}");
    verify(&pool, &stack.catalog_url, &stack.shipments_url)
        .await
        .assert_hold(&[1, 2, 3, 7]);
    let (took, ok) = stack.svc.terminate().await;
    assert!(ok && took < STOP_BOUND, "serve took {took:?} to stop");
    stack.stop.cancel();
}

#[tokio::test]
async fn dev_stops_within_five_seconds_of_sigterm() {
    let name = format!("dev_stop_{}", uuid::Uuid::new_v4().simple());
    let admin = std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let url = format!("{}/{name}", admin.rsplit_once('/').unwrap().0);
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ostore-orders"))
        .arg("dev")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "warn")
        .env("DATABASE_URL", &url)
        .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("CATALOG_URL", format!("http://127.0.0.1:{}", free_port()))
        .env("SHIPMENTS_URL", format!("http://127.0.0.1:{}", free_port()))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start dev");
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    wait_ready(&http, &base).await;
    // An order through the whole stack (its events go through the relay to the embedded broker).
    let (token, _) = client::login(&http, &base, "alice@ostore.dev", "alice-password").await;
    assert_eq!(place(&http, &base, &token, "dev-1").await, 201);
    let (took, ok) = terminate(&mut child).await;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let confirmed: i64 = sqlx::query_scalar("select count(*) from orders where status = 'confirmed'")
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    let _ = Command::new("psql")
        .args([
            &admin,
            "-qc",
            &format!("drop database if exists {name} with (force)"),
        ])
        .output();
    assert!(ok, "dev exited with a failure after SIGTERM");
    assert!(took < STOP_BOUND, "dev took {took:?} to stop");
    assert_eq!(confirmed, 1);
}

/// The invariants the crash tests rely on can fail: a confirmed order that no saga wrote, with no
/// reservation or shipment behind it, is reported by the checks it breaks, and only by them.
#[tokio::test]
async fn verify_reports_a_confirmed_order_no_saga_wrote() {
    let stack = Stack::new().await;
    let report = verify(&stack.pool, &stack.catalog_url, &stack.shipments_url).await;
    // An empty outbox fails check 4 (a run that published nothing proves nothing); the rest hold.
    report.assert_hold(&[1, 2, 3, 5, 7]);
    assert!(!report.check(4).unwrap().ok);
    sqlx::query(
        "insert into orders (order_id, user_id, status, saga_id)
         select 4242, min(user_id), 'confirmed', gen_random_uuid() from users",
    )
    .execute(&stack.pool)
    .await
    .unwrap();
    let report = verify(&stack.pool, &stack.catalog_url, &stack.shipments_url).await;
    let failed: Vec<u8> = report.failed().iter().map(|c| c.id).collect();
    assert_eq!(failed, [3, 4, 7], "{report:#?}");
    let agree = report.check(7).unwrap();
    assert!(
        agree.figures.contains("orders without a saga: 4242"),
        "{}",
        agree.figures
    );
    assert!(agree.figures.contains("incomplete: 4242"), "{}", agree.figures);
    let reservations = report.check(3).unwrap();
    assert!(
        reservations
            .figures
            .contains("live orders without a live shipment: 4242"),
        "{}",
        reservations.figures
    );
    stack.stop.cancel();
}
