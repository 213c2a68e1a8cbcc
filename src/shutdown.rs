//! How a worker is told to end. One [`CancellationToken`] tree: the daemon's shutdown token is
//! the parent of every worker's `stop`, so cancelling it reaches them all.

use tokio_util::sync::CancellationToken;

#[derive(Clone, Default)]
pub struct StopSignals {
    /// Shutdown, pause or removal: stop receiving; a POST under way may finish and is settled,
    /// a message waiting for a retry or the breaker is handed back.
    pub stop: CancellationToken,
    /// Removal, or the shutdown deadline drawing near: abandon POSTs under way too and hand
    /// their messages back, so the link can still settle them and detach in time.
    pub abandon: CancellationToken,
    /// Removal (DELETE) only: close the link for good (`closed=true`), which deletes a durable
    /// subscription. Every other ending detaches.
    pub remove: CancellationToken,
}
