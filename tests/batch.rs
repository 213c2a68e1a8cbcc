//! Batched POSTs (`delivery.batch`) against the real broker: every message in one of the
//! batches, in order, each batch within its bounds; the target's `statuses` settling each
//! message as named (accepted, retry, reject into the dead-letter queue, drop); a whole batch
//! answered with an error going back through the normal failure path; `batch` refused beside
//! `reply`.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use common::*;
use fe2o3_amqp::types::messaging::{Data, Message, Properties};
use serde_json::{Value, json};

/// How the batch target answers a batch: given the message ids in it and how many batches
/// came before, the status and the body.
type Rule = fn(&[String], usize) -> (u16, String);

#[derive(Clone)]
struct BatchTarget {
    seen: Arc<Mutex<Vec<(HeaderMap, Value)>>>,
    rule: Rule,
}

async fn answer(
    State(t): State<BatchTarget>,
    headers: HeaderMap,
    body: String,
) -> impl IntoResponse {
    let parsed: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let ids: Vec<String> = parsed["messages"]
        .as_array()
        .map(|m| {
            m.iter()
                .map(|e| e["id"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default();
    let before = {
        let mut seen = t.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.push((headers, parsed));
        seen.len() - 1
    };
    let (code, body) = (t.rule)(&ids, before);
    (StatusCode::from_u16(code).unwrap_or(StatusCode::OK), body)
}

impl BatchTarget {
    async fn start(rule: Rule) -> (Self, String) {
        let target = Self {
            seen: Arc::default(),
            rule,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/batch", listener.local_addr().expect("addr"));
        let app = axum::Router::new()
            .route("/batch", axum::routing::post(answer))
            .with_state(target.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (target, url)
    }

    fn batches(&self) -> Vec<(HeaderMap, Value)> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Every message entry of every batch so far, in arrival order.
    fn entries(&self) -> Vec<Value> {
        self.batches()
            .into_iter()
            .flat_map(|(_, body)| body["messages"].as_array().cloned().unwrap_or_default())
            .collect()
    }
}

fn with_id(id: &str, body: &str) -> Message<Data> {
    Message::builder()
        .properties(
            Properties::builder()
                .message_id(id.to_string())
                .content_type("application/json")
                .build(),
        )
        .data(body.as_bytes().to_vec())
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_arrives_once_in_order_in_bounded_batches() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let mgmt = Management::new();
    let queue = unique("batch-order");
    mgmt.declare_quorum(&queue).await;
    let (target, url) = BatchTarget::start(|_, _| (200, String::new())).await;
    let (_dir, db) = temp_db();
    let daemon = Daemon::start(&db).await;

    // `batch` and `reply` do not mix: a clear 422, nothing enrolled.
    let refused = reqwest::Client::new()
        .post(format!("{}/enroll", daemon.base))
        .json(&json!({"queue": address(&queue), "target_url": url,
                      "delivery": {"reply": true, "batch": {"max_messages": 5}}}))
        .send()
        .await
        .expect("answer");
    assert_eq!(
        refused.status().as_u16(),
        422,
        "an invalid setting, as elsewhere"
    );
    let text = refused.text().await.unwrap_or_default();
    assert!(text.contains("delivery.batch"), "{text}");
    let (_, list) = daemon.api.get("/enrollments").await;
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");

    let id = enroll_active_with(
        &daemon.api,
        &queue,
        &url,
        json!({"max_in_flight": 1, "batch": {"max_messages": 50, "max_wait_ms": 50}}),
    )
    .await;
    let mut publisher = Publisher::connect(&queue).await;
    publisher.send_numbered("m", 0..500).await;
    wait_for(
        "500 messages in batches",
        Duration::from_secs(60),
        || async { (target.entries().len() >= 500).then_some(()) },
    )
    .await;
    mgmt.wait_depth(&queue, 0, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let batches = target.batches();
    let bodies: Vec<String> = target
        .entries()
        .iter()
        .map(|e| e["body"].as_str().unwrap_or("?").to_string())
        .collect();
    let expected: Vec<String> = (0..500).map(|i| format!("m-{i}")).collect();
    assert_eq!(bodies, expected, "each message once, in publish order");
    for (headers, body) in &batches {
        let n = body["messages"].as_array().map_or(0, Vec::len);
        assert!((1..=50).contains(&n), "a batch of {n}");
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(headers["hot-potato-batch-size"], n.to_string().as_str());
        assert_eq!(headers["hot-potato-enrollment-id"], id.as_str());
        let first = &body["messages"][0];
        assert_eq!(first["headers"]["amqp-delivery-count"], "0", "{first}");
        assert!(first["id"].as_str().is_some_and(|i| i.starts_with('#')));
    }
    assert!(
        batches.len() <= 100,
        "500 messages in {} POSTs: they were not batched",
        batches.len()
    );
    let e = daemon.api.enrollment(&id).await;
    assert_eq!(e["delivered"], 500, "{e}");
    assert_eq!(e["in_flight"], 0, "{e}");
    publisher.close().await;
    daemon.stop().await;
    mgmt.delete_queue(&queue).await;
}

/// The first batch is answered 400 (outside every class: the whole batch fails and comes
/// back); later ones with statuses: `acc` accepted, `rej` rejected, `drop` dropped, `again`
/// retried once and then accepted.
fn by_status(ids: &[String], before: usize) -> (u16, String) {
    if before == 0 {
        return (400, "no".into());
    }
    let statuses: Vec<Value> = ids
        .iter()
        .map(|id| {
            let status = match id.as_str() {
                "rej" => "reject",
                "drop" => "drop",
                "again" if before == 1 => "retry",
                _ => "accepted",
            };
            json!({"id": id, "status": status})
        })
        .collect();
    (200, json!({ "statuses": statuses }).to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_settle_each_message_as_named() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let mgmt = Management::new();
    let queue = unique("batch-status");
    let dlq = mgmt.declare_with_dead_letter(&queue, 20).await;
    let (target, url) = BatchTarget::start(by_status).await;
    let (_dir, db) = temp_db();
    let daemon = Daemon::start(&db).await;
    let id = enroll_active_with(
        &daemon.api,
        &queue,
        &url,
        json!({"retry": {"max_attempts": 1}, "max_in_flight": 1,
               "batch": {"max_messages": 4, "max_wait_ms": 2000}}),
    )
    .await;
    let mut publisher = Publisher::connect(&queue).await;
    for (message_id, body) in [
        ("acc", r#"{"n": 1}"#),
        ("rej", r#"{"n": 2}"#),
        ("drop", r#"{"n": 3}"#),
        ("again", r#"{"n": 4}"#),
    ] {
        publisher.send(with_id(message_id, body)).await;
    }
    wait_for("everything settled", Duration::from_secs(60), || async {
        let e = daemon.api.enrollment(&id).await;
        (e["delivered"] == 2 && e["rejected"] == 1 && e["dropped"] == 1).then_some(e)
    })
    .await;
    mgmt.wait_depth(&queue, 0, Duration::from_secs(20)).await;
    mgmt.wait_depth(&dlq, 1, Duration::from_secs(20)).await;

    let batches = target.batches();
    let ids = |i: usize| -> Vec<String> {
        batches[i].1["messages"]
            .as_array()
            .map(|m| {
                m.iter()
                    .map(|e| e["id"].as_str().unwrap_or("").to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    let sorted = |i: usize| {
        let mut v = ids(i);
        v.sort();
        v
    };
    assert_eq!(ids(0), ["acc", "rej", "drop", "again"], "the 400 batch");
    assert_eq!(batches[0].1["messages"][0]["body"], json!({"n": 1}));
    // Released or modified messages may come back in another order.
    assert_eq!(
        sorted(1),
        ["acc", "again", "drop", "rej"],
        "all of it came back"
    );
    assert_eq!(ids(2), ["again"], "only the retried one came back");
    assert_eq!(batches.len(), 3, "nothing else was sent");
    let e = daemon.api.enrollment(&id).await;
    assert_eq!(e["failed"], 5, "the 400 batch's four and one retry: {e}");
    publisher.close().await;
    daemon.stop().await;
    mgmt.delete_queue(&queue).await;
    mgmt.delete_queue(&dlq).await;
}
