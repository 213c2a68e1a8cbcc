//! The benchmark's settings, read once from the environment (see the list in `main.rs`).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Result, anyhow, bail, ensure};
use hot_potato_testkit::address;
use serde_json::{Value as Json, json};
use tokio::runtime::Handle;

use crate::target_thread::TargetThread;

/// Names `BENCH_ONLY` understands.
pub const SCENARIOS: [&str; 6] = [
    "throughput",
    "isolation",
    "latency",
    "publish",
    "scale",
    "ceiling",
];

#[derive(Clone)]
pub struct Settings {
    pub messages: u64,
    pub prefetch: u32,
    pub latency_rate: u64,
    pub latency_secs: u64,
    pub scale: bool,
    pub scale_enrollments: usize,
    pub scale_force: bool,
    /// `AMQP_CONNECTION_POOL` of the scale scenario's daemon; 0 leaves the daemon's default.
    pub scale_pool: usize,
    /// Enrollments of the pooled scale row (`BENCH_SCALE_POOLED_ENROLLMENTS`, 0 skips it).
    pub scale_pooled_enrollments: usize,
    /// `AMQP_CONNECTION_POOL` of the pooled scale row (`BENCH_SCALE_POOLED_POOL`).
    pub scale_pooled_pool: usize,
    /// `AMQP_LINKS_PER_SESSION` of the pooled scale row (`BENCH_SCALE_POOLED_LINKS`).
    pub scale_pooled_links: usize,
    pub clk_tck: u64,
    pub bin: PathBuf,
    pub amqp_url: String,
    pub management_url: String,
    pub run_id: String,
    /// Scenarios to run (`BENCH_ONLY`), all when empty.
    pub only: Vec<String>,
    /// Where the daemons' logs are kept.
    pub log_dir: PathBuf,
    /// Throughput rows to run (`BENCH_CASES`, their labels), all when empty.
    pub cases: Vec<String>,
    /// How many times the ceiling and the throughput rows run (`BENCH_ROUNDS`).
    pub rounds: usize,
    /// Whether each throughput row is preceded by a bare drain of as many queues
    /// (`BENCH_BESIDE`, 1 by default).
    pub beside: bool,
    /// The thread the HTTP targets run on (`BENCH_TARGET_THREAD`, 1 by default), or none: the
    /// benchmark's own runtime.
    pub target_thread: Option<Arc<TargetThread>>,
}

fn env_parse<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .map_err(|_| anyhow!("{name}={v:?} is not a valid value")),
        _ => Ok(default),
    }
}

impl Settings {
    pub fn from_env(args: &[String]) -> Result<Self> {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        // `cargo bench` runs this with the caller's environment, CARGO_TARGET_DIR included.
        let target_dir = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        let bin = std::env::var_os("HOT_POTATO_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| target_dir.join("release/hot-potato"));
        let scale_flag: u8 = env_parse("BENCH_SCALE", 1)?;
        let run_id = uuid::Uuid::new_v4().simple().to_string()[..6].to_string();
        let s = Self {
            messages: env_parse("BENCH_MESSAGES", 50_000)?,
            prefetch: env_parse("BENCH_PREFETCH", 1_000)?,
            latency_rate: env_parse("BENCH_LATENCY_RATE", 500)?,
            latency_secs: env_parse("BENCH_LATENCY_SECS", 20)?,
            scale: scale_flag != 0 && !args.iter().any(|a| a == "--no-scale"),
            scale_enrollments: env_parse("BENCH_SCALE_ENROLLMENTS", 1_000)?,
            scale_force: env_parse::<u8>("BENCH_SCALE_FORCE", 0)? != 0,
            scale_pool: env_parse("BENCH_SCALE_POOL", 0)?,
            scale_pooled_enrollments: env_parse("BENCH_SCALE_POOLED_ENROLLMENTS", 10_000)?,
            scale_pooled_pool: env_parse("BENCH_SCALE_POOLED_POOL", 8)?,
            scale_pooled_links: env_parse("BENCH_SCALE_POOLED_LINKS", 64)?,
            clk_tck: env_parse("BENCH_CLK_TCK", 100)?,
            bin,
            amqp_url: std::env::var("BENCH_AMQP_URL")
                .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672".into()),
            management_url: std::env::var("BENCH_MANAGEMENT_URL")
                .unwrap_or_else(|_| "http://127.0.0.1:15672".into()),
            run_id: run_id.clone(),
            only: std::env::var("BENCH_ONLY")
                .unwrap_or_default()
                .split(',')
                .map(|w| w.trim().to_ascii_lowercase())
                .filter(|w| !w.is_empty())
                .collect(),
            log_dir: root.join("target/bench-logs").join(&run_id),
            cases: std::env::var("BENCH_CASES")
                .unwrap_or_default()
                .split(',')
                .map(|w| w.trim().to_string())
                .filter(|w| !w.is_empty())
                .collect(),
            rounds: env_parse("BENCH_ROUNDS", 3)?,
            beside: env_parse::<u8>("BENCH_BESIDE", 1)? != 0,
            target_thread: if env_parse::<u8>("BENCH_TARGET_THREAD", 1)? != 0 {
                Some(Arc::new(TargetThread::start()?))
            } else {
                None
            },
        };
        if let Some(unknown) = s.only.iter().find(|w| !SCENARIOS.contains(&w.as_str())) {
            bail!(
                "BENCH_ONLY: unknown scenario `{unknown}`; known: {}",
                SCENARIOS.join(", ")
            );
        }
        ensure!(s.messages >= 10, "BENCH_MESSAGES must be at least 10");
        ensure!((1..=20).contains(&s.rounds), "BENCH_ROUNDS must be 1..20");
        ensure!(
            (1..=10_000).contains(&s.prefetch),
            "BENCH_PREFETCH must be 1..10000"
        );
        ensure!(
            s.latency_rate > 0 && s.latency_secs > 0,
            "BENCH_LATENCY_RATE and BENCH_LATENCY_SECS must be > 0"
        );
        ensure!(s.clk_tck > 0, "BENCH_CLK_TCK must be > 0");
        ensure!(
            s.scale_enrollments > 0,
            "BENCH_SCALE_ENROLLMENTS must be > 0"
        );
        Ok(s)
    }

    pub fn wants(&self, scenario: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|w| w == scenario)
    }

    /// Whether a throughput row runs: all of them unless `BENCH_CASES` lists some labels.
    pub fn wants_case(&self, label: &str) -> bool {
        self.cases.is_empty() || self.cases.iter().any(|c| c == label)
    }

    /// This run's name for a queue: `bench-<run>-<name>`.
    pub fn queue(&self, name: &str) -> String {
        format!("bench-{}-{name}", self.run_id)
    }

    /// The body of `POST /enroll` for `queue` (a queue name) and `target_url`, with this run's
    /// prefetch.
    pub fn enrollment(&self, queue: &str, target_url: &str, max_in_flight: u32) -> Json {
        json!({
            "queue": address(queue),
            "target_url": target_url,
            "subscription_args": {"prefetch": self.prefetch},
            "delivery": {"max_in_flight": max_in_flight},
        })
    }

    /// The runtime that serves the HTTP targets (see [`TargetThread`]).
    pub fn target_runtime(&self) -> Handle {
        self.target_thread
            .as_ref()
            .map_or_else(Handle::current, |t| t.handle())
    }

    /// CPU seconds in `ticks` clock ticks of /proc/PID/stat.
    pub fn cpu_secs(&self, ticks: u64) -> f64 {
        ticks as f64 / self.clk_tck as f64
    }
}
