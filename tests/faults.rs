//! Fault tests that count every message: numbered messages are published and, at the end,
//! every number must have been accepted by the target at least once; duplicates are reported
//! and must stay within what the daemon could have held unsettled.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

/// Starts the daemon binary on `db` with its log in `dir`, and waits until it serves.
async fn daemon_process(
    dir: &tempfile::TempDir,
    db: &std::path::Path,
    extra: &[(&str, &str)],
) -> (DaemonProcess, Api, std::path::PathBuf) {
    let port = free_port();
    let api = Api::new(&format!("http://127.0.0.1:{port}"));
    let log = dir.path().join("daemon.log");
    let child = spawn_daemon(db, port, Some(&log), extra);
    api.wait_healthy().await;
    (child, api, log)
}

/// Per-number tally of accepted POSTs.
struct Tally {
    missing: Vec<usize>,
    duplicates: usize,
}

fn tally(target: &Target, prefix: &str, n: usize) -> Tally {
    let mut seen: HashMap<usize, usize> = HashMap::new();
    for body in target.accepted_bodies() {
        if let Some(i) = body
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix('-'))
            .and_then(|i| i.parse().ok())
        {
            *seen.entry(i).or_default() += 1;
        }
    }
    Tally {
        missing: (0..n).filter(|i| !seen.contains_key(i)).collect(),
        duplicates: seen.values().map(|c| c - 1).sum(),
    }
}

async fn wait_all(target: &Target, prefix: &str, n: usize, limit: Duration) -> Tally {
    let deadline = Instant::now() + limit;
    loop {
        let t = tally(target, prefix, n);
        if t.missing.is_empty() {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} messages never accepted, e.g. {:?}",
            t.missing.len(),
            &t.missing[..t.missing.len().min(10)]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_the_middle_of_ten_thousand_loses_nothing() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let mgmt = Management::new();
    let queue = unique("kill9");
    mgmt.declare_quorum(&queue).await;
    let target = Target::start().await;
    let (dir, db) = temp_db();
    let (mut child, api, log) = daemon_process(&dir, &db, &[]).await;
    api.enroll_active(&queue, &target.url()).await;
    let n = 10_000;
    let mut publisher = Publisher::connect(&queue).await;
    publisher.send_numbered("k", 0..n).await;
    wait_for(
        "some deliveries before the kill",
        Duration::from_secs(60),
        || async { (target.count() >= n / 4).then_some(()) },
    )
    .await;
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    let before = target.count();
    // Same file, same port: the client above keeps working.
    let mut child = spawn_daemon(&db, api.port(), Some(&log), &[]);
    api.wait_healthy().await;
    let t = wait_all(&target, "k", n, Duration::from_secs(120)).await;
    mgmt.wait_depth(&queue, 0, Duration::from_secs(30)).await;
    println!(
        "kill -9 after {before} POSTs: all {n} accepted, {} duplicates",
        t.duplicates
    );
    // At most what the killed daemon held: its credit (DEFAULT_PREFETCH, 1000) plus the
    // POST in flight.
    assert!(t.duplicates <= 1001, "{} duplicates", t.duplicates);
    let _ = child.kill();
    let _ = child.wait();
    publisher.close().await;
    mgmt.delete_queue(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_target_loses_and_dead_letters_nothing_with_default_settings() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let mgmt = Management::new();
    let queue = unique("flap");
    let dlq = mgmt.declare_with_dead_letter(&queue, 5).await;
    let mut target = Target::start().await;
    // Every POST takes at least 2 ms and max_in_flight is 1, so at most 500 messages are
    // delivered per second the target is up, however fast the machine: without it a fast run
    // delivered 80 % before the first outage.
    target.set_delay(Duration::from_millis(2));
    let (_dir, db) = temp_db();
    let daemon = Daemon::start(&db).await;
    let id = daemon.api.enroll_active(&queue, &target.url()).await;
    let n = 5_000;
    let mut publisher = Publisher::connect(&queue).await;
    publisher.send_numbered("f", 0..n).await;
    // Three 2 s outages, 1 s apart: with the publish, a few seconds of delivery before the
    // last one, so well over a fifth of the messages are still queued or in hand when it starts.
    let mut missing_at_last_outage = 0;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        missing_at_last_outage = tally(&target, "f", n).missing.len();
        target.stop().await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        target.restart().await;
    }
    assert!(
        missing_at_last_outage > n / 5,
        "messages flowed through all three outages ({missing_at_last_outage} missing at the last)"
    );
    let t = wait_all(&target, "f", n, Duration::from_secs(120)).await;
    mgmt.wait_depth(&queue, 0, Duration::from_secs(30)).await;
    mgmt.wait_depth(&dlq, 0, Duration::from_secs(5)).await;
    let e = daemon.api.enrollment(&id).await;
    println!(
        "flapping: 3 outages ({missing_at_last_outage} missing at the last), all {n} accepted, {} duplicates, {} retries, {} handed back",
        t.duplicates, e["retries"], e["failed"]
    );
    assert_eq!(e["failed"], 0, "default settings absorb 2 s outages: {e}");
    publisher.close().await;
    daemon.stop().await;
    mgmt.delete_queue(&queue).await;
    mgmt.delete_queue(&dlq).await;
}

/// Makes a file immutable (even for root) with chattr; undone on drop.
struct Immutable(Vec<std::path::PathBuf>);

impl Immutable {
    fn set(paths: Vec<std::path::PathBuf>) -> Self {
        for p in &paths {
            let ok = Command::new("chattr")
                .arg("+i")
                .arg(p)
                .status()
                .map(|s| s.success());
            assert!(
                matches!(ok, Ok(true)),
                "chattr +i {} failed: this test needs chattr on an ext4/xfs temp dir",
                p.display()
            );
        }
        Self(paths)
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = Command::new("chattr").arg("-i").arg(p).status();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_store_refuses_changes_but_delivery_goes_on() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let mgmt = Management::new();
    let queue = unique("rostore");
    mgmt.declare_classic(&queue).await;
    let target = Target::start().await;
    let (_dir, db) = temp_db();
    let daemon = Daemon::start(&db).await;
    let id = daemon.api.enroll_active(&queue, &target.url()).await;
    // The -shm file is memory-mapped; freezing it would fault the process, and SQLite cannot
    // commit without writing the main file or the WAL anyway.
    let files: Vec<_> = ["", "-wal"]
        .iter()
        .map(|suffix| std::path::PathBuf::from(format!("{}{suffix}", db.display())))
        .filter(|p| p.exists())
        .collect();
    let guard = Immutable::set(files);

    let body = json!({"queue": address(&unique("refused")), "target_url": target.url()});
    let res = daemon
        .api
        .http
        .post(format!("{}/enroll", daemon.base))
        .json(&body)
        .send()
        .await
        .expect("API");
    assert_eq!(res.status().as_u16(), 503, "enroll on a read-only store");
    let (_, list) = daemon.api.get("/enrollments").await;
    assert_eq!(
        list.as_array().map(Vec::len),
        Some(1),
        "nothing half-written: {list}"
    );
    assert_eq!(
        daemon.api.delete(&id).await,
        503,
        "delete on a read-only store"
    );
    let mut publisher = Publisher::connect(&queue).await;
    publisher.send_numbered("ro", 0..50).await;
    wait_for(
        "delivery with a read-only store",
        Duration::from_secs(20),
        || async { (target.accepted_bodies().len() == 50).then_some(()) },
    )
    .await;
    let (status, ready) = daemon.api.get("/ready").await;
    assert_eq!(
        status, 503,
        "not ready while the store is read-only: {ready}"
    );
    drop(guard);

    let created = daemon.api.enroll(body).await;
    assert!(created["id"].is_string());
    let (_, list) = daemon.api.get("/enrollments").await;
    assert_eq!(list.as_array().map(Vec::len), Some(2));
    let rows: i64 = rusqlite::Connection::open(&db)
        .expect("open")
        .query_row("SELECT COUNT(*) FROM enrollments", [], |r| r.get(0))
        .expect("count");
    assert_eq!(rows, 2, "store and map agree");
    publisher.close().await;
    daemon.stop().await;
    mgmt.delete_queue(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_mebibyte_message_is_delivered_whole() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let mgmt = Management::new();
    let queue = unique("big");
    mgmt.declare_classic(&queue).await;
    let target = Target::start().await;
    let (_dir, db) = temp_db();
    let daemon = Daemon::start(&db).await;
    daemon.api.enroll_queue(&queue, &target.url()).await;
    let body: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    let mut publisher = Publisher::connect(&queue).await;
    publisher
        .send(
            fe2o3_amqp::types::messaging::Message::builder()
                .data(body.clone())
                .build(),
        )
        .await;
    publisher.send_numbered("after", 0..3).await;
    wait_for(
        "the big message and the next ones",
        Duration::from_secs(30),
        || async { (target.accepted_bodies().len() == 4).then_some(()) },
    )
    .await;
    let first = &target.received()[0];
    assert_eq!(first.body.len(), body.len());
    assert!(first.body[..] == body[..], "delivered byte for byte");
    assert_eq!(
        first.header("content-type"),
        Some("application/octet-stream")
    );
    publisher.close().await;
    daemon.stop().await;
    mgmt.delete_queue(&queue).await;
}

/// Local ports of the daemon process's established connections to the broker.
fn broker_ports_of(pid: u32) -> Vec<u16> {
    let out = Command::new("ss")
        .args(["-Htnp", "state", "established", "dst", &broker_addr()])
        .output()
        .expect("ss runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&format!("pid={pid},")))
        .filter_map(|l| {
            l.split_whitespace()
                .nth(2)
                .and_then(|local| local.rsplit(':').next())
                .and_then(|p| p.parse().ok())
        })
        .collect()
}

async fn broker_connections_from(mgmt_ports: &[u16]) -> usize {
    let conns: Value = reqwest::Client::new()
        .get(format!("{}/api/connections", management_url()))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .expect("management API")
        .json()
        .await
        .expect("json");
    conns
        .as_array()
        .map(|all| {
            all.iter()
                .filter(|c| {
                    c["peer_port"]
                        .as_u64()
                        .is_some_and(|p| mgmt_ports.contains(&(p as u16)))
                })
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_enrollments_churning_under_traffic_leak_no_connection() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let mgmt = Management::new();
    let target = Target::start().await;
    let (dir, db) = temp_db();
    let (mut child, api, log) = daemon_process(&dir, &db, &[]).await;
    let queues: Vec<String> = (0..50).map(|i| unique(&format!("churn{i}"))).collect();
    for q in &queues {
        mgmt.declare_classic(q).await;
    }
    let mut publisher = Publisher::connect(&queues[0]).await;
    publisher.send_numbered("c", 0..200).await;

    let created = futures_join(queues.iter().map(|q| {
        let api = api.clone();
        let target = target.url();
        let q = q.clone();
        async move { api.enroll_queue(&q, &target).await }
    }))
    .await;
    // Traffic on the queues while enrollments come and go.
    for q in queues.iter().take(10) {
        let mut p = Publisher::connect(q).await;
        p.send_numbered(q, 0..20).await;
        p.close().await;
    }
    let (deleted, kept) = created.split_at(40);
    let statuses = futures_join(deleted.iter().map(|id| {
        let api = api.clone();
        let id = id.clone();
        async move { api.delete(&id).await }
    }))
    .await;
    assert!(statuses.iter().all(|s| *s == 204), "{statuses:?}");
    for id in kept {
        api.wait_state(id, "active", Duration::from_secs(30)).await;
    }
    let pid = child.id();
    let seen = std::sync::Mutex::new(0);
    let daemon_ports = wait_for("10 broker connections", Duration::from_secs(30), || async {
        let ports = broker_ports_of(pid);
        *seen.lock().expect("lock") = ports.len();
        (ports.len() == kept.len()).then_some(ports)
    })
    .await;
    println!(
        "the daemon holds {} broker connections",
        seen.lock().expect("lock")
    );
    wait_for(
        "the broker to count the same",
        Duration::from_secs(30),
        || async { (broker_connections_from(&daemon_ports).await == kept.len()).then_some(()) },
    )
    .await;
    let (_, list) = api.get("/enrollments").await;
    let mut in_map: Vec<String> = list
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|e| e["id"].as_str().map(String::from))
        .collect();
    in_map.sort();
    let conn = rusqlite::Connection::open(&db).expect("open");
    let mut stmt = conn
        .prepare("SELECT id FROM enrollments ORDER BY id")
        .expect("prepare");
    let in_store: Vec<String> = stmt
        .query_map([], |r| r.get(0))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    let mut expected: Vec<String> = kept.to_vec();
    expected.sort();
    assert_eq!(in_map, expected, "map holds the live enrollments");
    assert_eq!(in_store, expected, "store and map agree");
    assert!(
        child.try_wait().expect("wait").is_none(),
        "the daemon is still running"
    );
    let _ = child.kill();
    let _ = child.wait();
    let logs = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!logs.contains("panicked"), "a task panicked:\n{logs}");
    publisher.close().await;
    for q in &queues {
        mgmt.delete_queue(q).await;
    }
}

/// Runs futures concurrently on the runtime and returns their outputs in order.
async fn futures_join<T: Send + 'static>(
    futures: impl Iterator<Item = impl std::future::Future<Output = T> + Send + 'static>,
) -> Vec<T> {
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_pool_carries_many_enrollments_on_few_connections() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let mgmt = Management::new();
    let target = Target::start().await;
    let (dir, db) = temp_db();
    let (mut child, api, _log) = daemon_process(&dir, &db, &[("AMQP_CONNECTION_POOL", "2")]).await;
    let (queues, ids) = enroll_classic_queues(&mgmt, &api, &target, "pool", 10).await;
    for q in &queues {
        let mut p = Publisher::connect(q).await;
        p.send_numbered(q, 0..20).await;
        p.close().await;
    }
    wait_for(
        "200 deliveries over the pool",
        Duration::from_secs(30),
        || async { (target.accepted_bodies().len() == 200).then_some(()) },
    )
    .await;
    let pid = child.id();
    // An enrollment's slot is its id modulo the pool size, so ten random ids fill both slots
    // but for a 1-in-512 chance: count the slots they really use.
    let slots: std::collections::HashSet<u128> = ids
        .iter()
        .filter_map(|id| uuid::Uuid::parse_str(id).ok())
        .map(|id| id.as_u128() % 2)
        .collect();
    assert_eq!(
        broker_ports_of(pid).len(),
        slots.len(),
        "ten enrollments on their pool slots' connections (at most two)"
    );
    // Deleting one closes its session, not the shared connection.
    assert_eq!(api.delete(&ids[0]).await, 204);
    let mut p = Publisher::connect(&queues[1]).await;
    p.send_numbered("after-delete", 0..5).await;
    p.close().await;
    wait_for(
        "the others keep flowing",
        Duration::from_secs(20),
        || async { (target.accepted_bodies().len() == 205).then_some(()) },
    )
    .await;
    assert_eq!(broker_ports_of(pid).len(), 2);
    let _ = child.kill();
    let _ = child.wait();
    for q in &queues {
        mgmt.delete_queue(q).await;
    }
}

/// `n` classic queues named from `prefix`, each enrolled to `target`, all `active`: the
/// queues and the enrollment ids.
async fn enroll_classic_queues(
    mgmt: &Management,
    api: &Api,
    target: &Target,
    prefix: &str,
    n: usize,
) -> (Vec<String>, Vec<String>) {
    let queues: Vec<String> = (0..n).map(|i| unique(&format!("{prefix}{i}"))).collect();
    let mut ids = Vec::new();
    for q in &queues {
        mgmt.declare_classic(q).await;
        ids.push(api.enroll_queue(q, &target.url()).await);
    }
    for id in &ids {
        api.wait_state(id, "active", Duration::from_secs(60)).await;
    }
    (queues, ids)
}

/// One pool slot and more enrollments than RabbitMQ 4.0 lets one connection carry sessions
/// (64): the slot opens a second connection instead of asking the first for a session the
/// broker would refuse, and every enrollment gets its messages. On RabbitMQ 3.10, which takes
/// as many sessions as the client's channel-max, one connection carries them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_slot_opens_another_connection_when_the_broker_allows_no_more_sessions() {
    const ENROLLMENTS: usize = 70;
    let expected = broker_kind()
        .sessions_per_connection()
        .map_or(1, |per| ENROLLMENTS.div_ceil(per));
    pooled_enrollments(ENROLLMENTS, &[("AMQP_CONNECTION_POOL", "1")], expected).await;
}

/// `AMQP_LINKS_PER_SESSION=32`: 70 enrollments' links on three sessions of one connection,
/// every enrollment gets its messages, and deleting one closes its link only: the others on
/// its session keep flowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_slot_shares_sessions_between_links() {
    pooled_enrollments(
        70,
        &[
            ("AMQP_CONNECTION_POOL", "1"),
            ("AMQP_LINKS_PER_SESSION", "32"),
        ],
        1,
    )
    .await;
}

/// `enrollments` enrollments on a daemon with `env`: all active on `connections` broker
/// connections, a message each delivered, then one deleted and the rest still delivered.
async fn pooled_enrollments(enrollments: usize, env: &[(&str, &str)], connections: usize) {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let mgmt = Management::new();
    let target = Target::start().await;
    let (dir, db) = temp_db();
    let (mut child, api, _log) = daemon_process(&dir, &db, env).await;
    let (queues, ids) = enroll_classic_queues(&mgmt, &api, &target, "slot", enrollments).await;
    assert_eq!(
        broker_ports_of(child.id()).len(),
        connections,
        "{enrollments} enrollments on one pool slot"
    );
    let publish_to_each = |queues: Vec<String>, prefix: &'static str| async move {
        for q in &queues {
            let mut p = Publisher::connect(q).await;
            p.send_numbered(&format!("{prefix}{q}"), 0..1).await;
            p.close().await;
        }
    };
    publish_to_each(queues.clone(), "").await;
    wait_for(
        "a message to every enrollment",
        Duration::from_secs(30),
        || async { (target.accepted_bodies().len() == enrollments).then_some(()) },
    )
    .await;
    assert_eq!(api.delete(&ids[0]).await, 204);
    publish_to_each(queues[1..].to_vec(), "after-delete-").await;
    wait_for(
        "the others keep flowing after one is deleted",
        Duration::from_secs(30),
        || async { (target.accepted_bodies().len() == 2 * enrollments - 1).then_some(()) },
    )
    .await;
    let _ = child.kill();
    let _ = child.wait();
    for q in &queues {
        mgmt.delete_queue(q).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_message_is_dead_lettered_and_the_worker_goes_on() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let mgmt = Management::new();
    let queue = unique("malformed");
    let dlq = mgmt.declare_with_dead_letter(&queue, 5).await;
    // Two amqp-value sections ("foo", "bar") and a cut-off third: not a valid message.
    let malformed = [
        0x00, 0x53, 0x77, 0xa1, 0x03, b'f', b'o', b'o', 0x00, 0x53, 0x77, 0xa1, 0x03, b'b', b'a',
        b'r', 0x00, 0x53, 0x77,
    ];
    mgmt.publish_raw(&queue, &malformed, true).await;
    let mut publisher = Publisher::connect(&queue).await;
    publisher.send_numbered("good", 0..3).await;
    let target = Target::start().await;
    let (_dir, db) = temp_db();
    let daemon = Daemon::start(&db).await;
    let id = daemon.api.enroll_queue(&queue, &target.url()).await;
    wait_for("the good messages", Duration::from_secs(20), || async {
        (target.accepted_bodies().len() == 3).then_some(())
    })
    .await;
    mgmt.wait_depth(&dlq, 1, Duration::from_secs(20)).await;
    mgmt.wait_depth(&queue, 0, Duration::from_secs(20)).await;
    assert_eq!(target.count(), 3, "the malformed message was never POSTed");
    let e = daemon.api.enrollment(&id).await;
    assert_eq!(e["rejected"], 1, "{e}");
    assert!(
        e["last_error"]
            .as_str()
            .is_some_and(|s| s.contains("undecodable")),
        "{e}"
    );
    assert_eq!(e["state"], "active");
    publisher.close().await;
    daemon.stop().await;
    mgmt.delete_queue(&queue).await;
    mgmt.delete_queue(&dlq).await;
}
