//! The registry as one replica of many (`DATABASE_URL`): every replica lists every
//! enrollment, but runs only those whose lease it holds. The replica room (`cluster`, which
//! calls in here and is never called from here) decides which: it adopts an enrollment when
//! it takes its lease, releases one it hands over or can no longer renew, and applies the
//! changes other replicas made, which it hears of from the store.

use std::collections::HashSet;
use std::sync::{Arc, MutexGuard};

use uuid::Uuid;

use crate::enrollment::live::LiveEnrollment;
use crate::enrollment::record::Enrollment;
use crate::fleet::registry::Registry;
use crate::fleet::supervisor::WorkerExit;
use crate::pipeline::link::LinkOpener;
use crate::store::StoredEnrollment;
use crate::telemetry::events::{Connecting, StatusEvent, WorkerRefused, WorkerStopped};

/// How a released enrollment's worker ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// Handing over (rebalance, shutdown): POSTs under way finish and are settled, then the
    /// link detaches.
    HandOver,
    /// Fencing (the lease could not be renewed): POSTs under way are abandoned and their
    /// messages handed back, so the link detaches before the lease expires.
    Fence,
}

impl<O: LinkOpener> Registry<O> {
    fn owned_set(&self) -> Option<MutexGuard<'_, HashSet<Uuid>>> {
        self.inner
            .owned
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    /// Whether this daemon runs `id`: always when alone, else when it holds the lease.
    pub fn runs_here(&self, id: Uuid) -> bool {
        self.owned_set().is_none_or(|owned| owned.contains(&id))
    }

    /// Whether this daemon is one replica of many.
    pub fn is_shared(&self) -> bool {
        self.inner.owned.is_some()
    }

    pub(super) fn disown(&self, id: Uuid) -> bool {
        self.owned_set().is_some_and(|mut owned| owned.remove(&id))
    }

    /// The enrollments this replica runs.
    pub fn owned_ids(&self) -> Vec<Uuid> {
        self.owned_set()
            .map(|owned| owned.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Every listed enrollment id.
    pub fn ids(&self) -> Vec<Uuid> {
        self.sorted_entries()
            .iter()
            .map(|e| e.enrollment.id)
            .collect()
    }

    /// The stored enrollment for `queue` and `target_url`, listed here if it was not yet
    /// (replicas only: alone, the map already has every row).
    pub(super) async fn stored_pair(
        &self,
        queue: &str,
        target_url: &str,
    ) -> Option<Arc<LiveEnrollment>> {
        if !self.is_shared() {
            return None;
        }
        let stored = self.inner.store.load_stored().await.ok()?;
        let row = stored
            .into_iter()
            .find(|row| row.enrollment.queue == queue && row.enrollment.target_url == target_url)?;
        let id = row.enrollment.id;
        if self.get(id).is_none() {
            self.list_stored(row);
        }
        self.get(id)
    }

    /// Runs `id` here: its lease was just taken. A paused or refused enrollment is owned but
    /// not started. `false` for an id no longer listed or already owned.
    pub async fn adopt(&self, id: Uuid) -> bool {
        let _writes = self.inner.writes.lock().await;
        let Some(entry) = self.get(id) else {
            return false;
        };
        let newly = self.owned_set().is_some_and(|mut owned| owned.insert(id));
        if !newly || self.inner.supervisor.is_shutting_down() {
            return newly;
        }
        self.start_owned(&entry);
        tracing::info!(enrollment_id = %id, "took the lease; running it here");
        true
    }

    fn start_owned(&self, entry: &Arc<LiveEnrollment>) {
        match self.admit(entry) {
            Ok(()) if entry.status.paused() => WorkerStopped { paused: true }.emit(&entry.status),
            Ok(()) => {
                Connecting.emit(&entry.status);
                self.inner.supervisor.start(Arc::clone(entry));
            }
            Err(reason) => WorkerRefused { reason: &reason }.emit(&entry.status),
        }
    }

    /// Stops running `id` here (its link detaches, never closes). `None` when it was not owned.
    pub fn release(&self, id: Uuid, how: Release) -> Option<WorkerExit> {
        if !self.disown(id) {
            return None;
        }
        tracing::info!(enrollment_id = %id, ?how, "released; another replica runs it");
        Some(match how {
            Release::HandOver => self.inner.supervisor.stop(id),
            Release::Fence => self.inner.supervisor.fence(id),
        })
    }

    /// Applies a row another replica wrote (or this one: then nothing changes): a new
    /// enrollment is listed, a pause or resume is applied by the owner.
    pub async fn apply_stored(&self, stored: StoredEnrollment) {
        let _writes = self.inner.writes.lock().await;
        let id = stored.enrollment.id;
        let Some(entry) = self.get(id) else {
            self.list_stored(stored);
            tracing::info!(enrollment_id = %id, "enrollment made on another replica listed");
            return;
        };
        let paused = stored.enrollment.paused;
        if entry.status.paused() == paused {
            return;
        }
        entry.status.set_paused(paused);
        if !self.runs_here(id) {
            return;
        }
        if paused {
            tracing::info!(enrollment_id = %id, "paused on another replica; stopping here");
            let exit = self.inner.supervisor.stop(id);
            if !exit.had_worker() {
                WorkerStopped { paused: true }.emit(&entry.status);
            }
        } else {
            tracing::info!(enrollment_id = %id, "resumed on another replica; starting here");
            self.start_owned(&entry);
        }
    }

    /// Lists a stored enrollment this replica did not know (not started: its lease decides).
    fn list_stored(&self, stored: StoredEnrollment) {
        let id = stored.enrollment.id;
        let paused = stored.enrollment.paused;
        let entry = Arc::new(LiveEnrollment::new(stored.enrollment, &self.inner.defaults));
        entry.status.set_paused(paused);
        if let Some(reason) = stored.unreadable {
            WorkerRefused { reason: &reason }.emit(&entry.status);
            self.unreadable_mut(|u| u.insert(id, reason));
        } else if paused {
            WorkerStopped { paused }.emit(&entry.status);
        }
        self.write_map(|m| m.insert(id, entry));
    }

    /// Forgets an enrollment deleted on another replica; its owner closes its link
    /// (`closed=true`), as DELETE does.
    pub async fn forget(&self, id: Uuid) {
        let _writes = self.inner.writes.lock().await;
        let Some(entry) = self.write_map(|m| m.remove(&id)) else {
            return;
        };
        self.unreadable_mut(|u| u.remove(&id));
        if !self.disown(id) {
            return;
        }
        tracing::info!(enrollment_id = %id, "deleted on another replica; closing its link here");
        let exit = self.inner.supervisor.remove(id);
        if !exit.had_worker() {
            self.inner
                .supervisor
                .close_subscription(entry.enrollment.clone());
        }
    }

    /// Closes the durable subscription of an enrollment deleted while no replica closed it,
    /// claimed from the store: never one still run here (its worker closes or detaches it; the
    /// claim runs out and it is tried again).
    pub fn close_deleted(&self, enrollment: Enrollment) -> bool {
        if self.runs_here(enrollment.id) {
            return false;
        }
        tracing::info!(enrollment_id = %enrollment.id, queue = %enrollment.queue, "closing the durable subscription of an enrollment deleted while no replica closed it");
        self.inner.supervisor.close_subscription(enrollment);
        true
    }

    fn unreadable_mut<T>(
        &self,
        f: impl FnOnce(&mut std::collections::HashMap<Uuid, String>) -> T,
    ) -> T {
        let mut guard = self
            .inner
            .unreadable
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut guard)
    }
}
