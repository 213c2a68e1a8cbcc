//! Secrets at rest, end to end: with `SECRETS_KEY` set, no target credential, signing secret
//! or URL password is in the SQLite file (nor its WAL); after a restart the enrollments still
//! deliver with the right credentials; without the key they are listed stopped with a reason
//! and the daemon still serves; a rotation (`SECRETS_KEY` new, `SECRETS_KEY_PREVIOUS` old)
//! rewrites the file so that the new key alone then opens it.

mod common;

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use common::*;
use hmac::{KeyInit, Mac};
use hot_potato::seal::SecretKey;
use serde_json::{Value, json};

const BASIC_PASSWORD: &str = "pw-3f9a7c1e-basic";
const BEARER_TOKEN: &str = "tok-8d2b5e90-bearer";
const SIGNING_SECRET: &str = "sig-51c4aa07-signing";
const URL_PASSWORD: &str = "urlpw-e6f3019b";
const SECRETS: [&str; 4] = [BASIC_PASSWORD, BEARER_TOKEN, SIGNING_SECRET, URL_PASSWORD];

/// The three enrollments: (queue, what the target must see in `Authorization`).
struct Enrolled {
    queues: [String; 3],
    ids: Vec<String>,
}

fn key() -> String {
    STANDARD.encode([0x5au8; 32])
}

fn new_key() -> String {
    STANDARD.encode([0xa5u8; 32])
}

/// Every byte of the database and its WAL and shared-memory files, if present.
fn file_bytes(db: &Path) -> Vec<u8> {
    let mut all = Vec::new();
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let path = format!("{}{suffix}", db.display());
        if let Ok(bytes) = std::fs::read(&path) {
            all.extend(bytes);
        }
    }
    assert!(!all.is_empty(), "the database file exists");
    all
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

fn assert_no_secret_in(db: &Path) {
    let bytes = file_bytes(db);
    for secret in SECRETS {
        assert!(
            !contains(&bytes, secret),
            "{secret} is in the database file"
        );
    }
}

async fn enroll_all(daemon: &Daemon, target: &Target) -> Enrolled {
    let mgmt = Management::new();
    let queues = [unique("sec-url"), unique("sec-basic"), unique("sec-bearer")];
    for q in &queues {
        mgmt.declare_classic(q).await;
    }
    let url = target.url();
    let with_password = url.replacen("http://", &format!("http://ann:{URL_PASSWORD}@"), 1);
    let signing = json!({"secret": SIGNING_SECRET});
    let bodies = [
        json!({"queue": address(&queues[0]), "target_url": with_password,
               "delivery": {"signing": signing}}),
        json!({"queue": address(&queues[1]), "target_url": url,
               "delivery": {"auth": {"type": "basic", "username": "bob", "password": BASIC_PASSWORD},
                            "signing": signing}}),
        json!({"queue": address(&queues[2]), "target_url": url,
               "delivery": {"auth": {"type": "bearer", "token": BEARER_TOKEN}}}),
    ];
    let mut ids = Vec::new();
    for body in bodies {
        let created = daemon.api.enroll(body).await;
        assert_no_secret_shown(&created);
        ids.push(created["id"].as_str().expect("id").to_string());
    }
    for id in &ids {
        daemon
            .api
            .wait_state(id, "active", Duration::from_secs(20))
            .await;
    }
    Enrolled { queues, ids }
}

fn assert_no_secret_shown(answer: &Value) {
    let text = answer.to_string();
    for secret in SECRETS {
        assert!(!text.contains(secret), "{secret} shown in {text}");
    }
}

/// Publishes one message per queue (the body names the queue) and checks what the target
/// received for each: the right `Authorization` and, where signing is set, a signature made
/// with the signing secret.
/// Asserts that the file holds values sealed with `key`; its key id.
fn assert_sealed_with(db: &Path, key: &str) -> String {
    let id = SecretKey::from_base64(key).expect("key").id().to_string();
    assert!(
        contains(&file_bytes(db), &id),
        "values are sealed with key {id}"
    );
    id
}

async fn delete_queues(enrolled: &Enrolled) {
    let mgmt = Management::new();
    for q in &enrolled.queues {
        mgmt.delete_queue(q).await;
    }
}

/// Starts the daemon with `env` and waits until every enrollment in `ids` is active.
async fn start_active(db: &Path, env: &[(&str, &str)], ids: &[String]) -> Daemon {
    let daemon = Daemon::start_with(db, env).await;
    daemon.api.wait_healthy().await;
    for id in ids {
        daemon
            .api
            .wait_state(id, "active", Duration::from_secs(20))
            .await;
    }
    daemon
}

async fn assert_delivers_with_credentials(enrolled: &Enrolled, target: &Target) {
    let before = target.received().len();
    for q in &enrolled.queues {
        let mut publisher = Publisher::connect(q).await;
        publisher
            .send(
                fe2o3_amqp::types::messaging::Message::builder()
                    .value(q.clone())
                    .build(),
            )
            .await;
        publisher.close().await;
    }
    let received = wait_for("a POST per queue", Duration::from_secs(20), || async {
        let got = target.received();
        (got.len() >= before + 3).then_some(got)
    })
    .await;
    let basic = |user: &str, pw: &str| format!("Basic {}", STANDARD.encode(format!("{user}:{pw}")));
    let expected = [
        (Some(basic("ann", URL_PASSWORD)), true),
        (Some(basic("bob", BASIC_PASSWORD)), true),
        (Some(format!("Bearer {BEARER_TOKEN}")), false),
    ];
    for (q, (authorization, signed)) in enrolled.queues.iter().zip(expected) {
        let got = received[before..]
            .iter()
            .rev()
            .find(|r| r.text().contains(q.as_str()))
            .unwrap_or_else(|| panic!("no POST for {q}"));
        assert_eq!(
            got.header("authorization").map(str::to_string),
            authorization,
            "{q}"
        );
        if signed {
            let id = got.header("webhook-id").expect("webhook-id");
            let ts = got.header("webhook-timestamp").expect("webhook-timestamp");
            let mut mac =
                hmac::Hmac::<sha2::Sha256>::new_from_slice(SIGNING_SECRET.as_bytes()).expect("key");
            mac.update(format!("{id}.{ts}.").as_bytes());
            mac.update(&got.body);
            let expected = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
            assert_eq!(
                got.header("webhook-signature"),
                Some(expected.as_str()),
                "{q}"
            );
        } else {
            assert_eq!(got.header("webhook-signature"), None, "{q}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_sealed_on_disk_survive_restarts_and_rotate() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let target = Target::start().await;
    let (_dir, db) = temp_db();
    let (old_key, new_key) = (key(), new_key());

    // 1. Enroll with SECRETS_KEY; nothing secret reaches the file.
    let daemon = start_active(&db, &[("SECRETS_KEY", &old_key)], &[]).await;
    let enrolled = enroll_all(&daemon, &target).await;
    let (_, listed) = daemon.api.get("/enrollments").await;
    assert_no_secret_shown(&listed);
    // Checked while the daemon runs too: the WAL holds the latest writes then.
    assert_no_secret_in(&db);
    daemon.stop().await;
    assert_no_secret_in(&db);
    let old_id = assert_sealed_with(&db, &old_key);

    // 2. Same key again: the enrollments deliver with the credentials as given.
    let daemon = start_active(&db, &[("SECRETS_KEY", &old_key)], &enrolled.ids).await;
    assert_delivers_with_credentials(&enrolled, &target).await;
    daemon.stop().await;

    // 3. No key: listed stopped with the reason, never run; the daemon still serves.
    let daemon = Daemon::start(&db).await;
    daemon.api.wait_healthy().await;
    for id in &enrolled.ids {
        let shown = daemon.api.enrollment(id).await;
        assert_eq!(shown["state"], "stopped", "{shown}");
        let reason = shown["last_error"].as_str().unwrap_or_default();
        assert!(
            reason.contains(&format!(
                "sealed with key {old_id}, which is neither SECRETS_KEY nor SECRETS_KEY_PREVIOUS"
            )),
            "{shown}"
        );
        assert_no_secret_shown(&shown);
    }
    let (status, _) = daemon.api.get("/health").await;
    assert_eq!(status, 200);
    daemon.stop().await;
    assert_no_secret_in(&db);

    // 4. Rotation: the new key with the old one as previous opens everything and rewrites it.
    let daemon = start_active(
        &db,
        &[
            ("SECRETS_KEY", &new_key),
            ("SECRETS_KEY_PREVIOUS", &old_key),
        ],
        &enrolled.ids,
    )
    .await;
    daemon.stop().await;
    assert_no_secret_in(&db);
    assert_sealed_with(&db, &new_key);

    // 5. The new key alone: everything opens and delivers; the old key is no longer needed.
    let daemon = start_active(&db, &[("SECRETS_KEY", &new_key)], &enrolled.ids).await;
    assert_delivers_with_credentials(&enrolled, &target).await;
    daemon.stop().await;
    assert_no_secret_in(&db);

    delete_queues(&enrolled).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_stored_in_clear_are_sealed_at_the_first_start_with_a_key() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let target = Target::start().await;
    let (_dir, db) = temp_db();

    // Without a key the secrets are in the file: the search below does find them.
    let daemon = Daemon::start(&db).await;
    daemon.api.wait_healthy().await;
    let enrolled = enroll_all(&daemon, &target).await;
    daemon.stop().await;
    let bytes = file_bytes(&db);
    for secret in SECRETS {
        assert!(
            contains(&bytes, secret),
            "{secret} is stored in clear without a key"
        );
    }

    // The first start with a key rewrites them; none is left behind in free space.
    let daemon = start_active(&db, &[("SECRETS_KEY", &key())], &enrolled.ids).await;
    assert_delivers_with_credentials(&enrolled, &target).await;
    daemon.stop().await;
    assert_no_secret_in(&db);

    delete_queues(&enrolled).await;
}
