//! The `ostore-orders` command line: one binary, several subcommands. Every setting is also an
//! environment variable (see `--help` of each subcommand).

use std::sync::Arc;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::app::{self, ALL_ROLES, Role as AppRole};
use crate::auth::{Role, password, users};
use crate::config::{DatabaseArgs, LogFormat, ServiceConfig, TelemetryArgs};

/// OStore order management service.
#[derive(Debug, Parser)]
#[command(name = "ostore-orders", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service: the API, the saga worker, the outbox relay and the tracking consumer (all
    /// by default; choose with --roles). Migrations are applied at startup.
    Serve(ServeArgs),
    /// Run everything in one process on 127.0.0.1 for development: database created and migrated,
    /// simulators, an embedded Kafka-protocol broker when KAFKA_BOOTSTRAP_SERVERS is unset, demo users
    /// and products, and a printed quick start.
    Dev(DevArgs),
    /// Apply pending database migrations and exit.
    Migrate(MigrateArgs),
    /// Manage users.
    #[command(subcommand)]
    Users(UsersCommand),
    /// Run a downstream simulator on its own (development, tests, benchmarks, docker-compose).
    #[command(subcommand)]
    Sim(SimCommand),
    /// Load-test a stack (started in this process, or --base-url) and report orders/s, latency
    /// percentiles, outcomes, outbox backlog and RSS. Runs `ostore-tools bench` (see its --help).
    #[command(disable_help_flag = true)]
    Bench(ToolArgs),
    /// Relay benchmark: a raw producer's rate vs the outbox relay's for the same records to the
    /// same broker, and the ratio. Runs `ostore-tools bench-relay` (see its --help).
    #[command(disable_help_flag = true)]
    BenchRelay(ToolArgs),
    /// Tracking-consumer benchmark: TrackingEvents applied by the real consumer; reports events/s.
    /// Runs `ostore-tools bench-consumer` (see its --help).
    #[command(disable_help_flag = true)]
    BenchConsumer(ToolArgs),
    /// Kafka tools: serve the mock cluster as a process (`kafka mock`), dump topics (`kafka dump`).
    /// Runs `ostore-tools kafka` (see its --help).
    #[command(disable_help_flag = true)]
    Kafka(ToolArgs),
}

/// The tools binary the tool subcommands run: built from `benches/tools` in the same workspace.
pub const TOOLS_PROGRAM: &str = "ostore-tools";

/// Arguments of a tool subcommand, handed to [`TOOLS_PROGRAM`] untouched (`--help` included).
#[derive(Debug, Args)]
pub struct ToolArgs {
    /// The tool's own arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    pub args: Vec<std::ffi::OsString>,
}

/// The path of `name` next to the running program (one build directory, one install directory),
/// or `name` alone, looked up in PATH, when there is none.
pub fn sibling_program(name: &str) -> std::path::PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(name)))
        .filter(|path| path.is_file())
        .unwrap_or_else(|| std::path::PathBuf::from(name))
}

/// Replaces this process by `ostore-tools <subcommand> <args>`: same process id, standard streams
/// and signals (a test's SIGUSR1 reaches `kafka mock` itself). Returns only when that fails.
fn forward(subcommand: &str, args: ToolArgs) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt as _;
    let program = sibling_program(TOOLS_PROGRAM);
    let err = std::process::Command::new(&program)
        .arg(subcommand)
        .args(args.args)
        .exec();
    Err(anyhow::anyhow!(
        "`{subcommand}` is a subcommand of {TOOLS_PROGRAM}, which could not be run ({}: {err}); \
         build it beside this program with `cargo build --workspace` (or `-p {TOOLS_PROGRAM}`)",
        program.display()
    ))
}

/// `sim` subcommands.
#[derive(Debug, Subcommand)]
pub enum SimCommand {
    /// The Product Catalog simulator (reservations, `/sim` control API).
    Catalog(SimCatalogArgs),
    /// The Shipment Tracking simulator (shipments; publishes TrackingEvents to Kafka).
    Shipments(SimShipmentsArgs),
}

/// Faults a simulator starts with (the `/sim/faults` API changes them later).
#[derive(Debug, Clone, Args)]
pub struct SimFaultArgs {
    /// Added latency on every business call, in milliseconds.
    #[arg(long, env = "SIM_LATENCY_MS", default_value_t = 0)]
    pub latency_ms: u64,
    /// Share of business calls (0 to 1) answered 503.
    #[arg(long, env = "SIM_ERROR_RATE", default_value_t = 0.0)]
    pub error_rate: f64,
    /// Crash: leave the process at once (exit status 70) on the Nth business call, without
    /// answering it or doing it; 0 never.
    #[arg(long, env = "SIM_CRASH_AFTER", default_value_t = 0)]
    pub crash_after: u64,
}

impl SimFaultArgs {
    fn specs(&self) -> Vec<crate::sim::faults::FaultSpec> {
        if self.latency_ms == 0 && self.error_rate == 0.0 {
            return Vec::new();
        }
        let v = serde_json::json!({"latencyMs": self.latency_ms, "errorRate": self.error_rate});
        vec![serde_json::from_value(v).expect("valid fault")]
    }
}

/// `sim catalog` options.
#[derive(Debug, Args)]
pub struct SimCatalogArgs {
    /// Address to listen on.
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:8081")]
    pub listen_addr: std::net::SocketAddr,
    /// Start with the demo products (ids 1–5; product 5 is out of stock).
    #[arg(long)]
    pub demo_products: bool,
    /// Start with every demo product out of stock.
    #[arg(long)]
    pub out_of_stock: bool,
    #[command(flatten)]
    pub faults: SimFaultArgs,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    pub log_format: LogFormat,
    /// Logging filter and OpenTelemetry export.
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

/// `sim shipments` options.
#[derive(Debug, Args)]
pub struct SimShipmentsArgs {
    /// Address to listen on.
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:8082")]
    pub listen_addr: std::net::SocketAddr,
    /// Kafka cluster the TrackingEvents are published to (kept in memory only when unset).
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS")]
    pub kafka_bootstrap_servers: Option<String>,
    /// Topic of the TrackingEvents.
    #[arg(
        long,
        env = "TOPIC_TRACKING_EVENTS",
        default_value = crate::topics::TRACKING_EVENTS
    )]
    pub tracking_topic: String,
    /// Walk each new shipment picked_up → in_transit → delivered, one step every N ms.
    #[arg(long, env = "SIM_AUTO_ADVANCE_MS")]
    pub auto_advance_ms: Option<u64>,
    #[command(flatten)]
    pub faults: SimFaultArgs,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    pub log_format: LogFormat,
    /// Logging filter and OpenTelemetry export.
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

/// `serve` options.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Roles to run, comma-separated.
    #[arg(long, env = "ROLES", value_enum, value_delimiter = ',', default_values_t = ALL_ROLES.to_vec())]
    pub roles: Vec<AppRole>,
    #[command(flatten)]
    pub config: ServiceConfig,
}

/// `dev` options.
#[derive(Debug, Args)]
pub struct DevArgs {
    #[command(flatten)]
    pub config: ServiceConfig,
}

/// `migrate` options.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Create the database first when it does not exist.
    #[arg(long)]
    pub create_database: bool,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    pub log_format: LogFormat,
    /// Logging filter and OpenTelemetry export.
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

/// `users` subcommands.
#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// Create a user and print its id.
    Create(CreateUserArgs),
    /// Disable a user: they cannot log in, and every session of theirs (refresh tokens and access
    /// tokens) is refused at once, on every instance. Audited (actor 0, the command line).
    Disable(UserRefArgs),
    /// Enable a disabled user: they may log in again (sessions revoked by disabling stay revoked).
    Enable(UserRefArgs),
    /// Delete a user: disabled for good, every session revoked; the row stays so that their orders
    /// stay readable to admins, and the email may be given to a new account.
    Delete(UserRefArgs),
}

/// Which user (`--email` or `--id`) and where.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("user").required(true).args(["email", "id"])))]
pub struct UserRefArgs {
    /// The user's email (case-insensitive; deleted users are found by --id only).
    #[arg(long)]
    pub email: Option<String>,
    /// The user's id.
    #[arg(long)]
    pub id: Option<i32>,
    #[command(flatten)]
    pub database: DatabaseArgs,
}

/// `users create` options.
#[derive(Debug, Args)]
pub struct CreateUserArgs {
    /// The user's email (unique, case-insensitively).
    #[arg(long)]
    pub email: String,
    /// The user's password (at least 8 characters; prefer the NEW_USER_PASSWORD variable so it stays
    /// out of shell history).
    #[arg(long, env = "NEW_USER_PASSWORD", hide_env_values = true)]
    pub password: String,
    /// The user's role.
    #[arg(long, value_enum, default_value_t = Role::User)]
    pub role: Role,
    #[command(flatten)]
    pub database: DatabaseArgs,
}

impl Cli {
    /// The logging and OpenTelemetry flags of the subcommand, for those that log.
    pub fn telemetry(&self) -> Option<&TelemetryArgs> {
        match &self.command {
            Command::Serve(a) => Some(&a.config.telemetry),
            Command::Dev(a) => Some(&a.config.telemetry),
            Command::Migrate(a) => Some(&a.telemetry),
            Command::Sim(SimCommand::Catalog(a)) => Some(&a.telemetry),
            Command::Sim(SimCommand::Shipments(a)) => Some(&a.telemetry),
            _ => None,
        }
    }
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Dev(args) => crate::dev::run(args.config).await,
        Command::Migrate(args) => {
            let _t = crate::telemetry::init("ostore-orders", args.log_format);
            if args.create_database {
                crate::db::create_database_if_missing(&args.database.database_url).await?;
            }
            let pool = crate::db::connect(&args.database.database_url, 2).await?;
            crate::db::migrate(&pool).await?;
            match args.log_format {
                LogFormat::Json => tracing::info!("migrations applied"),
                LogFormat::Pretty => println!("migrations applied"),
            }
            Ok(())
        }
        Command::Users(UsersCommand::Create(args)) => create_user(args).await,
        Command::Users(UsersCommand::Disable(args)) => {
            change_user(args, users::LifecycleAction::Disable).await
        }
        Command::Users(UsersCommand::Enable(args)) => change_user(args, users::LifecycleAction::Enable).await,
        Command::Users(UsersCommand::Delete(args)) => change_user(args, users::LifecycleAction::Delete).await,
        Command::Bench(args) => forward("bench", args),
        Command::BenchRelay(args) => forward("bench-relay", args),
        Command::BenchConsumer(args) => forward("bench-consumer", args),
        Command::Kafka(args) => forward("kafka", args),
        Command::Sim(SimCommand::Catalog(args)) => {
            let _t = crate::telemetry::init("ostore-sim-catalog", args.log_format);
            let sim = crate::sim::catalog::CatalogSim::new();
            if args.demo_products || args.out_of_stock {
                crate::dev::seed_products(&sim, args.out_of_stock);
            }
            sim.set_faults(args.faults.specs())
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            sim.crash_after(args.faults.crash_after);
            run_sim("catalog", args.listen_addr, sim.router(), args.log_format).await
        }
        Command::Sim(SimCommand::Shipments(args)) => {
            let _t = crate::telemetry::init("ostore-sim-shipments", args.log_format);
            crate::kafka::install_client_properties_from_env()?;
            let sim = crate::sim::shipments::ShipmentsSim::new(crate::sim::shipments::ShipmentsSimConfig {
                kafka_bootstrap_servers: args.kafka_bootstrap_servers.clone(),
                tracking_topic: args.tracking_topic.clone(),
                auto_advance_ms: args.auto_advance_ms,
            })?;
            sim.set_faults(args.faults.specs())
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            sim.crash_after(args.faults.crash_after);
            let r = run_sim("shipments", args.listen_addr, sim.router(), args.log_format).await;
            let _ = sim.flush(std::time::Duration::from_secs(5)).await;
            r
        }
    }
}

async fn run_sim(
    name: &str,
    addr: std::net::SocketAddr,
    router: axum::Router,
    format: LogFormat,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding LISTEN_ADDR {addr}"))?;
    let url = format!("http://{}", listener.local_addr()?);
    match format {
        LogFormat::Json => tracing::info!(simulator = name, url = %url, "simulator listening"),
        LogFormat::Pretty => println!("{name} simulator listening on {url}"),
    }
    let shutdown = CancellationToken::new();
    app::cancel_on_signals(shutdown.clone());
    crate::sim::serve(listener, router, shutdown).await
}

/// The roles as `ROLES` spells them (`api,worker`).
fn roles_text(roles: &[AppRole]) -> String {
    use clap::ValueEnum as _;
    roles
        .iter()
        .filter_map(|r| r.to_possible_value().map(|v| v.get_name().to_string()))
        .collect::<Vec<_>>()
        .join(",")
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let cfg = args.config;
    cfg.validate(false)?;
    crate::kafka::install_client_properties_from_env()?;
    let _telemetry = crate::telemetry::init("ostore-orders", cfg.log_format);
    let roles: Vec<AppRole> = if args.roles.is_empty() {
        ALL_ROLES.to_vec()
    } else {
        args.roles
    };
    cfg.print(
        "ostore-orders serve: effective configuration",
        &[("ROLES", roles_text(&roles))],
    );
    let pool = crate::db::connect(&cfg.database.database_url, cfg.database_max_connections).await?;
    crate::db::migrate(&pool).await?;
    let shutdown = CancellationToken::new();
    app::cancel_on_signals(shutdown.clone());
    app::run(Arc::new(cfg), &roles, pool, shutdown).await
}

/// Validates and creates a user, returning its id.
pub async fn create_user_in(pool: &sqlx::PgPool, email: &str, pw: &str, role: Role) -> anyhow::Result<i32> {
    if !users::email_is_plausible(email) {
        anyhow::bail!("--email {email:?} is not a valid email address");
    }
    if pw.chars().count() < password::MIN_PASSWORD_CHARS || pw.len() > password::MAX_PASSWORD_BYTES {
        anyhow::bail!("--password must be 8 to 1024 characters long");
    }
    if pw.chars().any(char::is_control) {
        // The API refuses control characters in every string: such a password could never log in.
        anyhow::bail!("--password must not contain control characters");
    }
    match users::create_with_password(pool, email, pw, role).await {
        Ok(id) => Ok(id),
        Err(users::CreateUserError::EmailTaken) => {
            anyhow::bail!("a user with email {email:?} already exists")
        }
        Err(e) => Err(e.into()),
    }
}

async fn create_user(args: CreateUserArgs) -> anyhow::Result<()> {
    let pool = crate::db::connect(&args.database.database_url, 2).await?;
    crate::db::migrate(&pool)
        .await
        .context("the database schema is not ready")?;
    let id = create_user_in(&pool, &args.email, &args.password, args.role).await?;
    println!("{id}");
    Ok(())
}

/// Disables, enables or deletes a user, audited with actor 0; prints the account's new state.
pub async fn change_user_in(
    pool: &sqlx::PgPool,
    email: Option<&str>,
    id: Option<i32>,
    action: users::LifecycleAction,
) -> anyhow::Result<users::Account> {
    let mut tx = pool.begin().await?;
    let user_id = match (id, email) {
        (Some(id), _) => id,
        (None, Some(email)) => users::id_by_email(&mut tx, email)
            .await?
            .ok_or_else(|| anyhow::anyhow!("no user with email {email:?}"))?,
        (None, None) => anyhow::bail!("give --email or --id"),
    };
    match crate::admin::change_account(&mut tx, 0, user_id, action).await? {
        users::LifecycleOutcome::NotFound => anyhow::bail!("no user with id {user_id}"),
        users::LifecycleOutcome::Deleted(_) => {
            anyhow::bail!("user {user_id} is deleted; a deleted user cannot be enabled")
        }
        users::LifecycleOutcome::Done { after, .. } => {
            tx.commit().await?;
            Ok(after)
        }
    }
}

async fn change_user(args: UserRefArgs, action: users::LifecycleAction) -> anyhow::Result<()> {
    let pool = crate::db::connect(&args.database.database_url, 2).await?;
    crate::db::migrate(&pool)
        .await
        .context("the database schema is not ready")?;
    let account = change_user_in(&pool, args.email.as_deref(), args.id, action).await?;
    println!("{}", serde_json::to_string(&account)?);
    Ok(())
}
