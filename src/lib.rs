//! hot-potato: pushes messages from an AMQP 1.0 broker to HTTP services.
//!
//! # Layout
//! Rooms, each owning one part of the job; doors open one way only (a room imports only the
//! rooms listed after its arrow, and `tests/architecture.rs` holds that):
//! - [`enrollment`] → (nothing): the vocabulary: record, settings, policy, outcomes, target
//!   rules, live status.
//! - [`shutdown`] → (nothing): the stop signals of one worker.
//! - [`backoff`] → (nothing): capped exponential backoff with jitter.
//! - [`seal`] → (nothing): sealing secret strings at rest (keys, XChaCha20-Poly1305).
//! - [`config`] → enrollment, seal: the typed configuration, read once from the environment.
//! - [`store`] → enrollment, seal: the enrollment store trait, its SQLite and PostgreSQL
//!   implementations, and the wrapper that seals an enrollment's secrets for any store.
//! - [`telemetry`] → enrollment: metrics, and the events that update status, metric and log.
//! - [`amqp`] → enrollment: connections, the receiver link, dispositions, the failure outcome,
//!   the publisher and the reply link.
//! - [`delivery`] → enrollment, telemetry, shutdown: message → POST, the POST, the verdict,
//!   breaker, signing, one message's attempts.
//! - [`pipeline`] → amqp, delivery, enrollment, telemetry, shutdown, backoff: the worker:
//!   receive → deliver → reply → settle; the one table outcome → disposition.
//! - [`fleet`] → pipeline, store, enrollment, telemetry, shutdown, backoff: the enrollment map
//!   and its writes; the supervisor of worker tasks.
//! - [`cluster`] → fleet, store, enrollment, backoff: replicas on one PostgreSQL database:
//!   heartbeat, leases, fencing, the even spread, LISTEN/NOTIFY, the shared view.
//! - [`relay`] → amqp, delivery, enrollment, telemetry, backoff: HTTP → queue (publish) and
//!   HTTP → queue → HTTP (request): the reply link and the correlation of replies.
//! - [`api`] → cluster, fleet, store, enrollment, telemetry, relay: the HTTP API, its views,
//!   security, errors.
//! - [`demo_receiver`] → (nothing): a small HTTP receiver for walkthroughs.
//!
//! This file wires the rooms together in [`run`]; `main.rs` only reads the configuration,
//! sets up logging and binds the port.

pub mod amqp;
pub mod api;
pub mod backoff;
pub mod cluster;
pub mod config;
pub mod delivery;
pub mod demo_receiver;
pub mod enrollment;
pub mod fleet;
pub mod pipeline;
pub mod relay;
pub mod seal;
pub mod shutdown;
pub mod store;
pub mod telemetry;

use std::future::Future;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::amqp::connection::{BrokerSettings, ConnectionPool, Dialer};
use crate::amqp::publish::Publisher;
use crate::backoff::BackoffSettings;
use crate::cluster::{Cluster, ClusterSettings};
use crate::config::Config;
use crate::delivery::clients::{TargetHttp, USER_AGENT, proxy_in_environment};
use crate::delivery::plain_http::PlainHttp;
use crate::delivery::resolver::GuardedResolver;
use crate::fleet::registry::Registry;
use crate::fleet::supervisor::Supervisor;
use crate::pipeline::link::AmqpOpener;
use crate::pipeline::reply::Replier;
use crate::pipeline::settle::SettleBatching;
use crate::pipeline::worker::WorkerContext;
use crate::relay::Relay;
use crate::store::{EnrollmentStore, PostgresStore, SealedStore, SqliteStore, StoreError};
use crate::telemetry::metrics::Metrics;

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
    // Rows still in clear or sealed with SECRETS_KEY_PREVIOUS are sealed again here.
    let (store, postgres): (std::sync::Arc<dyn EnrollmentStore>, _) = match &config.replicas {
        None => {
            let store = SqliteStore::open(&config.sqlite_path).await?;
            let sealed = SealedStore::start(store, config.secrets.clone()).await?;
            (std::sync::Arc::new(sealed), None)
        }
        Some(replicas) => {
            let store = PostgresStore::connect(&replicas.database_url).await?;
            let sealed = SealedStore::start(store.clone(), config.secrets.clone()).await?;
            (std::sync::Arc::new(sealed), Some((store, replicas)))
        }
    };
    tracing::info!(store = %store.describe(), "enrollment store ready");

    let token = CancellationToken::new();
    let general = reqwest::Client::builder()
        .user_agent(USER_AGENT)
        .tcp_nodelay(true)
        // A redirect would turn the POST into a GET without the body and could still end in a
        // 2xx; a 3xx is an answer like any other non-2xx.
        .redirect(reqwest::redirect::Policy::none())
        // Every address a target's name resolves to is checked against the target rules.
        .dns_resolver(std::sync::Arc::new(GuardedResolver::new(
            config.target_policy.clone(),
        )))
        .build()?;
    let plain = (config.target_direct_http1 && !proxy_in_environment()).then(|| {
        std::sync::Arc::new(PlainHttp::new(
            config.target_policy.clone(),
            reqwest::header::HeaderValue::from_static(USER_AGENT),
        ))
    });
    let http = TargetHttp {
        general,
        plain: plain.clone(),
    };
    let metrics = Metrics::new(config.metrics_per_enrollment);
    let broker = std::sync::Arc::new(BrokerSettings {
        url: config.amqp_url.clone(),
        connect_timeout: config.amqp_connect_timeout,
        pool: (config.amqp_connection_pool > 0).then(|| {
            ConnectionPool::new(config.amqp_connection_pool, config.amqp_links_per_session)
        }),
        dialer: Dialer::Tcp,
        max_message_size: config.amqp_max_message_bytes,
    });
    let publisher =
        std::sync::Arc::new(Publisher::new(broker.clone(), config.amqp_connect_timeout));
    let relay = std::sync::Arc::new(Relay::new(
        publisher.clone(),
        metrics.clone(),
        config.relay.publish_addresses.clone(),
        config.relay.publish_max_bytes,
        token.clone(),
    ));
    let reconnect = BackoffSettings {
        min: config.reconnect_min,
        max: config.reconnect_max,
    };
    let replies = tokio::spawn(relay::replies::run(
        relay.clone(),
        broker.clone(),
        config.relay.reply_address.clone(),
        reconnect,
    ));
    let ctx = WorkerContext {
        opener: std::sync::Arc::new(AmqpOpener {
            broker: broker.clone(),
            failure_policy: config.failure_outcome,
        }),
        http,
        default_prefetch: config.default_prefetch,
        settle_batching: SettleBatching {
            max: config.settle_batch_max,
            delay: config.settle_batch_delay,
        },
        reconnect,
        metrics: metrics.clone(),
        replier: Some(Replier {
            publisher: publisher.clone(),
            metrics: metrics.clone(),
        }),
    };
    let supervisor = Supervisor::new(ctx, token.clone());
    let (defaults, targets) = (
        config.delivery_defaults.clone(),
        config.target_policy.clone(),
    );
    let (registry, cluster) = match postgres {
        None => (
            Registry::load(store, supervisor.clone(), defaults, targets).await?,
            None,
        ),
        Some((pg, replicas)) => {
            let registry =
                Registry::load_shared(store, supervisor.clone(), defaults, targets).await?;
            let settings = ClusterSettings {
                lease_ttl: replicas.lease_ttl,
                snapshot_interval: replicas.snapshot_interval,
                close_attempt: config.amqp_connect_timeout + amqp::link::END_BOUND,
            };
            let cluster = Cluster::start(
                pg,
                registry.clone(),
                settings,
                &replicas.name,
                token.clone(),
            )
            .await?;
            (registry, Some(cluster))
        }
    };

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
    let guard = &config.api_guard;
    let app = api::router(api::AppState {
        registry,
        supervisor: supervisor.clone(),
        metrics,
        security: std::sync::Arc::new(
            api::ApiSecurity::new(
                config.api_token.clone(),
                config.metrics_require_token,
                config.cors_origins.clone(),
                config.api_rate_limit_per_min,
            )
            .with_trusted_proxies(guard.trusted_proxies.clone()),
        ),
        ready_probe: std::sync::Arc::new(api::probe::ReadyProbe::new(guard.ready_probe_interval)),
        cluster: cluster.clone(),
        relay,
    });
    let limits = api::serve::ServeLimits {
        header_timeout: guard.header_timeout,
        request_timeout: guard.request_timeout,
        max_connections: guard.max_connections,
        shutdown_grace: config.shutdown_grace,
    };
    // Started here, past every early return, so it always ends with the token.
    let idle_reaper = plain.map(|plain| tokio::spawn(plain.reap_idle(token.child_token())));
    let served = api::serve::serve(listener, app, limits, token.clone()).await;
    // Whatever ended the server, the workers are stopped the same way.
    token.cancel();
    supervisor.shutdown(config.shutdown_grace).await;
    // Leases were renewed while the workers drained; now they are handed back at once.
    if let Some(cluster) = &cluster {
        cluster.leave().await;
    }
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), replies).await;
    if let Some(reaper) = idle_reaper
        && let Err(e) = reaper.await
    {
        tracing::error!(error = %e, "the idle HTTP connection reaper failed");
    }
    publisher.close().await;
    broker.close_pool().await;
    watcher.abort();
    served?;
    tracing::info!("stopped");
    Ok(())
}
