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

use crate::allowlist::TargetAllowlist;
use crate::amqp_link::FailureOutcome;
use crate::breaker::BreakerState;
use crate::config::redact_url;
use crate::enrollment::{Enrollment, NewEnrollment, SubscriptionArgs};
use crate::policy::{DeliveryDefaults, DeliveryPolicy};
use crate::store::{Store, StoreError};
use crate::supervisor::{Supervisor, WorkerExit};

/// Where an enrollment's worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum WorkerState {
    Connecting = 0,
    Active = 1,
    Backoff = 2,
    Stopped = 3,
    /// Paused through the API: the link is detached, messages wait in the broker.
    Paused = 4,
}

impl WorkerState {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Connecting,
            1 => Self::Active,
            2 => Self::Backoff,
            4 => Self::Paused,
            _ => Self::Stopped,
        }
    }
}

/// Live status of one enrollment, written by its worker and read by the API. Atomics and
/// short std-mutex sections keep the per-message cost at a few uncontended writes.
#[derive(Debug)]
pub struct EnrollmentStatus {
    state: AtomicU8,
    breaker: AtomicU8,
    delivered: AtomicU64,
    failed: AtomicU64,
    retries: AtomicU64,
    dropped: AtomicU64,
    rejected: AtomicU64,
    in_flight: AtomicU64,
    failure_outcome: Mutex<Option<FailureOutcome>>,
    last_error: Mutex<Option<(String, String)>>,
    /// Unix milliseconds of the last accepted delivery, 0 for none; formatted when shown, not
    /// on the per-message path.
    last_success_ms: std::sync::atomic::AtomicI64,
    rate: RateWindow,
    paused: std::sync::atomic::AtomicBool,
}

/// Deliveries per second over the last minute: 60 one-second buckets, each stamped with the
/// second it counts, so stale buckets are recognised without a timer.
#[derive(Debug)]
struct RateWindow {
    buckets: [AtomicU64; 60],
    stamps: [AtomicU64; 60],
}

impl Default for RateWindow {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            stamps: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl RateWindow {
    fn now_secs() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }

    /// Counts one delivery now; returns the time in Unix milliseconds.
    fn record(&self) -> i64 {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let now = (now_ms / 1000) as u64;
        let i = (now % 60) as usize;
        // Two workers never share a window (one per enrollment), so a plain check-then-reset
        // is enough; at worst a count lands in a bucket that is reset the same second.
        if self.stamps[i].swap(now, Ordering::Relaxed) != now {
            self.buckets[i].store(0, Ordering::Relaxed);
        }
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        now_ms
    }

    /// Counts for the last 60 whole seconds, oldest first (the current second excluded).
    fn history(&self) -> Vec<u64> {
        let now = Self::now_secs();
        (1..=60)
            .rev()
            .map(|ago| {
                let second = now.saturating_sub(ago);
                let i = (second % 60) as usize;
                if self.stamps[i].load(Ordering::Relaxed) == second {
                    self.buckets[i].load(Ordering::Relaxed)
                } else {
                    0
                }
            })
            .collect()
    }
}

impl Default for EnrollmentStatus {
    fn default() -> Self {
        Self {
            state: AtomicU8::new(WorkerState::Connecting as u8),
            breaker: AtomicU8::new(0),
            delivered: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            failure_outcome: Mutex::new(None),
            last_error: Mutex::new(None),
            last_success_ms: std::sync::atomic::AtomicI64::new(0),
            rate: RateWindow::default(),
            paused: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn set_slot<T>(slot: &Mutex<T>, value: T) {
    // A poisoned slot only held a plain value; overwrite it.
    let mut guard = slot.lock().unwrap_or_else(|p| p.into_inner());
    *guard = value;
}

fn read_slot<T: Clone>(slot: &Mutex<T>) -> T {
    slot.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

impl EnrollmentStatus {
    pub fn state(&self) -> WorkerState {
        WorkerState::from_u8(self.state.load(Ordering::Relaxed))
    }
    pub fn set_state(&self, state: WorkerState) {
        self.state.store(state as u8, Ordering::Relaxed);
    }
    pub fn breaker(&self) -> BreakerState {
        match self.breaker.load(Ordering::Relaxed) {
            1 => BreakerState::Open,
            2 => BreakerState::HalfOpen,
            _ => BreakerState::Closed,
        }
    }
    pub fn set_breaker(&self, state: BreakerState) {
        let v = match state {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        };
        self.breaker.store(v, Ordering::Relaxed);
    }
    /// Accepted after a 2xx.
    pub fn record_delivered(&self) {
        bump(&self.delivered);
        let now = self.rate.record();
        self.last_success_ms.store(now, Ordering::Relaxed);
    }
    /// Handed back with the failure outcome after the POST attempts failed.
    pub fn record_failed(&self) {
        bump(&self.failed);
    }
    pub fn record_retry(&self) {
        bump(&self.retries);
    }
    /// Accepted because the answer was in `drop_on`.
    pub fn record_dropped(&self) {
        bump(&self.dropped);
    }
    /// Rejected because the answer was in `reject_on`: the broker dead-letters it.
    pub fn record_rejected(&self) {
        bump(&self.rejected);
    }
    pub fn add_in_flight(&self, delta: i64) {
        if delta >= 0 {
            self.in_flight.fetch_add(delta as u64, Ordering::Relaxed);
        } else {
            self.in_flight
                .fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
        }
    }
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
    pub fn paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }
    fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
    }
    pub fn set_failure_outcome(&self, outcome: FailureOutcome) {
        set_slot(&self.failure_outcome, Some(outcome));
    }
    pub fn failure_outcome(&self) -> Option<FailureOutcome> {
        read_slot(&self.failure_outcome)
    }
    pub fn set_last_error(&self, error: impl Into<String>) {
        set_slot(&self.last_error, Some((error.into(), now_rfc3339())));
    }
    pub fn last_error(&self) -> Option<String> {
        read_slot(&self.last_error).map(|(e, _)| e)
    }
}

/// One entry of the map: the stored record, its effective delivery policy and live status.
#[derive(Debug)]
pub struct Entry {
    pub enrollment: Enrollment,
    pub policy: DeliveryPolicy,
    pub status: Arc<EnrollmentStatus>,
}

/// The JSON shape of an enrollment in API answers.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EnrollmentView {
    pub id: Uuid,
    pub queue: String,
    /// With any password in it replaced by `***`.
    pub target_url: String,
    pub subscription_args: SubscriptionArgs,
    pub created_at: String,
    /// The effective delivery policy, secrets redacted.
    pub delivery: DeliveryPolicy,
    pub state: WorkerState,
    pub breaker_state: BreakerState,
    pub delivered: u64,
    pub failed: u64,
    pub retries: u64,
    pub dropped: u64,
    pub rejected: u64,
    pub in_flight: u64,
    /// How failed deliveries are handed back, known once the link has attached.
    pub failure_outcome: Option<FailureOutcome>,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    pub last_success_at: Option<String>,
}

impl Entry {
    pub fn new(enrollment: Enrollment, defaults: &DeliveryDefaults) -> Self {
        let policy = enrollment.delivery.resolve(defaults);
        Self {
            enrollment,
            policy,
            status: Arc::default(),
        }
    }

    pub fn view(&self) -> EnrollmentView {
        let e = &self.enrollment;
        let mut target_url = e.target_url.clone();
        // Only rewrite URLs that carry a password: parsing normalises the text otherwise.
        if let Ok(url) = url::Url::parse(&target_url)
            && url.password().is_some()
        {
            target_url = redact_url(&url);
        }
        let s = &self.status;
        let last_error = read_slot(&s.last_error);
        EnrollmentView {
            id: e.id,
            queue: e.queue.clone(),
            target_url,
            subscription_args: e.subscription_args.clone(),
            created_at: e.created_at.clone(),
            delivery: self.policy.redacted(),
            state: s.state(),
            breaker_state: s.breaker(),
            delivered: s.delivered(),
            failed: s.failed(),
            retries: s.retries.load(Ordering::Relaxed),
            dropped: s.dropped.load(Ordering::Relaxed),
            rejected: s.rejected.load(Ordering::Relaxed),
            in_flight: s.in_flight.load(Ordering::Relaxed),
            failure_outcome: s.failure_outcome(),
            last_error: last_error.as_ref().map(|(e, _)| e.clone()),
            last_error_at: last_error.map(|(_, at)| at),
            last_success_at: rfc3339_from_ms(s.last_success_ms.load(Ordering::Relaxed)),
        }
    }
}

/// One enrollment in `GET /stats`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EnrollmentStats {
    pub id: Uuid,
    pub queue: String,
    pub target_url: String,
    pub state: WorkerState,
    pub breaker_state: BreakerState,
    pub delivered: u64,
    pub failed: u64,
    pub retries: u64,
    /// Rejected on a `reject_on` answer: the broker dead-letters these at once. Messages the
    /// broker dead-letters after its own delivery limit are counted by the broker, not here.
    pub dead_lettered: u64,
    pub dropped: u64,
    pub in_flight: u64,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    pub last_success_at: Option<String>,
    /// Mean deliveries per second over the last 60 s.
    pub rate_per_sec_1m: f64,
    /// Deliveries in each of the last 60 seconds, oldest first.
    pub rate_history: Vec<u64>,
}

impl Entry {
    pub fn stats(&self) -> EnrollmentStats {
        let view = self.view();
        let rate_history = self.status.rate.history();
        let total: u64 = rate_history.iter().sum();
        EnrollmentStats {
            id: view.id,
            queue: view.queue,
            target_url: view.target_url,
            state: view.state,
            breaker_state: view.breaker_state,
            delivered: view.delivered,
            failed: view.failed,
            retries: view.retries,
            dead_lettered: view.rejected,
            dropped: view.dropped,
            in_flight: view.in_flight,
            last_error: view.last_error,
            last_error_at: view.last_error_at,
            last_success_at: view.last_success_at,
            rate_per_sec_1m: total as f64 / 60.0,
            rate_history,
        }
    }
}

/// How long pause waits for the worker to finish its in-flight POSTs and detach.
const PAUSE_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

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
    defaults: DeliveryDefaults,
    allowlist: TargetAllowlist,
    /// The read path. A std lock: held only for map operations, never across `.await`.
    map: RwLock<HashMap<Uuid, Arc<Entry>>>,
    /// Serialises create/delete end to end (disk, map, worker) so concurrent requests for the
    /// same pair or id cannot interleave.
    writes: tokio::sync::Mutex<()>,
}

impl Registry {
    /// Loads every stored enrollment and starts its worker, except for targets the current
    /// `TARGET_ALLOWLIST` refuses: those stay listed, stopped, with the reason.
    pub async fn load(
        store: Store,
        supervisor: Supervisor,
        defaults: DeliveryDefaults,
        allowlist: TargetAllowlist,
    ) -> Result<Self, StoreError> {
        let stored = store.load_all().await?;
        let mut map = HashMap::with_capacity(stored.len());
        for enrollment in stored {
            let paused = enrollment.paused;
            let entry = Arc::new(Entry::new(enrollment, &defaults));
            entry.status.set_paused(paused);
            match check_target(&allowlist, &entry.enrollment.target_url) {
                Ok(()) if paused => entry.status.set_state(WorkerState::Paused),
                Ok(()) => supervisor.start(Arc::clone(&entry)),
                Err(reason) => {
                    tracing::warn!(enrollment_id = %entry.enrollment.id, %reason, "not starting the worker");
                    entry.status.set_state(WorkerState::Stopped);
                    entry.status.set_last_error(reason);
                }
            }
            map.insert(entry.enrollment.id, entry);
        }
        tracing::info!(count = map.len(), "loaded enrollments");
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                supervisor,
                defaults,
                allowlist,
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
        self.sorted_entries().iter().map(|e| e.view()).collect()
    }

    /// Per-enrollment stats, oldest first.
    pub fn stats(&self) -> Vec<EnrollmentStats> {
        self.sorted_entries().iter().map(|e| e.stats()).collect()
    }

    /// Every entry, oldest first (ties broken by id so the order is stable).
    fn sorted_entries(&self) -> Vec<Arc<Entry>> {
        let mut entries: Vec<Arc<Entry>> = self.read_map(|m| m.values().cloned().collect());
        entries.sort_by(|a, b| {
            (&a.enrollment.created_at, a.enrollment.id)
                .cmp(&(&b.enrollment.created_at, b.enrollment.id))
        });
        entries
    }

    pub fn get(&self, id: Uuid) -> Option<Arc<Entry>> {
        self.read_map(|m| m.get(&id).cloned())
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Whether `TARGET_ALLOWLIST` and the guarded ranges admit `target_url`.
    pub fn check_target(&self, target_url: &str) -> Result<(), String> {
        check_target(&self.inner.allowlist, target_url)
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
            delivery: new.delivery,
            paused: false,
        };
        self.inner.store.insert(enrollment.clone()).await?;
        let entry = Arc::new(Entry::new(enrollment, &self.inner.defaults));
        self.write_map(|m| m.insert(entry.enrollment.id, Arc::clone(&entry)));
        self.inner.supervisor.start(Arc::clone(&entry));
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
    ) -> Result<Option<Arc<Entry>>, StoreError> {
        let _writes = self.inner.writes.lock().await;
        let Some(entry) = self.get(id) else {
            return Ok(None);
        };
        if entry.status.paused() == paused {
            return Ok(Some(entry));
        }
        self.inner.store.set_paused(id, paused).await?;
        entry.status.set_paused(paused);
        if paused {
            let exit = self.inner.supervisor.stop(id);
            if !exit.wait(PAUSE_WAIT).await {
                tracing::warn!(enrollment_id = %id, "worker still finishing after pause answered");
            }
            entry.status.set_state(WorkerState::Paused);
            tracing::info!(enrollment_id = %id, "paused");
        } else {
            match check_target(&self.inner.allowlist, &entry.enrollment.target_url) {
                Ok(()) => {
                    entry.status.set_state(WorkerState::Connecting);
                    self.inner.supervisor.start(Arc::clone(&entry));
                }
                Err(reason) => {
                    entry.status.set_state(WorkerState::Stopped);
                    entry.status.set_last_error(reason);
                }
            }
            tracing::info!(enrollment_id = %id, "resumed");
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
        self.write_map(|m| m.remove(&id));
        let exit = self.inner.supervisor.remove(id);
        tracing::info!(enrollment_id = %id, "deleted enrollment");
        Ok(Some(exit))
    }
}

fn rfc3339_from_ms(ms: i64) -> Option<String> {
    if ms <= 0 {
        return None;
    }
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()?
        .format(&Rfc3339)
        .ok()
}

fn check_target(allowlist: &TargetAllowlist, target_url: &str) -> Result<(), String> {
    let url =
        url::Url::parse(target_url).map_err(|e| format!("`target_url` is not a valid URL: {e}"))?;
    allowlist.check(&url)
}

pub(crate) fn now_rfc3339() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}
