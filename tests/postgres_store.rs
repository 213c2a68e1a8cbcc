//! The PostgreSQL store on a real server (a database of its own, see `common::postgres`):
//! replicas starting together apply the migrations once, rows round-trip as SQLite's do, the
//! unique pair is the store's to decide, a row with unreadable settings loads marked, the
//! sealing wrapper keeps secrets out of the table, and a deleted durable enrollment leaves a
//! pending close that one replica at a time claims, until it is closed.

mod common;

use common::postgres::TestDatabase;
use hot_potato::enrollment::record::{Enrollment, SubscriptionArgs};
use hot_potato::enrollment::settings::{Auth, DeliverySettings};
use hot_potato::seal::{Keyring, SecretKey};
use hot_potato::store::{EnrollmentStore, PostgresStore, SealedStore};
use std::time::Duration;
use uuid::Uuid;

fn sample(queue: &str) -> Enrollment {
    Enrollment {
        id: Uuid::new_v4(),
        queue: queue.into(),
        target_url: "http://127.0.0.1:1/x".into(),
        subscription_args: SubscriptionArgs {
            durable: Some(true),
            ..Default::default()
        },
        created_at: "2026-01-01T00:00:00Z".into(),
        delivery: DeliverySettings {
            max_in_flight: Some(4),
            ..Default::default()
        },
        paused: false,
    }
}

#[tokio::test]
async fn replicas_starting_together_migrate_once_and_rows_round_trip() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let url = db.url.clone();
    let starts = (0..4).map(move |_| {
        let url = url.clone();
        async move { PostgresStore::connect(&url).await }
    });
    let stores: Vec<PostgresStore> = futures_all(starts).await;
    let (a, b) = (&stores[0], &stores[1]);
    assert!(
        a.describe().contains("PostgreSQL at 127.0.0.1"),
        "{}",
        a.describe()
    );
    assert!(
        !a.describe().contains("hotpotato:"),
        "no credentials: {}",
        a.describe()
    );

    let first = sample("a");
    a.insert(first.clone()).await.expect("insert");
    a.insert(sample("b")).await.expect("insert");
    let all = b.load_all().await.expect("load");
    assert_eq!(all.len(), 2);
    assert!(all.contains(&first));
    assert_eq!(
        b.load_one(first.id)
            .await
            .expect("one")
            .map(|r| r.enrollment),
        Some(first.clone())
    );
    b.set_paused(first.id, true).await.expect("pause");
    let paused = a.load_one(first.id).await.expect("one").expect("stored");
    assert!(paused.enrollment.paused);
    // The same queue and target cannot be stored twice, from any replica.
    let mut again = sample("a");
    again.target_url = first.target_url.clone();
    assert!(b.insert(again).await.is_err());
    assert!(a.delete(first.id).await.expect("delete"));
    assert!(!b.delete(first.id).await.expect("delete again"));
    assert_eq!(a.load_all().await.expect("load").len(), 1);
    a.check_writable().await.expect("writable");

    // A row another version wrote loads marked, the others as stored.
    let odd = sample("odd");
    a.insert(odd.clone()).await.expect("insert");
    db.execute(&format!(
        "UPDATE enrollments SET delivery = '{{\"colour\": 1}}' WHERE id = '{}'",
        odd.id
    ))
    .await
    .expect("update");
    let row = a.load_one(odd.id).await.expect("one").expect("stored");
    let reason = row.unreadable.expect("marked");
    assert!(reason.contains("colour"), "{reason}");
    assert_eq!(a.load_stored().await.expect("load").len(), 2);
}

#[tokio::test]
async fn secrets_are_sealed_in_the_table() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let keys = Keyring {
        current: Some(SecretKey::from_bytes([7; 32])),
        previous: None,
    };
    let inner = PostgresStore::connect(&db.url).await.expect("connect");
    let store = SealedStore::start(inner.clone(), keys)
        .await
        .expect("sealed");
    let mut e = sample("secret");
    e.delivery.auth = Some(Auth::Bearer {
        token: "tok-5ea1ed-in-the-table".into(),
    });
    store.insert(e.clone()).await.expect("insert");
    let raw = inner.load_one(e.id).await.expect("raw").expect("stored");
    assert!(!format!("{:?}", raw.enrollment).contains("tok-5ea1ed"));
    let opened = store.load_one(e.id).await.expect("one").expect("stored");
    assert_eq!(opened.enrollment, e);
}

#[tokio::test]
async fn a_deleted_durable_enrollment_leaves_a_pending_close_until_it_is_closed() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let a = PostgresStore::connect(&db.url).await.expect("connect");
    let b = PostgresStore::connect(&db.url).await.expect("connect");
    let durable = sample("durable");
    let mut plain = sample("plain");
    plain.subscription_args.durable = None;
    for e in [&durable, &plain] {
        a.insert(e.clone()).await.expect("insert");
        assert!(a.delete(e.id).await.expect("delete"));
    }
    // Only the durable one leaves something on the broker.
    let pending = b.pending_closes().await.expect("pending");
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!((pending[0].id, pending[0].attempts), (durable.id, 0));
    assert!(pending[0].requested_at.ends_with('Z'), "{pending:?}");

    let (lease, claim) = (Duration::from_secs(60), Duration::from_secs(60));
    // Within the owner's lease nobody claims it.
    assert!(
        b.claim_closes(lease, claim, 10)
            .await
            .expect("claim")
            .is_empty()
    );
    // Due: one replica gets it, with what closing needs; the other then finds it claimed.
    let claimed = b
        .claim_closes(Duration::ZERO, claim, 10)
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].id, durable.id);
    assert_eq!(claimed[0].queue, durable.queue);
    assert_eq!(claimed[0].subscription_args, durable.subscription_args);
    assert!(
        a.claim_closes(Duration::ZERO, claim, 10)
            .await
            .expect("claim")
            .is_empty()
    );

    // A failed attempt is kept, with its reason, and waits before the next.
    a.close_failed(durable.id, "the broker refused the link".into())
        .await
        .expect("record");
    let pending = b.pending_closes().await.expect("pending");
    assert_eq!(pending[0].attempts, 1);
    assert_eq!(
        pending[0].last_error.as_deref(),
        Some("the broker refused the link")
    );
    assert!(
        a.claim_closes(Duration::ZERO, claim, 10)
            .await
            .expect("claim")
            .is_empty()
    );
    // An expired claim (a replica died mid-attempt) is anybody's again.
    db.execute("UPDATE pending_closes SET claimed_until = now() - interval '1 second'")
        .await
        .expect("expire");
    let claimed = a
        .claim_closes(Duration::ZERO, claim, 10)
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 1);

    a.subscription_closed(durable.id).await.expect("closed");
    assert!(b.pending_closes().await.expect("pending").is_empty());
    db.execute("UPDATE pending_closes SET claimed_until = NULL")
        .await
        .expect("update");
    assert!(
        b.claim_closes(Duration::ZERO, claim, 10)
            .await
            .expect("claim")
            .is_empty()
    );
}

/// Runs the connects at once (replicas starting together) and unwraps each.
async fn futures_all<F>(starts: impl Iterator<Item = F>) -> Vec<PostgresStore>
where
    F: std::future::Future<Output = Result<PostgresStore, hot_potato::store::StoreError>>
        + Send
        + 'static,
{
    let handles: Vec<_> = starts.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("join").expect("connect"));
    }
    out
}
