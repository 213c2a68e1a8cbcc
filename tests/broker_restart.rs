//! The broker restarted under a running daemon. Alone in its own test binary: stopping the
//! broker would break any test running beside it, and cargo runs test binaries one by one.

mod common;

use std::time::Duration;

use common::*;

fn rabbitmqctl(action: &str) {
    let status = broker_kind()
        .rabbitmqctl()
        .arg(action)
        .status()
        .expect("rabbitmqctl runs");
    assert!(status.success(), "rabbitmqctl {action} failed");
}

/// Starts the broker app again even when an assertion fails mid-test.
struct RestartGuard;

impl Drop for RestartGuard {
    fn drop(&mut self) {
        let _ = broker_kind().rabbitmqctl().arg("start_app").status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_reconnects_after_a_broker_restart_and_loses_nothing() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let mgmt = Management::new();
    let queue = unique("brokerrestart");
    mgmt.declare_quorum(&queue).await;
    let target = Target::start().await;
    let (_dir, db) = temp_db();
    let daemon = Daemon::start(&db).await;
    let id = daemon.api.enroll_active(&queue, &target.url()).await;

    // Ten thousand numbered messages; the broker goes down while they flow.
    let n = 10_000;
    let mut publisher = Publisher::connect(&queue).await;
    publisher.send_numbered("r", 0..n).await;
    publisher.close().await;
    wait_for(
        "deliveries before the restart",
        Duration::from_secs(60),
        || async { (target.count() >= n / 5).then_some(()) },
    )
    .await;

    let guard = RestartGuard;
    let at_stop = target.count();
    let stop_started = std::time::Instant::now();
    rabbitmqctl("stop_app");
    let before = target.count();
    println!(
        "stop_app took {:?}; {} POSTs while it ran",
        stop_started.elapsed(),
        before - at_stop
    );
    let down = daemon
        .api
        .wait_state(&id, "backoff", Duration::from_secs(30))
        .await;
    assert!(down["last_error"].is_string(), "{down}");
    rabbitmqctl("start_app");
    std::mem::forget(guard);

    daemon
        .api
        .wait_state(&id, "active", Duration::from_secs(60))
        .await;
    let counts = wait_for("all 10000 accepted", Duration::from_secs(120), || async {
        let mut seen = std::collections::HashMap::<String, usize>::new();
        for body in target.accepted_bodies() {
            *seen.entry(body).or_default() += 1;
        }
        (seen.len() == n).then_some(seen)
    })
    .await;
    let expected: std::collections::HashSet<String> = (0..n).map(|i| format!("r-{i}")).collect();
    assert!(counts.keys().all(|k| expected.contains(k)));
    let duplicates: usize = counts.values().map(|c| c - 1).sum();
    println!("broker stopped after {before} POSTs: all {n} accepted, {duplicates} duplicates");
    // RabbitMQ 3.10 keeps delivering for several seconds while `stop_app` runs but does not
    // apply the accepts it gets in that window (measured here: all of them come back). So
    // the bound is what was in flight when the broker stopped taking accepts: the POSTs made
    // during stop_app plus the credit and the one in hand.
    let window = before - at_stop;
    assert!(
        duplicates <= window + 201,
        "{duplicates} duplicates, {window} POSTs during stop_app"
    );
    mgmt.wait_depth(&queue, 0, Duration::from_secs(30)).await;
    daemon.stop().await;
    mgmt.delete_queue(&queue).await;
}
