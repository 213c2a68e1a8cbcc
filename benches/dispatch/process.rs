//! One daemon per scenario as a child process (through the test kit), what the benchmark reads
//! about it (CPU, memory, warnings in its log), and waiting for the target to count a goal.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use hot_potato_testkit::api::Api;
use hot_potato_testkit::daemon::{self, DaemonProcess};
use hot_potato_testkit::target::Target;
use serde_json::Value as Json;

use crate::procstat;
use crate::settings::Settings;

/// Throughput scenarios fail when the count does not move for this long.
const STALL_LIMIT: Duration = Duration::from_secs(30);
const HEALTH_LIMIT: Duration = Duration::from_secs(20);
pub const ACTIVE_LIMIT: Duration = Duration::from_secs(30);
const STOP_LIMIT: Duration = Duration::from_secs(20);

pub struct Daemon {
    process: DaemonProcess,
    pid: String,
    pub api: Api,
    log: PathBuf,
    /// The scenario's name for it, also its log file's.
    pub name: String,
    /// Its working directory and SQLite file, removed on drop.
    _dir: tempfile::TempDir,
}

impl Daemon {
    pub async fn start(s: &Settings, name: &str) -> Result<Self> {
        Self::start_with(s, name, &[]).await
    }

    /// Starts with extra daemon variables, a cleared environment otherwise, its own SQLite
    /// file and a free API port; waits until `/health` answers.
    pub async fn start_with(s: &Settings, name: &str, extra: &[(&str, String)]) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("hot-potato-bench-")
            .tempdir()?;
        let port = daemon::free_port()?;
        std::fs::create_dir_all(&s.log_dir)
            .with_context(|| format!("cannot create {}", s.log_dir.display()))?;
        let log = s.log_dir.join(format!("{name}.log"));
        let mut env = daemon::base_env(&s.amqp_url, &dir.path().join("hotpotato.sqlite"), port);
        let path = std::env::var_os("PATH").unwrap_or_default();
        env.extend(
            [
                ("PATH", path.to_string_lossy().into_owned()),
                ("LOG_LEVEL", "warn".into()),
                // One JSON object per line, so the warnings can be grouped in the report.
                ("LOG_FORMAT", "json".into()),
                // The scale scenario enrolls far more than the default 120 changes a minute
                // that one client may make; 0 turns that limit off.
                ("API_RATE_LIMIT_PER_MIN", "0".into()),
                // Only shortens stopping (the isolation scenario holds POSTs that never end).
                ("SHUTDOWN_GRACE_MS", "2000".into()),
            ]
            .map(|(k, v)| (k.to_string(), v)),
        );
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
        // `BENCH_DAEMON_X=v` runs every daemon with `X=v`.
        env.extend(
            std::env::vars()
                .filter_map(|(k, v)| k.strip_prefix("BENCH_DAEMON_").map(|k| (k.to_owned(), v))),
        );
        // Run in the temp dir: no .env from the repository (the daemon searches upwards).
        let process = daemon::spawn(&s.bin, &env, dir.path(), Some(&log))?;
        let mut daemon = Self {
            pid: process.id().to_string(),
            process,
            api: Api::new(&format!("http://127.0.0.1:{port}"))?,
            log,
            name: name.to_string(),
            _dir: dir,
        };
        if let Err(e) = daemon.api.wait_healthy(HEALTH_LIMIT).await {
            daemon.check_alive()?;
            return Err(e.context(daemon.log_tail()));
        }
        Ok(daemon)
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n    ");
        format!("daemon log ({}):\n    {tail}", self.log.display())
    }

    /// Warnings and errors the daemon logged (LOG_LEVEL=warn), grouped by level and message:
    /// (level message, count, first full line).
    pub fn log_groups(&self) -> Vec<(String, usize, String)> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut groups: Vec<(String, usize, String)> = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let key = match serde_json::from_str::<Json>(line) {
                Ok(v) => format!(
                    "{} {}",
                    v["level"].as_str().unwrap_or("?"),
                    v["message"]
                        .as_str()
                        .or_else(|| v["fields"]["message"].as_str())
                        .unwrap_or("?")
                ),
                Err(_) => line.chars().take(160).collect(),
            };
            match groups.iter_mut().find(|g| g.0 == key) {
                Some(g) => g.1 += 1,
                None => groups.push((key, 1, line.chars().take(600).collect())),
            }
        }
        groups
    }

    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.process.try_wait()? {
            bail!("the daemon exited ({status}); {}", self.log_tail());
        }
        Ok(())
    }

    pub fn usage(&self) -> Result<procstat::Usage> {
        procstat::Usage::of(&self.pid)
    }

    pub fn cpu_ticks(&self) -> Result<u64> {
        procstat::cpu_ticks(&self.pid)
    }

    pub fn peak_rss_kb(&self) -> Result<u64> {
        procstat::status_kb(&self.pid, "VmHWM")
    }

    pub fn rss_kb(&self) -> Result<u64> {
        procstat::status_kb(&self.pid, "VmRSS")
    }

    pub async fn wait_active(&self, id: &str) -> Result<()> {
        self.api.wait_state(id, "active", ACTIVE_LIMIT).await?;
        Ok(())
    }

    /// SIGTERM, then SIGKILL when it has not exited within `STOP_LIMIT`.
    pub async fn stop(mut self) -> Result<()> {
        if self.process.try_wait()?.is_some() {
            bail!(
                "the daemon had exited before it was stopped; {}",
                self.log_tail()
            );
        }
        self.process.signal("TERM")?;
        match self.process.wait_exit(STOP_LIMIT).await? {
            Some(status) => {
                ensure!(
                    status.success(),
                    "the daemon exited with {status} on SIGTERM"
                );
                Ok(())
            }
            None => {
                let _ = self.process.kill();
                bail!("the daemon did not stop within {STOP_LIMIT:?} of SIGTERM; killed it")
            }
        }
    }
}

/// Waits until `target` has seen `goal` requests (see `Target::reset`), failing when the count
/// stalls for `STALL_LIMIT`, when `limit` passes, or when the daemon dies.
pub async fn wait_goal(
    daemon: &mut Daemon,
    target: &Target,
    goal: u64,
    limit: Duration,
) -> Result<Instant> {
    let started = Instant::now();
    let mut last = (0, Instant::now());
    loop {
        if let Some(at) = target.reached() {
            return Ok(at);
        }
        daemon.check_alive()?;
        let count = target.count();
        if count != last.0 {
            last = (count, Instant::now());
        }
        if last.1.elapsed() > STALL_LIMIT {
            bail!(
                "no POST arrived for {STALL_LIMIT:?}: the target counted {count} of {goal}; {}",
                daemon.log_tail()
            );
        }
        if started.elapsed() > limit {
            bail!(
                "timed out after {limit:?}: the target counted {count} of {goal}; {}",
                daemon.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A generous bound for draining `n` messages: two minutes plus 5 ms per message.
pub fn drain_limit(n: u64) -> Duration {
    Duration::from_secs(120) + Duration::from_millis(5 * n)
}
