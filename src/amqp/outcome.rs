//! What the broker is told about one delivery ([`Disposition`]), and which failure outcome a
//! link uses, chosen from what the broker advertised at attach.

use fe2o3_amqp::types::messaging::Outcome;
use fe2o3_amqp::types::primitives::Symbol;

use crate::enrollment::outcome::{FailureOutcome, FailureOutcomePolicy};

const MODIFIED_OUTCOME: &str = "amqp:modified:list";

/// A settlement as the broker sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    Accept,
    /// `rejected` with this description: the broker dead-letters at once.
    Reject(String),
    /// `released`: redelivered; the delivery count is not incremented (RabbitMQ quorum queues
    /// count it toward `x-delivery-limit` all the same).
    Release,
    /// `modified{delivery_failed: true, undeliverable_here: false}`: redelivered with the
    /// delivery count incremented.
    Modify,
}

/// Picks the failure outcome from the policy and what the broker's source answered at attach:
/// its `outcomes` list and its `default-outcome`.
///
/// The spec (AMQP 1.0 §3.5.3) only promises the default outcome; an absent or empty `outcomes`
/// list does not promise `modified`, and RabbitMQ 3.x ends the whole session on a `modified`
/// it does not support. So `auto` uses `modified` only when the broker says it takes it: listed
/// in `outcomes`, or named as the `default-outcome`. Everything else gets `released`, which
/// every broker takes.
pub fn choose_failure_outcome(
    policy: FailureOutcomePolicy,
    advertised: Option<&[Symbol]>,
    default_outcome: Option<&Outcome>,
) -> FailureOutcome {
    match policy {
        FailureOutcomePolicy::Released => FailureOutcome::Released,
        FailureOutcomePolicy::Modified => FailureOutcome::Modified,
        FailureOutcomePolicy::Auto => {
            let listed =
                advertised.is_some_and(|list| list.iter().any(|s| s.as_str() == MODIFIED_OUTCOME));
            if listed || matches!(default_outcome, Some(Outcome::Modified(_))) {
                FailureOutcome::Modified
            } else {
                FailureOutcome::Released
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp::types::messaging::{Modified, Released};

    fn syms(list: &[&str]) -> Vec<Symbol> {
        list.iter().map(|s| Symbol::from(*s)).collect()
    }

    #[test]
    fn failure_outcome_follows_the_advertised_outcomes_and_the_default() {
        use FailureOutcome as O;
        use FailureOutcomePolicy as P;
        let rabbit3 = syms(&[
            "amqp:accepted:list",
            "amqp:rejected:list",
            "amqp:released:list",
        ]);
        let full = syms(&[
            "amqp:accepted:list",
            "amqp:rejected:list",
            "amqp:released:list",
            "amqp:modified:list",
        ]);
        let released = Outcome::Released(Released {});
        let modified = Outcome::Modified(Modified {
            delivery_failed: None,
            undeliverable_here: None,
            message_annotations: None,
        });
        /// Policy, advertised `outcomes`, `default-outcome`, and the choice.
        type Case<'a> = (P, Option<&'a [Symbol]>, Option<&'a Outcome>, O);
        let cases: [Case; 13] = [
            (P::Auto, Some(&rabbit3), Some(&released), O::Released),
            (P::Auto, Some(&rabbit3), None, O::Released),
            (P::Auto, Some(&full), None, O::Modified),
            (P::Auto, Some(&full), Some(&released), O::Modified),
            // Nothing listed: only the default outcome is promised.
            (P::Auto, None, None, O::Released),
            (P::Auto, Some(&[]), None, O::Released),
            (P::Auto, None, Some(&released), O::Released),
            (P::Auto, None, Some(&modified), O::Modified),
            (P::Auto, Some(&[]), Some(&modified), O::Modified),
            (P::Released, Some(&full), Some(&modified), O::Released),
            (P::Released, None, None, O::Released),
            (P::Modified, Some(&rabbit3), Some(&released), O::Modified),
            (P::Modified, None, None, O::Modified),
        ];
        for (policy, advertised, default_outcome, want) in cases {
            assert_eq!(
                choose_failure_outcome(policy, advertised, default_outcome),
                want,
                "{policy:?} {advertised:?} {default_outcome:?}"
            );
        }
    }
}
