//! Errors of the broker side.

use std::time::Duration;

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
    /// The reply link attached, but the broker named no node to send replies to.
    #[error("the broker created no addressable reply node; set REPLY_ADDRESS")]
    NoReplyNode,
    #[error("the broker URL has no usable host")]
    BadUrl,
    /// The attach answer's sender settle mode is `settled`: the broker would send every message
    /// pre-settled, so a failed POST could not hand it back and it would be lost.
    #[error(
        "the broker would send every message pre-settled (attach answered snd-settle-mode \
         `settled`), so a message whose POST fails could not be handed back and would be lost; \
         the link is refused: make the broker deliver this address unsettled (at-least-once)"
    )]
    PreSettled,
    /// A message larger than the link's `max-message-size` arrived: fe2o3 closed the link and
    /// the broker keeps the message (it comes back first on the next link).
    #[error(
        "a message of {size} bytes is larger than AMQP_MAX_MESSAGE_BYTES ({max} bytes); the link \
         was closed and the broker keeps the message: raise AMQP_MAX_MESSAGE_BYTES or move the \
         message off the queue"
    )]
    MessageTooLarge { size: u64, max: u64 },
}
