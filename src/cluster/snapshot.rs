//! The shared view: every snapshot interval an owner writes the live state and counters of the
//! enrollments it runs, and reads every enrollment's owner and its last snapshot, so that
//! `GET /enrollments` and `/stats` on any replica show every enrollment as its owner sees it.

use serde::{Deserialize, Serialize};

use crate::cluster::Cluster;
use crate::enrollment::status::StatusSnapshot;

/// What an owner publishes about one enrollment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SharedStatus {
    pub status: StatusSnapshot,
    /// Deliveries in each of the last 60 seconds, oldest first.
    pub rate_history: Vec<u64>,
}

pub(super) async fn run(cluster: Cluster) {
    let every = cluster.inner.settings.snapshot_interval;
    loop {
        tokio::select! {
            _ = cluster.inner.token.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let bound = every.max(cluster.inner.settings.call_timeout());
        if tokio::time::timeout(bound, exchange(&cluster))
            .await
            .is_err()
        {
            tracing::warn!("publishing the snapshots timed out");
        }
    }
}

/// Serialises the snapshots of the enrollments run here (what costs CPU at scale).
pub fn encode(cluster: &Cluster) -> Vec<(uuid::Uuid, String)> {
    let registry = &cluster.inner.registry;
    registry
        .owned_ids()
        .into_iter()
        .filter_map(|id| {
            let live = registry.get(id)?;
            let shared = SharedStatus {
                status: live.status.snapshot(),
                rate_history: live.status.rate_history(),
            };
            serde_json::to_string(&shared).ok().map(|s| (id, s))
        })
        .collect()
}

async fn exchange(cluster: &Cluster) {
    let inner = &cluster.inner;
    let mine = encode(cluster);
    if let Err(e) = inner.store.publish_snapshots(&inner.id, &mine).await {
        tracing::warn!(error = %e, "cannot publish the snapshots");
    }
    match inner.store.owners().await {
        Ok(owners) => {
            *inner
                .owners
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner()) = owners;
        }
        Err(e) => tracing::warn!(error = %e, "cannot read the owners"),
    }
}
