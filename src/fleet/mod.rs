//! The enrollments the daemon runs: the map and its writes over the store ([`registry`]) and
//! the worker tasks ([`supervisor`]).

pub mod registry;
pub mod supervisor;

#[cfg(test)]
mod tests;

pub use registry::{Created, Registry};
pub use supervisor::Supervisor;
