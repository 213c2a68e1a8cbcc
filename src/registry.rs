//! The enrollment map, the read path of the API, and the one place that changes it: a create
//! or delete is committed to SQLite first, then applied to the map and to the supervisor, all
//! under one lock so that map, disk and running workers never disagree.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use crate::amqp_link::FailureOutcome;
use crate::config::redact_url;
use crate::enrollment::{Enrollment, NewEnrollment};
use crate::store::{Store, StoreError};
use crate::supervisor::{Supervisor, WorkerExit};

/// Where an enrollment's worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum WorkerState {
    Connecting = 0,
    Active = 1,
    Backoff = 2,
    Stopped = 3,
}

impl WorkerState {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Connecting,
            1 => Self::Active,
            2 => Self::Backoff,
            _ => Self::Stopped,
        }
    }
}

/// Live status of one enrollment, written by its worker and read by the API. Atomics and
/// short std-mutex sections keep the per-message cost at a few uncontended writes.
#[derive(Debug)]
pub struct EnrollmentStatus {
    state: AtomicU8,
    delivered: AtomicU64,
    failed: AtomicU64,
    failure_outcome: Mutex<Option<FailureOutcome>>,
    last_error: Mutex<Option<String>>,
}

impl Default for EnrollmentStatus {
    fn default() -> Self {
        Self {
            state: AtomicU8::new(WorkerState::Connecting as u8),
            delivered: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            failure_outcome: Mutex::new(None),
            last_error: Mutex::new(None),
        }
    }
}

impl EnrollmentStatus {
    pub fn state(&self) -> WorkerState {
        WorkerState::from_u8(self.state.load(Ordering::Relaxed))
    }
    pub fn set_state(&self, state: WorkerState) {
        self.state.store(state as u8, Ordering::Relaxed);
    }
    pub fn record_delivered(&self) {
        self.delivered.fetch_add(1, Ordering::Relaxed);
    }
    pub fn record_failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
    pub fn set_failure_outcome(&self, outcome: FailureOutcome) {
        if let Ok(mut slot) = self.failure_outcome.lock() {
            *slot = Some(outcome);
        }
    }
    pub fn failure_outcome(&self) -> Option<FailureOutcome> {
        self.failure_outcome.lock().ok().and_then(|s| *s)
    }
    pub fn set_last_error(&self, error: impl Into<String>) {
        if let Ok(mut slot) = self.last_error.lock() {
            *slot = Some(error.into());
        }
    }
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|s| s.clone())
    }
}

/// One entry of the map: the stored record and its live status.
#[derive(Debug)]
pub struct Entry {
    pub enrollment: Enrollment,
    pub status: Arc<EnrollmentStatus>,
}

/// The JSON shape of an enrollment in API answers.
#[derive(Debug, Serialize)]
pub struct EnrollmentView {
    #[serde(flatten)]
    pub enrollment: Enrollment,
    pub state: WorkerState,
    pub delivered: u64,
    pub failed: u64,
    /// How failed deliveries are handed back, known once the link has attached.
    pub failure_outcome: Option<FailureOutcome>,
    pub last_error: Option<String>,
}

impl Entry {
    pub fn view(&self) -> EnrollmentView {
        let mut enrollment = self.enrollment.clone();
        // Only rewrite URLs that carry a password: parsing normalises the text otherwise.
        if let Ok(url) = url::Url::parse(&enrollment.target_url)
            && url.password().is_some()
        {
            enrollment.target_url = redact_url(&url);
        }
        EnrollmentView {
            enrollment,
            state: self.status.state(),
            delivered: self.status.delivered(),
            failed: self.status.failed(),
            failure_outcome: self.status.failure_outcome(),
            last_error: self.status.last_error(),
        }
    }
}

/// Whether `create` made a new enrollment or found the existing one for that pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    New,
    Existing,
}

#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    supervisor: Supervisor,
    /// The read path. A std lock: held only for map operations, never across `.await`.
    map: RwLock<HashMap<Uuid, Arc<Entry>>>,
    /// Serialises create/delete end to end (disk, map, worker) so concurrent requests for the
    /// same pair or id cannot interleave.
    writes: tokio::sync::Mutex<()>,
}

impl Registry {
    /// Loads every stored enrollment and starts its worker.
    pub async fn load(store: Store, supervisor: Supervisor) -> Result<Self, StoreError> {
        let stored = store.load_all().await?;
        let mut map = HashMap::with_capacity(stored.len());
        for enrollment in stored {
            let entry = Arc::new(Entry {
                enrollment,
                status: Arc::default(),
            });
            supervisor.start(Arc::clone(&entry));
            map.insert(entry.enrollment.id, entry);
        }
        tracing::info!(count = map.len(), "loaded enrollments");
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                supervisor,
                map: RwLock::new(map),
                writes: tokio::sync::Mutex::new(()),
            }),
        })
    }

    fn read_map<T>(&self, f: impl FnOnce(&HashMap<Uuid, Arc<Entry>>) -> T) -> T {
        // A poisoned lock only means a panic elsewhere mid-read; the map itself is intact.
        let guard = self
            .inner
            .map
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&guard)
    }

    fn write_map<T>(&self, f: impl FnOnce(&mut HashMap<Uuid, Arc<Entry>>) -> T) -> T {
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

    /// All enrollments, oldest first.
    pub fn list(&self) -> Vec<EnrollmentView> {
        let mut entries: Vec<Arc<Entry>> = self.read_map(|m| m.values().cloned().collect());
        entries.sort_by(|a, b| {
            (&a.enrollment.created_at, a.enrollment.id)
                .cmp(&(&b.enrollment.created_at, b.enrollment.id))
        });
        entries.iter().map(|e| e.view()).collect()
    }

    pub fn get(&self, id: Uuid) -> Option<Arc<Entry>> {
        self.read_map(|m| m.get(&id).cloned())
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Creates an enrollment, or returns the one that already pushes `queue` to `target_url`.
    pub async fn create(&self, new: NewEnrollment) -> Result<(Created, Arc<Entry>), StoreError> {
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
        let enrollment = Enrollment {
            id: Uuid::new_v4(),
            queue: new.queue,
            target_url: new.target_url,
            subscription_args: new.subscription_args,
            created_at: now_rfc3339(),
        };
        self.inner.store.insert(enrollment.clone()).await?;
        let entry = Arc::new(Entry {
            enrollment,
            status: Arc::default(),
        });
        self.write_map(|m| m.insert(entry.enrollment.id, Arc::clone(&entry)));
        self.inner.supervisor.start(Arc::clone(&entry));
        tracing::info!(enrollment_id = %entry.enrollment.id, queue = %entry.enrollment.queue, "enrolled");
        Ok((Created::New, entry))
    }

    /// Deletes an enrollment and stops its worker, closing its link. `None` for an unknown id.
    /// Returns once the worker has exited or `stop_wait` has passed.
    pub async fn delete(&self, id: Uuid) -> Result<Option<WorkerExit>, StoreError> {
        let _writes = self.inner.writes.lock().await;
        if self.get(id).is_none() {
            return Ok(None);
        }
        self.inner.store.delete(id).await?;
        self.write_map(|m| m.remove(&id));
        let exit = self.inner.supervisor.remove(id);
        tracing::info!(enrollment_id = %id, "deleted enrollment");
        Ok(Some(exit))
    }
}

fn now_rfc3339() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}
