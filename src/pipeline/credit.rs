//! Link credit that follows the breaker: the enrollment's credit while it is closed; none while
//! it is open, so messages wait in the broker with their delivery count untouched; while it is
//! half-open, one credit when nothing is in hand, so a probe can always be made (a message in
//! hand probes by itself). Lowering credit never fails a transfer already on the wire (the
//! vendored fe2o3-amqp keeps such transfers; see vendor/fe2o3-amqp/PATCHES.md).

use crate::amqp::error::LinkError;
use crate::enrollment::status::BreakerState;
use crate::pipeline::link::Link;

pub struct CreditFollower {
    /// What the enrollment asks for while the breaker is closed.
    credit: u32,
    /// What the link was last told.
    granted: u32,
}

impl CreditFollower {
    /// A follower for a link attached with `granted` credit.
    pub fn new(credit: u32, granted: u32) -> Self {
        Self { credit, granted }
    }

    /// The credit the link should have with the breaker in `breaker` and `in_hand` messages
    /// taken but not settled.
    pub fn wanted(credit: u32, breaker: BreakerState, in_hand: usize) -> u32 {
        match breaker {
            BreakerState::Closed => credit,
            BreakerState::HalfOpen if in_hand == 0 => 1,
            BreakerState::HalfOpen | BreakerState::Open => 0,
        }
    }

    pub async fn follow<L: Link>(
        &mut self,
        link: &mut L,
        breaker: BreakerState,
        in_hand: usize,
    ) -> Result<(), LinkError> {
        let wanted = Self::wanted(self.credit, breaker, in_hand);
        if wanted != self.granted {
            link.set_credit(wanted).await?;
            self.granted = wanted;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credit_by_breaker_state_and_hand() {
        use BreakerState::*;
        let cases = [
            (Closed, 0, 200),
            (Closed, 5, 200),
            (Open, 0, 0),
            (Open, 3, 0),
            (HalfOpen, 0, 1),
            (HalfOpen, 1, 0),
        ];
        for (state, in_hand, want) in cases {
            assert_eq!(
                CreditFollower::wanted(200, state, in_hand),
                want,
                "{state:?} {in_hand}"
            );
        }
    }
}
