//! Settlement: the one table from what became of a message to what the broker is told and how
//! it is counted, and the settling of finished deliveries: accepts wait in an [`AcceptBuffer`]
//! and go out as ranges of delivery ids, the other outcomes one by one.

use std::time::Duration;

use tokio::time::Instant;

use crate::amqp::error::LinkError;
use crate::amqp::outcome::Disposition;
use crate::delivery::dispatcher::DeliveryOutcome;
use crate::enrollment::outcome::FailureOutcome;
use crate::pipeline::link::Link;
use crate::pipeline::timer::KeptTimer;
use crate::telemetry::EnrollmentTelemetry;
use crate::telemetry::events::{BatchAccepted, InFlightChanged, MessageAged, MessageSettled};
use crate::telemetry::metrics::OutcomeLabel;

/// A delivery whose POSTs are done, waiting to be settled.
pub type Finished<D> = (D, DeliveryOutcome);

/// The one table: what became of a message, and the link's failure outcome, decide what the
/// broker is told and the label it is counted under.
pub fn disposition(
    outcome: &DeliveryOutcome,
    failure: FailureOutcome,
) -> (Disposition, OutcomeLabel) {
    match outcome {
        DeliveryOutcome::Delivered { .. } => (Disposition::Accept, OutcomeLabel::Accepted),
        DeliveryOutcome::Dropped { .. } => (Disposition::Accept, OutcomeLabel::Dropped),
        DeliveryOutcome::Rejected { reason, .. } => {
            (Disposition::Reject(reason.clone()), OutcomeLabel::Rejected)
        }
        DeliveryOutcome::Failed { .. } => match failure {
            FailureOutcome::Released => (Disposition::Release, OutcomeLabel::Released),
            FailureOutcome::Modified => (Disposition::Modify, OutcomeLabel::Modified),
        },
        DeliveryOutcome::HandedBack => (Disposition::Release, OutcomeLabel::HandedBack),
    }
}

/// Settles one delivery and emits what it became.
pub async fn settle_one<L: Link>(
    link: &mut L,
    telemetry: &EnrollmentTelemetry,
    delivery: L::Delivery,
    outcome: DeliveryOutcome,
) -> Result<(), LinkError> {
    telemetry.emit(InFlightChanged(-1));
    let (disposition, label) = disposition(&outcome, link.failure_outcome());
    link.settle(delivery, disposition).await?;
    let (reason, message_id, age) = match &outcome {
        DeliveryOutcome::Delivered { age } => (None, None, *age),
        DeliveryOutcome::Dropped { reason, message_id }
        | DeliveryOutcome::Rejected { reason, message_id }
        | DeliveryOutcome::Failed { reason, message_id } => {
            (Some(reason.as_str()), message_id.as_deref(), None)
        }
        DeliveryOutcome::HandedBack => (None, None, None),
    };
    telemetry.emit(MessageSettled {
        outcome: label,
        reason,
        message_id,
        age,
    });
    Ok(())
}

/// How accepts are gathered before they go to the broker: at most `max` deliveries, or the
/// oldest waits at most `delay`. Batched accepts cost the broker a frame per range instead
/// of one per message; the window they add is what a crash can redeliver on top of the
/// messages in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SettleBatching {
    pub max: usize,
    pub delay: Duration,
}

impl SettleBatching {
    /// One accept per message as it finishes.
    pub const OFF: Self = Self {
        max: 1,
        delay: Duration::ZERO,
    };
}

/// Accepted (and dropped) deliveries waiting to be accepted together.
pub struct AcceptBuffer<D> {
    deliveries: Vec<D>,
    accepted: usize,
    dropped: usize,
    max: usize,
    delay: Duration,
    flush_at: Option<Instant>,
    /// Kept across the loop's turns (see [`KeptTimer`]).
    timer: KeptTimer,
}

impl<D> AcceptBuffer<D> {
    /// A buffer that never holds more than half the link's credit: fe2o3 tops the credit up
    /// only once half of it is settled, so a fuller buffer would starve the link until the
    /// delay runs out.
    pub fn new(batching: SettleBatching, credit: u32) -> Self {
        let half_credit = (credit as usize / 2).max(1);
        let max = batching.max.clamp(1, half_credit);
        Self {
            // Grown on demand and given back at each flush: ten thousand idle enrollments
            // must not each hold room for a batch.
            deliveries: Vec::new(),
            accepted: 0,
            dropped: 0,
            max,
            delay: batching.delay,
            flush_at: None,
            timer: KeptTimer::default(),
        }
    }

    /// Adds a finished delivery; true when the buffer should be flushed now.
    pub fn push(&mut self, delivery: D, dropped: bool) -> bool {
        if self.deliveries.is_empty() {
            self.flush_at = Some(Instant::now() + self.delay);
        }
        self.deliveries.push(delivery);
        if dropped {
            self.dropped += 1;
        } else {
            self.accepted += 1;
        }
        self.deliveries.len() >= self.max || self.delay.is_zero()
    }

    /// When the oldest waiting accept is due; `None` while nothing waits.
    pub fn flush_at(&self) -> Option<Instant> {
        self.flush_at
    }

    /// Resolves when the oldest waiting accept is due; never while nothing waits.
    /// Cancel-safe.
    pub async fn due(&mut self) {
        self.timer.until(self.flush_at).await
    }

    /// Whether the oldest waiting accept is due at `now`.
    pub fn is_due(&self, now: Instant) -> bool {
        self.flush_at.is_some_and(|at| at <= now)
    }

    /// Drops the timer of [`Self::due`] until the next wait for it: armed while nobody
    /// waits, it would wake the loop for nothing (the inline POST at `max_in_flight` 1).
    pub fn disarm(&mut self) {
        self.timer.disarm();
    }

    pub fn len(&self) -> usize {
        self.deliveries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.deliveries.is_empty()
    }

    /// Accepts everything waiting, in as few dispositions as the link can.
    pub async fn flush<L: Link<Delivery = D>>(
        &mut self,
        link: &mut L,
        telemetry: &EnrollmentTelemetry,
    ) -> Result<(), LinkError> {
        self.flush_at = None;
        self.timer.disarm();
        if self.deliveries.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.deliveries);
        let (accepted, dropped) = (self.accepted, self.dropped);
        (self.accepted, self.dropped) = (0, 0);
        telemetry.emit(InFlightChanged(-(batch.len() as i64)));
        link.accept_all(batch).await?;
        telemetry.emit(BatchAccepted { accepted, dropped });
        Ok(())
    }
}

/// Settles finished deliveries: accepted and dropped ones join the buffer (flushed when it
/// is full), the others are settled one by one at once.
pub async fn settle_finished<L: Link>(
    link: &mut L,
    telemetry: &EnrollmentTelemetry,
    buffer: &mut AcceptBuffer<L::Delivery>,
    finished: impl IntoIterator<Item = Finished<L::Delivery>>,
) -> Result<(), LinkError> {
    for (delivery, outcome) in finished {
        let full = match &outcome {
            DeliveryOutcome::Delivered { age } => {
                if let Some(age) = age {
                    telemetry.emit(MessageAged(*age));
                }
                buffer.push(delivery, false)
            }
            DeliveryOutcome::Dropped { .. } => buffer.push(delivery, true),
            _ => {
                settle_one(link, telemetry, delivery, outcome).await?;
                false
            }
        };
        if full {
            buffer.flush(link, telemetry).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_has_one_disposition_and_label() {
        use Disposition as D;
        use FailureOutcome as F;
        use OutcomeLabel as L;
        let failed = || DeliveryOutcome::Failed {
            reason: "target answered 500".into(),
            message_id: None,
        };
        let cases = [
            (
                DeliveryOutcome::Delivered { age: None },
                F::Released,
                D::Accept,
                L::Accepted,
            ),
            (
                DeliveryOutcome::Delivered { age: None },
                F::Modified,
                D::Accept,
                L::Accepted,
            ),
            (
                DeliveryOutcome::Dropped {
                    reason: "target answered 404".into(),
                    message_id: None,
                },
                F::Modified,
                D::Accept,
                L::Dropped,
            ),
            (
                DeliveryOutcome::Rejected {
                    reason: "target answered 422".into(),
                    message_id: None,
                },
                F::Modified,
                D::Reject("target answered 422".into()),
                L::Rejected,
            ),
            (failed(), F::Released, D::Release, L::Released),
            (failed(), F::Modified, D::Modify, L::Modified),
            (
                DeliveryOutcome::HandedBack,
                F::Modified,
                D::Release,
                L::HandedBack,
            ),
            (
                DeliveryOutcome::HandedBack,
                F::Released,
                D::Release,
                L::HandedBack,
            ),
        ];
        for (outcome, failure, want_disposition, want_label) in cases {
            assert_eq!(
                disposition(&outcome, failure),
                (want_disposition, want_label),
                "{outcome:?} with {failure:?}"
            );
        }
        assert_eq!(L::HandedBack.as_str(), "released");
        assert_eq!(L::Modified.as_str(), "modified");
    }

    #[test]
    fn the_buffer_holds_at_most_half_the_credit_and_says_when_it_is_full() {
        let batching = SettleBatching {
            max: 64,
            delay: Duration::from_micros(500),
        };
        for (credit, want) in [(1000, 64), (100, 50), (5, 2), (1, 1), (0, 1)] {
            let mut buffer = AcceptBuffer::<u32>::new(batching, credit);
            assert!(buffer.flush_at().is_none());
            let full: Vec<bool> = (0..want).map(|i| buffer.push(i as u32, false)).collect();
            assert_eq!(full.iter().filter(|f| **f).count(), 1, "credit {credit}");
            assert_eq!(full.last(), Some(&true), "credit {credit}: full at {want}");
            assert!(buffer.flush_at().is_some());
        }
        let mut off = AcceptBuffer::<u32>::new(SettleBatching::OFF, 1000);
        assert!(off.push(1, true), "off: every accept goes out at once");
    }
}
