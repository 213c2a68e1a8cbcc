//! The metrics of publishing and request/reply: publishes and replies by outcome, the
//! latency of `POST /request`, requests that timed out and replies that came too late.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// What became of one publish (or reply): the broker `accepted` it, `refused` it (rejected,
/// released, address refused), or it was `unreachable`; `too_large` for a message over the
/// link's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishOutcome {
    Accepted,
    Refused,
    Unreachable,
    TooLarge,
}

impl PublishOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Refused => "refused",
            Self::Unreachable => "unreachable",
            Self::TooLarge => "too_large",
        }
    }
}

#[derive(Clone)]
pub struct RelayMetrics {
    publishes: Family<OutcomeLabels, Counter>,
    replies: Family<OutcomeLabels, Counter>,
    request_duration: Histogram,
    requests_timed_out: Counter,
    late_replies: Counter,
}

impl RelayMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let publishes = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "publishes",
            "Messages published through POST /publish and POST /request, by outcome",
            publishes.clone(),
        );
        let replies = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "replies",
            "Replies published to a pushed message's reply-to (delivery.reply), by outcome",
            replies.clone(),
        );
        let request_duration = Histogram::new(exponential_buckets(0.000_5, 2.0, 20));
        registry.register_with_unit(
            "request_duration",
            "Time from a POST /request to its reply (answered requests only)",
            Unit::Seconds,
            request_duration.clone(),
        );
        let requests_timed_out = Counter::default();
        registry.register(
            "requests_timed_out",
            "POST /request answered 504: no reply within timeout_ms",
            requests_timed_out.clone(),
        );
        let late_replies = Counter::default();
        registry.register(
            "late_replies",
            "Replies that arrived with no request waiting for them (timed out, or from before a restart); dropped",
            late_replies.clone(),
        );
        Self {
            publishes,
            replies,
            request_duration,
            requests_timed_out,
            late_replies,
        }
    }

    pub fn publish(&self, outcome: PublishOutcome) {
        self.publishes
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            })
            .inc();
    }

    pub fn reply(&self, outcome: PublishOutcome) {
        self.replies
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            })
            .inc();
    }

    pub fn request_answered(&self, took: Duration) {
        self.request_duration.observe(took.as_secs_f64());
    }

    pub fn request_timed_out(&self) {
        self.requests_timed_out.inc();
    }

    pub fn late_reply(&self) {
        self.late_replies.inc();
    }
}
