//! Pending closes (table `pending_closes`): the durable subscriptions of deleted enrollments
//! still to be closed on the broker. DELETE records one in the transaction that deletes the
//! enrollment, so it survives any replica; the replica that closes the subscription removes
//! it; rows no owner closed within the lease are claimed, one replica at a time, and closed.

use std::time::Duration;

use tokio_postgres::Transaction;
use uuid::Uuid;

use crate::enrollment::record::{Enrollment, SubscriptionArgs};
use crate::store::{PostgresStore, StoreError};

/// Longest `last_error` kept: the reason, not a dump.
const MAX_ERROR_CHARS: usize = 500;

/// `requested_at` as RFC 3339, UTC (as every other time the API shows).
const REQUESTED_AT: &str =
    "to_char(requested_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')";

/// A pending close as `GET /stats` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingCloseRow {
    pub id: Uuid,
    pub queue: String,
    /// Failed attempts so far.
    pub attempts: i32,
    pub last_error: Option<String>,
    /// When the enrollment was deleted (RFC 3339, UTC).
    pub requested_at: String,
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Records that deleted enrollment `id` leaves a durable subscription to close, inside the
/// deleting transaction. `subscription_args` as stored; a non-durable link leaves nothing on
/// the broker, so nothing is recorded for it.
pub(super) async fn record_if_durable(
    tx: &Transaction<'_>,
    id: &str,
    queue: &str,
    subscription_args: &str,
) -> Result<(), StoreError> {
    match SubscriptionArgs::from_stored(subscription_args) {
        Ok(args) if args.durable == Some(true) => {}
        Ok(_) => return Ok(()),
        Err(reason) => {
            // Without readable args the source cannot be rebuilt to close it.
            tracing::warn!(enrollment_id = %id, %reason, "deleted an enrollment whose subscription_args cannot be read; if it had a durable subscription, delete it on the broker");
            return Ok(());
        }
    }
    tx.execute(
        "INSERT INTO pending_closes (enrollment_id, queue, subscription_args) VALUES ($1, $2, $3)
         ON CONFLICT (enrollment_id) DO NOTHING",
        &[&id, &queue, &subscription_args],
    )
    .await?;
    Ok(())
}

impl PostgresStore {
    /// Claims up to `limit` pending closes that were requested more than `due_after` ago and
    /// that nobody holds (or whose holder's claim ran out), for `claim_for`; what opening a link
    /// to close each needs. Replicas claiming at once get different rows.
    pub async fn claim_closes(
        &self,
        due_after: Duration,
        claim_for: Duration,
        limit: i64,
    ) -> Result<Vec<Enrollment>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "UPDATE pending_closes
                 SET claimed_until = now() + $2::bigint * interval '1 millisecond'
                 WHERE enrollment_id IN (
                     SELECT enrollment_id FROM pending_closes
                     WHERE requested_at <= now() - $1::bigint * interval '1 millisecond'
                       AND (claimed_until IS NULL OR claimed_until <= now())
                     ORDER BY requested_at
                     LIMIT $3
                     FOR UPDATE SKIP LOCKED)
                 RETURNING enrollment_id, queue, subscription_args, {REQUESTED_AT}"
                ),
                &[&millis(due_after), &millis(claim_for), &limit],
            )
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                let id = Uuid::parse_str(r.get::<_, &str>(0)).ok()?;
                // Checked readable when the row was written.
                let subscription_args = SubscriptionArgs::from_stored(r.get(2)).ok()?;
                Some(Enrollment {
                    id,
                    queue: r.get(1),
                    target_url: String::new(),
                    subscription_args,
                    created_at: r.get(3),
                    delivery: Default::default(),
                    paused: false,
                })
            })
            .collect())
    }

    /// Forgets the pending close of `id`: its subscription was closed.
    pub async fn close_done(&self, id: Uuid) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM pending_closes WHERE enrollment_id = $1",
                &[&id.to_string()],
            )
            .await?;
        Ok(())
    }

    /// Records a failed attempt to close `id`'s subscription; the next is not claimed before
    /// 2, 4, 8… up to 60 seconds from now (the broker is likely down: no need to hammer it).
    pub async fn record_close_failure(&self, id: Uuid, error: &str) -> Result<(), StoreError> {
        let error: String = error.chars().take(MAX_ERROR_CHARS).collect();
        let client = self.client().await?;
        client
            .execute(
                "UPDATE pending_closes
                 SET attempts = attempts + 1, last_error = $2,
                     claimed_until = now()
                         + LEAST(power(2, LEAST(attempts + 1, 6)), 60) * interval '1 second'
                 WHERE enrollment_id = $1",
                &[&id.to_string(), &error],
            )
            .await?;
        Ok(())
    }

    /// Every pending close, oldest first.
    pub async fn pending_closes(&self) -> Result<Vec<PendingCloseRow>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT enrollment_id, queue, attempts, last_error, {REQUESTED_AT}
                     FROM pending_closes ORDER BY requested_at, enrollment_id"
                ),
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                Some(PendingCloseRow {
                    id: Uuid::parse_str(r.get::<_, &str>(0)).ok()?,
                    queue: r.get(1),
                    attempts: r.get(2),
                    last_error: r.get(3),
                    requested_at: r.get(4),
                })
            })
            .collect())
    }
}
