//! End-to-end delivery against the real broker: order and exactly-once in the happy path,
//! hand-back and dead-lettering, a target that is down, DELETE, and message metadata.

mod common;

use std::time::{Duration, Instant};

use common::*;
use fe2o3_amqp::types::messaging::{ApplicationProperties, Message, Properties};
use serde_json::json;

/// Enrolls with no local retries and no breaker: every failed POST goes straight back to
/// the broker, which is what these tests are about.
async fn enroll_handing_back_at_once(api: &Api, queue: &str, target: &str) -> String {
    let e = api
        .enroll(json!({
            "queue": address(queue),
            "target_url": target,
            "delivery": {"retry": {"max_attempts": 1}, "circuit_breaker": {"failure_threshold": 0},
                         "max_hold_ms": 0}
        }))
        .await;
    e["id"].as_str().expect("id").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_messages_arrive_once_each_in_order() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let mgmt = Management::new();
    let queue = unique("order");
    mgmt.declare_quorum(&queue).await;
    let target = Target::start().await;
    let (_dir, db) = temp_db();
    let daemon = Daemon::start(&db).await;
    let id = daemon.api.enroll_active(&queue, &target.url()).await;

    let mut publisher = Publisher::connect(&queue).await;
    let started = Instant::now();
    publisher.send_numbered("m", 0..1000).await;
    wait_for("1000 POSTs", Duration::from_secs(60), || async {
        (target.count() >= 1000).then_some(())
    })
    .await;
    let elapsed = started.elapsed();
    println!(
        "1000 messages published and pushed in {elapsed:?} ({:.0} msg/s end to end)",
        1000.0 / elapsed.as_secs_f64()
    );
    mgmt.wait_depth(&queue, 0, Duration::from_secs(20)).await;
    // Nothing more trickles in once the queue is empty.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let bodies = target.accepted_bodies();
    let expected: Vec<String> = (0..1000).map(|i| format!("m-{i}")).collect();
    assert_eq!(bodies.len(), 1000, "each message exactly once");
    assert_eq!(bodies, expected, "in publish order");
    let e = daemon.api.enrollment(&id).await;
    assert_eq!(e["delivered"], 1000);
    assert_eq!(e["failed"], 0);
    assert_eq!(
        e["failure_outcome"],
        broker_kind().failure_outcome(),
        "RabbitMQ 3.x advertises no modified, 4.0 does"
    );
    publisher.close().await;
    daemon.stop().await;
    mgmt.delete_queue(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_target_sends_the_message_to_the_dead_letter_queue_after_the_limit() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let mgmt = Management::new();
    let queue = unique("dlq");
    let limit = 3;
    let dlq = mgmt.declare_with_dead_letter(&queue, limit).await;
    let target = Target::start().await;
    target.set_status(503);
    let (_dir, db) = temp_db();
    let daemon = Daemon::start(&db).await;
    let id = enroll_handing_back_at_once(&daemon.api, &queue, &target.url()).await;

    let mut publisher = Publisher::connect(&queue).await;
    publisher.send_numbered("doomed", 0..1).await;
    mgmt.wait_depth(&dlq, 1, Duration::from_secs(30)).await;
    mgmt.wait_depth(&queue, 0, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let seen = target.received();
    assert_eq!(
        seen.len(),
        (limit + 1) as usize,
        "the target sees the message limit + 1 times"
    );
    assert!(seen.iter().all(|r| r.text() == "doomed-0"));
    let e = daemon.api.enrollment(&id).await;
    assert_eq!(e["failed"], limit + 1);
    assert_eq!(e["delivered"], 0);
    assert!(e["last_error"].as_str().is_some_and(|s| s.contains("503")));
    publisher.close().await;
    daemon.stop().await;
    mgmt.delete_queue(&queue).await;
    mgmt.delete_queue(&dlq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_while_the_target_refuses_connections() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let mgmt = Management::new();
    let queue = unique("down");
    mgmt.declare_classic(&queue).await;
    let mut target = Target::start().await;
    let (_dir, db) = temp_db();
    let daemon = Daemon::start(&db).await;
    let id = enroll_handing_back_at_once(&daemon.api, &queue, &target.url()).await;
    daemon
        .api
        .wait_state(&id, "active", Duration::from_secs(20))
        .await;

    target.stop().await;
    let mut publisher = Publisher::connect(&queue).await;
    publisher.send_numbered("d", 0..20).await;
    wait_for("failed deliveries", Duration::from_secs(20), || async {
        let e = daemon.api.enrollment(&id).await;
        (e["failed"].as_u64() >= Some(5)).then_some(())
    })
    .await;
    assert_eq!(target.count(), 0);
    target.restart().await;
    wait_for("all 20 accepted", Duration::from_secs(30), || async {
        let mut bodies = target.accepted_bodies();
        bodies.sort();
        bodies.dedup();
        (bodies.len() == 20).then_some(())
    })
    .await;
    mgmt.wait_depth(&queue, 0, Duration::from_secs(20)).await;
    let mut bodies = target.accepted_bodies();
    bodies.sort();
    let mut expected: Vec<String> = (0..20).map(|i| format!("d-{i}")).collect();
    expected.sort();
    assert_eq!(bodies, expected, "every message accepted exactly once");
    publisher.close().await;
    daemon.stop().await;
    mgmt.delete_queue(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_stops_one_enrollment_and_leaves_the_others_flowing() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let mgmt = Management::new();
    let (gone_q, kept_q) = (unique("gone"), unique("kept"));
    mgmt.declare_classic(&gone_q).await;
    mgmt.declare_classic(&kept_q).await;
    let gone_target = Target::start().await;
    let kept_target = Target::start().await;
    let (_dir, db) = temp_db();
    let daemon = Daemon::start(&db).await;
    let gone = daemon.api.enroll_queue(&gone_q, &gone_target.url()).await;
    let kept = daemon.api.enroll_queue(&kept_q, &kept_target.url()).await;
    for id in [&gone, &kept] {
        daemon
            .api
            .wait_state(id, "active", Duration::from_secs(20))
            .await;
    }
    let mut gone_pub = Publisher::connect(&gone_q).await;
    let mut kept_pub = Publisher::connect(&kept_q).await;
    gone_pub.send_numbered("g", 0..5).await;
    wait_for("5 POSTs before delete", Duration::from_secs(20), || async {
        (gone_target.count() == 5).then_some(())
    })
    .await;

    assert_eq!(daemon.api.delete(&gone).await, 204);
    let (status, _) = daemon.api.get(&format!("/enrollments/{gone}")).await;
    assert_eq!(status, 404);
    assert_eq!(daemon.api.delete(&gone).await, 404, "second delete");

    gone_pub.send_numbered("g-after", 0..10).await;
    kept_pub.send_numbered("k", 0..10).await;
    wait_for(
        "the kept enrollment to flow",
        Duration::from_secs(20),
        || async { (kept_target.count() == 10).then_some(()) },
    )
    .await;
    // The deleted enrollment's messages stay in the broker, untouched.
    mgmt.wait_depth(&gone_q, 10, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(gone_target.count(), 5, "no POST after DELETE");
    let (_, list) = daemon.api.get("/enrollments").await;
    let ids: Vec<&str> = list
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|e| e["id"].as_str())
        .collect();
    assert_eq!(ids, vec![kept.as_str()]);
    gone_pub.close().await;
    kept_pub.close().await;
    daemon.stop().await;
    mgmt.delete_queue(&gone_q).await;
    mgmt.delete_queue(&kept_q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_hands_back_the_message_in_flight() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let mgmt = Management::new();
    let queue = unique("inflight");
    mgmt.declare_classic(&queue).await;
    let silent = HangingTarget::start().await;
    let silent_url = silent.url.clone();
    let (_dir, db) = temp_db();
    let daemon = Daemon::start(&db).await;
    let id = daemon.api.enroll_active(&queue, &silent_url).await;
    let mut publisher = Publisher::connect(&queue).await;
    publisher.send_numbered("held", 0..1).await;
    // The message is in hand (unacknowledged) while the POST hangs.
    wait_for(
        "the message to be in flight",
        Duration::from_secs(10),
        || async {
            let info = mgmt.queue_info(&queue).await?;
            (info["messages_unacknowledged"].as_u64() == Some(1)).then_some(())
        },
    )
    .await;
    let started = Instant::now();
    assert_eq!(daemon.api.delete(&id).await, 204);
    assert!(started.elapsed() < Duration::from_secs(3));
    wait_for(
        "the message to be ready again",
        Duration::from_secs(10),
        || async {
            let info = mgmt.queue_info(&queue).await?;
            (info["messages_ready"].as_u64() == Some(1)).then_some(())
        },
    )
    .await;
    drop(silent);
    publisher.close().await;
    daemon.stop().await;
    mgmt.delete_queue(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_metadata_arrives_as_headers() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let mgmt = Management::new();
    let queue = unique("meta");
    mgmt.declare_classic(&queue).await;
    let target = Target::start().await;
    let (_dir, db) = temp_db();
    let daemon = Daemon::start(&db).await;
    let id = daemon.api.enroll_active(&queue, &target.url()).await;

    let mut publisher = Publisher::connect(&queue).await;
    let body = json!({"order": 17, "items": ["a", "b"]}).to_string();
    let message = Message::builder()
        .properties(
            Properties::builder()
                .message_id("msg-17".to_string())
                .correlation_id("corr-9".to_string())
                .subject("order.created")
                .reply_to("/queue/replies")
                .content_type("application/json")
                .build(),
        )
        .application_properties(
            ApplicationProperties::builder()
                .insert("tenant", "acme")
                .insert("priority", 5)
                .build(),
        )
        .data(body.clone().into_bytes())
        .build();
    publisher.send(message).await;
    let got = wait_for("the POST", Duration::from_secs(20), || async {
        target.received().into_iter().next()
    })
    .await;
    assert_eq!(got.text(), body);
    assert_eq!(got.header("content-type"), Some("application/json"));
    assert_eq!(got.header("amqp-message-id"), Some("msg-17"));
    assert_eq!(got.header("amqp-correlation-id"), Some("corr-9"));
    assert_eq!(got.header("amqp-subject"), Some("order.created"));
    assert_eq!(got.header("amqp-reply-to"), Some("/queue/replies"));
    assert_eq!(got.header("amqp-delivery-count"), Some("0"));
    assert_eq!(got.header("hot-potato-enrollment-id"), Some(id.as_str()));
    assert_eq!(got.header("amqp-app-tenant"), Some("acme"));
    assert_eq!(got.header("amqp-app-priority"), Some("5"));
    publisher.close().await;
    daemon.stop().await;
    mgmt.delete_queue(&queue).await;
}
