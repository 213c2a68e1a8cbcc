//! hot-potato's test kit: what the integration tests and the benchmark share, so there is one
//! copy of each helper. Dev-only; never a dependency of the daemon itself, and it does not depend
//! on the `hot-potato` crate either: it drives the binary and its HTTP API only.
//!
//! Everything that talks to the network returns [`anyhow::Result`]: the benchmark reports the
//! error, the tests' thin wrappers in `tests/common` turn it into a panic. Every wait is bounded.
//!
//! # Layout
//! - [`api`]: a client for the daemon's HTTP API (enroll, read, delete, wait for a state).
//! - [`daemon`]: the hot-potato binary as a child process: its environment, a free port, killed
//!   on drop, and the list of live children that a time limit kills.
//! - [`management`]: the RabbitMQ management HTTP API (declare, depth, publish raw, delete).
//! - [`parallel`]: many calls at once, at most N at a time.
//! - [`peer`]: an in-memory AMQP 1.0 peer that plays the broker over `tokio::io::duplex` (or
//!   loopback TCP), records every frame a client sends and stages faults on demand.
//! - [`proxy`]: a TCP proxy in front of the broker whose connections a test can cut.
//! - [`publisher`]: an fe2o3-amqp sender per queue on one connection, every message confirmed.
//! - [`target`]: HTTP targets: one that records or counts what it receives, one that never
//!   answers.
//! - [`wait`]: polling a condition until it holds or a deadline passes.

pub mod api;
pub mod daemon;
pub mod management;
pub mod parallel;
pub mod peer;
pub mod proxy;
pub mod publisher;
pub mod target;
pub mod wait;

/// RabbitMQ 3.x AMQP 1.0 address of an existing queue.
pub fn address(queue: &str) -> String {
    format!("/amq/queue/{queue}")
}
