//! The vocabulary every other room speaks; it imports nothing else in the crate.
//!
//! - [`record`]: the stored enrollment, its subscription arguments, the validated creation request.
//! - [`error`]: why a creation request is refused (400 or 422).
//! - [`settings`]: the `delivery` object as given, its validation and bounds.
//! - [`batch`]: `delivery.batch`, several messages per POST: bounds and defaults.
//! - [`status_pattern`]: status codes, ranges and classes (`retry_on`, `reject_on`, `drop_on`).
//! - [`policy`]: the effective delivery policy (settings over the daemon's defaults).
//! - [`outcome`]: how a failed message goes back to the broker.
//! - [`address`]: guarded address classes (metadata, link-local, private…) in every spelling.
//! - [`address_glob`]: which AMQP addresses the publish routes may send to
//!   (`PUBLISH_ADDRESSES`).
//! - [`target`]: which target URLs and addresses are allowed (`TARGET_ALLOWLIST`,
//!   `TARGET_DENY_PRIVATE`, the guarded classes).
//! - [`status`]: the live status an operator sees (state, breaker, counters, last error).
//! - [`live`]: record + policy + status, as the daemon holds an enrollment.

pub mod address;
pub mod address_glob;
pub mod batch;
pub mod error;
pub mod live;
pub mod outcome;
pub mod policy;
pub mod record;
pub mod settings;
pub mod status;
pub mod status_pattern;
pub mod target;

pub use error::EnrollmentError;
pub use live::LiveEnrollment;
pub use record::{Enrollment, NewEnrollment, SubscriptionArgs};
