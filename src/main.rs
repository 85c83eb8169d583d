//! `ostore-orders`: see `ostore-orders --help`.

use clap::Parser;

/// Blocks of 1 MiB and more (argon2id takes 19 MiB per password hash, on the blocking pool's
/// threads) are mmapped and go back to the system when freed. glibc's adaptive threshold would
/// otherwise raise itself after the first such free and keep later blocks in per-thread arenas:
/// measured ≈ +115 MB of RSS that stays after 32 logins (docs/performance.md).
fn pin_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called before other threads allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

fn main() -> std::process::ExitCode {
    pin_mmap_threshold();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(run())
}

async fn run() -> std::process::ExitCode {
    let cli = ostore_orders::cli::Cli::parse();
    match ostore_orders::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
