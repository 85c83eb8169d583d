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

/// Demo products: (productID, stock, unit price). Product 5 is out of stock, to try a 409.
pub const DEMO_PRODUCTS: [(i32, i64, &str); 5] = [
    (1, 100, "19.99"),
    (2, 250, "5.00"),
    (3, 10, "129.00"),
    (4, 1000, "2.49"),
    (5, 0, "49.95"),
];

/// Puts the demo products into a catalog simulator (all out of stock when `out_of_stock`).
pub fn seed_products(sim: &crate::sim::catalog::CatalogSim, out_of_stock: bool) {
    for (id, stock, price) in DEMO_PRODUCTS {
        let stock = if out_of_stock { 0 } else { stock };
        sim.put_product(id, stock, price.parse().expect("demo price"), "USD");
    }
}

/// Creates the demo users that do not exist yet.
pub async fn seed_users(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    for (email, pw, role) in DEMO_USERS {
        let mut conn = pool.acquire().await?;
        if users::id_by_email(&mut conn, email).await?.is_none() {
            drop(conn);
            match users::create_with_password(pool, email, pw, role).await {
                // Another process created it meanwhile.
                Ok(_) | Err(users::CreateUserError::EmailTaken) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// Binds a simulator where its URL says (a loopback port), or on a free port when that is taken;
/// returns the listener and the URL to use.
async fn bind_sim(url: &str) -> anyhow::Result<(tokio::net::TcpListener, String)> {
    let port = url
        .strip_prefix("http://127.0.0.1:")
        .or_else(|| url.strip_prefix("http://localhost:"))
        .and_then(|p| p.trim_end_matches('/').parse::<u16>().ok());
    let listener = match port {
        Some(p) => match tokio::net::TcpListener::bind(("127.0.0.1", p)).await {
            Ok(l) => l,
            Err(_) => tokio::net::TcpListener::bind("127.0.0.1:0").await?,
        },
        None => tokio::net::TcpListener::bind("127.0.0.1:0").await?,
    };
    let url = format!("http://{}", listener.local_addr()?);
    Ok((listener, url))
}

/// Runs the development stack.
pub async fn run(mut cfg: ServiceConfig) -> anyhow::Result<()> {
    cfg.validate(true)?;
    crate::kafka::install_client_properties_from_env()?;
    let _telemetry = crate::telemetry::init("ostore-orders", cfg.log_format);
    crate::db::create_database_if_missing(&cfg.database.database_url).await?;
    let pool = crate::db::connect(&cfg.database.database_url, cfg.database_max_connections).await?;
    crate::db::migrate(&pool).await?;
    seed_users(&pool).await?;

    let shutdown = tokio_util::sync::CancellationToken::new();
    crate::app::cancel_on_signals(shutdown.clone());
    // No Kafka given: an embedded Kafka-protocol broker (librdkafka's mock cluster) for this process.
    let _broker = match &cfg.kafka_bootstrap_servers {
        Some(_) => None,
        None => {
            let broker = crate::kafka::EmbeddedBroker::start(&cfg.topics.all())?;
            cfg.kafka_bootstrap_servers = Some(broker.bootstrap_servers().to_string());
            Some(broker)
        }
    };
    let catalog = crate::sim::catalog::CatalogSim::new();
    seed_products(&catalog, false);
    let (listener, url) = bind_sim(&cfg.catalog_url).await?;
    cfg.catalog_url = url;
    tokio::spawn(crate::sim::serve(listener, catalog.router(), shutdown.clone()));
    let shipments = crate::sim::shipments::ShipmentsSim::new(crate::sim::shipments::ShipmentsSimConfig {
        kafka_bootstrap_servers: cfg.kafka_bootstrap_servers.clone(),
        tracking_topic: cfg.topics.tracking_events.clone(),
        auto_advance_ms: Some(5000),
    })?;
    let (listener, url) = bind_sim(&cfg.shipments_url).await?;
    cfg.shipments_url = url;
    tokio::spawn(crate::sim::serve(listener, shipments.router(), shutdown.clone()));

    cfg.print("ostore-orders dev: effective configuration", &[]);
    let base = format!("http://{}", cfg.listen_addr);
    if cfg.log_format == crate::telemetry::LogFormat::Pretty {
        // The copy-paste banner is for a terminal; with JSON logs stdout stays JSON.
        print_quick_start(&base, &cfg);
    }
    crate::app::run(Arc::new(cfg), &crate::app::ALL_ROLES, pool, shutdown).await
}

fn print_quick_start(base: &str, cfg: &ServiceConfig) {
    let (email, pw, _) = DEMO_USERS[0];
    let (admin, admin_pw, _) = DEMO_USERS[2];
    let catalog = &cfg.catalog_url;
    let shipments = &cfg.shipments_url;
    let kafka = cfg.kafka_bootstrap_servers.clone().unwrap_or_default();
    println!(
        r#"
== OStore orders: development stack ==
API            {base}      (OpenAPI: {base}/openapi.json)
Simulators     catalog {catalog}/sim/products/1    shipments {shipments}/sim/shipments (auto-advance every 5 s)
Kafka          {kafka}   (embedded unless KAFKA_BOOTSTRAP_SERVERS was given; attach kcat/any client)
Demo users     {email} / {pw}    bob@ostore.dev / bob-password    {admin} / {admin_pw} (admin)
Demo products  1 ($19.99)  2 ($5.00)  3 ($129.00)  4 ($2.49)  5 (out of stock)

Quick start (copy-paste):
  B={base}
  TOKEN=$(curl -s -X POST $B/auth/login -H 'content-type: application/json' \
      -d '{{"email":"{email}","password":"{pw}"}}' | sed -E 's/.*"token":"([^"]+)".*/\1/')
  curl -s $B/me -H "authorization: Bearer $TOKEN"
  curl -s -X POST $B/orders -H "authorization: Bearer $TOKEN" -H 'content-type: application/json' \
      -H "Idempotency-Key: $(date +%s%N)" -d '{{"orderItems":[{{"productID":1,"quantity":2}},{{"productID":2,"quantity":1}}]}}'
  curl -s $B/orders -H "authorization: Bearer $TOKEN"
  curl -s -X POST $B/orders/1/cancel -H "authorization: Bearer $TOKEN"
Watch the events (orders.events, orders.saga-events, users.notifications) with kcat:
  kcat -b {kafka} -C -t users.notifications -o beginning -f '%k %h %s\n'
"#
    );
}
