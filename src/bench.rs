//! `ostore-orders bench`: a load generator. It starts a whole stack in this process (a fresh
//! database, both simulators, the service) or targets a running one (`--base-url`), drives N
//! concurrent customers placing orders for a set time with a progress line every second, and
//! reports orders/s, latency percentiles, outcomes, the outbox backlog and the process's RSS, as a
//! table and as JSON. `--pgbench` also runs PostgreSQL's pgbench with the saga's own write set
//! against the same server and prints the ratio.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use serde_json::json;
use tokio::sync::Mutex;

use crate::auth::Role;
use crate::config::ServiceConfig;

/// `bench` options.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Target a running stack instead of starting one (needs --email/--password of a customer).
    #[arg(long)]
    pub base_url: Option<String>,
    /// Customer email when targeting a running stack.
    #[arg(long, default_value = "alice@ostore.dev")]
    pub email: String,
    /// Customer password when targeting a running stack.
    #[arg(long, default_value = "alice-password")]
    pub password: String,
    /// Concurrent customers.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Seconds of load (after the warm-up).
    #[arg(long, default_value_t = 20)]
    pub duration_secs: u64,
    /// Seconds of warm-up not counted.
    #[arg(long, default_value_t = 2)]
    pub warmup_secs: u64,
    /// Stop after this many orders (0 = no limit).
    #[arg(long, default_value_t = 0)]
    pub max_orders: u64,
    /// Print only the JSON report.
    #[arg(long)]
    pub json: bool,
    /// Service settings for the in-process stack (its database is created fresh from DATABASE_URL's
    /// server with a `_bench` suffix).
    #[command(flatten)]
    pub config: ServiceConfig,
}

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u64>,
    created: u64,
    accepted: u64,
    conflict: u64,
    other: u64,
    errors: u64,
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)] as f64 / 1000.0
}

fn rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

struct Stack {
    base: String,
    tokens: Vec<String>,
    pool: Option<sqlx::PgPool>,
    shutdown: tokio_util::sync::CancellationToken,
}

async fn start_stack(args: &BenchArgs) -> anyhow::Result<Stack> {
    let mut cfg = args.config.clone();
    cfg.validate(true)?;
    let url = {
        let (prefix, db) = cfg
            .database_url
            .rsplit_once('/')
            .context("DATABASE_URL has no database name")?;
        // Keep connection parameters (for example `?sslmode=disable`) on the derived database.
        match db.split_once('?') {
            Some((name, query)) => format!("{prefix}/{name}_bench?{query}"),
            None => format!("{prefix}/{db}_bench"),
        }
    };
    {
        let opts: sqlx::postgres::PgConnectOptions = url.parse()?;
        let name = opts.get_database().unwrap_or("ostore_bench").to_string();
        let admin = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect_with(opts.clone().database("postgres"))
            .await
            .context("cannot reach PostgreSQL")?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "drop database if exists \"{name}\" with (force)"
        )))
        .execute(&admin)
        .await?;
        admin.close().await;
    }
    crate::db::create_database_if_missing(&url).await?;
    cfg.database_url = url.clone();
    cfg.order_limit_per_user = 0;
    let pool = crate::db::connect(&url, cfg.database_max_connections).await?;
    crate::db::migrate(&pool).await?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let catalog = crate::sim::catalog::CatalogSim::new();
    for p in 1..=20 {
        catalog.put_product(p, 1_000_000_000, format!("{}.99", p).parse()?, "USD");
    }
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    cfg.catalog_url = format!("http://{}", l.local_addr()?);
    tokio::spawn(crate::sim::serve(l, catalog.router(), shutdown.clone()));
    let shipments =
        crate::sim::shipments::ShipmentsSim::new(crate::sim::shipments::ShipmentsSimConfig::default())?;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    cfg.shipments_url = format!("http://{}", l.local_addr()?);
    tokio::spawn(crate::sim::serve(l, shipments.router(), shutdown.clone()));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", l.local_addr()?);
    cfg.listen_addr = l.local_addr()?;
    drop(l);
    let cfg = Arc::new(cfg);
    let (p, s) = (pool.clone(), shutdown.clone());
    let c = cfg.clone();
    tokio::spawn(async move {
        if let Err(e) = crate::app::run(c, &[crate::app::Role::Api, crate::app::Role::Worker], p, s).await {
            eprintln!("bench: the service stopped: {e:#}");
        }
    });
    // Customers: one hash for all (hashing is not what is measured).
    let hash = crate::auth::password::hash_blocking("bench-password")?;
    let http = reqwest::Client::new();
    for _ in 0..100 {
        if http
            .get(format!("{base}/readyz"))
            .send()
            .await
            .map(|r| r.status() == 200)
            .unwrap_or(false)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut tokens = Vec::new();
    for i in 0..args.concurrency {
        let email = format!("bench{i}@ostore.dev");
        let mut conn = pool.acquire().await?;
        crate::auth::users::create(&mut conn, &email, &hash, Role::User).await?;
        tokens.push(login(&http, &base, &email, "bench-password").await?);
    }
    Ok(Stack {
        base,
        tokens,
        pool: Some(pool),
        shutdown,
    })
}

async fn login(http: &reqwest::Client, base: &str, email: &str, password: &str) -> anyhow::Result<String> {
    let r: serde_json::Value = http
        .post(format!("{base}/auth/login"))
        .json(&json!({"email": email, "password": password}))
        .send()
        .await?
        .error_for_status()
        .context("login failed")?
        .json()
        .await?;
    Ok(r["token"].as_str().context("no token")?.to_string())
}

/// Runs the benchmark.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let stack = match &args.base_url {
        Some(base) => {
            let http = reqwest::Client::new();
            let t = login(&http, base, &args.email, &args.password).await?;
            Stack {
                base: base.clone(),
                tokens: vec![t; args.concurrency],
                pool: None,
                shutdown: tokio_util::sync::CancellationToken::new(),
            }
        }
        None => start_stack(&args).await?,
    };
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency * 2)
        .timeout(Duration::from_secs(30))
        .build()?;
    let tally = Arc::new(Mutex::new(Tally::default()));
    let counting = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let counted = Arc::new(AtomicU64::new(0));
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let mut tasks = Vec::new();
    for (w, token) in stack.tokens.iter().cloned().enumerate() {
        let (http, base, tally, counting, stop, sent, counted, run_id) = (
            http.clone(),
            stack.base.clone(),
            tally.clone(),
            counting.clone(),
            stop.clone(),
            sent.clone(),
            counted.clone(),
            run_id.clone(),
        );
        let max = args.max_orders;
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if max > 0 && sent.fetch_add(1, Ordering::Relaxed) >= max {
                    break;
                }
                i += 1;
                let product = 1 + ((w as u64 + i) % 20);
                let body = json!({"orderItems": [{"productID": product, "quantity": 1 + (i % 3)}]});
                let t0 = Instant::now();
                let r = http
                    .post(format!("{base}/orders"))
                    .bearer_auth(&token)
                    .header("Idempotency-Key", format!("bench-{run_id}-{w}-{i}"))
                    .json(&body)
                    .send()
                    .await;
                let us = t0.elapsed().as_micros() as u64;
                if !counting.load(Ordering::Relaxed) {
                    continue;
                }
                let mut t = tally.lock().await;
                match r.map(|r| r.status().as_u16()) {
                    Ok(201) => {
                        t.created += 1;
                        t.latencies_us.push(us);
                        counted.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(202) => t.accepted += 1,
                    Ok(409) => t.conflict += 1,
                    Ok(_) => t.other += 1,
                    Err(_) => t.errors += 1,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(args.warmup_secs)).await;
    counting.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let mut last = 0u64;
    let mut rss_peak: f64 = 0.0;
    while started.elapsed() < Duration::from_secs(args.duration_secs)
        && !tasks.iter().all(|t| t.is_finished())
    {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = counted.load(Ordering::Relaxed);
        rss_peak = rss_peak.max(rss_mb().unwrap_or(0.0));
        if !args.json {
            eprintln!(
                "  {:>4.0}s  {:>6} orders/s  {:>8} completed  rss {:.0} MB",
                started.elapsed().as_secs_f64(),
                now - last,
                now,
                rss_mb().unwrap_or(0.0)
            );
        }
        last = now;
    }
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    for t in tasks {
        let _ = t.await;
    }
    let mut t = tally.lock().await;
    t.latencies_us.sort_unstable();
    let backlog = match &stack.pool {
        Some(p) => sqlx::query_scalar::<_, i64>("select count(*) from outbox where published_at is null")
            .fetch_one(p)
            .await
            .ok(),
        None => None,
    };
    let report = json!({
        "concurrency": args.concurrency,
        "seconds": elapsed,
        "ordersPerSecond": t.created as f64 / elapsed,
        "latencyMs": {"p50": percentile(&t.latencies_us, 0.50), "p95": percentile(&t.latencies_us, 0.95),
                       "p99": percentile(&t.latencies_us, 0.99), "max": percentile(&t.latencies_us, 1.0)},
        "outcomes": {"created": t.created, "accepted202": t.accepted, "conflict409": t.conflict, "other": t.other, "errors": t.errors},
        "outboxBacklog": backlog,
        "rssMbPeak": if args.base_url.is_none() { Some(rss_peak) } else { None },
    });
    if !args.json {
        println!(
            "\n== ostore-orders bench ({} customers, {:.1} s)",
            args.concurrency, elapsed
        );
        println!("  orders/s          {:.1}", t.created as f64 / elapsed);
        println!(
            "  latency ms        p50 {:.1}  p95 {:.1}  p99 {:.1}  max {:.1}",
            percentile(&t.latencies_us, 0.5),
            percentile(&t.latencies_us, 0.95),
            percentile(&t.latencies_us, 0.99),
            percentile(&t.latencies_us, 1.0)
        );
        println!(
            "  outcomes          201 {}  202 {}  409 {}  other {}  errors {}",
            t.created, t.accepted, t.conflict, t.other, t.errors
        );
        if let Some(b) = backlog {
            println!("  outbox backlog    {b}");
        }
        if args.base_url.is_none() {
            println!("  RSS peak          {rss_peak:.0} MB (load generator and service in one process)");
        }
    }
    println!("{report}");
    stack.shutdown.cancel();
    Ok(())
}
