//! The message path of one enrollment: receive → deliver → settle, with reconnects. The only
//! room that sees both the broker ([`crate::amqp`]) and the HTTP side ([`crate::delivery`]).
//!
//! - [`link`]: the seam: what the worker needs of a link and its opener; the AMQP one.
//! - [`worker`]: connect, run the receive loop, reconnect with backoff, stop.
//! - [`receive`]: one link's loop: in-flight bound, inline or spawned deliveries, breaker.
//! - [`reply`]: the reply step: the final answer published to `reply-to` before settling.
//! - [`settle`]: the one table outcome → disposition + label; batched accepts.
//! - [`batch`]: batched POSTs: gathering messages into batches, one outcome per message.
//! - [`credit`]: link credit that follows the breaker.
//! - [`timer`]: the loop's deadline timers, kept across its turns.
//! - [`catch`]: one message's panic kept to that message.

pub mod batch;
pub mod catch;
pub mod credit;
pub mod link;
pub mod receive;
pub mod reply;
pub mod settle;
pub mod timer;
pub mod worker;

#[cfg(test)]
pub(crate) mod fake;
#[cfg(test)]
pub(crate) mod test_target;
#[cfg(test)]
pub(crate) mod tests;

pub use link::{AmqpOpener, Link, LinkOpener};
pub use worker::WorkerContext;
