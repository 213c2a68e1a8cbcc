//! The API's accept loop, owned here rather than left to `axum::serve`, so hostile clients are
//! bounded: a header-read timeout (slowloris, and idle keep-alive connections), a request
//! timeout answered with the API's JSON error, and a cap on connections served at once.
//!
//! At the cap the loop stops accepting until a connection ends: further clients wait in the
//! kernel's listen backlog (and time out on their side) instead of being accepted and dropped,
//! so a burst is served late rather than refused, and the daemon's sockets stay bounded.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Request};
use axum::middleware::Next;
use axum::response::IntoResponse;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::error::ApiError;

/// How the accept loop bounds its clients.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    pub header_timeout: Duration,
    pub request_timeout: Duration,
    pub max_connections: usize,
    /// How long requests in flight may finish after `shutdown` fires.
    pub shutdown_grace: Duration,
}

/// Serves `app` on `listener` until `shutdown` fires, then stops accepting, lets requests in
/// flight finish within the grace, and returns.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ServeLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let timeout = limits.request_timeout;
    let app = app.layer(axum::middleware::from_fn(
        move |request: Request, next: Next| async move {
            // The body is read inside the handler, so a client trickling it is bounded too.
            // A `POST /request` may wait its `timeout_ms` for the reply on top.
            let limit = timeout + crate::api::publish::extra_time(request.uri());
            match tokio::time::timeout(limit, next.run(request)).await {
                Ok(response) => response,
                Err(_) => ApiError::RequestTimeout.into_response(),
            }
        },
    ));
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let connections = TaskTracker::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    loop {
        let slot = tokio::select! {
            () = shutdown.cancelled() => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!(error = %e, "accepting an API connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, %peer, "cannot set TCP_NODELAY");
        }
        let service = TowerToHyperService::new(connection_app(&app, peer));
        let connection = http.serve_connection(TokioIo::new(stream), service);
        let stop = shutdown.clone();
        connections.spawn(async move {
            let _slot = slot;
            let mut connection = std::pin::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, %peer, "API connection ended with an error");
            }
        });
    }
    drop(listener);
    connections.close();
    if tokio::time::timeout(limits.shutdown_grace, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = connections.len(),
            "API connections still open after the shutdown grace; leaving them"
        );
    }
    Ok(())
}

/// The router as `axum::serve` hands it to a connection: with the peer's address as
/// `ConnectInfo`, which the change limit reads.
fn connection_app(app: &Router, peer: SocketAddr) -> Router {
    app.clone().layer(axum::Extension(ConnectInfo(peer)))
}
