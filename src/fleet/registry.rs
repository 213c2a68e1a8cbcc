//! The enrollment map and the one place that changes it: a create, pause or delete is
//! committed to the store first, then applied to the map and to the supervisor, all under one
//! lock so that map, store and running workers never disagree.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use uuid::Uuid;

use crate::enrollment::live::LiveEnrollment;
use crate::enrollment::policy::DeliveryDefaults;
use crate::enrollment::record::NewEnrollment;
use crate::enrollment::status::now_rfc3339;
use crate::enrollment::target::TargetPolicy;
use crate::fleet::supervisor::{Supervisor, WorkerExit};
use crate::pipeline::link::{AmqpOpener, LinkOpener};
use crate::store::{EnrollmentStore, StoreError, StoredEnrollment};
use crate::telemetry::events::{Connecting, StatusEvent, WorkerRefused, WorkerStopped};

/// How long pause waits for the worker to finish its in-flight POSTs and detach.
const PAUSE_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

/// Whether `create` made a new enrollment or found the existing one for that pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    New,
    Existing,
}

/// `O` opens the workers' links (see [`Supervisor`]).
pub struct Registry<O = AmqpOpener> {
    pub(super) inner: Arc<Inner<O>>,
}

impl<O> Clone for Registry<O> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

pub(super) struct Inner<O> {
    pub(super) store: Arc<dyn EnrollmentStore>,
    pub(super) supervisor: Supervisor<O>,
    pub(super) defaults: DeliveryDefaults,
    target_policy: TargetPolicy,
    /// The read path. A std lock: held only for map operations, never across `.await`.
    map: RwLock<HashMap<Uuid, Arc<LiveEnrollment>>>,
    /// Enrollments whose stored settings could not be read at start, with the reason: listed
    /// as stopped and never started. Fixed after load, so no lock.
    pub(super) unreadable: Mutex<HashMap<Uuid, String>>,
    /// Serialises create/delete end to end (disk, map, worker) so concurrent requests for the
    /// same pair or id cannot interleave.
    pub(super) writes: tokio::sync::Mutex<()>,
    /// `None` alone: every enrollment runs here. `Some` as one replica of many: only the
    /// enrollments in the set, whose leases this replica holds (see `fleet::shared`).
    /// Std mutex: held for set operations only.
    pub(super) owned: Option<Mutex<HashSet<Uuid>>>,
}

impl<O: LinkOpener> Registry<O> {
    /// Loads every stored enrollment and starts its worker, except for targets the current
    /// `TARGET_ALLOWLIST` refuses: those stay listed, stopped, with the reason.
    pub async fn load(
        store: Arc<dyn EnrollmentStore>,
        supervisor: Supervisor<O>,
        defaults: DeliveryDefaults,
        target_policy: TargetPolicy,
    ) -> Result<Self, StoreError> {
        Self::load_with(store, supervisor, defaults, target_policy, false).await
    }

    /// Loads every stored enrollment as one replica of many: none is started here; the
    /// enrollments whose leases this replica takes are started by [`Registry::adopt`]. The
    /// store keeps the subscriptions deleted enrollments leave to close, for any replica.
    pub async fn load_shared(
        store: Arc<dyn EnrollmentStore>,
        supervisor: Supervisor<O>,
        defaults: DeliveryDefaults,
        target_policy: TargetPolicy,
    ) -> Result<Self, StoreError> {
        supervisor.share_closes_through(Arc::clone(&store));
        Self::load_with(store, supervisor, defaults, target_policy, true).await
    }

    async fn load_with(
        store: Arc<dyn EnrollmentStore>,
        supervisor: Supervisor<O>,
        defaults: DeliveryDefaults,
        target_policy: TargetPolicy,
        shared: bool,
    ) -> Result<Self, StoreError> {
        let stored = store.load_stored().await?;
        let mut map = HashMap::with_capacity(stored.len());
        let mut unreadable = HashMap::new();
        for StoredEnrollment {
            enrollment,
            unreadable: reason,
        } in stored
        {
            let paused = enrollment.paused;
            let entry = Arc::new(LiveEnrollment::new(enrollment, &defaults));
            let id = entry.enrollment.id;
            let admitted = match reason {
                Some(reason) => {
                    unreadable.insert(id, reason.clone());
                    Err(reason)
                }
                None => check_target(&target_policy, &entry.enrollment.target_url),
            };
            match admitted {
                Ok(()) if paused => WorkerStopped { paused }.emit(&entry.status),
                Ok(()) if shared => {}
                Ok(()) => supervisor.start(Arc::clone(&entry)),
                Err(reason) => WorkerRefused { reason: &reason }.emit(&entry.status),
            }
            map.insert(id, entry);
        }
        tracing::info!(count = map.len(), "loaded enrollments");
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                supervisor,
                defaults,
                target_policy,
                map: RwLock::new(map),
                unreadable: Mutex::new(unreadable),
                writes: tokio::sync::Mutex::new(()),
                owned: shared.then(|| Mutex::new(HashSet::new())),
            }),
        })
    }

    fn read_map<T>(&self, f: impl FnOnce(&HashMap<Uuid, Arc<LiveEnrollment>>) -> T) -> T {
        // A poisoned lock only means a panic elsewhere mid-read; the map itself is intact.
        let guard = self
            .inner
            .map
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&guard)
    }

    pub(super) fn write_map<T>(
        &self,
        f: impl FnOnce(&mut HashMap<Uuid, Arc<LiveEnrollment>>) -> T,
    ) -> T {
        let mut guard = self
            .inner
            .map
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut guard)
    }

    pub fn len(&self) -> usize {
        self.read_map(HashMap::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every entry, oldest first (ties broken by id so the order is stable).
    pub fn sorted_entries(&self) -> Vec<Arc<LiveEnrollment>> {
        let mut entries: Vec<Arc<LiveEnrollment>> =
            self.read_map(|m| m.values().cloned().collect());
        entries.sort_by(|a, b| {
            (&a.enrollment.created_at, a.enrollment.id)
                .cmp(&(&b.enrollment.created_at, b.enrollment.id))
        });
        entries
    }

    pub fn get(&self, id: Uuid) -> Option<Arc<LiveEnrollment>> {
        self.read_map(|m| m.get(&id).cloned())
    }

    pub fn store(&self) -> &dyn EnrollmentStore {
        self.inner.store.as_ref()
    }

    /// Whether a stored enrollment may run: its settings were readable and the target is
    /// admitted.
    pub(super) fn admit(&self, entry: &LiveEnrollment) -> Result<(), String> {
        let unreadable = self
            .inner
            .unreadable
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&entry.enrollment.id)
            .cloned();
        if let Some(reason) = unreadable {
            return Err(reason);
        }
        check_target(&self.inner.target_policy, &entry.enrollment.target_url)
    }

    /// The target rules enrollments are checked against.
    pub fn target_policy(&self) -> &TargetPolicy {
        &self.inner.target_policy
    }

    /// Whether `TARGET_ALLOWLIST` and the guarded ranges admit `target_url`.
    pub fn check_target(&self, target_url: &str) -> Result<(), String> {
        check_target(&self.inner.target_policy, target_url)
    }

    /// Creates an enrollment, or returns the one that already pushes `queue` to `target_url`.
    pub async fn create(
        &self,
        new: NewEnrollment,
    ) -> Result<(Created, Arc<LiveEnrollment>), StoreError> {
        let _writes = self.inner.writes.lock().await;
        let existing = self.read_map(|m| {
            m.values()
                .find(|e| {
                    e.enrollment.queue == new.queue && e.enrollment.target_url == new.target_url
                })
                .cloned()
        });
        if let Some(entry) = existing {
            return Ok((Created::Existing, entry));
        }
        let enrollment = new.into_enrollment(Uuid::new_v4(), now_rfc3339());
        if let Err(e) = self.inner.store.insert(enrollment.clone()).await {
            // Another replica may have stored the same pair a moment ago: the store's unique
            // constraint decided, and its row is the answer.
            return match self
                .stored_pair(&enrollment.queue, &enrollment.target_url)
                .await
            {
                Some(entry) => Ok((Created::Existing, entry)),
                None => Err(e),
            };
        }
        let entry = Arc::new(LiveEnrollment::new(enrollment, &self.inner.defaults));
        self.write_map(|m| m.insert(entry.enrollment.id, Arc::clone(&entry)));
        // As one replica of many, the lease holder starts it (every replica hears of it).
        if self.inner.owned.is_none() {
            self.inner.supervisor.start(Arc::clone(&entry));
        }
        tracing::info!(enrollment_id = %entry.enrollment.id, queue = %entry.enrollment.queue, "enrolled");
        Ok((Created::New, entry))
    }

    /// Pauses or resumes an enrollment: the flag is committed first, then the worker is
    /// stopped (link detached, `closed=false`, so a durable subscription keeps its messages)
    /// or started. `None` for an unknown id.
    pub async fn set_paused(
        &self,
        id: Uuid,
        paused: bool,
    ) -> Result<Option<Arc<LiveEnrollment>>, StoreError> {
        let (entry, stopping) = {
            let _writes = self.inner.writes.lock().await;
            let Some(entry) = self.get(id) else {
                return Ok(None);
            };
            if entry.status.paused() == paused {
                return Ok(Some(entry));
            }
            self.inner.store.set_paused(id, paused).await?;
            entry.status.set_paused(paused);
            if !self.runs_here(id) {
                // The owner hears of the change from the store and applies it.
                tracing::info!(enrollment_id = %id, paused, "pause changed; the owner applies it");
                return Ok(Some(entry));
            }
            let stopping = if paused {
                tracing::info!(enrollment_id = %id, "paused");
                Some(self.inner.supervisor.stop(id))
            } else {
                match self.admit(&entry) {
                    Ok(()) => {
                        Connecting.emit(&entry.status);
                        self.inner.supervisor.start(Arc::clone(&entry));
                    }
                    Err(reason) => WorkerRefused { reason: &reason }.emit(&entry.status),
                }
                tracing::info!(enrollment_id = %id, "resumed");
                None
            };
            (entry, stopping)
        };
        // Waited for outside the lock: other changes need not queue behind a slow POST. The
        // worker reports `paused` itself when it ends; one that was not running is paused now.
        if let Some(exit) = stopping {
            if !exit.had_worker() {
                WorkerStopped { paused: true }.emit(&entry.status);
            } else if !exit.wait(PAUSE_WAIT).await {
                tracing::warn!(enrollment_id = %id, "worker still finishing after pause answered");
            }
        }
        Ok(Some(entry))
    }

    /// Deletes an enrollment and stops its worker, closing its link. `None` for an unknown id.
    /// Returns once the worker has exited or `stop_wait` has passed.
    pub async fn delete(&self, id: Uuid) -> Result<Option<WorkerExit>, StoreError> {
        let _writes = self.inner.writes.lock().await;
        if self.get(id).is_none() {
            return Ok(None);
        }
        self.inner.store.delete(id).await?;
        let removed = self.write_map(|m| m.remove(&id));
        if !self.runs_here(id) {
            // The owner hears of the delete from the store and closes the link itself.
            tracing::info!(enrollment_id = %id, "deleted enrollment; the owner closes its link");
            return Ok(Some(self.inner.supervisor.stop(id)));
        }
        self.disown(id);
        let exit = self.inner.supervisor.remove(id);
        if !exit.had_worker()
            && let Some(entry) = removed
        {
            // Paused or refused: no worker to close the subscription, so one is closed here.
            self.inner
                .supervisor
                .close_subscription(entry.enrollment.clone());
        }
        tracing::info!(enrollment_id = %id, "deleted enrollment");
        Ok(Some(exit))
    }
}
fn check_target(policy: &TargetPolicy, target_url: &str) -> Result<(), String> {
    let url =
        url::Url::parse(target_url).map_err(|e| format!("`target_url` is not a valid URL: {e}"))?;
    policy.check_url(&url)
}
