//! Publishing: one connection of its own with a sender per address, shared by everything the
//! daemon publishes (`POST /publish`, `POST /request`, the replies of `delivery.reply`).
//!
//! Every message goes unsettled and the caller waits for the broker's outcome: accepted, or
//! the reason it refused. A sender is attached on first use of an address and kept; the
//! connection is opened on first use and again once it is gone. Concurrent publishes to one
//! address share its sender, holding it only while the transfer is handed to the session, so
//! their outcomes are awaited side by side (pipelined), not one after the other.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::link::{SendError, SenderAttachError};
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::definitions::{self, SenderSettleMode};
use fe2o3_amqp::types::messaging::{Data, Message, Outcome};
use fe2o3_amqp::{Sender, Session};
use tokio::sync::Mutex;

use crate::amqp::connection::BrokerSettings;
use crate::amqp::dial::close_quietly;

/// At most this many addresses keep a sender; past it the senders are let go and attached
/// again as needed, so `?address=` cannot grow the daemon's links without end.
const MAX_SENDERS: usize = 256;

/// Why a message was not published.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The broker answered and said no: it rejected or released the message, or refused the
    /// link to the address (no such queue, access refused). Its reason is kept.
    #[error("the broker refused the message: {0}")]
    Refused(String),
    /// No outcome: the broker cannot be reached, the connection failed, or it did not answer
    /// within the bound.
    #[error("the broker is unreachable: {0}")]
    Unreachable(String),
    /// Larger than the link's `max-message-size`.
    #[error("the message is larger than the broker takes: {0}")]
    TooLarge(String),
}

impl PublishError {
    /// The broker answered and refused (as opposed to not answering).
    pub fn is_refusal(&self) -> bool {
        matches!(self, Self::Refused(_))
    }

    pub fn is_too_large(&self) -> bool {
        matches!(self, Self::TooLarge(_))
    }
}

struct Live {
    connection: ConnectionHandle<()>,
    session: SessionHandle<()>,
    senders: HashMap<String, Arc<Mutex<Sender>>>,
}

/// The daemon's publisher. Cheap to share behind an `Arc`.
pub struct Publisher {
    broker: Arc<BrokerSettings>,
    /// Bound on one publish, from connect to the broker's outcome.
    timeout: Duration,
    live: Mutex<Option<Live>>,
    container_id: String,
}

impl Publisher {
    pub fn new(broker: Arc<BrokerSettings>, timeout: Duration) -> Self {
        Self {
            broker,
            timeout,
            live: Mutex::new(None),
            container_id: format!("hot-potato-publisher-{}", uuid::Uuid::new_v4()),
        }
    }

    /// Publishes `message` to `address` and waits for the broker's outcome, at most the
    /// publisher's timeout.
    pub async fn publish(&self, address: &str, message: Message<Data>) -> Result<(), PublishError> {
        match tokio::time::timeout(self.timeout, self.publish_inner(address, message)).await {
            Ok(result) => result,
            Err(_) => Err(PublishError::Unreachable(format!(
                "no outcome within {} ms",
                self.timeout.as_millis()
            ))),
        }
    }

    async fn publish_inner(
        &self,
        address: &str,
        message: Message<Data>,
    ) -> Result<(), PublishError> {
        let sender = self.sender_for(address).await?;
        let sent = sender.lock().await.send_batchable(message).await;
        let outcome = match sent {
            Ok(pending) => pending.await,
            Err(e) => Err(e),
        };
        match outcome {
            Ok(Outcome::Accepted(_)) => Ok(()),
            Ok(Outcome::Rejected(rejected)) => Err(PublishError::Refused(format!(
                "rejected: {}",
                describe(rejected.error.as_ref())
            ))),
            Ok(Outcome::Released(_)) => Err(PublishError::Refused("released".into())),
            Ok(Outcome::Modified(_)) => Err(PublishError::Refused("modified".into())),
            #[allow(unreachable_patterns)]
            Ok(other) => Err(PublishError::Refused(format!("{other:?}"))),
            Err(e) => {
                self.forget(address, &sender).await;
                Err(send_error(e))
            }
        }
    }

    /// The sender for `address`, opening the connection and attaching as needed.
    async fn sender_for(&self, address: &str) -> Result<Arc<Mutex<Sender>>, PublishError> {
        let mut live = self.live.lock().await;
        if live
            .as_ref()
            .is_some_and(|l| l.connection.is_closed() || l.session.is_ended())
            && let Some(dead) = live.take()
        {
            close_quietly(dead.connection).await;
        }
        if live.is_none() {
            *live = Some(self.open().await?);
        }
        let Some(current) = live.as_mut() else {
            return Err(PublishError::Unreachable("no connection".into()));
        };
        if let Some(sender) = current.senders.get(address) {
            return Ok(Arc::clone(sender));
        }
        if current.senders.len() >= MAX_SENDERS {
            // Dropping a sender detaches it; publishes holding one finish first.
            current.senders.clear();
        }
        let attached = tokio::time::timeout(
            self.broker.connect_timeout,
            Sender::builder()
                .name(format!("hot-potato-publish-{}", uuid::Uuid::new_v4()))
                .target(address)
                .sender_settle_mode(SenderSettleMode::Unsettled)
                .attach(&mut current.session),
        )
        .await;
        match attached {
            Ok(Ok(sender)) => {
                let sender = Arc::new(Mutex::new(sender));
                current
                    .senders
                    .insert(address.to_string(), Arc::clone(&sender));
                Ok(sender)
            }
            Ok(Err(e)) => {
                let (error, session_gone) = attach_error(e);
                if session_gone && let Some(dead) = live.take() {
                    close_quietly(dead.connection).await;
                }
                Err(error)
            }
            Err(_) => {
                if let Some(dead) = live.take() {
                    close_quietly(dead.connection).await;
                }
                Err(PublishError::Unreachable(format!(
                    "no answer to the attach within {} ms",
                    self.broker.connect_timeout.as_millis()
                )))
            }
        }
    }

    async fn open(&self) -> Result<Live, PublishError> {
        let mut connection = self
            .broker
            .dedicated(&self.container_id)
            .await
            .map_err(|e| PublishError::Unreachable(e.to_string()))?;
        match Session::begin(&mut connection).await {
            Ok(session) => Ok(Live {
                connection,
                session,
                senders: HashMap::new(),
            }),
            Err(e) => {
                close_quietly(connection).await;
                Err(PublishError::Unreachable(format!(
                    "cannot begin a session: {e}"
                )))
            }
        }
    }

    /// Lets a failed sender go, so the next publish to its address attaches a new one.
    async fn forget(&self, address: &str, sender: &Arc<Mutex<Sender>>) {
        let mut live = self.live.lock().await;
        if let Some(current) = live.as_mut()
            && current
                .senders
                .get(address)
                .is_some_and(|s| Arc::ptr_eq(s, sender))
        {
            current.senders.remove(address);
        }
    }

    /// Closes the connection (shutdown).
    pub async fn close(&self) {
        if let Some(live) = self.live.lock().await.take() {
            drop(live.senders);
            close_quietly(live.connection).await;
        }
    }
}

fn describe(error: Option<&definitions::Error>) -> String {
    match error {
        Some(e) => match &e.description {
            Some(d) => format!("{:?}: {d}", e.condition),
            None => format!("{:?}", e.condition),
        },
        None => "no reason given".into(),
    }
}

/// A broker that detached the link with an error refused the address; anything else means
/// the session or connection is gone.
fn send_error(e: SendError) -> PublishError {
    match e {
        SendError::MessageSizeExceeded(e) => PublishError::TooLarge(e.to_string()),
        SendError::Detached(detach) => match detach {
            fe2o3_amqp::link::DetachError::RemoteDetachedWithError(error)
            | fe2o3_amqp::link::DetachError::RemoteClosedWithError(error) => {
                PublishError::Refused(format!("the link was detached: {}", describe(Some(&error))))
            }
            other => PublishError::Unreachable(format!("the link was detached: {other}")),
        },
        other => PublishError::Unreachable(other.to_string()),
    }
}

/// The error, and whether the session is gone with it. RabbitMQ 3.10 answers an attach to a
/// queue that does not exist by ending the session with `amqp:not-found`: a refusal of the
/// address (502), after which the connection is opened again for the next publish.
fn attach_error(e: SenderAttachError) -> (PublishError, bool) {
    use fe2o3_amqp::link::SessionStopReason;
    match e {
        SenderAttachError::RemoteClosedWithError(error) => (
            PublishError::Refused(format!(
                "the address was refused: {}",
                describe(Some(&error))
            )),
            false,
        ),
        SenderAttachError::SessionStopped(SessionStopReason::RemoteEndedWithError(error)) => (
            PublishError::Refused(format!(
                "the address was refused: {}",
                describe(Some(&error))
            )),
            true,
        ),
        SenderAttachError::SessionStopped(_)
        | SenderAttachError::SessionNotMapped
        | SenderAttachError::IllegalState => (PublishError::Unreachable(e.to_string()), true),
        other => (
            PublishError::Refused(format!("the address was refused: {other}")),
            false,
        ),
    }
}
