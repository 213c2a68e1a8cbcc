//! What replicas keep in PostgreSQL beside the enrollments: their heartbeats, one lease per
//! enrollment (owner and expiry on the database's clock), the owners' snapshots of live state,
//! and the LISTEN connection that tells every replica of a change at once.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::store::{PostgresStore, StoreError};

/// The channel the enrollment trigger notifies (`INSERT|UPDATE|DELETE <id>`).
pub const ENROLLMENTS_CHANNEL: &str = "hot_potato_enrollments";
/// The channel a replica notifies when it joins, leaves or hands leases back.
pub const REPLICAS_CHANNEL: &str = "hot_potato_replicas";

/// What the LISTEN connection reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// Listening (again): notifications may have been missed before, so read everything.
    Listening,
    /// A notification on `channel`.
    Changed { channel: String, payload: String },
}

/// One live replica in `GET /replicas`.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct ReplicaRow {
    pub id: String,
    pub started_at: String,
    pub heartbeat_at: String,
    /// Enrollments it holds a live lease on.
    pub enrollments: i64,
}

/// An enrollment's current owner, with the owner's last snapshot of it when there is one.
#[derive(Debug, Clone)]
pub struct Owned {
    pub owner: String,
    pub status: Option<String>,
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn ids_text(ids: &[Uuid]) -> Vec<String> {
    ids.iter().map(Uuid::to_string).collect()
}

fn parse_ids(rows: &[tokio_postgres::Row]) -> Vec<Uuid> {
    rows.iter()
        .filter_map(|r| Uuid::parse_str(r.get::<_, &str>(0)).ok())
        .collect()
}

impl PostgresStore {
    /// Records (or refreshes) this replica's heartbeat, and tells the others when it is new.
    pub async fn heartbeat(&self, replica: &str) -> Result<(), StoreError> {
        let client = self.client().await?;
        let inserted = client
            .query_opt(
                "INSERT INTO replicas (id) VALUES ($1)
                 ON CONFLICT (id) DO UPDATE SET heartbeat_at = now()
                 RETURNING (xmax = 0) AS inserted",
                &[&replica],
            )
            .await?
            .is_some_and(|row| row.get::<_, bool>(0));
        if inserted {
            client
                .execute("SELECT pg_notify($1, $2)", &[&REPLICAS_CHANNEL, &replica])
                .await?;
        }
        Ok(())
    }

    /// Extends every lease `replica` holds that has not expired; the enrollments still held.
    pub async fn renew_leases(
        &self,
        replica: &str,
        ttl: Duration,
    ) -> Result<Vec<Uuid>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "UPDATE leases SET expires_at = now() + $2::bigint * interval '1 millisecond'
                 WHERE owner = $1 AND expires_at > now()
                 RETURNING enrollment_id",
                &[&replica, &millis(ttl)],
            )
            .await?;
        Ok(parse_ids(&rows))
    }

    /// The replicas whose heartbeat is younger than `ttl`, by id; forgets long-dead ones.
    pub async fn live_replicas(&self, ttl: Duration) -> Result<Vec<String>, StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM replicas
                 WHERE heartbeat_at < now() - 10 * $1::bigint * interval '1 millisecond'",
                &[&millis(ttl)],
            )
            .await?;
        let rows = client
            .query(
                "SELECT id FROM replicas
                 WHERE heartbeat_at > now() - $1::bigint * interval '1 millisecond'
                 ORDER BY id",
                &[&millis(ttl)],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Takes the leases on `ids` that are free, expired or already `replica`'s; the ones taken.
    pub async fn acquire_leases(
        &self,
        replica: &str,
        ids: &[Uuid],
        ttl: Duration,
    ) -> Result<Vec<Uuid>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let client = self.client().await?;
        let rows = client
            .query(
                "INSERT INTO leases (enrollment_id, owner, expires_at)
                 SELECT e.id, $1, now() + $3::bigint * interval '1 millisecond'
                 FROM enrollments e WHERE e.id = ANY($2)
                 ON CONFLICT (enrollment_id) DO UPDATE
                     SET owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at
                     WHERE leases.expires_at <= now() OR leases.owner = EXCLUDED.owner
                 RETURNING enrollment_id",
                &[&replica, &ids_text(ids), &millis(ttl)],
            )
            .await?;
        Ok(parse_ids(&rows))
    }

    /// Hands back `replica`'s leases on `ids` (all of them when `ids` is `None`) and tells the
    /// others, so they take them at once.
    pub async fn release_leases(
        &self,
        replica: &str,
        ids: Option<&[Uuid]>,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        match ids {
            Some(ids) => {
                client
                    .execute(
                        "DELETE FROM leases WHERE owner = $1 AND enrollment_id = ANY($2)",
                        &[&replica, &ids_text(ids)],
                    )
                    .await?
            }
            None => {
                client
                    .execute("DELETE FROM leases WHERE owner = $1", &[&replica])
                    .await?
            }
        };
        client
            .execute("SELECT pg_notify($1, $2)", &[&REPLICAS_CHANNEL, &replica])
            .await?;
        Ok(())
    }

    /// Removes this replica's heartbeat (it is stopping) and tells the others.
    pub async fn leave(&self, replica: &str) -> Result<(), StoreError> {
        self.release_leases(replica, None).await?;
        let client = self.client().await?;
        client
            .execute("DELETE FROM replicas WHERE id = $1", &[&replica])
            .await?;
        client
            .execute("SELECT pg_notify($1, $2)", &[&REPLICAS_CHANNEL, &replica])
            .await?;
        Ok(())
    }

    /// Writes `replica`'s snapshot of each enrollment it owns (id, JSON).
    pub async fn publish_snapshots(
        &self,
        replica: &str,
        snapshots: &[(Uuid, String)],
    ) -> Result<(), StoreError> {
        if snapshots.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = snapshots.iter().map(|(id, _)| id.to_string()).collect();
        let statuses: Vec<&str> = snapshots.iter().map(|(_, s)| s.as_str()).collect();
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO snapshots (enrollment_id, replica, status, updated_at)
                 SELECT s.id, $1, s.status, now()
                 FROM unnest($2::text[], $3::text[]) AS s(id, status)
                 JOIN enrollments e ON e.id = s.id
                 ON CONFLICT (enrollment_id) DO UPDATE
                     SET replica = EXCLUDED.replica, status = EXCLUDED.status,
                         updated_at = EXCLUDED.updated_at",
                &[&replica, &ids, &statuses],
            )
            .await?;
        Ok(())
    }

    /// Every enrollment under a live lease: its owner and the owner's last snapshot.
    pub async fn owners(&self) -> Result<HashMap<Uuid, Owned>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT l.enrollment_id, l.owner, s.status
                 FROM leases l
                 LEFT JOIN snapshots s ON s.enrollment_id = l.enrollment_id AND s.replica = l.owner
                 WHERE l.expires_at > now()",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                let id = Uuid::parse_str(r.get::<_, &str>(0)).ok()?;
                Some((
                    id,
                    Owned {
                        owner: r.get(1),
                        status: r.get(2),
                    },
                ))
            })
            .collect())
    }

    /// The live replicas and how many enrollments each holds.
    pub async fn replica_rows(&self, ttl: Duration) -> Result<Vec<ReplicaRow>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT r.id, r.started_at::text, r.heartbeat_at::text, count(l.enrollment_id)
                 FROM replicas r
                 LEFT JOIN leases l ON l.owner = r.id AND l.expires_at > now()
                 WHERE r.heartbeat_at > now() - $1::bigint * interval '1 millisecond'
                 GROUP BY r.id ORDER BY r.id",
                &[&millis(ttl)],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| ReplicaRow {
                id: r.get(0),
                started_at: r.get(1),
                heartbeat_at: r.get(2),
                enrollments: r.get(3),
            })
            .collect())
    }

    /// Listens on both channels on a connection of its own, sending what arrives to `tx`, until
    /// `cancel` or the connection fails (the caller connects again).
    pub async fn listen(
        &self,
        tx: mpsc::Sender<Notice>,
        cancel: CancellationToken,
        connect_timeout: Duration,
    ) -> Result<(), StoreError> {
        let connecting = tokio::time::timeout(connect_timeout, self.config.connect(NoTls));
        let (client, mut connection) = connecting
            .await
            .map_err(|_| StoreError::Postgres("LISTEN connection timed out".into()))??;
        let statement = format!("LISTEN {ENROLLMENTS_CHANNEL}; LISTEN {REPLICAS_CHANNEL}");
        let listen = client.batch_execute(&statement);
        tokio::pin!(listen);
        let mut listening = false;
        loop {
            // The connection is only driven by polling it here, LISTEN's answer included.
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                done = &mut listen, if !listening => {
                    done?;
                    listening = true;
                    if tx.send(Notice::Listening).await.is_err() {
                        return Ok(());
                    }
                }
                message = std::future::poll_fn(|cx| connection.poll_message(cx)) => match message {
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        let notice = Notice::Changed {
                            channel: n.channel().to_string(),
                            payload: n.payload().to_string(),
                        };
                        if tx.send(notice).await.is_err() {
                            return Ok(());
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e.into()),
                    None => return Err(StoreError::Postgres("the LISTEN connection closed".into())),
                },
            }
        }
    }
}
