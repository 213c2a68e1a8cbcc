//! hot-potato: pushes messages from an AMQP 1.0 broker to HTTP services.
//!
//! # Layout
//! - [`config`]: the typed configuration, read once from the environment and validated.
//! - [`enrollment`]: what an enrollment is and what makes a creation request valid.
//! - [`store`]: the SQLite mirror of the enrollment map and its migrations.
//! - [`registry`]: the in-memory enrollment map with live status; the only writer of store
//!   and supervisor.
//! - [`supervisor`]: owns one worker task per enrollment; restarts, stops, shuts down.
//! - [`worker`]: one enrollment's link owner: receive, run deliveries concurrently up to
//!   `max_in_flight`, settle, reconnect.
//! - [`broker`]: broker connections, dedicated per enrollment or pooled.
//! - [`amqp_link`]: the receiver link; failure outcome; settlement.
//! - [`delivery`]: message → HTTP request mapping, the POST, and one message's attempts.
//! - [`policy`]: per-enrollment delivery settings, defaults, status classes, the verdict.
//! - [`breaker`]: the per-enrollment circuit breaker.
//! - [`signing`]: static headers, credentials and Standard Webhooks signatures.
//! - [`allowlist`]: `TARGET_ALLOWLIST` and the guarded link-local/metadata ranges.
//! - [`backoff`]: capped exponential backoff with jitter.
//! - [`api`]: the HTTP API (enrollments, operations, pages, OpenAPI), its security and its
//!   error mapping.
//! - [`metrics`]: Prometheus metrics.
//! - [`demo_receiver`]: a small HTTP receiver for walkthroughs and local trials.

pub mod allowlist;
pub mod amqp_link;
pub mod api;
pub mod backoff;
pub mod breaker;
pub mod broker;
pub mod config;
pub mod delivery;
pub mod demo_receiver;
pub mod enrollment;
pub mod metrics;
pub mod policy;
pub mod registry;
pub mod signing;
pub mod store;
pub mod supervisor;
pub mod worker;

use std::future::Future;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::backoff::BackoffSettings;
use crate::broker::{BrokerSettings, ConnectionPool};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::store::{Store, StoreError};
use crate::supervisor::Supervisor;
use crate::worker::WorkerContext;

/// Failures that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot build the HTTP client: {0}")]
    HttpClient(#[from] reqwest::Error),
    #[error("the API server failed: {0}")]
    Serve(#[from] std::io::Error),
}

/// Runs the daemon until `shutdown` resolves: opens the store, starts a worker for every
/// stored enrollment, serves the API on `listener`, then stops in order (API changes refused,
/// workers drained within the grace period, links detached).
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let store = Store::open(&config.sqlite_path).await?;
    tracing::info!(path = %store.path().display(), "enrollment store ready");

    let http = reqwest::Client::builder()
        .user_agent(concat!("hot-potato/", env!("CARGO_PKG_VERSION")))
        .tcp_nodelay(true)
        // A redirect would turn the POST into a GET without the body and could still end in a
        // 2xx; a 3xx is an answer like any other non-2xx.
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let metrics = Metrics::new(config.metrics_per_enrollment);
    let broker = std::sync::Arc::new(BrokerSettings {
        url: config.amqp_url.clone(),
        connect_timeout: config.amqp_connect_timeout,
        pool: (config.amqp_connection_pool > 0)
            .then(|| ConnectionPool::new(config.amqp_connection_pool)),
    });
    let ctx = WorkerContext {
        broker: broker.clone(),
        http,
        failure_policy: config.failure_outcome,
        default_prefetch: config.default_prefetch,
        reconnect: BackoffSettings {
            min: config.reconnect_min,
            max: config.reconnect_max,
        },
        metrics: metrics.clone(),
    };
    let token = CancellationToken::new();
    let supervisor = Supervisor::new(ctx, token.clone());
    let registry = Registry::load(
        store,
        supervisor.clone(),
        config.delivery_defaults.clone(),
        config.target_allowlist.clone(),
    )
    .await?;

    // The caller's shutdown future only flips the token; everything else watches the token.
    let trigger = token.clone();
    let watcher = tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutdown requested");
        trigger.cancel();
    });

    tracing::info!(
        addr = %listener.local_addr()?,
        broker = %config.amqp_url_redacted(),
        "serving the API"
    );
    if config.api_token.is_none() {
        tracing::warn!(
            "API_TOKEN is not set: the API is open to anyone who can reach {}; keep HTTP_HOST on a loopback address",
            config.http_host
        );
    }
    let app = api::router(api::AppState {
        registry,
        supervisor: supervisor.clone(),
        metrics,
        security: std::sync::Arc::new(api::ApiSecurity::new(
            config.api_token.clone(),
            config.metrics_require_token,
            config.cors_origins.clone(),
            config.api_rate_limit_per_min,
        )),
    });
    let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(token.clone().cancelled_owned())
        .await;
    // Whatever ended the server, the workers are stopped the same way.
    token.cancel();
    supervisor.shutdown(config.shutdown_grace).await;
    broker.close_pool().await;
    watcher.abort();
    served?;
    tracing::info!("stopped");
    Ok(())
}
