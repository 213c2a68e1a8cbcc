//! Delivery policy against the real broker: local retries that absorb an outage, retry
//! budgets and backoff, status classes, the circuit breaker, concurrency, isolation, auth and
//! signing, and the target allowlist.

mod common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use hmac::{KeyInit, Mac};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_second_outage_with_default_settings_dead_letters_nothing() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let mgmt = Management::new();
    let queue = unique("outage");
    let dlq = mgmt.declare_with_dead_letter(&queue, 2).await;
    let mut target = Target::start().await;
    let (_dir, db) = temp_db();
    let daemon = Daemon::start(&db).await;
    let id = enroll_active_with(&daemon.api, &queue, &target.url(), json!({})).await;

    target.stop().await;
    let mut publisher = Publisher::connect(&queue).await;
    publisher.send_numbered("o", 0..200).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    target.restart().await;
    wait_for("all 200 delivered", Duration::from_secs(60), || async {
        (distinct_accepted(&target) == 200).then_some(())
    })
    .await;
    mgmt.wait_depth(&queue, 0, Duration::from_secs(20)).await;
    mgmt.wait_depth(&dlq, 0, Duration::from_secs(10)).await;
    let e = daemon.api.enrollment(&id).await;
    assert_eq!(e["failed"], 0, "no message was handed back: {e}");
    println!(
        "outage: {} POST attempts in all for 200 messages, {} retries",
        target.count(),
        e["retries"]
    );
    publisher.close().await;
    daemon.stop().await;
    mgmt.delete_queue(&queue).await;
    mgmt.delete_queue(&dlq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_use_the_configured_backoff_then_the_broker_dead_letters() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let mgmt = Management::new();
    let queue = unique("retries");
    let limit = 2;
    let dlq = mgmt.declare_with_dead_letter(&queue, limit).await;
    let target = Target::start().await;
    // An error answer (500): every attempt counts. (503 would hold the message instead.)
    target.set_status(500);
    let (_dir, db) = temp_db();
    let daemon = Daemon::start(&db).await;
    let id = enroll_with(
        &daemon.api,
        &queue,
        &target.url(),
        json!({
            "retry": {"max_attempts": 3, "backoff": "exponential", "base_ms": 200, "max_ms": 5000, "jitter": false},
            "circuit_breaker": {"failure_threshold": 0}
        }),
    )
    .await;
    let mut publisher = Publisher::connect(&queue).await;
    publisher.send_numbered("r", 0..1).await;
    mgmt.wait_depth(&dlq, 1, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let seen = target.received();
    let rounds = (limit + 1) as usize;
    assert_eq!(
        seen.len(),
        3 * rounds,
        "3 attempts × (limit + 1) deliveries"
    );
    for round in seen.chunks(3) {
        let gaps: Vec<Duration> = round.windows(2).map(|w| w[1].at - w[0].at).collect();
        // Exponential from 200 ms: 200 then 400, with some tolerance for scheduling.
        for (gap, want) in gaps.iter().zip([200u64, 400]) {
            let ms = gap.as_millis() as u64;
            assert!(
                ms + 20 >= want && ms < want + 300,
                "gap {ms} ms, configured {want} ms"
            );
        }
    }
    let e = daemon.api.enrollment(&id).await;
    assert_eq!(e["failed"], rounds as u64);
    assert_eq!(e["retries"], 2 * rounds as u64);
    publisher.close().await;
    daemon.stop().await;
    mgmt.delete_queue(&queue).await;
    mgmt.delete_queue(&dlq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_on_dead_letters_after_one_post_and_drop_on_accepts() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let mgmt = Management::new();
    let (rq, dq) = (unique("reject"), unique("drop"));
    let r_dlq = mgmt.declare_with_dead_letter(&rq, 5).await;
    let d_dlq = mgmt.declare_with_dead_letter(&dq, 5).await;
    let rejecting = Target::start().await;
    rejecting.set_status(422);
    let dropping = Target::start().await;
    dropping.set_status(404);
    let (_dir, db) = temp_db();
    let daemon = Daemon::start(&db).await;
    let r_id = enroll_with(
        &daemon.api,
        &rq,
        &rejecting.url(),
        json!({"reject_on": [422]}),
    )
    .await;
    let d_id = enroll_with(&daemon.api, &dq, &dropping.url(), json!({"drop_on": [404]})).await;
    let mut rp = Publisher::connect(&rq).await;
    let mut dp = Publisher::connect(&dq).await;
    rp.send_numbered("rej", 0..1).await;
    dp.send_numbered("drop", 0..1).await;

    mgmt.wait_depth(&r_dlq, 1, Duration::from_secs(20)).await;
    mgmt.wait_depth(&rq, 0, Duration::from_secs(10)).await;
    mgmt.wait_depth(&dq, 0, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rejecting.count(), 1, "rejected after one POST");
    assert_eq!(dropping.count(), 1, "dropped after one POST");
    mgmt.wait_depth(&d_dlq, 0, Duration::from_secs(10)).await;
    let r = daemon.api.enrollment(&r_id).await;
    assert_eq!(
        (r["rejected"].as_u64(), r["failed"].as_u64()),
        (Some(1), Some(0)),
        "{r}"
    );
    let d = daemon.api.enrollment(&d_id).await;
    assert_eq!(
        (d["dropped"].as_u64(), d["delivered"].as_u64()),
        (Some(1), Some(0)),
        "{d}"
    );
    rp.close().await;
    dp.close().await;
    daemon.stop().await;
    for q in [&rq, &dq, &r_dlq, &d_dlq] {
        mgmt.delete_queue(q).await;
    }
}

/// Concurrent POSTs that finish together are settled together (accepts batched into one
/// disposition); each message must still get the outcome of its own answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_posts_each_settle_with_their_own_answer() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let mgmt = Management::new();
    let queue = unique("mixed");
    let dlq = mgmt.declare_with_dead_letter(&queue, 5).await;
    let target = Target::start().await;
    // A POST that takes a moment: without it, answers come back faster than the next POST
    // leaves, and whether two ever overlap at the target is luck.
    target.set_delay(Duration::from_millis(5));
    // "mixed-N": N % 3 == 0 → 200, 1 → 404 (drop_on), 2 → 422 (reject_on).
    target.set_status_by_body(|body| {
        let n: usize = body
            .rsplit('-')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        [200, 404, 422][n % 3]
    });
    let (_dir, db) = temp_db();
    let daemon = Daemon::start(&db).await;
    let id = enroll_active_with(
        &daemon.api,
        &queue,
        &target.url(),
        json!({"max_in_flight": 16, "drop_on": [404], "reject_on": [422]}),
    )
    .await;
    let n = 600;
    let mut publisher = Publisher::connect(&queue).await;
    publisher.send_numbered("mixed", 0..n).await;
    mgmt.wait_depth(&dlq, (n / 3) as u64, Duration::from_secs(30))
        .await;
    mgmt.wait_depth(&queue, 0, Duration::from_secs(30)).await;
    let e = wait_for("every outcome counted", Duration::from_secs(10), || async {
        let e = daemon.api.enrollment(&id).await;
        (e["delivered"].as_u64().unwrap_or(0)
            + e["dropped"].as_u64().unwrap_or(0)
            + e["rejected"].as_u64().unwrap_or(0)
            == n as u64)
            .then_some(e)
    })
    .await;
    assert_eq!(e["delivered"], n / 3, "{e}");
    assert_eq!(e["dropped"], n / 3, "{e}");
    assert_eq!(e["rejected"], n / 3, "{e}");
    assert_eq!(e["in_flight"], 0, "{e}");
    assert_eq!(target.count(), n, "one POST per message");
    assert!(target.max_concurrent() > 1, "POSTs overlapped");
    publisher.close().await;
    daemon.stop().await;
    mgmt.delete_queue(&queue).await;
    mgmt.delete_queue(&dlq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_breaker_slows_posts_to_the_probe_rate_and_keeps_messages_in_the_broker() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let mgmt = Management::new();
    let queue = unique("breaker");
    let dlq = mgmt.declare_with_dead_letter(&queue, 1).await;
    let mut target = Target::start().await;
    let (_dir, db) = temp_db();
    let daemon = Daemon::start(&db).await;
    let id = enroll_active_with(
        &daemon.api,
        &queue,
        &target.url(),
        json!({
            "retry": {"max_attempts": 100, "backoff": "fixed", "base_ms": 50, "jitter": false},
            "circuit_breaker": {"failure_threshold": 3, "open_ms": 1000}
        }),
    )
    .await;
    // The target answers 503 (counted attempts) rather than refusing (no request to count).
    target.set_status(503);
    let mut publisher = Publisher::connect(&queue).await;
    publisher.send_numbered("b", 0..50).await;
    wait_for("the breaker to open", Duration::from_secs(10), || async {
        let e = daemon.api.enrollment(&id).await;
        (e["breaker_state"] != "closed").then_some(())
    })
    .await;
    let before = target.count();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let during = target.count() - before;
    assert!(
        during <= 8,
        "{during} POSTs in 6 s with the breaker open; the probe rate is about 1 per second"
    );
    assert!(during >= 3, "probes keep coming: {during}");
    // Nothing was handed back, so no delivery count was used and nothing dead-lettered.
    let e = daemon.api.enrollment(&id).await;
    assert_eq!(e["failed"], 0, "{e}");
    mgmt.wait_depth(&queue, 50, Duration::from_secs(10)).await;
    mgmt.wait_depth(&dlq, 0, Duration::from_secs(10)).await;

    target.set_status(200);
    wait_for(
        "all 50 delivered after recovery",
        Duration::from_secs(30),
        || async { (distinct_accepted(&target) == 50).then_some(()) },
    )
    .await;
    mgmt.wait_depth(&queue, 0, Duration::from_secs(20)).await;
    let e = daemon.api.enrollment(&id).await;
    assert_eq!(e["breaker_state"], "closed");
    target.stop().await;
    publisher.close().await;
    daemon.stop().await;
    mgmt.delete_queue(&queue).await;
    mgmt.delete_queue(&dlq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_in_flight_runs_posts_concurrently_and_delivers_each_once() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let mgmt = Management::new();
    let (q1, q16) = (unique("serial"), unique("parallel"));
    mgmt.declare_classic(&q1).await;
    mgmt.declare_classic(&q16).await;
    let (t1, t16) = (Target::start().await, Target::start().await);
    t1.set_delay(Duration::from_millis(50));
    t16.set_delay(Duration::from_millis(50));
    let (_dir, db) = temp_db();
    let daemon = Daemon::start(&db).await;
    let n = 160;
    let mut elapsed = Vec::new();
    for (queue, target, max) in [(&q1, &t1, 1), (&q16, &t16, 16)] {
        let mut publisher = Publisher::connect(queue).await;
        publisher.send_numbered("c", 0..n).await;
        let started = Instant::now();
        let id = enroll_with(
            &daemon.api,
            queue,
            &target.url(),
            json!({"max_in_flight": max}),
        )
        .await;
        wait_for("all delivered", Duration::from_secs(60), || async {
            (target.accepted_bodies().len() >= n).then_some(())
        })
        .await;
        elapsed.push(started.elapsed());
        mgmt.wait_depth(queue, 0, Duration::from_secs(20)).await;
        assert_eq!(target.accepted_bodies().len(), n, "each message once");
        assert_eq!(distinct_accepted(target), n);
        let e = daemon.api.enrollment(&id).await;
        assert_eq!(e["delivery"]["max_in_flight"], max);
        publisher.close().await;
    }
    assert_eq!(
        t1.max_concurrent(),
        1,
        "max_in_flight 1 keeps one POST at a time"
    );
    assert!(
        t16.max_concurrent() > 8,
        "max_in_flight 16 overlapped only {}",
        t16.max_concurrent()
    );
    assert!(t16.max_concurrent() <= 16);
    println!(
        "{n} messages at 50 ms each: max_in_flight 1 {:?}, 16 {:?} ({:.1}x)",
        elapsed[0],
        elapsed[1],
        elapsed[0].as_secs_f64() / elapsed[1].as_secs_f64()
    );
    daemon.stop().await;
    mgmt.delete_queue(&q1).await;
    mgmt.delete_queue(&q16).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_target_does_not_hold_up_a_healthy_one() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let mgmt = Management::new();
    let (stuck_q, ok_q) = (unique("stuck"), unique("healthy"));
    mgmt.declare_classic(&stuck_q).await;
    mgmt.declare_classic(&ok_q).await;
    let hanging = HangingTarget::start().await;
    let healthy = Target::start().await;
    let (_dir, db) = temp_db();
    let daemon = Daemon::start(&db).await;
    enroll_with(
        &daemon.api,
        &stuck_q,
        &hanging.url,
        json!({"max_in_flight": 8, "timeout_ms": 30000}),
    )
    .await;
    let ok_id = enroll_with(&daemon.api, &ok_q, &healthy.url(), json!({})).await;
    daemon
        .api
        .wait_state(&ok_id, "active", Duration::from_secs(20))
        .await;
    let mut stuck_pub = Publisher::connect(&stuck_q).await;
    stuck_pub.send_numbered("s", 0..50).await;
    let mut ok_pub = Publisher::connect(&ok_q).await;
    ok_pub.send_numbered("h", 0..500).await;
    wait_for(
        "the healthy enrollment's 500",
        Duration::from_secs(60),
        || async { (healthy.accepted_bodies().len() == 500).then_some(()) },
    )
    .await;
    let expected: Vec<String> = (0..500).map(|i| format!("h-{i}")).collect();
    assert_eq!(healthy.accepted_bodies(), expected, "in order, once each");
    stuck_pub.close().await;
    ok_pub.close().await;
    daemon.stop().await;
    mgmt.delete_queue(&stuck_q).await;
    mgmt.delete_queue(&ok_q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_headers_and_signatures_reach_the_target_and_secrets_stay_hidden() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let mgmt = Management::new();
    let queue = unique("signed");
    mgmt.declare_classic(&queue).await;
    let target = Target::start().await;
    let (_dir, db) = temp_db();
    let daemon = Daemon::start(&db).await;
    let secret_b64 = base64::engine::general_purpose::STANDARD.encode(b"a very secret signing key");
    let secret = format!("whsec_{secret_b64}");
    let created = daemon
        .api
        .enroll(json!({
            "queue": address(&queue),
            "target_url": target.url(),
            "delivery": {
                "headers": {"x-team": "payments"},
                "auth": {"type": "bearer", "token": "tok-123-secret"},
                "signing": {"secret": secret}
            }
        }))
        .await;
    let id = created["id"].as_str().expect("id").to_string();
    let mut publisher = Publisher::connect(&queue).await;
    publisher
        .send(
            fe2o3_amqp::types::messaging::Message::builder()
                .properties(
                    fe2o3_amqp::types::messaging::Properties::builder()
                        .message_id("order-42".to_string())
                        .build(),
                )
                .value("signed body")
                .build(),
        )
        .await;
    let got = wait_for("the POST", Duration::from_secs(20), || async {
        target.received().into_iter().next()
    })
    .await;
    assert_eq!(got.header("x-team"), Some("payments"));
    assert_eq!(got.header("authorization"), Some("Bearer tok-123-secret"));
    assert_eq!(got.header("webhook-id"), Some("order-42"));
    let timestamp = got.header("webhook-timestamp").expect("timestamp");
    let signature = got.header("webhook-signature").expect("signature");

    // Verified here with the HMAC primitive directly, following the spec's recipe.
    let key = base64::engine::general_purpose::STANDARD
        .decode(&secret_b64)
        .expect("b64");
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).expect("key");
    mac.update(format!("order-42.{timestamp}.").as_bytes());
    mac.update(&got.body);
    let expected = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    );
    assert_eq!(signature, expected);
    let age =
        time::OffsetDateTime::now_utc().unix_timestamp() - timestamp.parse::<i64>().expect("int");
    assert!((0..60).contains(&age), "timestamp is current");

    for path in [format!("/enrollments/{id}"), "/enrollments".to_string()] {
        let (_, shown) = daemon.api.get(&path).await;
        let text = shown.to_string();
        assert!(!text.contains("tok-123-secret"), "{text}");
        assert!(!text.contains(&secret_b64), "{text}");
        assert!(text.contains("payments"));
    }
    assert!(!created.to_string().contains("tok-123-secret"));
    publisher.close().await;
    daemon.stop().await;
    mgmt.delete_queue(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_allowlist_refuses_outside_targets_and_admits_listed_ones() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let mgmt = Management::new();
    let queue = unique("allow");
    mgmt.declare_classic(&queue).await;
    let target = Target::start().await;
    let (_dir, db) = temp_db();
    let daemon = Daemon::start_with(&db, &[("TARGET_ALLOWLIST", "127.0.0.1, *.hooks.test")]).await;
    let api = &daemon.api;
    for refused in [
        target.url().replace("127.0.0.1", "localhost"),
        "http://10.0.0.1/x".to_string(),
        "http://169.254.169.254/latest/meta-data".to_string(),
    ] {
        let res = api
            .http
            .post(format!("{}/enroll", api.base))
            .json(&json!({"queue": address(&queue), "target_url": refused}))
            .send()
            .await
            .expect("API");
        assert_eq!(res.status().as_u16(), 422, "{refused}");
        let body: Value = res.json().await.expect("json");
        assert!(
            body["error"]
                .as_str()
                .is_some_and(|e| e.contains("target_url")),
            "{body}"
        );
    }
    let id = api.enroll_queue(&queue, &target.url()).await;
    let mut publisher = Publisher::connect(&queue).await;
    publisher.send_numbered("a", 0..3).await;
    wait_for(
        "deliveries to the listed target",
        Duration::from_secs(20),
        || async { (target.accepted_bodies().len() == 3).then_some(()) },
    )
    .await;
    let (_, list) = api.get("/enrollments").await;
    assert_eq!(
        list.as_array().map(Vec::len),
        Some(1),
        "only the admitted one: {id}"
    );
    publisher.close().await;
    daemon.stop().await;
    mgmt.delete_queue(&queue).await;
}
