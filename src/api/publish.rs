//! HTTP → queue routes: `POST /publish` (the body becomes one Data section, the broker's
//! outcome is the answer) and `POST /request` (the same with `reply-to`, answered with the
//! reply). Same API token and change limit as the other mutating routes; where they may
//! publish is bounded by `PUBLISH_ADDRESSES`, what by `PUBLISH_MAX_BYTES`.

use std::collections::HashMap;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::json;

use crate::api::error::{ApiError, ErrorBody};
use crate::api::state::AppState;
use crate::relay::{DEFAULT_REQUEST_TIMEOUT, MAX_REQUEST_TIMEOUT, RelayError};

type Params = Query<HashMap<String, String>>;

/// Publish the request body to an AMQP address.
#[utoipa::path(
    post, path = "/publish", tag = "relay",
    params(("address" = String, Query, description = "AMQP address, e.g. /amq/queue/orders")),
    request_body(content = Vec<u8>, description = "The message body, byte for byte; Content-Type becomes its content-type; amqp-message-id, amqp-correlation-id, amqp-subject, amqp-reply-to and amqp-app-NAME headers become its properties", content_type = "application/octet-stream"),
    responses(
        (status = 201, description = "The broker accepted the message: {\"address\", \"message_id\"}"),
        (status = 400, description = "A header that cannot be mapped", body = ErrorBody),
        (status = 401, description = "Missing or wrong API token", body = ErrorBody),
        (status = 403, description = "Address not allowed by PUBLISH_ADDRESSES", body = ErrorBody),
        (status = 413, description = "Body over PUBLISH_MAX_BYTES", body = ErrorBody),
        (status = 422, description = "Missing or empty address", body = ErrorBody),
        (status = 429, description = "Too many changes from this client", body = ErrorBody),
        (status = 502, description = "The broker rejected or released the message, or refused the address; its reason", body = ErrorBody),
        (status = 503, description = "The broker is unreachable, or shutting down", body = ErrorBody),
    )
)]
pub async fn publish(
    State(state): State<AppState>,
    params: Result<Params, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (address, body) = prepare(&state, params, body).await?;
    let message_id = state
        .relay
        .publish(&address, &headers, body)
        .await
        .map_err(relay_error)?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"address": address, "message_id": message_id})),
    )
        .into_response())
}

/// Publish the request body with `reply-to` and answer with the reply.
#[utoipa::path(
    post, path = "/request", tag = "relay",
    params(
        ("address" = String, Query, description = "AMQP address, e.g. /amq/queue/orders"),
        ("timeout_ms" = Option<u64>, Query, description = "How long to wait for the reply: default 30000, at most 300000"),
    ),
    request_body(content = Vec<u8>, description = "As for /publish; reply-to and message-id are set by the daemon", content_type = "application/octet-stream"),
    responses(
        (status = 200, description = "The reply: status from its http-status property (200 when absent), its content-type and body"),
        (status = 422, description = "Missing or empty address, timeout_ms out of range", body = ErrorBody),
        (status = 502, description = "The broker refused the message, or the reply's http-status is not a status", body = ErrorBody),
        (status = 503, description = "The broker or the reply link is unavailable, or shutting down", body = ErrorBody),
        (status = 504, description = "No reply within timeout_ms", body = ErrorBody),
    )
)]
pub async fn request(
    State(state): State<AppState>,
    params: Result<Params, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let timeout = match &params {
        Ok(Query(p)) => request_timeout(p.get("timeout_ms").map(String::as_str))?,
        Err(_) => DEFAULT_REQUEST_TIMEOUT,
    };
    let (address, body) = prepare(&state, params, body).await?;
    let reply = state
        .relay
        .request(&address, &headers, body, timeout)
        .await
        .map_err(relay_error)?;
    let status = reply
        .status
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    let mut response = (status, reply.body).into_response();
    if let Some(ct) = reply
        .content_type
        .and_then(|ct| HeaderValue::from_str(&ct).ok())
    {
        response.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    Ok(response)
}

/// The checks both routes share, in order: shutting down, the address, the body's size.
async fn prepare(
    state: &AppState,
    params: Result<Params, axum::extract::rejection::QueryRejection>,
    body: Body,
) -> Result<(String, Bytes), ApiError> {
    if state.supervisor.is_shutting_down() {
        return Err(ApiError::ShuttingDown);
    }
    let Query(params) = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let address = state
        .relay
        .check(params.get("address").map(String::as_str))
        .map_err(relay_error)?;
    let limit = state.relay.max_bytes();
    let body = axum::body::to_bytes(body, limit).await.map_err(|e| {
        if error_chain(&e).contains("length limit exceeded") {
            ApiError::BodyTooLarge(limit)
        } else {
            ApiError::BadRequest(format!("cannot read the request body: {e}"))
        }
    })?;
    Ok((address, body))
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// `timeout_ms`: absent → 30 s; from 1 to 300000.
fn request_timeout(value: Option<&str>) -> Result<Duration, ApiError> {
    let Some(value) = value else {
        return Ok(DEFAULT_REQUEST_TIMEOUT);
    };
    let max = MAX_REQUEST_TIMEOUT.as_millis();
    match value.trim().parse::<u64>() {
        Ok(ms) if ms >= 1 && u128::from(ms) <= max => Ok(Duration::from_millis(ms)),
        _ => Err(ApiError::Unprocessable(format!(
            "`timeout_ms` must be a number of milliseconds from 1 to {max}"
        ))),
    }
}

/// How much longer than `API_REQUEST_TIMEOUT_MS` a request may take: a `POST /request`
/// waits up to its `timeout_ms` for the reply on top of being read and published.
pub fn extra_time(uri: &Uri) -> Duration {
    if uri.path() != "/request" {
        return Duration::ZERO;
    }
    let value = uri.query().and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "timeout_ms")
            .map(|(_, v)| v.into_owned())
    });
    request_timeout(value.as_deref()).unwrap_or(Duration::ZERO)
}

fn relay_error(e: RelayError) -> ApiError {
    let status = match &e {
        RelayError::NoAddress => StatusCode::UNPROCESSABLE_ENTITY,
        RelayError::NotAllowed(_) => StatusCode::FORBIDDEN,
        RelayError::BadHeaders(_) => StatusCode::BAD_REQUEST,
        RelayError::Publish(p) if p.is_refusal() => StatusCode::BAD_GATEWAY,
        RelayError::Publish(p) if p.is_too_large() => StatusCode::PAYLOAD_TOO_LARGE,
        RelayError::Publish(_) | RelayError::NoReplyLink(_) | RelayError::Stopping => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        RelayError::TimedOut(_) => StatusCode::GATEWAY_TIMEOUT,
        RelayError::BadReply => StatusCode::BAD_GATEWAY,
    };
    ApiError::Relay {
        status,
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_timeouts_default_and_bound() {
        assert_eq!(request_timeout(None).ok(), Some(DEFAULT_REQUEST_TIMEOUT));
        assert_eq!(
            request_timeout(Some("250")).ok(),
            Some(Duration::from_millis(250))
        );
        assert!(request_timeout(Some("300000")).is_ok());
        for bad in ["0", "300001", "-1", "soon"] {
            assert!(request_timeout(Some(bad)).is_err(), "{bad}");
        }
        let uri: Uri = "/request?address=x&timeout_ms=120000".parse().expect("uri");
        assert_eq!(extra_time(&uri), Duration::from_secs(120));
        let uri: Uri = "/publish?timeout_ms=120000".parse().expect("uri");
        assert_eq!(extra_time(&uri), Duration::ZERO);
    }
}
