//! `GET /replicas`: the live replicas on the shared database and how many enrollments each
//! runs.

use axum::Json;
use axum::extract::State;
use serde::Serialize;

use crate::api::error::{ApiError, ErrorBody};
use crate::api::state::AppState;
use crate::store::postgres_cluster::ReplicaRow;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Replicas {
    /// The replica that answered; `null` for a daemon alone on SQLite (no `DATABASE_URL`).
    this_replica: Option<String>,
    /// Every live replica (heartbeat younger than `LEASE_TTL_MS`), by id; empty when alone.
    replicas: Vec<ReplicaRow>,
}

/// The live replicas and how many enrollments each runs.
#[utoipa::path(
    get, path = "/replicas", tag = "operations",
    responses(
        (status = 200, body = Replicas),
        (status = 401, description = "Missing or wrong API token", body = ErrorBody),
        (status = 503, description = "The database cannot be read", body = ErrorBody),
    )
)]
pub async fn list(State(state): State<AppState>) -> Result<Json<Replicas>, ApiError> {
    let Some(cluster) = &state.cluster else {
        return Ok(Json(Replicas {
            this_replica: None,
            replicas: Vec::new(),
        }));
    };
    let replicas = cluster.replicas().await?;
    Ok(Json(Replicas {
        this_replica: Some(cluster.id().to_string()),
        replicas,
    }))
}
