//! Dispatch benchmark: hot-potato against the real local RabbitMQ, compared with a bare
//! fe2o3-amqp receiver draining the same kind of queue.
//!
//! Run it with `scripts/bench.sh` (broker check, release build of the daemon, then
//! `cargo bench --bench dispatch`). Under `cargo test --all-targets` the binary is started
//! without `--bench` and exits at once.
//!
//! The daemon runs as a child process (`target/release/hot-potato`, or `HOT_POTATO_BIN`), one
//! fresh process per scenario, with a cleared environment, its own SQLite file and a free
//! API port. The HTTP target (axum, answers 200 at once), the publisher and the broker run on
//! the same machine.
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
//!   reports fewer free sockets than it needs.
//! - `BENCH_ONLY`: a comma-separated subset of `ceiling`, `throughput` (runs the ceiling too),
//!   `isolation`, `latency`, `scale`.
//! - `BENCH_DAEMON_<NAME>=<value>`: every daemon runs with `<NAME>=<value>`, e.g.
//!   `BENCH_DAEMON_TOKIO_WORKER_THREADS=1`.
//! - `BENCH_CLK_TCK` (100): clock ticks per second of /proc/PID/stat (`getconf CLK_TCK`).
//! - `BENCH_AMQP_URL` (amqp://guest:guest@127.0.0.1:5672), `BENCH_MANAGEMENT_URL`
//!   (http://127.0.0.1:15672, user guest/guest).
//!
//! Queues are named `bench-<run>-...` and deleted at the end, also after a failure or Ctrl-C.
//! The daemons run with `LOG_LEVEL=warn` and `LOG_FORMAT=json`; their logs are kept in
//! `target/bench-logs/<run>/` and their warnings summarised under the results.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use fe2o3_amqp::link::SendError;
use fe2o3_amqp::link::delivery::DeliveryFut;
use fe2o3_amqp::link::receiver::CreditMode;
use fe2o3_amqp::types::messaging::{Body, Message, Outcome};
use fe2o3_amqp::types::primitives::{Binary, Value};
use fe2o3_amqp::{Connection, Receiver, Sender, Session};
use serde_json::{Value as Json, json};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

const BODY_LEN: usize = 256;
/// Unsettled messages a preloading publisher keeps outstanding.
const PUBLISH_WINDOW: usize = 500;
/// Throughput scenarios fail when the count does not move for this long.
const STALL_LIMIT: Duration = Duration::from_secs(30);
/// The management API refreshes queue figures every 5 s by default.
const DEPTH_LIMIT: Duration = Duration::from_secs(60);
const HEALTH_LIMIT: Duration = Duration::from_secs(20);
const ACTIVE_LIMIT: Duration = Duration::from_secs(30);
const STOP_LIMIT: Duration = Duration::from_secs(20);
/// How long one AMQP close step (link, session, connection) may wait for the broker.
const CLOSE_LIMIT: Duration = Duration::from_secs(5);
/// Broker sockets left for everybody else when the scale scenario checks the broker's room.
const SOCKET_MARGIN: u64 = 40;
/// Publisher connections of the scale scenario.
const SCALE_PUBLISHERS: usize = 4;
const SCALE_MESSAGES_PER_QUEUE: u64 = 20;
/// Parallel management/API calls when declaring, deleting or enrolling many queues.
const PARALLEL_CALLS: usize = 16;
/// Names `BENCH_ONLY` understands.
const SCENARIOS: [&str; 5] = ["throughput", "isolation", "latency", "scale", "ceiling"];

// ---------------------------------------------------------------------------------------------
// Settings

#[derive(Clone)]
struct Settings {
    messages: u64,
    prefetch: u32,
    latency_rate: u64,
    latency_secs: u64,
    scale: bool,
    scale_enrollments: usize,
    scale_force: bool,
    /// `AMQP_CONNECTION_POOL` of the scale scenario's daemon; 0 leaves the daemon's default.
    scale_pool: usize,
    clk_tck: u64,
    bin: PathBuf,
    amqp_url: String,
    management_url: String,
    run_id: String,
    /// Scenarios to run (`BENCH_ONLY`), all when empty.
    only: Vec<String>,
    /// Where the daemons' logs are kept.
    log_dir: PathBuf,
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
    fn from_env(args: &[String]) -> Result<Self> {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let bin = std::env::var_os("HOT_POTATO_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target/release/hot-potato"));
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
        };
        if let Some(unknown) = s.only.iter().find(|w| !SCENARIOS.contains(&w.as_str())) {
            bail!(
                "BENCH_ONLY: unknown scenario `{unknown}`; known: {}",
                SCENARIOS.join(", ")
            );
        }
        ensure!(s.messages >= 10, "BENCH_MESSAGES must be at least 10");
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

    fn wants(&self, scenario: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|w| w == scenario)
    }

    fn queue(&self, name: &str) -> String {
        format!("bench-{}-{name}", self.run_id)
    }
}

// ---------------------------------------------------------------------------------------------
// Small helpers

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn address(queue: &str) -> String {
    format!("/amq/queue/{queue}")
}

fn body_256() -> Vec<u8> {
    (0..BODY_LEN).map(|i| b'a' + (i % 26) as u8).collect()
}

/// Polls `check` every `every` until it yields `Some`, or fails naming `what` after `limit`.
async fn wait_for<T, F, Fut>(
    what: &str,
    limit: Duration,
    every: Duration,
    mut check: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + limit;
    let mut last_error = None;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_error = Some(e),
        }
        if Instant::now() >= deadline {
            let detail = last_error
                .map(|e| format!(" (last error: {e:#})"))
                .unwrap_or_default();
            bail!("timed out after {limit:?} waiting for {what}{detail}");
        }
        tokio::time::sleep(every).await;
    }
}

/// Runs `f` on every item, at most `limit` at once; the first error wins.
async fn for_each_parallel<T, R, F, Fut>(items: Vec<T>, limit: usize, f: F) -> Result<Vec<R>>
where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(T) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<R>> + Send + 'static,
{
    let semaphore = Arc::new(Semaphore::new(limit));
    let mut set = JoinSet::new();
    for item in items {
        let semaphore = Arc::clone(&semaphore);
        let f = f.clone();
        set.spawn(async move {
            let _permit = semaphore.acquire_owned().await?;
            f(item).await
        });
    }
    let mut out = Vec::new();
    while let Some(joined) = set.join_next().await {
        out.push(joined.context("a parallel task panicked")??);
    }
    Ok(out)
}

fn read_proc(path: &str) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: &str) -> Result<u64> {
    let stat = read_proc(&format!("/proc/{pid}/stat"))?;
    // The command name is in parentheses and may contain spaces: fields restart after ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("unexpected /proc/{pid}/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is fields[0]; utime is field 14, stime field 15.
    let utime: u64 = fields
        .get(11)
        .and_then(|v| v.parse().ok())
        .context("utime")?;
    let stime: u64 = fields
        .get(12)
        .and_then(|v| v.parse().ok())
        .context("stime")?;
    Ok(utime + stime)
}

/// A `kB` line of /proc/PID/status (VmHWM, VmRSS), in kB.
fn status_kb(pid: &str, field: &str) -> Result<u64> {
    let status = read_proc(&format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow!("no {field} in /proc/{pid}/status"))
}

fn mib(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// The RabbitMQ node's process, to show its CPU beside the daemon's.
fn broker_pid() -> Option<String> {
    let entries = std::fs::read_dir("/proc").ok()?;
    entries.flatten().find_map(|e| {
        let pid = e.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == "beam.smp").then_some(pid)
    })
}

// ---------------------------------------------------------------------------------------------
// RabbitMQ management API

#[derive(Clone)]
struct Management {
    http: reqwest::Client,
    base: String,
    /// Every queue this run declared, deleted at the end.
    declared: Arc<Mutex<Vec<String>>>,
}

impl Management {
    fn new(base: &str) -> Result<Self> {
        Ok(Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?,
            base: base.trim_end_matches('/').to_string(),
            declared: Arc::default(),
        })
    }

    async fn get(&self, path: &str) -> Result<Json> {
        let res = self
            .http
            .get(format!("{}{path}", self.base))
            .basic_auth("guest", Some("guest"))
            .send()
            .await
            .with_context(|| format!("management API GET {path}"))?;
        let status = res.status();
        ensure!(status.is_success(), "management API GET {path}: {status}");
        Ok(res.json().await?)
    }

    async fn declare(&self, name: &str, quorum: bool) -> Result<()> {
        let body = if quorum {
            json!({"durable": true, "arguments": {"x-queue-type": "quorum"}})
        } else {
            json!({"durable": true})
        };
        self.declared.lock().expect("lock").push(name.to_string());
        let res = self
            .http
            .put(format!("{}/api/queues/%2F/{name}", self.base))
            .basic_auth("guest", Some("guest"))
            .json(&body)
            .send()
            .await
            .with_context(|| format!("declaring {name} through the management API"))?;
        let status = res.status();
        ensure!(status.is_success(), "declaring {name}: {status}");
        Ok(())
    }

    async fn delete(&self, name: &str) -> Result<()> {
        let res = self
            .http
            .delete(format!("{}/api/queues/%2F/{name}", self.base))
            .basic_auth("guest", Some("guest"))
            .send()
            .await?;
        let status = res.status();
        ensure!(
            status.is_success() || status == reqwest::StatusCode::NOT_FOUND,
            "deleting {name}: {status}"
        );
        Ok(())
    }

    async fn delete_many(&self, names: Vec<String>) -> Result<()> {
        let this = self.clone();
        for_each_parallel(names.clone(), PARALLEL_CALLS, move |name| {
            let this = this.clone();
            async move { this.delete(&name).await }
        })
        .await?;
        self.declared
            .lock()
            .expect("lock")
            .retain(|n| !names.contains(n));
        Ok(())
    }

    /// Deletes every queue this run declared.
    async fn cleanup(&self) -> Result<usize> {
        let names = self.declared.lock().expect("lock").clone();
        let n = names.len();
        self.delete_many(names).await?;
        Ok(n)
    }

    /// Ready plus unacknowledged messages, once the management API has a figure.
    async fn depth(&self, name: &str) -> Result<Option<u64>> {
        let q = self
            .get(&format!("/api/queues/%2F/{name}?columns=messages"))
            .await?;
        Ok(q.get("messages").and_then(Json::as_u64))
    }

    async fn wait_depth(&self, name: &str, n: u64) -> Result<()> {
        wait_for(
            &format!("the management API to show {n} messages in {name}"),
            DEPTH_LIMIT,
            Duration::from_millis(500),
            || async { Ok((self.depth(name).await? == Some(n)).then_some(())) },
        )
        .await
    }

    async fn wait_depths(&self, names: &[String], n: u64) -> Result<()> {
        let mut set = JoinSet::new();
        for name in names {
            let (this, name) = (self.clone(), name.clone());
            set.spawn(async move { this.wait_depth(&name, n).await });
        }
        while let Some(r) = set.join_next().await {
            r??;
        }
        Ok(())
    }

    /// Waits until every queue whose name starts with `prefix` is empty (one list call per poll).
    async fn wait_all_empty(&self, prefix: &str, expected: usize) -> Result<()> {
        wait_for(
            &format!("the {expected} {prefix}* queues to be empty"),
            DEPTH_LIMIT,
            Duration::from_secs(1),
            || async {
                let list = self.get("/api/queues/%2F?columns=name,messages").await?;
                let ours: Vec<&Json> = list
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter(|q| q["name"].as_str().is_some_and(|n| n.starts_with(prefix)))
                            .collect()
                    })
                    .unwrap_or_default();
                let empty = ours
                    .iter()
                    .filter(|q| q["messages"].as_u64() == Some(0))
                    .count();
                Ok((ours.len() == expected && empty == expected).then_some(()))
            },
        )
        .await
    }
}

// ---------------------------------------------------------------------------------------------
// AMQP publisher

struct Publisher {
    connection: fe2o3_amqp::connection::ConnectionHandle<()>,
    session: fe2o3_amqp::session::SessionHandle<()>,
    senders: Vec<Sender>,
}

type Confirm = DeliveryFut<Result<Outcome, SendError>>;

async fn confirmed(fut: Confirm) -> Result<()> {
    let outcome = fut.await.context("no outcome from the broker")?;
    outcome
        .accepted_or("not accepted")
        .map_err(|e| anyhow!("the broker did not accept a message: {e:?}"))?;
    Ok(())
}

impl Publisher {
    /// One connection and session with a sender per queue.
    async fn connect(url: &str, queues: &[String]) -> Result<Self> {
        let mut connection =
            Connection::open(format!("bench-publisher-{}", uuid::Uuid::new_v4()), url)
                .await
                .context("cannot connect the publisher to the broker")?;
        let mut session = Session::begin(&mut connection).await?;
        let mut senders = Vec::with_capacity(queues.len());
        for (i, queue) in queues.iter().enumerate() {
            let sender = Sender::attach(&mut session, format!("bench-sender-{i}"), address(queue))
                .await
                .with_context(|| format!("attaching a sender to {queue}"))?;
            senders.push(sender);
        }
        Ok(Self {
            connection,
            session,
            senders,
        })
    }

    /// Sends `per_queue` Data messages of 256 bytes to each queue, unsettled, with at most
    /// `PUBLISH_WINDOW` outcomes outstanding.
    async fn send_data(&mut self, per_queue: u64) -> Result<()> {
        let body = body_256();
        let mut pending: VecDeque<Confirm> = VecDeque::with_capacity(PUBLISH_WINDOW);
        for sender in &mut self.senders {
            for _ in 0..per_queue {
                let message = Message::builder().data(Binary::from(body.clone())).build();
                pending.push_back(sender.send_batchable(message).await?);
                if pending.len() >= PUBLISH_WINDOW
                    && let Some(fut) = pending.pop_front()
                {
                    confirmed(fut).await?;
                }
            }
        }
        for fut in pending {
            confirmed(fut).await?;
        }
        Ok(())
    }

    /// Each step bounded: fe2o3 0.18 now and then never sees RabbitMQ 3.10's answer to an
    /// End, and closing the connection ends it all.
    async fn close(mut self) {
        for s in self.senders.drain(..) {
            let _ = tokio::time::timeout(CLOSE_LIMIT, s.close()).await;
        }
        let _ = tokio::time::timeout(CLOSE_LIMIT, self.session.end()).await;
        let _ = tokio::time::timeout(CLOSE_LIMIT, self.connection.close()).await;
    }
}

/// Fills each queue with `n` messages, one publisher per queue, all at once.
async fn preload(s: &Settings, queues: &[String], n: u64) -> Result<()> {
    let started = Instant::now();
    let mut set = JoinSet::new();
    for queue in queues {
        let (url, queue) = (s.amqp_url.clone(), queue.clone());
        set.spawn(async move {
            let mut p = Publisher::connect(&url, std::slice::from_ref(&queue)).await?;
            p.send_data(n).await?;
            p.close().await;
            anyhow::Ok(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    let total = n * queues.len() as u64;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "  preloaded {total} messages into {} queue(s) in {secs:.1} s ({:.0} msg/s)",
        queues.len(),
        total as f64 / secs
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// HTTP targets

#[derive(Default)]
struct TargetState {
    count: AtomicU64,
    /// When `count` reached `goal`.
    goal: AtomicU64,
    reached: Mutex<Option<Instant>>,
    /// Publish-to-POST latencies in ns, when the bodies carry a publish time.
    latencies: Option<Mutex<Vec<u64>>>,
}

/// The fast target: answers 200 at once and counts.
struct Target {
    state: Arc<TargetState>,
    url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Target {
    async fn start(record_latency: bool) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/hook", listener.local_addr()?);
        let state = Arc::new(TargetState {
            latencies: record_latency.then(Mutex::default),
            ..TargetState::default()
        });
        let app = Router::new().fallback(hook).with_state(Arc::clone(&state));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { state, url, task })
    }

    fn count(&self) -> u64 {
        self.state.count.load(Ordering::SeqCst)
    }

    /// Counts from 0 again and notes when `goal` requests have arrived.
    fn reset(&self, goal: u64) {
        self.state.goal.store(goal, Ordering::SeqCst);
        *self.state.reached.lock().expect("lock") = None;
        self.state.count.store(0, Ordering::SeqCst);
    }

    fn reached(&self) -> Option<Instant> {
        *self.state.reached.lock().expect("lock")
    }

    fn latencies(&self) -> Vec<u64> {
        self.state
            .latencies
            .as_ref()
            .map(|l| l.lock().expect("lock").clone())
            .unwrap_or_default()
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn hook(State(state): State<Arc<TargetState>>, body: Bytes) -> StatusCode {
    if let Some(latencies) = &state.latencies {
        let sent = std::str::from_utf8(&body)
            .ok()
            .and_then(|t| t.trim().parse::<u128>().ok());
        if let Some(sent) = sent {
            let ns = now_nanos().saturating_sub(sent);
            latencies
                .lock()
                .expect("lock")
                .push(u64::try_from(ns).unwrap_or(u64::MAX));
        }
    }
    let n = state.count.fetch_add(1, Ordering::SeqCst) + 1;
    if n == state.goal.load(Ordering::SeqCst) {
        *state.reached.lock().expect("lock") = Some(Instant::now());
    }
    StatusCode::OK
}

/// A target that accepts TCP connections and never answers.
struct HangingTarget {
    url: String,
    task: tokio::task::JoinHandle<()>,
}

impl HangingTarget {
    async fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/hook", listener.local_addr()?);
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        Ok(Self { url, task })
    }
}

impl Drop for HangingTarget {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// The daemon as a child process

struct Daemon {
    child: Child,
    pid: String,
    base: String,
    http: reqwest::Client,
    log: PathBuf,
    name: String,
    _dir: tempfile::TempDir,
}

impl Daemon {
    async fn start(s: &Settings, name: &str) -> Result<Self> {
        Self::start_with(s, name, &[]).await
    }

    /// Starts with extra daemon variables.
    async fn start_with(s: &Settings, name: &str, extra: &[(&str, String)]) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("hot-potato-bench-")
            .tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        std::fs::create_dir_all(&s.log_dir)
            .with_context(|| format!("cannot create {}", s.log_dir.display()))?;
        let log = s.log_dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log)?;
        let err = out.try_clone()?;
        let mut cmd = Command::new(&s.bin);
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("AMQP_URL", &s.amqp_url)
            .env("HTTP_HOST", "127.0.0.1")
            .env("HTTP_PORT", port.to_string())
            .env("SQLITE_BACKUP_PATH", dir.path().join("hotpotato.sqlite"))
            .env("LOG_LEVEL", "warn")
            // One JSON object per line, so the warnings can be grouped in the report.
            .env("LOG_FORMAT", "json")
            // The scale scenario enrolls far more than the default 120 changes a minute that
            // one client may make; 0 turns that limit off (older daemons ignore the variable).
            .env("API_RATE_LIMIT_PER_MIN", "0")
            // Only shortens stopping (the isolation scenario holds POSTs that never end).
            .env("SHUTDOWN_GRACE_MS", "2000")
            // No .env from the repository: the daemon searches the working directory upwards.
            .envs(extra.iter().map(|(k, v)| (*k, v.as_str())))
            // `BENCH_DAEMON_X=v` runs every daemon with `X=v`.
            .envs(
                std::env::vars().filter_map(|(k, v)| {
                    k.strip_prefix("BENCH_DAEMON_").map(|k| (k.to_owned(), v))
                }),
            )
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", s.bin.display()))?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow!("the daemon exited at once"))?
            .to_string();
        let mut daemon = Self {
            child,
            pid,
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?,
            log,
            name: name.to_string(),
            _dir: dir,
        };
        let health = format!("{}/health", daemon.base);
        let http = daemon.http.clone();
        let waited = wait_for(
            "the daemon's /health to answer",
            HEALTH_LIMIT,
            Duration::from_millis(50),
            || async {
                Ok(http
                    .get(&health)
                    .send()
                    .await
                    .ok()
                    .filter(|r| r.status().is_success()))
            },
        )
        .await;
        if let Err(e) = waited {
            daemon.check_alive()?;
            return Err(e.context(daemon.log_tail()));
        }
        Ok(daemon)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n    ");
        format!("daemon log ({}):\n    {tail}", self.log.display())
    }

    /// Warnings and errors the daemon logged (LOG_LEVEL=warn), grouped by level and message:
    /// (level message, count, first full line).
    fn log_groups(&self) -> Vec<(String, usize, String)> {
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

    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("the daemon exited ({status}); {}", self.log_tail());
        }
        Ok(())
    }

    fn cpu_ticks(&self) -> Result<u64> {
        cpu_ticks(&self.pid)
    }

    fn peak_rss_kb(&self) -> Result<u64> {
        status_kb(&self.pid, "VmHWM")
    }

    fn rss_kb(&self) -> Result<u64> {
        status_kb(&self.pid, "VmRSS")
    }

    async fn enroll(&self, body: Json) -> Result<String> {
        let res = self
            .http
            .post(format!("{}/enroll", self.base))
            .json(&body)
            .send()
            .await
            .context("POST /enroll")?;
        let status = res.status();
        let answer: Json = res.json().await.unwrap_or(Json::Null);
        ensure!(
            status.as_u16() == 201,
            "POST /enroll answered {status}: {answer}"
        );
        answer["id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("no id in {answer}"))
    }

    /// GETs a daemon API path and parses the JSON answer, which must be a success.
    async fn get_json(&self, path: &str) -> Result<Json> {
        let res = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .with_context(|| format!("GET {path}"))?;
        ensure!(res.status().is_success(), "GET {path}: {}", res.status());
        Ok(res.json().await?)
    }

    async fn enrollments(&self) -> Result<Vec<Json>> {
        let list = self.get_json("/enrollments").await?;
        list.as_array()
            .cloned()
            .ok_or_else(|| anyhow!("GET /enrollments did not answer an array"))
    }

    async fn enrollment(&self, id: &str) -> Result<Json> {
        self.get_json(&format!("/enrollments/{id}")).await
    }

    async fn wait_active(&self, id: &str) -> Result<()> {
        wait_for(
            &format!("enrollment {id} to be active"),
            ACTIVE_LIMIT,
            Duration::from_millis(20),
            || async { Ok((self.enrollment(id).await?["state"] == "active").then_some(())) },
        )
        .await
    }

    /// SIGTERM, then SIGKILL when it has not exited within `STOP_LIMIT`.
    async fn stop(mut self) -> Result<()> {
        if self.child.try_wait()?.is_some() {
            bail!(
                "the daemon had exited before it was stopped; {}",
                self.log_tail()
            );
        }
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid])
            .status();
        match tokio::time::timeout(STOP_LIMIT, self.child.wait()).await {
            Ok(status) => {
                let status = status?;
                ensure!(
                    status.success(),
                    "the daemon exited with {status} on SIGTERM"
                );
                Ok(())
            }
            Err(_) => {
                let _ = self.child.kill().await;
                bail!("the daemon did not stop within {STOP_LIMIT:?} of SIGTERM; killed it")
            }
        }
    }
}

/// Waits until `target` has seen `goal` requests (see `Target::reset`), failing when the count
/// stalls for `STALL_LIMIT`, when `limit` passes, or when the daemon dies.
async fn wait_goal(
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
fn drain_limit(n: u64) -> Duration {
    Duration::from_secs(120) + Duration::from_millis(5 * n)
}

// ---------------------------------------------------------------------------------------------
// Results

struct Row {
    name: String,
    rate: f64,
    /// Daemon (or, for the ceiling, receiver) CPU seconds per 10,000 messages.
    cpu_per_10k: Option<f64>,
    peak_rss_mib: Option<f64>,
}

#[derive(Default)]
struct Report {
    ceiling: Option<f64>,
    rows: Vec<Row>,
    lines: Vec<String>,
    notes: Vec<String>,
    failures: Vec<String>,
    /// Daemon warnings by level and message: where (scenario ×count) and the first line.
    logged: BTreeMap<String, (Vec<String>, String)>,
}

/// What one daemon scenario measured.
struct Measured {
    rate: f64,
    cpu_per_10k: f64,
    peak_rss_mib: f64,
}

// ---------------------------------------------------------------------------------------------
// Scenarios

/// A connection like hot-potato opens its own: TCP_NODELAY on (fe2o3 leaves Nagle on), SASL
/// PLAIN from the URL.
async fn open_nodelay(
    url: &str,
    container_id: &str,
) -> Result<fe2o3_amqp::connection::ConnectionHandle<()>> {
    let url = url::Url::parse(url)?;
    let host = url.host_str().context("no host in the AMQP URL")?;
    let stream = tokio::net::TcpStream::connect((host, url.port().unwrap_or(5672))).await?;
    stream.set_nodelay(true)?;
    let mut builder = Connection::builder()
        .container_id(container_id.to_string())
        .scheme(url.scheme())
        .hostname(host)
        .domain(url.domain());
    if !url.username().is_empty() {
        builder = builder.sasl_profile(fe2o3_amqp::sasl_profile::SaslProfile::Plain {
            username: url.username().to_string(),
            password: url.password().unwrap_or("").to_string(),
        });
    }
    Ok(builder.open_with_stream(stream).await?)
}

/// The bare receiver: `recv` + `accept` per message, credit `BENCH_PREFETCH`. `nodelay`
/// opens the connection as hot-potato does instead of with `Connection::open`.
async fn ceiling(s: &Settings, mgmt: &Management, nodelay: bool) -> Result<(f64, f64)> {
    let queue = s.queue(if nodelay {
        "ceiling-nodelay"
    } else {
        "ceiling"
    });
    mgmt.declare(&queue, true).await?;
    preload(s, std::slice::from_ref(&queue), s.messages).await?;
    mgmt.wait_depth(&queue, s.messages).await?;

    let ticks0 = cpu_ticks("self")?;
    let started = Instant::now();
    let drained = tokio::time::timeout(drain_limit(s.messages), async {
        let container_id = format!("bench-ceiling-{}", s.run_id);
        let mut connection = if nodelay {
            open_nodelay(&s.amqp_url, &container_id).await?
        } else {
            Connection::open(container_id, s.amqp_url.as_str()).await?
        };
        let mut session = Session::begin(&mut connection).await?;
        let mut receiver = Receiver::builder()
            .name("bench-ceiling")
            .source(address(&queue))
            .credit_mode(CreditMode::Auto(s.prefetch))
            .auto_accept(false)
            .attach(&mut session)
            .await?;
        for _ in 0..s.messages {
            let delivery = receiver.recv::<Body<Value>>().await?;
            receiver.accept(&delivery).await?;
        }
        let elapsed = started.elapsed();
        let _ = tokio::time::timeout(CLOSE_LIMIT, receiver.close()).await;
        let _ = tokio::time::timeout(CLOSE_LIMIT, session.end()).await;
        let _ = tokio::time::timeout(CLOSE_LIMIT, connection.close()).await;
        anyhow::Ok(elapsed)
    })
    .await
    .map_err(|_| {
        anyhow!(
            "the bare receiver did not drain {queue} within {:?}",
            drain_limit(s.messages)
        )
    })??;
    let cpu = (cpu_ticks("self")? - ticks0) as f64 / s.clk_tck as f64;
    mgmt.wait_depth(&queue, 0).await?;
    mgmt.delete_many(vec![queue]).await?;
    let rate = s.messages as f64 / drained.as_secs_f64();
    Ok((rate, cpu / s.messages as f64 * 10_000.0))
}

/// `queues` enrollments with one `max_in_flight`, each on its own queue of `N` messages.
async fn throughput(
    s: &Settings,
    mgmt: &Management,
    report: &mut Report,
    label: &str,
    queues: usize,
    max_in_flight: u32,
) -> Result<Measured> {
    let names: Vec<String> = (0..queues)
        .map(|i| s.queue(&format!("{label}-{i}")))
        .collect();
    for name in &names {
        mgmt.declare(name, true).await?;
    }
    preload(s, &names, s.messages).await?;
    mgmt.wait_depths(&names, s.messages).await?;
    let target = Target::start(false).await?;
    let total = s.messages * queues as u64;
    target.reset(total);
    let mut daemon = Daemon::start(s, label).await?;
    let broker = broker_pid();
    let broker0 = broker.as_deref().and_then(|p| cpu_ticks(p).ok());

    let ticks0 = daemon.cpu_ticks()?;
    let started = Instant::now();
    for name in &names {
        daemon
            .enroll(json!({
                "queue": address(name),
                "target_url": target.url,
                "subscription_args": {"prefetch": s.prefetch},
                "delivery": {"max_in_flight": max_in_flight},
            }))
            .await?;
    }
    let done = wait_goal(&mut daemon, &target, total, drain_limit(total)).await?;
    let ticks1 = daemon.cpu_ticks()?;
    let broker1 = broker.as_deref().and_then(|p| cpu_ticks(p).ok());
    let elapsed = done.duration_since(started).as_secs_f64();
    let peak = daemon.peak_rss_kb()?;
    mgmt.wait_depths(&names, 0).await?;

    let views = daemon.enrollments().await?;
    let sum = |field: &str| {
        views
            .iter()
            .map(|v| v[field].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    let (delivered, failed, retries) = (sum("delivered"), sum("failed"), sum("retries"));
    let posts = target.count();
    if delivered != total || failed != 0 || retries != 0 || posts != total {
        report.notes.push(format!(
            "{label}: {posts} POSTs for {total} messages; daemon counted delivered {delivered}, failed {failed}, retries {retries}"
        ));
    }
    note_log(report, &daemon);
    daemon.stop().await?;
    mgmt.delete_many(names).await?;

    let cpu = (ticks1 - ticks0) as f64 / s.clk_tck as f64;
    let broker_cpu = match (broker0, broker1) {
        (Some(a), Some(b)) => format!(", broker {:.2} CPU s", (b - a) as f64 / s.clk_tck as f64),
        _ => String::new(),
    };
    println!(
        "  {total} messages in {elapsed:.2} s: {:.0} msg/s; daemon {cpu:.2} CPU s{broker_cpu}, peak RSS {:.1} MiB",
        total as f64 / elapsed,
        mib(peak)
    );
    Ok(Measured {
        rate: total as f64 / elapsed,
        cpu_per_10k: cpu / total as f64 * 10_000.0,
        peak_rss_mib: mib(peak),
    })
}

fn note_log(report: &mut Report, daemon: &Daemon) {
    for (key, count, example) in daemon.log_groups() {
        let entry = report
            .logged
            .entry(key)
            .or_insert_with(|| (Vec::new(), example));
        entry.0.push(format!("{} ×{count}", daemon.name));
    }
}

/// One healthy enrollment (max_in_flight 1) draining `n` messages, timed from its enroll.
async fn healthy_run(
    daemon: &mut Daemon,
    target: &Target,
    s: &Settings,
    queue: &str,
    n: u64,
) -> Result<f64> {
    target.reset(n);
    let started = Instant::now();
    daemon
        .enroll(json!({
            "queue": address(queue),
            "target_url": target.url,
            "subscription_args": {"prefetch": s.prefetch},
            "delivery": {"max_in_flight": 1},
        }))
        .await?;
    let done = wait_goal(daemon, target, n, drain_limit(n)).await?;
    Ok(n as f64 / done.duration_since(started).as_secs_f64())
}

async fn isolation(s: &Settings, mgmt: &Management, report: &mut Report) -> Result<String> {
    let n = (s.messages / 5).max(10);
    let hang_messages = 2_000;
    let alone_q = s.queue("iso-alone");
    let beside_q = s.queue("iso-beside");
    let hang_q = s.queue("iso-hanging");
    for q in [&alone_q, &beside_q, &hang_q] {
        mgmt.declare(q, true).await?;
    }
    preload(s, &[alone_q.clone(), beside_q.clone()], n).await?;
    preload(s, std::slice::from_ref(&hang_q), hang_messages).await?;
    mgmt.wait_depths(&[alone_q.clone(), beside_q.clone()], n)
        .await?;
    mgmt.wait_depth(&hang_q, hang_messages).await?;
    let target = Target::start(false).await?;
    let hanging = HangingTarget::start().await?;

    // Alone.
    let mut daemon = Daemon::start(s, "isolation-alone").await?;
    let alone = healthy_run(&mut daemon, &target, s, &alone_q, n).await?;
    note_log(report, &daemon);
    daemon.stop().await?;
    println!("  alone: {n} messages, {alone:.0} msg/s");

    // Beside an enrollment whose target never answers, its 8 POSTs already hanging.
    let mut daemon = Daemon::start(s, "isolation-beside").await?;
    let hang_id = daemon
        .enroll(json!({
            "queue": address(&hang_q),
            "target_url": hanging.url,
            "subscription_args": {"prefetch": s.prefetch},
            "delivery": {"max_in_flight": 8, "timeout_ms": 30000},
        }))
        .await?;
    wait_for(
        "the hanging enrollment to have 8 POSTs in flight",
        ACTIVE_LIMIT,
        Duration::from_millis(50),
        || async {
            Ok((daemon.enrollment(&hang_id).await?["in_flight"].as_u64() == Some(8)).then_some(()))
        },
    )
    .await?;
    let beside = healthy_run(&mut daemon, &target, s, &beside_q, n).await?;
    let hang_view = daemon.enrollment(&hang_id).await?;
    note_log(report, &daemon);
    daemon.stop().await?;
    println!(
        "  beside a hanging target: {n} messages, {beside:.0} msg/s (hanging enrollment: in_flight {}, state {})",
        hang_view["in_flight"], hang_view["state"]
    );
    mgmt.delete_many(vec![alone_q, beside_q, hang_q]).await?;
    let drop_pct = (alone - beside) / alone * 100.0;
    Ok(format!(
        "Isolation (max_in_flight 1, {n} msgs): {alone:.0} msg/s alone, {beside:.0} msg/s beside an enrollment whose target never answers (max_in_flight 8, timeout_ms 30000, 2000 msgs queued): {drop_pct:.1} % drop"
    ))
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1e6
}

async fn latency(s: &Settings, mgmt: &Management, report: &mut Report) -> Result<String> {
    let queue = s.queue("latency");
    mgmt.declare(&queue, true).await?;
    let target = Target::start(true).await?;
    let total = s.latency_rate * s.latency_secs;
    target.reset(total);
    let mut daemon = Daemon::start(s, "latency").await?;
    let id = daemon
        .enroll(json!({
            "queue": address(&queue),
            "target_url": target.url,
            "subscription_args": {"prefetch": s.prefetch},
            "delivery": {"max_in_flight": 1},
        }))
        .await?;
    daemon.wait_active(&id).await?;
    let mut publisher = Publisher::connect(&s.amqp_url, std::slice::from_ref(&queue)).await?;

    let (tx, mut rx) = mpsc::unbounded_channel::<Confirm>();
    let confirms = tokio::spawn(async move {
        while let Some(fut) = rx.recv().await {
            confirmed(fut).await?;
        }
        anyhow::Ok(())
    });
    let ticks0 = daemon.cpu_ticks()?;
    let interval = Duration::from_secs_f64(1.0 / s.latency_rate as f64);
    let started = tokio::time::Instant::now();
    let sender = &mut publisher.senders[0];
    for i in 0..total {
        tokio::time::sleep_until(started + interval.mul_f64(i as f64)).await;
        let message = Message::builder().value(now_nanos().to_string()).build();
        let fut = sender.send_batchable(message).await?;
        tx.send(fut)
            .map_err(|_| anyhow!("the confirm task ended early"))?;
    }
    drop(tx);
    let publish_secs = started.elapsed().as_secs_f64();
    tokio::time::timeout(Duration::from_secs(60), confirms)
        .await
        .map_err(|_| anyhow!("the broker did not confirm the latency messages within 60 s"))???;
    wait_goal(&mut daemon, &target, total, Duration::from_secs(120)).await?;
    let cpu = (daemon.cpu_ticks()? - ticks0) as f64 / s.clk_tck as f64;
    let cpu_pct = cpu / started.elapsed().as_secs_f64() * 100.0;
    publisher.close().await;
    note_log(report, &daemon);
    daemon.stop().await?;
    mgmt.delete_many(vec![queue]).await?;

    let mut lat = target.latencies();
    ensure!(
        lat.len() as u64 >= total,
        "only {} of {total} POSTs carried a publish time",
        lat.len()
    );
    lat.sort_unstable();
    Ok(format!(
        "Latency (publish → POST at the target, 1 enrollment, max_in_flight 1, {} msg/s for {} s, {total} msgs, published in {publish_secs:.1} s): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; daemon CPU {cpu_pct:.1} % of one core",
        s.latency_rate,
        s.latency_secs,
        percentile(&lat, 50.0),
        percentile(&lat, 99.0),
        percentile(&lat, 100.0),
    ))
}

async fn scale(s: &Settings, mgmt: &Management, report: &mut Report) -> Result<String> {
    let e = s.scale_enrollments;
    // hot-potato opens one AMQP connection per enrollment unless it pools them: make sure the
    // broker has room, without taking the last sockets from whoever else uses it.
    let connections = if s.scale_pool > 0 {
        s.scale_pool.min(e)
    } else {
        e
    };
    let how = if s.scale_pool > 0 {
        format!(
            "sharing {connections} AMQP connection(s), AMQP_CONNECTION_POOL={}",
            s.scale_pool
        )
    } else {
        "one AMQP connection each".to_string()
    };
    let nodes = mgmt.get("/api/nodes").await?;
    let node = &nodes[0];
    let (total, used) = (
        node["sockets_total"].as_u64().unwrap_or(0),
        node["sockets_used"].as_u64().unwrap_or(0),
    );
    let needed = (connections + SCALE_PUBLISHERS) as u64 + SOCKET_MARGIN;
    if total > 0 && total.saturating_sub(used) < needed {
        let msg = format!(
            "the broker allows {total} sockets ({used} in use; set by its file-descriptor limit, fd_total {}), and {e} enrollments ({how}) need {connections} AMQP connections plus {SCALE_PUBLISHERS} publishers and a margin of {SOCKET_MARGIN}. Raise RabbitMQ's open-file limit (e.g. LimitNOFILE=65536 for rabbitmq-server, then restart it), lower BENCH_SCALE_ENROLLMENTS to at most {}, or share connections with BENCH_SCALE_POOL=N (AMQP_CONNECTION_POOL); BENCH_SCALE_FORCE=1 runs it anyway",
            node["fd_total"],
            total
                .saturating_sub(used)
                .saturating_sub((SCALE_PUBLISHERS as u64) + SOCKET_MARGIN)
        );
        if !s.scale_force {
            bail!("not run: {msg}");
        }
        println!("  warning: {msg}");
    }

    let prefix = s.queue("scale-");
    let names: Vec<String> = (0..e).map(|i| format!("{prefix}{i:04}")).collect();
    let started = Instant::now();
    {
        let mgmt = mgmt.clone();
        for_each_parallel(names.clone(), PARALLEL_CALLS, move |name| {
            let mgmt = mgmt.clone();
            async move { mgmt.declare(&name, false).await }
        })
        .await?;
    }
    println!(
        "  declared {e} classic queues in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let target = Target::start(false).await?;
    let extra = if s.scale_pool > 0 {
        vec![("AMQP_CONNECTION_POOL", s.scale_pool.to_string())]
    } else {
        Vec::new()
    };
    let mut daemon = Daemon::start_with(s, "scale", &extra).await?;
    let ticks_start = daemon.cpu_ticks()?;

    let first_enroll = Instant::now();
    {
        let http = daemon.http.clone();
        let url = format!("{}/enroll", daemon.base);
        let (target_url, prefetch) = (target.url.clone(), s.prefetch);
        for_each_parallel(names.clone(), PARALLEL_CALLS, move |name| {
            let (http, url, target_url) = (http.clone(), url.clone(), target_url.clone());
            async move {
                let res = http
                    .post(&url)
                    .json(&json!({
                        "queue": address(&name),
                        "target_url": target_url,
                        "subscription_args": {"prefetch": prefetch},
                        "delivery": {"max_in_flight": 1},
                    }))
                    .send()
                    .await?;
                ensure!(
                    res.status().as_u16() == 201,
                    "POST /enroll for {name}: {}",
                    res.status()
                );
                Ok(())
            }
        })
        .await?;
    }
    let enrolled = first_enroll.elapsed().as_secs_f64();
    let limit = Duration::from_secs(60) + Duration::from_millis(200 * e as u64);
    let deadline = Instant::now() + limit;
    let all_active = loop {
        daemon.check_alive()?;
        let views = daemon.enrollments().await?;
        let mut states: BTreeMap<String, usize> = BTreeMap::new();
        for v in &views {
            *states
                .entry(v["state"].as_str().unwrap_or("?").to_string())
                .or_default() += 1;
        }
        if states.get("active").copied() == Some(e) && views.len() == e {
            break first_enroll.elapsed().as_secs_f64();
        }
        if Instant::now() >= deadline {
            let errors: BTreeMap<String, usize> = views
                .iter()
                .filter(|v| v["state"] != "active")
                .filter_map(|v| v["last_error"].as_str())
                .fold(BTreeMap::new(), |mut m, err| {
                    *m.entry(err.to_string()).or_default() += 1;
                    m
                });
            bail!(
                "timed out after {limit:?} waiting for {e} enrollments to be active: states {states:?}, errors of the others {errors:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    println!(
        "  {e} enrollments: API calls took {enrolled:.1} s, all active after {all_active:.1} s"
    );
    let attach_cpu = (daemon.cpu_ticks()? - ticks_start) as f64 / s.clk_tck as f64;

    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle0 = daemon.cpu_ticks()?;
    let idle_started = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle_cpu = (daemon.cpu_ticks()? - idle0) as f64 / s.clk_tck as f64;
    let idle_pct = idle_cpu / idle_started.elapsed().as_secs_f64() * 100.0;
    let idle_rss = daemon.rss_kb()?;
    println!("  idle: RSS {:.1} MiB, CPU {idle_pct:.2} %", mib(idle_rss));

    // Senders attached before the clock starts; SCALE_PUBLISHERS connections share the queues.
    let per_publisher = e.div_ceil(SCALE_PUBLISHERS);
    let mut publishers = Vec::new();
    for chunk in names.chunks(per_publisher) {
        publishers.push(Publisher::connect(&s.amqp_url, chunk).await?);
    }
    let total = SCALE_MESSAGES_PER_QUEUE * e as u64;
    target.reset(total);
    let ticks0 = daemon.cpu_ticks()?;
    let started = Instant::now();
    let mut set = JoinSet::new();
    for mut p in publishers {
        set.spawn(async move {
            p.send_data(SCALE_MESSAGES_PER_QUEUE).await?;
            anyhow::Ok(p)
        });
    }
    let mut publishers = Vec::new();
    while let Some(r) = set.join_next().await {
        publishers.push(r??);
    }
    let published = started.elapsed().as_secs_f64();
    let done = wait_goal(&mut daemon, &target, total, drain_limit(total)).await?;
    let elapsed = done.duration_since(started).as_secs_f64();
    let cpu = (daemon.cpu_ticks()? - ticks0) as f64 / s.clk_tck as f64;
    let peak = daemon.peak_rss_kb()?;
    for p in publishers {
        p.close().await;
    }
    mgmt.wait_all_empty(&prefix, e).await?;
    let posts = target.count();
    if posts != total {
        report
            .notes
            .push(format!("scale: {posts} POSTs for {total} messages"));
    }
    note_log(report, &daemon);
    daemon.stop().await?;
    mgmt.delete_many(names).await?;
    println!(
        "  {total} messages over {e} queues: published in {published:.2} s, all POSTed after {elapsed:.2} s"
    );
    Ok(format!(
        "Scale ({e} enrollments on {e} classic queues, {how}): all active {all_active:.1} s after the first enroll (daemon {attach_cpu:.1} CPU s); idle after 10 s: RSS {:.1} MiB, CPU {idle_pct:.2} % of one core over 10 s; {SCALE_MESSAGES_PER_QUEUE} msgs into each queue: {:.0} msg/s until all {total} POSTed (daemon {:.2} CPU s / 10k msgs); peak RSS {:.1} MiB",
        mib(idle_rss),
        total as f64 / elapsed,
        cpu / total as f64 * 10_000.0,
        mib(peak)
    ))
}

// ---------------------------------------------------------------------------------------------
// Main

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = status_kb_file("/proc/meminfo", "MemTotal").map_or("?".into(), |kb| {
        format!("{:.1} GiB", kb as f64 / 1024.0 / 1024.0)
    });
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!(
        "{nproc} CPU(s) (nproc), {model}, {mem} RAM; load average {}",
        load.join(" ")
    )
}

fn status_kb_file(path: &str, field: &str) -> Option<u64> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

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

    // The throughput rows are read against the ceiling, so it runs whenever they do.
    if s.wants("ceiling") || s.wants("throughput") {
        println!(
            "\n== ceiling: bare fe2o3-amqp receiver, {} msgs, credit {}",
            s.messages, s.prefetch
        );
        let (rate, cpu) = ceiling(s, mgmt, false).await.context("ceiling")?;
        println!("  Connection::open: {rate:.0} msg/s");
        let (rate_nd, cpu_nd) = ceiling(s, mgmt, true)
            .await
            .context("ceiling, TCP_NODELAY")?;
        println!("  TCP_NODELAY (as hot-potato connects): {rate_nd:.0} msg/s");
        report.ceiling = Some(rate.max(rate_nd));
        report.rows.push(Row {
            name: format!(
                "bare fe2o3-amqp receiver, `Connection::open`, credit {}",
                s.prefetch
            ),
            rate,
            cpu_per_10k: Some(cpu),
            peak_rss_mib: None,
        });
        report.rows.push(Row {
            name: format!(
                "bare fe2o3-amqp receiver, TCP_NODELAY like hot-potato, credit {}",
                s.prefetch
            ),
            rate: rate_nd,
            cpu_per_10k: Some(cpu_nd),
            peak_rss_mib: None,
        });
    }

    if s.wants("throughput") {
        for (label, queues, mif) in [
            ("single-mif1", 1, 1),
            ("single-mif16", 1, 16),
            ("single-mif32", 1, 32),
            ("eight-mif1", 8, 1),
        ] {
            let name = if queues == 1 {
                format!("hot-potato, 1 enrollment, max_in_flight {mif}")
            } else {
                format!(
                    "hot-potato, {queues} enrollments on {queues} queues, max_in_flight {mif} each"
                )
            };
            println!("\n== {name}");
            match throughput(s, mgmt, report, label, queues, mif).await {
                Ok(m) => report.rows.push(Row {
                    name,
                    rate: m.rate,
                    cpu_per_10k: Some(m.cpu_per_10k),
                    peak_rss_mib: Some(m.peak_rss_mib),
                }),
                Err(e) => {
                    println!("  FAILED: {e:#}");
                    report.failures.push(format!("{name}: {e:#}"));
                }
            }
        }
    }

    if s.wants("isolation") {
        println!("\n== isolation");
        match isolation(s, mgmt, report).await {
            Ok(line) => report.lines.push(line),
            Err(e) => {
                println!("  FAILED: {e:#}");
                report.failures.push(format!("isolation: {e:#}"));
            }
        }
    }

    if s.wants("latency") {
        println!(
            "\n== latency: {} msg/s for {} s",
            s.latency_rate, s.latency_secs
        );
        match latency(s, mgmt, report).await {
            Ok(line) => report.lines.push(line),
            Err(e) => {
                println!("  FAILED: {e:#}");
                report.failures.push(format!("latency: {e:#}"));
            }
        }
    }

    if s.wants("scale") && s.scale {
        println!("\n== scale: {} enrollments", s.scale_enrollments);
        match scale(s, mgmt, report).await {
            Ok(line) => report.lines.push(line),
            Err(e) => {
                println!("  FAILED: {e:#}");
                report.failures.push(format!(
                    "scale ({} enrollments): {e:#}",
                    s.scale_enrollments
                ));
            }
        }
    } else if s.wants("scale") {
        report
            .lines
            .push("Scale: skipped (BENCH_SCALE=0 or --no-scale)".into());
    }
    Ok(())
}

fn print_report(s: &Settings, report: &Report) {
    println!("\n## Results\n");
    println!(
        "{}; broker, HTTP target, publisher and daemon all on this machine. {} msgs of {BODY_LEN} bytes per queue, prefetch {}; quorum queues.\n",
        machine(),
        s.messages,
        s.prefetch
    );
    if !report.rows.is_empty() {
        println!("| scenario | msg/s | ratio to ceiling | CPU s / 10k msgs | peak RSS MiB |");
        println!("|---|---:|---:|---:|---:|");
        for row in &report.rows {
            let ratio = report
                .ceiling
                .map_or("—".into(), |c| format!("{:.2}", row.rate / c));
            let cpu = row.cpu_per_10k.map_or("—".into(), |c| format!("{c:.2}"));
            let rss = row.peak_rss_mib.map_or("—".into(), |r| format!("{r:.1}"));
            println!(
                "| {} | {:.0} | {ratio} | {cpu} | {rss} |",
                row.name, row.rate
            );
        }
        println!(
            "\nThe ceiling is the faster of the two bare receivers (recv + accept per message; they differ only in TCP_NODELAY); their CPU is the bench process's. hot-potato times run from `POST /enroll` to the target's Nth request, and each queue was then checked empty through the management API.\n"
        );
    }
    for line in &report.lines {
        println!("- {line}");
    }
    if !report.notes.is_empty() {
        println!("\nNotes:");
        for note in &report.notes {
            println!("- {note}");
        }
    }
    if !report.logged.is_empty() {
        println!(
            "\nDaemon warnings and errors (LOG_LEVEL=warn; full logs in {}):",
            s.log_dir.display()
        );
        for (key, (places, example)) in &report.logged {
            println!("- {key}: {}", places.join(", "));
            println!("  first: {example}");
        }
    }
    if !report.failures.is_empty() {
        println!("\nFailed scenarios:");
        for f in &report.failures {
            println!("- {f}");
        }
    }
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
    let settings = match Settings::from_env(&args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("dispatch: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let mgmt = match Management::new(&settings.management_url) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("dispatch: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    println!("Machine: {}", machine());
    println!(
        "The RabbitMQ broker, the HTTP target (in this process) and the publisher run on the same machine beside the daemon, and share its CPUs."
    );
    println!(
        "Settings: BENCH_MESSAGES={} BENCH_PREFETCH={} BENCH_LATENCY_RATE={} BENCH_LATENCY_SECS={} BENCH_SCALE={} BENCH_SCALE_ENROLLMENTS={} BENCH_SCALE_POOL={} BENCH_CLK_TCK={}; daemon {}; queues bench-{}-*",
        settings.messages,
        settings.prefetch,
        settings.latency_rate,
        settings.latency_secs,
        u8::from(settings.scale),
        settings.scale_enrollments,
        settings.scale_pool,
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
    print_report(&settings, &report);
    if report.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
