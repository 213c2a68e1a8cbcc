//! HTTP targets on 127.0.0.1 for the daemon to POST to: [`Target`] answers with a settable
//! status and records (tests) or only counts (benchmark) what it receives; [`HangingTarget`]
//! accepts connections and never answers.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use tokio::net::TcpListener;
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::wait;

/// Bound on a graceful stop (open requests finishing); the server is aborted after it.
const STOP_LIMIT: Duration = Duration::from_secs(10);

/// Nanoseconds since the Unix epoch: what a latency message carries as its body.
pub fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
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

#[derive(Default)]
struct Shared {
    /// Keep every request in `received` (tests); off, the target only counts (benchmark).
    record: bool,
    received: Mutex<Vec<Received>>,
    /// Publish-to-POST latencies in ns, when bodies carry a publish time ([`now_nanos`]).
    latencies: Option<Mutex<Vec<u64>>>,
    status: AtomicU16,
    /// When set, chooses each answer's status from the request body instead of `status`.
    status_by_body: Mutex<Option<StatusRule>>,
    delay_ms: AtomicU64,
    current: AtomicUsize,
    max_concurrent: AtomicUsize,
    count: AtomicUsize,
    /// When `count` reached `goal` (see [`Target::reset`]).
    goal: AtomicUsize,
    reached: Mutex<Option<Instant>>,
}

/// An HTTP target that answers every request (any path) with a settable status, and can be
/// stopped and started again on the same port. The server ends when it is dropped.
pub struct Target {
    state: Arc<Shared>,
    addr: SocketAddr,
    /// The runtime the server runs on: the caller's, or one given (see [`Target::counting_on`]).
    runtime: Handle,
    /// Tells the server to stop gracefully, and its task.
    server: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl Target {
    /// A target that records every request (see [`Target::received`]) and answers 200.
    pub async fn start() -> Result<Self> {
        Self::bind(true, false, Handle::current()).await
    }

    /// A target that only counts requests, for runs too long to keep them all; with
    /// `latencies`, it also keeps the delay since the publish time each body carries.
    pub async fn counting(latencies: bool) -> Result<Self> {
        Self::bind(false, latencies, Handle::current()).await
    }

    /// [`Target::counting`] served on `runtime`: the benchmark gives it one thread of its own,
    /// so that the target's connections are not passed between the workers of the runtime that
    /// publishes and polls.
    pub async fn counting_on(runtime: Handle, latencies: bool) -> Result<Self> {
        Self::bind(false, latencies, runtime).await
    }

    async fn bind(record: bool, latencies: bool, runtime: Handle) -> Result<Self> {
        // Bound on the runtime that serves it: a socket wakes the runtime it was made on.
        let listener = runtime.spawn(TcpListener::bind("127.0.0.1:0")).await??;
        let addr = listener.local_addr()?;
        let state = Arc::new(Shared {
            record,
            latencies: latencies.then(Mutex::default),
            status: AtomicU16::new(200),
            ..Shared::default()
        });
        let mut target = Self {
            state,
            addr,
            runtime,
            server: None,
        };
        target.serve(listener);
        Ok(target)
    }

    fn serve(&mut self, listener: TcpListener) {
        let (tx, rx) = oneshot::channel();
        let app = Router::new()
            .fallback(answer)
            .with_state(Arc::clone(&self.state));
        let handle = self.runtime.spawn(async move {
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
        *lock(&self.state.status_by_body) = Some(rule);
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

    /// Every request so far, in arrival order (empty for a counting target).
    pub fn received(&self) -> Vec<Received> {
        lock(&self.state.received).clone()
    }

    /// Requests answered so far (since the last [`Target::reset`]), a batched POST counting
    /// as the messages its `hot-potato-batch-size` header says it carries.
    pub fn count(&self) -> usize {
        self.state.count.load(Ordering::SeqCst)
    }

    /// Bodies of the requests answered 2xx, in arrival order.
    pub fn accepted_bodies(&self) -> Vec<String> {
        self.received()
            .iter()
            .filter(|r| (200..300).contains(&r.status))
            .map(Received::text)
            .collect()
    }

    /// Counts from 0 again and notes when `goal` requests have arrived (see
    /// [`Target::reached`]). Recorded requests and latencies are kept.
    pub fn reset(&self, goal: usize) {
        self.state.goal.store(goal, Ordering::SeqCst);
        *lock(&self.state.reached) = None;
        self.state.count.store(0, Ordering::SeqCst);
    }

    /// When the count reached the goal given to [`Target::reset`].
    pub fn reached(&self) -> Option<Instant> {
        *lock(&self.state.reached)
    }

    /// Publish-to-POST latencies in ns (a target made with `counting(true)`).
    pub fn latencies(&self) -> Vec<u64> {
        self.state
            .latencies
            .as_ref()
            .map(|l| lock(l).clone())
            .unwrap_or_default()
    }

    /// Stops listening: connections are then refused. Waits for open requests to finish, at
    /// most 10 s, then aborts the server.
    pub async fn stop(&mut self) {
        if let Some((tx, handle)) = self.server.take() {
            let _ = tx.send(());
            let abort = handle.abort_handle();
            if tokio::time::timeout(STOP_LIMIT, handle).await.is_err() {
                abort.abort();
            }
        }
    }

    /// Listens again on the same port (waiting up to 10 s for it to be free).
    pub async fn restart(&mut self) -> Result<()> {
        let addr = self.addr;
        let runtime = &self.runtime;
        let listener = wait::wait_for(
            "the target port to be free",
            Duration::from_secs(10),
            Duration::from_millis(50),
            || async move { Ok(runtime.spawn(TcpListener::bind(addr)).await?.ok()) },
        )
        .await?;
        self.serve(listener);
        Ok(())
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some((_, handle)) = self.server.take() {
            handle.abort();
        }
    }
}

async fn answer(State(state): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    if let Some(latencies) = &state.latencies {
        let sent = std::str::from_utf8(&body)
            .ok()
            .and_then(|t| t.trim().parse::<u128>().ok());
        if let Some(sent) = sent {
            let ns = now_nanos().saturating_sub(sent);
            lock(latencies).push(u64::try_from(ns).unwrap_or(u64::MAX));
        }
    }
    let now_open = state.current.fetch_add(1, Ordering::SeqCst) + 1;
    state.max_concurrent.fetch_max(now_open, Ordering::SeqCst);
    let delay = state.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    state.current.fetch_sub(1, Ordering::SeqCst);
    // A batched POST (`delivery.batch`) counts as the messages it carries.
    let messages = headers
        .get("hot-potato-batch-size")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1);
    let rule = *lock(&state.status_by_body);
    let status = match rule {
        Some(rule) => rule(&String::from_utf8_lossy(&body)),
        None => state.status.load(Ordering::SeqCst),
    };
    if state.record {
        lock(&state.received).push(Received {
            headers,
            body,
            at: Instant::now(),
            status,
        });
    }
    let before = state.count.fetch_add(messages, Ordering::SeqCst);
    let goal = state.goal.load(Ordering::SeqCst);
    if before < goal && before + messages >= goal {
        *lock(&state.reached) = Some(Instant::now());
    }
    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// A target that accepts TCP connections and never answers; it stops when dropped.
pub struct HangingTarget {
    pub url: String,
    task: JoinHandle<()>,
}

impl HangingTarget {
    pub async fn start() -> Result<Self> {
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
