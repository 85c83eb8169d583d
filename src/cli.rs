//! The `ostore-orders` command line: one binary, several subcommands. Every setting is also an
//! environment variable (see `--help` of each subcommand).

use std::sync::Arc;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::app::{self, ALL_ROLES, Role as AppRole};
use crate::auth::{Role, password, users};
use crate::config::{LogFormat, ServiceConfig};

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
    /// PostgreSQL connection string.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/ostore"
    )]
    pub database_url: String,
    /// Create the database first when it does not exist.
    #[arg(long)]
    pub create_database: bool,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    pub log_format: LogFormat,
}

/// `users` subcommands.
#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// Create a user and print its id.
    Create(CreateUserArgs),
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
    /// PostgreSQL connection string.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/ostore"
    )]
    pub database_url: String,
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Dev(args) => crate::dev::run(args.config).await,
        Command::Migrate(args) => {
            let _t = crate::telemetry::init("ostore-orders", args.log_format);
            if args.create_database {
                crate::db::create_database_if_missing(&args.database_url).await?;
            }
            let pool = crate::db::connect(&args.database_url, 2).await?;
            crate::db::migrate(&pool).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Users(UsersCommand::Create(args)) => create_user(args).await,
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let cfg = args.config;
    cfg.validate(false)?;
    let _telemetry = crate::telemetry::init("ostore-orders", cfg.log_format);
    cfg.print("ostore-orders serve: effective configuration");
    let roles: Vec<AppRole> = if args.roles.is_empty() {
        ALL_ROLES.to_vec()
    } else {
        args.roles
    };
    println!("  {:<28} {:?}", "ROLES", roles);
    let pool = crate::db::connect(&cfg.database_url, cfg.database_max_connections).await?;
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
    let hash = password::hash_blocking(pw)?;
    let mut conn = pool.acquire().await?;
    match users::create(&mut conn, email, &hash, role).await {
        Ok(id) => Ok(id),
        Err(users::CreateUserError::EmailTaken) => {
            anyhow::bail!("a user with email {email:?} already exists")
        }
        Err(e) => Err(e.into()),
    }
}

async fn create_user(args: CreateUserArgs) -> anyhow::Result<()> {
    let pool = crate::db::connect(&args.database_url, 2).await?;
    crate::db::migrate(&pool)
        .await
        .context("the database schema is not ready")?;
    let id = create_user_in(&pool, &args.email, &args.password, args.role).await?;
    println!("{id}");
    Ok(())
}
