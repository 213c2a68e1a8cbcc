//! The HTTP API: enrollment routes, health, and the one error type whose `IntoResponse` maps
//! every failure to a status and a JSON `{"error": ...}` body. Internal details are logged,
//! never returned.

use std::time::Duration;

use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::json;
use uuid::Uuid;

use crate::enrollment::{EnrollmentError, NewEnrollment};
use crate::registry::{Created, Registry};
use crate::store::StoreError;
use crate::supervisor::Supervisor;

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// How long DELETE waits for the worker to hand back its message and close its link before
/// answering, so that no POST for the enrollment starts after the answer.
const DELETE_WAIT: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct AppState {
    pub registry: Registry,
    pub supervisor: Supervisor,
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
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed on this path")]
    MethodNotAllowed,
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
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
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
        (self.status(), Json(json!({ "error": self.to_string() }))).into_response()
    }
}

/// The whole API; tests can drive it with `tower::ServiceExt::oneshot` or a real listener.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/enroll", post(enroll))
        .route("/enroll/{id}", delete(unenroll))
        .route("/enrollments", get(list))
        .route("/enrollments/{id}", get(show))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

async fn health(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({
        "status": if state.supervisor.is_shutting_down() { "stopping" } else { "ok" },
        "enrollments": state.registry.len(),
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return false;
    };
    let Ok(value) = value.to_str() else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

async fn enroll(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    if state.supervisor.is_shutting_down() {
        return Err(ApiError::ShuttingDown);
    }
    if !is_json(&headers) {
        return Err(ApiError::UnsupportedMediaType);
    }
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge
        } else {
            ApiError::BadRequest(format!("cannot read the request body: {rejection}"))
        }
    })?;
    let value: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("malformed JSON: {e}")))?;
    let new = NewEnrollment::from_json(value)?;
    state
        .registry
        .check_target(&new.target_url)
        .map_err(ApiError::Unprocessable)?;
    let (created, entry) = state.registry.create(new).await?;
    let status = match created {
        Created::New => StatusCode::CREATED,
        Created::Existing => StatusCode::OK,
    };
    Ok((status, Json(entry.view())).into_response())
}

fn no_enrollment(id: &str) -> ApiError {
    ApiError::NotFound(format!("no enrollment with id {id}"))
}

fn parse_id(raw: &str) -> Result<Uuid, ApiError> {
    // An id that is not a UUID names no enrollment: 404, like any other unknown id.
    Uuid::parse_str(raw).map_err(|_| no_enrollment(raw))
}

async fn unenroll(
    State(state): State<AppState>,
    Path(raw): Path<String>,
) -> Result<StatusCode, ApiError> {
    if state.supervisor.is_shutting_down() {
        return Err(ApiError::ShuttingDown);
    }
    let id = parse_id(&raw)?;
    let exit = state
        .registry
        .delete(id)
        .await?
        .ok_or_else(|| no_enrollment(&raw))?;
    if !exit.wait(DELETE_WAIT).await {
        tracing::warn!(enrollment_id = %id, "worker still closing its link after DELETE answered");
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn list(State(state): State<AppState>) -> impl IntoResponse {
    Json(state.registry.list())
}

async fn show(
    State(state): State<AppState>,
    Path(raw): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let id = parse_id(&raw)?;
    let entry = state.registry.get(id).ok_or_else(|| no_enrollment(&raw))?;
    Ok(Json(entry.view()))
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
}
