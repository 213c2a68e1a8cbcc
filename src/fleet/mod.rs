//! The enrollments the daemon runs: the map and its writes over the store ([`registry`]), what
//! changes when it is one replica of many ([`shared`]), the worker tasks ([`supervisor`]) and the subscriptions of deleted enrollments still to be
//! closed ([`closer`]).

pub mod closer;
pub mod registry;
pub mod shared;
pub mod supervisor;

#[cfg(test)]
mod tests;

pub use registry::{Created, Registry};
pub use supervisor::Supervisor;
