//! How a worker is told to end. One [`CancellationToken`] tree: the daemon's shutdown token is
//! the parent of every worker's `stop`, so cancelling it reaches them all.

use tokio_util::sync::CancellationToken;

#[derive(Clone)]
pub struct StopSignals {
    /// Shutdown, pause or removal: stop receiving; an in-flight POST may finish and is settled.
    pub stop: CancellationToken,
    /// Removal (DELETE): also abandon an in-flight POST, hand its message back, and close
    /// the link for good (`closed=true`).
    pub remove: CancellationToken,
}
