//! One struct per occurrence in an enrollment's life (vector's `internal_events` pattern).
//! Emitting an event updates the live status, the metrics and the log line together, so the
//! three cannot disagree, and each counter or state has exactly one writer: the event that
//! owns it. Nothing outside this module changes an enrollment's counters or worker state.

use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use crate::enrollment::outcome::FailureOutcome;
use crate::enrollment::status::{BreakerState, EnrollmentStatus, WorkerState};
use crate::telemetry::metrics::{EnrollmentMetrics, Metrics, OutcomeLabel};

/// An occurrence that touches the status only (the worker's life, seen by the fleet too).
pub trait StatusEvent {
    fn emit(self, status: &EnrollmentStatus);
}

/// An occurrence on the message path: status, metrics and log.
pub trait MessageEvent {
    fn emit(self, to: &EnrollmentTelemetry);
}

/// Where one enrollment's events go: its live status and its metric series (resolved once).
pub struct EnrollmentTelemetry {
    status: Arc<EnrollmentStatus>,
    metrics: EnrollmentMetrics,
    /// The worker generation these events come from (see [`EnrollmentStatus::generation`]).
    generation: u64,
}

impl EnrollmentTelemetry {
    pub fn new(
        id: Uuid,
        status: Arc<EnrollmentStatus>,
        metrics: &Metrics,
        generation: u64,
    ) -> Self {
        Self {
            status,
            metrics: metrics.for_enrollment(id),
            generation,
        }
    }

    pub fn emit(&self, event: impl MessageEvent) {
        event.emit(self);
    }

    /// Applies a worker-life event, unless a newer worker has started since this one: a
    /// stopped worker finishing late must not overwrite its successor's state.
    pub fn emit_status(&self, event: impl StatusEvent) {
        if self.status.generation() == self.generation {
            event.emit(&self.status);
        }
    }

    /// Read access for decisions (the breaker state the worker last saw, the failure outcome).
    pub fn status(&self) -> &EnrollmentStatus {
        &self.status
    }
}

/// A message was settled with the broker: the one place "delivered" (accepted by the broker),
/// "failed", "dropped" and "rejected" are counted.
pub struct MessageSettled<'a> {
    pub outcome: OutcomeLabel,
    /// The reason for anything but an accept, for `last_error` and the log.
    pub reason: Option<&'a str>,
    pub message_id: Option<&'a str>,
    /// Now minus the message's creation-time, for accepted messages that carry one.
    pub age: Option<Duration>,
}

impl MessageEvent for MessageSettled<'_> {
    fn emit(self, to: &EnrollmentTelemetry) {
        let status = &to.status;
        let message_id = self.message_id.unwrap_or("");
        let reason = self.reason.unwrap_or("");
        let outcome = self.outcome.as_str();
        match self.outcome {
            OutcomeLabel::Accepted => {
                status.record_delivered();
                if let Some(age) = self.age {
                    to.metrics.shared().message_age(age);
                }
                tracing::debug!(message_id, outcome, "delivered");
            }
            OutcomeLabel::Dropped => {
                status.record_dropped();
                tracing::info!(message_id, outcome = "dropped", %reason, "dropped: answer is in drop_on");
            }
            OutcomeLabel::Rejected => {
                status.record_rejected();
                status.set_last_error(format!("{reason} (rejected)"));
                tracing::warn!(message_id, outcome, %reason, "rejected; the broker dead-letters it");
            }
            OutcomeLabel::Released | OutcomeLabel::Modified => {
                status.record_failed();
                status.set_last_error(reason);
                tracing::warn!(message_id, outcome, %reason, "delivery failed; handed the message back");
            }
            OutcomeLabel::HandedBack => {
                tracing::debug!(message_id, outcome, "handed back while stopping");
            }
        }
        to.metrics.delivery(self.outcome);
    }
}

/// Several messages accepted in one disposition (`accepted` of them 2xx, `dropped` in
/// `drop_on`).
pub struct BatchAccepted {
    pub accepted: usize,
    pub dropped: usize,
}

impl MessageEvent for BatchAccepted {
    fn emit(self, to: &EnrollmentTelemetry) {
        for _ in 0..self.accepted {
            to.status.record_delivered();
            to.metrics.delivery(OutcomeLabel::Accepted);
        }
        for _ in 0..self.dropped {
            to.status.record_dropped();
            to.metrics.delivery(OutcomeLabel::Dropped);
        }
        tracing::debug!(
            accepted = self.accepted,
            dropped = self.dropped,
            "settled a batch"
        );
    }
}

/// An accepted message's age (now minus its creation-time), for the end-to-end age metric.
pub struct MessageAged(pub Duration);

impl MessageEvent for MessageAged {
    fn emit(self, to: &EnrollmentTelemetry) {
        to.metrics.shared().message_age(self.0);
    }
}

/// One POST was made.
pub struct PostAttempted {
    pub status_class: &'static str,
    pub took: Duration,
}

impl MessageEvent for PostAttempted {
    fn emit(self, to: &EnrollmentTelemetry) {
        to.metrics.post_attempt(self.status_class, self.took);
    }
}

/// A POST's answer (or its absence) is in the retry class.
pub struct AttemptFailed<'a> {
    pub message_id: &'a str,
    pub reason: &'a str,
}

impl MessageEvent for AttemptFailed<'_> {
    fn emit(self, to: &EnrollmentTelemetry) {
        to.status.set_last_error(self.reason);
        tracing::debug!(
            message_id = self.message_id,
            reason = self.reason,
            "attempt failed"
        );
    }
}

/// A failed attempt will be retried locally after `delay`.
pub struct RetryScheduled<'a> {
    pub message_id: &'a str,
    pub attempt: u32,
    pub delay: Duration,
}

impl MessageEvent for RetryScheduled<'_> {
    fn emit(self, to: &EnrollmentTelemetry) {
        to.status.record_retry();
        to.metrics.shared().retry();
        tracing::debug!(
            message_id = self.message_id,
            attempt = self.attempt,
            delay_ms = self.delay.as_millis() as u64,
            "retrying"
        );
    }
}

/// Messages taken into hand (+) or settled or lost with their link (−).
pub struct InFlightChanged(pub i64);

impl MessageEvent for InFlightChanged {
    fn emit(self, to: &EnrollmentTelemetry) {
        to.status.add_in_flight(self.0);
        to.metrics.shared().in_flight(self.0);
    }
}

/// The link ended: whatever it held in hand went back to the broker with it.
pub struct InFlightCleared;

impl MessageEvent for InFlightCleared {
    fn emit(self, to: &EnrollmentTelemetry) {
        let was = to.status.clear_in_flight();
        to.metrics.shared().in_flight(-(was as i64));
    }
}

/// A message is held in hand because the target is unavailable; its attempts are not counted.
pub struct HoldStarted<'a> {
    pub message_id: &'a str,
    pub reason: &'a str,
}

impl MessageEvent for HoldStarted<'_> {
    fn emit(self, to: &EnrollmentTelemetry) {
        to.status.record_hold(self.reason);
        tracing::info!(
            message_id = self.message_id,
            reason = self.reason,
            "target unavailable; holding the message"
        );
    }
}

/// A held message left hand (settled, handed back, or its link ended).
pub struct HoldEnded;

impl MessageEvent for HoldEnded {
    fn emit(self, to: &EnrollmentTelemetry) {
        to.status.release_hold();
    }
}

/// A message arrived that the broker had delivered before.
pub struct Redelivered;

impl MessageEvent for Redelivered {
    fn emit(self, to: &EnrollmentTelemetry) {
        to.metrics.shared().redelivery();
    }
}

/// The worker saw its breaker in a new state.
pub struct BreakerChanged(pub BreakerState);

impl StatusEvent for BreakerChanged {
    fn emit(self, status: &EnrollmentStatus) {
        status.set_breaker(self.0);
    }
}

/// The worker is (re)connecting.
pub struct Connecting;

impl StatusEvent for Connecting {
    fn emit(self, status: &EnrollmentStatus) {
        status.set_state(WorkerState::Connecting);
    }
}

/// The link attached: messages can flow.
pub struct LinkAttached {
    pub failure_outcome: FailureOutcome,
    pub credit: u32,
    pub max_in_flight: u32,
}

impl StatusEvent for LinkAttached {
    fn emit(self, status: &EnrollmentStatus) {
        status.set_failure_outcome(self.failure_outcome);
        status.set_state(WorkerState::Active);
        tracing::info!(
            failure_outcome = %self.failure_outcome,
            credit = self.credit,
            max_in_flight = self.max_in_flight,
            "attached"
        );
    }
}

/// The link failed or could not be opened; the worker waits `retry_in` and reconnects.
pub struct LinkDown<'a> {
    pub error: &'a str,
    pub retry_in: Duration,
}

impl StatusEvent for LinkDown<'_> {
    fn emit(self, status: &EnrollmentStatus) {
        tracing::warn!(
            error = self.error,
            retry_in_ms = self.retry_in.as_millis() as u64,
            "broker link down"
        );
        status.set_last_error(self.error);
        status.set_state(WorkerState::Backoff);
    }
}

/// The worker ended: paused through the API, or stopped.
pub struct WorkerStopped {
    pub paused: bool,
}

impl StatusEvent for WorkerStopped {
    fn emit(self, status: &EnrollmentStatus) {
        status.set_state(if self.paused {
            WorkerState::Paused
        } else {
            WorkerState::Stopped
        });
        tracing::info!(paused = self.paused, "worker stopped");
    }
}

/// The worker will not run (a target the allowlist refuses, a stored URL that no longer
/// parses): stopped, with the reason shown.
pub struct WorkerRefused<'a> {
    pub reason: &'a str,
}

impl StatusEvent for WorkerRefused<'_> {
    fn emit(self, status: &EnrollmentStatus) {
        tracing::warn!(reason = self.reason, "not starting the worker");
        status.set_state(WorkerState::Stopped);
        status.set_last_error(self.reason);
    }
}

/// The worker task panicked (`panic` holds its message) or was cancelled (`None`); the
/// supervisor restarts it after a backoff.
pub struct WorkerCrashed<'a> {
    pub panic: Option<&'a str>,
}

impl StatusEvent for WorkerCrashed<'_> {
    fn emit(self, status: &EnrollmentStatus) {
        match self.panic {
            Some(reason) => {
                tracing::error!(panic = reason, "worker panicked; restarting it");
                status.set_last_error(format!("worker panicked: {reason}"));
            }
            None => tracing::error!("worker task was cancelled; restarting it"),
        }
        status.set_state(WorkerState::Backoff);
    }
}
