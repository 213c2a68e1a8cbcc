//! The broker side: connections (dedicated or pooled, over TCP, TLS or a dialer a test
//! supplies), the receiver link, the failure outcome chosen from the broker's attach, and what
//! the broker is told about each delivery. Knows nothing of HTTP.
//!
//! - [`dial`]: opening and closing one connection.
//! - [`connection`]: the broker settings and an enrollment's session lease.
//! - [`pool`]: the shared connections and sessions of `AMQP_CONNECTION_POOL`.
//! - [`source`]: link names and the source terminus.
//! - [`link`]: the receiver link: attach, receive, settle, credit, detach, close.
//! - [`depth`]: whether a payload is safe to decode: its nesting, walked without recursion.
//! - [`outcome`]: dispositions and the failure-outcome choice.
//! - [`publish`]: the publisher: a connection with a sender per address, outcomes awaited.
//! - [`reply_link`]: the receiver that takes the replies to `POST /request`.
//! - [`error`]: the link error type.

pub mod connection;
pub mod depth;
pub mod dial;
pub mod error;
pub mod link;
pub mod outcome;
pub mod pool;
pub mod publish;
pub mod reply_link;
pub mod source;

pub use connection::BrokerSettings;
pub use error::LinkError;
pub use link::{AmqpLink, Incoming};
pub use outcome::Disposition;
