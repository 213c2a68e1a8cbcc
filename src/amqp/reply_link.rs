//! The daemon's one reply link for `POST /request`: a receiver on a connection of its own,
//! attached to a dynamic node when the broker creates one (the broker names it and removes it
//! with the link), else to the configured `REPLY_ADDRESS`.
//!
//! RabbitMQ 3.10's AMQP 1.0 plugin refuses a dynamic source, so there `REPLY_ADDRESS` is
//! needed: `/queue/NAME` (the plugin declares the queue) or `/amq/queue/NAME` (declared
//! beforehand). Every reply is accepted as it arrives: a reply nobody waits for any more is
//! dropped rather than redelivered for ever.

use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::link::delivery::DeliveryInfo;
use fe2o3_amqp::link::receiver::CreditMode;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::messaging::{Body, Message, Source};
use fe2o3_amqp::types::primitives::Value;
use fe2o3_amqp::{Receiver, Session};

use crate::amqp::connection::BrokerSettings;
use crate::amqp::dial::close_quietly;
use crate::amqp::error::LinkError;

/// Whether an error is the broker saying it makes no dynamic nodes (RabbitMQ 3.x ends the
/// session with `amqp:not-implemented`): then there is no point asking again.
pub fn refuses_dynamic(error: &LinkError) -> bool {
    let text = error.to_string();
    text.contains("NotImplemented") || text.contains("not-implemented")
}

/// Credit of the reply link: replies are small and taken at once.
const REPLY_CREDIT: u32 = 500;

/// An attached reply receiver and the address replies are sent to.
pub struct ReplyLink {
    connection: ConnectionHandle<()>,
    session: SessionHandle<()>,
    receiver: Receiver,
    address: String,
    /// A node the broker made for this link, which goes when the link is closed.
    dynamic: bool,
}

/// One reply as it came.
pub type Reply = Message<Body<Value>>;

impl ReplyLink {
    /// A link on a dynamic node the broker creates and names.
    pub async fn dynamic(broker: &BrokerSettings, container_id: &str) -> Result<Self, LinkError> {
        Self::attach(broker, container_id, None).await
    }

    /// A link on `address` (`REPLY_ADDRESS`).
    pub async fn fixed(
        broker: &BrokerSettings,
        container_id: &str,
        address: &str,
    ) -> Result<Self, LinkError> {
        Self::attach(broker, container_id, Some(address)).await
    }

    async fn attach(
        broker: &BrokerSettings,
        container_id: &str,
        address: Option<&str>,
    ) -> Result<Self, LinkError> {
        let address_arg = address;
        let mut connection = broker.dedicated(container_id).await?;
        let attached = tokio::time::timeout(broker.connect_timeout, async {
            let mut session = Session::begin(&mut connection).await?;
            let source = match address {
                Some(a) => Source::builder().address(a.to_string()).build(),
                None => Source::builder().dynamic(true).build(),
            };
            let receiver = Receiver::builder()
                .name(format!("hot-potato-replies-{}", uuid::Uuid::new_v4()))
                .source(source)
                .auto_accept(false)
                .credit_mode(CreditMode::Auto(REPLY_CREDIT))
                .attach(&mut session)
                .await?;
            Ok::<_, LinkError>((session, receiver))
        })
        .await
        .unwrap_or(Err(LinkError::ConnectTimeout(broker.connect_timeout)));
        let (session, receiver) = match attached {
            Ok(parts) => parts,
            Err(e) => {
                close_quietly(connection).await;
                return Err(e);
            }
        };
        let named = receiver
            .source()
            .as_ref()
            .and_then(|s| s.address.as_ref())
            .map(|a| a.to_string())
            .or_else(|| address.map(str::to_string));
        let Some(address) = named.filter(|a| !a.is_empty()) else {
            close_quietly(connection).await;
            return Err(LinkError::NoReplyNode);
        };
        Ok(Self {
            connection,
            session,
            receiver,
            address,
            dynamic: address_arg.is_none(),
        })
    }

    /// Where replies are to be sent (the `reply-to` of a request).
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The next reply, accepted at once. Cancel-safe.
    pub async fn recv(&mut self) -> Result<Reply, LinkError> {
        let delivery = self.receiver.recv::<Body<Value>>().await?;
        let (info, message): (DeliveryInfo, Reply) = delivery.into_parts();
        self.receiver.accept(info).await?;
        Ok(message)
    }

    /// Ends the link and the connection: a dynamic node's link is closed (the node goes with
    /// it); a link on `REPLY_ADDRESS` only detaches, as every link but a deleted enrollment's.
    pub async fn close(self) {
        let Self {
            connection,
            mut session,
            receiver,
            dynamic,
            ..
        } = self;
        let limit = std::time::Duration::from_secs(2);
        if dynamic {
            let _ = tokio::time::timeout(limit, receiver.close()).await;
        } else {
            let _ = tokio::time::timeout(limit, receiver.detach()).await;
        }
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), session.end()).await;
        close_quietly(connection).await;
    }
}
