//! The worker's AMQP frames, asserted exactly: the daemon's real link code (fe2o3-amqp) talks
//! to the in-memory peer of the test kit, which plays RabbitMQ 3.x or Artemis at attach and
//! logs every frame the worker sends. Covers what a real broker can't show on demand: the
//! disposition state for each answer, the failure outcome chosen from the advertised outcomes
//! and the default outcome, `detach.closed`, link credit following the breaker, and the source
//! of a durable subscription.

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use fe2o3_amqp::types::messaging::{
    DeliveryState, Modified, Outcome, TerminusDurability, TerminusExpiryPolicy,
};
use fe2o3_amqp::types::performatives::{Detach, Disposition};
use hot_potato::amqp::connection::{BrokerSettings, Dialer};
use hot_potato::backoff::BackoffSettings;
use hot_potato::config::Config;
use hot_potato::enrollment::live::LiveEnrollment;
use hot_potato::enrollment::outcome::FailureOutcomePolicy;
use hot_potato::enrollment::record::NewEnrollment;
use hot_potato::enrollment::status::WorkerState;
use hot_potato::pipeline::link::AmqpOpener;
use hot_potato::pipeline::settle::SettleBatching;
use hot_potato::pipeline::worker::{WorkerContext, WorkerEnd, run};
use hot_potato::shutdown::StopSignals;
use hot_potato::telemetry::metrics::Metrics;
use hot_potato_testkit::peer::{Peer, PeerConfig, SourceAnswer, TestMessage};
use serde_json::json;
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(10);
const QUEUE: &str = "orders";

/// Answers by body: `reject` 422, `fail` 400, anything else 200; a non-zero `forced` status
/// overrides them.
async fn answer(State(forced): State<Arc<AtomicU16>>, body: Bytes) -> StatusCode {
    let code = match (forced.load(Ordering::SeqCst), &body[..]) {
        (0, b"reject") => 422,
        (0, b"fail") => 400,
        (0, _) => 200,
        (forced, _) => forced,
    };
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

async fn target(forced: Arc<AtomicU16>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(answer))
        .with_state(forced);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}/hook")
}

struct Worker {
    peer: Arc<Peer>,
    live: Arc<LiveEnrollment>,
    signals: StopSignals,
    task: JoinHandle<WorkerEnd>,
    forced: Arc<AtomicU16>,
}

async fn start(source: SourceAnswer, body: serde_json::Value) -> Worker {
    start_with(source, body, SettleBatching::OFF).await
}

async fn start_with(
    source: SourceAnswer,
    body: serde_json::Value,
    settle_batching: SettleBatching,
) -> Worker {
    let peer = Arc::new(Peer::start(PeerConfig::default().with_source(source)));
    let forced = Arc::new(AtomicU16::new(0));
    let mut body = body;
    body["queue"] = json!(QUEUE);
    body["target_url"] = json!(target(Arc::clone(&forced)).await);
    let new = NewEnrollment::from_json(body).expect("valid enrollment");
    let config = Config::from_vars(Vec::<(String, String)>::new()).expect("default config");
    let enrollment = new.into_enrollment(uuid::Uuid::new_v4(), "2026-01-01T00:00:00Z".into());
    let live = Arc::new(LiveEnrollment::new(enrollment, &config.delivery_defaults));
    let dial = Arc::clone(&peer);
    let broker = Arc::new(BrokerSettings {
        url: url::Url::parse("amqp://in-memory-peer").expect("url"),
        connect_timeout: WAIT,
        pool: None,
        dialer: Dialer::Stream(Arc::new(move || dial.dial())),
        max_message_size: 1024 * 1024,
    });
    let ctx = WorkerContext {
        opener: Arc::new(AmqpOpener {
            broker,
            failure_policy: FailureOutcomePolicy::Auto,
        }),
        http: reqwest::Client::new().into(),
        default_prefetch: 10,
        settle_batching,
        reconnect: BackoffSettings {
            min: Duration::from_millis(10),
            max: Duration::from_millis(100),
        },
        metrics: Metrics::new(false),
        replier: None,
    };
    let signals = StopSignals::default();
    let generation = live.status.next_generation();
    let task = tokio::spawn(run(ctx, Arc::clone(&live), signals.clone(), generation));
    Worker {
        peer,
        live,
        signals,
        task,
        forced,
    }
}

impl Worker {
    async fn dispositions(&self, n: usize) -> Vec<Disposition> {
        self.peer
            .wait_for(WAIT, |frames| {
                frames
                    .iter()
                    .filter(|f| f.as_disposition().is_some())
                    .count()
                    >= n
            })
            .await
            .expect("dispositions in time");
        self.peer.dispositions()
    }

    /// Ends the worker (stop, or stop + remove) and returns the detach it sent.
    async fn end(self, remove: bool) -> Detach {
        if remove {
            self.signals.remove.cancel();
            self.signals.abandon.cancel();
        }
        self.signals.stop.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("the worker ends in time")
            .expect("the worker does not panic");
        let detaches = self.peer.detaches();
        assert_eq!(detaches.len(), 1, "one detach: {detaches:?}");
        detaches[0].clone()
    }
}

fn state_of(d: &Disposition) -> String {
    match &d.state {
        Some(DeliveryState::Accepted(_)) => "accepted".into(),
        Some(DeliveryState::Released(_)) => "released".into(),
        Some(DeliveryState::Rejected(r)) => format!(
            "rejected: {}",
            r.error
                .as_ref()
                .and_then(|e| e.description.clone())
                .unwrap_or_default()
        ),
        Some(DeliveryState::Modified(m)) => format!(
            "modified{{delivery_failed: {:?}, undeliverable_here: {:?}}}",
            m.delivery_failed, m.undeliverable_here
        ),
        other => format!("{other:?}"),
    }
}

#[tokio::test]
async fn the_failure_outcome_follows_what_the_broker_advertises() {
    let modified = "modified{delivery_failed: Some(true), undeliverable_here: Some(false)}";
    // Without an `outcomes` list only the default outcome is promised (AMQP 1.0 §3.5.3).
    let modified_by_default = SourceAnswer {
        default_outcome: Some(Outcome::Modified(Modified {
            delivery_failed: None,
            undeliverable_here: None,
            message_annotations: None,
        })),
        ..SourceAnswer::default()
    };
    for (broker, source, want) in [
        ("RabbitMQ 3.x", SourceAnswer::rabbitmq_3(), "released"),
        ("Artemis", SourceAnswer::artemis(), modified),
        ("no outcomes listed", SourceAnswer::default(), "released"),
        (
            "no outcomes listed, default-outcome modified",
            modified_by_default,
            modified,
        ),
    ] {
        let w = start(source, json!({"delivery": {"retry": {"max_attempts": 1}}})).await;
        w.peer.send(QUEUE, TestMessage::text("fail").id("m1"));
        let d = w.dispositions(1).await;
        assert_eq!(state_of(&d[0]), want, "{broker}");
        assert!(d[0].settled, "{broker}: settled in one frame");
        assert_eq!(w.live.status.snapshot().failed, 1, "{broker}");
        w.end(false).await;
    }
}

#[tokio::test]
async fn each_answer_sends_its_disposition() {
    let w = start(
        SourceAnswer::artemis(),
        json!({"delivery": {"reject_on": [422]}}),
    )
    .await;
    w.peer.send(QUEUE, TestMessage::text("ok").id("m1"));
    w.peer.send(QUEUE, TestMessage::text("reject").id("m2"));
    let d = w.dispositions(2).await;
    let states: Vec<String> = d.iter().map(state_of).collect();
    assert_eq!(
        states,
        ["accepted", "rejected: hot-potato: target answered 422"]
    );
    assert_eq!(w.peer.queued(QUEUE), 0);
    let s = w.live.status.snapshot();
    assert_eq!((s.delivered, s.rejected, s.in_flight), (1, 1, 0));
    w.end(false).await;
}

/// Accepts go out as ranges of delivery ids, at most `max` per disposition, also at
/// `max_in_flight` 1; the last ones, fewer than `max`, go out when the delay runs out; a
/// failure in between is settled on its own at once.
#[tokio::test]
async fn accepts_go_out_as_ranges() {
    const MESSAGES: u32 = 21;
    for max_in_flight in [1, 8] {
        let batching = SettleBatching {
            max: 8,
            delay: Duration::from_millis(300),
        };
        let w = start_with(
            SourceAnswer::rabbitmq_3(),
            json!({"subscription_args": {"prefetch": 100},
                   "delivery": {"max_in_flight": max_in_flight, "reject_on": [422]}}),
            batching,
        )
        .await;
        for i in 0..MESSAGES {
            let body = if i == 10 { "reject" } else { "ok" };
            w.peer
                .send(QUEUE, TestMessage::text(body).id(format!("m{i}")));
        }
        let covered = |d: &Disposition| d.last.unwrap_or(d.first) - d.first + 1;
        w.peer
            .wait_for(WAIT, |frames| {
                frames
                    .iter()
                    .filter_map(|f| f.as_disposition())
                    .map(covered)
                    .sum::<u32>()
                    >= MESSAGES
            })
            .await
            .expect("every message settled in time");
        let d = w.peer.dispositions();
        let mut ids: Vec<u32> = Vec::new();
        for disposition in &d {
            let want = if covered(disposition) == 1 && disposition.first == 10 {
                "rejected: hot-potato: target answered 422"
            } else {
                "accepted"
            };
            assert_eq!(state_of(disposition), want, "{disposition:?}");
            assert!(disposition.settled, "{disposition:?}");
            assert!(
                covered(disposition) <= 8,
                "mif {max_in_flight}: at most 8 per range: {disposition:?}"
            );
            ids.extend(disposition.first..=disposition.last.unwrap_or(disposition.first));
        }
        ids.sort_unstable();
        assert_eq!(ids, (0..MESSAGES).collect::<Vec<_>>(), "each settled once");
        // 20 accepts in ranges of at most 8 around one reject: far fewer than one per message.
        assert!(
            d.len() < 10,
            "mif {max_in_flight}: {} dispositions for {MESSAGES} messages: {d:?}",
            d.len()
        );
        // The status follows the dispositions by a hair.
        let deadline = tokio::time::Instant::now() + WAIT;
        let counts = loop {
            let s = w.live.status.snapshot();
            let counts = (s.delivered, s.rejected, s.in_flight);
            if counts == (20, 1, 0) || tokio::time::Instant::now() > deadline {
                break counts;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(counts, (20, 1, 0));
        w.end(false).await;
    }
}

#[tokio::test]
async fn only_removal_closes_the_link() {
    let w = start(SourceAnswer::artemis(), json!({})).await;
    w.peer.send(QUEUE, TestMessage::text("ok"));
    w.dispositions(1).await;
    let live = Arc::clone(&w.live);
    let detach = w.end(false).await;
    assert!(
        !detach.closed,
        "stop or pause keeps a durable subscription: {detach:?}"
    );
    assert_eq!(live.status.state(), WorkerState::Stopped);

    let w = start(SourceAnswer::artemis(), json!({})).await;
    w.peer.send(QUEUE, TestMessage::text("ok"));
    w.dispositions(1).await;
    let detach = w.end(true).await;
    assert!(detach.closed, "DELETE removes the subscription: {detach:?}");
}

#[tokio::test]
async fn an_open_breaker_takes_the_credit_and_a_good_probe_gives_it_back() {
    let w = start(
        SourceAnswer::artemis(),
        json!({"delivery": {
            "retry": {"max_attempts": 100, "base_ms": 5, "max_ms": 5, "jitter": false},
            "circuit_breaker": {"failure_threshold": 2, "open_ms": 200}
        }}),
    )
    .await;
    w.forced.store(503, Ordering::SeqCst);
    w.peer.send(QUEUE, TestMessage::text("ok"));
    let credit = |f: &hot_potato_testkit::peer::ClientFrame, n: u32| {
        f.as_flow()
            .is_some_and(|flow| flow.handle.is_some() && flow.link_credit == Some(n))
    };
    w.peer
        .wait_for(WAIT, |frames| frames.iter().any(|f| credit(f, 0)))
        .await
        .expect("credit 0 while the breaker is open");
    assert!(
        w.peer.dispositions().is_empty(),
        "the message is held, not handed back"
    );
    w.forced.store(0, Ordering::SeqCst);
    let frames = w
        .peer
        .wait_for(WAIT, |frames| {
            let zero = frames.iter().position(|f| credit(f, 0));
            zero.is_some_and(|z| frames[z..].iter().any(|f| credit(f, 10)))
        })
        .await
        .expect("credit back after the probe");
    assert!(frames.iter().any(|f| f.as_disposition().is_some()));
    assert_eq!(state_of(&w.peer.dispositions()[0]), "accepted");
    w.end(false).await;
}

#[tokio::test]
async fn a_durable_subscription_attaches_with_stable_names_and_its_source() {
    let w = start(
        SourceAnswer::artemis(),
        json!({"subscription_args": {"durable": true, "selector": "region = 'eu'",
                                     "capabilities": ["topic", "shared"], "prefetch": 7}}),
    )
    .await;
    let frames = w
        .peer
        .wait_for(WAIT, |frames| {
            frames.iter().any(|f| f.as_attach().is_some())
        })
        .await
        .expect("attach");
    let name = format!("hot-potato-{}", w.live.enrollment.id);
    let open = frames
        .iter()
        .find_map(|f| match &f.body {
            hot_potato_testkit::peer::FrameBody::Open(open) => Some(open.clone()),
            _ => None,
        })
        .expect("open");
    assert_eq!(
        open.container_id, name,
        "container id names the subscription"
    );
    let attach = w.peer.attaches()[0].clone();
    assert_eq!(attach.name, name);
    let source = attach.source.expect("source");
    assert_eq!(source.address.as_deref(), Some(QUEUE));
    assert_eq!(source.durable, TerminusDurability::UnsettledState);
    assert_eq!(source.expiry_policy, TerminusExpiryPolicy::Never);
    let filter = source.filter.expect("filter");
    assert!(
        filter
            .keys()
            .any(|k| k.as_str() == "apache.org:selector-filter:string"),
        "{filter:?}"
    );
    let caps: Vec<String> = source
        .capabilities
        .map(|c| c.0.iter().map(|s| s.to_string()).collect())
        .unwrap_or_default();
    assert_eq!(caps, ["topic", "shared"]);
    w.peer
        .wait_for(WAIT, |frames| {
            frames
                .iter()
                .any(|f| f.as_flow().is_some_and(|fl| fl.link_credit == Some(7)))
        })
        .await
        .expect("credit 7 from prefetch");
    w.end(false).await;
}
