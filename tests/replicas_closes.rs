//! Replicas on one PostgreSQL database (as processes, so `kill -9` is real) against the test
//! kit's in-memory AMQP peer, frames asserted: a DELETE made while no live replica runs the
//! enrollment (its owner killed, its lease not yet expired) still closes the durable
//! subscription (`detach{closed: true}`), once, by the survivor, a lease later; a DELETE
//! while the owner lives is closed once, by the owner, and nobody closes it again; a close the
//! broker refuses is kept and tried again until it goes through; the broker's password is in
//! no log.
//!
//! Each test makes its own database (see `common::postgres`).

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use common::postgres::TestDatabase;
use common::replica::{Replica, replica};
use common::*;
use fe2o3_amqp::types::definitions::{self, AmqpError};
use hot_potato_testkit::peer::{Fault, Peer, PeerConfig, SourceAnswer};
use serde_json::{Value, json};
use tokio::time::Instant;

/// The lease: short, so the test is quick; long beside a debug build's ticks.
const TTL_MS: u64 = 2_000;
const TTL: Duration = Duration::from_millis(TTL_MS);
/// The broker password the replicas are given: it must appear in no log.
const PASSWORD: &str = "pw-5ecret-in-no-log";

/// Two replicas on one database and one peer, and a durable enrollment one of them runs.
struct Owned {
    peer: Peer,
    _db: TestDatabase,
    dir: tempfile::TempDir,
    owner: Replica,
    survivor: Replica,
    id: String,
    /// The link's name, `hot-potato-<id>`.
    name: String,
}

async fn a_durable_enrollment_on_one_of_two() -> Option<Owned> {
    let db = TestDatabase::create().await?;
    let peer = Peer::start(PeerConfig::default().with_source(SourceAnswer::artemis()));
    let addr = peer.listen().await.expect("peer listens");
    let url = format!("amqp://hot-potato:{PASSWORD}@{addr}");
    let env = [("AMQP_URL", url.as_str()), ("RECONNECT_MAX_MS", "300")];
    let dir = tempfile::tempdir().expect("tempdir");
    let a = replica(&db.url, dir.path(), "a", TTL_MS, &env).await;
    let b = replica(&db.url, dir.path(), "b", TTL_MS, &env).await;
    // Both know both before the enrollment exists, so it goes to its owner once, no handover.
    for r in [&a, &b] {
        wait_for("both replicas live", Duration::from_secs(10), || async {
            let (_, body) = r.api.get("/replicas").await;
            (body["replicas"].as_array().map(Vec::len) == Some(2)).then_some(())
        })
        .await;
    }
    let target = Target::start().await;
    let e = a
        .api
        .enroll(json!({"queue": "events", "target_url": target.url(),
                       "subscription_args": {"durable": true}}))
        .await;
    let id = e["id"].as_str().expect("id").to_string();
    // As B sees it (B lists it within a second: 404 until then).
    let owner = wait_for("run by a replica", Duration::from_secs(20), || async {
        let (status, e) = b.api.get(&format!("/enrollments/{id}")).await;
        let owner = e["replica"].as_str().map(str::to_owned);
        (status == 200 && e["state"] == "active")
            .then_some(owner)
            .flatten()
    })
    .await;
    let (owner, survivor) = if owner == a.id { (a, b) } else { (b, a) };
    owner
        .api
        .wait_state(&id, "active", Duration::from_secs(10))
        .await;
    let name = format!("hot-potato-{id}");
    assert_eq!(attaches_named(&peer, &name), 1, "the owner's link");
    Some(Owned {
        peer,
        _db: db,
        dir,
        owner,
        survivor,
        id,
        name,
    })
}

/// Every `detach{closed: true}` of the link called `name`: when, and on which connection.
fn closes_of(peer: &Peer, name: &str) -> Vec<(Instant, u64)> {
    let mut names: HashMap<(u64, u16, u32), String> = HashMap::new();
    let mut closes = Vec::new();
    for f in peer.frames() {
        let link = |handle: u32| (f.connection, f.channel, handle);
        if let Some(a) = f.as_attach() {
            names.insert(link(a.handle.0), a.name.clone());
        } else if let Some(d) = f.as_detach()
            && d.closed
            && names.get(&link(d.handle.0)).is_some_and(|n| n == name)
        {
            closes.push((f.at, f.connection));
        }
    }
    closes
}

fn attaches_named(peer: &Peer, name: &str) -> usize {
    peer.attaches().iter().filter(|a| a.name == name).count()
}

/// The connections the link called `name` was attached on, in order.
fn connections_of(peer: &Peer, name: &str) -> Vec<u64> {
    peer.frames()
        .iter()
        .filter(|f| f.as_attach().is_some_and(|a| a.name == name))
        .map(|f| f.connection)
        .collect()
}

async fn pending_closes(api: &Api) -> Vec<Value> {
    let (_, stats) = api.get("/stats").await;
    stats["pending_closes"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

async fn no_pending_close_left(o: &Owned) {
    wait_for("no pending close left", Duration::from_secs(5), || async {
        pending_closes(&o.survivor.api)
            .await
            .is_empty()
            .then_some(())
    })
    .await;
}

/// No pending close is left, and two more leases later (time for any replica's sweep to
/// take it again, wrongly) the subscription was still closed once, after `attaches` attaches.
async fn closed_once_and_forgotten(o: &Owned, attaches: usize, which: &str) {
    no_pending_close_left(o).await;
    tokio::time::sleep(2 * TTL).await;
    assert_eq!(closes_of(&o.peer, &o.name).len(), 1, "closed once");
    assert_eq!(attaches_named(&o.peer, &o.name), attaches, "{which}");
}

fn assert_no_password_in_logs(dir: &Path) {
    for name in ["a.log", "b.log"] {
        let log = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        assert!(!log.is_empty(), "{name} is empty");
        assert!(!log.contains(PASSWORD), "{name} shows the broker password");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_while_the_owner_is_dead_is_closed_once_by_the_survivor_a_lease_later() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let Some(mut o) = a_durable_enrollment_on_one_of_two().await else {
        return;
    };
    assert!(
        closes_of(&o.peer, &o.name).is_empty(),
        "nothing closed it yet"
    );
    let owners_connection = connections_of(&o.peer, &o.name)[0];
    o.owner.process.signal("KILL").expect("kill -9");
    // At once: the owner's lease has most of its time to run.
    assert_eq!(o.survivor.api.delete(&o.id).await, 204);
    let deleted = Instant::now();
    let pending = pending_closes(&o.survivor.api).await;
    assert!(
        pending.iter().any(|p| p["id"] == o.id.as_str()),
        "listed as pending meanwhile: {pending:?}"
    );

    // A tick and the attach on top of the lease; a debug build on a busy machine gets 3 s.
    let limit = TTL + Duration::from_secs(3);
    let (closed_at, connection) = wait_for("the subscription closed", limit, || async {
        closes_of(&o.peer, &o.name).first().copied()
    })
    .await;
    let after = closed_at.duration_since(deleted);
    eprintln!("closed {after:?} after the DELETE (lease {TTL_MS} ms)");
    // Not before the owner's window ran out: a live owner would still have been closing it.
    assert!(
        after + Duration::from_millis(500) >= TTL,
        "closed {after:?} after the DELETE, within the owner's lease"
    );
    assert_ne!(connection, owners_connection, "closed by the survivor");
    closed_once_and_forgotten(
        &o,
        2,
        "the owner's link and the survivor's attach to close it",
    )
    .await;
    let _ = o.owner.process.wait_exit(Duration::from_secs(5)).await;
    drop(o.survivor);
    assert_no_password_in_logs(o.dir.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_while_the_owner_lives_is_closed_once_by_the_owner() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let Some(o) = a_durable_enrollment_on_one_of_two().await else {
        return;
    };
    let owners_connection = connections_of(&o.peer, &o.name)[0];
    assert_eq!(o.survivor.api.delete(&o.id).await, 204);
    let (_, connection) = wait_for("the owner closes it", Duration::from_secs(5), || async {
        closes_of(&o.peer, &o.name).first().copied()
    })
    .await;
    assert_eq!(connection, owners_connection, "closed on the owner's link");
    closed_once_and_forgotten(&o, 1, "the owner's link only").await;
    drop((o.owner, o.survivor));
    assert_no_password_in_logs(o.dir.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_the_broker_refuses_is_kept_and_tried_again_until_it_goes_through() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let Some(mut o) = a_durable_enrollment_on_one_of_two().await else {
        return;
    };
    o.owner.process.signal("KILL").expect("kill -9");
    o.peer.arm_always(Fault::RefuseAttach {
        address: None,
        error: definitions::Error::new(AmqpError::ResourceLocked, Some("busy".to_string()), None),
    });
    assert_eq!(o.survivor.api.delete(&o.id).await, 204);
    let failed = wait_for(
        "a failed close recorded",
        TTL + Duration::from_secs(5),
        || async {
            let pending = pending_closes(&o.survivor.api).await;
            pending
                .into_iter()
                .find(|p| p["id"] == o.id.as_str() && p["attempts"].as_u64() >= Some(1))
        },
    )
    .await;
    let reason = failed["last_error"].as_str().unwrap_or_default();
    assert!(reason.contains("busy"), "{failed}");
    assert!(!reason.contains(PASSWORD), "{failed}");

    o.peer.disarm();
    let disarmed = Instant::now();
    // The next try waits 2 s after the first failure, 4 s after the second.
    wait_for(
        "the retry goes through",
        Duration::from_secs(20),
        || async {
            closes_of(&o.peer, &o.name)
                .iter()
                .any(|(at, _)| *at > disarmed)
                .then_some(())
        },
    )
    .await;
    no_pending_close_left(&o).await;
    let after: Vec<_> = closes_of(&o.peer, &o.name)
        .into_iter()
        .filter(|(at, _)| *at > disarmed)
        .collect();
    assert_eq!(
        after.len(),
        1,
        "one close once the broker takes it: {after:?}"
    );
    let _ = o.owner.process.wait_exit(Duration::from_secs(5)).await;
    drop(o.survivor);
    assert_no_password_in_logs(o.dir.path());
}
