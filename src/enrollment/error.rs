//! Why a creation request is not a valid enrollment.

/// Why a request body is not a valid enrollment. `Malformed` is a body of the wrong shape
/// (HTTP 400); `Invalid` is a well-formed body with a value we refuse (HTTP 422).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnrollmentError {
    #[error("{0}")]
    Malformed(String),
    #[error("{0}")]
    Invalid(String),
}
