//! The HTTP target of the worker's unit tests: a real server on loopback that answers by the
//! message body and counts the POSTs it is running.

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;

/// Answers by body: `ok` 200, `reject` 422, `drop` 404, `fail` 400, `slow` 200 after 300 ms;
/// a non-zero `forced` status overrides them all.
#[derive(Clone, Default)]
pub(crate) struct Target {
    pub forced: Arc<AtomicU16>,
    pub posts: Arc<AtomicUsize>,
    pub running: Arc<AtomicUsize>,
    pub most_running: Arc<AtomicUsize>,
}

async fn answer(State(t): State<Target>, body: Bytes) -> StatusCode {
    t.posts.fetch_add(1, Ordering::SeqCst);
    let now = t.running.fetch_add(1, Ordering::SeqCst) + 1;
    t.most_running.fetch_max(now, Ordering::SeqCst);
    let forced = t.forced.load(Ordering::SeqCst);
    let status = if forced != 0 {
        forced
    } else {
        match &body[..] {
            b"reject" => 422,
            b"drop" => 404,
            b"fail" => 400,
            b"slow" => {
                tokio::time::sleep(Duration::from_millis(300)).await;
                200
            }
            _ => 200,
        }
    };
    t.running.fetch_sub(1, Ordering::SeqCst);
    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// Serves the target on a loopback port for the rest of the test; returns its URL.
pub(crate) async fn serve(target: Target) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(answer))
        .with_state(target);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}/hook")
}
