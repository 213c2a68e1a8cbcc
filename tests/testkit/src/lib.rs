//! hot-potato's test kit: what the integration tests and the benchmark share, so there is one
//! copy of each helper. Dev-only; never a dependency of the daemon itself.
//!
//! # Layout
//! - [`peer`]: an in-memory AMQP 1.0 peer (fe2o3-amqp's `acceptor` over `tokio::io::duplex`)
//!   that records the frames a client sends.

pub mod peer;
