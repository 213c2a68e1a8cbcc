//! One enrollment's worker: connect and attach, then receive messages and run up to
//! `max_in_flight` deliveries at once, settling each as it finishes; on any broker error drop
//! the link and reconnect with backoff, forever, until told to stop. This task alone owns the
//! receiver, so every outcome (including `modified` and `rejected`) stays available.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fe2o3_amqp::link::delivery::DeliveryInfo;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::amqp_link::{
    AmqpLink, FailureOutcome, FailureOutcomePolicy, Incoming, LinkError, Settlement,
};
use crate::backoff::{Backoff, BackoffSettings};
use crate::breaker::BreakerState;
use crate::broker::BrokerSettings;
use crate::delivery::Dispatcher;
use crate::metrics::{EnrollmentMetrics, Metrics, OutcomeLabel};
use crate::registry::{Entry, WorkerState};

/// Everything a worker needs besides its enrollment; one shared copy for all workers.
#[derive(Clone)]
pub struct WorkerContext {
    pub broker: Arc<BrokerSettings>,
    /// One client for every worker: connection pools are per target host, so a slow target
    /// only ties up its own connections.
    pub http: reqwest::Client,
    pub failure_policy: FailureOutcomePolicy,
    pub default_prefetch: u32,
    pub reconnect: BackoffSettings,
    pub metrics: Metrics,
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

/// A finished delivery, handed from its task back to the receiver's owner for settlement.
type Finished = (DeliveryInfo, Settlement);

pub async fn run(ctx: WorkerContext, entry: Arc<Entry>, signals: StopSignals) {
    let status = &entry.status;
    let enrollment = &entry.enrollment;
    let dispatcher = match Dispatcher::new(ctx.http.clone(), &entry, &ctx.metrics) {
        Ok(d) => Arc::new(d),
        Err(e) => {
            // Validated at enroll time; a stored URL that no longer parses stops here, visibly.
            status.set_last_error(format!("target_url does not parse: {e}"));
            status.set_state(WorkerState::Stopped);
            tracing::error!(error = %e, "target_url does not parse; worker not started");
            return;
        }
    };
    let max_in_flight = dispatcher.policy().max_in_flight;
    // Credit at least covers the POSTs allowed in flight, so none of them waits on the broker.
    let credit = enrollment
        .subscription_args
        .prefetch
        .unwrap_or(ctx.default_prefetch)
        .max(max_in_flight);
    let mut backoff = Backoff::new(ctx.reconnect);
    loop {
        status.set_state(WorkerState::Connecting);
        // Not raced against the stop signal: dropping a half-open connection would leave it
        // to linger on the broker. Opening is bounded by AMQP_CONNECT_TIMEOUT_MS, and a link
        // that comes up after the signal is closed again at once.
        let opened = AmqpLink::open(&ctx.broker, enrollment, credit, ctx.failure_policy).await;
        if signals.stop.is_cancelled() {
            if let Ok(link) = opened {
                if signals.remove.is_cancelled() {
                    link.close().await;
                } else {
                    link.detach().await;
                }
            }
            break;
        }
        let failure = match opened {
            Ok(mut link) => {
                let outcome = link.failure_outcome();
                status.set_failure_outcome(outcome);
                status.set_state(WorkerState::Active);
                tracing::info!(failure_outcome = %outcome, credit, max_in_flight, "attached");
                let attached_at = Instant::now();
                match receive_loop(&entry, &dispatcher, &signals, &mut link, credit).await {
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
    status.set_state(if status.paused() {
        WorkerState::Paused
    } else {
        WorkerState::Stopped
    });
    tracing::info!("worker stopped");
}

async fn receive_loop(
    entry: &Entry,
    dispatcher: &Arc<Dispatcher>,
    signals: &StopSignals,
    link: &mut AmqpLink,
    credit: u32,
) -> LinkEnd {
    let metrics = dispatcher.metrics();
    let max_in_flight = dispatcher.policy().max_in_flight as usize;
    let mut in_flight: JoinSet<Finished> = JoinSet::new();
    let mut breaker = dispatcher.breaker.subscribe();
    let mut credit = CreditFollower {
        credit,
        granted: credit,
    };
    // A breaker that opened during an earlier link must not get fresh credit now.
    if let Err(e) = credit.follow(link, dispatcher.breaker.state()).await {
        return LinkEnd::Failed(e);
    }
    entry.status.set_breaker(dispatcher.breaker.state());
    let end = loop {
        // Only cancel-safe futures here: `cancelled`, `join_next`, `changed` and `recv`
        // (fe2o3-amqp #22). The POSTs run in their own tasks, or inline below.
        tokio::select! {
            biased;
            _ = signals.stop.cancelled() => {
                break if signals.remove.is_cancelled() { LinkEnd::Removed } else { LinkEnd::Stopped };
            }
            Some(joined) = in_flight.join_next(), if !in_flight.is_empty() => {
                // POSTs that finished meanwhile are settled with it, their accepts batched.
                let mut finished = vec![joined];
                while let Some(joined) = in_flight.try_join_next() {
                    finished.push(joined);
                }
                if let Err(e) = settle_finished(entry, link, metrics, finished).await {
                    break LinkEnd::Failed(e);
                }
            }
            Ok(()) = breaker.changed() => {
                let state = *breaker.borrow_and_update();
                entry.status.set_breaker(state);
                if let Err(e) = credit.follow(link, state).await {
                    break LinkEnd::Failed(e);
                }
            }
            received = link.recv(), if in_flight.len() < max_in_flight => {
                let delivery = match received {
                    Ok(Incoming::Message(delivery)) => *delivery,
                    Ok(Incoming::Undecodable { info, reason }) => {
                        // Nothing to POST: dead-letter it and go on with the next message.
                        tracing::warn!(outcome = "rejected", %reason, "message cannot be decoded; rejecting it");
                        entry.status.record_rejected();
                        entry.status.set_last_error(format!("undecodable message rejected: {reason}"));
                        if let Err(e) = link.settle(info, Settlement::Reject(format!("undecodable message: {reason}"))).await {
                            break LinkEnd::Failed(e);
                        }
                        metrics.delivery(OutcomeLabel::Rejected);
                        continue;
                    }
                    Err(e) => break LinkEnd::Failed(e),
                };
                let header = delivery.message().header.as_ref();
                let delivery_count = header.map_or(0, |h| h.delivery_count);
                if delivery_count > 0 || header.is_some_and(|h| !h.first_acquirer) {
                    metrics.shared().redelivery();
                }
                let (info, message) = delivery.into_parts();
                let request = dispatcher.request_for(&message, delivery_count);
                drop(message);
                entry.status.add_in_flight(1);
                metrics.shared().in_flight(1);
                if max_in_flight == 1 {
                    // One at a time: deliver on this task and save a spawn and a cross-thread
                    // wake-up per message. The breaker is still followed meanwhile.
                    let delivering = dispatcher.deliver(&request, signals);
                    tokio::pin!(delivering);
                    let mut credit_error = None;
                    let settlement = loop {
                        tokio::select! {
                            settlement = &mut delivering => break settlement,
                            Ok(()) = breaker.changed(), if credit_error.is_none() => {
                                let state = *breaker.borrow_and_update();
                                entry.status.set_breaker(state);
                                credit_error = credit.follow(link, state).await.err();
                            }
                        }
                    };
                    if let Err(e) = settle(entry, link, metrics, Ok((info, settlement))).await {
                        break LinkEnd::Failed(e);
                    }
                    if let Some(e) = credit_error {
                        break LinkEnd::Failed(e);
                    }
                    continue;
                }
                let dispatcher = Arc::clone(dispatcher);
                let signals = signals.clone();
                in_flight.spawn(
                    async move {
                        let settlement = dispatcher.deliver(&request, &signals).await;
                        (info, settlement)
                    }
                    // Keeps the enrollment id and queue on the delivery's log lines.
                    .instrument(tracing::Span::current()),
                );
            }
        }
    };
    // Stopping: deliveries waiting on a retry or the breaker hand back at once; POSTs under
    // way finish (shutdown) or are abandoned (removal); each is settled before the link goes.
    // After a link failure the settlements cannot reach the broker, which takes the messages
    // back with the connection, so the tasks are aborted.
    if matches!(end, LinkEnd::Failed(_)) {
        in_flight.abort_all();
    }
    while let Some(joined) = in_flight.join_next().await {
        if matches!(end, LinkEnd::Failed(_)) {
            entry.status.add_in_flight(-1);
            metrics.shared().in_flight(-1);
            continue;
        }
        if let Err(e) = settle(entry, link, metrics, joined).await {
            tracing::debug!(error = %e, "settling while stopping failed");
        }
    }
    end
}

/// Link credit that follows the breaker: none while it is open or half-open, so messages wait
/// in the broker with their delivery count untouched (the probe uses a message in hand).
struct CreditFollower {
    credit: u32,
    granted: u32,
}

impl CreditFollower {
    async fn follow(
        &mut self,
        link: &mut AmqpLink,
        breaker: BreakerState,
    ) -> Result<(), LinkError> {
        let wanted = if breaker == BreakerState::Closed {
            self.credit
        } else {
            0
        };
        if wanted != self.granted {
            link.set_credit(wanted).await?;
            self.granted = wanted;
        }
        Ok(())
    }
}

/// Settles POSTs that finished together: the accepted (and dropped) ones in one batch, the
/// others one by one.
async fn settle_finished(
    entry: &Entry,
    link: &mut AmqpLink,
    metrics: &EnrollmentMetrics,
    finished: Vec<Result<Finished, tokio::task::JoinError>>,
) -> Result<(), LinkError> {
    // Dropped messages are accepted too; only their metric differs.
    let mut accepted = Vec::with_capacity(finished.len());
    let mut drops = 0;
    for joined in finished {
        match joined {
            Ok((info, Settlement::Accept)) => accepted.push(info),
            Ok((info, Settlement::Drop)) => {
                drops += 1;
                accepted.push(info);
            }
            other => settle(entry, link, metrics, other).await?,
        }
    }
    if accepted.is_empty() {
        return Ok(());
    }
    let settled = accepted.len();
    entry.status.add_in_flight(-(settled as i64));
    metrics.shared().in_flight(-(settled as i64));
    link.accept_all(accepted).await?;
    for _ in drops..settled {
        metrics.delivery(OutcomeLabel::Accepted);
    }
    for _ in 0..drops {
        metrics.delivery(OutcomeLabel::Dropped);
    }
    Ok(())
}

async fn settle(
    entry: &Entry,
    link: &mut AmqpLink,
    metrics: &EnrollmentMetrics,
    joined: Result<Finished, tokio::task::JoinError>,
) -> Result<(), LinkError> {
    entry.status.add_in_flight(-1);
    metrics.shared().in_flight(-1);
    match joined {
        Ok((info, settlement)) => {
            let outcome = match (&settlement, link.failure_outcome()) {
                (Settlement::Accept, _) => OutcomeLabel::Accepted,
                (Settlement::Drop, _) => OutcomeLabel::Dropped,
                (Settlement::Reject(_), _) => OutcomeLabel::Rejected,
                (Settlement::HandBack, _) | (Settlement::Fail, FailureOutcome::Released) => {
                    OutcomeLabel::Released
                }
                (Settlement::Fail, FailureOutcome::Modified) => OutcomeLabel::Modified,
            };
            link.settle(info, settlement).await?;
            metrics.delivery(outcome);
            Ok(())
        }
        // The message's DeliveryInfo went down with the task; only a new link returns it.
        Err(e) => Err(LinkError::Task(e.to_string())),
    }
}
