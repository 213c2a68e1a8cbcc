//! What every handler can reach.

use std::sync::Arc;

use crate::api::probe::ReadyProbe;
use crate::api::security::ApiSecurity;
use crate::cluster::Cluster;
use crate::fleet::registry::Registry;
use crate::fleet::supervisor::Supervisor;
use crate::relay::Relay;
use crate::telemetry::metrics::Metrics;

#[derive(Clone)]
pub struct AppState {
    pub registry: Registry,
    pub supervisor: Supervisor,
    pub metrics: Metrics,
    pub security: Arc<ApiSecurity>,
    /// The cached store probe behind `/ready`.
    pub ready_probe: Arc<ReadyProbe>,
    /// This replica's part in the cluster; `None` for a daemon alone on SQLite.
    pub cluster: Option<Cluster>,
    /// `POST /publish` and `POST /request`.
    pub relay: Arc<Relay>,
}
