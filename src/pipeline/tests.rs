//! The worker driven through a fake link (no broker): the settlement each answer earns, credit
//! following the breaker, how a link ends, reconnects, and the in-flight bound. The target is
//! a real HTTP server on loopback that answers by the message body (`test_target`).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::json;
use tokio::task::JoinHandle;

use crate::amqp::outcome::Disposition;
use crate::backoff::BackoffSettings;
use crate::enrollment::live::LiveEnrollment;
use crate::enrollment::outcome::FailureOutcome;
use crate::enrollment::policy::tests::defaults;
use crate::enrollment::record::{Enrollment, SubscriptionArgs};
use crate::enrollment::settings::DeliverySettings;
use crate::enrollment::status::{BreakerState, WorkerState};
use crate::pipeline::fake::{Call, FakeBroker, FakeOpener, settlements};
use crate::pipeline::settle::SettleBatching;
use crate::pipeline::test_target::{Target, serve};
use crate::pipeline::worker::{WorkerContext, WorkerEnd, run};
use crate::shutdown::StopSignals;
use crate::telemetry::metrics::Metrics;

const WAIT: Duration = Duration::from_secs(10);

pub(crate) fn live(target_url: &str, delivery: serde_json::Value) -> Arc<LiveEnrollment> {
    let enrollment = Enrollment {
        id: uuid::Uuid::new_v4(),
        queue: "/amq/queue/test".into(),
        target_url: target_url.into(),
        subscription_args: SubscriptionArgs::default(),
        created_at: "2026-01-01T00:00:00Z".into(),
        delivery: DeliverySettings::from_json(delivery).expect("valid delivery settings"),
        paused: false,
    };
    Arc::new(LiveEnrollment::new(enrollment, &defaults()))
}

pub(crate) fn context(broker: &FakeBroker) -> WorkerContext<FakeOpener> {
    WorkerContext {
        opener: Arc::new(FakeOpener(broker.clone())),
        http: reqwest::Client::new().into(),
        default_prefetch: 10,
        settle_batching: SettleBatching::OFF,
        reconnect: BackoffSettings {
            min: Duration::from_millis(10),
            max: Duration::from_millis(50),
        },
        metrics: Metrics::new(false),
        replier: None,
    }
}

struct Worker {
    broker: FakeBroker,
    live: Arc<LiveEnrollment>,
    signals: StopSignals,
    task: JoinHandle<WorkerEnd>,
}

async fn start(target: &Target, outcome: FailureOutcome, delivery: serde_json::Value) -> Worker {
    start_with(target, outcome, delivery, SettleBatching::OFF).await
}

async fn start_with(
    target: &Target,
    outcome: FailureOutcome,
    delivery: serde_json::Value,
    settle_batching: SettleBatching,
) -> Worker {
    let url = serve(target.clone()).await;
    let broker = FakeBroker::new(outcome);
    let live = live(&url, delivery);
    let signals = StopSignals::default();
    let task = tokio::spawn(run(
        WorkerContext {
            settle_batching,
            ..context(&broker)
        },
        Arc::clone(&live),
        signals.clone(),
        live.status.next_generation(),
    ));
    Worker {
        broker,
        live,
        signals,
        task,
    }
}

impl Worker {
    async fn settled(&self, n: usize) -> Vec<(u64, Disposition)> {
        let calls = self
            .broker
            .wait_for(WAIT, |c| settlements(c).len() >= n)
            .await;
        let mut s = settlements(&calls);
        s.sort_by_key(|(id, _)| *id);
        assert_eq!(s.len(), n, "settlements: {calls:?}");
        s
    }

    async fn end(self) -> Vec<Call> {
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("the worker ends in time")
            .expect("the worker does not panic");
        self.broker.calls()
    }
}

#[tokio::test]
async fn each_answer_earns_its_settlement_once() {
    for (max_in_flight, outcome, failed_as) in [
        (1, FailureOutcome::Released, Disposition::Release),
        (4, FailureOutcome::Modified, Disposition::Modify),
    ] {
        let target = Target::default();
        let delivery = json!({"max_in_flight": max_in_flight, "reject_on": [422], "drop_on": [404],
                              "retry": {"max_attempts": 1}});
        let w = start(&target, outcome, delivery).await;
        for body in ["ok", "reject", "drop", "fail"] {
            w.broker.push(body);
        }
        let settled = w.settled(4).await;
        assert_eq!(
            settled,
            [
                (0, Disposition::Accept),
                (1, Disposition::Reject("target answered 422".into())),
                (2, Disposition::Accept),
                (3, failed_as.clone()),
            ],
            "max_in_flight {max_in_flight}"
        );
        let s = w.live.status.snapshot();
        assert_eq!(
            (s.delivered, s.rejected, s.dropped, s.failed, s.in_flight),
            (1, 1, 1, 1, 0)
        );
        assert_eq!(s.state, WorkerState::Active);
        assert_eq!(s.failure_outcome, Some(outcome));
        assert_eq!(target.posts.load(Ordering::SeqCst), 4, "one POST each");
        w.signals.stop.cancel();
        let calls = w.end().await;
        assert_eq!(calls.last(), Some(&Call::Detach));
    }
}

#[tokio::test]
async fn an_undecodable_message_is_rejected_and_the_next_flows() {
    let target = Target::default();
    let w = start(&target, FailureOutcome::Modified, json!({})).await;
    w.broker.push_undecodable("bad section");
    w.broker.push("ok");
    let settled = w.settled(2).await;
    assert!(matches!(&settled[0], (0, Disposition::Reject(r)) if r.contains("undecodable")));
    assert_eq!(settled[1], (1, Disposition::Accept));
    let s = w.live.status.snapshot();
    assert_eq!((s.rejected, s.delivered, s.in_flight), (1, 1, 0));
    assert!(s.last_error.is_some_and(|e| e.contains("undecodable")));
    w.signals.stop.cancel();
    w.end().await;
}

#[tokio::test]
async fn an_open_breaker_takes_the_credit_away_and_a_good_probe_gives_it_back() {
    let target = Target::default();
    target.forced.store(503, Ordering::SeqCst);
    let delivery = json!({
        "retry": {"max_attempts": 100, "base_ms": 5, "max_ms": 5, "jitter": false},
        "circuit_breaker": {"failure_threshold": 2, "open_ms": 200}
    });
    let w = start(&target, FailureOutcome::Released, delivery).await;
    w.broker.push("ok");
    let calls = w
        .broker
        .wait_for(WAIT, |c| c.contains(&Call::SetCredit(0)))
        .await;
    assert!(calls.contains(&Call::SetCredit(0)), "{calls:?}");
    assert_ne!(w.live.status.breaker(), BreakerState::Closed);
    assert!(
        settlements(&calls).is_empty(),
        "held in hand, not handed back"
    );
    target.forced.store(0, Ordering::SeqCst);
    let settled = w.settled(1).await;
    assert_eq!(settled, [(0, Disposition::Accept)]);
    let calls = w
        .broker
        .wait_for(WAIT, |c| c.contains(&Call::SetCredit(10)))
        .await;
    assert!(calls.contains(&Call::SetCredit(10)), "{calls:?}");
    assert_eq!(w.live.status.breaker(), BreakerState::Closed);
    w.signals.stop.cancel();
    w.end().await;
}

#[tokio::test]
async fn stopping_detaches_and_removal_closes() {
    let target = Target::default();
    let w = start(&target, FailureOutcome::Modified, json!({})).await;
    w.broker.push("ok");
    w.settled(1).await;
    w.signals.stop.cancel();
    let calls = w.end().await;
    assert!(
        calls.contains(&Call::Detach) && !calls.contains(&Call::Close),
        "{calls:?}"
    );

    let w = start(&target, FailureOutcome::Modified, json!({})).await;
    w.broker.push("ok");
    w.settled(1).await;
    w.signals.remove.cancel();
    w.signals.abandon.cancel();
    w.signals.stop.cancel();
    let calls = w.end().await;
    assert!(
        calls.contains(&Call::Close) && !calls.contains(&Call::Detach),
        "{calls:?}"
    );
}

#[tokio::test]
async fn shutdown_lets_a_post_finish_and_removal_hands_it_back() {
    let target = Target::default();
    let w = start(
        &target,
        FailureOutcome::Modified,
        json!({"max_in_flight": 2}),
    )
    .await;
    w.broker.push("slow");
    w.broker
        .wait_for(WAIT, |_| target.running.load(Ordering::SeqCst) == 1)
        .await;
    w.signals.stop.cancel();
    let calls = w.end().await;
    assert_eq!(settlements(&calls), [(0, Disposition::Accept)], "{calls:?}");
    assert_eq!(calls.last(), Some(&Call::Detach));

    let w = start(
        &target,
        FailureOutcome::Modified,
        json!({"max_in_flight": 2}),
    )
    .await;
    w.broker.push("slow");
    w.broker
        .wait_for(WAIT, |_| target.running.load(Ordering::SeqCst) == 1)
        .await;
    w.signals.remove.cancel();
    w.signals.abandon.cancel();
    w.signals.stop.cancel();
    let live = Arc::clone(&w.live);
    let calls = w.end().await;
    assert_eq!(
        settlements(&calls),
        [(0, Disposition::Release)],
        "{calls:?}"
    );
    assert_eq!(calls.last(), Some(&Call::Close));
    assert_eq!(live.status.snapshot().in_flight, 0);
}

#[tokio::test]
async fn a_failed_link_is_abandoned_and_a_new_one_carries_on() {
    let target = Target::default();
    let w = start(&target, FailureOutcome::Modified, json!({})).await;
    w.broker.push("ok");
    w.settled(1).await;
    w.broker.fail_next_recv();
    let calls = w
        .broker
        .wait_for(WAIT, |c| {
            c.iter().filter(|c| **c == Call::Open).count() >= 2
        })
        .await;
    assert_eq!(
        calls,
        [
            Call::Open,
            Call::AcceptAll(vec![0]),
            Call::Abandon,
            Call::Open
        ]
    );
    w.broker.push("ok");
    w.settled(2).await;
    assert_eq!(w.live.status.state(), WorkerState::Active);
    assert!(w.live.status.snapshot().last_error.is_some());
    w.signals.stop.cancel();
    w.end().await;
}

#[tokio::test]
async fn opening_failures_back_off_and_retry() {
    let target = Target::default();
    let url = serve(target.clone()).await;
    let broker = FakeBroker::new(FailureOutcome::Modified);
    broker.fail_opens(3);
    let live = live(&url, json!({}));
    let signals = StopSignals::default();
    let task = tokio::spawn(run(
        context(&broker),
        Arc::clone(&live),
        signals.clone(),
        live.status.next_generation(),
    ));
    broker.push("ok");
    let calls = broker.wait_for(WAIT, |c| !settlements(c).is_empty()).await;
    assert_eq!(
        calls.iter().filter(|c| **c == Call::Open).count(),
        4,
        "{calls:?}"
    );
    assert_eq!(settlements(&calls), [(0, Disposition::Accept)]);
    signals.stop.cancel();
    tokio::time::timeout(WAIT, task)
        .await
        .expect("ends")
        .expect("no panic");
    assert_eq!(live.status.state(), WorkerState::Stopped);
}

#[tokio::test]
async fn no_more_posts_run_at_once_than_max_in_flight() {
    let target = Target::default();
    let w = start(
        &target,
        FailureOutcome::Modified,
        json!({"max_in_flight": 3}),
    )
    .await;
    for _ in 0..9 {
        w.broker.push("slow");
    }
    let settled = w.settled(9).await;
    assert!(settled.iter().all(|(_, d)| *d == Disposition::Accept));
    assert_eq!(target.most_running.load(Ordering::SeqCst), 3);
    assert_eq!(w.live.status.snapshot().in_flight, 0);
    w.signals.stop.cancel();
    w.end().await;
}

#[tokio::test]
async fn at_one_in_flight_an_accept_due_during_a_post_goes_out_when_it_ends() {
    // Due long before the slow POST (300 ms) ends.
    let batching = SettleBatching {
        max: 64,
        delay: Duration::from_millis(20),
    };
    let target = Target::default();
    let w = start_with(
        &target,
        FailureOutcome::Released,
        json!({"max_in_flight": 1}),
        batching,
    )
    .await;
    w.broker.push("ok");
    w.broker.push("slow");
    assert_eq!(
        w.settled(2).await,
        [(0, Disposition::Accept), (1, Disposition::Accept)]
    );
    w.signals.stop.cancel();
    let calls = w.end().await;
    let accepts: Vec<_> = calls
        .iter()
        .filter(|c| matches!(c, Call::AcceptAll(_) | Call::Settle(..)))
        .collect();
    // No timer woke the loop in the middle of the POST: the first accept waited for it and
    // both went out as one range.
    assert_eq!(accepts, [&Call::AcceptAll(vec![0, 1])]);
}
