//! The one error type of the API: every failure maps to a status and a JSON
//! `{"error": ...}` body in one place. Internal details are logged, never returned.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::json;

use crate::enrollment::error::EnrollmentError;
use crate::store::StoreError;

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The body of every error answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What is wrong, naming the field at fault where there is one.
    pub error: String,
}

/// Every way a request can fail.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unprocessable(String),
    #[error("Content-Type must be application/json")]
    UnsupportedMediaType,
    #[error("request body is larger than {MAX_BODY_BYTES} bytes")]
    PayloadTooLarge,
    #[error("missing or wrong API token: send `Authorization: Bearer <API_TOKEN>`")]
    Unauthorized,
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed on this path")]
    MethodNotAllowed,
    #[error("too many requests from this client; retry in a minute")]
    TooManyRequests,
    #[error("the request took too long; send it whole and promptly")]
    RequestTimeout,
    #[error("request body is larger than PUBLISH_MAX_BYTES ({0} bytes)")]
    BodyTooLarge(usize),
    /// A publish or request that ended with the broker's (or the reply's) answer.
    #[error("{message}")]
    Relay { status: StatusCode, message: String },
    #[error("the daemon is shutting down")]
    ShuttingDown,
    #[error("the enrollment store is unavailable")]
    Store(#[from] StoreError),
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::PayloadTooLarge | Self::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Relay { status, .. } => *status,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::ShuttingDown | Self::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl From<EnrollmentError> for ApiError {
    fn from(e: EnrollmentError) -> Self {
        match e {
            EnrollmentError::Malformed(m) => Self::BadRequest(m),
            EnrollmentError::Invalid(m) => Self::Unprocessable(m),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Store(e) = &self {
            tracing::error!(error = %e, "store write failed");
        }
        let mut response =
            (self.status(), Json(json!({ "error": self.to_string() }))).into_response();
        if matches!(self, Self::TooManyRequests) {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("60"),
            );
        }
        if matches!(self, Self::Unauthorized) {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}
