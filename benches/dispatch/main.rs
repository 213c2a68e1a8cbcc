//! Dispatch benchmark: hot-potato against the real local RabbitMQ, compared with a bare
//! fe2o3-amqp receiver draining the same kind of queue.
//!
//! Run it with `scripts/bench.sh` (broker check, release build of the daemon, then
//! `cargo bench --bench dispatch`). Under `cargo test --all-targets` the binary is started
//! without `--bench` and exits at once.
//!
//! The daemon runs as a child process (`target/release/hot-potato`, under `CARGO_TARGET_DIR`
//! when that is set, or `HOT_POTATO_BIN`), one fresh process per scenario, with a cleared environment, its own SQLite file and a free
//! API port. The HTTP target (axum, answers 200 at once, on a thread of its own), the publisher
//! and the broker run on the same machine.
//!
//! Settings (environment):
//! - `BENCH_MESSAGES` (50000): messages per queue in the throughput scenarios.
//! - `BENCH_PREFETCH` (1000): `subscription_args.prefetch` of every enrollment; the bare
//!   receiver uses the same credit.
//! - `BENCH_LATENCY_RATE` (500) and `BENCH_LATENCY_SECS` (20): the latency scenario's
//!   publish rate and duration.
//! - `BENCH_SCALE` (1; `0` skips) and `BENCH_SCALE_ENROLLMENTS` (1000): the scale scenario.
//!   `--no-scale` on the command line skips it too. It needs one broker connection per
//!   enrollment by default; `BENCH_SCALE_POOL=N` runs that daemon with `AMQP_CONNECTION_POOL=N`
//!   (N shared connections) instead. `BENCH_SCALE_FORCE=1` runs it even when the broker
//!   reports fewer free sockets than it needs. A second row runs
//!   `BENCH_SCALE_POOLED_ENROLLMENTS` (10000; 0 skips it) on `BENCH_SCALE_POOLED_POOL` (8)
//!   pooled connections with `BENCH_SCALE_POOLED_LINKS` (64) links per session.
//! - `BENCH_ONLY`: a comma-separated subset of `ceiling`, `throughput` (runs the ceiling too),
//!   `isolation`, `latency`, `publish`, `scale`.
//! - `BENCH_ROUNDS` (3): how many times the ceiling and the throughput rows run, one after
//!   the other; the table gives medians and each round's ratio to its own ceiling.
//! - `BENCH_CASES`: a comma-separated subset of the throughput rows by label
//!   (`single-mif1`, `single-mif16`, `single-mif32`, `single-defaults-mif32`,
//!   `single-batched`, `eight-mif1`, `eight-mif16`).
//! - `BENCH_BESIDE` (1; `0` skips): each throughput row is preceded by a bare drain of as many
//!   queues (TCP_NODELAY, a connection each), and the table also reads the row against it: on
//!   two shared cores the machine's speed drifts within a round, and this reference is the one
//!   measured nearest in time.
//! - `BENCH_TARGET_THREAD` (1; `0` turns it off): the HTTP target runs on a current-thread
//!   runtime in a thread of its own; off, on the benchmark's two-worker runtime, as before
//!   2026-12-08 (see [`target_thread`]).
//! - `BENCH_DAEMON_<NAME>=<value>`: every daemon runs with `<NAME>=<value>`, e.g.
//!   `BENCH_DAEMON_TOKIO_WORKER_THREADS=1`.
//! - `BENCH_CLK_TCK` (100): clock ticks per second of /proc/PID/stat (`getconf CLK_TCK`).
//! - `BENCH_AMQP_URL` (amqp://guest:guest@127.0.0.1:5672), `BENCH_MANAGEMENT_URL`
//!   (http://127.0.0.1:15672, user guest/guest).
//!
//! Queues are named `bench-<run>-...` and deleted at the end, also after a failure or Ctrl-C.
//! The daemons run with `LOG_LEVEL=warn` and `LOG_FORMAT=json`; their logs are kept in
//! `target/bench-logs/<run>/` and their warnings summarised under the results.
//!
//! # Layout
//! One file per scenario, each with a `run` that prints its progress and adds to the report:
//! [`ceiling`], [`throughput`], [`isolation`], [`latency`], [`publish`], [`scale`]. Beside them:
//! [`settings`] (the variables above), [`target_thread`] (the targets' runtime), [`process`] (a
//! daemon per scenario, waiting for the target's count), [`load`] (preloading queues),
//! [`procstat`] (CPU and memory from /proc) and [`report`] (the results table). The management
//! API client, the publisher, the HTTP targets, spawning the daemon and the API client come from
//! the `hot-potato-testkit` crate (`tests/testkit`), shared with the integration tests.

mod ceiling;
mod isolation;
mod latency;
mod load;
mod process;
mod procstat;
mod publish;
mod report;
mod scale;
mod settings;
mod target_thread;
mod throughput;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, Result, anyhow};
use hot_potato_testkit::management::Management;

use crate::procstat::{machine, set_broker_pid};
use crate::report::Report;
use crate::settings::Settings;

/// The management API refreshes queue figures every 5 s by default.
const DEPTH_LIMIT: Duration = Duration::from_secs(60);
/// How often a wait on the management API asks again.
const DEPTH_POLL: Duration = Duration::from_millis(500);
/// Parallel management/API calls when declaring or enrolling many queues.
const PARALLEL_CALLS: usize = 16;

fn newest_source(dir: &Path) -> Option<SystemTime> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let t = if path.is_dir() {
            newest_source(&path)
        } else {
            entry.metadata().ok()?.modified().ok()
        };
        newest = newest.max(t);
    }
    newest
}

/// The daemon binary is there (and not older than the sources), the broker answers, and
/// what an earlier run may have left behind.
async fn preflight(s: &Settings, mgmt: &Management) -> Result<()> {
    let meta = std::fs::metadata(&s.bin).with_context(|| {
        format!(
            "no daemon binary at {}: build it with `cargo build --release --bin hot-potato` (scripts/bench.sh does)",
            s.bin.display()
        )
    })?;
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    if let (Ok(built), Some(edited)) = (meta.modified(), newest_source(&src))
        && edited > built
    {
        println!(
            "warning: {} is older than the newest file in src/; rebuild it to measure the current code",
            s.bin.display()
        );
    }
    let overview = mgmt
        .get("/api/overview")
        .await
        .context("the RabbitMQ management API does not answer; run scripts/ensure-broker.sh")?;
    println!(
        "Broker: RabbitMQ {} (Erlang {}) at {}, management API {}",
        overview["rabbitmq_version"].as_str().unwrap_or("?"),
        overview["erlang_version"].as_str().unwrap_or("?"),
        s.amqp_url.split('@').next_back().unwrap_or(&s.amqp_url),
        s.management_url
    );
    // The node's own pid, so its CPU is read and not another node's on this machine.
    let nodes = mgmt.get("/api/nodes").await?;
    match nodes[0]["os_pid"].as_str() {
        Some(pid) => set_broker_pid(pid.to_string()),
        None => println!(
            "warning: the management API named no broker pid; broker CPU is read from the first beam.smp"
        ),
    }
    let list = mgmt.get("/api/queues/%2F?columns=name").await?;
    let stale = list
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|q| q["name"].as_str().is_some_and(|n| n.starts_with("bench-")))
                .count()
        })
        .unwrap_or(0);
    if stale > 0 {
        println!("warning: {stale} bench-* queue(s) from an earlier run are still on the broker");
    }
    Ok(())
}

async fn run_all(s: &Settings, mgmt: &Management, report: &mut Report) -> Result<()> {
    preflight(s, mgmt).await?;
    // The throughput rows are read against the ceiling of their own round, so it runs
    // whenever they do.
    for round in 0..s.rounds {
        report.round = round;
        if s.rounds > 1 {
            println!("\n# round {} of {}", round + 1, s.rounds);
        }
        if s.wants("ceiling") || s.wants("throughput") {
            ceiling::run(s, mgmt, report).await?;
        }
        if s.wants("throughput") {
            throughput::run(s, mgmt, report).await;
        }
    }
    if s.wants("isolation") {
        isolation::run(s, mgmt, report).await;
    }
    if s.wants("latency") {
        latency::run(s, mgmt, report).await;
    }
    if s.wants("publish") {
        publish::run(s, mgmt, report).await;
    }
    if s.wants("scale") {
        scale::run(s, mgmt, report).await;
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        println!(
            "dispatch: a benchmark against a live broker; run it with `scripts/bench.sh` or `cargo bench --bench dispatch`"
        );
        return ExitCode::SUCCESS;
    }
    let started = Settings::from_env(&args).and_then(|s| {
        let mgmt = Management::new(&s.management_url)?.polling_every(DEPTH_POLL);
        Ok((s, mgmt))
    });
    let (settings, mgmt) = match started {
        Ok(both) => both,
        Err(e) => {
            eprintln!("dispatch: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    println!("Machine: {}", machine());
    println!(
        "The RabbitMQ broker, the HTTP target (in this process, on a thread of its own unless BENCH_TARGET_THREAD=0) and the publisher run on the same machine beside the daemon, and share its CPUs."
    );
    println!(
        "Settings: BENCH_MESSAGES={} BENCH_ROUNDS={} BENCH_BESIDE={} BENCH_TARGET_THREAD={} BENCH_PREFETCH={} BENCH_LATENCY_RATE={} BENCH_LATENCY_SECS={} BENCH_SCALE={} BENCH_SCALE_ENROLLMENTS={} BENCH_SCALE_POOL={} BENCH_SCALE_POOLED_ENROLLMENTS={} BENCH_SCALE_POOLED_POOL={} BENCH_SCALE_POOLED_LINKS={} BENCH_CLK_TCK={}; daemon {}; queues bench-{}-*",
        settings.messages,
        settings.rounds,
        u8::from(settings.beside),
        u8::from(settings.target_thread.is_some()),
        settings.prefetch,
        settings.latency_rate,
        settings.latency_secs,
        u8::from(settings.scale),
        settings.scale_enrollments,
        settings.scale_pool,
        settings.scale_pooled_enrollments,
        settings.scale_pooled_pool,
        settings.scale_pooled_links,
        settings.clk_tck,
        settings.bin.display(),
        settings.run_id
    );

    let mut report = Report::default();
    let outcome = tokio::select! {
        r = run_all(&settings, &mgmt, &mut report) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    // Whatever happened, the queues go (an interrupted scenario's daemon was killed on drop).
    match mgmt.cleanup().await {
        Ok(0) => {}
        Ok(n) => println!("\ndeleted {n} leftover bench queue(s)"),
        Err(e) => eprintln!("\ncould not delete every bench queue: {e:#}"),
    }
    if let Err(e) = outcome {
        report.failures.push(format!("{e:#}"));
    }
    report.print(&settings);
    if report.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
