//! The registry and the supervisor with a real SQLite store and fake links: what each change
//! does to the store, the map and the workers, what a restart loads, and how a crashed worker
//! is restarted.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::enrollment::outcome::FailureOutcome;
use crate::enrollment::policy::tests::defaults;
use crate::enrollment::record::NewEnrollment;
use crate::enrollment::status::WorkerState;
use crate::enrollment::target::{TargetAllowlist, TargetPolicy};
use crate::fleet::registry::{Created, Registry};
use crate::fleet::supervisor::Supervisor;
use crate::pipeline::fake::{Call, FakeBroker, FakeOpener, settlements};
use crate::pipeline::test_target::{Target, serve};
use crate::pipeline::tests::context;
use crate::store::{EnrollmentStore, SqliteStore};

const WAIT: Duration = Duration::from_secs(10);

struct Fleet {
    broker: FakeBroker,
    registry: Registry<FakeOpener>,
    supervisor: Supervisor<FakeOpener>,
    store: Arc<SqliteStore>,
    _dir: tempfile::TempDir,
}

async fn fleet(allowlist: &str, dir: Option<tempfile::TempDir>) -> Fleet {
    let dir = dir.unwrap_or_else(|| tempfile::tempdir().expect("tempdir"));
    let store = Arc::new(
        SqliteStore::open(&dir.path().join("fleet.sqlite"))
            .await
            .expect("store"),
    );
    let broker = FakeBroker::new(FailureOutcome::Modified);
    let supervisor = Supervisor::new(context(&broker), CancellationToken::new());
    let registry = Registry::load(
        Arc::clone(&store) as Arc<dyn EnrollmentStore>,
        supervisor.clone(),
        defaults(),
        TargetPolicy {
            allowlist: TargetAllowlist::parse(allowlist).expect("allowlist"),
            deny_private: false,
        },
    )
    .await
    .expect("load");
    Fleet {
        broker,
        registry,
        supervisor,
        store,
        _dir: dir,
    }
}

fn new_enrollment(target_url: &str) -> NewEnrollment {
    NewEnrollment::from_json(json!({"queue": "/amq/queue/q", "target_url": target_url}))
        .expect("valid")
}

async fn wait_state(registry: &Registry<FakeOpener>, id: uuid::Uuid, want: WorkerState) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let state = registry.get(id).map(|e| e.status.state());
        if state == Some(want) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "state stayed {state:?}, wanted {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn opens(calls: &[Call]) -> usize {
    calls.iter().filter(|c| **c == Call::Open).count()
}

#[tokio::test]
async fn create_pause_resume_delete_reach_store_map_and_worker() {
    let target = Target::default();
    let url = serve(target).await;
    let f = fleet("", None).await;

    let (created, live) = f
        .registry
        .create(new_enrollment(&url))
        .await
        .expect("create");
    assert_eq!(created, Created::New);
    let id = live.enrollment.id;
    wait_state(&f.registry, id, WorkerState::Active).await;
    let (again, same) = f
        .registry
        .create(new_enrollment(&url))
        .await
        .expect("create");
    assert_eq!((again, same.enrollment.id), (Created::Existing, id));
    assert_eq!(f.store.load_all().await.expect("load").len(), 1);
    f.broker.push("ok");
    f.broker
        .wait_for(WAIT, |c| !settlements(c).is_empty())
        .await;

    f.registry.set_paused(id, true).await.expect("pause");
    assert_eq!(live.status.state(), WorkerState::Paused);
    assert!(f.broker.calls().contains(&Call::Detach));
    assert!(f.store.load_all().await.expect("load")[0].paused);

    f.registry.set_paused(id, false).await.expect("resume");
    let calls = f.broker.wait_for(WAIT, |c| opens(c) == 2).await;
    assert_eq!(opens(&calls), 2, "{calls:?}");
    wait_state(&f.registry, id, WorkerState::Active).await;

    let exit = f.registry.delete(id).await.expect("delete").expect("known");
    assert!(exit.wait(WAIT).await, "the worker exits");
    let calls = f.broker.calls();
    assert_eq!(calls.last(), Some(&Call::Close), "{calls:?}");
    assert!(f.registry.get(id).is_none());
    assert!(f.store.load_all().await.expect("load").is_empty());
    assert!(f.registry.delete(id).await.expect("delete").is_none());
    f.supervisor.shutdown(WAIT).await;
}

#[tokio::test]
async fn a_restart_loads_what_was_stored_and_starts_only_what_may_run() {
    let target = Target::default();
    let url = serve(target).await;
    let f = fleet("", None).await;
    let (_, running) = f
        .registry
        .create(new_enrollment(&url))
        .await
        .expect("create");
    let paused_url = format!("{url}?paused");
    let (_, paused) = f
        .registry
        .create(new_enrollment(&paused_url))
        .await
        .expect("create");
    f.registry
        .set_paused(paused.enrollment.id, true)
        .await
        .expect("pause");
    f.supervisor.shutdown(WAIT).await;
    let dir = f._dir;

    // The same store, with an allowlist that no longer admits the targets.
    let refused = fleet("10.0.0.0/8", Some(dir)).await;
    let a = refused.registry.get(running.enrollment.id).expect("loaded");
    let b = refused.registry.get(paused.enrollment.id).expect("loaded");
    assert_eq!(a.status.state(), WorkerState::Stopped);
    assert!(a.status.last_error().is_some_and(|e| !e.is_empty()));
    // A refused target wins over the pause: stopped, with the reason shown.
    assert_eq!(b.status.state(), WorkerState::Stopped);
    assert!(b.status.paused());
    assert_eq!(opens(&refused.broker.calls()), 0, "nothing started");
    refused.supervisor.shutdown(WAIT).await;

    let dir = refused._dir;
    let allowed = fleet("", Some(dir)).await;
    wait_state(
        &allowed.registry,
        running.enrollment.id,
        WorkerState::Active,
    )
    .await;
    let b = allowed.registry.get(paused.enrollment.id).expect("loaded");
    assert_eq!(b.status.state(), WorkerState::Paused);
    assert_eq!(opens(&allowed.broker.calls()), 1, "only the unpaused one");
    allowed.supervisor.shutdown(WAIT).await;
}

#[tokio::test]
async fn a_crashed_worker_is_restarted_and_shows_why() {
    let target = Target::default();
    let url = serve(target).await;
    let f = fleet("", None).await;
    f.broker.panic_next_open();
    let (_, live) = f
        .registry
        .create(new_enrollment(&url))
        .await
        .expect("create");
    let calls = f.broker.wait_for(WAIT, |c| opens(c) >= 2).await;
    assert_eq!(opens(&calls), 2, "restarted after the panic: {calls:?}");
    wait_state(&f.registry, live.enrollment.id, WorkerState::Active).await;
    assert!(
        live.status
            .last_error()
            .is_some_and(|e| e.contains("worker panicked")),
        "{:?}",
        live.status.last_error()
    );
    f.broker.push("ok");
    let calls = f
        .broker
        .wait_for(WAIT, |c| !settlements(c).is_empty())
        .await;
    assert_eq!(settlements(&calls).len(), 1);
    f.supervisor.shutdown(WAIT).await;
    assert_eq!(live.status.state(), WorkerState::Stopped);
    assert_eq!(f.broker.calls().last(), Some(&Call::Detach));
}

#[tokio::test]
async fn shutdown_stops_every_worker_within_the_grace_period() {
    let target = Target::default();
    let url = serve(target).await;
    let f = fleet("", None).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let (_, live) = f
            .registry
            .create(new_enrollment(&format!("{url}?{i}")))
            .await
            .expect("create");
        ids.push(live.enrollment.id);
    }
    for id in &ids {
        wait_state(&f.registry, *id, WorkerState::Active).await;
    }
    let started = tokio::time::Instant::now();
    f.supervisor.shutdown(WAIT).await;
    assert!(started.elapsed() < WAIT);
    assert!(f.supervisor.is_shutting_down());
    let calls = f.broker.calls();
    assert_eq!(calls.iter().filter(|c| **c == Call::Detach).count(), 5);
    for id in ids {
        assert_eq!(
            f.registry.get(id).expect("kept").status.state(),
            WorkerState::Stopped
        );
    }
    // Starting after shutdown is a no-op.
    let (_, late) = f
        .registry
        .create(new_enrollment(&format!("{url}?late")))
        .await
        .expect("create");
    // A negative: nothing may open. `start` spawns nothing after shutdown, so a short look
    // would see a wrongly spawned worker's open.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(opens(&f.broker.calls()), 5);
    assert_ne!(late.status.state(), WorkerState::Active);
}
