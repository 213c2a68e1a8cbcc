//! Enrollment routes: create, list, show, delete, pause and resume.

use std::time::Duration;

use axum::Json;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use uuid::Uuid;

use crate::api::error::{ApiError, ErrorBody};
use crate::api::security;
use crate::api::state::AppState;
use crate::api::views::EnrollmentView;
use crate::enrollment::record::{NewEnrollment, SubscriptionArgs};
use crate::enrollment::settings::DeliverySettings;
use crate::enrollment::target::TargetPolicy;
use crate::fleet::registry::Created;

/// How long DELETE waits for the worker to hand back its message and close its link before
/// answering, so that no POST for the enrollment starts after the answer.
const DELETE_WAIT: Duration = Duration::from_secs(1);

/// The body of `POST /enroll` (documentation only: the handler validates the JSON itself so
/// that type errors (400) and refused values (422) are told apart and the field is named).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct EnrollRequest {
    /// AMQP source address, passed to the broker verbatim (`/amq/queue/NAME` on RabbitMQ 3.x).
    queue: String,
    /// http or https URL every message is POSTed to.
    target_url: String,
    subscription_args: Option<SubscriptionArgs>,
    delivery: Option<DeliverySettings>,
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

/// Enroll a queue: every message on it is POSTed to `target_url`.
#[utoipa::path(
    post, path = "/enroll", tag = "enrollments",
    request_body = EnrollRequest,
    responses(
        (status = 201, description = "Created", body = EnrollmentView),
        (status = 200, description = "The same queue and target_url were already enrolled", body = EnrollmentView),
        (status = 400, description = "Malformed JSON or a field of the wrong type", body = ErrorBody),
        (status = 401, description = "Missing or wrong API token", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 415, description = "Content-Type is not application/json", body = ErrorBody),
        (status = 422, description = "Missing field, empty queue, target refused, unknown key, value out of range", body = ErrorBody),
        (status = 429, description = "Too many changes from this client", body = ErrorBody),
        (status = 503, description = "Store write failed, or shutting down", body = ErrorBody),
    )
)]
pub async fn enroll(
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
    let value = security::parse_json(&body)?;
    let new = NewEnrollment::from_json(value)?;
    state
        .registry
        .check_target(&new.target_url)
        .map_err(ApiError::Unprocessable)?;
    check_resolved(state.registry.target_policy(), &new.target_url)
        .await
        .map_err(ApiError::Unprocessable)?;
    let (created, entry) = state.registry.create(new).await?;
    let status = match created {
        Created::New => StatusCode::CREATED,
        Created::Existing => StatusCode::OK,
    };
    Ok((
        status,
        Json(EnrollmentView::shared(
            entry.as_ref(),
            state.cluster.as_ref(),
        )),
    )
        .into_response())
}

/// How long enrolling waits for a target's name to resolve.
const ENROLL_LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);

/// Refuses a target whose name resolves now to an address the rules refuse. A name that does
/// not resolve yet is let through: every connect checks the addresses again.
async fn check_resolved(policy: &TargetPolicy, target_url: &str) -> Result<(), String> {
    let Ok(url) = url::Url::parse(target_url) else {
        return Ok(());
    };
    let Some(url::Host::Domain(name)) = url.host() else {
        return Ok(());
    };
    let port = url.port_or_known_default().unwrap_or(80);
    let lookup =
        tokio::time::timeout(ENROLL_LOOKUP_TIMEOUT, tokio::net::lookup_host((name, port))).await;
    let Ok(Ok(addresses)) = lookup else {
        return Ok(());
    };
    for address in addresses {
        policy
            .check_address(address.ip())
            .map_err(|reason| format!("`target_url` host {name} {reason}"))?;
    }
    Ok(())
}

fn no_enrollment(id: &str) -> ApiError {
    ApiError::NotFound(format!("no enrollment with id {id}"))
}

fn parse_id(raw: &str) -> Result<Uuid, ApiError> {
    // An id that is not a UUID names no enrollment: 404, like any other unknown id.
    Uuid::parse_str(raw).map_err(|_| no_enrollment(raw))
}

/// Delete an enrollment: its receiver is closed (`closed=true`, which removes a durable
/// subscription) and a message in hand is released back to the broker.
#[utoipa::path(
    delete, path = "/enroll/{id}", tag = "enrollments",
    params(("id" = String, Path, description = "Enrollment id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "Missing or wrong API token", body = ErrorBody),
        (status = 404, description = "Unknown id", body = ErrorBody),
        (status = 503, description = "Store write failed, or shutting down", body = ErrorBody),
    )
)]
pub async fn unenroll(
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

/// Every enrollment, oldest first, with its live state and counters.
#[utoipa::path(
    get, path = "/enrollments", tag = "enrollments",
    responses(
        (status = 200, body = Vec<EnrollmentView>),
        (status = 401, description = "Missing or wrong API token", body = ErrorBody),
    )
)]
pub async fn list(State(state): State<AppState>) -> Json<Vec<EnrollmentView>> {
    Json(
        state
            .registry
            .sorted_entries()
            .iter()
            .map(|e| EnrollmentView::shared(e.as_ref(), state.cluster.as_ref()))
            .collect(),
    )
}

/// One enrollment.
#[utoipa::path(
    get, path = "/enrollments/{id}", tag = "enrollments",
    params(("id" = String, Path, description = "Enrollment id")),
    responses(
        (status = 200, body = EnrollmentView),
        (status = 401, description = "Missing or wrong API token", body = ErrorBody),
        (status = 404, description = "Unknown id", body = ErrorBody),
    )
)]
pub async fn show(
    State(state): State<AppState>,
    Path(raw): Path<String>,
) -> Result<Json<EnrollmentView>, ApiError> {
    let id = parse_id(&raw)?;
    let entry = state.registry.get(id).ok_or_else(|| no_enrollment(&raw))?;
    Ok(Json(EnrollmentView::shared(
        entry.as_ref(),
        state.cluster.as_ref(),
    )))
}

async fn set_paused(
    state: AppState,
    raw: String,
    paused: bool,
) -> Result<Json<EnrollmentView>, ApiError> {
    if state.supervisor.is_shutting_down() {
        return Err(ApiError::ShuttingDown);
    }
    let id = parse_id(&raw)?;
    let entry = state
        .registry
        .set_paused(id, paused)
        .await?
        .ok_or_else(|| no_enrollment(&raw))?;
    Ok(Json(EnrollmentView::shared(
        entry.as_ref(),
        state.cluster.as_ref(),
    )))
}

/// Pause: in-flight POSTs finish, the link is detached (`closed=false`) and messages wait in
/// the broker. Survives restarts.
#[utoipa::path(
    post, path = "/enrollments/{id}/pause", tag = "enrollments",
    params(("id" = String, Path, description = "Enrollment id")),
    responses(
        (status = 200, body = EnrollmentView),
        (status = 401, description = "Missing or wrong API token", body = ErrorBody),
        (status = 404, description = "Unknown id", body = ErrorBody),
        (status = 503, description = "Store write failed, or shutting down", body = ErrorBody),
    )
)]
pub async fn pause(
    State(state): State<AppState>,
    Path(raw): Path<String>,
) -> Result<Json<EnrollmentView>, ApiError> {
    set_paused(state, raw, true).await
}

/// Resume a paused enrollment: the link is attached again.
#[utoipa::path(
    post, path = "/enrollments/{id}/resume", tag = "enrollments",
    params(("id" = String, Path, description = "Enrollment id")),
    responses(
        (status = 200, body = EnrollmentView),
        (status = 401, description = "Missing or wrong API token", body = ErrorBody),
        (status = 404, description = "Unknown id", body = ErrorBody),
        (status = 503, description = "Store write failed, or shutting down", body = ErrorBody),
    )
)]
pub async fn resume(
    State(state): State<AppState>,
    Path(raw): Path<String>,
) -> Result<Json<EnrollmentView>, ApiError> {
    set_paused(state, raw, false).await
}
