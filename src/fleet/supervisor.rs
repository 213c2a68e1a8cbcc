//! Owns every worker task: starts one per enrollment, restarts a worker that panics (with
//! backoff, logging its enrollment id), stops one on DELETE, and on shutdown waits for all of
//! them up to the grace period, then aborts and names the stragglers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};
use tracing::Instrument;
use uuid::Uuid;

use crate::backoff::Backoff;
use crate::enrollment::live::LiveEnrollment;
use crate::pipeline::link::{AmqpOpener, LinkOpener};
use crate::pipeline::worker::{self, WorkerContext};
use crate::shutdown::StopSignals;
use crate::telemetry::events::{StatusEvent, WorkerCrashed, WorkerStopped};

/// `O` opens the workers' links: the broker in the daemon, a fake in unit tests.
pub struct Supervisor<O = AmqpOpener> {
    inner: Arc<Inner<O>>,
}

impl<O> Clone for Supervisor<O> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

struct Inner<O> {
    ctx: WorkerContext<O>,
    /// Parent of every worker's stop token: cancelling it is the shutdown broadcast.
    shutdown: CancellationToken,
    tracker: TaskTracker,
    /// Running workers by enrollment id. Std mutex: only held for map operations.
    workers: Mutex<HashMap<Uuid, WorkerHandle>>,
}

struct WorkerHandle {
    signals: StopSignals,
    /// Cancelled when the supervising task ends, however it ends (drop guard).
    finished: CancellationToken,
    abort: tokio::task::AbortHandle,
}

/// Resolves when a removed worker has exited.
pub struct WorkerExit {
    finished: Option<CancellationToken>,
}

impl WorkerExit {
    /// Waits up to `limit` for the worker to exit; `true` if it did.
    pub async fn wait(self, limit: Duration) -> bool {
        match self.finished {
            None => true,
            Some(token) => tokio::time::timeout(limit, token.cancelled()).await.is_ok(),
        }
    }
}

impl<O: LinkOpener> Supervisor<O> {
    pub fn new(ctx: WorkerContext<O>, shutdown: CancellationToken) -> Self {
        Self {
            inner: Arc::new(Inner {
                ctx,
                shutdown,
                tracker: TaskTracker::new(),
                workers: Mutex::new(HashMap::new()),
            }),
        }
    }

    fn workers(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, WorkerHandle>> {
        // The map stays consistent even if a holder panicked: every operation is one call.
        self.inner
            .workers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts the worker for `entry`. A no-op during shutdown.
    pub fn start(&self, entry: Arc<LiveEnrollment>) {
        if self.inner.shutdown.is_cancelled() {
            return;
        }
        let id = entry.enrollment.id;
        let signals = StopSignals {
            stop: self.inner.shutdown.child_token(),
            remove: CancellationToken::new(),
        };
        let finished = CancellationToken::new();
        let span =
            tracing::info_span!("worker", enrollment_id = %id, queue = %entry.enrollment.queue);
        let task = supervise(
            self.inner.ctx.clone(),
            entry,
            signals.clone(),
            finished.clone(),
        );
        let handle = self.inner.tracker.spawn(task.instrument(span));
        let previous = self.workers().insert(
            id,
            WorkerHandle {
                signals,
                finished,
                abort: handle.abort_handle(),
            },
        );
        if let Some(old) = previous {
            // Cannot happen through the registry, which serialises create and delete; if it
            // ever does, two receivers on one enrollment would be worse than one restart.
            tracing::error!(enrollment_id = %id, "a worker was already running; stopping the old one");
            old.signals.stop.cancel();
        }
    }

    /// Tells the worker of `id` to hand back what it holds, close its link and exit.
    pub fn remove(&self, id: Uuid) -> WorkerExit {
        let handle = self.workers().remove(&id);
        match handle {
            Some(h) => {
                h.signals.remove.cancel();
                h.signals.stop.cancel();
                WorkerExit {
                    finished: Some(h.finished),
                }
            }
            None => WorkerExit { finished: None },
        }
    }

    /// Tells the worker of `id` to stop as on shutdown (finish in-flight POSTs, detach with
    /// `closed=false`) and forgets it, so it can be started again. Used by pause.
    pub fn stop(&self, id: Uuid) -> WorkerExit {
        match self.workers().remove(&id) {
            Some(h) => {
                h.signals.stop.cancel();
                WorkerExit {
                    finished: Some(h.finished),
                }
            }
            None => WorkerExit { finished: None },
        }
    }

    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutdown.is_cancelled()
    }

    /// Stops every worker: they stop receiving, finish and settle what is in flight, and
    /// detach (keeping durable subscriptions). After `grace` the rest are aborted, by name;
    /// their unsettled messages return to the queue when their connections drop.
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.shutdown.cancel();
        self.inner.tracker.close();
        if tokio::time::timeout(grace, self.inner.tracker.wait())
            .await
            .is_ok()
        {
            tracing::info!("all workers stopped");
            return;
        }
        let stragglers: Vec<(Uuid, tokio::task::AbortHandle)> = self
            .workers()
            .iter()
            .filter(|(_, h)| !h.finished.is_cancelled())
            .map(|(id, h)| (*id, h.abort.clone()))
            .collect();
        for (id, abort) in &stragglers {
            tracing::warn!(enrollment_id = %id, "worker still busy after the shutdown grace period; aborting it");
            abort.abort();
        }
        if tokio::time::timeout(Duration::from_secs(2), self.inner.tracker.wait())
            .await
            .is_err()
        {
            tracing::error!("some workers did not end after being aborted");
        }
    }
}

/// Runs the worker in its own task so that a panic is caught here, reported with the
/// enrollment id and followed by a restart after a backoff delay.
async fn supervise<O: LinkOpener>(
    ctx: WorkerContext<O>,
    entry: Arc<LiveEnrollment>,
    signals: StopSignals,
    finished: CancellationToken,
) {
    let _finished = finished.drop_guard();
    let mut restarts = Backoff::new(ctx.reconnect);
    loop {
        let span = tracing::Span::current();
        // Aborting this supervising task (shutdown deadline) aborts the worker with it.
        let worker = AbortOnDropHandle::new(tokio::spawn(
            worker::run(ctx.clone(), Arc::clone(&entry), signals.clone()).instrument(span),
        ));
        match worker.await {
            Ok(()) => return,
            Err(e) if e.is_panic() => {
                let reason = panic_message(e.into_panic());
                WorkerCrashed {
                    panic: Some(&reason),
                }
                .emit(&entry.status);
            }
            Err(_) => WorkerCrashed { panic: None }.emit(&entry.status),
        }
        tokio::select! {
            biased;
            _ = signals.stop.cancelled() => {
                WorkerStopped { paused: entry.status.paused() }.emit(&entry.status);
                return;
            }
            _ = tokio::time::sleep(restarts.next_delay()) => {}
        }
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}
