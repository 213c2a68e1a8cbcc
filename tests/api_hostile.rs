//! The API under hostile clients, over real TCP against the in-process daemon: slowloris
//! connections are closed at the header timeout, the connection cap makes a further client
//! wait for a slot, a trickled body gets the request timeout, `/ready` hides details without
//! the token and does not probe the store per call, and `X-Forwarded-For` counts only from
//! `TRUSTED_PROXIES`.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TOKEN: &str = "hostile-test-token-0123";

fn port_of(daemon: &Daemon) -> u16 {
    daemon.api.port()
}

/// Reads until the server closes the connection (EOF or reset); what it sent, or `None` if
/// it is still open after `limit`.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(seen),
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

/// One request on its own connection (`Connection: close`); the raw answer.
async fn raw_request(port: u16, request: &str, limit: Duration) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    stream.write_all(request.as_bytes()).await.ok()?;
    let answer = read_until_closed(&mut stream, limit).await?;
    Some(String::from_utf8_lossy(&answer).into_owned())
}

fn get_close(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
}

/// Waits until `/health` answers, on a connection that is closed afterwards (a pooled client
/// would keep a connection, and with it a slot, open).
async fn wait_serving(port: u16) {
    wait_for("the API serves", Duration::from_secs(20), || async {
        raw_request(port, &get_close("/health"), Duration::from_secs(2))
            .await
            .filter(|a| a.starts_with("HTTP/1.1 200"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_closed_at_the_header_timeout() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let (_dir, db) = temp_db();
    let daemon = Daemon::start_with(&db, &[("API_HEADER_TIMEOUT_MS", "500")]).await;
    let port = port_of(&daemon);
    wait_serving(port).await;

    let mut slow = Vec::new();
    for _ in 0..4 {
        slow.push(tokio::spawn(async move {
            let started = Instant::now();
            let mut stream = TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect");
            stream
                .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .await
                .expect("write");
            let mut buf = [0u8; 1024];
            // Dribble a byte every 100 ms, never finishing the head, for at most 3 s.
            while started.elapsed() < Duration::from_secs(3) {
                tokio::select! {
                    read = stream.read(&mut buf) => match read {
                        Ok(0) | Err(_) => return Some(started.elapsed()),
                        Ok(_) => {}
                    },
                    () = tokio::time::sleep(Duration::from_millis(100)) => {
                        if stream.write_all(b"a").await.is_err() {
                            return Some(started.elapsed());
                        }
                    }
                }
            }
            None
        }));
    }
    // While they dribble, a normal client is served.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let answer = raw_request(port, &get_close("/health"), Duration::from_secs(2))
        .await
        .expect("a normal client is answered");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    for task in slow {
        let closed_after = task
            .await
            .expect("task")
            .expect("the server closes a slowloris connection within 3 s");
        assert!(
            closed_after >= Duration::from_millis(400),
            "closed at the timeout, not at once: {closed_after:?}"
        );
    }
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_past_the_connection_cap_waits_for_a_slot() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let (_dir, db) = temp_db();
    let daemon = Daemon::start_with(
        &db,
        &[
            ("API_MAX_CONNECTIONS", "3"),
            ("API_HEADER_TIMEOUT_MS", "1500"),
        ],
    )
    .await;
    let port = port_of(&daemon);
    wait_serving(port).await;
    // wait_serving's connections are closed by now, but give the server a moment to see it.
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Three connections that never send a request hold the three slots until the header
    // timeout closes them.
    let held_since = Instant::now();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect"),
        );
    }
    tokio::time::sleep(Duration::from_millis(100)).await;

    // The kernel completes the 4th connect (listen backlog), but the daemon does not take it
    // until a slot frees.
    let answer = raw_request(port, &get_close("/health"), Duration::from_secs(5))
        .await
        .expect("the 4th client is answered once a slot frees");
    let waited = held_since.elapsed();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        waited >= Duration::from_millis(1200),
        "the 4th client was served while the 3 slots were held: after {waited:?}"
    );
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    for mut stream in held {
        assert!(
            read_until_closed(&mut stream, Duration::from_secs(3))
                .await
                .is_some(),
            "an idle connection is closed at the header timeout"
        );
    }
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_body_gets_the_request_timeout_and_enrolls_nothing() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let (_dir, db) = temp_db();
    let daemon = Daemon::start_with(&db, &[("API_REQUEST_TIMEOUT_MS", "300")]).await;
    let port = port_of(&daemon);
    wait_serving(port).await;

    let started = Instant::now();
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    stream
        .write_all(
            b"POST /enroll HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\nConnection: close\r\n\r\n{\"queue\": ",
        )
        .await
        .expect("write");
    let answer = read_until_closed(&mut stream, Duration::from_secs(3))
        .await
        .expect("answered or closed within 3 s");
    let took = started.elapsed();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or("");
    let json: Value = serde_json::from_str(body).expect("a JSON error body");
    assert!(json["error"].is_string(), "{json}");
    assert!(took >= Duration::from_millis(250), "{took:?}");

    let list = raw_request(port, &get_close("/enrollments"), Duration::from_secs(2))
        .await
        .expect("list");
    assert!(list.ends_with("[]"), "nothing enrolled: {list}");
    daemon.stop().await;
}

async fn ready(daemon: &Daemon, token: Option<&str>) -> (u16, Value, Duration) {
    let started = Instant::now();
    let mut req = daemon.api.http.get(format!("{}/ready", daemon.base));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let res = req.send().await.expect("reachable");
    let status = res.status().as_u16();
    let body = res.json().await.expect("json");
    (status, body, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_hides_details_without_the_token_and_probes_at_most_once_per_interval() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let (_dir, db) = temp_db();
    let daemon = Daemon::start_with(
        &db,
        &[("API_TOKEN", TOKEN), ("READY_PROBE_INTERVAL_MS", "2000")],
    )
    .await;
    daemon.api.wait_healthy().await;

    // This call probes the store (nothing is cached yet).
    let (status, body, _) = ready(&daemon, None).await;
    let probed_at = Instant::now();
    assert_eq!(status, 200, "{body}");
    let mut keys: Vec<&str> = body
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "not_active_count",
            "ready",
            "reasons_count",
            "store_writable"
        ]
    );
    let (_, body, _) = ready(&daemon, Some("wrong-token-wrong-token")).await;
    assert!(body.get("reasons").is_none(), "{body}");
    let (status, body, _) = ready(&daemon, Some(TOKEN)).await;
    assert_eq!(status, 200);
    assert_eq!(body["reasons"], serde_json::json!([]), "{body}");
    assert_eq!(body["not_active"], serde_json::json!([]), "{body}");
    assert_eq!(body["reasons_count"], 0);

    // With SQLite's write lock held, a probe would fail; within the interval every call
    // answers from the cached probe, quickly.
    let locker = rusqlite::Connection::open(&db).expect("open");
    locker.execute_batch("BEGIN EXCLUSIVE").expect("lock");
    let mut calls = 0;
    while probed_at.elapsed() < Duration::from_millis(1500) {
        let (status, body, took) = ready(&daemon, None).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["store_writable"], true);
        assert!(took < Duration::from_millis(500), "{took:?}");
        calls += 1;
    }
    assert!(calls >= 10, "only {calls} calls");

    // After the interval the next call probes again and sees the lock.
    tokio::time::sleep(Duration::from_millis(2000).saturating_sub(probed_at.elapsed())).await;
    let (status, body, _) = ready(&daemon, None).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["store_writable"], false);
    assert_eq!(body["reasons_count"], 1);
    assert!(body.get("reasons").is_none(), "{body}");
    locker.execute_batch("ROLLBACK").expect("unlock");
    daemon.stop().await;
}

/// DELETE on a missing enrollment: a change the limit counts, that changes nothing.
async fn delete_as(daemon: &Daemon, forwarded_for: &str) -> u16 {
    daemon
        .api
        .http
        .delete(format!("{}/enroll/{}", daemon.base, uuid::Uuid::new_v4()))
        .header("x-forwarded-for", forwarded_for)
        .send()
        .await
        .expect("reachable")
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_counts_only_from_trusted_proxies() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let (_dir, db) = temp_db();
    let trusting = Daemon::start_with(
        &db,
        &[
            ("API_RATE_LIMIT_PER_MIN", "2"),
            ("TRUSTED_PROXIES", "127.0.0.1/32"),
        ],
    )
    .await;
    trusting.api.wait_healthy().await;
    assert_eq!(delete_as(&trusting, "198.51.100.1").await, 404);
    assert_eq!(delete_as(&trusting, "198.51.100.1").await, 404);
    assert_eq!(delete_as(&trusting, "198.51.100.1").await, 429);
    // Another client behind the same proxy has its own budget; a forged leftmost entry does
    // not move the key off the address the proxy saw.
    assert_eq!(
        delete_as(&trusting, "198.51.100.1, 198.51.100.2").await,
        404
    );
    assert_eq!(delete_as(&trusting, "198.51.100.2").await, 404);
    assert_eq!(delete_as(&trusting, "198.51.100.2").await, 429);
    trusting.stop().await;

    let (_dir, db) = temp_db();
    let untrusting = Daemon::start_with(&db, &[("API_RATE_LIMIT_PER_MIN", "2")]).await;
    untrusting.api.wait_healthy().await;
    assert_eq!(delete_as(&untrusting, "198.51.100.1").await, 404);
    assert_eq!(delete_as(&untrusting, "198.51.100.2").await, 404);
    assert_eq!(
        delete_as(&untrusting, "198.51.100.3").await,
        429,
        "the header is ignored from an untrusted peer: one shared budget"
    );
    untrusting.stop().await;
}
