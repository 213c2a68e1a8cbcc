//! Publish, reply and request against the real broker (RabbitMQ 3.10): `POST /publish` lands
//! the body and properties in the queue; the broker's refusal is a 502 and its absence a 503;
//! `delivery.reply` publishes the target's answer to `reply-to` and settles only after that;
//! `POST /request` is answered with its own reply, also 50 at once, with 504 when nobody
//! answers and 503 (never another request's reply) across a restart.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use common::*;
use fe2o3_amqp::types::messaging::{Body, Message, MessageId, Properties};
use fe2o3_amqp::types::primitives::{SimpleValue, Value};
use fe2o3_amqp::{Connection, Receiver, Session};
use serde_json::json;

/// An echo target: answers 201 with the request's body and Content-Type, and `x-echo` set to
/// the message-id it was pushed.
async fn echo_target() -> String {
    async fn echo(headers: HeaderMap, body: Bytes) -> impl IntoResponse {
        let mut answer = HeaderMap::new();
        if let Some(ct) = headers.get("content-type") {
            answer.insert("content-type", ct.clone());
        }
        if let Some(id) = headers.get("amqp-message-id") {
            answer.insert("x-echo", id.clone());
        }
        (StatusCode::CREATED, answer, body)
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr: SocketAddr = listener.local_addr().expect("addr");
    let app = Router::new().fallback(echo);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}/echo")
}

/// Takes up to `n` messages from `queue` over AMQP 1.0 (accepting them), waiting at most
/// `limit` for each.
async fn take(queue: &str, n: usize, limit: Duration) -> Vec<Message<Body<Value>>> {
    let mut connection = Connection::open(
        format!("request-reply-test-{}", uuid::Uuid::new_v4()),
        broker_url().as_str(),
    )
    .await
    .expect("connect");
    let mut session = Session::begin(&mut connection).await.expect("session");
    let mut receiver = Receiver::attach(&mut session, "reader", address(queue))
        .await
        .expect("attach a reader");
    let mut out = Vec::new();
    while out.len() < n {
        match tokio::time::timeout(limit, receiver.recv::<Body<Value>>()).await {
            Ok(Ok(delivery)) => {
                receiver.accept(&delivery).await.expect("accept");
                out.push(delivery.into_message());
            }
            _ => break,
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), receiver.close()).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), session.end()).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), connection.close()).await;
    out
}

fn data_of(message: &Message<Body<Value>>) -> Vec<u8> {
    match &message.body {
        Body::Data(sections) => sections.iter().flat_map(|d| d.0.to_vec()).collect(),
        other => panic!("expected Data, got {other:?}"),
    }
}

fn app_property<'a>(message: &'a Message<Body<Value>>, name: &str) -> Option<&'a SimpleValue> {
    message
        .application_properties
        .as_ref()
        .and_then(|a| a.0.get(name))
}

fn properties(message: &Message<Body<Value>>) -> &Properties {
    message.properties.as_ref().expect("properties")
}

async fn metric(api: &Api, line_start: &str) -> f64 {
    let text = api
        .http
        .get(format!("{}/metrics", api.base))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    text.lines()
        .filter(|l| l.starts_with(line_start))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// POSTs `body` to `path` with extra headers; status, headers and body.
async fn post(
    api: &Api,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (u16, HeaderMap, Bytes) {
    let mut request = api.http.post(format!("{}{path}", api.base)).body(body);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let res = request.send().await.expect("request");
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    (status, headers, res.bytes().await.expect("body"))
}

fn json_of(body: &Bytes) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or_else(|_| json!({"raw": String::from_utf8_lossy(body)}))
}

const NO_LIMIT: (&str, &str) = ("API_RATE_LIMIT_PER_MIN", "0");

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn publish_lands_body_and_properties_in_the_queue() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let mgmt = Management::new();
    let queue = unique("publish");
    mgmt.declare_classic(&queue).await;
    let (_dir, db) = temp_db();
    let daemon = Daemon::start_with(
        &db,
        &[
            NO_LIMIT,
            ("PUBLISH_MAX_BYTES", "4096"),
            (
                "PUBLISH_ADDRESSES",
                "/amq/queue/hp-publish-*, /amq/queue/nowhere-*",
            ),
        ],
    )
    .await;
    let api = &daemon.api;
    api.wait_healthy().await;
    let path = format!("/publish?address={}", address(&queue));
    let body = b"\x00\x01 binary \xff body".to_vec();
    let (status, _, answer) = post(
        api,
        &path,
        &[
            ("content-type", "application/x-test"),
            ("amqp-message-id", "msg-1"),
            ("amqp-correlation-id", "corr-1"),
            ("amqp-subject", "subject-1"),
            ("amqp-reply-to", "/queue/somewhere"),
            ("amqp-app-colour", "red"),
            ("amqp-app-Size", "10"),
        ],
        body.clone(),
    )
    .await;
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&answer));
    let answer = json_of(&answer);
    assert_eq!(answer["address"], address(&queue).as_str());
    assert_eq!(answer["message_id"], "msg-1");
    // No message-id: a UUID is generated and returned.
    let (status, _, answer) = post(api, &path, &[], b"second".to_vec()).await;
    assert_eq!(status, 201);
    let generated = json_of(&answer)["message_id"]
        .as_str()
        .expect("message_id")
        .to_string();
    uuid::Uuid::parse_str(&generated).expect("a UUID");

    // Through the management API: both messages are in the queue.
    mgmt.wait_depth(&queue, 2, Duration::from_secs(20)).await;
    // With an AMQP receiver: the body byte for byte, the properties, the application
    // properties. RabbitMQ 3.10 keeps the AMQP 1.0 sections of a message published and
    // consumed over AMQP 1.0, application properties included.
    let got = take(&queue, 2, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 2);
    let first = &got[0];
    assert_eq!(data_of(first), body);
    let p = properties(first);
    assert_eq!(
        p.content_type.as_ref().map(|s| s.as_str()),
        Some("application/x-test")
    );
    assert_eq!(p.message_id, Some(MessageId::String("msg-1".into())));
    assert_eq!(p.correlation_id, Some(MessageId::String("corr-1".into())));
    assert_eq!(p.subject.as_deref(), Some("subject-1"));
    assert_eq!(p.reply_to.as_deref(), Some("/queue/somewhere"));
    assert_eq!(
        app_property(first, "colour"),
        Some(&SimpleValue::String("red".into()))
    );
    // HTTP header names are case-insensitive and arrive in lower case.
    assert_eq!(
        app_property(first, "size"),
        Some(&SimpleValue::String("10".into()))
    );
    let second = &got[1];
    assert_eq!(data_of(second), b"second");
    assert_eq!(
        properties(second).message_id,
        Some(MessageId::String(generated))
    );

    // The refusals before anything is published.
    let (status, _, _) = post(api, "/publish", &[], b"x".to_vec()).await;
    assert_eq!(status, 422, "no address");
    let (status, _, _) = post(api, "/publish?address=", &[], b"x".to_vec()).await;
    assert_eq!(status, 422, "empty address");
    let (status, _, _) = post(api, "/publish?address=/amq/queue/other", &[], b"x".to_vec()).await;
    assert_eq!(status, 403, "not in PUBLISH_ADDRESSES");
    let (status, _, answer) = post(api, &path, &[], vec![b'x'; 4097]).await;
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&answer));
    assert!(
        metric(api, "hot_potato_publishes_total{outcome=\"accepted\"}").await >= 2.0,
        "publishes counted"
    );
    daemon.stop().await;
    mgmt.delete_queue(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_brokers_refusal_is_a_502_and_its_absence_a_503() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let mgmt = Management::new();
    let (_dir, db) = temp_db();
    let daemon = Daemon::start_with(&db, &[NO_LIMIT]).await;
    let api = &daemon.api;
    api.wait_healthy().await;
    // An exchange that does not exist: RabbitMQ 3.10 refuses the sender's attach (it ends
    // the session with `amqp:not-found`), the broker's reason comes back.
    let missing = format!("/exchange/{}/key", unique("no-exchange"));
    let (status, _, answer) = post(
        api,
        &format!("/publish?address={missing}"),
        &[],
        b"x".to_vec(),
    )
    .await;
    assert_eq!(status, 502, "{}", String::from_utf8_lossy(&answer));
    assert!(
        json_of(&answer)["error"]
            .as_str()
            // RabbitMQ 3.10 says `NOT_FOUND - no exchange…`, 4.0 `AmqpError(NotFound): no exchange…`.
            .is_some_and(|e| e.contains("NOT_FOUND") || e.contains("NotFound")),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    // An address it does not know at all.
    let (status, _, answer) = post(api, "/publish?address=/bogus/x", &[], b"x".to_vec()).await;
    assert_eq!(status, 502, "{}", String::from_utf8_lossy(&answer));
    // The publisher still works afterwards.
    let fine = unique("fine");
    mgmt.declare_classic(&fine).await;
    let (status, _, _) = post(
        api,
        &format!("/publish?address={}", address(&fine)),
        &[],
        b"x".to_vec(),
    )
    .await;
    assert_eq!(status, 201);
    assert!(metric(api, "hot_potato_publishes_total{outcome=\"refused\"}").await >= 2.0);
    daemon.stop().await;

    // No broker at all: a closed port.
    let closed = free_port();
    let url = format!("amqp://guest:guest@127.0.0.1:{closed}");
    let (_dir2, db2) = temp_db();
    let down = Daemon::start_with(
        &db2,
        &[
            NO_LIMIT,
            ("AMQP_URL", &url),
            ("AMQP_CONNECT_TIMEOUT_MS", "2000"),
        ],
    )
    .await;
    down.api.wait_healthy().await;
    let started = Instant::now();
    let (status, _, answer) = post(
        &down.api,
        &format!("/publish?address={}", address(&fine)),
        &[],
        b"x".to_vec(),
    )
    .await;
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&answer));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "bounded in time"
    );
    down.stop().await;
    mgmt.delete_queue(&fine).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replies_reach_reply_to_with_correlation_and_status() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let mgmt = Management::new();
    let requests = unique("requests");
    let replies = unique("replies");
    mgmt.declare_classic(&requests).await;
    mgmt.declare_classic(&replies).await;
    let target = echo_target().await;
    let (_dir, db) = temp_db();
    let daemon = Daemon::start_with(&db, &[NO_LIMIT]).await;
    let api = &daemon.api;
    let id = enroll_with(
        api,
        &requests,
        &target,
        json!({"reply": true, "reply_headers": ["X-Echo", "x-absent"]}),
    )
    .await;
    api.wait_state(&id, "active", Duration::from_secs(20)).await;
    let mut publisher = Publisher::connect(&requests).await;
    let reply_to = address(&replies);
    // With a message-id; with only a correlation-id; without reply-to (no reply).
    publisher
        .send(
            Message::builder()
                .properties(
                    Properties::builder()
                        .message_id("req-1".to_string())
                        .reply_to(reply_to.clone())
                        .content_type("text/plain")
                        .build(),
                )
                .data(fe2o3_amqp::types::primitives::Binary::from(b"one".to_vec()))
                .build(),
        )
        .await;
    publisher
        .send(
            Message::builder()
                .properties(
                    Properties::builder()
                        .correlation_id(MessageId::Ulong(42))
                        .reply_to(reply_to.clone())
                        .build(),
                )
                .data(fe2o3_amqp::types::primitives::Binary::from(b"two".to_vec()))
                .build(),
        )
        .await;
    publisher
        .send(
            Message::builder()
                .properties(
                    Properties::builder()
                        .message_id("no-reply".to_string())
                        .build(),
                )
                .data(fe2o3_amqp::types::primitives::Binary::from(
                    b"three".to_vec(),
                ))
                .build(),
        )
        .await;
    publisher.close().await;
    wait_for(
        "three messages accepted",
        Duration::from_secs(20),
        || async {
            let accepted = metric(api, "hot_potato_deliveries_total{outcome=\"accepted\"").await;
            (accepted >= 3.0).then_some(())
        },
    )
    .await;
    let got = take(&replies, 3, Duration::from_secs(3)).await;
    assert_eq!(got.len(), 2, "one reply per message with reply-to");
    let first = got
        .iter()
        .find(|m| data_of(m) == b"one")
        .expect("the reply to req-1");
    let p = properties(first);
    assert_eq!(p.correlation_id, Some(MessageId::String("req-1".into())));
    assert_eq!(
        p.content_type.as_ref().map(|s| s.as_str()),
        Some("text/plain")
    );
    assert_eq!(
        app_property(first, "http-status"),
        Some(&SimpleValue::Int(201))
    );
    assert_eq!(
        app_property(first, "x-echo"),
        Some(&SimpleValue::String("req-1".into()))
    );
    assert_eq!(app_property(first, "x-absent"), None);
    let second = got
        .iter()
        .find(|m| data_of(m) == b"two")
        .expect("the reply to the correlated one");
    assert_eq!(
        properties(second).correlation_id,
        Some(MessageId::Ulong(42)),
        "no message-id: the correlation-id, of its own type"
    );
    assert!(metric(api, "hot_potato_replies_total{outcome=\"accepted\"}").await >= 2.0);
    daemon.stop().await;
    mgmt.delete_queue(&requests).await;
    mgmt.delete_queue(&replies).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reply_the_broker_refuses_hands_the_original_back() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let mgmt = Management::new();
    let requests = unique("requests");
    // Replies to an exchange that does not exist: the broker refuses every one.
    let refused = format!("/exchange/{}/key", unique("no-exchange"));
    mgmt.declare_classic(&requests).await;
    let target = Target::start().await;
    let (_dir, db) = temp_db();
    let daemon = Daemon::start_with(&db, &[NO_LIMIT]).await;
    let api = &daemon.api;
    let id = enroll_with(api, &requests, &target.url(), json!({"reply": true})).await;
    api.wait_state(&id, "active", Duration::from_secs(20)).await;
    let mut publisher = Publisher::connect(&requests).await;
    publisher
        .send(
            Message::builder()
                .properties(
                    Properties::builder()
                        .message_id("keep-me".to_string())
                        .reply_to(refused.clone())
                        .build(),
                )
                .data(fe2o3_amqp::types::primitives::Binary::from(
                    b"keep".to_vec(),
                ))
                .build(),
        )
        .await;
    publisher.close().await;
    // The target answers 2xx every time, the reply is refused every time, and the message
    // goes back to the queue each time: POSTed again, never accepted.
    wait_for(
        "the message POSTed again",
        Duration::from_secs(20),
        || async { (target.received().len() >= 3).then_some(()) },
    )
    .await;
    assert!(metric(api, "hot_potato_replies_total{outcome=\"refused\"}").await >= 2.0);
    let (status, _) = api.post_empty(&format!("/enrollments/{id}/pause")).await;
    assert_eq!(status, 200);
    api.wait_state(&id, "paused", Duration::from_secs(20)).await;
    mgmt.wait_depth(&requests, 1, Duration::from_secs(20)).await;
    let kept = take(&requests, 1, Duration::from_secs(5)).await;
    assert_eq!(kept.len(), 1, "the original is still on the queue");
    assert_eq!(data_of(&kept[0]), b"keep");
    daemon.stop().await;
    mgmt.delete_queue(&requests).await;
}

/// A daemon whose requests come back on `/queue/<reply>` (RabbitMQ 3.x has no dynamic
/// nodes), with `requests` enrolled for the echo target with replies on.
async fn request_setup(
    db: &std::path::Path,
    reply_queue: &str,
    requests: &str,
    target: &str,
) -> Daemon {
    let reply_address = format!("/queue/{reply_queue}");
    let daemon = Daemon::start_with(db, &[NO_LIMIT, ("REPLY_ADDRESS", &reply_address)]).await;
    enroll_active_with(
        &daemon.api,
        requests,
        target,
        json!({"reply": true, "max_in_flight": 16}),
    )
    .await;
    daemon
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_are_answered_each_with_its_own_reply() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let mgmt = Management::new();
    let requests = unique("requests");
    let reply_queue = unique("daemon-replies");
    mgmt.declare_classic(&requests).await;
    let target = echo_target().await;
    let (_dir, db) = temp_db();
    let daemon = request_setup(&db, &reply_queue, &requests, &target).await;
    let api = daemon.api.clone();
    let path = format!("/request?address={}&timeout_ms=20000", address(&requests));
    let (status, headers, body) = post(
        &api,
        &path,
        &[("content-type", "application/json")],
        br#"{"ask":1}"#.to_vec(),
    )
    .await;
    assert_eq!(
        status,
        201,
        "the target's status: {}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(&body[..], br#"{"ask":1}"#);
    assert_eq!(headers["content-type"], "application/json");

    // 50 at once, each with its own body: each answer is its own.
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..50 {
        let api = api.clone();
        let path = path.clone();
        calls.spawn(async move {
            let body = format!("request-{i}-{}", uuid::Uuid::new_v4());
            let (status, _, answer) = post(&api, &path, &[], body.clone().into_bytes()).await;
            (status, body, String::from_utf8_lossy(&answer).into_owned())
        });
    }
    let mut answered = 0;
    while let Some(joined) = calls.join_next().await {
        let (status, sent, got) = joined.expect("call");
        assert_eq!(status, 201, "{got}");
        assert_eq!(got, sent, "every request gets its own reply");
        answered += 1;
    }
    assert_eq!(answered, 50);
    assert!(metric(&api, "hot_potato_request_duration_seconds_count").await >= 51.0);
    daemon.stop().await;
    mgmt.delete_queue(&requests).await;
    mgmt.delete_queue(&reply_queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_nobody_answers_is_a_504_in_time() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let mgmt = Management::new();
    let lonely = unique("lonely");
    let reply_queue = unique("daemon-replies");
    mgmt.declare_classic(&lonely).await;
    let (_dir, db) = temp_db();
    let reply_address = format!("/queue/{reply_queue}");
    let daemon = Daemon::start_with(&db, &[NO_LIMIT, ("REPLY_ADDRESS", &reply_address)]).await;
    daemon.api.wait_healthy().await;
    let started = Instant::now();
    let (status, _, body) = post(
        &daemon.api,
        &format!("/request?address={}&timeout_ms=1500", address(&lonely)),
        &[],
        b"anyone?".to_vec(),
    )
    .await;
    let took = started.elapsed();
    assert_eq!(status, 504, "{}", String::from_utf8_lossy(&body));
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_millis(2500),
        "answered after {took:?}"
    );
    assert_eq!(
        metric(&daemon.api, "hot_potato_requests_timed_out_total").await,
        1.0
    );
    // timeout_ms out of range is refused before anything is sent.
    let (status, _, _) = post(
        &daemon.api,
        &format!("/request?address={}&timeout_ms=300001", address(&lonely)),
        &[],
        b"x".to_vec(),
    )
    .await;
    assert_eq!(status, 422);
    daemon.stop().await;
    mgmt.delete_queue(&lonely).await;
    mgmt.delete_queue(&reply_queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_answers_waiting_requests_503_never_with_anothers_reply() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let mgmt = Management::new();
    let requests = unique("requests");
    let reply_queue = unique("daemon-replies");
    mgmt.declare_classic(&requests).await;
    let reply_address = format!("/queue/{reply_queue}");
    let (_dir, db) = temp_db();
    // No enrollment yet: the requests wait on the queue.
    let first = Daemon::start_with(&db, &[NO_LIMIT, ("REPLY_ADDRESS", &reply_address)]).await;
    first.api.wait_healthy().await;
    let path = format!("/request?address={}&timeout_ms=30000", address(&requests));
    let mut waiting = tokio::task::JoinSet::new();
    for i in 0..5 {
        let api = first.api.clone();
        let path = path.clone();
        waiting.spawn(async move {
            let body = format!("before-restart-{i}");
            let (status, _, answer) = post(&api, &path, &[], body.into_bytes()).await;
            (status, String::from_utf8_lossy(&answer).into_owned())
        });
    }
    mgmt.wait_depth(&requests, 5, Duration::from_secs(20)).await;
    first.stop().await;
    while let Some(joined) = waiting.join_next().await {
        let (status, answer) = joined.expect("call");
        assert!(
            status == 503 || status == 504,
            "a waiting request ends 503 or 504, got {status}: {answer}"
        );
        assert!(!answer.contains("before-restart"), "{answer}");
    }

    // The next daemon answers the old requests' messages; new requests get their own replies
    // (the reply link attaches with the first of them), and the old replies, found on the
    // reply queue, meet nobody waiting and are dropped.
    let target = echo_target().await;
    let second = request_setup(&db, &reply_queue, &requests, &target).await;
    let api = second.api.clone();
    for i in 0..5 {
        let body = format!("after-restart-{i}");
        let (status, _, answer) = post(&api, &path, &[], body.clone().into_bytes()).await;
        assert_eq!(status, 201);
        assert_eq!(String::from_utf8_lossy(&answer), body);
    }
    wait_for("the old replies dropped", Duration::from_secs(20), || {
        let api = api.clone();
        async move { (metric(&api, "hot_potato_late_replies_total").await >= 5.0).then_some(()) }
    })
    .await;
    second.stop().await;
    mgmt.delete_queue(&requests).await;
    mgmt.delete_queue(&reply_queue).await;
}
