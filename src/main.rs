//! The `hot-potato` binary: reads the configuration, sets up logging, binds the API port and
//! hands over to [`hot_potato::run`]. `hot-potato demo-receiver` runs the demo HTTP receiver.

use std::process::ExitCode;

use anyhow::Context as _;
use hot_potato::config::{Config, LogFormat};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

/// glibc's malloc took about 12 % of the daemon's CPU per message, part of it waiting on an
/// arena lock between runtime threads (perf, `max_in_flight` 16), and made 8 enrollments slower
/// than one; jemalloc keeps per-thread caches. (mimalloc was as fast but held ~15 % more idle
/// memory at 10,000 enrollments.)
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read once at start-up (`_RJEM_MALLOC_CONF` in the environment overrides
/// them): a background thread hands freed pages back within a second of going unused, instead
/// of on the next allocation after ten, so an idle daemon's RSS is what it holds. A reference
/// to an array, not a slice: C reads this symbol as a plain `const char *`.
#[unsafe(export_name = "_rjem_malloc_conf")]
static JEMALLOC_OPTIONS: &[u8; 60] =
    b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hot-potato: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match args.first().map(String::as_str) {
        Some("demo-receiver") => runtime.block_on(hot_potato::demo_receiver::main(&args[1..])),
        None | Some("serve") => runtime.block_on(serve()),
        Some(other) => Err(anyhow::anyhow!(
            "unknown command `{other}`; usage: hot-potato [serve | demo-receiver [--port N] [--status CODE]]"
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hot-potato: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, skipping a cause whose text the line already holds
/// (our error messages often quote their source).
fn one_line(e: &anyhow::Error) -> String {
    let mut line = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line
}

async fn serve() -> anyhow::Result<()> {
    // A missing .env is normal; a malformed one is a configuration error.
    match dotenvy::dotenv() {
        Ok(_) => {}
        Err(e) if e.not_found() => {}
        Err(e) => anyhow::bail!("invalid configuration: cannot read .env: {e}"),
    }
    let config = Config::from_env()?;
    init_tracing(&config);
    // One connection per enrollment (plus one per target host) outgrows the usual soft limit
    // of 1024 open files long before memory or CPU run out: take what the hard limit allows.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    let addr = std::net::SocketAddr::new(config.http_host, config.http_port);
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (HTTP_HOST/HTTP_PORT)"))?;
    hot_potato::run(config, listener, shutdown_signal()).await?;
    Ok(())
}

fn init_tracing(config: &Config) {
    let filter = EnvFilter::try_new(&config.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only for a terminal: log files and journald get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi);
    match config.log_format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
        LogFormat::Text => builder.init(),
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}
