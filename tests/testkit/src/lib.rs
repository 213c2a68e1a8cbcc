//! hot-potato's test kit: what the integration tests and the benchmark share, so there is one
//! copy of each helper. Dev-only; never a dependency of the daemon itself.
//!
//! # Layout
//! - [`peer`]: an in-memory AMQP 1.0 peer that plays the broker over `tokio::io::duplex` (or
//!   loopback TCP), records every frame a client sends and stages faults on demand.

pub mod peer;
