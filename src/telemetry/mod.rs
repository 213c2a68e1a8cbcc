//! What the daemon tells operators about itself: Prometheus metrics ([`metrics`]) and the
//! events that update an enrollment's live status, its metrics and the log together
//! ([`events`]); the publish and request/reply metrics ([`relay`]).

pub mod events;
pub mod metrics;
pub mod relay;

pub use events::EnrollmentTelemetry;
pub use metrics::{Metrics, OutcomeLabel};
