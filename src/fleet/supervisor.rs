//! Owns every worker task: starts one per enrollment, restarts a worker that panics (with
//! backoff, logging its enrollment id), stops one on DELETE (and keeps trying to close a
//! durable subscription it could not close, see [`crate::fleet::closer`]), and on shutdown
//! waits for all of them: POSTs still under way near the end of the grace period are
//! abandoned so every worker can settle and detach in time; only then are stragglers aborted
//! and named.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};
use tracing::Instrument;
use uuid::Uuid;

use crate::backoff::Backoff;
use crate::enrollment::live::LiveEnrollment;
use crate::enrollment::record::Enrollment;
use crate::fleet::closer::Closer;
use crate::pipeline::catch::panic_message;
use crate::pipeline::link::{AmqpOpener, LinkOpener};
use crate::pipeline::worker::{self, WorkerContext, WorkerEnd};
use crate::shutdown::StopSignals;
use crate::store::EnrollmentStore;
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
    /// Parent of every worker's abandon token: cancelled as the shutdown deadline nears.
    abandon_all: CancellationToken,
    tracker: TaskTracker,
    /// Subscriptions of deleted enrollments still to be closed.
    closer: Closer,
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
    /// The worker's abandon signal, for a stop that must end sooner than its POSTs would.
    abandon: Option<CancellationToken>,
}

impl WorkerExit {
    /// Whether a worker was running to be stopped.
    pub fn had_worker(&self) -> bool {
        self.finished.is_some()
    }

    /// Whether the worker has exited (or there was none).
    pub fn is_done(&self) -> bool {
        self.finished
            .as_ref()
            .is_none_or(CancellationToken::is_cancelled)
    }

    /// Waits up to `limit` for the worker to exit; if it has not, abandons its POSTs under
    /// way (their messages are handed back) and waits up to `limit` again. `true` if it exited.
    pub async fn abandon_after(self, limit: Duration) -> bool {
        let Some(finished) = self.finished else {
            return true;
        };
        if tokio::time::timeout(limit, finished.cancelled())
            .await
            .is_ok()
        {
            return true;
        }
        if let Some(abandon) = &self.abandon {
            abandon.cancel();
        }
        tokio::time::timeout(limit, finished.cancelled())
            .await
            .is_ok()
    }

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
                abandon_all: CancellationToken::new(),
                closer: Closer::default(),
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
            abandon: self.inner.abandon_all.child_token(),
            remove: CancellationToken::new(),
        };
        let finished = CancellationToken::new();
        let span =
            tracing::info_span!("worker", enrollment_id = %id, queue = %entry.enrollment.queue);
        let generation = entry.status.next_generation();
        let task = supervise(
            self.clone(),
            entry,
            signals.clone(),
            finished.clone(),
            generation,
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
        let metrics = self.inner.ctx.metrics.clone();
        match handle {
            Some(h) => {
                h.signals.remove.cancel();
                h.signals.abandon.cancel();
                h.signals.stop.cancel();
                // Only after the worker's last event, so no late event creates a series again.
                let finished = h.finished.clone();
                self.inner.tracker.spawn(async move {
                    finished.cancelled().await;
                    metrics.forget_enrollment(id);
                });
                WorkerExit {
                    finished: Some(h.finished),
                    abandon: Some(h.signals.abandon),
                }
            }
            None => {
                metrics.forget_enrollment(id);
                WorkerExit {
                    finished: None,
                    abandon: None,
                }
            }
        }
    }

    /// Tells the worker of `id` to stop as on shutdown (finish in-flight POSTs, detach with
    /// `closed=false`) and forgets it, so it can be started again. Used by pause.
    pub fn stop(&self, id: Uuid) -> WorkerExit {
        self.take(id, false)
    }

    /// Tells the worker of `id` to stop at once: POSTs under way are abandoned and their
    /// messages handed back, the link detaches (`closed=false`). Used when a lease can no
    /// longer be renewed, so the worker is gone before the lease expires.
    pub fn fence(&self, id: Uuid) -> WorkerExit {
        self.take(id, true)
    }

    /// Forgets the worker of `id` and tells it to stop, abandoning its POSTs when `abandon`.
    fn take(&self, id: Uuid, abandon: bool) -> WorkerExit {
        match self.workers().remove(&id) {
            Some(h) => {
                if abandon {
                    h.signals.abandon.cancel();
                }
                h.signals.stop.cancel();
                WorkerExit {
                    finished: Some(h.finished),
                    abandon: Some(h.signals.abandon),
                }
            }
            None => WorkerExit {
                finished: None,
                abandon: None,
            },
        }
    }

    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutdown.is_cancelled()
    }

    /// Closes the durable subscription of a deleted enrollment that has no worker (paused, or
    /// refused by the allowlist, or, as one replica of many, deleted while no replica ran it):
    /// attach, then close. Alone, retried until it succeeds or the daemon stops, and listed
    /// meanwhile in [`Supervisor::pending_closes`]; as one replica of many, the outcome is
    /// recorded in the store, which keeps it for a retry (see [`Closer`]).
    pub fn close_subscription(&self, enrollment: Enrollment) {
        if enrollment.subscription_args.durable != Some(true) || self.is_shutting_down() {
            return;
        }
        let span = tracing::info_span!("closer", enrollment_id = %enrollment.id);
        let task = self.inner.closer.run(
            self.inner.ctx.clone(),
            enrollment,
            self.inner.shutdown.child_token(),
            None,
        );
        self.inner.tracker.spawn(task.instrument(span));
    }

    /// As one replica of many: closes are recorded in `store`, which keeps the pending ones
    /// for any replica to retry.
    pub fn share_closes_through(&self, store: Arc<dyn EnrollmentStore>) {
        self.inner.closer.share_through(store);
    }

    /// Deleted enrollments whose durable subscription could not be closed yet.
    pub fn pending_closes(&self) -> Vec<crate::fleet::closer::PendingClose> {
        self.inner.closer.pending()
    }

    /// Stops every worker: they stop receiving, finish and settle what is in flight, and
    /// detach (keeping durable subscriptions). POSTs still under way when most of `grace` has
    /// passed are abandoned and their messages handed back, so the workers can still settle
    /// and detach in time; whatever is left at `grace` is aborted, by name (its link then
    /// detaches without closing, its unsettled messages return to the queue).
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.shutdown.cancel();
        self.inner.tracker.close();
        // Room to settle and detach after abandoning: a quarter of the grace, at most 2 s.
        let margin = (grace / 4).min(Duration::from_secs(2));
        let waited = tokio::time::timeout(grace.saturating_sub(margin), self.inner.tracker.wait())
            .await
            .is_ok();
        if !waited {
            tracing::info!("abandoning POSTs still under way to stop in time");
            self.inner.abandon_all.cancel();
        }
        if waited
            || tokio::time::timeout(margin, self.inner.tracker.wait())
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
/// enrollment id and followed by a restart after a backoff delay. A removed worker that could
/// not close its durable subscription hands it to the closer.
async fn supervise<O: LinkOpener>(
    supervisor: Supervisor<O>,
    entry: Arc<LiveEnrollment>,
    signals: StopSignals,
    finished: CancellationToken,
    generation: u64,
) {
    let _finished = finished.drop_guard();
    let ctx = supervisor.inner.ctx.clone();
    let mut restarts = Backoff::new(ctx.reconnect);
    loop {
        let span = tracing::Span::current();
        // Aborting this supervising task (shutdown deadline) aborts the worker with it.
        let worker = AbortOnDropHandle::new(tokio::spawn(
            worker::run(ctx.clone(), Arc::clone(&entry), signals.clone(), generation)
                .instrument(span),
        ));
        match worker.await {
            Ok(WorkerEnd::CloseFailed(reason)) => {
                // Boxed: a rare path, kept out of the future every idle enrollment holds.
                let closing = Box::pin(supervisor.inner.closer.run(
                    ctx,
                    entry.enrollment.clone(),
                    supervisor.inner.shutdown.child_token(),
                    Some(reason),
                ));
                closing.await;
                return;
            }
            Ok(WorkerEnd::Closed) => {
                // Recorded in a task of its own: the worker's exit need not wait on the store.
                let recording = supervisor.inner.closer.closed(&entry.enrollment);
                supervisor.inner.tracker.spawn(recording.in_current_span());
                return;
            }
            Ok(WorkerEnd::Stopped) => return,
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
                if signals.remove.is_cancelled() {
                    supervisor.close_subscription(entry.enrollment.clone());
                }
                return;
            }
            _ = tokio::time::sleep(restarts.next_delay()) => {}
        }
    }
}
