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
    #[error("the broker URL has no usable host")]
    BadUrl,
}
