//! No stall, no loss, against the real broker: a poison message reaches the dead-letter queue
//! while the messages behind it flow; an unavailable target holds messages (shown as `held`)
//! and dead-letters nothing; a breaker open across a reconnect recovers.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

/// 500 for the poison message, 200 for the rest.
fn poison_rule(body: &str) -> u16 {
    if body.contains("poison") { 500 } else { 200 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_is_dead_lettered_and_the_messages_behind_it_flow() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let mgmt = Management::new();
    let queue = unique("poison");
    // The broker hands the message out 3 times (delivery limit 2), then dead-letters it.
    let dlq = mgmt.declare_with_dead_letter(&queue, 2).await;
    let target = Target::start().await;
    target.set_status_by_body(poison_rule);
    let (_dir, db) = temp_db();
    let daemon = Daemon::start(&db).await;
    // Default settings (5 attempts, breaker on), with the backoff shortened to keep the test
    // short: the rule, not the timing, is under test.
    let id = enroll_active_with(
        &daemon.api,
        &queue,
        &target.url(),
        json!({"retry": {"base_ms": 20, "max_ms": 100}}),
    )
    .await;

    let mut publisher = Publisher::connect(&queue).await;
    publisher.send_numbered("before", 0..3).await;
    publisher
        .send(fe2o3_amqp::types::messaging::Message::from(
            "poison".to_string(),
        ))
        .await;
    publisher.send_numbered("after", 0..20).await;

    mgmt.wait_depth(&dlq, 1, Duration::from_secs(60)).await;
    wait_for("the 23 good messages", Duration::from_secs(60), || async {
        (distinct_accepted(&target) == 23).then_some(())
    })
    .await;
    mgmt.wait_depth(&queue, 0, Duration::from_secs(20)).await;
    let poison_posts = target
        .received()
        .iter()
        .filter(|r| r.text() == "poison")
        .count();
    // 3 deliveries of 5 counted attempts each; none uncounted (the breaker never opened on
    // answers from a live target).
    assert_eq!(poison_posts, 15, "every attempt counted");
    let e = daemon.api.enrollment(&id).await;
    assert_eq!(e["failed"], 3, "{e}");
    assert_eq!(e["delivered"], 23, "{e}");
    assert_eq!(e["breaker_state"], "closed", "{e}");
    assert_eq!(e["held"], 0, "{e}");
    publisher.close().await;
    daemon.stop().await;
    mgmt.delete_queue(&queue).await;
    mgmt.delete_queue(&dlq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unavailable_target_holds_messages_and_dead_letters_nothing() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let mgmt = Management::new();
    let queue = unique("held");
    let dlq = mgmt.declare_with_dead_letter(&queue, 2).await;
    let target = Target::start().await;
    target.set_status(503);
    let (_dir, db) = temp_db();
    let daemon = Daemon::start(&db).await;
    let id = enroll_active_with(
        &daemon.api,
        &queue,
        &target.url(),
        json!({"max_in_flight": 4, "retry": {"base_ms": 20, "max_ms": 200},
               "circuit_breaker": {"failure_threshold": 5, "open_ms": 300}}),
    )
    .await;
    let mut publisher = Publisher::connect(&queue).await;
    publisher.send_numbered("h", 0..30).await;

    let held = wait_for("messages held", Duration::from_secs(20), || async {
        let e = daemon.api.enrollment(&id).await;
        (e["held"].as_u64().unwrap_or(0) > 0).then_some(e)
    })
    .await;
    assert!(
        held["held_reason"]
            .as_str()
            .is_some_and(|r| r.contains("503")),
        "{held}"
    );
    wait_for("the breaker to open", Duration::from_secs(20), || async {
        let e = daemon.api.enrollment(&id).await;
        (e["breaker_state"] != "closed").then_some(())
    })
    .await;
    // Well past what 5 counted attempts with this backoff would take: still nothing handed back.
    tokio::time::sleep(Duration::from_secs(3)).await;
    mgmt.wait_depth(&dlq, 0, Duration::from_secs(5)).await;
    assert_eq!(daemon.api.enrollment(&id).await["failed"], 0);

    target.set_status(200);
    wait_for("all 30 delivered", Duration::from_secs(60), || async {
        (distinct_accepted(&target) == 30).then_some(())
    })
    .await;
    mgmt.wait_depth(&queue, 0, Duration::from_secs(20)).await;
    let e = wait_for("nothing held", Duration::from_secs(10), || async {
        let e = daemon.api.enrollment(&id).await;
        (e["held"] == 0 && e["in_flight"] == 0).then_some(e)
    })
    .await;
    assert_eq!(e["failed"], 0, "{e}");
    assert!(e["held_reason"].is_null(), "{e}");
    mgmt.wait_depth(&dlq, 0, Duration::from_secs(5)).await;
    publisher.close().await;
    daemon.stop().await;
    mgmt.delete_queue(&queue).await;
    mgmt.delete_queue(&dlq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breaker_open_across_a_reconnect_recovers_with_messages_in_hand() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let mgmt = Management::new();
    let queue = unique("reconnect");
    let dlq = mgmt.declare_with_dead_letter(&queue, 5).await;
    let target = Target::start().await;
    target.set_status(503);
    // The daemon reaches the broker through a proxy whose connections the test can cut.
    let proxy = hot_potato_testkit::proxy::Proxy::start(broker_addr().parse().expect("addr"))
        .await
        .expect("proxy");
    let amqp_url = format!("amqp://guest:guest@{}", proxy.addr());
    let (_dir, db) = temp_db();
    let daemon = Daemon::start_with(&db, &[("AMQP_URL", &amqp_url)]).await;
    let id = enroll_active_with(
        &daemon.api,
        &queue,
        &target.url(),
        json!({"max_in_flight": 4, "retry": {"base_ms": 20, "max_ms": 100},
               "circuit_breaker": {"failure_threshold": 3, "open_ms": 500}}),
    )
    .await;
    let mut publisher = Publisher::connect(&queue).await;
    publisher.send_numbered("r", 0..3).await;
    wait_for("the breaker to open", Duration::from_secs(20), || async {
        let e = daemon.api.enrollment(&id).await;
        (e["breaker_state"] != "closed").then_some(())
    })
    .await;

    wait_for(
        "the 3 messages in hand",
        Duration::from_secs(20),
        || async {
            let e = daemon.api.enrollment(&id).await;
            (e["held"] == 3).then_some(())
        },
    )
    .await;
    // Drop the daemon's broker connection: the link goes with the 3 messages in hand.
    proxy.cut();
    wait_for("the link down", Duration::from_secs(20), || async {
        let e = daemon.api.enrollment(&id).await;
        (e["state"] != "active").then_some(())
    })
    .await;
    wait_for("a new link", Duration::from_secs(30), || async {
        let e = daemon.api.enrollment(&id).await;
        (e["state"] == "active").then_some(())
    })
    .await;
    target.set_status(200);
    wait_for("all 3 delivered", Duration::from_secs(30), || async {
        (distinct_accepted(&target) == 3).then_some(())
    })
    .await;
    let e = wait_for("the breaker closed", Duration::from_secs(10), || async {
        let e = daemon.api.enrollment(&id).await;
        (e["breaker_state"] == "closed" && e["in_flight"] == 0).then_some(e)
    })
    .await;
    assert_eq!(e["state"], "active", "{e}");
    assert_eq!(e["failed"], 0, "{e}");
    mgmt.wait_depth(&queue, 0, Duration::from_secs(10)).await;
    mgmt.wait_depth(&dlq, 0, Duration::from_secs(5)).await;
    publisher.close().await;
    daemon.stop().await;
    mgmt.delete_queue(&queue).await;
    mgmt.delete_queue(&dlq).await;
}
