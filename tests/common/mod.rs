//! Shared test harness: the real RabbitMQ broker (started by `scripts/test.sh`), its
//! management API for declaring queues and reading depths, a publisher, a recording HTTP
//! target, and the daemon run in-process or as a child process.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use fe2o3_amqp::types::messaging::{Message, SerializableBody};
use fe2o3_amqp::{Connection, Sender, Session};
use hot_potato::config::Config;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub fn broker_url() -> String {
    std::env::var("HOT_POTATO_TEST_BROKER")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672".into())
}

pub fn management_url() -> String {
    std::env::var("HOT_POTATO_TEST_MANAGEMENT").unwrap_or_else(|_| "http://127.0.0.1:15672".into())
}

pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "hot_potato=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A queue name no other test uses.
pub fn unique(name: &str) -> String {
    format!(
        "hp-{name}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// RabbitMQ 3.x address of an existing queue.
pub fn address(queue: &str) -> String {
    format!("/amq/queue/{queue}")
}

/// The limit every test runs under (see [`time_limit`]): generous beside the slowest test in
/// a debug build, so it only ever fires on a hang.
pub const TEST_TIME_LIMIT: Duration = Duration::from_secs(300);

/// Processes (or process groups, as `-pgid`) that a test started, killed by the time limit.
static CHILDREN: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// What `kill` is given for `pid`: the pid, or `-pid` for its whole process group.
fn kill_target(pid: u32, group: bool) -> String {
    if group {
        format!("-{pid}")
    } else {
        pid.to_string()
    }
}

fn children() -> std::sync::MutexGuard<'static, Vec<String>> {
    CHILDREN.lock().unwrap_or_else(|e| e.into_inner())
}

/// Has the time limit kill `pid` (its whole group when `group`) if it fires.
pub fn watch_child(pid: u32, group: bool) {
    children().push(kill_target(pid, group));
}

/// Forgets `pid`, once it has been reaped, so its number is never signalled after reuse.
pub fn unwatch_child(pid: u32, group: bool) {
    let target = kill_target(pid, group);
    children().retain(|t| *t != target);
}

/// Ends the test binary if the test that holds the returned guard is still running after
/// `limit`: a hang then fails the run at once, naming the test, instead of stalling CI.
/// Children that tests started are killed first, so none outlives the binary.
#[must_use = "the limit lasts as long as the guard"]
pub fn time_limit(limit: Duration) -> TimeLimit {
    let name = std::thread::current().name().unwrap_or("a test").to_owned();
    let (done, finished) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = finished.recv_timeout(limit) {
            eprintln!("\n{name}: still running after {limit:?}; killing its children and exiting");
            for target in children().iter() {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", "--", target])
                    .stderr(std::process::Stdio::null())
                    .status();
            }
            std::process::exit(124);
        }
    });
    TimeLimit { _done: done }
}

/// Dropping it (the test ended, passed or failed) disarms the limit.
pub struct TimeLimit {
    _done: std::sync::mpsc::Sender<()>,
}

/// Polls `check` until it returns `Some`, or panics with `what` after `limit`.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The RabbitMQ management HTTP API.
#[derive(Clone)]
pub struct Management {
    http: reqwest::Client,
    base: String,
}

impl Default for Management {
    fn default() -> Self {
        Self::new()
    }
}

impl Management {
    pub fn new() -> Self {
        Self {
            http: reqwest::Client::new(),
            base: management_url(),
        }
    }

    async fn put_queue(&self, name: &str, body: Value) {
        let res = self
            .http
            .put(format!("{}/api/queues/%2F/{name}", self.base))
            .basic_auth("guest", Some("guest"))
            .json(&body)
            .send()
            .await
            .expect("management API reachable");
        assert!(
            res.status().is_success(),
            "declare {name}: {}",
            res.status()
        );
    }

    pub async fn declare_classic(&self, name: &str) {
        self.put_queue(name, json!({"durable": true})).await;
    }

    pub async fn declare_quorum(&self, name: &str) {
        self.put_queue(
            name,
            json!({"durable": true, "arguments": {"x-queue-type": "quorum"}}),
        )
        .await;
    }

    /// A quorum queue that dead-letters to `NAME.dlq` after `limit` redeliveries.
    pub async fn declare_with_dead_letter(&self, name: &str, limit: u32) -> String {
        let dlq = format!("{name}.dlq");
        self.declare_classic(&dlq).await;
        self.put_queue(
            name,
            json!({"durable": true, "arguments": {
                "x-queue-type": "quorum",
                "x-delivery-limit": limit,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": dlq,
            }}),
        )
        .await;
        dlq
    }

    pub async fn queue_info(&self, name: &str) -> Option<Value> {
        let res = self
            .http
            .get(format!("{}/api/queues/%2F/{name}", self.base))
            .basic_auth("guest", Some("guest"))
            .send()
            .await
            .ok()?;
        if !res.status().is_success() {
            return None;
        }
        res.json().await.ok()
    }

    /// Ready plus unacknowledged messages, once the management API has a figure.
    pub async fn depth(&self, name: &str) -> Option<u64> {
        self.queue_info(name).await?.get("messages")?.as_u64()
    }

    /// Waits until the queue holds exactly `n` messages.
    pub async fn wait_depth(&self, name: &str, n: u64, limit: Duration) {
        wait_for(&format!("{name} to hold {n} messages"), limit, || async {
            (self.depth(name).await == Some(n)).then_some(())
        })
        .await
    }

    /// Publishes raw bytes through the management API. With `amqp_1_0_sections`, RabbitMQ's
    /// AMQP 1.0 plugin hands the bytes to 1.0 consumers as the encoded message itself, which
    /// is how a malformed message can be put on a queue.
    pub async fn publish_raw(&self, queue: &str, payload: &[u8], amqp_1_0_sections: bool) {
        use base64::Engine as _;
        let mut properties = json!({});
        if amqp_1_0_sections {
            properties["type"] = json!("amqp-1.0");
        }
        let res = self
            .http
            .post(format!(
                "{}/api/exchanges/%2F/amq.default/publish",
                self.base
            ))
            .basic_auth("guest", Some("guest"))
            .json(&json!({
                "properties": properties,
                "routing_key": queue,
                "payload": base64::engine::general_purpose::STANDARD.encode(payload),
                "payload_encoding": "base64",
            }))
            .send()
            .await
            .expect("management API reachable");
        let body: Value = res.json().await.expect("json");
        assert_eq!(body["routed"], true, "{body}");
    }

    pub async fn delete_queue(&self, name: &str) {
        let _ = self
            .http
            .delete(format!("{}/api/queues/%2F/{name}", self.base))
            .basic_auth("guest", Some("guest"))
            .send()
            .await;
    }
}

/// Publishes messages to a queue over AMQP 1.0, each one confirmed by the broker.
pub struct Publisher {
    connection: fe2o3_amqp::connection::ConnectionHandle<()>,
    session: fe2o3_amqp::session::SessionHandle<()>,
    sender: Sender,
}

impl Publisher {
    pub async fn connect(queue: &str) -> Self {
        let mut connection = Connection::open(
            format!("test-publisher-{}", uuid::Uuid::new_v4()),
            broker_url().as_str(),
        )
        .await
        .expect("broker reachable");
        let mut session = Session::begin(&mut connection).await.expect("session");
        let sender = Sender::attach(&mut session, "test-sender", address(queue))
            .await
            .expect("sender attach");
        Self {
            connection,
            session,
            sender,
        }
    }

    pub async fn send<T: SerializableBody>(&mut self, message: Message<T>) {
        let outcome = self.sender.send(message).await.expect("send");
        outcome
            .accepted_or("not accepted")
            .expect("accepted by the broker");
    }

    /// Sends `"prefix-0"`, `"prefix-1"`… as AmqpValue strings, pipelined in batches.
    pub async fn send_numbered(&mut self, prefix: &str, range: std::ops::Range<usize>) {
        let mut pending = Vec::new();
        for i in range {
            let fut = self
                .sender
                .send_batchable(format!("{prefix}-{i}"))
                .await
                .expect("send");
            pending.push(fut);
            if pending.len() >= 200 {
                for f in pending.drain(..) {
                    f.await
                        .expect("outcome")
                        .accepted_or("not accepted")
                        .expect("accepted");
                }
            }
        }
        for f in pending {
            f.await
                .expect("outcome")
                .accepted_or("not accepted")
                .expect("accepted");
        }
    }

    /// Closes sender, session and connection, each step bounded: fe2o3 0.18 now and then
    /// never sees RabbitMQ 3.10's answer to an End, and closing the connection ends it all.
    pub async fn close(mut self) {
        let limit = Duration::from_secs(5);
        if tokio::time::timeout(limit, self.sender.close())
            .await
            .is_err()
        {
            eprintln!("test publisher: sender close unanswered within {limit:?}");
        }
        if tokio::time::timeout(limit, self.session.end())
            .await
            .is_err()
        {
            eprintln!("test publisher: session end unanswered within {limit:?}");
        }
        if tokio::time::timeout(limit, self.connection.close())
            .await
            .is_err()
        {
            eprintln!("test publisher: connection close unanswered within {limit:?}");
        }
    }
}

/// One request as the target saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: Instant,
    pub status: u16,
}

impl Received {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Chooses a status from a request body.
pub type StatusRule = fn(&str) -> u16;

#[derive(Clone, Default)]
struct TargetState {
    received: Arc<Mutex<Vec<Received>>>,
    status: Arc<AtomicU16>,
    delay_ms: Arc<AtomicU64>,
    current: Arc<AtomicUsize>,
    max_concurrent: Arc<AtomicUsize>,
    /// When set, chooses each answer's status from the request body instead of `status`.
    status_by_body: Arc<Mutex<Option<StatusRule>>>,
}

/// A recording HTTP target on 127.0.0.1 that answers with a settable status and can be
/// stopped and started again on the same port.
pub struct Target {
    state: TargetState,
    addr: SocketAddr,
    server: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl Target {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = TargetState::default();
        state.status.store(200, Ordering::SeqCst);
        let mut target = Self {
            state,
            addr,
            server: None,
        };
        target.serve(listener);
        target
    }

    fn serve(&mut self, listener: TcpListener) {
        let (tx, rx) = oneshot::channel();
        let app = Router::new()
            .fallback(record)
            .with_state(self.state.clone());
        let handle = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        self.server = Some((tx, handle));
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    pub fn set_status(&self, status: u16) {
        self.state.status.store(status, Ordering::SeqCst);
    }

    /// Answers each request with `rule(body)` from now on.
    pub fn set_status_by_body(&self, rule: StatusRule) {
        *self.state.status_by_body.lock().expect("lock") = Some(rule);
    }

    /// Makes every answer wait this long.
    pub fn set_delay(&self, delay: Duration) {
        self.state
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// The most requests that were open at once.
    pub fn max_concurrent(&self) -> usize {
        self.state.max_concurrent.load(Ordering::SeqCst)
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().expect("lock").clone()
    }

    pub fn count(&self) -> usize {
        self.state.received.lock().expect("lock").len()
    }

    /// Bodies of the requests answered 2xx, in arrival order.
    pub fn accepted_bodies(&self) -> Vec<String> {
        self.received()
            .iter()
            .filter(|r| (200..300).contains(&r.status))
            .map(Received::text)
            .collect()
    }

    /// Stops listening: connections are then refused.
    pub async fn stop(&mut self) {
        if let Some((tx, handle)) = self.server.take() {
            let _ = tx.send(());
            let _ = handle.await;
        }
    }

    /// Listens again on the same port.
    pub async fn restart(&mut self) {
        let listener = wait_for(
            "the target port to be free",
            Duration::from_secs(10),
            || async { TcpListener::bind(self.addr).await.ok() },
        )
        .await;
        self.serve(listener);
    }
}

async fn record(State(state): State<TargetState>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let now_open = state.current.fetch_add(1, Ordering::SeqCst) + 1;
    state.max_concurrent.fetch_max(now_open, Ordering::SeqCst);
    let delay = state.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    state.current.fetch_sub(1, Ordering::SeqCst);
    let rule = *state.status_by_body.lock().expect("lock");
    let status = match rule {
        Some(rule) => rule(&String::from_utf8_lossy(&body)),
        None => state.status.load(Ordering::SeqCst),
    };
    state.received.lock().expect("lock").push(Received {
        headers,
        body,
        at: Instant::now(),
        status,
    });
    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// Environment for a daemon under test.
pub fn daemon_env(db: &Path, port: u16) -> Vec<(String, String)> {
    [
        ("AMQP_URL", broker_url()),
        ("HTTP_HOST", "127.0.0.1".into()),
        ("HTTP_PORT", port.to_string()),
        ("SQLITE_BACKUP_PATH", db.display().to_string()),
        ("RECONNECT_MIN_MS", "200".into()),
        ("RECONNECT_MAX_MS", "2000".into()),
        ("DELIVERY_TIMEOUT_MS", "5000".into()),
        ("SHUTDOWN_GRACE_MS", "5000".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The daemon running in this test process.
pub struct Daemon {
    pub base: String,
    pub api: Api,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), hot_potato::RunError>>>,
}

impl Daemon {
    pub async fn start(db: &Path) -> Self {
        Self::start_with(db, &[]).await
    }

    /// Starts with extra or overriding environment values.
    pub async fn start_with(db: &Path, extra: &[(&str, &str)]) -> Self {
        init_logs();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let mut env = daemon_env(db, port);
        env.retain(|(k, _)| !extra.iter().any(|(name, _)| name == k));
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let config = Config::from_vars(env).expect("valid config");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(hot_potato::run(config, listener, async move {
            let _ = rx.await;
        }));
        let base = format!("http://127.0.0.1:{port}");
        Self {
            api: Api::new(&base),
            base,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Graceful shutdown, as on SIGTERM; asserts that `run` returned Ok.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let result = tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("daemon stops within 20 s")
                .expect("daemon task did not panic");
            result.expect("daemon exits cleanly");
        }
    }
}

/// A small client for the daemon's API.
#[derive(Clone)]
pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
}

impl Api {
    pub fn new(base: &str) -> Self {
        Self {
            http: reqwest::Client::new(),
            base: base.to_string(),
        }
    }

    /// Enrolls and returns the enrollment JSON; asserts 201 or 200.
    pub async fn enroll(&self, body: Value) -> Value {
        let res = self
            .http
            .post(format!("{}/enroll", self.base))
            .json(&body)
            .send()
            .await
            .expect("API reachable");
        let status = res.status().as_u16();
        let json: Value = res.json().await.expect("JSON answer");
        assert!(
            status == 201 || status == 200,
            "enroll answered {status}: {json}"
        );
        json
    }

    pub async fn enroll_queue(&self, queue: &str, target: &str) -> String {
        let e = self
            .enroll(json!({"queue": address(queue), "target_url": target}))
            .await;
        e["id"].as_str().expect("id").to_string()
    }

    /// The port the daemon under this client listens on.
    pub fn port(&self) -> u16 {
        self.base
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("base URL ends with a port")
    }

    /// Enrolls `queue` for `target` and waits until its link is attached.
    pub async fn enroll_active(&self, queue: &str, target: &str) -> String {
        let id = self.enroll_queue(queue, target).await;
        self.wait_state(&id, "active", Duration::from_secs(20))
            .await;
        id
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let res = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("API reachable");
        let status = res.status().as_u16();
        let body = res.json().await.unwrap_or(Value::Null);
        (status, body)
    }

    pub async fn delete(&self, id: &str) -> u16 {
        self.http
            .delete(format!("{}/enroll/{id}", self.base))
            .send()
            .await
            .expect("API reachable")
            .status()
            .as_u16()
    }

    pub async fn enrollment(&self, id: &str) -> Value {
        let (status, body) = self.get(&format!("/enrollments/{id}")).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Waits until the enrollment reports `state`.
    pub async fn wait_state(&self, id: &str, state: &str, limit: Duration) -> Value {
        wait_for(&format!("enrollment {id} to be {state}"), limit, || async {
            let e = self.enrollment(id).await;
            (e["state"] == state).then_some(e)
        })
        .await
    }
}

/// A fresh SQLite path in its own temp dir (kept alive by the returned guard).
pub fn temp_db() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hotpotato.sqlite");
    (dir, path)
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A target that accepts TCP connections and never answers.
pub struct HangingTarget {
    pub url: String,
    task: JoinHandle<()>,
}

impl HangingTarget {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        Self { url, task }
    }
}

impl Drop for HangingTarget {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The daemon binary as a child process, killed when the test ends (also on a failed
/// assertion) so no daemon outlives its test.
pub struct DaemonProcess(pub std::process::Child);

impl std::ops::Deref for DaemonProcess {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for DaemonProcess {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        unwatch_child(self.0.id(), false);
    }
}

/// Starts the binary on `db` and `port` (LOG_LEVEL=warn, no change limit), its output to
/// `log` when given, else stderr.
pub fn spawn_daemon(
    db: &Path,
    port: u16,
    log: Option<&Path>,
    extra: &[(&str, &str)],
) -> DaemonProcess {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_hot-potato"));
    cmd.env_clear()
        .envs(daemon_env(db, port))
        .env("LOG_LEVEL", "warn")
        .env("API_RATE_LIMIT_PER_MIN", "0")
        .envs(extra.iter().copied())
        .current_dir(db.parent().expect("db dir"));
    match log {
        Some(path) => {
            let file = std::fs::File::create(path).expect("log file");
            cmd.stdout(file.try_clone().expect("log file")).stderr(file);
        }
        None => {
            cmd.stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::inherit());
        }
    }
    let child = cmd.spawn().expect("daemon starts");
    watch_child(child.id(), false);
    DaemonProcess(child)
}

impl Api {
    /// Waits until the daemon answers `/health`.
    pub async fn wait_healthy(&self) {
        wait_for("the daemon to serve", Duration::from_secs(20), || async {
            let res = self
                .http
                .get(format!("{}/health", self.base))
                .send()
                .await
                .ok()?;
            res.status().is_success().then_some(())
        })
        .await;
    }
}
