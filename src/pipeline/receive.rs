//! One link's receive loop: take messages up to `max_in_flight`, deliver them (the POSTs
//! under way polled by the loop's own task, none in a task of its own), settle each as it
//! finishes, and keep link credit in step with the breaker. A panic while handling one
//! message settles that message (rejected, with the reason) and the loop goes on. Ends on a
//! stop signal or a link failure.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use fe2o3_amqp::types::messaging::{Body, Message};
use fe2o3_amqp::types::primitives::Value;
use futures_util::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::time::Instant;

use crate::amqp::error::LinkError;
use crate::amqp::link::Incoming;
use crate::delivery::dispatcher::{DeliveryOutcome, Dispatcher};
use crate::delivery::request::PushRequest;
use crate::pipeline::batch::{self, Gathering};
use crate::pipeline::catch::{CatchUnwind, catch};
use crate::pipeline::credit::CreditFollower;
use crate::pipeline::link::Link;
use crate::pipeline::reply::{self, Replier};
use crate::pipeline::settle::{
    AcceptBuffer, Finished, SettleBatching, settle_finished, settle_one,
};
use crate::shutdown::StopSignals;
use crate::telemetry::EnrollmentTelemetry;
use crate::telemetry::events::{BreakerChanged, InFlightChanged, InFlightCleared, Redelivered};

/// Why one link's receive loop ended.
#[derive(Debug)]
pub enum LinkEnd {
    Stopped,
    Removed,
    Failed(LinkError),
}

/// What the loop works with, borrowed from the worker.
pub struct LoopParts<'a> {
    pub dispatcher: &'a Arc<Dispatcher>,
    pub telemetry: &'a EnrollmentTelemetry,
    pub signals: &'a StopSignals,
    /// The enrollment's credit while the breaker is closed.
    pub credit: u32,
    /// The credit the link was attached with.
    pub granted: u32,
    /// Publishes replies (`delivery.reply`); `None` where nothing can be published.
    pub replier: Option<&'a Replier>,
    pub settle_batching: SettleBatching,
}

/// What a delivery gives back: one message's outcome, or each of a batch's.
enum Done<D> {
    One(Finished<D>),
    Batch(Vec<Finished<D>>),
}

impl<D> Done<D> {
    fn into_finished(self) -> impl Iterator<Item = Finished<D>> {
        let (one, many) = match self {
            Done::One(finished) => (Some(finished), Vec::new()),
            Done::Batch(all) => (None, all),
        };
        one.into_iter().chain(many)
    }
}

/// A delivery under way. The loop polls these itself (a `FuturesUnordered`) rather than
/// spawning a task each: measured, a task per message cost a spawn, a join and most often a
/// wake-up across the two worker threads. Boxed: single POSTs and batch POSTs share the set,
/// and pushing one copies a pointer into the set's node rather than the ~1.6 KB of a POST.
type Delivering<'a, D> = Pin<Box<dyn Future<Output = Done<D>> + Send + 'a>>;

/// Starts the POSTs of the batches ready to go, while POST slots are free.
fn send_ready<'a, D: Send + 'a>(
    gathering: &mut Gathering<D>,
    in_flight: &mut FuturesUnordered<Delivering<'a, D>>,
    max_in_flight: usize,
    dispatcher: &'a Dispatcher,
    signals: &'a StopSignals,
) {
    let now = tokio::time::Instant::now();
    while in_flight.len() < max_in_flight {
        let Some(ready) = gathering.next_ready(now) else {
            return;
        };
        in_flight.push(Box::pin(async move {
            let delivering = std::pin::pin!(batch::deliver(dispatcher, ready, signals));
            // A panic here loses the batch's deliveries with its future: unsettled, they go
            // back to the broker with the link. The loop itself goes on.
            Done::Batch(CatchUnwind(delivering).await.unwrap_or_else(|reason| {
                tracing::error!(panic = %reason, "a batch POST panicked; its messages stay unsettled until the link ends");
                Vec::new()
            }))
        }));
    }
}

/// A panicked delivery: the message is rejected, so the broker dead-letters it rather than
/// redelivering it into the same panic.
fn panicked(what: &str, reason: String) -> DeliveryOutcome {
    tracing::error!(panic = %reason, "{what} panicked; rejecting the message");
    DeliveryOutcome::Rejected {
        reason: format!("{what} panicked: {reason}"),
        message_id: None,
    }
}

pub async fn receive_loop<L: Link>(parts: LoopParts<'_>, link: &mut L) -> LinkEnd {
    let LoopParts {
        dispatcher,
        telemetry,
        signals,
        credit,
        granted,
        replier,
        settle_batching,
    } = parts;
    let replies = dispatcher.policy().reply;
    let max_in_flight = dispatcher.policy().max_in_flight as usize;
    // Each returns its delivery with the outcome, a panic included (caught inside).
    let mut in_flight: FuturesUnordered<Delivering<'_, L::Delivery>> = FuturesUnordered::new();
    // With `delivery.batch`, messages gather while batches are under way (the link credit
    // bounds them) and at most `max_in_flight` batch POSTs run at once.
    let mut gathering = dispatcher.policy().batch.map(Gathering::new);
    let mut breaker = dispatcher.breaker.subscribe();
    let mut accepts = AcceptBuffer::new(settle_batching, credit);
    let mut credit = CreditFollower::new(credit, granted);
    // Whether this broker sets `first-acquirer` (see `request_for`).
    let mut sets_first_acquirer = false;
    let state = dispatcher.breaker.state();
    telemetry.emit_status(BreakerChanged(state));
    if let Err(e) = credit.follow(link, state, 0).await {
        return LinkEnd::Failed(e);
    }
    let end = loop {
        let half_opens_at = dispatcher.breaker.half_opens_at();
        // Only cancel-safe futures here: `cancelled`, `next`, `changed`, `sleep` and `recv`
        // (fe2o3-amqp #22). The POSTs under way are polled by `next`, or inline below.
        tokio::select! {
            biased;
            _ = signals.stop.cancelled() => {
                break if signals.remove.is_cancelled() { LinkEnd::Removed } else { LinkEnd::Stopped };
            }
            Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                // POSTs that finished meanwhile are settled with it, their accepts batched.
                // (Polled without a waker: the next turn polls the set again with one.)
                let finished: Vec<Finished<L::Delivery>> = std::iter::once(done)
                    .chain(std::iter::from_fn(|| in_flight.next().now_or_never().flatten()))
                    .flat_map(Done::into_finished)
                    .collect();
                if let Err(e) = settle_finished(link, telemetry, &mut accepts, finished).await {
                    break LinkEnd::Failed(e);
                }
                if let Some(gathering) = gathering.as_mut() {
                    send_ready(gathering, &mut in_flight, max_in_flight, dispatcher, signals);
                }
                // A half-open breaker grants its probe credit once the hand is empty.
                let state = *breaker.borrow();
                if let Err(e) = credit.follow(link, state, in_flight.len()).await {
                    break LinkEnd::Failed(e);
                }
            }
            Ok(()) = breaker.changed() => {
                let state = *breaker.borrow_and_update();
                telemetry.emit_status(BreakerChanged(state));
                if let Err(e) = credit.follow(link, state, in_flight.len()).await {
                    break LinkEnd::Failed(e);
                }
            }
            () = accepts.due(), if !accepts.is_empty() => {
                if let Err(e) = accepts.flush(link, telemetry).await {
                    break LinkEnd::Failed(e);
                }
            }
            () = gathering_due(&mut gathering),
                if in_flight.len() < max_in_flight
                    && gathering.as_ref().is_some_and(|g| g.due_at().is_some()) => {
                if let Some(gathering) = gathering.as_mut() {
                    send_ready(gathering, &mut in_flight, max_in_flight, dispatcher, signals);
                }
            }
            _ = sleep_until(half_opens_at), if half_opens_at.is_some() => {
                // The breaker's own timer: it turns half-open even with nothing in hand to
                // ask, and the change above then grants the probe its credit.
                dispatcher.breaker.half_open_if_due();
            }
            received = link.recv(), if gathering.is_some() || in_flight.len() < max_in_flight => {
                let (delivery, message) = match received {
                    Ok(Incoming::Message { delivery, message }) => (delivery, message),
                    Ok(Incoming::Undecodable { delivery, reason }) => {
                        // Nothing to POST: dead-letter it and go on with the next message.
                        telemetry.emit(InFlightChanged(1));
                        let outcome = DeliveryOutcome::Rejected {
                            reason: format!("undecodable message: {reason}"),
                            message_id: None,
                        };
                        if let Err(e) = settle_one(link, telemetry, delivery, outcome).await {
                            break LinkEnd::Failed(e);
                        }
                        continue;
                    }
                    Err(e) => break LinkEnd::Failed(e),
                };
                telemetry.emit(InFlightChanged(1));
                let request = match catch(|| {
                    request_for(dispatcher, telemetry, &message, &mut sets_first_acquirer)
                }) {
                    Ok(request) => request,
                    Err(reason) => {
                        let outcome = panicked("mapping the message", reason);
                        if let Err(e) = settle_one(link, telemetry, delivery, outcome).await {
                            break LinkEnd::Failed(e);
                        }
                        continue;
                    }
                };
                if let Some(gathering) = gathering.as_mut() {
                    drop(message);
                    gathering.push(delivery, request);
                    send_ready(gathering, &mut in_flight, max_in_flight, dispatcher, signals);
                    continue;
                }
                let plan = reply::plan(replies, &message);
                drop(message);
                if max_in_flight == 1 {
                    // One at a time: deliver right here, saving the set's bookkeeping and a
                    // turn of the loop per message. The breaker is still followed meanwhile.
                    // Boxed: one allocation per message, where inline the POST's future would
                    // make every idle enrollment's loop as large as a POST under way.
                    let mut delivering = Box::pin(reply::deliver(
                        dispatcher,
                        &request,
                        plan.as_ref(),
                        replier,
                        signals
                    ));
                    let mut delivering = CatchUnwind(delivering.as_mut());
                    // Accepts already due go out first; the others wait for the end of this
                    // POST. Their timer stays off meanwhile: firing in the middle of fast
                    // POSTs (tried, also moved to the delay after the POST's start) it cost a
                    // third to a half again the daemon's CPU per message.
                    if accepts.is_due(Instant::now())
                        && let Err(e) = accepts.flush(link, telemetry).await
                    {
                        break LinkEnd::Failed(e);
                    }
                    accepts.disarm();
                    let mut credit_error = None;
                    let outcome = loop {
                        tokio::select! {
                            outcome = &mut delivering => break outcome,
                            Ok(()) = breaker.changed(), if credit_error.is_none() => {
                                let state = *breaker.borrow_and_update();
                                telemetry.emit_status(BreakerChanged(state));
                                credit_error = credit.follow(link, state, 1).await.err();
                            }
                        }
                    };
                    // The accept joins the buffer: the next POST need not wait for it.
                    let outcome = outcome.unwrap_or_else(|reason| panicked("delivery", reason));
                    let finished = std::iter::once((delivery, outcome));
                    if let Err(e) = settle_finished(link, telemetry, &mut accepts, finished).await {
                        break LinkEnd::Failed(e);
                    }
                    if let Some(e) = credit_error {
                        break LinkEnd::Failed(e);
                    }
                    let state = *breaker.borrow();
                    if let Err(e) = credit.follow(link, state, 0).await {
                        break LinkEnd::Failed(e);
                    }
                    continue;
                }
                // Polled within the loop's task, so within its span: the enrollment id and
                // queue stay on the delivery's log lines.
                in_flight.push(Box::pin(async move {
                    let delivering = std::pin::pin!(reply::deliver(
                        dispatcher,
                        &request,
                        plan.as_ref(),
                        replier,
                        signals
                    ));
                    let outcome = CatchUnwind(delivering)
                        .await
                        .unwrap_or_else(|reason| panicked("delivery", reason));
                    Done::One((delivery, outcome))
                }));
            }
        }
    };
    // Stopping: deliveries waiting on a retry or the breaker hand back at once; POSTs under
    // way finish (shutdown) or are abandoned (removal, the shutdown deadline); each is settled
    // before the link goes. After a link failure the settlements cannot reach the broker,
    // which takes the messages back with the link, so the POSTs are dropped.
    let link_failed = matches!(end, LinkEnd::Failed(_));
    if link_failed {
        in_flight.clear();
    } else {
        if let Err(e) = accepts.flush(link, telemetry).await {
            tracing::debug!(error = %e, "settling while stopping failed");
        }
        // Gathered but never sent: back to the broker at once, uncounted.
        let unsent = gathering.as_mut().map(Gathering::drain).unwrap_or_default();
        for delivery in unsent {
            let outcome = DeliveryOutcome::HandedBack;
            if let Err(e) = settle_one(link, telemetry, delivery, outcome).await {
                tracing::debug!(error = %e, "settling while stopping failed");
            }
        }
    }
    while let Some(done) = in_flight.next().await {
        for (delivery, outcome) in done.into_finished() {
            if let Err(e) = settle_one(link, telemetry, delivery, outcome).await {
                tracing::debug!(error = %e, "settling while stopping failed");
            }
        }
    }
    // Whatever was not settled went back to the broker with the link.
    telemetry.emit(InFlightCleared);
    end
}

/// A timer made for one turn of the loop: the half-open breaker's, rare. The timers due on
/// most turns are kept across them (see [`crate::pipeline::timer`]).
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The POST for one message; counts a redelivery on the way.
fn request_for(
    dispatcher: &Dispatcher,
    telemetry: &EnrollmentTelemetry,
    message: &Message<Body<Value>>,
    sets_first_acquirer: &mut bool,
) -> PushRequest {
    let header = message.header.as_ref();
    let delivery_count = header.map_or(0, |h| h.delivery_count);
    let first_acquirer = header.is_some_and(|h| h.first_acquirer);
    // `first-acquirer` defaults to false when a broker leaves it out, so a false one means a
    // redelivery only from a broker seen setting it (RabbitMQ 3.10 does, with a count of 0).
    *sets_first_acquirer |= first_acquirer;
    if delivery_count > 0 || (*sets_first_acquirer && header.is_some() && !first_acquirer) {
        telemetry.emit(Redelivered);
    }
    PushRequest::from_message_with(
        message,
        dispatcher.enrollment_header(),
        delivery_count,
        dispatcher.signs(),
    )
}

/// When the batch being gathered is due; never without `delivery.batch`.
async fn gathering_due<D>(gathering: &mut Option<Gathering<D>>) {
    match gathering {
        Some(gathering) => gathering.due().await,
        None => std::future::pending().await,
    }
}
