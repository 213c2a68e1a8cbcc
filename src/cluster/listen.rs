//! LISTEN/NOTIFY: every write to an enrollment notifies every replica (a trigger in the
//! database), which reads the row again and applies it: a new enrollment is listed, a pause
//! or resume is applied and a delete closes the link, by the owner, within a second. The
//! connection is its own, opened again with backoff when it fails; each time it listens again
//! everything is read again, since notifications sent meanwhile are lost.

use std::time::Duration;

use tokio::sync::mpsc;
use uuid::Uuid;

use crate::backoff::{Backoff, BackoffSettings};
use crate::cluster::Cluster;
use crate::store::postgres_cluster::{ENROLLMENTS_CHANNEL, Notice};

/// Notifications waiting to be applied; the connection waits when it is full.
const QUEUE: usize = 256;

pub(super) async fn run(cluster: Cluster) {
    let mut backoff = Backoff::new(BackoffSettings {
        min: Duration::from_millis(200),
        max: Duration::from_secs(5),
    });
    loop {
        let (tx, mut rx) = mpsc::channel(QUEUE);
        let listening = cluster.inner.store.listen(
            tx,
            cluster.inner.token.clone(),
            cluster.inner.settings.call_timeout(),
        );
        let applying = async {
            while let Some(notice) = rx.recv().await {
                apply(&cluster, notice).await;
            }
        };
        tokio::select! {
            ended = listening => match ended {
                Ok(()) => return,
                Err(e) => tracing::warn!(error = %e, "the LISTEN connection failed; connecting again"),
            },
            _ = applying => {}
        }
        tokio::select! {
            _ = cluster.inner.token.cancelled() => return,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

async fn apply(cluster: &Cluster, notice: Notice) {
    let registry = &cluster.inner.registry;
    match notice {
        Notice::Listening => resync(cluster).await,
        Notice::Changed { channel, payload } if channel == ENROLLMENTS_CHANNEL => {
            let Some((op, id)) = payload.split_once(' ') else {
                return;
            };
            let Ok(id) = Uuid::parse_str(id) else {
                return;
            };
            if op == "DELETE" {
                registry.forget(id).await;
            } else {
                match registry.store().load_one(id).await {
                    Ok(Some(row)) => registry.apply_stored(row).await,
                    Ok(None) => registry.forget(id).await,
                    Err(e) => {
                        tracing::warn!(enrollment_id = %id, error = %e, "cannot read a changed enrollment")
                    }
                }
            }
            cluster.wake();
        }
        Notice::Changed { .. } => cluster.wake(),
    }
}

/// Reads every enrollment again: lists the new, applies changes, forgets the deleted.
async fn resync(cluster: &Cluster) {
    let registry = &cluster.inner.registry;
    let stored = match registry.store().load_stored().await {
        Ok(stored) => stored,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the enrollments again");
            return;
        }
    };
    let present: std::collections::HashSet<Uuid> =
        stored.iter().map(|row| row.enrollment.id).collect();
    for row in stored {
        registry.apply_stored(row).await;
    }
    for id in registry.ids() {
        if !present.contains(&id) {
            registry.forget(id).await;
        }
    }
    cluster.wake();
}
