//! Shared test harness. The helpers themselves live in the `hot-potato-testkit` crate
//! (`tests/testkit`), which the benchmark uses too; here they are wrapped so that a failure
//! panics the test, and configured for the tests' broker (`HOT_POTATO_TEST_BROKER`,
//! `HOT_POTATO_TEST_MANAGEMENT`). What needs the `hot-potato` crate itself (the daemon run
//! in-process) and the tests' time limit stay here.
#![allow(dead_code)]

pub mod postgres;
pub mod replica;

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fe2o3_amqp::types::messaging::{Message, SerializableBody};
use hot_potato::config::Config;
use hot_potato_testkit as kit;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

// Not every test binary uses every helper.
#[allow(unused_imports)]
pub use kit::{
    address,
    daemon::{DaemonProcess, unwatch_child, watch_child},
    target::{Received, StatusRule},
};

/// The value, or a panic naming the error and its causes.
#[track_caller]
fn must<T, E: Display>(result: Result<T, E>) -> T {
    result.unwrap_or_else(|e| panic!("{e:#}"))
}

pub fn broker_url() -> String {
    std::env::var("HOT_POTATO_TEST_BROKER")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672".into())
}

/// The broker's `host:port` from [`broker_url`], for proxies and socket counts.
pub fn broker_addr() -> String {
    let url = broker_url();
    let rest = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest);
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host)
        .to_owned()
}

pub fn management_url() -> String {
    std::env::var("HOT_POTATO_TEST_MANAGEMENT").unwrap_or_else(|_| "http://127.0.0.1:15672".into())
}

/// The broker family the tests run against, from `HOT_POTATO_TEST_BROKER_KIND`
/// (`rabbitmq3`, the default, or `rabbitmq4`): `scripts/test.sh` runs the broker matrix by
/// running the tests whose result depends on broker semantics once per broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    /// RabbitMQ 3.10 with its AMQP 1.0 plugin: no `modified`, released messages come back
    /// with delivery-count 0.
    RabbitMq3,
    /// RabbitMQ 4.0: native AMQP 1.0, honours `modified{delivery_failed}`.
    RabbitMq4,
}

pub fn broker_kind() -> BrokerKind {
    match std::env::var("HOT_POTATO_TEST_BROKER_KIND").as_deref() {
        Ok("rabbitmq4") => BrokerKind::RabbitMq4,
        Ok("rabbitmq3") | Err(_) => BrokerKind::RabbitMq3,
        Ok(other) => panic!("HOT_POTATO_TEST_BROKER_KIND={other}: expected rabbitmq3 or rabbitmq4"),
    }
}

impl BrokerKind {
    /// Sessions one connection may carry: RabbitMQ 4.0's `session_max_per_connection`
    /// defaults to 64; RabbitMQ 3.10's plugin took 2,548 on one connection in the
    /// 10,000-enrollment benchmark (it goes by the client's channel-max).
    pub fn sessions_per_connection(self) -> Option<usize> {
        match self {
            BrokerKind::RabbitMq3 => None,
            BrokerKind::RabbitMq4 => Some(64),
        }
    }

    /// The failure outcome hot-potato chooses from what this broker advertises at attach.
    pub fn failure_outcome(self) -> &'static str {
        match self {
            Self::RabbitMq3 => "released",
            Self::RabbitMq4 => "modified",
        }
    }

    /// `rabbitmqctl ARGS` for this broker: `HOT_POTATO_TEST_RABBITMQCTL` (a command and its
    /// leading arguments, split on spaces, e.g. `scripts/rabbitmq4.sh ctl`), else
    /// `rabbitmqctl`.
    pub fn rabbitmqctl(self) -> std::process::Command {
        let line =
            std::env::var("HOT_POTATO_TEST_RABBITMQCTL").unwrap_or_else(|_| "rabbitmqctl".into());
        let mut words = line.split_whitespace();
        let mut command = std::process::Command::new(words.next().unwrap_or("rabbitmqctl"));
        command.args(words);
        command
    }
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

/// The limit every test runs under (see [`time_limit`]): generous beside the slowest test in
/// a debug build, so it only ever fires on a hang.
pub const TEST_TIME_LIMIT: Duration = Duration::from_secs(300);

/// Ends the test binary if the test that holds the returned guard is still running after
/// `limit`: a hang then fails the run at once, naming the test, instead of stalling CI.
/// Children that tests started (see [`watch_child`]) are killed first, so none outlives the
/// binary.
#[must_use = "the limit lasts as long as the guard"]
pub fn time_limit(limit: Duration) -> TimeLimit {
    let name = std::thread::current().name().unwrap_or("a test").to_owned();
    let (done, finished) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = finished.recv_timeout(limit) {
            eprintln!("\n{name}: still running after {limit:?}; killing its children and exiting");
            kit::daemon::kill_watched();
            std::process::exit(124);
        }
    });
    TimeLimit { _done: done }
}

/// Dropping it (the test ended, passed or failed) disarms the limit.
pub struct TimeLimit {
    _done: std::sync::mpsc::Sender<()>,
}

/// Polls `check` every 50 ms until it returns `Some`, or panics with `what` after `limit`.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let every = Duration::from_millis(50);
    must(
        kit::wait::wait_for(what, limit, every, || {
            let fut = check();
            async move { Ok(fut.await) }
        })
        .await,
    )
}

/// The RabbitMQ management HTTP API ([`kit::management::Management`]), panicking on failure.
#[derive(Clone)]
pub struct Management(kit::management::Management);

impl Default for Management {
    fn default() -> Self {
        Self::new()
    }
}

impl Management {
    pub fn new() -> Self {
        Self(must(kit::management::Management::new(&management_url())))
    }

    pub async fn declare_classic(&self, name: &str) {
        must(self.0.declare_classic(name).await);
    }

    pub async fn declare_quorum(&self, name: &str) {
        must(self.0.declare_quorum(name).await);
    }

    /// A quorum queue that dead-letters to `NAME.dlq` after `limit` redeliveries.
    pub async fn declare_with_dead_letter(&self, name: &str, limit: u32) -> String {
        must(self.0.declare_with_dead_letter(name, limit).await)
    }

    /// The queue as the management API shows it; `None` when that fails.
    pub async fn queue_info(&self, name: &str) -> Option<Value> {
        self.0.queue_info(name).await.ok()
    }

    /// Ready plus unacknowledged messages, once the management API has a figure.
    pub async fn depth(&self, name: &str) -> Option<u64> {
        self.0.depth(name).await.ok().flatten()
    }

    /// Waits until the queue holds exactly `n` messages.
    pub async fn wait_depth(&self, name: &str, n: u64, limit: Duration) {
        must(self.0.wait_depth(name, n, limit).await);
    }

    /// Publishes raw bytes through the management API (see
    /// [`kit::management::Management::publish_raw`]); panics unless routed.
    pub async fn publish_raw(&self, queue: &str, payload: &[u8], amqp_1_0_sections: bool) {
        must(self.0.publish_raw(queue, payload, amqp_1_0_sections).await);
    }

    /// Deletes the queue, ignoring failures (cleanup at a test's end).
    pub async fn delete_queue(&self, name: &str) {
        let _ = self.0.delete_queue(name).await;
    }
}

/// Publishes messages to one queue over AMQP 1.0, each one confirmed by the broker.
pub struct Publisher(kit::publisher::Publisher);

impl Publisher {
    pub async fn connect(queue: &str) -> Self {
        Self(must(
            kit::publisher::Publisher::connect(&broker_url(), &[queue]).await,
        ))
    }

    pub async fn send<T: SerializableBody>(&mut self, message: Message<T>) {
        must(self.0.send(message).await);
    }

    /// Sends `"prefix-0"`, `"prefix-1"`… as AmqpValue strings, pipelined.
    pub async fn send_numbered(&mut self, prefix: &str, range: std::ops::Range<usize>) {
        must(self.0.send_numbered(prefix, range).await);
    }

    /// Closes sender, session and connection, each step bounded.
    pub async fn close(self) {
        self.0.close().await;
    }
}

/// A recording HTTP target ([`kit::target::Target`]) on 127.0.0.1, panicking on failure.
pub struct Target(kit::target::Target);

impl Target {
    pub async fn start() -> Self {
        Self(must(kit::target::Target::start().await))
    }

    /// Listens again on the same port.
    pub async fn restart(&mut self) {
        must(self.0.restart().await);
    }
}

impl std::ops::Deref for Target {
    type Target = kit::target::Target;
    fn deref(&self) -> &kit::target::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Target {
    fn deref_mut(&mut self) -> &mut kit::target::Target {
        &mut self.0
    }
}

/// A target that accepts TCP connections and never answers (`.url`).
pub struct HangingTarget(kit::target::HangingTarget);

impl HangingTarget {
    pub async fn start() -> Self {
        Self(must(kit::target::HangingTarget::start().await))
    }
}

impl std::ops::Deref for HangingTarget {
    type Target = kit::target::HangingTarget;
    fn deref(&self) -> &kit::target::HangingTarget {
        &self.0
    }
}

/// Environment for a daemon under test.
pub fn daemon_env(db: &Path, port: u16) -> Vec<(String, String)> {
    let mut env = kit::daemon::base_env(&broker_url(), db, port);
    env.extend(
        [
            ("RECONNECT_MIN_MS", "200"),
            ("RECONNECT_MAX_MS", "2000"),
            ("DELIVERY_TIMEOUT_MS", "5000"),
            ("SHUTDOWN_GRACE_MS", "5000"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    env
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

/// A small client for the daemon's API ([`kit::api::Api`]: `.http`, `.base`), panicking on
/// failure.
#[derive(Clone)]
pub struct Api(kit::api::Api);

impl std::ops::Deref for Api {
    type Target = kit::api::Api;
    fn deref(&self) -> &kit::api::Api {
        &self.0
    }
}

impl Api {
    pub fn new(base: &str) -> Self {
        Self(must(kit::api::Api::new(base)))
    }

    /// Enrolls and returns the enrollment JSON; asserts 201 or 200.
    pub async fn enroll(&self, body: Value) -> Value {
        must(self.0.enroll(&body).await)
    }

    pub async fn enroll_queue(&self, queue: &str, target: &str) -> String {
        let body = json!({"queue": address(queue), "target_url": target});
        must(self.0.enroll_id(&body).await)
    }

    /// The port the daemon under this client listens on.
    pub fn port(&self) -> u16 {
        must(self.0.port())
    }

    /// Enrolls `queue` for `target` and waits until its link is attached.
    pub async fn enroll_active(&self, queue: &str, target: &str) -> String {
        let id = self.enroll_queue(queue, target).await;
        self.wait_state(&id, "active", Duration::from_secs(20))
            .await;
        id
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        must(self.0.get(path).await)
    }

    pub async fn delete(&self, id: &str) -> u16 {
        must(self.0.delete(id).await)
    }

    pub async fn post_empty(&self, path: &str) -> (u16, Value) {
        must(self.0.post_empty(path).await)
    }

    pub async fn enrollment(&self, id: &str) -> Value {
        must(self.0.enrollment(id).await)
    }

    /// Waits until the enrollment reports `state`.
    pub async fn wait_state(&self, id: &str, state: &str, limit: Duration) -> Value {
        must(self.0.wait_state(id, state, limit).await)
    }

    /// Waits until the daemon answers `/health`.
    pub async fn wait_healthy(&self) {
        must(self.0.wait_healthy(Duration::from_secs(20)).await);
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
    must(kit::daemon::free_port())
}

/// Starts the binary on `db` and `port` (LOG_LEVEL=warn, no change limit), its output to
/// `log` when given, else stderr; killed when the returned handle drops.
pub fn spawn_daemon(
    db: &Path,
    port: u16,
    log: Option<&Path>,
    extra: &[(&str, &str)],
) -> DaemonProcess {
    let mut env = daemon_env(db, port);
    env.push(("LOG_LEVEL".into(), "warn".into()));
    env.push(("API_RATE_LIMIT_PER_MIN".into(), "0".into()));
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let dir = db.parent().expect("db dir");
    must(kit::daemon::spawn(
        Path::new(env!("CARGO_BIN_EXE_hot-potato")),
        &env,
        dir,
        log,
    ))
}

/// Enrolls `queue` (an existing RabbitMQ queue) for `target` with these delivery settings; the id.
pub async fn enroll_with(api: &Api, queue: &str, target: &str, delivery: Value) -> String {
    let e = api
        .enroll(json!({"queue": address(queue), "target_url": target, "delivery": delivery}))
        .await;
    e["id"].as_str().expect("id").to_string()
}

/// [`enroll_with`], then waits until the enrollment's link is attached; the id.
pub async fn enroll_active_with(api: &Api, queue: &str, target: &str, delivery: Value) -> String {
    let id = enroll_with(api, queue, target, delivery).await;
    api.wait_state(&id, "active", Duration::from_secs(20)).await;
    id
}

/// How many different bodies the target answered 2xx (duplicates counted once).
pub fn distinct_accepted(target: &Target) -> usize {
    let mut bodies = target.accepted_bodies();
    bodies.sort();
    bodies.dedup();
    bodies.len()
}
