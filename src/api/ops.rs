//! Operations routes: liveness, readiness, per-enrollment stats, Prometheus metrics, the
//! OpenAPI document, and the embedded dashboard and docs pages.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use serde::Serialize;

use crate::api::error::ErrorBody;
use crate::api::state::AppState;
use crate::api::views::EnrollmentStats;
use crate::enrollment::status::WorkerState;
use crate::fleet::closer::PendingClose;

const DASHBOARD_HTML: &str = include_str!("../dashboard/index.html");
const DOCS_HTML: &str = include_str!("../dashboard/docs.html");

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Health {
    /// `ok`, or `stopping` during shutdown.
    status: &'static str,
    enrollments: usize,
    version: &'static str,
}

/// Liveness: the process serves. Never needs the token.
#[utoipa::path(get, path = "/health", tag = "operations", security(()), responses((status = 200, body = Health)))]
pub async fn health(State(state): State<AppState>) -> Json<Health> {
    Json(Health {
        status: if state.supervisor.is_shutting_down() {
            "stopping"
        } else {
            "ok"
        },
        enrollments: state.registry.len(),
        version: env!("CARGO_PKG_VERSION"),
    })
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Readiness {
    ready: bool,
    store_writable: bool,
    /// How many enrollments are not active.
    not_active_count: usize,
    /// How many reasons there are for not being ready.
    reasons_count: usize,
    /// Why the daemon is not ready (empty when it is). Only with the token, or when no
    /// API_TOKEN is configured: it carries ids and error texts.
    #[serde(skip_serializing_if = "Option::is_none")]
    reasons: Option<Vec<String>>,
    /// Enrollments that are not active, with the reason each shows. Only with the token, or
    /// when no API_TOKEN is configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    not_active: Option<Vec<NotActive>>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct NotActive {
    id: String,
    state: WorkerState,
    reason: Option<String>,
}

/// Readiness: the store takes writes, and every enrollment's worker is active, paused, or
/// shows why it is not (a worker still connecting without an error yet is not ready). Never
/// needs the token; without it (when API_TOKEN is set) the answer has counts only, no ids or
/// error texts. The store is probed at most every READY_PROBE_INTERVAL_MS; calls between
/// answer from the last probe.
#[utoipa::path(
    get, path = "/ready", tag = "operations", security((), ("api_token" = [])),
    responses((status = 200, body = Readiness), (status = 503, body = Readiness))
)]
pub async fn ready(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let mut reasons = Vec::new();
    let store_writable = match state
        .ready_probe
        .store_writable(state.registry.store())
        .await
    {
        Ok(()) => true,
        Err(e) => {
            reasons.push(format!("store not writable: {e}"));
            false
        }
    };
    if state.supervisor.is_shutting_down() {
        reasons.push("shutting down".into());
    }
    let mut not_active = Vec::new();
    for live in state.registry.sorted_entries() {
        // As one replica of many, this replica answers for the enrollments it runs.
        if !state.registry.runs_here(live.enrollment.id) {
            continue;
        }
        let status = live.status.snapshot();
        if matches!(status.state, WorkerState::Active | WorkerState::Paused) {
            continue;
        }
        let id = live.enrollment.id;
        if status.last_error.is_none() {
            reasons.push(format!(
                "enrollment {id} is {:?} with no reason yet",
                status.state
            ));
        }
        not_active.push(NotActive {
            id: id.to_string(),
            state: status.state,
            reason: status.last_error,
        });
    }
    let details = state.security.headers_token_ok(&headers);
    let body = Readiness {
        ready: reasons.is_empty(),
        store_writable,
        not_active_count: not_active.len(),
        reasons_count: reasons.len(),
        reasons: details.then_some(reasons),
        not_active: details.then_some(not_active),
    };
    let status = if body.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Stats {
    enrollments: Vec<EnrollmentStats>,
    totals: Totals,
    /// Deleted enrollments whose durable subscription could not be closed yet (retried). As one
    /// replica of many: every replica's, from the store, including deletes whose owner has not
    /// closed the link yet.
    pending_closes: Vec<PendingClose>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Totals {
    enrollments: usize,
    delivered: u64,
    failed: u64,
}

/// Per-enrollment counters, states and the delivery rate over the last minute.
#[utoipa::path(
    get, path = "/stats", tag = "operations",
    responses((status = 200, body = Stats), (status = 401, description = "Missing or wrong API token", body = ErrorBody))
)]
pub async fn stats(State(state): State<AppState>) -> Json<Stats> {
    let enrollments: Vec<EnrollmentStats> = state
        .registry
        .sorted_entries()
        .iter()
        .map(|e| EnrollmentStats::shared(e.as_ref(), state.cluster.as_ref()))
        .collect();
    let totals = Totals {
        enrollments: enrollments.len(),
        delivered: enrollments.iter().map(|e| e.delivered).sum(),
        failed: enrollments.iter().map(|e| e.failed).sum(),
    };
    // As one replica of many, the store keeps every replica's pending closes.
    let pending_closes = match &state.cluster {
        None => state.supervisor.pending_closes(),
        Some(cluster) => cluster.pending_closes().await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the pending closes");
            Vec::new()
        }),
    };
    Json(Stats {
        enrollments,
        totals,
        pending_closes,
    })
}

/// Prometheus text exposition. Needs the token only with `METRICS_REQUIRE_TOKEN=true`.
#[utoipa::path(
    get, path = "/metrics", tag = "operations", security((), ("api_token" = [])),
    responses((status = 200, description = "OpenMetrics text format", content_type = "application/openmetrics-text", body = String))
)]
pub async fn metrics(State(state): State<AppState>) -> Response {
    let states: Vec<_> = state
        .registry
        .sorted_entries()
        .iter()
        // Per replica: the enrollments it runs.
        .filter(|e| state.registry.runs_here(e.enrollment.id))
        .map(|e| (e.status.state(), e.status.breaker()))
        .collect();
    let text = state.metrics.render(&states);
    (
        [(
            header::CONTENT_TYPE,
            // prometheus-client writes the OpenMetrics text format.
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// This document.
#[utoipa::path(
    get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "OpenAPI 3 document", body = Object))
)]
pub async fn openapi_json() -> Response {
    Json(super::openapi()).into_response()
}

/// The dashboard page. Static: it holds no data and asks for the token itself.
#[utoipa::path(
    get, path = "/", tag = "pages", security(()),
    responses((status = 200, description = "HTML page", content_type = "text/html", body = String))
)]
pub async fn dashboard() -> Html<&'static str> {
    Html(DASHBOARD_HTML)
}

/// The API docs page, rendered from `/openapi.json`.
#[utoipa::path(
    get, path = "/docs", tag = "pages", security(()),
    responses((status = 200, description = "HTML page", content_type = "text/html", body = String))
)]
pub async fn docs() -> Html<&'static str> {
    Html(DOCS_HTML)
}
