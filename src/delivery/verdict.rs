//! The pure decision from one POST's result to what happens next, by the enrollment's status
//! classes.

use crate::enrollment::policy::DeliveryPolicy;
use crate::enrollment::status_pattern::StatusPattern;

/// What one POST's result means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// 2xx: accept.
    Success,
    /// Retry class (an error answer, e.g. 500): try again locally while attempts remain; every
    /// attempt counts, so a message the target keeps failing reaches the dead-letter queue.
    Retry,
    /// No answer, or an answer in `unavailable_on` (429, 502–504 by default): the target is
    /// down, not the message. The message is held, its attempts not counted, and the breaker
    /// takes note.
    Unavailable,
    /// `reject_on`: AMQP `rejected`, the broker dead-letters at once.
    Reject,
    /// `drop_on`: accept and count as dropped.
    Drop,
    /// Any other answer: the failure outcome at once.
    Fail,
}

/// The status-class decision. `status` is `None` for a network error or a timeout.
/// Precedence: 2xx, then `reject_on`, `drop_on`, `unavailable_on`, `retry_on`, and everything
/// else fails.
pub fn verdict(status: Option<u16>, policy: &DeliveryPolicy) -> Verdict {
    let Some(code) = status else {
        return Verdict::Unavailable;
    };
    let any = |list: &[StatusPattern]| list.iter().any(|p| p.matches(code));
    if (200..300).contains(&code) {
        Verdict::Success
    } else if any(&policy.reject_on) {
        Verdict::Reject
    } else if any(&policy.drop_on) {
        Verdict::Drop
    } else if any(&policy.unavailable_on) {
        Verdict::Unavailable
    } else if any(&policy.retry_on) {
        Verdict::Retry
    } else {
        Verdict::Fail
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enrollment::policy::tests::defaults;
    use crate::enrollment::settings::DeliverySettings;

    #[test]
    fn verdict_table() {
        let mut policy = DeliverySettings::default().resolve(&defaults());
        policy.reject_on = vec![StatusPattern::code(422)];
        policy.drop_on = vec![StatusPattern::code(404), StatusPattern::code(503)];
        let cases = [
            (None, Verdict::Unavailable),
            (Some(200), Verdict::Success),
            (Some(204), Verdict::Success),
            (Some(408), Verdict::Retry),
            (Some(425), Verdict::Retry),
            (Some(429), Verdict::Unavailable),
            (Some(502), Verdict::Unavailable),
            (Some(504), Verdict::Unavailable),
            (Some(500), Verdict::Retry),
            (Some(599), Verdict::Retry),
            (Some(503), Verdict::Drop),
            (Some(422), Verdict::Reject),
            (Some(404), Verdict::Drop),
            (Some(400), Verdict::Fail),
            (Some(301), Verdict::Fail),
            (Some(100), Verdict::Fail),
        ];
        for (status, want) in cases {
            assert_eq!(verdict(status, &policy), want, "{status:?}");
        }
    }
}
