//! One enrollment's AMQP 1.0 link: the receiver on the enrollment's source address (on a session
//! from [`crate::broker`]), the failure outcome chosen from what the broker advertises at
//! attach, settlement, and the two ways a link ends (detach keeps a durable subscription, close
//! removes it).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use fe2o3_amqp::link::RecvError;
use fe2o3_amqp::link::delivery::DeliveryInfo;
use fe2o3_amqp::link::receiver::CreditMode;
use fe2o3_amqp::types::definitions;
use fe2o3_amqp::types::messaging::{
    Body, FilterSet, Modified, Source, TerminusDurability, TerminusExpiryPolicy,
};
use fe2o3_amqp::types::primitives::{Symbol, Value};
use fe2o3_amqp::{Delivery, Receiver};
use fe2o3_amqp_ext::filters::SelectorFilter;
use serde::{Deserialize, Serialize};

use crate::broker::{BrokerSettings, SessionLease};
use crate::enrollment::{Enrollment, SubscriptionArgs};

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

const MODIFIED_OUTCOME: &str = "amqp:modified:list";

/// How long a detach or link close may wait for the broker's answer. A broker that never
/// answers must not hold a DELETE or a shutdown: the session is ended (or the connection
/// closed) after it, which settles the link on the broker's side anyway.
const LINK_END_TIMEOUT: Duration = Duration::from_secs(5);

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

/// Errors of the broker side. The worker treats every one of them as "reconnect".
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("timed out after {0:?} connecting to the broker")]
    ConnectTimeout(Duration),
    #[error("cannot reach the broker: {0}")]
    Tcp(#[from] std::io::Error),
    #[error("cannot open the AMQP connection: {0}")]
    Open(#[from] fe2o3_amqp::connection::OpenError),
    #[error("cannot begin the AMQP session: {0}")]
    Begin(#[from] fe2o3_amqp::session::BeginError),
    #[error("the broker refused the link: {0}")]
    Attach(#[from] fe2o3_amqp::link::ReceiverAttachError),
    #[error("receiving failed: {0}")]
    Recv(#[from] fe2o3_amqp::link::RecvError),
    #[error("settling a delivery failed: {0}")]
    Settle(#[from] fe2o3_amqp::link::DispositionError),
    #[error("changing link credit failed: {0}")]
    Credit(String),
    #[error("a delivery task failed: {0}")]
    Task(String),
    #[error("the broker URL has no usable host")]
    BadUrl,
}

/// An attached receiver with the session (and, unless pooled, the connection) it owns.
pub struct AmqpLink {
    lease: SessionLease,
    receiver: Receiver,
    failure_outcome: FailureOutcome,
}

/// What the receiver handed over.
pub enum Incoming {
    Message(Box<Delivery<Body<Value>>>),
    /// A transfer whose message sections could not be decoded.
    Undecodable {
        info: DeliveryInfo,
        reason: String,
    },
}

/// What to do with one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    Accept,
    /// The target's answer is in `drop_on`: accepted, counted as dropped.
    Drop,
    /// The POST failed: the link's failure outcome.
    Fail,
    /// The target's answer is in `reject_on`: `rejected`, which dead-letters at once.
    Reject(String),
    /// Not the message's fault (enrollment deleted mid-POST, shutdown during a retry wait):
    /// a plain release. Artemis and Service Bus do not count it as a failed attempt;
    /// RabbitMQ quorum queues count every release toward `x-delivery-limit`.
    HandBack,
}

/// The stable names an enrollment uses on the broker, so that a durable subscription
/// (named from container id and link name on Artemis) is found again after a restart.
fn link_name(enrollment: &Enrollment) -> String {
    format!("hot-potato-{}", enrollment.id)
}

fn build_source(queue: &str, args: &SubscriptionArgs) -> Source {
    let mut source = Source::builder().address(queue.to_string());
    if args.durable == Some(true) {
        source = source
            .durable(TerminusDurability::UnsettledState)
            .expiry_policy(TerminusExpiryPolicy::Never);
    }
    if let Some(selector) = &args.selector {
        let mut filter = FilterSet::new();
        filter.insert(
            Symbol::from("apache.org:selector-filter:string"),
            Value::Described(Box::new(SelectorFilter::new(selector.clone()).into())),
        );
        source = source.filter(filter);
    }
    if let Some(capabilities) = &args.capabilities {
        source = source.capabilities(
            capabilities
                .iter()
                .map(|c| Symbol::from(c.as_str()))
                .collect::<Vec<_>>(),
        );
    }
    source.build()
}

impl AmqpLink {
    /// Opens a connection, a session and a receiver for `enrollment`, bounded in time.
    pub async fn open(
        broker: &BrokerSettings,
        enrollment: &Enrollment,
        prefetch: u32,
        policy: FailureOutcomePolicy,
    ) -> Result<Self, LinkError> {
        tokio::time::timeout(
            broker.connect_timeout,
            Self::open_inner(broker, enrollment, prefetch, policy),
        )
        .await
        .map_err(|_| LinkError::ConnectTimeout(broker.connect_timeout))?
    }

    async fn open_inner(
        broker: &BrokerSettings,
        enrollment: &Enrollment,
        prefetch: u32,
        policy: FailureOutcomePolicy,
    ) -> Result<Self, LinkError> {
        let name = link_name(enrollment);
        let mut lease = broker.session(enrollment.id, &name).await?;
        let source = build_source(&enrollment.queue, &enrollment.subscription_args);
        let attached = Receiver::builder()
            .name(name)
            .source(source)
            .auto_accept(false)
            .credit_mode(CreditMode::Auto(prefetch))
            .attach(&mut lease.session)
            .await;
        let receiver = match attached {
            Ok(receiver) => receiver,
            Err(e) => {
                lease.end().await;
                return Err(e.into());
            }
        };
        let advertised = receiver
            .source()
            .as_ref()
            .and_then(|s| s.outcomes.as_ref())
            .map(|outcomes| outcomes.0.as_slice());
        let failure_outcome = choose_failure_outcome(policy, advertised);
        Ok(Self {
            lease,
            receiver,
            failure_outcome,
        })
    }

    /// Sets the link credit: 0 stops the broker sending while the breaker is open.
    pub async fn set_credit(&mut self, credit: u32) -> Result<(), LinkError> {
        self.receiver
            .set_credit(credit)
            .await
            .map_err(|e| LinkError::Credit(e.to_string()))
    }

    pub fn failure_outcome(&self) -> FailureOutcome {
        self.failure_outcome
    }

    /// Waits for the next message. Cancel-safe (fe2o3-amqp #22), so it may sit in `select!`.
    /// A message whose sections cannot be decoded is returned as [`Incoming::Undecodable`]
    /// with what is needed to settle it, rather than as a link error: reconnecting would
    /// only bring it back.
    pub async fn recv(&mut self) -> Result<Incoming, LinkError> {
        match self.receiver.recv::<Body<Value>>().await {
            Ok(delivery) => Ok(Incoming::Message(Box::new(delivery))),
            Err(RecvError::MessageDecode(e)) => Ok(Incoming::Undecodable {
                info: e.info,
                reason: e.source.to_string(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Accepts several deliveries at once: one disposition per run of consecutive delivery
    /// ids instead of one per delivery, which saves the broker and this link a frame each.
    pub async fn accept_all(&mut self, deliveries: Vec<DeliveryInfo>) -> Result<(), LinkError> {
        self.receiver.accept_all(deliveries).await?;
        Ok(())
    }

    /// Settles one delivery with the outcome its POST earned.
    pub async fn settle(
        &mut self,
        delivery: impl Into<DeliveryInfo>,
        settlement: Settlement,
    ) -> Result<(), LinkError> {
        match (settlement, self.failure_outcome) {
            (Settlement::Accept | Settlement::Drop, _) => self.receiver.accept(delivery).await?,
            (Settlement::Reject(reason), _) => {
                let error = definitions::Error::new(
                    definitions::AmqpError::NotAllowed,
                    Some(format!("hot-potato: {reason}")),
                    None,
                );
                self.receiver.reject(delivery, error).await?
            }
            (Settlement::HandBack, _) | (Settlement::Fail, FailureOutcome::Released) => {
                self.receiver.release(delivery).await?
            }
            (Settlement::Fail, FailureOutcome::Modified) => {
                let modified = Modified {
                    delivery_failed: Some(true),
                    undeliverable_here: Some(false),
                    message_annotations: None,
                };
                self.receiver.modify(delivery, modified).await?
            }
        }
        Ok(())
    }

    /// Ends the link with `closed=false`: a durable subscription survives it. Used on
    /// shutdown and restart. Errors are logged, not returned: the broker drops what it
    /// must when the connection goes.
    pub async fn detach(self) {
        let Self {
            lease,
            mut receiver,
            ..
        } = self;
        let detach = async {
            // Stop the flow first so nothing new arrives while the link winds down.
            let _ = receiver.set_credit(0).await;
            receiver.detach().await.map_err(|(_, e)| e)
        };
        match tokio::time::timeout(LINK_END_TIMEOUT, detach).await {
            Ok(Ok(_detached)) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "detach was not clean"),
            Err(_) => tracing::warn!("the broker did not answer the detach; ending the session"),
        }
        lease.end().await;
    }

    /// Ends the link with `closed=true`, which removes a durable subscription. Used on DELETE.
    pub async fn close(self) {
        let Self {
            lease,
            mut receiver,
            ..
        } = self;
        let close = async {
            let _ = receiver.set_credit(0).await;
            receiver.close().await
        };
        match tokio::time::timeout(LINK_END_TIMEOUT, close).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "link close was not clean"),
            Err(_) => {
                tracing::warn!("the broker did not answer the link close; ending the session")
            }
        }
        lease.end().await;
    }

    /// Drops the link after a broker error: whatever is unsettled goes back to the queue
    /// when the session ends.
    pub async fn abandon(self) {
        let Self {
            lease, receiver, ..
        } = self;
        drop(receiver);
        lease.end().await;
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
