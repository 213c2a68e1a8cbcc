//! The daemon as a process: killed with SIGKILL mid-stream and started again on the same
//! SQLite file, and stopped with SIGTERM.

mod common;

use std::process::{Child, Command};
use std::time::Duration;

use common::*;

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().to_string())
        .status()
        .expect("kill runs");
    assert!(status.success());
}

async fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon did not exit within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_daemon_resumes_from_its_file_and_loses_nothing() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let mgmt = Management::new();
    let queue = unique("kill");
    mgmt.declare_quorum(&queue).await;
    let target = Target::start().await;
    let (_dir, db) = temp_db();
    let port = free_port();
    let api = Api::new(&format!("http://127.0.0.1:{port}"));

    let mut child = spawn_daemon(&db, port, None, &[]);
    api.wait_healthy().await;
    let id = api.enroll_queue(&queue, &target.url()).await;
    let mut publisher = Publisher::connect(&queue).await;
    publisher.send_numbered("k", 0..2000).await;
    wait_for(
        "some deliveries before the kill",
        Duration::from_secs(30),
        || async { (target.count() >= 100).then_some(()) },
    )
    .await;
    signal(&child, "KILL");
    let status = wait_exit(&mut child, Duration::from_secs(10)).await;
    assert!(!status.success());
    let before = target.accepted_bodies().len();
    publisher.send_numbered("k", 2000..3000).await;

    let mut child = spawn_daemon(&db, port, None, &[]);
    api.wait_healthy().await;
    let back = api.enrollment(&id).await;
    assert_eq!(back["queue"], address(&queue));
    wait_for("all 3000 delivered", Duration::from_secs(90), || async {
        let mut bodies = target.accepted_bodies();
        bodies.sort();
        bodies.dedup();
        (bodies.len() == 3000).then_some(())
    })
    .await;
    mgmt.wait_depth(&queue, 0, Duration::from_secs(20)).await;
    let accepted = target.accepted_bodies().len();
    println!(
        "kill -9 after {before} POSTs; {} duplicates after restart",
        accepted - 3000
    );
    // Duplicates are bounded by what the killed daemon held unsettled (its prefetch).
    assert!(accepted - 3000 <= 200 + 1, "{} duplicates", accepted - 3000);

    signal(&child, "TERM");
    let status = wait_exit(&mut child, Duration::from_secs(20)).await;
    assert!(status.success(), "SIGTERM exits 0, got {status:?}");
    publisher.close().await;
    mgmt.delete_queue(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_post_in_flight_finish_and_exits_zero() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let mgmt = Management::new();
    let queue = unique("term");
    mgmt.declare_classic(&queue).await;
    // A target that takes 1.5 s to answer 200.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let slow_url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = hits.clone();
    let app = axum::Router::new().fallback(move || {
        let counter = counter.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            "ok"
        }
    });
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let (_dir, db) = temp_db();
    let port = free_port();
    let api = Api::new(&format!("http://127.0.0.1:{port}"));
    let mut child = spawn_daemon(&db, port, None, &[]);
    api.wait_healthy().await;
    api.enroll_active(&queue, &slow_url).await;
    let mut publisher = Publisher::connect(&queue).await;
    publisher.send_numbered("t", 0..3).await;
    wait_for("a POST in flight", Duration::from_secs(10), || async {
        let info = mgmt.queue_info(&queue).await?;
        (info["messages_unacknowledged"].as_u64() >= Some(1)).then_some(())
    })
    .await;
    signal(&child, "TERM");
    let status = wait_exit(&mut child, Duration::from_secs(20)).await;
    assert!(status.success(), "exit 0 after SIGTERM, got {status:?}");
    let finished = hits.load(std::sync::atomic::Ordering::SeqCst);
    assert!(finished >= 1, "the in-flight POST completed");
    // What was accepted is gone; the rest is back in the queue, none lost.
    mgmt.wait_depth(&queue, (3 - finished) as u64, Duration::from_secs(20))
        .await;
    server.abort();
    publisher.close().await;
    mgmt.delete_queue(&queue).await;
}
