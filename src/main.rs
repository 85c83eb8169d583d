//! `ostore-orders`: see `ostore-orders --help`.

use clap::Parser;

/// mimalloc: the service allocates and frees many small blocks per request (JSON, SQL arguments,
/// HTTP frames); glibc's malloc took ≈ 14 % of the service's CPU under load (docs/performance.md).
/// Large blocks (argon2id takes 19 MiB per password hash) go back to the system when freed.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = ostore_orders::cli::Cli::parse();
    if let Some(telemetry) = cli.telemetry() {
        // SAFETY: no other thread runs yet (the runtime is built below).
        unsafe { telemetry.export() };
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = rt.block_on(run(cli));
    // Dropping the runtime would wait for every blocking task, however long: a stopping process
    // gives them a moment and leaves (see `app::SHUTDOWN_GRACE`).
    rt.shutdown_timeout(std::time::Duration::from_millis(500));
    code
}

async fn run(cli: ostore_orders::cli::Cli) -> std::process::ExitCode {
    match ostore_orders::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
