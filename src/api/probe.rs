//! The readiness probe of the store, cached: `/ready` writes to SQLite at most once per
//! interval however often it is called, and concurrent callers share the one probe in flight.

use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::store::EnrollmentStore;

/// The last probe's time and result (the error text when the store refused the write).
pub struct ReadyProbe {
    interval: Duration,
    last: Mutex<Option<(Instant, Result<(), String>)>>,
}

impl ReadyProbe {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: Mutex::new(None),
        }
    }

    /// The store's writability, probing only when the cached result is older than the
    /// interval. The lock is held across the probe, so callers arriving meanwhile wait for it
    /// and then read its result instead of writing again.
    pub async fn store_writable(&self, store: &dyn EnrollmentStore) -> Result<(), String> {
        let mut last = self.last.lock().await;
        if let Some((at, result)) = last.as_ref()
            && at.elapsed() < self.interval
        {
            return result.clone();
        }
        let result = store.check_writable().await.map_err(|e| e.to_string());
        *last = Some((Instant::now(), result.clone()));
        result
    }
}
