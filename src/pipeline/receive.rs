//! One link's receive loop: take messages up to `max_in_flight`, deliver each (inline at
//! `max_in_flight` 1, else in its own task), settle each as it finishes, and keep link credit
//! in step with the breaker. Ends on a stop signal or a link failure.

use std::sync::Arc;

use fe2o3_amqp::types::messaging::{Body, Message};
use fe2o3_amqp::types::primitives::Value;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::amqp::error::LinkError;
use crate::amqp::link::Incoming;
use crate::delivery::dispatcher::{DeliveryOutcome, Dispatcher};
use crate::delivery::request::PushRequest;
use crate::pipeline::credit::CreditFollower;
use crate::pipeline::link::Link;
use crate::pipeline::settle::{Finished, settle_finished, settle_one};
use crate::shutdown::StopSignals;
use crate::telemetry::EnrollmentTelemetry;
use crate::telemetry::events::{BreakerChanged, InFlightChanged, Redelivered};

/// Why one link's receive loop ended.
#[derive(Debug)]
pub enum LinkEnd {
    Stopped,
    Removed,
    Failed(LinkFailure),
}

/// What broke a link.
#[derive(Debug, thiserror::Error)]
pub enum LinkFailure {
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The task of one delivery failed; its delivery went down with it, and only a new link
    /// returns the message.
    #[error("a delivery task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// What the loop works with, borrowed from the worker.
pub struct LoopParts<'a> {
    pub dispatcher: &'a Arc<Dispatcher>,
    pub telemetry: &'a EnrollmentTelemetry,
    pub signals: &'a StopSignals,
    pub credit: u32,
}

pub async fn receive_loop<L: Link>(parts: LoopParts<'_>, link: &mut L) -> LinkEnd {
    let LoopParts {
        dispatcher,
        telemetry,
        signals,
        credit,
    } = parts;
    let max_in_flight = dispatcher.policy().max_in_flight as usize;
    let mut in_flight: JoinSet<Finished<L::Delivery>> = JoinSet::new();
    let mut breaker = dispatcher.breaker.subscribe();
    let mut credit = CreditFollower::new(credit);
    // A breaker that opened during an earlier link must not get fresh credit now.
    if let Err(e) = credit.follow(link, dispatcher.breaker.state()).await {
        return LinkEnd::Failed(e.into());
    }
    telemetry.emit_status(BreakerChanged(dispatcher.breaker.state()));
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
                let mut finished = Vec::with_capacity(1);
                let mut failed = None;
                for joined in std::iter::once(joined).chain(std::iter::from_fn(|| in_flight.try_join_next())) {
                    match joined {
                        Ok(done) => finished.push(done),
                        Err(e) => {
                            telemetry.emit(InFlightChanged(-1));
                            failed = Some(e);
                        }
                    }
                }
                if let Err(e) = settle_finished(link, telemetry, finished).await {
                    break LinkEnd::Failed(e.into());
                }
                if let Some(e) = failed {
                    break LinkEnd::Failed(e.into());
                }
            }
            Ok(()) = breaker.changed() => {
                let state = *breaker.borrow_and_update();
                telemetry.emit_status(BreakerChanged(state));
                if let Err(e) = credit.follow(link, state).await {
                    break LinkEnd::Failed(e.into());
                }
            }
            received = link.recv(), if in_flight.len() < max_in_flight => {
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
                            break LinkEnd::Failed(e.into());
                        }
                        continue;
                    }
                    Err(e) => break LinkEnd::Failed(e.into()),
                };
                let request = request_for(dispatcher, telemetry, &message);
                drop(message);
                telemetry.emit(InFlightChanged(1));
                if max_in_flight == 1 {
                    // One at a time: deliver on this task and save a spawn and a cross-thread
                    // wake-up per message. The breaker is still followed meanwhile.
                    let delivering = dispatcher.deliver(&request, signals);
                    tokio::pin!(delivering);
                    let mut credit_error = None;
                    let outcome = loop {
                        tokio::select! {
                            outcome = &mut delivering => break outcome,
                            Ok(()) = breaker.changed(), if credit_error.is_none() => {
                                let state = *breaker.borrow_and_update();
                                telemetry.emit_status(BreakerChanged(state));
                                credit_error = credit.follow(link, state).await.err();
                            }
                        }
                    };
                    if let Err(e) = settle_one(link, telemetry, delivery, outcome).await {
                        break LinkEnd::Failed(e.into());
                    }
                    if let Some(e) = credit_error {
                        break LinkEnd::Failed(e.into());
                    }
                    continue;
                }
                let dispatcher = Arc::clone(dispatcher);
                let signals = signals.clone();
                in_flight.spawn(
                    async move {
                        let outcome = dispatcher.deliver(&request, &signals).await;
                        (delivery, outcome)
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
    let link_failed = matches!(end, LinkEnd::Failed(_));
    if link_failed {
        in_flight.abort_all();
    }
    while let Some(joined) = in_flight.join_next().await {
        match joined {
            Ok((delivery, outcome)) if !link_failed => {
                if let Err(e) = settle_one(link, telemetry, delivery, outcome).await {
                    tracing::debug!(error = %e, "settling while stopping failed");
                }
            }
            _ => telemetry.emit(InFlightChanged(-1)),
        }
    }
    end
}

/// The POST for one message; counts a redelivery on the way.
fn request_for(
    dispatcher: &Dispatcher,
    telemetry: &EnrollmentTelemetry,
    message: &Message<Body<Value>>,
) -> PushRequest {
    let header = message.header.as_ref();
    let delivery_count = header.map_or(0, |h| h.delivery_count);
    if delivery_count > 0 || header.is_some_and(|h| !h.first_acquirer) {
        telemetry.emit(Redelivered);
    }
    PushRequest::from_message(message, dispatcher.enrollment_header(), delivery_count)
}
