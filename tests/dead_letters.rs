//! Dead letters as a source, and the failure outcome as the broker counts it. Part of the
//! broker matrix (`scripts/test.sh` runs it against RabbitMQ 3.10 and 4.0, see
//! [`BrokerKind`]): a message handed back until the queue's delivery limit lands in the
//! dead-letter queue, and an enrollment on that queue receives it with the broker's death
//! annotations as headers. RabbitMQ 4.0 encodes `x-opt-deaths` as an AMQP array of maps,
//! which the unpatched decoder could not read (the message was rejected and lost). On 4.0
//! the dead-letter queue is enrolled by its v2 address, `/queues/NAME`.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_queue_enrollment_receives_dead_letters_with_their_death_annotations() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let kind = broker_kind();
    let mgmt = Management::new();
    let queue = unique("deaths");
    let limit = 2;
    let dlq = mgmt.declare_with_dead_letter(&queue, limit).await;
    let failing = Target::start().await;
    failing.set_status(500);
    let alerts = Target::start().await;
    let (_dir, db) = temp_db();
    let daemon = Daemon::start(&db).await;
    let source = daemon
        .api
        .enroll(json!({
            "queue": address(&queue),
            "target_url": failing.url(),
            "delivery": {"retry": {"max_attempts": 1}, "circuit_breaker": {"failure_threshold": 0},
                         "max_hold_ms": 0}
        }))
        .await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    // On RabbitMQ 4 the dead-letter queue is enrolled by its v2 address.
    let dlq_address = match kind {
        BrokerKind::RabbitMq4 => format!("/queues/{dlq}"),
        BrokerKind::RabbitMq3 => address(&dlq),
    };
    let watcher = daemon
        .api
        .enroll(json!({"queue": dlq_address, "target_url": alerts.url()}))
        .await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    daemon
        .api
        .wait_state(&watcher, "active", Duration::from_secs(20))
        .await;

    let mut publisher = Publisher::connect(&queue).await;
    publisher.send_numbered("poison", 0..3).await;
    wait_for(
        "three dead letters POSTed",
        Duration::from_secs(60),
        || async { (alerts.count() >= 3).then_some(()) },
    )
    .await;
    mgmt.wait_depth(&dlq, 0, Duration::from_secs(20)).await;

    let dead = alerts.received();
    let mut bodies: Vec<String> = dead.iter().map(|r| r.text()).collect();
    bodies.sort();
    assert_eq!(bodies, ["poison-0", "poison-1", "poison-2"]);
    // Each was tried limit + 1 times at the failing target.
    let tries = failing.received();
    assert_eq!(
        tries.len(),
        3 * (limit as usize + 1),
        "tries at the failing target"
    );
    let counts: Vec<&str> = tries
        .iter()
        .filter(|r| r.text() == "poison-0")
        .map(|r| r.header("amqp-delivery-count").unwrap_or("absent"))
        .collect();
    println!("[{kind:?}] delivery counts of poison-0 at the failing target: {counts:?}");
    match kind {
        // `modified{delivery_failed}` is counted in the message's own header.
        BrokerKind::RabbitMq4 => assert_eq!(counts, ["0", "1", "2"]),
        // `released` leaves the header at 0; the quorum queue counts the returns itself.
        BrokerKind::RabbitMq3 => assert_eq!(counts, ["0", "0", "0"]),
    }

    let first = &dead[0];
    let mut annotations: Vec<(String, String)> = first
        .headers
        .iter()
        .filter(|(name, _)| name.as_str().starts_with("amqp-annotation-"))
        .map(|(name, value)| {
            (
                name.to_string(),
                value.to_str().unwrap_or("<not text>").to_owned(),
            )
        })
        .collect();
    annotations.sort();
    println!("[{kind:?}] a dead letter's annotation headers: {annotations:#?}");
    match kind {
        BrokerKind::RabbitMq4 => {
            let deaths: Value = serde_json::from_str(
                first
                    .header("amqp-annotation-x-opt-deaths")
                    .expect("x-opt-deaths header"),
            )
            .expect("x-opt-deaths is JSON");
            let death = &deaths[0];
            assert_eq!(death["reason"], "delivery_limit", "{deaths}");
            assert_eq!(death["queue"], queue.as_str(), "{deaths}");
            assert_eq!(
                first.header("amqp-annotation-x-first-death-reason"),
                Some("delivery_limit")
            );
            assert_eq!(
                first.header("amqp-annotation-x-first-death-queue"),
                Some(queue.as_str())
            );
        }
        // RabbitMQ 3.10's AMQP 1.0 plugin sends no annotations for a dead letter: whatever it
        // sends is passed on, and nothing is required.
        BrokerKind::RabbitMq3 => {}
    }

    let e = daemon.api.enrollment(&watcher).await;
    assert_eq!(e["delivered"], 3, "{e}");
    assert_eq!(
        e["rejected"], 0,
        "no dead letter refused as undecodable: {e}"
    );
    let s = daemon.api.enrollment(&source).await;
    assert_eq!(s["failure_outcome"], kind.failure_outcome(), "{s}");
    publisher.close().await;
    daemon.stop().await;
    mgmt.delete_queue(&queue).await;
    mgmt.delete_queue(&dlq).await;
}
