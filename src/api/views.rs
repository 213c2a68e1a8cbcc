//! The JSON shapes of an enrollment in API answers, built from the live enrollment: the
//! record with secrets redacted, the effective policy, and a snapshot of its status.

use serde::Serialize;
use uuid::Uuid;

use crate::cluster::Cluster;
use crate::enrollment::live::LiveEnrollment;
use crate::enrollment::policy::DeliveryPolicy;
use crate::enrollment::record::SubscriptionArgs;
use crate::enrollment::status::{BreakerState, StatusSnapshot, WorkerState};

/// An enrollment in `GET /enrollments`, `GET /enrollments/{id}` and the change routes.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EnrollmentView {
    pub id: Uuid,
    pub queue: String,
    /// With any password in it replaced by `***`.
    pub target_url: String,
    pub subscription_args: SubscriptionArgs,
    pub created_at: String,
    /// The effective delivery policy, secrets redacted.
    pub delivery: DeliveryPolicy,
    /// Where the worker is, its breaker, its counters and last error (as its owner last
    /// published them, when another replica runs it).
    #[serde(flatten)]
    pub status: StatusSnapshot,
    /// The replica that runs it (replicas only; `null` while no replica holds its lease).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
}

impl EnrollmentView {
    /// The view with its owner, and the owner's state and counters when another replica runs
    /// it.
    pub fn shared(live: &LiveEnrollment, cluster: Option<&Cluster>) -> Self {
        let mut view = Self::from(live);
        if let Some((owner, shared)) = cluster.and_then(|c| c.owner_of(live.enrollment.id)) {
            view.replica = Some(owner);
            if let Some(shared) = shared {
                view.status = shared.status;
            }
        }
        view
    }
}

impl From<&LiveEnrollment> for EnrollmentView {
    fn from(live: &LiveEnrollment) -> Self {
        let e = &live.enrollment;
        Self {
            id: e.id,
            queue: e.queue.clone(),
            target_url: e.target_url_shown(),
            subscription_args: e.subscription_args.clone(),
            created_at: e.created_at.clone(),
            delivery: live.policy.redacted(),
            status: live.status.snapshot(),
            replica: None,
        }
    }
}

/// One enrollment in `GET /stats`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EnrollmentStats {
    pub id: Uuid,
    pub queue: String,
    pub target_url: String,
    pub state: WorkerState,
    pub breaker_state: BreakerState,
    pub delivered: u64,
    pub failed: u64,
    pub retries: u64,
    /// Rejected on a `reject_on` answer: the broker dead-letters these at once. Messages the
    /// broker dead-letters after its own delivery limit are counted by the broker, not here.
    pub dead_lettered: u64,
    pub dropped: u64,
    pub in_flight: u64,
    /// Messages held in hand because the target is unavailable, and why.
    pub held: u64,
    pub held_reason: Option<String>,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    pub last_success_at: Option<String>,
    /// Mean deliveries per second over the last 60 s.
    pub rate_per_sec_1m: f64,
    /// Deliveries in each of the last 60 seconds, oldest first.
    pub rate_history: Vec<u64>,
    /// The replica that runs it (replicas only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
}

impl EnrollmentStats {
    /// The stats with their owner, as the owner last published them when another replica
    /// runs it.
    pub fn shared(live: &LiveEnrollment, cluster: Option<&Cluster>) -> Self {
        let owner = cluster.and_then(|c| c.owner_of(live.enrollment.id));
        let (replica, shared) = match owner {
            Some((replica, shared)) => (Some(replica), shared),
            None => (None, None),
        };
        let (s, rate_history) = match shared {
            Some(shared) => (shared.status, shared.rate_history),
            None => (live.status.snapshot(), live.status.rate_history()),
        };
        let mut stats = Self::from_parts(live, s, rate_history);
        stats.replica = replica;
        stats
    }

    fn from_parts(live: &LiveEnrollment, s: StatusSnapshot, rate_history: Vec<u64>) -> Self {
        let total: u64 = rate_history.iter().sum();
        Self {
            id: live.enrollment.id,
            queue: live.enrollment.queue.clone(),
            target_url: live.enrollment.target_url_shown(),
            state: s.state,
            breaker_state: s.breaker_state,
            delivered: s.delivered,
            failed: s.failed,
            retries: s.retries,
            dead_lettered: s.rejected,
            dropped: s.dropped,
            in_flight: s.in_flight,
            held: s.held,
            held_reason: s.held_reason,
            last_error: s.last_error,
            last_error_at: s.last_error_at,
            last_success_at: s.last_success_at,
            rate_per_sec_1m: total as f64 / 60.0,
            rate_history,
            replica: None,
        }
    }
}

impl From<&LiveEnrollment> for EnrollmentStats {
    fn from(live: &LiveEnrollment) -> Self {
        Self::from_parts(live, live.status.snapshot(), live.status.rate_history())
    }
}
