//! The HTTP API: the router (enrollment routes, operations routes, the dashboard and docs
//! pages), its OpenAPI document generated from the handlers' annotations, and the one error
//! type whose `IntoResponse` maps every failure to a status and a JSON `{"error": ...}` body.
//! Internal details are logged, never returned.

mod enrollments;
mod ops;
mod security;

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::json;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::enrollment::EnrollmentError;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::store::StoreError;
use crate::supervisor::Supervisor;

pub use security::ApiSecurity;
use security::BearerScheme;

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

#[derive(Clone)]
pub struct AppState {
    pub registry: Registry,
    pub supervisor: Supervisor,
    pub metrics: Metrics,
    pub security: Arc<ApiSecurity>,
}

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
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
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

#[derive(OpenApi)]
#[openapi(
    info(
        title = "hot-potato",
        description = "Pushes messages from an AMQP 1.0 broker to HTTP services. When API_TOKEN is set, \
every route except /health, /ready, the / and /docs pages and (unless METRICS_REQUIRE_TOKEN) /metrics \
requires `Authorization: Bearer <token>`."
    ),
    components(schemas(ErrorBody)),
    modifiers(&BearerScheme)
)]
struct ApiDoc;

fn parts() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(enrollments::enroll))
        .routes(routes!(enrollments::unenroll))
        .routes(routes!(enrollments::list))
        .routes(routes!(enrollments::show))
        .routes(routes!(enrollments::pause))
        .routes(routes!(enrollments::resume))
        .routes(routes!(ops::health))
        .routes(routes!(ops::ready))
        .routes(routes!(ops::stats))
        .routes(routes!(ops::metrics))
        .routes(routes!(ops::openapi_json))
        .routes(routes!(ops::dashboard))
        .routes(routes!(ops::docs))
        .split_for_parts()
}

/// The OpenAPI document of every route the router serves.
pub fn openapi() -> utoipa::openapi::OpenApi {
    parts().1
}

/// The whole API; tests can drive it with `tower::ServiceExt::oneshot` or a real listener.
pub fn router(state: AppState) -> Router {
    let (routes, _) = parts();
    let cors = state.security.cors_layer();
    let mut app = routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            security::guard,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state);
    if let Some(cors) = cors {
        app = app.layer(cors);
    }
    app
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
}
