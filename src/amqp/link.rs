//! One enrollment's AMQP 1.0 receiver link, on a session from [`crate::amqp::connection`]:
//! attach, receive, settle, credit, and the two ways a link ends (detach keeps a durable
//! subscription, close removes it).
//!
//! The link asks for unsettled deliveries (a pre-settled message could not be handed back, so
//! a broker that insists on pre-settling is refused) and bounds a message's size with
//! `max-message-size` (`AMQP_MAX_MESSAGE_BYTES`). A broker should not send a larger message
//! (AMQP 1.0 §2.7.3), but RabbitMQ 3.10 does; fe2o3-amqp then detaches the link with
//! `closed=true` and `amqp:link:message-size-exceeded` before the message is decoded, and
//! `recv` fails. The broker keeps the message (unsettled, it returns with the session), so the
//! worker reconnects and meets it again at the head of the queue until the limit is raised or
//! the message is moved.

use std::time::Duration;

use fe2o3_amqp::Receiver;
use fe2o3_amqp::link::RecvError;
use fe2o3_amqp::link::delivery::DeliveryInfo;
use fe2o3_amqp::link::receiver::CreditMode;
use fe2o3_amqp::types::definitions;
use fe2o3_amqp::types::definitions::SenderSettleMode;
use fe2o3_amqp::types::messaging::{Body, Message, Modified};
use fe2o3_amqp::types::primitives::Value;

use crate::amqp::connection::{BrokerSettings, SessionLease};
use crate::amqp::depth;
use crate::amqp::error::LinkError;
use crate::amqp::outcome::{Disposition, choose_failure_outcome};
use crate::amqp::source::{build_source, link_name};
use crate::enrollment::outcome::{FailureOutcome, FailureOutcomePolicy};
use crate::enrollment::record::Enrollment;

/// How long a detach or link close may wait for the broker's answer. A broker that never
/// answers must not hold a DELETE or a shutdown: the session is ended (or the connection
/// closed) after it, which settles the link on the broker's side anyway.
const LINK_END_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest ending a link may take, its session's (or connection's) end included.
pub const END_BOUND: Duration = Duration::from_secs(
    LINK_END_TIMEOUT.as_secs() + crate::amqp::connection::END_TIMEOUT.as_secs(),
);

/// An attached receiver with the session (and, unless pooled, the connection) it owns.
pub struct AmqpLink {
    lease: SessionLease,
    receiver: Receiver,
    failure_outcome: FailureOutcome,
}

/// What a link handed over; `T` identifies the delivery for its settlement.
#[derive(Debug)]
pub enum Incoming<T> {
    Message {
        delivery: T,
        message: Box<Message<Body<Value>>>,
    },
    /// A transfer whose message sections could not be decoded.
    Undecodable { delivery: T, reason: String },
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
        let attached = {
            // A shared session is held for the attach only.
            let mut session = lease.session().await;
            Receiver::builder()
                .name(name)
                .source(source)
                .auto_accept(false)
                // No credit until the attach answer is checked below: a broker that pre-settles
                // must not get the chance to send (and so lose) a single message.
                .credit_mode(CreditMode::Manual)
                // Every message unsettled, so each one can be handed back until its POST succeeded.
                .sender_settle_mode(SenderSettleMode::Unsettled)
                .max_message_size(broker.max_message_size)
                .attach(&mut *session)
                .await
        };
        let mut receiver = match attached {
            Ok(receiver) => receiver,
            Err(e) => {
                lease.end().await;
                return Err(e.into());
            }
        };
        receiver.set_payload_check(Some(depth::check_payload));
        let source = receiver.source().as_ref();
        let advertised = source
            .and_then(|s| s.outcomes.as_ref())
            .map(|outcomes| outcomes.0.as_slice());
        let default_outcome = source.and_then(|s| s.default_outcome.as_ref());
        let failure_outcome = choose_failure_outcome(policy, advertised, default_outcome);
        // The broker's answer (vendored fe2o3 patch 5 exposes it).
        let settle_mode = receiver.snd_settle_mode();
        let mut link = Self {
            lease,
            receiver,
            failure_outcome,
        };
        if let Err(e) = check_sender_settle_mode(settle_mode) {
            // Detach, not close: a durable subscription and its messages stay on the broker.
            link.detach().await;
            return Err(e);
        }
        // From here fe2o3 tops the credit up to `prefetch` as messages are settled.
        link.receiver.set_credit_mode(CreditMode::Auto(prefetch));
        if let Err(e) = link.set_credit(prefetch).await {
            link.abandon().await;
            return Err(e);
        }
        Ok(link)
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
    /// only bring it back. So is one that [`depth::check_payload`] refused before decoding
    /// (nested deeper than [`depth::MAX_DEPTH`], or not safe to decode), with its refusal
    /// as the reason.
    pub async fn recv(&mut self) -> Result<Incoming<DeliveryInfo>, LinkError> {
        match self.receiver.recv::<Body<Value>>().await {
            Ok(delivery) => {
                let (info, message) = delivery.into_parts();
                Ok(Incoming::Message {
                    delivery: info,
                    message: Box::new(message),
                })
            }
            Err(RecvError::MessageDecode(e)) => Ok(Incoming::Undecodable {
                delivery: e.info,
                reason: match e.source {
                    // A refusal, or a decoder's own message, without serde_amqp's prefix.
                    serde_amqp::Error::Message(message) => message,
                    other => other.to_string(),
                },
            }),
            Err(RecvError::MessageSizeExceeded(e)) => Err(LinkError::MessageTooLarge {
                size: e.size,
                max: e.max_size,
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Accepts several deliveries at once: one disposition per run of consecutive delivery
    /// ids instead of one per delivery, which saves the broker and this link a frame each.
    /// Boxed, as in [`AmqpLink::settle`].
    pub async fn accept_all(&mut self, deliveries: Vec<DeliveryInfo>) -> Result<(), LinkError> {
        Box::pin(self.receiver.accept_all(deliveries)).await?;
        Ok(())
    }

    /// Settles one delivery as the pipeline decided. Boxed: fe2o3's settling futures take
    /// ~1 KiB, and the receive loop that awaits them is held by every idle enrollment; one
    /// allocation per disposition sent costs less.
    pub async fn settle(
        &mut self,
        delivery: DeliveryInfo,
        disposition: Disposition,
    ) -> Result<(), LinkError> {
        Box::pin(self.settle_inner(delivery, disposition)).await
    }

    async fn settle_inner(
        &mut self,
        delivery: DeliveryInfo,
        disposition: Disposition,
    ) -> Result<(), LinkError> {
        match disposition {
            Disposition::Accept => self.receiver.accept(delivery).await?,
            Disposition::Reject(reason) => {
                let error = definitions::Error::new(
                    definitions::AmqpError::NotAllowed,
                    Some(format!("hot-potato: {reason}")),
                    None,
                );
                self.receiver.reject(delivery, error).await?
            }
            Disposition::Release => self.receiver.release(delivery).await?,
            Disposition::Modify => {
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
            Err(_) => tracing::warn!(
                shared_session = lease.is_shared(),
                "the broker did not answer the detach; ending the session unless shared, else dropping the link"
            ),
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
            Err(_) => tracing::warn!(
                shared_session = lease.is_shared(),
                "the broker did not answer the link close; ending the session unless shared, else dropping the link"
            ),
        }
        lease.end().await;
    }

    /// Drops the link after a broker error: whatever is unsettled goes back to the queue
    /// when the session ends, or on a shared session with the link's detach. The dropped
    /// receiver detaches with `closed=false` (the vendored fe2o3-amqp's patch), so a durable
    /// subscription survives; a failed link would not answer a detach handshake anyway.
    pub async fn abandon(self) {
        let Self {
            lease, receiver, ..
        } = self;
        drop(receiver);
        lease.end().await;
    }
}

/// Refuses a link the broker would pre-settle: a pre-settled message is gone from the broker
/// when it arrives, so `released`, `modified` and `rejected` become silent no-ops and a failed
/// POST loses the message.
fn check_sender_settle_mode(mode: SenderSettleMode) -> Result<(), LinkError> {
    match mode {
        SenderSettleMode::Unsettled => Ok(()),
        SenderSettleMode::Settled => Err(LinkError::PreSettled),
        SenderSettleMode::Mixed => {
            // Allowed to pre-settle some messages; brokers answer `mixed` when they accept the
            // client's choice loosely, and fe2o3 does not say which transfers came settled.
            tracing::warn!(
                "the broker answered snd-settle-mode `mixed` to a request for `unsettled`: messages it sends pre-settled cannot be handed back"
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp::{Connection, Session};
    use hot_potato_testkit::peer::{Peer, PeerConfig};

    /// The in-memory peer echoes the mode the client asks for, so each mode fe2o3 can be
    /// answered with is read back from the receiver.
    #[tokio::test]
    async fn the_answered_settle_mode_is_read_from_the_receiver() {
        let peer = Peer::start(PeerConfig::default());
        let mut connection = Connection::builder()
            .container_id("settle-mode-test")
            .open_with_stream(peer.dial())
            .await
            .expect("open");
        let mut session = Session::begin(&mut connection).await.expect("begin");
        for mode in [
            SenderSettleMode::Unsettled,
            SenderSettleMode::Settled,
            SenderSettleMode::Mixed,
        ] {
            let receiver = Receiver::builder()
                .name(format!("link-{mode:?}"))
                .source("q")
                .sender_settle_mode(mode.clone())
                .attach(&mut session)
                .await
                .expect("attach");
            assert_eq!(receiver.snd_settle_mode(), mode);
            receiver.close().await.expect("close");
        }
        session.end().await.expect("end");
        connection.close().await.expect("close");
    }

    #[test]
    fn only_a_pre_settling_broker_is_refused() {
        assert!(check_sender_settle_mode(SenderSettleMode::Unsettled).is_ok());
        assert!(check_sender_settle_mode(SenderSettleMode::Mixed).is_ok());
        let refused = check_sender_settle_mode(SenderSettleMode::Settled)
            .expect_err("pre-settled is refused")
            .to_string();
        assert!(refused.contains("pre-settled"), "{refused}");
        assert!(refused.contains("lost"), "{refused}");
    }
}
