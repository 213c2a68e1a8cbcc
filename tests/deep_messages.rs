//! Messages nested deeper than the decoder's stack allows, through the real broker. The AMQP
//! decoder recurses once per level on the worker's stack, so a message nested ten thousand
//! levels deep used to abort the whole process, and the broker redelivered it into the same
//! crash. Now the payload's depth is walked before decoding (`src/amqp/depth.rs`): a message
//! nested deeper than `MAX_DEPTH` is rejected with that reason and dead-lettered, one at the
//! bound is decoded and POSTed, and the messages around them flow. Run it in a release build
//! too (`cargo test --release --test deep_messages`): the stack is the same 2 MiB there.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use fe2o3_amqp::types::messaging::{AmqpValue, Message};
use hot_potato::amqp::depth::MAX_DEPTH;
use hot_potato::delivery::amqp_json::{MAX_JSON_DEPTH, TOO_DEEP};

/// Deep enough to overflow a 2 MiB stack many times over in any build.
const DEEP: usize = 10_000;

/// `levels` list32s around the smallint 1, written front to back: building and encoding a
/// `Value` this deep would recurse in the test itself.
fn nested_lists(levels: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 * levels + 2);
    for k in 0..levels {
        let size = 4 + 9 * (levels - k - 1) + 2;
        out.push(0xd0);
        out.extend_from_slice(&u32::try_from(size).expect("fits").to_be_bytes());
        out.extend_from_slice(&1u32.to_be_bytes());
    }
    out.extend_from_slice(&[0x54, 0x01]);
    out
}

/// An amqp-value section holding the encoded `value`.
fn amqp_value(value: &[u8]) -> Vec<u8> {
    [&[0x00, 0x53, 0x77][..], value].concat()
}

/// An amqp-value section holding the string `s` (shorter than 256 bytes).
fn amqp_string(s: &str) -> Vec<u8> {
    let len = u8::try_from(s.len()).expect("short");
    [&[0x00, 0x53, 0x77, 0xa1, len][..], s.as_bytes()].concat()
}

/// A message-annotations section `{x-opt-deep: value}`.
fn annotations(value: &[u8]) -> Vec<u8> {
    let key = b"x-opt-deep";
    let size = 4 + 2 + key.len() + value.len();
    let mut out = vec![0x00, 0x53, 0x72, 0xd1];
    out.extend_from_slice(&u32::try_from(size).expect("fits").to_be_bytes());
    out.extend_from_slice(&2u32.to_be_bytes());
    out.extend_from_slice(&[0xa3, key.len() as u8]);
    out.extend_from_slice(key);
    out.extend_from_slice(value);
    out
}

fn text(body: &str) -> Message<AmqpValue<String>> {
    Message::builder().value(body.to_string()).build()
}

/// Asks `/health` every 20 ms until dropped; counts the answers that were not 200.
struct HealthWatch {
    answered: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl HealthWatch {
    fn start(base: &str) -> Self {
        let answered = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let (a, f) = (answered.clone(), failed.clone());
        let url = format!("{base}/health");
        let task = tokio::spawn(async move {
            let http = reqwest::Client::new();
            loop {
                match http.get(&url).send().await {
                    Ok(res) if res.status() == 200 => a.fetch_add(1, Ordering::Relaxed),
                    _ => f.fetch_add(1, Ordering::Relaxed),
                };
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        Self {
            answered,
            failed,
            task,
        }
    }

    /// (answered 200, anything else) so far.
    fn counts(&self) -> (usize, usize) {
        (
            self.answered.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

impl Drop for HealthWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_nested_past_the_bound_are_dead_lettered_and_the_daemon_goes_on() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    let mgmt = Management::new();
    let queue = unique("deepnest");
    let dlq = mgmt.declare_with_dead_letter(&queue, 3).await;
    let target = Target::start().await;
    let (_dir, db) = temp_db();
    let daemon = Daemon::start(&db).await;
    let id = daemon.api.enroll_active(&queue, &target.url()).await;
    let health = HealthWatch::start(&daemon.base);

    let mut publisher = Publisher::connect(&queue).await;
    publisher.send(text("deep-1")).await;
    // A body nested 10,000 levels (about 90 KB).
    mgmt.publish_raw(&queue, &amqp_value(&nested_lists(DEEP)), true)
        .await;
    // A plain body behind a message annotation nested 30,000 levels: about 270 KB, more than
    // the 256 KiB frames the daemon accepts, so the payload is checked across its frames.
    let annotated = [
        annotations(&nested_lists(3 * DEEP)),
        amqp_string("deep-annotated"),
    ]
    .concat();
    mgmt.publish_raw(&queue, &annotated, true).await;
    // Exactly at the bound: the section and 255 lists. Decoded, then cut by the JSON bound.
    mgmt.publish_raw(&queue, &amqp_value(&nested_lists(MAX_DEPTH - 1)), true)
        .await;
    publisher.send(text("deep-3")).await;

    let marker = format!(
        "{}\"{TOO_DEEP}\"{}",
        "[".repeat(MAX_JSON_DEPTH),
        "]".repeat(MAX_JSON_DEPTH)
    );
    let expected = ["deep-1", marker.as_str(), "deep-3"];
    wait_for(
        "the messages within the bound POSTed",
        Duration::from_secs(60),
        || async {
            let got = target.accepted_bodies();
            expected
                .iter()
                .all(|b| got.iter().any(|g| g == b))
                .then_some(())
        },
    )
    .await;
    mgmt.wait_depth(&dlq, 2, Duration::from_secs(30)).await;
    mgmt.wait_depth(&queue, 0, Duration::from_secs(30)).await;

    let received = target.received();
    assert_eq!(
        received.len(),
        3,
        "only the messages within the bound POSTed"
    );
    assert!(
        !received.iter().any(|r| r.text() == "deep-annotated"),
        "the deeply annotated message was not decoded"
    );
    let at_bound = received
        .iter()
        .find(|r| r.text() == marker)
        .expect("the message at the bound");
    assert_eq!(at_bound.header("content-type"), Some("application/json"));

    let e = daemon.api.enrollment(&id).await;
    assert_eq!(e["state"], "active", "{e}");
    assert_eq!(e["delivered"], 3, "{e}");
    assert_eq!(e["rejected"], 2, "{e}");
    assert_eq!(e["failed"], 0, "{e}");
    let last_error = e["last_error"].as_str().unwrap_or_default();
    assert!(
        last_error.contains(&format!("nested deeper than {MAX_DEPTH} levels")),
        "{e}"
    );
    assert!(!last_error.contains("worker panicked"), "{e}");

    let (answered, failed) = health.counts();
    println!("/health answered {answered} times while the deep messages passed, {failed} not");
    assert!(answered > 0);
    assert_eq!(failed, 0, "/health always answered 200");
    let (status, _) = daemon.api.get("/health").await;
    assert_eq!(status, 200);

    drop(health);
    publisher.close().await;
    daemon.stop().await;
    mgmt.delete_queue(&queue).await;
    mgmt.delete_queue(&dlq).await;
}
