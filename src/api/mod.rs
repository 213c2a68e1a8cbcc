//! The HTTP API: the router (enrollment routes, operations routes, the dashboard and docs
//! pages) and its OpenAPI document generated from the handlers' annotations.
//!
//! - [`enrollments`]: enroll, list, show, pause, resume, delete.
//! - [`publish`]: `POST /publish` and `POST /request`.
//! - [`ops`]: health, readiness, stats, metrics, OpenAPI, the pages.
//! - [`views`]: the JSON shapes of enrollments and their stats.
//! - [`security`]: the API token, CORS, the per-client change limit, the JSON depth bound.
//! - [`guard`]: the middleware that applies them to every request.
//! - [`forwarded`]: the client's address behind trusted proxies (`TRUSTED_PROXIES`).
//! - [`probe`]: the cached store probe behind `/ready`.
//! - [`replicas`]: the live replicas (`GET /replicas`).
//! - [`serve`]: the accept loop: header and request timeouts, the connection cap.
//! - [`error`]: the one error type and its status mapping.
//! - [`state`]: what handlers reach.

pub mod enrollments;
pub mod error;
pub mod forwarded;
pub mod guard;
pub mod ops;
pub mod probe;
pub mod publish;
pub mod replicas;
pub mod security;
pub mod serve;
pub mod state;
pub mod views;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::api::error::{ApiError, ErrorBody, MAX_BODY_BYTES};
use crate::api::security::BearerScheme;

pub use security::ApiSecurity;
pub use state::AppState;

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
        .routes(routes!(publish::publish))
        .routes(routes!(publish::request))
        .routes(routes!(ops::health))
        .routes(routes!(ops::ready))
        .routes(routes!(ops::stats))
        .routes(routes!(replicas::list))
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
            guard::guard,
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
