//! Hostile enrollments and hostile targets: address spellings that reach the cloud metadata
//! service, names that resolve to refused addresses when they are used, headers that would
//! reframe the request, and a target whose answer never ends.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const TEST_TIME_LIMIT: Duration = Duration::from_secs(120);

/// POST /enroll; the status and the answer.
async fn enroll_raw(api: &Api, body: &Value) -> (u16, Value) {
    let res = api
        .http
        .post(format!("{}/enroll", api.base))
        .json(body)
        .send()
        .await
        .expect("API reachable");
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

/// A TCP listener that counts the connections made to it and answers each request with 200
/// and an empty body.
async fn counting_listener() -> (u16, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let count = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&count);
    let task = tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = socket.read(&mut buf).await;
                let _ = socket
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    .await;
            });
        }
    });
    (port, count, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spelling_of_a_guarded_address_is_refused_at_enroll() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let (_dir, db) = temp_db();
    let daemon = Daemon::start_with(&db, &[("TARGET_DENY_PRIVATE", "true")]).await;
    let queue = address(&unique("spell"));
    let refused = [
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:169.254.169.254]/",
        "http://[::ffff:a9fe:a9fe]/",
        "http://[::169.254.169.254]/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://[64:ff9b::a9fe:a9fe]/",
        "http://[64:ff9b::169.254.169.254]/",
        "http://[2002:a9fe:a9fe::]/",
        "http://2852039166/",
        "http://0xa9fea9fe/",
        "http://0xa9.0xfe.0xa9.0xfe/",
        "http://0251.0376.0251.0376/",
        "http://169.254.43518/",
        "http://169.254.169.254./",
        "http://100.100.100.200/",
        "http://[fe80::1]/",
        "http://0.0.0.0:8080/",
        "http://[::]:8080/",
        "http://224.0.0.251/",
        "http://[ff02::1]/",
        // TARGET_DENY_PRIVATE: loopback and private addresses, literal and by name.
        "http://127.0.0.1:9/",
        "http://2130706433:9/",
        "http://[::1]:9/",
        "http://10.0.0.1/",
        "http://localhost:9/",
    ];
    for url in refused {
        let (status, answer) =
            enroll_raw(&daemon.api, &json!({"queue": queue, "target_url": url})).await;
        assert_eq!(status, 422, "{url}: {answer}");
        let error = answer["error"].as_str().unwrap_or("");
        assert!(error.contains("target_url"), "{url}: {error}");
    }
    let (_, list) = daemon.api.get("/enrollments").await;
    assert_eq!(list, json!([]), "nothing was enrolled");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_that_reframe_the_request_are_refused() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let (_dir, db) = temp_db();
    let daemon = Daemon::start(&db).await;
    let queue = address(&unique("frame"));
    for name in [
        "Content-Length",
        "Transfer-Encoding",
        "Host",
        "Connection",
        "Keep-Alive",
        "TE",
        "Trailer",
        "Upgrade",
        "Proxy-Authorization",
    ] {
        let body = json!({"queue": queue, "target_url": "http://127.0.0.1:9/",
            "delivery": {"headers": {name: "5"}}});
        let (status, answer) = enroll_raw(&daemon.api, &body).await;
        assert_eq!(status, 422, "{name}: {answer}");
        let error = answer["error"].as_str().unwrap_or("");
        assert!(
            error.contains(&format!("headers.{name}")),
            "{name}: {error}"
        );
    }
    let signed = json!({"queue": queue, "target_url": "http://127.0.0.1:9/",
        "delivery": {"signing": {"secret": "a-signing-secret"}, "headers": {"webhook-signature": "v1,x"}}});
    assert_eq!(enroll_raw(&daemon.api, &signed).await.0, 422);
    let (_, list) = daemon.api.get("/enrollments").await;
    assert_eq!(list, json!([]), "nothing was enrolled");
    daemon.stop().await;
}

/// A name that resolved to an allowed address when it was enrolled and to a refused one when
/// it is used: the rules change between two starts (the effect DNS rebinding has), and the
/// messages are dead-lettered with the reason, no connection made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_resolving_to_a_refused_address_is_blocked_at_connect() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let (_dir, db) = temp_db();
    let mgmt = Management::new();
    let queue = unique("rebind");
    mgmt.declare_classic(&queue).await;
    let (port, connections, listener) = counting_listener().await;

    let daemon = Daemon::start(&db).await;
    let id = daemon
        .api
        .enroll_active(&queue, &format!("http://localhost:{port}/hook"))
        .await;
    daemon.stop().await;

    let daemon = Daemon::start_with(&db, &[("TARGET_DENY_PRIVATE", "true")]).await;
    daemon
        .api
        .wait_state(&id, "active", Duration::from_secs(20))
        .await;
    let mut publisher = Publisher::connect(&queue).await;
    publisher.send_numbered("blocked", 0..3).await;
    let status = wait_for("3 messages rejected", Duration::from_secs(30), || async {
        let e = daemon.api.enrollment(&id).await;
        (e["rejected"].as_u64() == Some(3)).then_some(e)
    })
    .await;
    let error = status["last_error"].as_str().unwrap_or("");
    assert!(
        error.contains("target blocked")
            && error.contains("localhost")
            && error.contains("loopback"),
        "{error}"
    );
    assert_eq!(status["retries"].as_u64(), Some(0), "no local retries");
    mgmt.wait_depth(&queue, 0, Duration::from_secs(20)).await;
    assert_eq!(
        connections.load(Ordering::SeqCst),
        0,
        "no TCP connection reached the refused address"
    );
    publisher.close().await;
    daemon.stop().await;
    listener.abort();
    mgmt.delete_queue(&queue).await;
}

/// A target that answers 200 and then streams its body without end, on every connection.
async fn endless_target() -> (u16, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let requests = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&requests);
    let task = tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let counted = Arc::clone(&counted);
            tokio::spawn(async move {
                let mut buf = [0u8; 8192];
                if socket.read(&mut buf).await.unwrap_or(0) == 0 {
                    return;
                }
                counted.fetch_add(1, Ordering::SeqCst);
                let head = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n";
                if socket.write_all(head).await.is_err() {
                    return;
                }
                let chunk = format!("{:x}\r\n{}\r\n", 64 * 1024, "x".repeat(64 * 1024));
                // Until the daemon hangs up; a client that reads it all never does.
                let started = Instant::now();
                while started.elapsed() < Duration::from_secs(60) {
                    if socket.write_all(chunk.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, requests, task)
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Bound on the daemon's RSS against a target whose answers never end (documented in the
/// README's Security section): without `RESPONSE_MAX_BYTES` it grew by gigabytes.
const ENDLESS_RSS_BOUND_MIB: u64 = 120;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_answer_is_cut_off_and_memory_stays_flat() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let (_dir, db) = temp_db();
    let mgmt = Management::new();
    let queue = unique("endless");
    mgmt.declare_classic(&queue).await;
    let (target_port, requests, target) = endless_target().await;
    let port = free_port();
    let api = Api::new(&format!("http://127.0.0.1:{port}"));
    let daemon = spawn_daemon(&db, port, None, &[]);
    let pid = daemon.0.id();
    api.wait_healthy().await;
    let n = 200;
    let id = enroll_with(
        &api,
        &queue,
        &format!("http://127.0.0.1:{target_port}/hook"),
        json!({"max_in_flight": 8}),
    )
    .await;
    let mut publisher = Publisher::connect(&queue).await;
    publisher.send_numbered("endless", 0..n).await;

    let mut peak = 0u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        peak = peak.max(rss_kib(pid).unwrap_or(0));
        let e = api.enrollment(&id).await;
        if e["delivered"].as_u64() == Some(n as u64) {
            break;
        }
        assert!(Instant::now() < deadline, "not all delivered: {e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    peak = peak.max(rss_kib(pid).unwrap_or(0));
    println!(
        "endless answers: {n} messages accepted, {} requests, daemon peak RSS {:.1} MiB",
        requests.load(Ordering::SeqCst),
        peak as f64 / 1024.0
    );
    assert!(peak > 0, "RSS was sampled");
    assert!(
        peak < ENDLESS_RSS_BOUND_MIB * 1024,
        "peak RSS {peak} KiB over {ENDLESS_RSS_BOUND_MIB} MiB"
    );
    mgmt.wait_depth(&queue, 0, Duration::from_secs(20)).await;
    publisher.close().await;
    drop(daemon);
    target.abort();
    mgmt.delete_queue(&queue).await;
}
