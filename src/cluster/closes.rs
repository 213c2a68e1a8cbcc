//! Closing what nobody else closed: a DELETE records a durable subscription to close in the
//! store, and the owner removes that record once it closed the link. When no live replica ran
//! the enrollment at DELETE (its owner was killed and the lease not yet taken over, or every
//! replica was down), nobody does; so every replica, every tick, claims the records older than
//! a lease and closes each subscription (attach with no credit, then close).
//!
//! A lease is the owner's window: past it, a live owner has closed the link or, having lost
//! the lease with the enrollment's row, stopped its worker. A claim lasts as long as the
//! longest close attempt plus a lease, so one replica at a time tries a record, and one that
//! dies mid-attempt leaves it to the others; a failed attempt is recorded and tried again
//! later (see [`crate::store::postgres_closes`]).

use crate::cluster::Cluster;
use crate::fleet::closer::PendingClose;
use crate::store::StoreError;

/// Records claimed per tick: closes run in tasks of their own, so this only bounds how many
/// start at once.
const BATCH: i64 = 16;

pub(super) async fn run(cluster: Cluster) {
    let settings = cluster.inner.settings;
    loop {
        tokio::select! {
            _ = cluster.inner.token.cancelled() => return,
            _ = tokio::time::sleep(settings.tick()) => {}
        }
        // Stopping: a close started now would be cut short; the next replica takes it.
        if cluster.inner.stopping.is_cancelled() {
            continue;
        }
        let claiming =
            cluster
                .inner
                .store
                .claim_closes(settings.lease_ttl, settings.close_claim(), BATCH);
        let claimed = match tokio::time::timeout(settings.call_timeout(), claiming).await {
            Ok(Ok(claimed)) => claimed,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot claim the pending closes");
                continue;
            }
            Err(_) => {
                tracing::warn!("claiming the pending closes timed out");
                continue;
            }
        };
        for enrollment in claimed {
            cluster.inner.registry.close_deleted(enrollment);
        }
    }
}

/// Every pending close, as `GET /stats` lists them.
pub async fn pending(cluster: &Cluster) -> Result<Vec<PendingClose>, StoreError> {
    let rows = cluster.inner.store.pending_closes().await?;
    Ok(rows
        .into_iter()
        .map(|row| PendingClose {
            id: row.id,
            queue: row.queue,
            attempts: u32::try_from(row.attempts).unwrap_or(0),
            last_error: row.last_error,
            since: row.requested_at,
        })
        .collect())
}
