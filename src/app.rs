//! Assembling and running the service: the shared state, the roles a process runs (`api`, `worker`,
//! `relay`, `consumer`), and graceful shutdown through one cancellation token.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{self, AppState};
use crate::auth::AuthService;
use crate::auth::limiter::UserLimiter;
use crate::config::ServiceConfig;
use crate::downstream::catalog::CatalogClient;
use crate::downstream::shipments::ShipmentsClient;
use crate::orders::saga::steps::load_create_order;
use crate::saga::engine::{Engine, EngineConfig};

/// A role a process can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// The HTTP API.
    Api,
    /// The saga worker.
    Worker,
    /// The outbox relay to Kafka.
    Relay,
    /// The tracking-event consumer.
    Consumer,
}

/// Every role.
pub const ALL_ROLES: [Role; 4] = [Role::Api, Role::Worker, Role::Relay, Role::Consumer];

/// Builds the saga engine from the configuration (the definition is validated here: a bad
/// `sagas/create_order.toml` stops startup with a message naming the file and the field).
pub fn build_engine(cfg: &ServiceConfig, db: PgPool, drive: bool) -> anyhow::Result<Engine> {
    let def = load_create_order()?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .connect_timeout(Duration::from_secs(2))
        .build()
        .context("building the HTTP client")?;
    let mut ecfg = EngineConfig::new(cfg.saga_retry_scale);
    ecfg.lease = Duration::from_millis(cfg.saga_lease_ms);
    ecfg.poll_interval = Duration::from_millis(cfg.saga_poll_interval_ms);
    ecfg.max_in_flight = cfg.saga_max_in_flight;
    ecfg.committers = cfg.saga_committers;
    ecfg.drive = drive;
    let saga = crate::orders::saga::steps::create_order(
        def,
        CatalogClient::new(&cfg.catalog_url, http.clone()),
        ShipmentsClient::new(&cfg.shipments_url, http),
    );
    Engine::new(db, saga, ecfg, cfg.topics.clone())
}

/// Builds the handlers' shared state (the engine is built, not started).
pub fn build_state(cfg: Arc<ServiceConfig>, db: PgPool, drive: bool) -> anyhow::Result<AppState> {
    let engine = build_engine(&cfg, db.clone(), drive)?;
    Ok(AppState {
        db,
        auth: AuthService::new(&cfg),
        order_limiter: UserLimiter::new(cfg.order_limit_per_user),
        config: cfg,
        readiness: Arc::new(Vec::new()),
        engine,
    })
}

/// Serves the API on `listener` until `shutdown` is cancelled, then drains in-flight requests.
pub async fn serve_api(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    serve_router(listener, api::router(state, crate::console::router()), shutdown)
        .await
        .context("serving the API")
}

/// Serves `router` on `listener` (with each caller's address) until `shutdown` is cancelled, then
/// drains in-flight requests.
async fn serve_router(
    listener: TcpListener,
    router: axum::Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown.cancelled_owned())
    .await
}

/// Periodic housekeeping: expired deny-list entries and refresh tokens, spent refresh families,
/// Idempotency-Keys of finished orders past their retention, idle limiter keys.
pub async fn housekeeping(state: AppState, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        state.auth.limiter.shrink();
        state.order_limiter.shrink();
        match state.db.acquire().await {
            Ok(mut conn) => {
                if let Err(e) = crate::auth::tokens::purge_expired(&mut conn).await {
                    tracing::warn!(error = %e, "purging expired tokens failed");
                }
                let cfg = &state.config;
                let (access, refresh) = (cfg.access_token_ttl_seconds, cfg.refresh_token_ttl_seconds);
                if let Err(e) = crate::auth::tokens::purge_families(&mut conn, access, refresh).await {
                    tracing::warn!(error = %e, "purging spent refresh families failed");
                }
                let keep = Duration::from_secs(cfg.idempotency_key_retention_seconds);
                if let Err(e) = crate::orders::place::purge_idempotency_keys(&mut conn, keep).await {
                    tracing::warn!(error = %e, "purging old Idempotency-Keys failed");
                }
            }
            Err(e) => tracing::warn!(error = %e, "housekeeping: database unavailable"),
        }
    }
}

/// Runs the selected roles until ctrl-c / SIGTERM (or `shutdown` is cancelled).
pub async fn run(
    cfg: Arc<ServiceConfig>,
    roles: &[Role],
    db: PgPool,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let tracker = TaskTracker::new();
    let mut state = build_state(cfg.clone(), db.clone(), roles.contains(&Role::Worker))?;
    let kafka_roles = roles.contains(&Role::Relay) || roles.contains(&Role::Consumer);
    match (&cfg.kafka_bootstrap_servers, kafka_roles) {
        (None, true) => anyhow::bail!(
            "KAFKA_BOOTSTRAP_SERVERS is not set: the relay and consumer roles need a Kafka cluster \
             (run `serve --roles api,worker` without Kafka, or `dev`, which embeds a broker)"
        ),
        (Some(bootstrap), true) => {
            let t = &cfg.topics;
            crate::kafka::ensure_topics(
                bootstrap,
                &[
                    &t.order_events,
                    &t.saga_events,
                    &t.tracking_events,
                    &t.notifications,
                    &t.tracking_dlq,
                ],
            )
            .await;
            if roles.contains(&Role::Relay) {
                let (producer, connectivity) =
                    crate::kafka::producer(bootstrap, &crate::kafka::ProducerSettings::default())?;
                state.readiness = Arc::new(vec![crate::api::ReadinessProbe {
                    name: "kafka",
                    check: Arc::new(move || connectivity.check()),
                }]);
                tracker.spawn(crate::outbox::relay::run(
                    db.clone(),
                    producer,
                    crate::outbox::relay::RelayConfig::from_config(&cfg),
                    shutdown.clone(),
                ));
            }
            if roles.contains(&Role::Consumer) {
                let (pool, b, topics, s, consumer) = (
                    db.clone(),
                    bootstrap.clone(),
                    cfg.topics.clone(),
                    shutdown.clone(),
                    crate::tracking::ConsumerConfig::from_config(&cfg),
                );
                tracker.spawn(async move {
                    if let Err(e) = crate::tracking::run(pool, consumer, &b, &topics, s.clone()).await {
                        tracing::error!(error = %format!("{e:#}"), "tracking consumer stopped");
                        s.cancel();
                    }
                });
            }
        }
        _ => {}
    }
    if roles.contains(&Role::Api) || roles.contains(&Role::Worker) {
        state.engine.start(&tracker, shutdown.clone());
    }
    if roles.contains(&Role::Api) {
        let listener = TcpListener::bind(cfg.listen_addr)
            .await
            .with_context(|| format!("binding LISTEN_ADDR {}", cfg.listen_addr))?;
        tracing::info!(addr = %listener.local_addr()?, "API listening");
        let (s, t) = (state.clone(), shutdown.clone());
        tracker.spawn(async move {
            if let Err(e) = serve_api(listener, s, t.clone()).await {
                tracing::error!(error = %format!("{e:#}"), "API stopped");
                t.cancel();
            }
        });
        tracker.spawn(housekeeping(state.clone(), shutdown.clone()));
        let (revocations, db, t) = (state.auth.revocations.clone(), state.db.clone(), shutdown.clone());
        tracker.spawn(async move { revocations.run(db, t).await });
    } else {
        // No API here: its operators still scrape this process's own metrics on LISTEN_ADDR. An
        // address already taken (another process of the same host serves the API there) costs
        // the metrics endpoint, never the roles.
        match TcpListener::bind(cfg.listen_addr).await {
            Ok(listener) => {
                tracing::info!(addr = %listener.local_addr()?, "serving /metrics, /livez and /readyz");
                let (router, t) = (api::ops_router(state.clone()), shutdown.clone());
                tracker.spawn(async move {
                    if let Err(e) = serve_router(listener, router, t).await {
                        tracing::warn!(error = %e, "the metrics endpoint stopped");
                    }
                });
            }
            Err(e) => tracing::warn!(
                addr = %cfg.listen_addr,
                error = %e,
                "LISTEN_ADDR is not free: this process serves no /metrics (give it a LISTEN_ADDR of its own)"
            ),
        }
    }
    // Every role's process exports the database-derived gauges.
    tracker.spawn(crate::metrics::refresh_gauges(
        state.db.clone(),
        Duration::from_secs(15),
        shutdown.clone(),
    ));
    tracker.close();
    shutdown.cancelled().await;
    tracing::info!("shutting down");
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        // Nothing is lost by leaving now: a saga still being driven keeps its lease until it
        // expires and is resumed from its last committed step; unpublished outbox rows stay
        // unpublished; an uncommitted tracking offset is redelivered and deduplicated.
        tracing::warn!(
            grace_ms = SHUTDOWN_GRACE.as_millis() as u64,
            "some tasks did not stop within the shutdown grace; leaving them (their work resumes elsewhere)"
        );
    }
    Ok(())
}

/// How long a stopping process waits for its tasks (in-flight requests answered, sagas being
/// driven finishing their step and committing it, the relay and the consumer committing what they
/// did) before it leaves anyway: under the 5 s a deployment's SIGTERM-to-SIGKILL window usually
/// leaves, with room for the runtime's own shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(4);

/// Cancels `token` on ctrl-c or SIGTERM.
pub fn cancel_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("SIGTERM handler");
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = ctrl_c.await;
        }
        tracing::info!("signal received; shutting down");
        token.cancel();
    });
}
