//! Durable subscriptions of deleted enrollments that still have to be closed: a DELETE whose
//! worker had no link up (broker down, enrollment paused or refused) attaches and closes; when
//! that fails it is retried with backoff while the daemon runs, and listed meanwhile (`GET
//! /stats` → `pending_closes`). A daemon stopped before it succeeds forgets it: the operator
//! then deletes the subscription on the broker (the README says how).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::backoff::Backoff;
use crate::enrollment::live::LiveEnrollment;
use crate::enrollment::status::now_rfc3339;
use crate::pipeline::link::LinkOpener;
use crate::pipeline::worker::{WorkerContext, WorkerEnd, close_without_link};

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

    /// Closes `entry`'s subscription, retrying until it succeeds or `stop` is cancelled.
    /// `failed_once`: the worker already tried and failed, with this error.
    pub fn run<O: LinkOpener>(
        &self,
        ctx: WorkerContext<O>,
        entry: Arc<LiveEnrollment>,
        stop: CancellationToken,
        failed_once: Option<String>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let closer = self.clone();
        async move {
            let id = entry.enrollment.id;
            let mut backoff = Backoff::new(ctx.reconnect);
            let mut last = failed_once;
            loop {
                if let Some(error) = &last {
                    tracing::warn!(%error, "cannot close the durable subscription of a deleted enrollment yet; retrying");
                    closer.with_pending(|p| {
                        let entry = p.entry(id).or_insert_with(|| PendingClose {
                            id,
                            queue: entry.enrollment.queue.clone(),
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
                match close_without_link(&ctx, &entry.enrollment).await {
                    WorkerEnd::CloseFailed(error) => last = Some(error),
                    _ => {
                        closer.with_pending(|p| p.remove(&id));
                        return;
                    }
                }
            }
        }
    }
}
