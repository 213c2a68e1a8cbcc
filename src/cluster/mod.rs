//! Replicas on one PostgreSQL database (`DATABASE_URL`): every replica lists every enrollment
//! and each enrollment runs on exactly one live replica, the holder of its lease.
//!
//! - [`lease`]: the heartbeat, lease renewal, fencing (workers stop before a lease that could
//!   not be renewed expires) and the rebalance that takes and hands over leases.
//! - [`assign`]: which live replica should run which enrollment (rendezvous, bounded loads).
//! - [`listen`]: LISTEN/NOTIFY: a change made on any replica reaches the owner at once.
//! - [`snapshot`]: owners publish their enrollments' live state; every replica shows it.
//! - [`closes`]: durable subscriptions of enrollments deleted while no replica ran them are
//!   closed by any replica, a lease later.
//!
//! Tasks run under the cluster's own token: they keep renewing leases while the workers drain
//! at shutdown, and [`Cluster::leave`] ends them, then hands every lease back at once.

pub mod assign;
pub mod closes;
pub mod lease;
pub mod listen;
pub mod snapshot;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

use crate::fleet::closer::PendingClose;
use crate::fleet::registry::Registry;
use crate::store::postgres_cluster::{Owned, ReplicaRow};
use crate::store::{PostgresStore, StoreError};

pub use snapshot::SharedStatus;

/// The timings of one replica.
#[derive(Debug, Clone, Copy)]
pub struct ClusterSettings {
    /// `LEASE_TTL_MS`.
    pub lease_ttl: Duration,
    /// `SNAPSHOT_INTERVAL_MS`.
    pub snapshot_interval: Duration,
    /// The longest one attempt to close a subscription may take: `AMQP_CONNECT_TIMEOUT_MS`
    /// plus the bounds on ending the link and its session.
    pub close_attempt: Duration,
}

impl ClusterSettings {
    /// How often leases are renewed and the spread checked: a fifth of the lease, at most 1 s.
    pub fn tick(&self) -> Duration {
        (self.lease_ttl / 5).min(Duration::from_secs(1))
    }
    /// After this long without a renewal the workers are stopped: half the lease, leaving the
    /// other half for them to hand back what they hold and detach.
    pub fn fence_after(&self) -> Duration {
        self.lease_ttl / 2
    }
    /// Bound on one round trip of the lease loop, so a hung database cannot delay fencing.
    pub fn call_timeout(&self) -> Duration {
        self.lease_ttl / 4
    }
    /// How long a replica's claim on a pending close keeps the others off it: the longest
    /// attempt plus a lease of margin for recording its outcome.
    pub fn close_claim(&self) -> Duration {
        self.close_attempt + self.lease_ttl
    }
}

/// A cloneable handle to this replica's part in the cluster.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    /// `REPLICA_NAME` and a random suffix: unique per process start.
    id: String,
    store: PostgresStore,
    registry: Registry,
    settings: ClusterSettings,
    /// The daemon's shutdown token: once cancelled, leases are only renewed, never taken.
    stopping: CancellationToken,
    /// The cluster's own token, cancelled by [`Cluster::leave`] after the workers drained.
    token: CancellationToken,
    tracker: TaskTracker,
    /// Wakes the lease loop at once (a change heard, a replica joined or left).
    wake: tokio::sync::Notify,
    /// Enrollments being handed over: their workers are finishing; leases still renewed.
    handing_over: Mutex<HashSet<Uuid>>,
    /// Every enrollment's owner and last snapshot, read every snapshot interval. Std lock:
    /// replaced or read whole, never held across `.await`.
    owners: RwLock<HashMap<Uuid, Owned>>,
}

impl Cluster {
    /// Joins the cluster and starts the lease, listen and snapshot tasks.
    pub async fn start(
        store: PostgresStore,
        registry: Registry,
        settings: ClusterSettings,
        name: &str,
        stopping: CancellationToken,
    ) -> Result<Self, StoreError> {
        let id = format!("{name}-{:08x}", fastrand::u32(..));
        store.heartbeat(&id).await?;
        let cluster = Self {
            inner: Arc::new(Inner {
                id,
                store,
                registry,
                settings,
                stopping,
                token: CancellationToken::new(),
                tracker: TaskTracker::new(),
                wake: tokio::sync::Notify::new(),
                handing_over: Mutex::new(HashSet::new()),
                owners: RwLock::new(HashMap::new()),
            }),
        };
        let span = tracing::info_span!("replica", replica = %cluster.inner.id);
        let tracker = &cluster.inner.tracker;
        tracker.spawn(lease::run(cluster.clone()).instrument(span.clone()));
        tracker.spawn(listen::run(cluster.clone()).instrument(span.clone()));
        tracker.spawn(snapshot::run(cluster.clone()).instrument(span.clone()));
        tracker.spawn(closes::run(cluster.clone()).instrument(span));
        tracing::info!(replica = %cluster.inner.id, lease_ttl_ms = settings.lease_ttl.as_millis() as u64, "joined the replicas");
        Ok(cluster)
    }

    /// This replica's id.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// Who runs `id` and, for another replica, its last snapshot; `None` while nobody holds
    /// its lease.
    pub fn owner_of(&self, id: Uuid) -> Option<(String, Option<SharedStatus>)> {
        if self.inner.registry.runs_here(id) {
            return Some((self.inner.id.clone(), None));
        }
        let owners = self
            .inner
            .owners
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let owned = owners.get(&id)?;
        // Held here but no longer run here (fenced, handing over): the local state is newer.
        let status = (owned.owner != self.inner.id)
            .then_some(owned.status.as_deref())
            .flatten()
            .and_then(|s| serde_json::from_str(s).ok());
        Some((owned.owner.clone(), status))
    }

    /// The live replicas and how many enrollments each holds.
    pub async fn replicas(&self) -> Result<Vec<ReplicaRow>, StoreError> {
        self.inner
            .store
            .replica_rows(self.inner.settings.lease_ttl)
            .await
    }

    /// The durable subscriptions deleted enrollments left to close, on every replica's behalf.
    pub async fn pending_closes(&self) -> Result<Vec<PendingClose>, StoreError> {
        closes::pending(self).await
    }

    fn wake(&self) {
        self.inner.wake.notify_one();
    }

    /// Stops the cluster's tasks, then hands back every lease and leaves, so the other
    /// replicas take this one's enrollments at once. Called after the workers drained.
    pub async fn leave(&self) {
        self.inner.token.cancel();
        self.inner.tracker.close();
        if tokio::time::timeout(Duration::from_secs(5), self.inner.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("replica tasks still running after 5 s");
        }
        match self.inner.store.leave(&self.inner.id).await {
            Ok(()) => tracing::info!("handed every lease back and left the replicas"),
            Err(e) => {
                tracing::warn!(error = %e, "could not hand the leases back; they expire on their own")
            }
        }
    }
}
