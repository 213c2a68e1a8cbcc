//! The lease loop: every tick (or at once when woken) it renews this replica's heartbeat and
//! leases, fences when renewal has failed for half a lease, and rebalances: takes the leases
//! of the enrollments [`crate::cluster::assign`] gives it, hands over the others.
//!
//! Fencing: the time a renewal was *sent* bounds its lease from below (the database sets the
//! expiry after receiving it), so stopping the workers `fence_after` (half the lease) past the
//! last renewal sent leaves the other half for them to abandon, hand back and detach before
//! any other replica may take the lease.

use std::collections::HashSet;
use std::time::Instant;

use uuid::Uuid;

use crate::cluster::{Cluster, assign};
use crate::fleet::shared::Release;

pub(super) async fn run(cluster: Cluster) {
    let settings = cluster.inner.settings;
    let mut last_renewed = Instant::now();
    let mut fenced = false;
    loop {
        // Every wait below also ends at the fence deadline, however slow the database is.
        let deadline = tokio::time::Instant::from_std(last_renewed + settings.fence_after());
        tokio::select! {
            _ = cluster.inner.token.cancelled() => return,
            _ = tokio::time::sleep_until(deadline), if !fenced => {
                fenced = fence(&cluster, last_renewed);
                continue;
            }
            _ = cluster.inner.wake.notified() => {}
            _ = tokio::time::sleep(settings.tick()) => {}
        }
        let sent = Instant::now();
        let renewed = tokio::select! {
            renewed = tokio::time::timeout(settings.call_timeout(), renew(&cluster)) => renewed,
            _ = tokio::time::sleep_until(deadline), if !fenced => {
                fenced = fence(&cluster, last_renewed);
                continue;
            }
        };
        match renewed {
            Ok(Ok(held)) => {
                last_renewed = sent;
                if fenced {
                    tracing::info!("leases renewed again; taking enrollments back");
                    fenced = false;
                }
                drop_lost(&cluster, &held);
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot renew the leases"),
            Err(_) => tracing::warn!("renewing the leases timed out"),
        }
        if fenced || cluster.inner.stopping.is_cancelled() {
            continue;
        }
        let deadline = tokio::time::Instant::from_std(last_renewed + settings.fence_after());
        tokio::select! {
            done = tokio::time::timeout(settings.call_timeout(), rebalance(&cluster)) => {
                if done.is_err() {
                    tracing::warn!("rebalancing timed out");
                }
            }
            _ = tokio::time::sleep_until(deadline) => fenced = fence(&cluster, last_renewed),
        }
    }
}

/// Stops every worker at once (POSTs abandoned, links detached): the leases could not be
/// renewed for half their lifetime. Returns `true` (fenced).
fn fence(cluster: &Cluster, last_renewed: Instant) -> bool {
    tracing::error!(
        since_ms = last_renewed.elapsed().as_millis() as u64,
        "leases not renewed for half their lifetime: stopping every worker before they expire"
    );
    for id in cluster.inner.registry.owned_ids() {
        drop(cluster.inner.registry.release(id, Release::Fence));
    }
    true
}

async fn renew(cluster: &Cluster) -> Result<Vec<Uuid>, crate::store::StoreError> {
    let inner = &cluster.inner;
    inner.store.heartbeat(&inner.id).await?;
    inner
        .store
        .renew_leases(&inner.id, inner.settings.lease_ttl)
        .await
}

/// Stops at once the enrollments run here whose lease was not renewed (expired, taken, or the
/// enrollment deleted).
fn drop_lost(cluster: &Cluster, held: &[Uuid]) {
    let held: HashSet<&Uuid> = held.iter().collect();
    for id in cluster.inner.registry.owned_ids() {
        if !held.contains(&id) {
            tracing::warn!(enrollment_id = %id, "lease lost; stopping its worker");
            drop(cluster.inner.registry.release(id, Release::Fence));
        }
    }
}

async fn rebalance(cluster: &Cluster) {
    let inner = &cluster.inner;
    let live = match inner.store.live_replicas(inner.settings.lease_ttl).await {
        Ok(live) => live,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list the live replicas");
            return;
        }
    };
    let ids = inner.registry.ids();
    let assignment = assign::assign(&ids, &live);
    let me = live.iter().position(|r| *r == inner.id);
    let desired: HashSet<Uuid> = ids
        .iter()
        .copied()
        .filter(|id| me.is_some() && assignment.get(id).copied() == me)
        .collect();
    let owned: HashSet<Uuid> = inner.registry.owned_ids().into_iter().collect();
    for id in owned.difference(&desired) {
        hand_over(cluster, *id);
    }
    let handing_over = handing_over(cluster);
    let wanted: Vec<Uuid> = desired
        .iter()
        .copied()
        .filter(|id| !owned.contains(id) && !handing_over.contains(id))
        .collect();
    if wanted.is_empty() {
        return;
    }
    match inner
        .store
        .acquire_leases(&inner.id, &wanted, inner.settings.lease_ttl)
        .await
    {
        Ok(taken) => {
            for id in taken {
                inner.registry.adopt(id).await;
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot take leases"),
    }
}

fn handing_over(cluster: &Cluster) -> HashSet<Uuid> {
    cluster
        .inner
        .handing_over
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone()
}

/// Stops the worker of `id` (POSTs under way finish; past a quarter of the lease they are
/// abandoned), then hands the lease back, so the replica it now belongs to takes it at once.
fn hand_over(cluster: &Cluster, id: Uuid) {
    let Some(exit) = cluster.inner.registry.release(id, Release::HandOver) else {
        return;
    };
    cluster
        .inner
        .handing_over
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .insert(id);
    let cluster = cluster.clone();
    let quarter = cluster.inner.settings.lease_ttl / 4;
    cluster.inner.tracker.clone().spawn(async move {
        if !exit.is_done() {
            exit.abandon_after(quarter).await;
        }
        let inner = &cluster.inner;
        if let Err(e) = inner.store.release_leases(&inner.id, Some(&[id])).await {
            tracing::warn!(enrollment_id = %id, error = %e, "cannot hand the lease back; it expires on its own");
        }
        inner
            .handing_over
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&id);
    });
}
