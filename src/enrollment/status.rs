//! The live status of one enrollment: where its worker is, its breaker, its counters and its
//! last error. Written only through the events of [`crate::telemetry`] (one writer per fact),
//! read by the API. Atomics and short std-mutex sections keep the per-message cost at a few
//! uncontended writes.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::enrollment::outcome::FailureOutcome;

/// Where a circuit breaker is: closed (POSTs flow), open (none), half-open (one probe).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

/// Where an enrollment's worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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
    last_success_ms: AtomicI64,
    /// Made at the first delivery: an enrollment that never delivers (most of ten thousand
    /// idle ones) holds a pointer instead of the window's 480 bytes.
    rate: OnceLock<Box<RateWindow>>,
    paused: AtomicBool,
    /// Messages held in hand because the target is unavailable, and why since when.
    held: AtomicU64,
    held_reason: Mutex<Option<(String, String)>>,
    /// Which start of the worker may write the worker's state: a stopped worker finishing
    /// late must not overwrite what its successor reports.
    generation: AtomicU64,
}

/// Deliveries per second over the last minute: 60 one-second buckets, each stamped with the
/// second it counts, so stale buckets are recognised without a timer. 32-bit: seconds since
/// 1970 fit until 2106, and no enrollment delivers four billion messages in a second.
#[derive(Debug)]
struct RateWindow {
    buckets: [AtomicU32; 60],
    stamps: [AtomicU32; 60],
}

impl Default for RateWindow {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU32::new(0)),
            stamps: std::array::from_fn(|_| AtomicU32::new(0)),
        }
    }
}

impl RateWindow {
    fn now_secs() -> u32 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
    }

    /// Counts one delivery now; returns the time in Unix milliseconds.
    fn record(&self) -> i64 {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        self.record_at(u32::try_from(now_ms / 1000).unwrap_or(u32::MAX));
        now_ms
    }

    fn record_at(&self, now: u32) {
        let i = (now % 60) as usize;
        // Two workers never share a window (one per enrollment), so a plain check-then-reset
        // is enough; at worst a count lands in a bucket that is reset the same second.
        if self.stamps[i].swap(now, Ordering::Relaxed) != now {
            self.buckets[i].store(0, Ordering::Relaxed);
        }
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts for the last 60 whole seconds, oldest first (the current second excluded).
    fn history(&self) -> Vec<u64> {
        self.history_at(Self::now_secs())
    }

    fn history_at(&self, now: u32) -> Vec<u64> {
        (1..=60)
            .rev()
            .map(|ago| {
                let second = now.saturating_sub(ago);
                let i = (second % 60) as usize;
                if self.stamps[i].load(Ordering::Relaxed) == second {
                    u64::from(self.buckets[i].load(Ordering::Relaxed))
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
            last_success_ms: AtomicI64::new(0),
            rate: OnceLock::new(),
            paused: AtomicBool::new(false),
            held: AtomicU64::new(0),
            held_reason: Mutex::new(None),
            generation: AtomicU64::new(0),
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
        let now = self.rate.get_or_init(Box::default).record();
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
    /// Takes the whole in-flight count back to zero (a link ended); returns what it was.
    pub fn clear_in_flight(&self) -> u64 {
        self.in_flight.swap(0, Ordering::Relaxed)
    }
    /// One more message held while the target is unavailable; `reason` is why.
    pub fn record_hold(&self, reason: &str) {
        if self.held.fetch_add(1, Ordering::Relaxed) == 0 {
            set_slot(&self.held_reason, Some((reason.to_string(), now_rfc3339())));
        } else {
            let mut slot = self.held_reason.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((text, _)) = slot.as_mut() {
                reason.clone_into(text);
            }
        }
    }
    /// A held message was settled or handed back.
    pub fn release_hold(&self) {
        let previous = self
            .held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(1))
            })
            .unwrap_or(0);
        if previous <= 1 {
            set_slot(&self.held_reason, None);
        }
    }
    /// Starts a new worker generation; only events of the newest may set the worker state.
    pub fn next_generation(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::Relaxed) + 1
    }
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
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
    /// The stored pause flag, mirrored here so the API shows it without a store read.
    pub fn set_paused(&self, paused: bool) {
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

/// Everything the status holds, read at once for an API answer (field names are the API's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StatusSnapshot {
    pub state: WorkerState,
    pub breaker_state: BreakerState,
    /// Accepted by the broker after a 2xx.
    pub delivered: u64,
    pub failed: u64,
    pub retries: u64,
    pub dropped: u64,
    pub rejected: u64,
    pub in_flight: u64,
    /// Messages held in hand because the target is unavailable (their delivery count unused).
    pub held: u64,
    /// Why they are held (the last unavailable answer), and since when.
    pub held_reason: Option<String>,
    pub held_since: Option<String>,
    /// How failed deliveries are handed back, known once the link has attached.
    pub failure_outcome: Option<FailureOutcome>,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    pub last_success_at: Option<String>,
}

impl EnrollmentStatus {
    pub fn snapshot(&self) -> StatusSnapshot {
        let last_error = read_slot(&self.last_error);
        let held = read_slot(&self.held_reason);
        StatusSnapshot {
            state: self.state(),
            breaker_state: self.breaker(),
            delivered: self.delivered(),
            failed: self.failed(),
            retries: self.retries.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            held: self.held.load(Ordering::Relaxed),
            held_reason: held.as_ref().map(|(r, _)| r.clone()),
            held_since: held.map(|(_, at)| at),
            failure_outcome: self.failure_outcome(),
            last_error_at: last_error.as_ref().map(|(_, at)| at.clone()),
            last_error: last_error.map(|(e, _)| e),
            last_success_at: rfc3339_from_ms(self.last_success_ms.load(Ordering::Relaxed)),
        }
    }

    /// Deliveries in each of the last 60 whole seconds, oldest first.
    pub fn rate_history(&self) -> Vec<u64> {
        self.rate
            .get()
            .map_or_else(|| vec![0; 60], |rate| rate.history())
    }
}

/// Now, as RFC 3339 UTC text.
pub fn now_rfc3339() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_window_counts_each_second_and_forgets_stale_ones() {
        let window = RateWindow::default();
        let second = 1_800_000_000;
        for _ in 0..3 {
            window.record_at(second);
        }
        window.record_at(second + 1);
        let history = window.history_at(second + 2);
        assert_eq!(history.len(), 60);
        assert_eq!(&history[58..], &[3, 1]);
        assert_eq!(history.iter().sum::<u64>(), 4);
        // A minute later the same buckets are stale: stamped with another second.
        assert_eq!(window.history_at(second + 62), vec![0; 60]);
        window.record_at(second + 60);
        assert_eq!(&window.history_at(second + 61)[59..], &[1]);
    }

    #[test]
    fn the_rate_window_is_made_at_the_first_delivery() {
        let status = EnrollmentStatus::default();
        assert_eq!(status.rate_history(), vec![0; 60]);
        assert!(status.rate.get().is_none());
        status.record_delivered();
        assert!(status.rate.get().is_some());
        assert!(status.last_success_ms.load(Ordering::Relaxed) > 0);
    }
}
