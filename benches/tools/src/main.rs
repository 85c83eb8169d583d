//! `ostore-tools`: the benchmarks and Kafka tools of the OStore order service, a binary of its own
//! beside the service (`ostore-orders`), built from the same workspace. It drives the service's
//! own code (its library: stores, relay, consumer, simulators) and never copies its SQL.
//! `ostore-orders bench …`, `bench-relay`, `bench-consumer` and `kafka …` run this binary;
//! `verify` is its own.

mod bench;
mod bench_kafka;
mod kafka_tools;
mod verify;

use clap::{Parser, Subcommand};

/// mimalloc, as the service: the load generator, simulators and in-process broker allocate many
/// small blocks, and the bench reports this process's CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Benchmarks and Kafka tools of the OStore order service.
#[derive(Debug, Parser)]
#[command(name = "ostore-tools", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Load-test a stack (started in this process, or --base-url) and report orders/s, latency
    /// percentiles, outcomes, outbox backlog and RSS.
    Bench(Box<bench::BenchArgs>),
    /// Relay benchmark: a raw producer's rate vs the outbox relay's for the same records to the
    /// same broker (the mock cluster in this process unless KAFKA_BOOTSTRAP_SERVERS), and the ratio.
    BenchRelay(bench_kafka::BenchRelayArgs),
    /// Tracking-consumer benchmark: TrackingEvents (lifecycles with redelivered copies) for
    /// confirmed orders, applied by the real consumer; reports events/s.
    BenchConsumer(bench_kafka::BenchConsumerArgs),
    /// Kafka tools: serve the mock cluster as a process (`kafka mock`), dump topics (`kafka dump`).
    #[command(subcommand)]
    Kafka(kafka_tools::KafkaCommand),
    /// Check the invariants of a drained system: sagas settled, no double reservation or
    /// shipment, stock and shipments matching the orders, the outbox published, tracking events
    /// applied once, orders agreeing with their sagas (the checks of the crash tests and of
    /// scripts/chaos). Exits 1 when one fails.
    Verify(verify::VerifyArgs),
}

/// Standard output carries the tools' results: diagnostics go to standard error (`RUST_LOG`,
/// warnings by default).
fn log_to_stderr() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .try_init();
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Bench(args) => {
            let _t = ostore_orders::telemetry::init("ostore-orders-bench", args.config.log_format);
            bench::run(*args).await
        }
        Command::BenchRelay(args) => {
            let _t = ostore_orders::telemetry::init("ostore-orders-bench", args.common.log_format);
            bench_kafka::run_relay(args).await
        }
        Command::BenchConsumer(args) => {
            let _t = ostore_orders::telemetry::init("ostore-orders-bench", args.common.log_format);
            bench_kafka::run_consumer(args).await
        }
        Command::Kafka(command) => {
            log_to_stderr();
            ostore_orders::kafka::install_client_properties_from_env()?;
            kafka_tools::run(command).await
        }
        Command::Verify(args) => {
            log_to_stderr();
            verify::run(args).await
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    };
    // As the service: a stopping process gives blocking tasks a moment and leaves.
    rt.shutdown_timeout(std::time::Duration::from_millis(500));
    code
}
