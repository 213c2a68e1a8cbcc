//! What the broker is told about one delivery ([`Disposition`]), and which failure outcome a
//! link uses, chosen from what the broker advertised at attach.

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

/// Picks the failure outcome from the policy and the `outcomes` of the broker's source.
///
/// An empty or absent list means the broker supports every outcome (AMQP 1.0 §3.5.3), so
/// `modified` is used; a list without `amqp:modified:list` (RabbitMQ 3.x, which ends the whole
/// session on a `modified`) gets `released`.
pub fn choose_failure_outcome(
    policy: FailureOutcomePolicy,
    advertised: Option<&[Symbol]>,
) -> FailureOutcome {
    match policy {
        FailureOutcomePolicy::Released => FailureOutcome::Released,
        FailureOutcomePolicy::Modified => FailureOutcome::Modified,
        FailureOutcomePolicy::Auto => match advertised {
            None | Some([]) => FailureOutcome::Modified,
            Some(list) if list.iter().any(|s| s.as_str() == MODIFIED_OUTCOME) => {
                FailureOutcome::Modified
            }
            Some(_) => FailureOutcome::Released,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn syms(list: &[&str]) -> Vec<Symbol> {
        list.iter().map(|s| Symbol::from(*s)).collect()
    }

    #[test]
    fn failure_outcome_follows_the_advertised_outcomes() {
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
        let cases: [(P, Option<&[Symbol]>, O); 8] = [
            (P::Auto, Some(&rabbit3), O::Released),
            (P::Auto, Some(&full), O::Modified),
            (P::Auto, None, O::Modified),
            (P::Auto, Some(&[]), O::Modified),
            (P::Released, Some(&full), O::Released),
            (P::Released, None, O::Released),
            (P::Modified, Some(&rabbit3), O::Modified),
            (P::Modified, None, O::Modified),
        ];
        for (policy, advertised, want) in cases {
            assert_eq!(
                choose_failure_outcome(policy, advertised),
                want,
                "{policy:?} {advertised:?}"
            );
        }
    }
}
