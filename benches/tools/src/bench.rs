//! `ostore-tools bench`: the load benchmark. It starts a whole stack (a fresh database, both
//! simulators, a Kafka-protocol broker — the in-process mock unless KAFKA_BOOTSTRAP_SERVERS names
//! one — and the service as a child process with all its roles) or targets a running one
//! (`--base-url`). It then
//! 1. drives N concurrent customers placing orders as fast as they can (the peak phase), with a
//!    progress line every second (orders/s, outbox backlog and age, tracking events applied, RSS);
//! 2. drives them again at half the peak rate (the half-rate phase: latency and RSS there);
//! 3. stops the service and runs PostgreSQL's pgbench with the saga's own write set (the statements
//!    the service issues per order, see `pgbench.rs`) against the same database, same concurrency;
//!
//! and reports everything, with the ratios, as a table and as one JSON line.

mod pgbench;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use serde_json::{Value, json};
use tokio::sync::Mutex;

use ostore_orders::auth::Role;
use ostore_orders::config::ServiceConfig;

/// The service binary the bench starts (beside this one, or in PATH).
const SERVICE_PROGRAM: &str = "ostore-orders";

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
    /// Concurrent customers (and pgbench clients).
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Seconds of each phase (peak, half rate, pgbench), after the warm-up.
    #[arg(long, default_value_t = 20)]
    pub duration_secs: u64,
    /// Seconds of warm-up not counted.
    #[arg(long, default_value_t = 2)]
    pub warmup_secs: u64,
    /// Stop the peak phase after this many orders (0 = no limit).
    #[arg(long, default_value_t = 0)]
    pub max_orders: u64,
    /// Skip the half-rate phase.
    #[arg(long)]
    pub no_half: bool,
    /// Drive the half-rate phase at this many orders/s instead of half the peak's rate (to compare
    /// latency at one rate across builds or settings).
    #[arg(long)]
    pub half_rate: Option<f64>,
    /// Skip pgbench.
    #[arg(long)]
    pub no_pgbench: bool,
    /// The pgbench program.
    #[arg(long, default_value = "pgbench")]
    pub pgbench: String,
    /// The shipments simulator walks each new shipment forward every N ms (TrackingEvents for the
    /// consumer); 0 = never.
    #[arg(long, default_value_t = 1000)]
    pub auto_advance_ms: u64,
    /// What is measured: `full`, the whole pipeline (saga, outbox to Kafka, and the shipper's four
    /// TrackingEvents per order applied by the consumer), or `saga`, the saga and its outbox only
    /// (the shipper publishes no TrackingEvents: the work a saga-only peer does, plus the outbox).
    #[arg(long, value_enum, default_value_t = Mode::Full)]
    pub mode: Mode,
    /// Print only the JSON report.
    #[arg(long)]
    pub json: bool,
    /// Service settings for the stack (its database is created fresh on DATABASE_URL's server
    /// with a `_bench` suffix; keep `?sslmode=disable` on loopback).
    #[command(flatten)]
    pub config: ServiceConfig,
}

/// What `bench` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Saga, outbox, Kafka, and the tracking consumer applying the shipper's events.
    Full,
    /// Saga and outbox only: no tracking events.
    Saga,
}

impl BenchArgs {
    /// The shipper's auto-advance, as the mode allows.
    fn advance_ms(&self) -> Option<u64> {
        (self.mode == Mode::Full && self.auto_advance_ms > 0).then_some(self.auto_advance_ms)
    }
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

/// Resident set size of a process, in MB.
fn rss_mb(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".to_string(),
    };
    let s = std::fs::read_to_string(path).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// CPU seconds every core of the machine has been busy so far (all of `/proc/stat`'s `cpu` line
/// but idle and iowait): what every process, the kernel included, cost.
fn machine_busy_seconds() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let line = s.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: f64 = f.iter().take(8).sum();
    let idle = f.get(3)? + f.get(4)?;
    Some((total - idle) / 100.0)
}

/// CPU time (user + system) a process has used so far, in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at state (field 3).
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// CPU seconds used so far by the PostgreSQL backends serving the current database, by pid
/// (the server must run on this machine; its processes are readable as root or as their owner).
pub(crate) async fn backend_cpu(
    pool: &sqlx::PgPool,
    application: Option<&str>,
) -> Option<std::collections::HashMap<i32, f64>> {
    let pids: Vec<i32> = sqlx::query_scalar(
        "select pid from pg_stat_activity where datname = current_database() and pid <> pg_backend_pid()
            and ($1::text is null or application_name = $1)",
    )
    .bind(application)
    .fetch_all(pool)
    .await
    .ok()?;
    let map: std::collections::HashMap<i32, f64> = pids
        .into_iter()
        .filter_map(|p| cpu_seconds(p as u32).map(|c| (p, c)))
        .collect();
    (!map.is_empty()).then_some(map)
}

/// CPU seconds between two readings of `backend_cpu` (backends that appeared count whole).
pub(crate) fn cpu_delta(
    before: &std::collections::HashMap<i32, f64>,
    after: &std::collections::HashMap<i32, f64>,
) -> f64 {
    after
        .iter()
        .map(|(pid, c)| (c - before.get(pid).copied().unwrap_or(0.0)).max(0.0))
        .sum()
}

/// The database of the bench: DATABASE_URL's server, its name with `_bench`, its parameters kept.
fn bench_database_url(url: &str) -> anyhow::Result<String> {
    let (_, name, _) = crate::bench_kafka::split_database_url(url)?;
    crate::bench_kafka::database_url_for(url, &format!("{name}_bench"))
}

struct Stack {
    base: String,
    tokens: Vec<String>,
    pool: Option<sqlx::PgPool>,
    db_url: Option<String>,
    service: Option<tokio::process::Child>,
    service_log: Option<std::path::PathBuf>,
    _broker: Option<ostore_orders::kafka::EmbeddedBroker>,
    shutdown: tokio_util::sync::CancellationToken,
}

impl Stack {
    fn service_pid(&self) -> Option<u32> {
        self.service.as_ref().and_then(|c| c.id())
    }

    /// Stops the service child (SIGTERM, then SIGKILL after 20 s).
    async fn stop_service(&mut self) {
        if let Some(mut child) = self.service.take() {
            if let Some(pid) = child.id() {
                let _ = tokio::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status()
                    .await;
            }
            if tokio::time::timeout(Duration::from_secs(20), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
    }
}

async fn start_stack(args: &BenchArgs) -> anyhow::Result<Stack> {
    let cfg = args.config.clone();
    cfg.validate(true)?;
    let url = bench_database_url(&cfg.database.database_url)?;
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
    ostore_orders::db::create_database_if_missing(&url).await?;
    let pool = ostore_orders::db::connect(&url, 4).await?;
    ostore_orders::db::migrate(&pool).await?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let t = &cfg.topics;
    let broker = match &cfg.kafka_bootstrap_servers {
        Some(_) => None,
        None => Some(ostore_orders::kafka::EmbeddedBroker::start(&t.all())?),
    };
    let kafka = match &broker {
        Some(b) => b.bootstrap_servers().to_string(),
        None => cfg.kafka_bootstrap_servers.clone().unwrap_or_default(),
    };
    let catalog = ostore_orders::sim::catalog::CatalogSim::new();
    for p in 1..=20 {
        catalog.put_product(p, 1_000_000_000, format!("{}.99", p).parse()?, "USD");
    }
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let catalog_url = format!("http://{}", l.local_addr()?);
    tokio::spawn(ostore_orders::sim::serve(l, catalog.router(), shutdown.clone()));
    let shipments = ostore_orders::sim::shipments::ShipmentsSim::new(
        ostore_orders::sim::shipments::ShipmentsSimConfig {
            // Saga-only: the shipper publishes nothing (not even `created`), so no tracking events.
            kafka_bootstrap_servers: (args.mode == Mode::Full).then(|| kafka.clone()),
            tracking_topic: cfg.topics.tracking_events.clone(),
            auto_advance_ms: args.advance_ms(),
        },
    )?;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let shipments_url = format!("http://{}", l.local_addr()?);
    tokio::spawn(ostore_orders::sim::serve(l, shipments.router(), shutdown.clone()));
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let listen = l.local_addr()?;
    drop(l);
    let base = format!("http://{listen}");

    // The service: this binary's `serve` with every role, in its own process (its RSS is its own).
    let log_path = std::env::temp_dir().join(format!("ostore-bench-service-{}.log", std::process::id()));
    let log = std::fs::File::create(&log_path)?;
    let secret: String =
        uuid::Uuid::new_v4().simple().to_string() + &uuid::Uuid::new_v4().simple().to_string();
    let mut cmd = tokio::process::Command::new(ostore_orders::cli::sibling_program(SERVICE_PROGRAM));
    cmd.arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .env("DATABASE_URL", &url)
        .env(
            "DATABASE_MAX_CONNECTIONS",
            cfg.database_max_connections.to_string(),
        )
        .env("LISTEN_ADDR", listen.to_string())
        .env("JWT_SECRET", secret)
        .env("CATALOG_URL", &catalog_url)
        .env("SHIPMENTS_URL", &shipments_url)
        .env("KAFKA_BOOTSTRAP_SERVERS", &kafka)
        .env("ORDER_LIMIT_PER_USER", "0")
        // Every customer logs in once from this address before the load: at more than 60 clients
        // the default per-address limit refused the 61st.
        .env("LOGIN_LIMIT_PER_ADDRESS", (args.concurrency + 60).to_string())
        .env("ORDER_WAIT_MS", cfg.order_wait_ms.to_string())
        .env("SAGA_COMMITTERS", cfg.saga_committers.to_string())
        .env("SAGA_MAX_IN_FLIGHT", cfg.saga_max_in_flight.to_string())
        .env("SAGA_LEASE_MS", cfg.saga_lease_ms.to_string())
        .env("LOG_FORMAT", "json")
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true);
    let mut child = cmd.spawn().with_context(|| {
        format!(
            "cannot start the service: {SERVICE_PROGRAM} beside this program or in PATH (build the workspace: `cargo build --workspace`)"
        )
    })?;
    let http = reqwest::Client::new();
    let mut ready = false;
    for _ in 0..300 {
        if let Some(status) = child.try_wait()? {
            anyhow::bail!(
                "the service exited ({status}) before it was ready; its log: {}",
                log_path.display()
            );
        }
        if http
            .get(format!("{base}/readyz"))
            .send()
            .await
            .map(|r| r.status() == 200)
            .unwrap_or(false)
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !ready {
        anyhow::bail!(
            "the service was not ready within 30 s; its log: {}",
            log_path.display()
        );
    }
    let rss_ready = rss_mb(child.id());
    // Customers: one hash for all (hashing is not what is measured).
    let hash = ostore_orders::auth::password::hash_blocking("bench-password")?;
    let mut tokens = Vec::new();
    for i in 0..args.concurrency {
        let email = format!("bench{i}@ostore.dev");
        let mut conn = pool.acquire().await?;
        ostore_orders::auth::users::create(&mut conn, &email, &hash, Role::User).await?;
        tokens.push(login(&http, &base, &email, "bench-password").await?);
    }
    if !args.json {
        eprintln!(
            "  service ready: RSS {} MB; after {} logins (argon2id, 19 MiB each): {} MB",
            rss_ready.map(|r| format!("{r:.0}")).unwrap_or("-".into()),
            args.concurrency,
            rss_mb(child.id())
                .map(|r| format!("{r:.0}"))
                .unwrap_or("-".into())
        );
    }
    Ok(Stack {
        base,
        tokens,
        pool: Some(pool),
        db_url: Some(url),
        service: Some(child),
        service_log: Some(log_path),
        _broker: broker,
        shutdown,
    })
}

async fn login(http: &reqwest::Client, base: &str, email: &str, password: &str) -> anyhow::Result<String> {
    let r: Value = http
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

/// One phase of load: as fast as possible (`rate` None) or paced at `rate` orders/s.
struct Phase {
    label: &'static str,
    rate: Option<f64>,
    warmup: Duration,
    duration: Duration,
    max_orders: u64,
}

/// What a phase measured.
struct PhaseReport {
    seconds: f64,
    tally: Tally,
    rss_peak: Option<f64>,
    timeline: Vec<Value>,
    tracking_applied: u64,
    /// CPU seconds the service used during the phase.
    service_cpu: Option<f64>,
    /// CPU seconds PostgreSQL's backends used for the bench database during the phase.
    db_cpu: Option<f64>,
    /// CPU seconds of this process during the phase: the load generator, and, when it started the
    /// stack, the simulators and the in-process broker.
    bench_cpu: Option<f64>,
    /// CPU seconds every core of the machine was busy during the phase (all processes, kernel).
    machine_busy: Option<f64>,
}

impl PhaseReport {
    fn orders_per_second(&self) -> f64 {
        self.tally.created as f64 / self.seconds
    }

    fn cpu_ms_per_order(&self) -> Option<f64> {
        self.service_cpu
            .filter(|_| self.tally.created > 0)
            .map(|c| c * 1000.0 / self.tally.created as f64)
    }

    fn db_cpu_ms_per_order(&self) -> Option<f64> {
        self.db_cpu
            .filter(|_| self.tally.created > 0)
            .map(|c| c * 1000.0 / self.tally.created as f64)
    }

    fn busy_ms_per_order(&self) -> Option<f64> {
        self.machine_busy
            .filter(|_| self.tally.created > 0)
            .map(|c| c * 1000.0 / self.tally.created as f64)
    }

    fn bench_cpu_ms_per_order(&self) -> Option<f64> {
        self.bench_cpu
            .filter(|_| self.tally.created > 0)
            .map(|c| c * 1000.0 / self.tally.created as f64)
    }

    /// Orders/s over the first and the last 20 s (or fifth) of the phase, and last : first: a
    /// phase whose rate falls as tables grow shows it here.
    fn steady(&self) -> Option<(f64, f64, f64)> {
        let per_second: Vec<f64> = self
            .timeline
            .iter()
            .filter_map(|t| t["orders"].as_u64().map(|o| o as f64))
            .collect();
        let n = per_second.len();
        if n < 5 {
            return None;
        }
        let window = 20.min(n / 5).max(1);
        let first = per_second[..window].iter().sum::<f64>() / window as f64;
        let last = per_second[n - window..].iter().sum::<f64>() / window as f64;
        (first > 0.0).then_some((first, last, last / first))
    }

    fn latency(&self) -> Value {
        let l = &self.tally.latencies_us;
        json!({"p50": percentile(l, 0.50), "p95": percentile(l, 0.95), "p99": percentile(l, 0.99), "max": percentile(l, 1.0)})
    }

    fn json(&self, target: Option<f64>) -> Value {
        let t = &self.tally;
        json!({
            "targetPerSecond": target,
            "seconds": self.seconds,
            "ordersPerSecond": self.orders_per_second(),
            "latencyMs": self.latency(),
            "outcomes": {"created": t.created, "accepted202": t.accepted, "conflict409": t.conflict, "other": t.other, "errors": t.errors},
            "rssMbPeak": self.rss_peak,
            "trackingEventsApplied": self.tracking_applied,
            "trackingEventsPerSecond": self.tracking_applied as f64 / self.seconds,
            "serviceCpuMsPerOrder": self.cpu_ms_per_order(),
            "postgresCpuMsPerOrder": self.db_cpu_ms_per_order(),
            "benchCpuMsPerOrder": self.bench_cpu_ms_per_order(),
            "machineBusyMsPerOrder": self.busy_ms_per_order(),
            "steady": self.steady().map(|(first, last, ratio)| json!({"firstOrdersPerSecond": first, "lastOrdersPerSecond": last, "lastVsFirst": ratio})),
            "timeline": self.timeline,
        })
    }
}

/// Outbox backlog and the age of its oldest row, tracking events applied so far.
async fn sample_db(pool: &sqlx::PgPool) -> Option<(i64, f64, i64)> {
    let (backlog, age): (i64, f64) = sqlx::query_as(
        "select count(*), coalesce(extract(epoch from now() - min(created_at))::float8, 0)
           from outbox where id > outbox_published_through()",
    )
    .fetch_one(pool)
    .await
    .ok()?;
    // The statistics' insert count, not count(*): counting a growing inbox every second cost
    // PostgreSQL ≈ 20 ms a sample after 100 s, charged to the service's figures (the counts reach
    // the statistics within a second of each commit; the inbox is never deleted from here).
    let applied: i64 = sqlx::query_scalar("select pg_stat_get_tuples_inserted('tracking_inbox'::regclass)")
        .fetch_one(pool)
        .await
        .ok()?;
    Some((backlog, age, applied))
}

async fn run_phase(stack: &Stack, phase: &Phase, quiet: bool) -> PhaseReport {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(stack.tokens.len() * 2)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client");
    let tally = Arc::new(Mutex::new(Tally::default()));
    let counting = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let counted = Arc::new(AtomicU64::new(0));
    // Pacing: order k is due at start + k / rate; latency counts from when it was due.
    let slot = Arc::new(AtomicU64::new(0));
    let t0 = tokio::time::Instant::now();
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let mut tasks = Vec::new();
    for (w, token) in stack.tokens.iter().cloned().enumerate() {
        let (http, base, tally, counting, stop, sent, counted, slot, run_id) = (
            http.clone(),
            stack.base.clone(),
            tally.clone(),
            counting.clone(),
            stop.clone(),
            sent.clone(),
            counted.clone(),
            slot.clone(),
            run_id.clone(),
        );
        let (max, rate) = (phase.max_orders, phase.rate);
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if max > 0 && sent.fetch_add(1, Ordering::Relaxed) >= max {
                    break;
                }
                let due = match rate {
                    Some(r) => {
                        let k = slot.fetch_add(1, Ordering::Relaxed);
                        let at = t0 + Duration::from_secs_f64(k as f64 / r);
                        tokio::time::sleep_until(at).await;
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        at.into_std()
                    }
                    None => Instant::now(),
                };
                i += 1;
                let product = 1 + ((w as u64 + i) % 20);
                let body = json!({"orderItems": [{"productID": product, "quantity": 1 + (i % 3)}]});
                let r = http
                    .post(format!("{base}/orders"))
                    .bearer_auth(&token)
                    .header("Idempotency-Key", format!("bench-{run_id}-{w}-{i}"))
                    .json(&body)
                    .send()
                    .await;
                let us = due.elapsed().as_micros() as u64;
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
    tokio::time::sleep(phase.warmup).await;
    counting.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let cpu0 = stack.service_pid().and_then(cpu_seconds);
    let self0 = cpu_seconds(std::process::id());
    let busy0 = machine_busy_seconds();
    let db0 = match &stack.pool {
        Some(p) => backend_cpu(p, None).await,
        None => None,
    };
    let first = match &stack.pool {
        Some(p) => sample_db(p).await,
        None => None,
    };
    let mut last_applied = first.map(|f| f.2).unwrap_or(0);
    let mut last = 0u64;
    let mut rss_peak: Option<f64> = None;
    let mut timeline = Vec::new();
    while started.elapsed() < phase.duration && !tasks.iter().all(|t| t.is_finished()) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = counted.load(Ordering::Relaxed);
        let rss = rss_mb(stack.service_pid());
        if let Some(r) = rss {
            rss_peak = Some(rss_peak.unwrap_or(0.0).max(r));
        }
        let db = match &stack.pool {
            Some(p) => sample_db(p).await,
            None => None,
        };
        let applied = db.map(|d| d.2 - last_applied);
        if let Some(d) = db {
            last_applied = d.2;
        }
        let secs = started.elapsed().as_secs_f64();
        timeline.push(json!({
            "t": (secs * 10.0).round() / 10.0,
            "orders": now - last,
            "outboxBacklog": db.map(|d| d.0),
            "outboxOldestAgeMs": db.map(|d| (d.1 * 1000.0).round()),
            "trackingApplied": applied,
            "rssMb": rss.map(|r| r.round()),
        }));
        if !quiet {
            eprintln!(
                "  [{}] {:>4.0}s {:>6} orders/s {:>8} completed | outbox backlog {:>5} oldest {:>5} ms | tracking applied {:>5}/s | rss {} MB",
                phase.label,
                secs,
                now - last,
                now,
                db.map(|d| d.0.to_string()).unwrap_or("-".into()),
                db.map(|d| format!("{:.0}", d.1 * 1000.0)).unwrap_or("-".into()),
                applied.map(|a| a.to_string()).unwrap_or("-".into()),
                rss.map(|r| format!("{r:.0}")).unwrap_or("-".into()),
            );
        }
        last = now;
    }
    stop.store(true, Ordering::Relaxed);
    let seconds = started.elapsed().as_secs_f64();
    let service_cpu = match (cpu0, stack.service_pid().and_then(cpu_seconds)) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let machine_busy = match (busy0, machine_busy_seconds()) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let bench_cpu = match (self0, cpu_seconds(std::process::id())) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let db_cpu = match (&stack.pool, &db0) {
        (Some(p), Some(before)) => backend_cpu(p, None).await.map(|after| cpu_delta(before, &after)),
        _ => None,
    };
    for t in tasks {
        let _ = t.await;
    }
    let tracking_applied = match (&stack.pool, first) {
        (Some(p), Some(f)) => sample_db(p).await.map(|d| (d.2 - f.2).max(0) as u64).unwrap_or(0),
        _ => 0,
    };
    let mut tally = std::mem::take(&mut *tally.lock().await);
    tally.latencies_us.sort_unstable();
    PhaseReport {
        seconds,
        tally,
        rss_peak,
        timeline,
        tracking_applied,
        service_cpu,
        db_cpu,
        bench_cpu,
        machine_busy,
    }
}

/// Runs the benchmark.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let mut stack = match &args.base_url {
        Some(base) => {
            let http = reqwest::Client::new();
            let t = login(&http, base, &args.email, &args.password).await?;
            Stack {
                base: base.clone(),
                tokens: vec![t; args.concurrency],
                pool: None,
                db_url: None,
                service: None,
                service_log: None,
                _broker: None,
                shutdown: tokio_util::sync::CancellationToken::new(),
            }
        }
        None => start_stack(&args).await?,
    };
    let result = measure(&args, &mut stack).await;
    stack.stop_service().await;
    stack.shutdown.cancel();
    if let (Err(_), Some(log)) = (&result, &stack.service_log) {
        eprintln!("bench: the service's log is {}", log.display());
    } else if let Some(log) = &stack.service_log {
        let _ = std::fs::remove_file(log);
    }
    // The simulators (and their producer) stop before the embedded broker goes: the JSON line is
    // the last thing printed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(stack);
    let report = result?;
    println!("{report}");
    Ok(())
}

async fn measure(args: &BenchArgs, stack: &mut Stack) -> anyhow::Result<Value> {
    let quiet = args.json;
    let peak = run_phase(
        stack,
        &Phase {
            label: "peak",
            rate: None,
            warmup: Duration::from_secs(args.warmup_secs),
            duration: Duration::from_secs(args.duration_secs),
            max_orders: args.max_orders,
        },
        quiet,
    )
    .await;
    let peak_rate = peak.orders_per_second();
    let half = if args.no_half || (peak_rate < 2.0 && args.half_rate.is_none()) {
        None
    } else {
        let rate = args.half_rate.filter(|r| *r > 0.0).unwrap_or(peak_rate / 2.0);
        Some((
            rate,
            run_phase(
                stack,
                &Phase {
                    label: "half",
                    rate: Some(rate),
                    warmup: Duration::from_secs(args.warmup_secs.min(1)),
                    duration: Duration::from_secs(args.duration_secs),
                    max_orders: 0,
                },
                quiet,
            )
            .await,
        ))
    };
    let backlog = match &stack.pool {
        Some(p) => sample_db(p).await.map(|d| d.0),
        None => None,
    };
    // pgbench runs alone: the service stops first (the same database, the same server).
    stack.stop_service().await;
    let pg = match (&stack.pool, &stack.db_url, args.no_pgbench) {
        (Some(pool), Some(url), false) => {
            if !quiet {
                eprintln!(
                    "  [pgbench] the saga's write set, {} clients, {} s",
                    args.concurrency, args.duration_secs
                );
            }
            Some(
                pgbench::run(
                    pool,
                    url,
                    &args.pgbench,
                    args.concurrency,
                    Duration::from_secs(args.duration_secs),
                )
                .await?,
            )
        }
        _ => None,
    };
    let ratio_rate = pg.as_ref().map(|p| peak_rate / p.tps);
    let ratio_p99 = match (&half, &pg) {
        (Some((_, h)), Some(p)) => Some(percentile(&h.tally.latencies_us, 0.99) / p.latency_avg_ms),
        _ => None,
    };
    let report = json!({
        "mode": match args.mode { Mode::Full => "full", Mode::Saga => "saga" },
        "concurrency": args.concurrency,
        "seconds": peak.seconds,
        "ordersPerSecond": peak_rate,
        "latencyMs": peak.latency(),
        "outcomes": peak.json(None)["outcomes"],
        "outboxBacklog": backlog,
        "rssMbPeak": peak.rss_peak,
        "trackingEventsPerSecond": peak.tracking_applied as f64 / peak.seconds,
        "peak": peak.json(None),
        "half": half.as_ref().map(|(rate, h)| h.json(Some(*rate))),
        "pgbench": pg.as_ref().map(|p| json!({"tps": p.tps, "latencyAvgMs": p.latency_avg_ms, "clients": args.concurrency,
                                               "seconds": args.duration_secs, "transactions": p.transactions, "script": p.script,
                                               "postgresCpuMsPerOrder": p.db_cpu_ms_per_order})),
        "ratios": {
            "ordersVsPgbench": ratio_rate,
            "halfRateP99VsPgbenchLatency": ratio_p99,
            "trackingVsOrders": (peak_rate > 0.0).then(|| peak.tracking_applied as f64 / peak.seconds / peak_rate),
        },
    });
    if !quiet {
        print_table(args, &peak, half.as_ref(), pg.as_ref(), backlog);
    }
    Ok(report)
}

fn print_table(
    args: &BenchArgs,
    peak: &PhaseReport,
    half: Option<&(f64, PhaseReport)>,
    pg: Option<&pgbench::PgbenchResult>,
    backlog: Option<i64>,
) {
    let lat = |p: &PhaseReport| {
        let l = &p.tally.latencies_us;
        format!(
            "p50 {:.1}  p95 {:.1}  p99 {:.1}  max {:.1}",
            percentile(l, 0.5),
            percentile(l, 0.95),
            percentile(l, 0.99),
            percentile(l, 1.0)
        )
    };
    let t = &peak.tally;
    println!(
        "\n== ostore-orders bench ({} mode, {} customers, {} s per phase)",
        match args.mode {
            Mode::Full => "full",
            Mode::Saga => "saga-only",
        },
        args.concurrency,
        args.duration_secs
    );
    println!("  peak orders/s            {:.1}", peak.orders_per_second());
    println!("  peak latency ms          {}", lat(peak));
    println!(
        "  peak outcomes            201 {}  202 {}  409 {}  other {}  errors {}",
        t.created, t.accepted, t.conflict, t.other, t.errors
    );
    if let Some(r) = peak.rss_peak {
        println!("  service RSS at peak      {r:.0} MB");
    }
    if let Some(c) = peak.cpu_ms_per_order() {
        println!("  service CPU per order    {c:.2} ms (user + system, all roles)");
    }
    if let Some(c) = peak.db_cpu_ms_per_order() {
        println!("  PostgreSQL CPU per order {c:.2} ms (its backends for this database, all roles)");
    }
    if let Some(c) = peak.bench_cpu_ms_per_order() {
        println!("  bench CPU per order      {c:.2} ms (load generator, simulators, in-process broker)");
    }
    if let Some(c) = peak.busy_ms_per_order() {
        println!("  machine busy per order   {c:.2} ms (every core, every process, the kernel)");
    }
    if let Some((first, last, ratio)) = peak.steady() {
        println!("  steady: first / last     {first:.1} / {last:.1} orders/s (last : first {ratio:.2})");
    }
    if args.base_url.is_none() {
        println!(
            "  tracking events applied  {:.1}/s ({:.2}x the order rate; the simulator emits what the orders produce)",
            peak.tracking_applied as f64 / peak.seconds,
            peak.tracking_applied as f64 / peak.seconds / peak.orders_per_second().max(1e-9)
        );
    }
    if let Some(b) = backlog {
        println!("  outbox backlog at end    {b}");
    }
    if let Some((rate, h)) = half {
        println!(
            "  half rate: target/s      {rate:.1}  achieved {:.1}",
            h.orders_per_second()
        );
        println!("  half rate latency ms     {}", lat(h));
        if let Some(r) = h.rss_peak {
            println!("  service RSS at half rate {r:.0} MB");
        }
    }
    if let Some(p) = pg {
        println!(
            "  pgbench write set        {:.1} orders/s, latency avg {:.2} ms ({} clients)",
            p.tps, p.latency_avg_ms, args.concurrency
        );
        if let Some(c) = p.db_cpu_ms_per_order {
            println!("  PostgreSQL CPU per order {c:.2} ms under pgbench");
        }
        println!(
            "  ratio orders/s : pgbench {:.2}",
            peak.orders_per_second() / p.tps
        );
        if let Some((_, h)) = half {
            println!(
                "  ratio half-rate p99 : pgbench latency {:.2}",
                percentile(&h.tally.latencies_us, 0.99) / p.latency_avg_ms
            );
        }
    }
}
