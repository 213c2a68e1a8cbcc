//! Durable subscriptions of deleted enrollments that still have to be closed: a DELETE whose
//! worker had no link up (broker down, enrollment paused or refused) attaches and closes.
//!
//! Alone, a failed close is retried with backoff while the daemon runs, and listed meanwhile
//! (`GET /stats` → `pending_closes`); a daemon stopped before it succeeds forgets it, and the
//! operator deletes the subscription on the broker (the README says how). As one replica of
//! many, the store keeps every pending close (DELETE records it): each close is tried once
//! here and its outcome recorded in the store, whose row is the retry, taken by any replica
//! (so no two replicas retry the same close, and none is forgotten when a replica dies).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::backoff::Backoff;
use crate::enrollment::record::Enrollment;
use crate::enrollment::status::now_rfc3339;
use crate::pipeline::link::LinkOpener;
use crate::pipeline::worker::{WorkerContext, WorkerEnd, close_without_link};
use crate::store::EnrollmentStore;

/// Bound on recording a close's outcome in the store, so a hung database cannot hold a
/// closer task (and the shutdown waiting for it) forever; an outcome not recorded is safe:
/// the close is tried again.
const RECORD_WAIT: Duration = Duration::from_secs(10);

/// A subscription still to be closed.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PendingClose {
    /// The deleted enrollment.
    pub id: Uuid,
    pub queue: String,
    pub attempts: u32,
    pub last_error: Option<String>,
    /// When the enrollment was deleted (RFC 3339).
    pub since: String,
}

#[derive(Clone, Default)]
pub struct Closer {
    /// Std mutex: held only for map operations.
    pending: Arc<Mutex<HashMap<Uuid, PendingClose>>>,
    /// As one replica of many: the store that keeps the pending closes (set once, at load).
    shared: Arc<OnceLock<Arc<dyn EnrollmentStore>>>,
}

impl Closer {
    fn with_pending<T>(&self, f: impl FnOnce(&mut HashMap<Uuid, PendingClose>) -> T) -> T {
        f(&mut self.pending.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn pending(&self) -> Vec<PendingClose> {
        let mut list: Vec<PendingClose> = self.with_pending(|p| p.values().cloned().collect());
        list.sort_by(|a, b| (&a.since, a.id).cmp(&(&b.since, b.id)));
        list
    }

    /// Records every close's outcome in `store`, which retries failed ones (replicas).
    pub fn share_through(&self, store: Arc<dyn EnrollmentStore>) {
        if self.shared.set(store).is_err() {
            tracing::error!("the closer was already given a store; keeping the first");
        }
    }

    /// The subscription of deleted `enrollment` was closed (by its worker or here): as one
    /// replica of many, the store forgets its pending close so no replica closes it again.
    pub fn closed(&self, enrollment: &Enrollment) -> impl Future<Output = ()> + Send + 'static {
        let store = self.shared.get().cloned();
        let (id, durable) = (enrollment.id, enrollment.subscription_args.durable);
        async move {
            let Some(store) = store.filter(|_| durable == Some(true)) else {
                return;
            };
            match tokio::time::timeout(RECORD_WAIT, store.subscription_closed(id)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "closed the subscription but cannot record it; a replica may close it again")
                }
                Err(_) => {
                    tracing::warn!(
                        "closed the subscription; recording it timed out, a replica may close it again"
                    )
                }
            }
        }
    }

    /// Closes `enrollment`'s subscription. Alone: retrying until it succeeds or `stop` is
    /// cancelled. As one replica of many: one attempt, its outcome recorded in the store.
    /// `failed_once`: the worker already tried and failed, with this error.
    pub fn run<O: LinkOpener>(
        &self,
        ctx: WorkerContext<O>,
        enrollment: Enrollment,
        stop: CancellationToken,
        failed_once: Option<String>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let closer = self.clone();
        async move {
            if let Some(store) = closer.shared.get().cloned() {
                closer.once(ctx, store, enrollment, failed_once).await;
            } else {
                closer.retry(ctx, enrollment, stop, failed_once).await;
            }
        }
    }

    async fn once<O: LinkOpener>(
        &self,
        ctx: WorkerContext<O>,
        store: Arc<dyn EnrollmentStore>,
        enrollment: Enrollment,
        failed_once: Option<String>,
    ) {
        let error = match failed_once {
            Some(error) => error,
            None => match close_without_link(&ctx, &enrollment).await {
                WorkerEnd::CloseFailed(error) => error,
                _ => return self.closed(&enrollment).await,
            },
        };
        // No link error quotes the broker URL, so none carries its password.
        tracing::warn!(%error, "cannot close the durable subscription of a deleted enrollment; a replica tries again later");
        let recorded = store.close_failed(enrollment.id, error);
        match tokio::time::timeout(RECORD_WAIT, recorded).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot record the failed close; it is tried again all the same")
            }
            Err(_) => tracing::warn!(
                "recording the failed close timed out; it is tried again all the same"
            ),
        }
    }

    async fn retry<O: LinkOpener>(
        &self,
        ctx: WorkerContext<O>,
        enrollment: Enrollment,
        stop: CancellationToken,
        failed_once: Option<String>,
    ) {
        let id = enrollment.id;
        let mut backoff = Backoff::new(ctx.reconnect);
        let mut last = failed_once;
        loop {
            if let Some(error) = &last {
                tracing::warn!(%error, "cannot close the durable subscription of a deleted enrollment yet; retrying");
                self.with_pending(|p| {
                    let entry = p.entry(id).or_insert_with(|| PendingClose {
                        id,
                        queue: enrollment.queue.clone(),
                        attempts: 0,
                        last_error: None,
                        since: now_rfc3339(),
                    });
                    entry.attempts = entry.attempts.saturating_add(1);
                    entry.last_error = Some(error.clone());
                });
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => {
                        tracing::warn!("stopping before the durable subscription of a deleted enrollment was closed");
                        return;
                    }
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
            match close_without_link(&ctx, &enrollment).await {
                WorkerEnd::CloseFailed(error) => last = Some(error),
                _ => {
                    self.with_pending(|p| p.remove(&id));
                    return;
                }
            }
        }
    }
}
