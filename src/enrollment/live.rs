//! One enrollment as the daemon holds it while it exists: the stored record, its effective
//! delivery policy, and its live status. Shared (`Arc`) by the map, the worker and the API.

use std::sync::Arc;

use crate::enrollment::policy::{DeliveryDefaults, DeliveryPolicy};
use crate::enrollment::record::Enrollment;
use crate::enrollment::status::EnrollmentStatus;

#[derive(Debug)]
pub struct LiveEnrollment {
    pub enrollment: Enrollment,
    /// Resolved once, when the enrollment is loaded or created.
    pub policy: DeliveryPolicy,
    pub status: Arc<EnrollmentStatus>,
}

impl LiveEnrollment {
    pub fn new(enrollment: Enrollment, defaults: &DeliveryDefaults) -> Self {
        let policy = enrollment.delivery.resolve(defaults);
        let status = Arc::new(EnrollmentStatus::default());
        status.set_paused(enrollment.paused);
        Self {
            enrollment,
            policy,
            status,
        }
    }
}
