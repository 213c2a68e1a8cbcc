//! The broker restarted under a running daemon. Alone in its own test binary: stopping the
//! broker would break any test running beside it, and cargo runs test binaries one by one.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn rabbitmqctl(action: &str) {
    let status = Command::new("rabbitmqctl")
        .arg(action)
        .status()
        .expect("rabbitmqctl runs");
    assert!(status.success(), "rabbitmqctl {action} failed");
}

/// Starts the broker app again even when an assertion fails mid-test.
struct RestartGuard;

impl Drop for RestartGuard {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").arg("start_app").status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_reconnects_after_a_broker_restart_and_loses_nothing() {
    let mgmt = Management::new();
    let queue = unique("brokerrestart");
    mgmt.declare_quorum(&queue).await;
    let target = Target::start().await;
    let (_dir, db) = temp_db();
    let daemon = Daemon::start(&db).await;
    let id = daemon.api.enroll_queue(&queue, &target.url()).await;
    daemon
        .api
        .wait_state(&id, "active", Duration::from_secs(20))
        .await;

    let mut publisher = Publisher::connect(&queue).await;
    publisher.send_numbered("r", 0..500).await;
    publisher.close().await;
    wait_for(
        "deliveries before the restart",
        Duration::from_secs(30),
        || async { (target.accepted_bodies().len() == 500).then_some(()) },
    )
    .await;

    let guard = RestartGuard;
    rabbitmqctl("stop_app");
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
    // Right after start the queue may not take publishes yet: retry the connect.
    let mut publisher = wait_for(
        "the broker to take publishers",
        Duration::from_secs(30),
        || async {
            tokio::time::timeout(Duration::from_secs(5), async {
                tokio::spawn({
                    let queue = queue.clone();
                    async move { Publisher::connect(&queue).await }
                })
                .await
                .ok()
            })
            .await
            .ok()
            .flatten()
        },
    )
    .await;
    publisher.send_numbered("r", 500..1000).await;
    wait_for("all 1000 delivered", Duration::from_secs(60), || async {
        let mut bodies = target.accepted_bodies();
        bodies.sort();
        bodies.dedup();
        (bodies.len() == 1000).then_some(())
    })
    .await;
    mgmt.wait_depth(&queue, 0, Duration::from_secs(30)).await;
    publisher.close().await;
    daemon.stop().await;
    mgmt.delete_queue(&queue).await;
}
