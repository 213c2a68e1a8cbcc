//! The whole daemon (API, registry, supervisor, worker, real AMQP link) against the test kit's
//! in-memory AMQP peer over loopback TCP, frames asserted: only DELETE closes a link; a DELETE
//! closes a durable subscription even with no link up (paused, or broker refusing), listing it
//! as pending until it can; shutdown abandons a hanging POST before its deadline and still
//! detaches; a half-open breaker grants one credit when nothing is in hand, so it can probe.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use axum::http::StatusCode;
use common::*;
use fe2o3_amqp::types::definitions::{self, AmqpError};
use fe2o3_amqp::types::messaging::DeliveryState;
use hot_potato_testkit::peer::{ClientFrame, Fault, Peer, PeerConfig, SourceAnswer, TestMessage};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(15);

async fn peer_daemon(extra: &[(&str, &str)]) -> (Peer, Daemon, tempfile::TempDir) {
    let peer = Peer::start(PeerConfig::default().with_source(SourceAnswer::artemis()));
    let addr = peer.listen().await.expect("peer listens");
    let url = format!("amqp://{addr}");
    let (dir, db) = temp_db();
    let mut env: Vec<(&str, &str)> = vec![("AMQP_URL", &url), ("RECONNECT_MAX_MS", "300")];
    env.extend_from_slice(extra);
    let daemon = Daemon::start_with(&db, &env).await;
    (peer, daemon, dir)
}

fn closed_flags(peer: &Peer) -> Vec<bool> {
    peer.detaches().iter().map(|d| d.closed).collect()
}

/// A target whose status the test sets.
async fn settable_target(status: Arc<AtomicU16>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = axum::Router::new()
        .route(
            "/hook",
            axum::routing::post(
                |axum::extract::State(s): axum::extract::State<Arc<AtomicU16>>| async move {
                    StatusCode::from_u16(s.load(Ordering::SeqCst))
                        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
                },
            ),
        )
        .with_state(status);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}/hook")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_shutdown_detach_and_only_delete_closes() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let (peer, daemon, _dir) = peer_daemon(&[]).await;
    let target = Target::start().await;
    let durable = json!({"durable": true});
    let e = daemon
        .api
        .enroll(
            json!({"queue": "orders", "target_url": target.url(), "subscription_args": durable}),
        )
        .await;
    let id = e["id"].as_str().expect("id").to_string();
    daemon.api.wait_state(&id, "active", WAIT).await;

    let (status, _) = daemon
        .api
        .post_empty(&format!("/enrollments/{id}/pause"))
        .await;
    assert_eq!(status, 200);
    peer.wait_for(WAIT, |f| f.iter().any(|f| f.as_detach().is_some()))
        .await
        .expect("pause detaches");
    assert_eq!(closed_flags(&peer), [false], "pause keeps the subscription");

    let (status, _) = daemon
        .api
        .post_empty(&format!("/enrollments/{id}/resume"))
        .await;
    assert_eq!(status, 200);
    daemon.api.wait_state(&id, "active", WAIT).await;
    peer.send("orders", TestMessage::text("m1").id("m1"));
    wait_for("m1 posted", WAIT, || async {
        (target.count() == 1).then_some(())
    })
    .await;

    // Paused, then deleted: no worker, no link; the subscription is closed all the same.
    let (status, _) = daemon
        .api
        .post_empty(&format!("/enrollments/{id}/pause"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(daemon.api.delete(&id).await, 204);
    peer.wait_for(WAIT, |f| {
        f.iter().filter_map(|f| f.as_detach()).any(|d| d.closed)
    })
    .await
    .expect("the deleted enrollment's subscription is closed");
    assert_eq!(closed_flags(&peer), [false, false, true]);

    // Shutdown of another enrollment: detached, not closed.
    let e = daemon
        .api
        .enroll(json!({"queue": "audit", "target_url": target.url(), "subscription_args": {"durable": true}}))
        .await;
    let other = e["id"].as_str().expect("id").to_string();
    daemon.api.wait_state(&other, "active", WAIT).await;
    daemon.stop().await;
    let flags = closed_flags(&peer);
    assert_eq!(flags, [false, false, true, false], "shutdown detaches");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_while_the_broker_refuses_is_pending_until_it_can_close() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let (peer, daemon, _dir) = peer_daemon(&[]).await;
    let target = Target::start().await;
    let e = daemon
        .api
        .enroll(json!({"queue": "orders", "target_url": target.url(), "subscription_args": {"durable": true}}))
        .await;
    let id = e["id"].as_str().expect("id").to_string();
    daemon.api.wait_state(&id, "active", WAIT).await;
    let (status, _) = daemon
        .api
        .post_empty(&format!("/enrollments/{id}/pause"))
        .await;
    assert_eq!(status, 200);

    peer.arm_always(Fault::RefuseAttach {
        address: None,
        error: definitions::Error::new(AmqpError::ResourceLocked, Some("busy".to_string()), None),
    });
    assert_eq!(daemon.api.delete(&id).await, 204);
    let stats = wait_for("a pending close", WAIT, || async {
        let (_, stats) = daemon.api.get("/stats").await;
        (stats["pending_closes"]
            .as_array()
            .is_some_and(|p| !p.is_empty()))
        .then_some(stats)
    })
    .await;
    assert_eq!(stats["pending_closes"][0]["id"], id.as_str(), "{stats}");
    assert!(
        stats["pending_closes"][0]["last_error"].is_string(),
        "{stats}"
    );

    peer.disarm();
    wait_for("the close to go through", WAIT, || async {
        let (_, stats) = daemon.api.get("/stats").await;
        (stats["pending_closes"]
            .as_array()
            .is_some_and(|p| p.is_empty()))
        .then_some(())
    })
    .await;
    assert_eq!(closed_flags(&peer).last(), Some(&true));
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_abandons_a_hanging_post_in_time_and_still_detaches() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let (peer, daemon, _dir) = peer_daemon(&[("SHUTDOWN_GRACE_MS", "2000")]).await;
    let hanging = HangingTarget::start().await;
    let e = daemon
        .api
        .enroll(json!({"queue": "orders", "target_url": hanging.url,
                      "subscription_args": {"durable": true},
                      "delivery": {"timeout_ms": 60000}}))
        .await;
    let id = e["id"].as_str().expect("id").to_string();
    daemon.api.wait_state(&id, "active", WAIT).await;
    peer.send("orders", TestMessage::text("stuck").id("stuck"));
    wait_for("the POST under way", WAIT, || async {
        (daemon.api.enrollment(&id).await["in_flight"] == 1).then_some(())
    })
    .await;
    let started = std::time::Instant::now();
    daemon.stop().await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(4), "shutdown took {took:?}");
    let dispositions = peer.dispositions();
    assert_eq!(dispositions.len(), 1, "{dispositions:?}");
    assert!(
        matches!(dispositions[0].state, Some(DeliveryState::Released(_))),
        "the abandoned POST's message is released: {dispositions:?}"
    );
    assert_eq!(closed_flags(&peer), [false], "detached, not closed");
    assert_eq!(peer.queued("orders"), 1, "the message is back in the queue");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_breaker_grants_one_credit_to_probe_with_nothing_in_hand() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let (peer, daemon, _dir) = peer_daemon(&[]).await;
    let status = Arc::new(AtomicU16::new(503));
    let url = settable_target(Arc::clone(&status)).await;
    // Unavailable once: held up to 50 ms, then handed back; the breaker opens on the first
    // unavailable answer and stays open 300 ms.
    let e = daemon
        .api
        .enroll(json!({"queue": "orders", "target_url": url,
            "subscription_args": {"prefetch": 10},
            "delivery": {"max_hold_ms": 50, "retry": {"base_ms": 10, "max_ms": 20},
                         "circuit_breaker": {"failure_threshold": 1, "open_ms": 300}}}))
        .await;
    let id = e["id"].as_str().expect("id").to_string();
    daemon.api.wait_state(&id, "active", WAIT).await;
    peer.send("orders", TestMessage::text("m").id("m"));
    let credit = |f: &ClientFrame, n: u32| {
        f.as_flow()
            .is_some_and(|fl| fl.handle.is_some() && fl.link_credit == Some(n))
    };
    // Handed back (modified) with the breaker open: nothing in hand, credit 0 ...
    peer.wait_for(WAIT, |frames| {
        frames.iter().any(|f| f.as_disposition().is_some()) && frames.iter().any(|f| credit(f, 0))
    })
    .await
    .expect("handed back, credit 0");
    status.store(200, Ordering::SeqCst);
    // ... then the breaker's own timer turns it half-open: one credit, the probe, closed.
    let frames = peer
        .wait_for(WAIT, |frames| {
            let one = frames.iter().position(|f| credit(f, 1));
            // The probe's accept may follow the full credit: accepts are gathered for up to
            // SETTLE_BATCH_DELAY_US.
            let accepted = frames.iter().any(|f| {
                f.as_disposition()
                    .is_some_and(|d| matches!(d.state, Some(DeliveryState::Accepted(_))))
            });
            accepted && one.is_some_and(|one| frames[one..].iter().any(|f| credit(f, 10)))
        })
        .await
        .expect("one credit to probe, then the full credit and the accept");
    let one = frames.iter().position(|f| credit(f, 1)).expect("credit 1");
    let full = frames
        .iter()
        .rposition(|f| credit(f, 10))
        .expect("credit 10");
    assert!(
        one < full,
        "the probe credit comes before the breaker closes"
    );
    let states: Vec<String> = peer
        .dispositions()
        .iter()
        .map(|d| match &d.state {
            Some(DeliveryState::Accepted(_)) => "accepted".to_string(),
            Some(DeliveryState::Modified(_)) => "modified".to_string(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        states.first().map(String::as_str),
        Some("modified"),
        "{states:?}"
    );
    assert_eq!(
        states.last().map(String::as_str),
        Some("accepted"),
        "{states:?}"
    );
    // The status follows the disposition by a hair.
    let e = wait_for("the status counts the probe", WAIT, || async {
        let e = daemon.api.enrollment(&id).await;
        (e["delivered"] == 1).then_some(e)
    })
    .await;
    assert_eq!(e["breaker_state"], "closed", "{e}");
    daemon.stop().await;
}

/// Artemis names a durable subscription's queue after the connection's container id and the
/// link name: both must survive a failed link, a dropped connection and a daemon restart, and
/// none of those may send `detach{closed: true}` (which deletes the subscription). A failed POST
/// is handed back as `modified{delivery_failed: true}`, which Artemis counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_artemis_durable_subscription_keeps_its_names_through_failures_and_restarts() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let peer = Peer::start(PeerConfig::default().with_source(SourceAnswer::artemis()));
    let addr = peer.listen().await.expect("peer listens");
    let url = format!("amqp://{addr}");
    let env = [("AMQP_URL", url.as_str()), ("RECONNECT_MAX_MS", "300")];
    let (_dir, db) = temp_db();
    let daemon = Daemon::start_with(&db, &env).await;
    let status = Arc::new(AtomicU16::new(500));
    let target = settable_target(status.clone()).await;
    let e = daemon
        .api
        .enroll(json!({
            "queue": "events", "target_url": target,
            "subscription_args": {"durable": true, "capabilities": ["topic"]},
            "delivery": {"retry": {"max_attempts": 1}, "circuit_breaker": {"failure_threshold": 0},
                         "max_hold_ms": 0}
        }))
        .await;
    let id = e["id"].as_str().expect("id").to_string();
    let name = format!("hot-potato-{id}");
    daemon.api.wait_state(&id, "active", WAIT).await;

    peer.send("events", TestMessage::text("m-1"));
    peer.wait_for(WAIT, |f| f.iter().any(|f| f.as_disposition().is_some()))
        .await
        .expect("the failed POST's disposition");
    match &peer.dispositions()[0].state {
        Some(DeliveryState::Modified(m)) => {
            assert_eq!(m.delivery_failed, Some(true), "{m:?}");
            assert_ne!(m.undeliverable_here, Some(true), "{m:?}");
        }
        other => panic!("expected modified, got {other:?}"),
    }
    status.store(200, Ordering::SeqCst);

    // The broker fails the link, then drops the connection: each time the link comes back.
    let attaches = |n: usize| {
        move |f: &[ClientFrame]| f.iter().filter(|f| f.as_attach().is_some()).count() >= n
    };
    peer.detach_links(
        Some("events"),
        false,
        Some(definitions::Error::new(
            AmqpError::InternalError,
            Some("queue failed".into()),
            None,
        )),
    );
    peer.wait_for(WAIT, attaches(2))
        .await
        .expect("attached again after the failed link");
    peer.kill_connections();
    peer.wait_for(WAIT, attaches(3))
        .await
        .expect("attached again after the dropped connection");
    daemon.api.wait_state(&id, "active", WAIT).await;

    // The daemon stops and starts again on the same file.
    daemon.stop().await;
    let daemon = Daemon::start_with(&db, &env).await;
    peer.wait_for(WAIT, attaches(4))
        .await
        .expect("attached again after the restart");
    daemon.api.wait_state(&id, "active", WAIT).await;

    let frames = peer.frames();
    let containers: Vec<String> = frames
        .iter()
        .filter_map(|f| match &f.body {
            hot_potato_testkit::peer::FrameBody::Open(open) => Some(open.container_id.clone()),
            _ => None,
        })
        .collect();
    assert!(
        containers.len() >= 3,
        "a connection per start: {containers:?}"
    );
    assert!(containers.iter().all(|c| *c == name), "{containers:?}");
    let attached = peer.attaches();
    assert!(attached.iter().all(|a| a.name == name), "{attached:?}");
    assert!(
        closed_flags(&peer).iter().all(|closed| !closed),
        "only DELETE closes: {:?}",
        closed_flags(&peer)
    );
    // The message handed back was delivered again and accepted.
    peer.wait_for(WAIT, |_| {
        peer.dispositions()
            .iter()
            .any(|d| matches!(d.state, Some(DeliveryState::Accepted(_))))
    })
    .await
    .expect("m-1 accepted once the target answers 200");

    assert_eq!(daemon.api.delete(&id).await, 204);
    peer.wait_for(WAIT, |f| {
        f.iter().filter_map(|f| f.as_detach()).any(|d| d.closed)
    })
    .await
    .expect("DELETE closes the subscription");
    daemon.stop().await;
}
