//! Link credit that follows the breaker: none while it is open or half-open, so messages wait
//! in the broker with their delivery count untouched (the probe uses a message in hand).

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
    /// A follower for a link attached with `credit`.
    pub fn new(credit: u32) -> Self {
        Self {
            credit,
            granted: credit,
        }
    }

    /// The credit the link should have with the breaker in `breaker`.
    pub fn wanted(&self, breaker: BreakerState) -> u32 {
        if breaker == BreakerState::Closed {
            self.credit
        } else {
            0
        }
    }

    pub async fn follow<L: Link>(
        &mut self,
        link: &mut L,
        breaker: BreakerState,
    ) -> Result<(), LinkError> {
        let wanted = self.wanted(breaker);
        if wanted != self.granted {
            link.set_credit(wanted).await?;
            self.granted = wanted;
        }
        Ok(())
    }
}
