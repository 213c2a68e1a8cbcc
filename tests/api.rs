//! The HTTP API and the store: every error case, idempotent enroll, persistence across a
//! restart, store write failures, a broker that is down at start, and subscription args.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

async fn raw_post(api: &Api, content_type: Option<&str>, body: Vec<u8>) -> (u16, Value) {
    let mut req = api.http.post(format!("{}/enroll", api.base)).body(body);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let res = req.send().await.expect("API reachable");
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_and_change_nothing() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let (_dir, db) = temp_db();
    let daemon = Daemon::start(&db).await;
    let api = &daemon.api;
    let good = json!({"queue": address(&unique("api")), "target_url": "http://127.0.0.1:9/hook"});
    let json_ct = Some("application/json");
    let cases: Vec<(Option<&str>, Vec<u8>, u16, &str)> = vec![
        (json_ct, b"{not json".to_vec(), 400, "JSON"),
        (json_ct, b"[1,2]".to_vec(), 400, "object"),
        (
            json_ct,
            br#"{"queue": 1, "target_url": "http://x"}"#.to_vec(),
            400,
            "queue",
        ),
        (
            json_ct,
            br#"{"queue": "q", "target_url": ["http://x"]}"#.to_vec(),
            400,
            "target_url",
        ),
        (
            json_ct,
            br#"{"queue": "q", "target_url": "http://x", "subscription_args": {"durable": "yes"}}"#
                .to_vec(),
            400,
            "durable",
        ),
        (
            json_ct,
            br#"{"target_url": "http://x"}"#.to_vec(),
            422,
            "queue",
        ),
        (json_ct, br#"{"queue": "q"}"#.to_vec(), 422, "target_url"),
        (
            json_ct,
            br#"{"queue": "", "target_url": "http://x"}"#.to_vec(),
            422,
            "queue",
        ),
        (
            json_ct,
            br#"{"queue": "q", "target_url": "ftp://x/y"}"#.to_vec(),
            422,
            "target_url",
        ),
        (
            json_ct,
            br#"{"queue": "q", "target_url": "not a url"}"#.to_vec(),
            422,
            "target_url",
        ),
        (
            json_ct,
            br#"{"queue": "q", "target_url": "http://x", "subscription_args": {"colour": "red"}}"#
                .to_vec(),
            422,
            "colour",
        ),
        (
            json_ct,
            br#"{"queue": "q", "target_url": "http://x", "subscription_args": {"prefetch": 0}}"#
                .to_vec(),
            422,
            "prefetch",
        ),
        (
            Some("text/plain"),
            good.to_string().into_bytes(),
            415,
            "Content-Type",
        ),
        (None, good.to_string().into_bytes(), 415, "Content-Type"),
        (
            json_ct,
            {
                let mut big = br#"{"queue": "q", "target_url": "http://x", "pad": ""#.to_vec();
                big.extend(std::iter::repeat_n(b'a', 70 * 1024));
                big.extend(br#""}"#);
                big
            },
            413,
            "larger",
        ),
    ];
    for (ct, body, want, mention) in cases {
        let shown = String::from_utf8_lossy(&body[..body.len().min(80)]).into_owned();
        let (status, answer) = raw_post(api, ct, body).await;
        assert_eq!(status, want, "{shown} -> {answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(mention),
            "{shown}: error {error:?} should mention {mention}"
        );
    }
    let (status, answer) = api.get("/enrollments/not-a-uuid").await;
    assert_eq!((status, answer["error"].is_string()), (404, true));
    let (status, _) = api
        .get(&format!("/enrollments/{}", uuid::Uuid::new_v4()))
        .await;
    assert_eq!(status, 404);
    assert_eq!(api.delete(&uuid::Uuid::new_v4().to_string()).await, 404);
    assert_eq!(api.delete("nope").await, 404);
    let (status, _) = api.get("/no/such/route").await;
    assert_eq!(status, 404);

    // Nothing was stored, and the daemon still serves a valid request.
    let (_, list) = api.get("/enrollments").await;
    assert_eq!(list, json!([]));
    let (status, created) = raw_post(api, json_ct, good.to_string().into_bytes()).await;
    assert_eq!(status, 201, "{created}");
    let (status, again) = raw_post(
        api,
        Some("application/json; charset=utf-8"),
        good.to_string().into_bytes(),
    )
    .await;
    assert_eq!(status, 200, "same queue and target again");
    assert_eq!(again["id"], created["id"]);
    let (_, list) = api.get("/enrollments").await;
    assert_eq!(list.as_array().map(Vec::len), Some(1));
    for field in [
        "id",
        "queue",
        "target_url",
        "subscription_args",
        "created_at",
        "state",
        "delivered",
        "failed",
    ] {
        assert!(
            created.get(field).is_some(),
            "enrollment JSON has {field}: {created}"
        );
    }
    let (status, health) = api.get("/health").await;
    assert_eq!(status, 200);
    assert_eq!(health["status"], "ok");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollments_survive_a_restart_on_the_same_file() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let mgmt = Management::new();
    let queue = unique("persist");
    mgmt.declare_classic(&queue).await;
    let target = Target::start().await;
    let (_dir, db) = temp_db();
    let daemon = Daemon::start(&db).await;
    let created = daemon
        .api
        .enroll(json!({
            "queue": address(&queue),
            "target_url": target.url(),
            "subscription_args": {"prefetch": 5}
        }))
        .await;
    let id = created["id"].as_str().expect("id").to_string();
    daemon.stop().await;

    let mut publisher = Publisher::connect(&queue).await;
    publisher.send_numbered("p", 0..10).await;
    let daemon = Daemon::start(&db).await;
    let back = daemon.api.enrollment(&id).await;
    assert_eq!(back["queue"], created["queue"]);
    assert_eq!(back["target_url"], created["target_url"]);
    assert_eq!(back["subscription_args"], json!({"prefetch": 5}));
    assert_eq!(back["created_at"], created["created_at"]);
    wait_for(
        "delivery after restart",
        Duration::from_secs(30),
        || async { (target.accepted_bodies().len() == 10).then_some(()) },
    )
    .await;
    mgmt.wait_depth(&queue, 0, Duration::from_secs(20)).await;
    publisher.close().await;
    daemon.stop().await;
    mgmt.delete_queue(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_store_write_answers_503_and_keeps_map_and_disk_in_step() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let (_dir, db) = temp_db();
    let daemon = Daemon::start(&db).await;
    let body = json!({"queue": address(&unique("locked")), "target_url": "http://127.0.0.1:9/x"});

    // The daemon must have opened and migrated its store before the lock is taken, or its start
    // (not the insert) is what waits on the lock and fails.
    assert_eq!(daemon.api.get("/enrollments").await.1, json!([]));
    // Another process holding SQLite's write lock makes the daemon's insert fail.
    let locker = rusqlite::Connection::open(&db).expect("open");
    locker.execute_batch("BEGIN EXCLUSIVE").expect("lock");
    let res = daemon
        .api
        .http
        .post(format!("{}/enroll", daemon.base))
        .json(&body)
        .send()
        .await
        .expect("API reachable");
    assert_eq!(res.status().as_u16(), 503);
    let answer: Value = res.json().await.expect("json");
    assert!(
        answer["error"]
            .as_str()
            .is_some_and(|e| e.contains("store")),
        "{answer}"
    );
    let (_, list) = daemon.api.get("/enrollments").await;
    assert_eq!(
        list,
        json!([]),
        "the map did not take the failed enrollment"
    );
    locker.execute_batch("ROLLBACK").expect("unlock");
    let rows: i64 = locker
        .query_row("SELECT COUNT(*) FROM enrollments", [], |r| r.get(0))
        .expect("count");
    assert_eq!(rows, 0, "nothing half-written");

    let created = daemon.api.enroll(body).await;
    let rows: i64 = locker
        .query_row("SELECT COUNT(*) FROM enrollments", [], |r| r.get(0))
        .expect("count");
    assert_eq!(rows, 1);
    let id = created["id"].as_str().expect("id");

    // A failed delete leaves the enrollment in place, too.
    locker.execute_batch("BEGIN EXCLUSIVE").expect("lock");
    assert_eq!(daemon.api.delete(id).await, 503);
    locker.execute_batch("ROLLBACK").expect("unlock");
    assert_eq!(daemon.api.get(&format!("/enrollments/{id}")).await.0, 200);
    assert_eq!(daemon.api.delete(id).await, 204);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_serves_while_the_broker_is_unreachable() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let (_dir, db) = temp_db();
    let closed_port = free_port();
    let url = format!("amqp://guest:topsecret@127.0.0.1:{closed_port}");
    let daemon = Daemon::start_with(&db, &[("AMQP_URL", &url)]).await;
    let (status, _) = daemon.api.get("/health").await;
    assert_eq!(status, 200);
    let id = daemon
        .api
        .enroll_queue(&unique("nobroker"), "http://127.0.0.1:9/x")
        .await;
    let e = daemon
        .api
        .wait_state(&id, "backoff", Duration::from_secs(10))
        .await;
    assert!(
        e["last_error"].as_str().is_some_and(|s| !s.is_empty()),
        "{e}"
    );
    let (_, list) = daemon.api.get("/enrollments").await;
    assert!(
        !list.to_string().contains("topsecret"),
        "no password in answers"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_args_reach_the_broker() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let mgmt = Management::new();
    let queue = unique("args");
    mgmt.declare_classic(&queue).await;
    let target = Target::start().await;
    let (_dir, db) = temp_db();
    let daemon = Daemon::start(&db).await;
    let created = daemon
        .api
        .enroll(json!({
            "queue": address(&queue),
            "target_url": target.url(),
            "subscription_args": {"durable": true, "capabilities": ["queue"], "prefetch": 3}
        }))
        .await;
    let id = created["id"].as_str().expect("id");
    daemon
        .api
        .wait_state(id, "active", Duration::from_secs(20))
        .await;
    let mut publisher = Publisher::connect(&queue).await;
    publisher.send_numbered("a", 0..10).await;
    wait_for("10 deliveries", Duration::from_secs(20), || async {
        (target.accepted_bodies().len() == 10).then_some(())
    })
    .await;
    publisher.close().await;
    daemon.stop().await;
    mgmt.delete_queue(&queue).await;
}

fn run_binary(env: &[(&str, &str)]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_hot-potato"))
        .env_clear()
        .envs(env.iter().copied())
        .current_dir(std::env::temp_dir())
        .output()
        .expect("binary runs")
}

#[test]
fn bad_configuration_exits_non_zero_naming_the_problem() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let dir = tempfile::tempdir().expect("tempdir");
    let garbage = dir.path().join("garbage.sqlite");
    std::fs::write(&garbage, vec![b'x'; 4096]).expect("write");
    let garbage = garbage.display().to_string();
    let a_dir = dir.path().display().to_string();
    let port = free_port().to_string();
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (vec![("HTTP_PORT", "eighty")], "HTTP_PORT"),
        (vec![("AMQP_URL", "http://localhost:5672")], "AMQP_URL"),
        (vec![("FAILURE_OUTCOME", "sometimes")], "FAILURE_OUTCOME"),
        (vec![("DELIVERY_TIMEOUT_MS", "-1")], "DELIVERY_TIMEOUT_MS"),
        (
            vec![("HTTP_PORT", &port), ("SQLITE_BACKUP_PATH", &garbage)],
            &garbage,
        ),
        (
            vec![("HTTP_PORT", &port), ("SQLITE_BACKUP_PATH", &a_dir)],
            &a_dir,
        ),
    ];
    for (env, mention) in cases {
        let out = run_binary(&env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{env:?} must fail");
        let last = stderr.lines().last().unwrap_or_default();
        assert!(last.contains(mention), "{env:?}: {stderr}");
    }
}
