//! One enrollment's worker: connect, attach, then for each message POST it, settle it, repeat;
//! on any broker error drop the link and reconnect with backoff, forever, until told to stop.
//! Messages are handled one at a time, so order per enrollment is the queue's order.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::amqp_link::{AmqpLink, BrokerSettings, FailureOutcomePolicy, LinkError, Settlement};
use crate::backoff::{Backoff, BackoffSettings};
use crate::delivery::{self, PostResult, PushRequest};
use crate::registry::{Entry, WorkerState};

/// Everything a worker needs besides its enrollment; one shared copy for all workers.
#[derive(Clone)]
pub struct WorkerContext {
    pub broker: BrokerSettings,
    /// One client for every worker: connection pools are per target host, so a slow target
    /// only ties up its own connections.
    pub http: reqwest::Client,
    pub delivery_timeout: Duration,
    pub failure_policy: FailureOutcomePolicy,
    pub default_prefetch: u32,
    pub reconnect: BackoffSettings,
}

/// How the worker is told to end.
#[derive(Clone)]
pub struct StopSignals {
    /// Shutdown or removal: stop receiving; an in-flight POST may finish and is settled.
    pub stop: CancellationToken,
    /// Removal (DELETE): also abandon an in-flight POST, hand its message back, and close
    /// the link for good (`closed=true`).
    pub remove: CancellationToken,
}

/// A link that stayed up this long counts as healthy and resets the reconnect backoff; a
/// shorter life (the broker accepts the attach and then ends the session) keeps backing off.
const HEALTHY_LINK_AGE: Duration = Duration::from_secs(10);

/// Why one link's receive loop ended.
enum LinkEnd {
    Stopped,
    Removed,
    Failed(LinkError),
}

pub async fn run(ctx: WorkerContext, entry: Arc<Entry>, signals: StopSignals) {
    let status = &entry.status;
    let enrollment = &entry.enrollment;
    let prefetch = enrollment
        .subscription_args
        .prefetch
        .unwrap_or(ctx.default_prefetch);
    let mut backoff = Backoff::new(ctx.reconnect);
    loop {
        status.set_state(WorkerState::Connecting);
        let opened = tokio::select! {
            biased;
            _ = signals.stop.cancelled() => break,
            opened = AmqpLink::open(&ctx.broker, enrollment, prefetch, ctx.failure_policy) => opened,
        };
        let failure = match opened {
            Ok(mut link) => {
                let outcome = link.failure_outcome();
                status.set_failure_outcome(outcome);
                status.set_state(WorkerState::Active);
                tracing::info!(failure_outcome = %outcome, prefetch, "attached");
                let attached_at = Instant::now();
                match receive_loop(&ctx, &entry, &signals, &mut link).await {
                    LinkEnd::Stopped => {
                        link.detach().await;
                        break;
                    }
                    LinkEnd::Removed => {
                        link.close().await;
                        break;
                    }
                    LinkEnd::Failed(e) => {
                        link.abandon().await;
                        if attached_at.elapsed() >= HEALTHY_LINK_AGE {
                            backoff.reset();
                        }
                        e
                    }
                }
            }
            Err(e) => e,
        };
        let delay = backoff.next_delay();
        tracing::warn!(error = %failure, retry_in_ms = delay.as_millis() as u64, "broker link down");
        status.set_last_error(failure.to_string());
        status.set_state(WorkerState::Backoff);
        tokio::select! {
            biased;
            _ = signals.stop.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    status.set_state(WorkerState::Stopped);
    tracing::info!("worker stopped");
}

async fn receive_loop(
    ctx: &WorkerContext,
    entry: &Entry,
    signals: &StopSignals,
    link: &mut AmqpLink,
) -> LinkEnd {
    let enrollment = &entry.enrollment;
    loop {
        // Only cancel-safe futures here: `recv` (fe2o3-amqp #22) and `cancelled`.
        let received = tokio::select! {
            biased;
            _ = signals.stop.cancelled() => {
                return if signals.remove.is_cancelled() { LinkEnd::Removed } else { LinkEnd::Stopped };
            }
            received = link.recv() => received,
        };
        let delivery = match received {
            Ok(delivery) => delivery,
            Err(e) => return LinkEnd::Failed(e),
        };
        let delivery_count = delivery
            .message()
            .header
            .as_ref()
            .map_or(0, |h| h.delivery_count);
        let request = PushRequest::from_message(delivery.message(), enrollment.id, delivery_count);
        // The POST runs to completion on shutdown (bounded by the delivery timeout and the
        // shutdown grace) but is abandoned at once on removal; either way the delivery is
        // settled below, so it is never left half-handled.
        let settlement = tokio::select! {
            biased;
            _ = signals.remove.cancelled() => Settlement::HandBack,
            result = delivery::post(&ctx.http, &enrollment.target_url, &request, ctx.delivery_timeout) => {
                record(entry, &request, &result)
            }
        };
        if let Err(e) = link.settle(&delivery, settlement).await {
            return LinkEnd::Failed(e);
        }
        if signals.remove.is_cancelled() {
            return LinkEnd::Removed;
        }
    }
}

fn record(entry: &Entry, request: &PushRequest, result: &PostResult) -> Settlement {
    let settlement = delivery::settlement_for(result);
    let message_id = request.message_id.as_deref().unwrap_or("");
    match settlement {
        Settlement::Accept => {
            entry.status.record_delivered();
            tracing::debug!(message_id, ?result, "delivered");
        }
        Settlement::Fail | Settlement::HandBack => {
            entry.status.record_failed();
            let reason = match result {
                PostResult::Status(code) => format!("target answered {code}"),
                PostResult::Timeout => "target timed out".to_string(),
                PostResult::Network(e) => format!("target unreachable: {e}"),
            };
            tracing::warn!(message_id, %reason, "delivery failed; handing the message back");
            entry.status.set_last_error(reason);
        }
    }
    settlement
}
