//! The middleware in front of every route: the API token and the per-client change limit.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::api::error::ApiError;
use crate::api::state::AppState;

/// The middleware in front of every route.
pub async fn guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let security = &state.security;
    if security.needs_token(request.uri().path()) && !security.token_ok(&request) {
        return ApiError::Unauthorized.into_response();
    }
    if matches!(*request.method(), Method::POST | Method::DELETE) {
        let client = request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(IpAddr::V4(Ipv4Addr::LOCALHOST), |c| c.0.ip());
        let client = security.client_ip(client, request.headers());
        if !security.within_rate(client) {
            return ApiError::TooManyRequests.into_response();
        }
    }
    next.run(request).await
}
