//! Prometheus metrics: the counters and histograms workers update per message, and the gauges
//! computed from the enrollment map at scrape time. Names follow
//! `hot_potato_<name>_<unit>[_total]`; labels have few values. The `enrollment_id` label on
//! the per-message counters is bounded by the number of enrollments and can be turned off
//! with `METRICS_PER_ENROLLMENT=false` for large fleets.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use uuid::Uuid;

use crate::enrollment::status::{BreakerState, WorkerState};
use crate::telemetry::relay::RelayMetrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeliveryLabels {
    outcome: &'static str,
    enrollment_id: Option<String>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    status_class: &'static str,
    enrollment_id: Option<String>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

/// How one message ended: what the broker was told, and why. The metric label is what the
/// broker was told, so a hand-back and a failed delivery that was released share `released`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutcomeLabel {
    /// 2xx, accepted.
    Accepted,
    /// Failed delivery, `released`.
    Released,
    /// Failed delivery, `modified{delivery_failed}`.
    Modified,
    /// `reject_on` answer or undecodable message, `rejected`.
    Rejected,
    /// `drop_on` answer, accepted.
    Dropped,
    /// Not the message's fault (stopping, removal): `released`.
    HandedBack,
}

impl OutcomeLabel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Released | Self::HandedBack => "released",
            Self::Modified => "modified",
            Self::Rejected => "rejected",
            Self::Dropped => "dropped",
        }
    }

    /// The slot of this label's series in [`OUTCOMES`].
    fn series(self) -> usize {
        match self {
            Self::Accepted => 0,
            Self::Released | Self::HandedBack => 1,
            Self::Modified => 2,
            Self::Rejected => 3,
            Self::Dropped => 4,
        }
    }
}

const OUTCOMES: [OutcomeLabel; 5] = [
    OutcomeLabel::Accepted,
    OutcomeLabel::Released,
    OutcomeLabel::Modified,
    OutcomeLabel::Rejected,
    OutcomeLabel::Dropped,
];
const STATUS_CLASSES: [&str; 7] = ["1xx", "2xx", "3xx", "4xx", "5xx", "timeout", "network"];

/// The class of one POST's result.
pub fn status_class(code: Option<u16>, timed_out: bool) -> &'static str {
    match code {
        Some(100..=199) => "1xx",
        Some(200..=299) => "2xx",
        Some(300..=399) => "3xx",
        Some(400..=499) => "4xx",
        Some(_) => "5xx",
        None if timed_out => "timeout",
        None => "network",
    }
}

/// Cheap to clone: every field is a handle to shared atomics.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    per_enrollment: bool,
    deliveries: Family<DeliveryLabels, Counter>,
    post_attempts: Family<AttemptLabels, Counter>,
    retries: Counter,
    redeliveries: Counter,
    post_duration: Histogram,
    message_age: Histogram,
    in_flight: Gauge,
    workers: Family<StateLabels, Gauge>,
    breakers: Family<StateLabels, Gauge>,
    broker_links_up: Gauge,
    enrollments: Gauge,
    relay: RelayMetrics,
}

impl Metrics {
    pub fn new(per_enrollment: bool) -> Self {
        let mut registry = Registry::with_prefix("hot_potato");
        let deliveries = Family::<DeliveryLabels, Counter>::default();
        registry.register(
            "deliveries",
            "Messages settled, by what the broker was told",
            deliveries.clone(),
        );
        let post_attempts = Family::<AttemptLabels, Counter>::default();
        registry.register(
            "post_attempts",
            "POSTs made, by status class (network and timeout when no answer came)",
            post_attempts.clone(),
        );
        let retries = Counter::default();
        registry.register(
            "retries",
            "Local retries after a retry-class answer",
            retries.clone(),
        );
        let redeliveries = Counter::default();
        registry.register(
            "redeliveries",
            "Messages the broker had delivered before: a delivery count above 0, or first-acquirer false from a broker seen setting it",
            redeliveries.clone(),
        );
        let post_duration = Histogram::new(exponential_buckets(0.000_5, 2.0, 16));
        registry.register_with_unit(
            "post_duration",
            "Duration of one POST, connect to last body byte",
            Unit::Seconds,
            post_duration.clone(),
        );
        let message_age = Histogram::new(exponential_buckets(0.001, 2.0, 20));
        registry.register_with_unit(
            "message_age",
            "Age of an accepted message (now minus its creation-time), for messages that carry one",
            Unit::Seconds,
            message_age.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "in_flight",
            "Messages in hand, being delivered",
            in_flight.clone(),
        );
        let workers = Family::<StateLabels, Gauge>::default();
        registry.register("workers", "Enrollment workers by state", workers.clone());
        let breakers = Family::<StateLabels, Gauge>::default();
        registry.register(
            "circuit_breakers",
            "Enrollments by circuit-breaker state",
            breakers.clone(),
        );
        let broker_links_up = Gauge::default();
        registry.register(
            "broker_links_up",
            "Enrollments whose broker connection and link are up",
            broker_links_up.clone(),
        );
        let enrollments = Gauge::default();
        registry.register("enrollments", "Enrollments in the map", enrollments.clone());
        let relay = RelayMetrics::register(&mut registry);
        Self {
            inner: Arc::new(Inner {
                registry,
                per_enrollment,
                deliveries,
                post_attempts,
                retries,
                redeliveries,
                post_duration,
                message_age,
                in_flight,
                workers,
                breakers,
                broker_links_up,
                enrollments,
                relay,
            }),
        }
    }

    fn enrollment_label(&self, id: Uuid) -> Option<String> {
        self.inner.per_enrollment.then(|| id.to_string())
    }

    /// Handles to one enrollment's series, resolved once so the per-message path neither
    /// formats the label nor looks the series up.
    pub fn for_enrollment(&self, id: Uuid) -> EnrollmentMetrics {
        EnrollmentMetrics {
            metrics: self.clone(),
            enrollment_id: self.enrollment_label(id),
            deliveries: Default::default(),
            attempts: Default::default(),
        }
    }

    /// Removes every series labelled with enrollment `id` (on DELETE), so a deleted
    /// enrollment's counters leave `/metrics` instead of being exported for ever. Call it once
    /// the enrollment's worker has exited: handles a running worker already holds then count
    /// into nothing, but its first event of a kind not seen yet would create a series again.
    /// Without per-enrollment labels there is nothing to remove.
    pub fn forget_enrollment(&self, id: Uuid) {
        let Some(label) = self.enrollment_label(id) else {
            return;
        };
        for outcome in OUTCOMES {
            self.inner.deliveries.remove(&DeliveryLabels {
                outcome: outcome.as_str(),
                enrollment_id: Some(label.clone()),
            });
        }
        for status_class in STATUS_CLASSES {
            self.inner.post_attempts.remove(&AttemptLabels {
                status_class,
                enrollment_id: Some(label.clone()),
            });
        }
    }

    /// Publishing and request/reply.
    pub fn relay(&self) -> &RelayMetrics {
        &self.inner.relay
    }

    pub fn retry(&self) {
        self.inner.retries.inc();
    }

    pub fn redelivery(&self) {
        self.inner.redeliveries.inc();
    }

    pub fn message_age(&self, age: Duration) {
        self.inner.message_age.observe(age.as_secs_f64());
    }

    pub fn in_flight(&self, delta: i64) {
        self.inner.in_flight.inc_by(delta);
    }

    /// The text exposition, with the map-derived gauges brought up to date first from the
    /// worker and breaker state of every enrollment.
    pub fn render(&self, enrollments: &[(WorkerState, BreakerState)]) -> String {
        let inner = &self.inner;
        inner.enrollments.set(enrollments.len() as i64);
        let states = [
            (WorkerState::Connecting, "connecting"),
            (WorkerState::Active, "active"),
            (WorkerState::Backoff, "backoff"),
            (WorkerState::Stopped, "stopped"),
            (WorkerState::Paused, "paused"),
        ];
        for (state, name) in states {
            let n = enrollments.iter().filter(|(w, _)| *w == state).count();
            inner
                .workers
                .get_or_create(&StateLabels { state: name })
                .set(n as i64);
        }
        for (state, name) in [
            (BreakerState::Closed, "closed"),
            (BreakerState::Open, "open"),
            (BreakerState::HalfOpen, "half_open"),
        ] {
            let n = enrollments.iter().filter(|(_, b)| *b == state).count();
            inner
                .breakers
                .get_or_create(&StateLabels { state: name })
                .set(n as i64);
        }
        let up = enrollments
            .iter()
            .filter(|(w, _)| *w == WorkerState::Active)
            .count();
        inner.broker_links_up.set(up as i64);
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &inner.registry);
        out
    }
}

/// One enrollment's per-message metrics. Series are created on first use, so an enrollment
/// that never sees a 3xx exports no 3xx series.
pub struct EnrollmentMetrics {
    metrics: Metrics,
    enrollment_id: Option<String>,
    deliveries: [OnceLock<Counter>; 5],
    attempts: [OnceLock<Counter>; 7],
}

impl EnrollmentMetrics {
    pub fn delivery(&self, outcome: OutcomeLabel) {
        let i = outcome.series();
        self.deliveries[i]
            .get_or_init(|| {
                self.metrics
                    .inner
                    .deliveries
                    .get_or_create(&DeliveryLabels {
                        outcome: OUTCOMES[i].as_str(),
                        enrollment_id: self.enrollment_id.clone(),
                    })
                    .clone()
            })
            .inc();
    }

    pub fn post_attempt(&self, class: &'static str, took: Duration) {
        let i = STATUS_CLASSES.iter().position(|c| *c == class).unwrap_or(6);
        self.attempts[i]
            .get_or_init(|| {
                self.metrics
                    .inner
                    .post_attempts
                    .get_or_create(&AttemptLabels {
                        status_class: STATUS_CLASSES[i],
                        enrollment_id: self.enrollment_id.clone(),
                    })
                    .clone()
            })
            .inc();
        self.metrics.inner.post_duration.observe(took.as_secs_f64());
    }

    pub fn shared(&self) -> &Metrics {
        &self.metrics
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_units_and_labels_follow_the_convention() {
        let m = Metrics::new(true);
        let id = Uuid::new_v4();
        let e = m.for_enrollment(id);
        e.delivery(OutcomeLabel::Accepted);
        e.delivery(OutcomeLabel::Accepted);
        e.post_attempt(status_class(Some(503), false), Duration::from_millis(3));
        m.retry();
        let text = m.render(&[]);
        assert!(
            text.contains("hot_potato_deliveries_total{outcome=\"accepted\""),
            "{text}"
        );
        assert!(text.contains(&format!("enrollment_id=\"{id}\"")));
        assert!(text.contains("hot_potato_post_attempts_total{status_class=\"5xx\""));
        assert!(text.contains("hot_potato_post_duration_seconds_bucket"));
        assert!(text.contains("hot_potato_retries_total 1"));
        assert!(text.contains("hot_potato_enrollments 0"));

        let fleet = Metrics::new(false);
        fleet.for_enrollment(id).delivery(OutcomeLabel::Dropped);
        assert!(!fleet.render(&[]).contains(&id.to_string()));
    }

    #[test]
    fn forgetting_an_enrollment_removes_its_series_only() {
        let m = Metrics::new(true);
        let (gone, kept) = (Uuid::new_v4(), Uuid::new_v4());
        for id in [gone, kept] {
            let e = m.for_enrollment(id);
            e.delivery(OutcomeLabel::Accepted);
            e.delivery(OutcomeLabel::HandedBack);
            e.delivery(OutcomeLabel::Modified);
            e.post_attempt(status_class(Some(200), false), Duration::from_millis(1));
            e.post_attempt(status_class(None, true), Duration::from_millis(1));
        }
        assert!(m.render(&[]).contains(&gone.to_string()));
        m.forget_enrollment(gone);
        let text = m.render(&[]);
        assert!(
            !text.lines().any(|l| l.contains(&gone.to_string())),
            "{text}"
        );
        assert_eq!(
            text.lines()
                .filter(|l| l.contains(&kept.to_string()))
                .count(),
            5,
            "{text}"
        );
        // Without the label there is nothing to forget, and nothing breaks.
        let fleet = Metrics::new(false);
        fleet.for_enrollment(gone).delivery(OutcomeLabel::Accepted);
        fleet.forget_enrollment(gone);
        let text = fleet.render(&[]);
        assert!(
            text.contains("hot_potato_deliveries_total{outcome=\"accepted\""),
            "{text}"
        );
    }

    #[test]
    fn status_classes() {
        assert_eq!(status_class(Some(204), false), "2xx");
        assert_eq!(status_class(Some(302), false), "3xx");
        assert_eq!(status_class(Some(429), false), "4xx");
        assert_eq!(status_class(Some(500), false), "5xx");
        assert_eq!(status_class(None, true), "timeout");
        assert_eq!(status_class(None, false), "network");
    }
}
