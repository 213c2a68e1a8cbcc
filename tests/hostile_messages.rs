//! Messages built to hurt the worker, through the real broker: each must be POSTed in a
//! bounded form, the messages around it must flow, nothing may be dead-lettered, and the
//! worker must never restart. A panic in the mapping would recur on every redelivery and burn
//! the healthy messages behind it into the dead-letter queue. Also: delivery settings that
//! would overflow a duration or the rate limiter later are refused at enroll time.

mod common;

use std::time::Duration;

use common::*;
use fe2o3_amqp::types::messaging::{ApplicationProperties, Message};
use fe2o3_amqp::types::primitives::{SimpleValue, Value};
use hot_potato::delivery::amqp_json::{MAX_JSON_DEPTH, TOO_DEEP};
use hot_potato::delivery::request::{
    APP_PROPERTY_PREFIX, MAX_PROPERTY_HEADERS, SKIPPED_PROPERTIES_HEADER,
};
use serde_json::json;

/// More application properties than `http::HeaderMap` holds (it refuses the 24,577th entry:
/// three quarters of its 32,768 slots), which used to panic the worker on every delivery.
const PROPERTIES: usize = 30_000;

/// A queue that dead-letters after 3 deliveries, its DLQ, a target answering 200 and a
/// daemon whose worker for the queue is attached.
struct Setup {
    mgmt: Management,
    queue: String,
    dlq: String,
    target: Target,
    daemon: Daemon,
    id: String,
    _dir: tempfile::TempDir,
}

async fn setup(name: &str) -> Setup {
    let mgmt = Management::new();
    let queue = unique(name);
    let dlq = mgmt.declare_with_dead_letter(&queue, 3).await;
    let target = Target::start().await;
    let (dir, db) = temp_db();
    let daemon = Daemon::start(&db).await;
    let id = daemon.api.enroll_active(&queue, &target.url()).await;
    Setup {
        mgmt,
        queue,
        dlq,
        target,
        daemon,
        id,
        _dir: dir,
    }
}

impl Setup {
    /// Waits for `bodies` to be accepted, then checks that the queue and its DLQ are empty
    /// and the worker never panicked; returns what the target received.
    async fn all_delivered(&self, bodies: &[&str]) -> Vec<Received> {
        wait_for(
            "every message accepted",
            Duration::from_secs(60),
            || async {
                let got = self.target.accepted_bodies();
                bodies
                    .iter()
                    .all(|b| got.iter().any(|g| g == b))
                    .then_some(())
            },
        )
        .await;
        self.mgmt
            .wait_depth(&self.queue, 0, Duration::from_secs(30))
            .await;
        self.mgmt
            .wait_depth(&self.dlq, 0, Duration::from_secs(5))
            .await;
        let e = self.daemon.api.enrollment(&self.id).await;
        assert_eq!(e["state"], "active", "{e}");
        assert!(
            !e["last_error"]
                .as_str()
                .is_some_and(|s| s.contains("worker panicked")),
            "{e}"
        );
        assert_eq!(e["delivered"], bodies.len(), "{e}");
        assert_eq!(e["failed"], 0, "{e}");
        assert_eq!(e["rejected"], 0, "{e}");
        self.target.received()
    }

    async fn end(self, publisher: Publisher) {
        publisher.close().await;
        self.daemon.stop().await;
        self.mgmt.delete_queue(&self.queue).await;
        self.mgmt.delete_queue(&self.dlq).await;
    }
}

fn text(body: &str) -> Message<fe2o3_amqp::types::messaging::AmqpValue<String>> {
    Message::builder().value(body.to_string()).build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_thousand_application_properties_are_capped_and_the_queue_flows() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let s = setup("manyprops").await;
    let mut app = ApplicationProperties::default();
    for i in 0..PROPERTIES {
        app.0.insert(format!("p{i}"), SimpleValue::Int(i as i32));
    }
    let big = Message::builder()
        .application_properties(app)
        .value("hostile-2".to_string())
        .build();
    let mut publisher = Publisher::connect(&s.queue).await;
    publisher.send(text("hostile-1")).await;
    publisher.send(big).await;
    publisher.send(text("hostile-3")).await;

    let received = s
        .all_delivered(&["hostile-1", "hostile-2", "hostile-3"])
        .await;
    let big = received
        .iter()
        .find(|r| r.text() == "hostile-2")
        .expect("the big message");
    let carried = big
        .headers
        .keys()
        .filter(|k| k.as_str().starts_with(APP_PROPERTY_PREFIX))
        .count();
    // Every property the broker handed over was counted: sent as a header or skipped.
    let skipped: usize = big
        .header(SKIPPED_PROPERTIES_HEADER)
        .and_then(|n| n.parse().ok())
        .expect("the skipped count");
    println!(
        "{PROPERTIES} properties published; {carried} sent as headers, {skipped} skipped; \
         {} POSTs for 3 messages",
        received.len()
    );
    assert_eq!(carried, MAX_PROPERTY_HEADERS);
    assert_eq!(carried + skipped, PROPERTIES, "the broker carried them all");
    assert_eq!(big.header("amqp-app-p0"), Some("0"));
    assert_eq!(received.len(), 3, "each message POSTed once");
    s.end(publisher).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_nested_past_the_json_bound_is_posted_with_the_marker() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let s = setup("deepbody").await;
    // Deep enough to pass the bound; not so deep that the AMQP decoder's own recursion (in
    // fe2o3, before the mapping) is what is tested.
    let levels = MAX_JSON_DEPTH + 36;
    let mut nested = Value::Int(1);
    for _ in 0..levels {
        nested = Value::List(vec![nested]);
    }
    let mut publisher = Publisher::connect(&s.queue).await;
    publisher.send(text("deep-1")).await;
    publisher
        .send(Message::builder().value(nested).build())
        .await;
    publisher.send(text("deep-3")).await;

    let marker = format!(
        "{}\"{TOO_DEEP}\"{}",
        "[".repeat(MAX_JSON_DEPTH),
        "]".repeat(MAX_JSON_DEPTH)
    );
    let received = s.all_delivered(&["deep-1", &marker, "deep-3"]).await;
    let deep = received
        .iter()
        .find(|r| r.text() == marker)
        .expect("the nested message");
    assert_eq!(deep.header("content-type"), Some("application/json"));
    s.end(publisher).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_that_would_overflow_later_are_refused_at_enroll_time() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let (_dir, db) = temp_db();
    let daemon = Daemon::start(&db).await;
    for (delivery, field) in [
        (json!({"rate_limit_per_sec": 1e-12}), "rate_limit_per_sec"),
        (json!({"timeout_ms": u64::MAX}), "timeout_ms"),
        (json!({"retry": {"max_ms": u64::MAX}}), "retry.max_ms"),
        (
            json!({"circuit_breaker": {"open_ms": u64::MAX}}),
            "circuit_breaker.open_ms",
        ),
    ] {
        let res = daemon
            .api
            .http
            .post(format!("{}/enroll", daemon.base))
            .json(&json!({
                "queue": address("never-created"),
                "target_url": "http://127.0.0.1:9/hook",
                "delivery": delivery,
            }))
            .send()
            .await
            .expect("API reachable");
        let status = res.status().as_u16();
        let body = res.text().await.unwrap_or_default();
        assert_eq!(status, 422, "{delivery}: {body}");
        assert!(body.contains(&format!("delivery.{field}")), "{body}");
    }
    let (_, list) = daemon.api.get("/enrollments").await;
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");
    daemon.stop().await;
}
