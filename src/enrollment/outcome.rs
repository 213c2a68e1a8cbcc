//! How a failed message goes back to the broker: the operator's choice (`FAILURE_OUTCOME`)
//! and the outcome a link settled on once the broker answered its attach.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What the operator asked for with `FAILURE_OUTCOME`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailureOutcomePolicy {
    /// Follow the broker's advertised source outcomes.
    #[default]
    Auto,
    Released,
    Modified,
}

impl FromStr for FailureOutcomePolicy {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "auto" => Ok(Self::Auto),
            "released" => Ok(Self::Released),
            "modified" => Ok(Self::Modified),
            _ => Err(()),
        }
    }
}

/// How a message whose POST failed goes back to the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FailureOutcome {
    /// `released`: redelivered; RabbitMQ quorum queues count it toward `x-delivery-limit`.
    Released,
    /// `modified{delivery_failed: true, undeliverable_here: false}`: redelivered with the
    /// delivery count incremented (Artemis, RabbitMQ 4, Azure Service Bus).
    Modified,
}

impl fmt::Display for FailureOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Released => "released",
            Self::Modified => "modified",
        })
    }
}
