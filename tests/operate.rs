//! Operating the daemon: token protection of every route, the OpenAPI document against the
//! router, metrics and stats after real deliveries (and no secrets in them), readiness,
//! pause/resume across a restart, JSON logs, random requests thrown at the API, and the
//! binary's allocator options.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const TOKEN: &str = "operate-test-token-0123";

fn authed(
    api: &Api,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
) -> reqwest::RequestBuilder {
    let mut req = api.http.request(method, format!("{}{path}", api.base));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req
}

/// Every (method, path) in the OpenAPI document, with `{id}` filled in.
async fn documented_routes(api: &Api) -> BTreeSet<(String, String)> {
    let doc: Value = authed(api, reqwest::Method::GET, "/openapi.json", Some(TOKEN))
        .send()
        .await
        .expect("API")
        .json()
        .await
        .expect("json");
    let mut routes = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            routes.insert((method.to_uppercase(), path.clone()));
        }
    }
    routes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_is_documented_and_protected_by_the_token() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let (_dir, db) = temp_db();
    let daemon = Daemon::start_with(&db, &[("API_TOKEN", TOKEN)]).await;
    let api = &daemon.api;
    let routes = documented_routes(api).await;
    // The router's routes, listed by hand: a route added without documentation fails here.
    for expected in [
        ("POST", "/enroll"),
        ("DELETE", "/enroll/{id}"),
        ("GET", "/enrollments"),
        ("GET", "/enrollments/{id}"),
        ("POST", "/enrollments/{id}/pause"),
        ("POST", "/enrollments/{id}/resume"),
        ("POST", "/publish"),
        ("POST", "/request"),
        ("GET", "/health"),
        ("GET", "/ready"),
        ("GET", "/stats"),
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
        ("GET", "/"),
        ("GET", "/docs"),
    ] {
        assert!(
            routes.contains(&(expected.0.to_string(), expected.1.to_string())),
            "{expected:?} is not in the OpenAPI document"
        );
    }
    let open = ["/health", "/ready", "/", "/docs", "/metrics"];
    let unknown = uuid::Uuid::new_v4().to_string();
    for (method, path) in &routes {
        let path = path.replace("{id}", &unknown);
        let method: reqwest::Method = method.parse().expect("method");
        let is_open = open.contains(&path.as_str());
        for token in [None, Some("wrong-token-wrong-token")] {
            let status = authed(api, method.clone(), &path, token)
                .send()
                .await
                .expect("API")
                .status()
                .as_u16();
            if is_open {
                assert_ne!(status, 401, "{method} {path} is open");
            } else {
                assert_eq!(status, 401, "{method} {path} with {token:?}");
            }
        }
        let res = authed(api, method.clone(), &path, Some(TOKEN))
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
            .expect("API");
        let status = res.status().as_u16();
        assert_ne!(status, 401, "{method} {path} with the right token");
        assert_ne!(status, 405, "{method} {path} is routed");
        if status == 404 {
            let body: Value = res.json().await.unwrap_or(Value::Null);
            assert!(
                body["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("no enrollment")),
                "{method} {path} reached a handler, not the fallback: {body}"
            );
        }
    }
    let (status, _) = api.get("/enrollments").await;
    assert_eq!(status, 401, "the test client itself sends no token");
    daemon.stop().await;

    let (_dir2, db2) = temp_db();
    let strict = Daemon::start_with(
        &db2,
        &[("API_TOKEN", TOKEN), ("METRICS_REQUIRE_TOKEN", "true")],
    )
    .await;
    let status = authed(&strict.api, reqwest::Method::GET, "/metrics", None)
        .send()
        .await
        .expect("API")
        .status();
    assert_eq!(
        status.as_u16(),
        401,
        "METRICS_REQUIRE_TOKEN closes /metrics"
    );
    strict.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_stats_count_real_deliveries_and_show_no_secret() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let mgmt = Management::new();
    let queue = unique("metrics");
    mgmt.declare_classic(&queue).await;
    let target = Target::start().await;
    let (_dir, db) = temp_db();
    let daemon = Daemon::start_with(&db, &[("API_TOKEN", TOKEN)]).await;
    let api = &daemon.api;
    let res = authed(api, reqwest::Method::POST, "/enroll", Some(TOKEN))
        .json(&json!({
            "queue": address(&queue),
            "target_url": target.url().replace("http://", "http://hookuser:hookpass-secret@"),
            "delivery": {
                "auth": {"type": "header", "name": "x-api-key", "value": "key-secret-value"},
                "signing": {"secret": "signing-secret-value"}
            }
        }))
        .send()
        .await
        .expect("API");
    assert_eq!(res.status().as_u16(), 201);
    let id = res.json::<Value>().await.expect("json")["id"]
        .as_str()
        .expect("id")
        .to_string();
    let mut publisher = Publisher::connect(&queue).await;
    publisher.send_numbered("m", 0..25).await;
    wait_for("25 deliveries", Duration::from_secs(30), || async {
        (target.accepted_bodies().len() == 25).then_some(())
    })
    .await;
    assert_eq!(
        target.received()[0].header("x-api-key"),
        Some("key-secret-value")
    );

    let metrics = wait_for("metrics to count 25", Duration::from_secs(10), || async {
        let text = authed(api, reqwest::Method::GET, "/metrics", None)
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.contains(&format!(
            "hot_potato_deliveries_total{{outcome=\"accepted\",enrollment_id=\"{id}\"}} 25"
        ))
        .then_some(text)
    })
    .await;
    for expected in [
        "hot_potato_post_attempts_total{status_class=\"2xx\"",
        "hot_potato_post_duration_seconds_count",
        "hot_potato_enrollments 1",
        "hot_potato_workers{state=\"active\"} 1",
        "hot_potato_broker_links_up 1",
        "hot_potato_in_flight 0",
        "hot_potato_circuit_breakers{state=\"closed\"} 1",
    ] {
        assert!(
            metrics.contains(expected),
            "metrics lack {expected}:\n{metrics}"
        );
    }
    let stats: Value = authed(api, reqwest::Method::GET, "/stats", Some(TOKEN))
        .send()
        .await
        .expect("API")
        .json()
        .await
        .expect("json");
    let e = &stats["enrollments"][0];
    assert_eq!(e["delivered"], 25);
    assert_eq!(e["state"], "active");
    assert_eq!(e["breaker_state"], "closed");
    assert!(e["last_success_at"].is_string());
    let history: u64 = e["rate_history"]
        .as_array()
        .expect("history")
        .iter()
        .filter_map(Value::as_u64)
        .sum();
    assert!(history <= 25, "{e}");
    assert_eq!(stats["totals"]["delivered"], 25);
    let shown = authed(
        api,
        reqwest::Method::GET,
        &format!("/enrollments/{id}"),
        Some(TOKEN),
    )
    .send()
    .await
    .expect("API")
    .text()
    .await
    .expect("text");
    for secret in [
        "hookpass-secret",
        "key-secret-value",
        "signing-secret-value",
        TOKEN,
    ] {
        assert!(!metrics.contains(secret), "metrics show {secret}");
        assert!(!stats.to_string().contains(secret), "stats show {secret}");
        assert!(!shown.contains(secret), "enrollment shows {secret}");
    }
    publisher.close().await;
    daemon.stop().await;
    mgmt.delete_queue(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_store_and_the_workers() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let mgmt = Management::new();
    let queue = unique("ready");
    mgmt.declare_classic(&queue).await;
    let (_dir, db) = temp_db();
    // Probe on every call, so the lock taken below shows at once.
    let daemon = Daemon::start_with(&db, &[("READY_PROBE_INTERVAL_MS", "0")]).await;
    let id = daemon
        .api
        .enroll_queue(&queue, "http://127.0.0.1:9/x")
        .await;
    daemon
        .api
        .wait_state(&id, "active", Duration::from_secs(20))
        .await;
    let (status, body) = daemon.api.get("/ready").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ready"], true);

    let locker = rusqlite::Connection::open(&db).expect("open");
    locker.execute_batch("BEGIN EXCLUSIVE").expect("lock");
    let (status, body) = daemon.api.get("/ready").await;
    locker.execute_batch("ROLLBACK").expect("unlock");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["store_writable"], false);
    assert!(
        body["reasons"][0]
            .as_str()
            .is_some_and(|r| r.contains("store"))
    );
    let (status, _) = daemon.api.get("/ready").await;
    assert_eq!(status, 200);
    daemon.stop().await;
    mgmt.delete_queue(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_keeps_messages_in_the_broker_across_a_restart_and_resume_delivers_them() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let mgmt = Management::new();
    let queue = unique("pause");
    mgmt.declare_classic(&queue).await;
    let target = Target::start().await;
    let (_dir, db) = temp_db();
    let daemon = Daemon::start(&db).await;
    let id = daemon.api.enroll_active(&queue, &target.url()).await;
    let pause = |api: Api, action: &'static str, id: String| async move {
        let res = api
            .http
            .post(format!("{}/enrollments/{id}/{action}", api.base))
            .send()
            .await
            .expect("API");
        assert_eq!(res.status().as_u16(), 200, "{action}");
        res.json::<Value>().await.expect("json")
    };
    let paused = pause(daemon.api.clone(), "pause", id.clone()).await;
    assert_eq!(paused["state"], "paused");
    let mut publisher = Publisher::connect(&queue).await;
    publisher.send_numbered("p", 0..10).await;
    mgmt.wait_depth(&queue, 10, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(target.count(), 0, "nothing delivered while paused");
    daemon.stop().await;

    let daemon = Daemon::start(&db).await;
    let back = daemon.api.enrollment(&id).await;
    assert_eq!(back["state"], "paused", "pause survives a restart");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(target.count(), 0);
    let resumed = pause(daemon.api.clone(), "resume", id.clone()).await;
    assert_ne!(resumed["state"], "paused");
    wait_for("delivery after resume", Duration::from_secs(20), || async {
        (target.accepted_bodies().len() == 10).then_some(())
    })
    .await;
    publisher.close().await;
    daemon.stop().await;
    mgmt.delete_queue(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_fields_and_never_the_body() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let mgmt = Management::new();
    let queue = unique("jsonlog");
    mgmt.declare_classic(&queue).await;
    let target = Target::start().await;
    target.set_status(500);
    let (_dir, db) = temp_db();
    let port = free_port();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_hot-potato"))
        .env_clear()
        .envs(daemon_env(&db, port))
        .env("LOG_FORMAT", "json")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("daemon starts");
    watch_child(child.id(), false);
    // Killed on every way out of the test, a failed assertion included.
    let mut child = DaemonProcess(child);
    let api = Api::new(&format!("http://127.0.0.1:{port}"));
    wait_for("the daemon to serve", Duration::from_secs(20), || async {
        api.http
            .get(format!("{}/health", api.base))
            .send()
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    let e = api
        .enroll(json!({"queue": address(&queue), "target_url": target.url(),
                       "delivery": {"retry": {"max_attempts": 1}, "circuit_breaker": {"failure_threshold": 0}}}))
        .await;
    let id = e["id"].as_str().expect("id").to_string();
    let mut publisher = Publisher::connect(&queue).await;
    publisher
        .send(
            fe2o3_amqp::types::messaging::Message::builder()
                .properties(
                    fe2o3_amqp::types::messaging::Properties::builder()
                        .message_id("log-msg-1".to_string())
                        .build(),
                )
                .value("TOP-SECRET-BODY")
                .build(),
        )
        .await;
    wait_for("a few failed POSTs", Duration::from_secs(20), || async {
        (target.count() >= 3).then_some(())
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().expect("piped stdout"), &mut text)
        .expect("daemon output");
    assert!(
        !text.contains("TOP-SECRET-BODY"),
        "a message body was logged"
    );
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let failure = lines
        .iter()
        .find(|l| l["message_id"] == "log-msg-1")
        .unwrap_or_else(|| panic!("no line with the message id in {text}"));
    assert_eq!(
        failure["outcome"],
        broker_kind().failure_outcome(),
        "{failure}"
    );
    assert_eq!(failure["span"]["enrollment_id"], id.as_str(), "{failure}");
    assert_eq!(
        failure["span"]["queue"],
        address(&queue).as_str(),
        "{failure}"
    );
    publisher.close().await;
    mgmt.delete_queue(&queue).await;
}

/// Random requests for a bounded time: the daemon answers every one below 500 and keeps
/// serving. A seeded generator makes a failure reproducible (the seed is printed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_requests_get_client_errors_and_the_daemon_keeps_serving() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let (_dir, db) = temp_db();
    let daemon = Daemon::start_with(
        &db,
        &[("API_TOKEN", TOKEN), ("API_RATE_LIMIT_PER_MIN", "0")],
    )
    .await;
    let api = &daemon.api;
    let seed = fastrand::u64(..);
    println!("fuzz seed {seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let paths = [
        "/enroll",
        "/enroll/",
        "/enroll/x",
        "/enrollments",
        "/enrollments/",
        "/enrollments/%00",
        "/enrollments/../../etc/passwd",
        "/stats",
        "/metrics",
        "/health",
        "/ready",
        "/openapi.json",
        "/docs",
        "/",
        "//",
        "/enrollments/x/pause",
        "/enrollments/x/resume",
        "/%ff%fe",
        "/a?b=c&&",
    ];
    let methods = ["GET", "POST", "DELETE", "PUT", "PATCH", "OPTIONS", "HEAD"];
    let content_types = [
        "application/json",
        "text/plain",
        "application/x+json",
        "",
        "application/json; charset=utf-16",
        "multipart/form-data; boundary=x",
    ];
    let valid = json!({"queue": "/amq/queue/fuzz", "target_url": "http://127.0.0.1:9/x",
                       "subscription_args": {"prefetch": 5}, "delivery": {"max_in_flight": 2}});
    let started = Instant::now();
    let mut sent = 0;
    while started.elapsed() < Duration::from_secs(8) && sent < 3000 {
        sent += 1;
        let path = paths[rng.usize(..paths.len())];
        let method: reqwest::Method = methods[rng.usize(..methods.len())].parse().expect("method");
        let body: Vec<u8> = match rng.u8(..4) {
            0 => (0..rng.usize(..512)).map(|_| rng.u8(..)).collect(),
            1 => {
                let mut v = valid.clone();
                let keys = [
                    "queue",
                    "target_url",
                    "subscription_args",
                    "delivery",
                    "extra",
                ];
                let key = keys[rng.usize(..keys.len())];
                let replacement = match rng.u8(..6) {
                    0 => Value::Null,
                    1 => json!(rng.i64(..)),
                    2 => json!("x".repeat(rng.usize(..100))),
                    3 => json!([1, {"a": []}]),
                    4 => json!({"prefetch": -1, "max_in_flight": "many", "retry": {"backoff": 7}}),
                    _ => json!(true),
                };
                v[key] = replacement;
                v.to_string().into_bytes()
            }
            2 => "[".repeat(rng.usize(..200)).into_bytes(),
            _ => Vec::new(),
        };
        let mut req = api
            .http
            .request(method.clone(), format!("{}{path}", api.base))
            .body(body);
        let ct = content_types[rng.usize(..content_types.len())];
        if !ct.is_empty() {
            req = req.header("content-type", ct);
        }
        req = match rng.u8(..3) {
            0 => req.bearer_auth(TOKEN),
            1 => req.header("authorization", format!("Bearer {}", rng.u64(..))),
            _ => req,
        };
        if rng.bool() {
            req = req.header("x-junk", "a".repeat(rng.usize(..4000)));
        }
        let res = req.send().await.expect("the daemon answers");
        let status = res.status().as_u16();
        // /ready answers 503 by design while a fuzzed enrollment is still connecting (no
        // reason yet); that is a readiness answer with its JSON body, not a server fault.
        let readiness_answer = path == "/ready" && status == 503;
        assert!(
            status < 500 || readiness_answer,
            "seed {seed}: {method} {path} answered {status}"
        );
    }
    println!("{sent} random requests");
    let (status, _) = api.get("/health").await;
    assert_eq!(status, 200, "still serving");
    daemon.stop().await;
}

/// The binary's jemalloc options are read (a misdeclared `_rjem_malloc_conf` would be ignored
/// without a word): the background thread that hands idle memory back runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_allocates_with_jemalloc_and_its_purging_thread() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let (_dir, db) = temp_db();
    let port = free_port();
    let daemon = spawn_daemon(&db, port, None, &[]);
    Api::new(&format!("http://127.0.0.1:{port}"))
        .wait_healthy()
        .await;
    let tasks = format!("/proc/{}/task", daemon.0.id());
    wait_for(
        "jemalloc's background thread",
        Duration::from_secs(10),
        || {
            let names: Vec<String> = std::fs::read_dir(&tasks)
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|task| std::fs::read_to_string(task.path().join("comm")).ok())
                .map(|name| name.trim().to_string())
                .collect();
            async move {
                names
                    .iter()
                    .any(|name| name == "jemalloc_bg_thd")
                    .then_some(())
            }
        },
    )
    .await;
}
