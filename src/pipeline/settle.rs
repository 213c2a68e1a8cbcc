//! Settlement: the one table from what became of a message to what the broker is told and how
//! it is counted, and the settling of finished deliveries (accepts batched).

use crate::amqp::error::LinkError;
use crate::amqp::outcome::Disposition;
use crate::delivery::dispatcher::DeliveryOutcome;
use crate::enrollment::outcome::FailureOutcome;
use crate::pipeline::link::Link;
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

/// Settles deliveries that finished together: the accepted (and dropped) ones in one batch,
/// the others one by one.
pub async fn settle_finished<L: Link>(
    link: &mut L,
    telemetry: &EnrollmentTelemetry,
    finished: Vec<Finished<L::Delivery>>,
) -> Result<(), LinkError> {
    let mut batch = Vec::with_capacity(finished.len());
    let mut accepted = 0;
    let mut dropped = 0;
    for (delivery, outcome) in finished {
        match &outcome {
            DeliveryOutcome::Delivered { age } => {
                if let Some(age) = age {
                    telemetry.emit(MessageAged(*age));
                }
                accepted += 1;
                batch.push(delivery);
            }
            DeliveryOutcome::Dropped { .. } => {
                dropped += 1;
                batch.push(delivery);
            }
            _ => settle_one(link, telemetry, delivery, outcome).await?,
        }
    }
    if batch.is_empty() {
        return Ok(());
    }
    telemetry.emit(InFlightChanged(-(batch.len() as i64)));
    link.accept_all(batch).await?;
    telemetry.emit(BatchAccepted { accepted, dropped });
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
}
