//! One enrollment's worker: connect and attach, run the receive loop, and on any broker error
//! let the link go and reconnect with backoff, forever, until told to stop. This task alone
//! owns the link, so every outcome (including `modified` and `rejected`) stays available.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backoff::{Backoff, BackoffSettings};
use crate::delivery::clients::TargetHttp;
use crate::delivery::dispatcher::Dispatcher;
use crate::enrollment::live::LiveEnrollment;
use crate::pipeline::credit::CreditFollower;
use crate::pipeline::link::{Link, LinkOpener};
use crate::pipeline::receive::{LinkEnd, LoopParts, receive_loop};
use crate::pipeline::reply::Replier;
use crate::pipeline::settle::SettleBatching;
use crate::shutdown::StopSignals;
use crate::telemetry::events::{Connecting, LinkAttached, LinkDown, WorkerRefused, WorkerStopped};
use crate::telemetry::{EnrollmentTelemetry, Metrics};

/// Everything a worker needs besides its enrollment; one shared copy for all workers.
pub struct WorkerContext<O> {
    pub opener: Arc<O>,
    /// The target clients every worker shares (see [`TargetHttp`]).
    pub http: TargetHttp,
    pub default_prefetch: u32,
    /// How accepts are gathered into ranges (`SETTLE_BATCH_MAX`, `SETTLE_BATCH_DELAY_US`).
    pub settle_batching: SettleBatching,
    pub reconnect: BackoffSettings,
    pub metrics: Metrics,
    /// Publishes the replies of enrollments with `delivery.reply`.
    pub replier: Option<Replier>,
}

impl<O> Clone for WorkerContext<O> {
    fn clone(&self) -> Self {
        Self {
            opener: Arc::clone(&self.opener),
            http: self.http.clone(),
            default_prefetch: self.default_prefetch,
            settle_batching: self.settle_batching,
            reconnect: self.reconnect,
            metrics: self.metrics.clone(),
            replier: self.replier.clone(),
        }
    }
}

/// A link that stayed up this long counts as healthy and resets the reconnect backoff; a
/// shorter life (the broker accepts the attach and then ends the session) keeps backing off.
const HEALTHY_LINK_AGE: Duration = Duration::from_secs(10);

/// How a worker ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerEnd {
    /// Stopped or paused: the link, if any, was detached.
    Stopped,
    /// Removed: the link was closed (`closed=true`), or there was nothing to close.
    Closed,
    /// Removed, but no link could be opened to close the subscription: why.
    CloseFailed(String),
}

/// Runs one enrollment's worker until it is stopped or removed. `generation` is the number
/// the supervisor gave this start (see [`crate::enrollment::status::EnrollmentStatus::generation`]).
pub async fn run<O: LinkOpener>(
    ctx: WorkerContext<O>,
    live: Arc<LiveEnrollment>,
    signals: StopSignals,
    generation: u64,
) -> WorkerEnd {
    let enrollment = &live.enrollment;
    let telemetry = Arc::new(EnrollmentTelemetry::new(
        enrollment.id,
        Arc::clone(&live.status),
        &ctx.metrics,
        generation,
    ));
    // Into its `Arc` before the match: the match keeps its scrutinee alive through the arm's
    // await, and a whole `Dispatcher` there would widen every idle worker's future.
    let dispatcher = Dispatcher::new(ctx.http.clone(), &live, Arc::clone(&telemetry)).map(Arc::new);
    let dispatcher = match dispatcher {
        Ok(d) => d,
        Err(e) => {
            // Validated at enroll time; a stored URL that no longer parses stops here, visibly.
            telemetry.emit_status(WorkerRefused {
                reason: &format!("target_url does not parse: {e}"),
            });
            return if signals.remove.is_cancelled() {
                Box::pin(close_without_link(&ctx, enrollment)).await
            } else {
                WorkerEnd::Stopped
            };
        }
    };
    let max_in_flight = dispatcher.policy().max_in_flight;
    // Credit at least covers the POSTs allowed in flight, so none of them waits on the broker,
    // and a whole batch, so one can fill before its wait runs out.
    let batch_messages = dispatcher.policy().batch.map_or(0, |b| b.max_messages);
    let credit = enrollment
        .subscription_args
        .prefetch
        .unwrap_or(ctx.default_prefetch)
        .max(max_in_flight)
        .max(batch_messages);
    let mut backoff = Backoff::new(ctx.reconnect);
    let end = loop {
        telemetry.emit_status(Connecting);
        // A breaker that opened during an earlier link must not get fresh credit now: the
        // link attaches with the credit the breaker allows (none while open, one to probe).
        let granted = CreditFollower::wanted(credit, dispatcher.breaker.state(), 0);
        // Not raced against the stop signal: dropping a half-open connection would leave it
        // to linger on the broker. Opening is bounded by AMQP_CONNECT_TIMEOUT_MS, and a link
        // that comes up after the signal is closed again at once.
        // Boxed, like every await of this loop but the receive loop's own: a future holds room
        // for its largest await, and ten thousand idle enrollments each hold this one.
        // The link itself is boxed too: held across the receive loop, ~0.8 KiB inline.
        let opened = Box::pin(ctx.opener.open(enrollment, granted))
            .await
            .map(Box::new);
        if signals.stop.is_cancelled() {
            break match opened {
                Ok(link) if signals.remove.is_cancelled() => {
                    Box::pin((*link).close()).await;
                    WorkerEnd::Closed
                }
                Ok(link) => {
                    Box::pin((*link).detach()).await;
                    WorkerEnd::Stopped
                }
                Err(_) if signals.remove.is_cancelled() => {
                    Box::pin(close_without_link(&ctx, enrollment)).await
                }
                Err(_) => WorkerEnd::Stopped,
            };
        }
        let failure = match opened {
            Ok(mut link) => {
                telemetry.emit_status(LinkAttached {
                    failure_outcome: link.failure_outcome(),
                    credit,
                    max_in_flight,
                });
                let attached_at = Instant::now();
                let parts = LoopParts {
                    dispatcher: &dispatcher,
                    telemetry: &telemetry,
                    signals: &signals,
                    credit,
                    granted,
                    replier: ctx.replier.as_ref(),
                    settle_batching: ctx.settle_batching,
                };
                match Box::pin(receive_loop(parts, &mut *link)).await {
                    LinkEnd::Stopped => {
                        Box::pin((*link).detach()).await;
                        break WorkerEnd::Stopped;
                    }
                    LinkEnd::Removed => {
                        Box::pin((*link).close()).await;
                        break WorkerEnd::Closed;
                    }
                    LinkEnd::Failed(e) => {
                        Box::pin((*link).abandon()).await;
                        if attached_at.elapsed() >= HEALTHY_LINK_AGE {
                            backoff.reset();
                        }
                        e.to_string()
                    }
                }
            }
            Err(e) => e.to_string(),
        };
        let delay = backoff.next_delay();
        telemetry.emit_status(LinkDown {
            error: &failure,
            retry_in: delay,
        });
        tokio::select! {
            biased;
            _ = signals.stop.cancelled() => {
                break if signals.remove.is_cancelled() {
                    Box::pin(close_without_link(&ctx, enrollment)).await
                } else {
                    WorkerEnd::Stopped
                };
            }
            _ = tokio::time::sleep(delay) => {}
        }
    };
    telemetry.emit_status(WorkerStopped {
        paused: live.status.paused(),
    });
    end
}

/// Closes an enrollment's subscription when no link is up (DELETE while backing off, paused
/// or refused): attach with no credit, then close. Without it a durable subscription would be
/// left on the broker collecting messages forever. Only a durable source leaves anything
/// behind to close.
pub async fn close_without_link<O: LinkOpener>(
    ctx: &WorkerContext<O>,
    enrollment: &crate::enrollment::record::Enrollment,
) -> WorkerEnd {
    if enrollment.subscription_args.durable != Some(true) {
        return WorkerEnd::Closed;
    }
    match ctx.opener.open(enrollment, 0).await {
        Ok(link) => {
            link.close().await;
            tracing::info!("closed the durable subscription of a deleted enrollment");
            WorkerEnd::Closed
        }
        Err(e) => WorkerEnd::CloseFailed(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    //! What an idle enrollment holds while it waits for a message: its worker's future and, in
    //! a box, its receive loop's, which holds the link's `recv`. Ten thousand are held at once
    //! (`AMQP_CONNECTION_POOL`), so a large await on a rare path costs memory on every one.
    //! Before their large awaits were boxed: the worker's future 2880 bytes, the receive loop's
    //! 4024, fe2o3's `recv` 2184; now 888, 1936 and 96 (debug and release builds alike).

    use std::future::Future;
    use std::sync::Arc;

    use fe2o3_amqp::Receiver;
    use fe2o3_amqp::types::messaging::Body;
    use fe2o3_amqp::types::primitives::Value;

    use super::{WorkerContext, run};
    use crate::amqp::link::AmqpLink;
    use crate::enrollment::live::LiveEnrollment;
    use crate::pipeline::link::AmqpOpener;
    use crate::pipeline::receive::{LoopParts, receive_loop};
    use crate::shutdown::StopSignals;

    /// The size of the future `start` returns, without making one: `A` is its arguments,
    /// as a tuple.
    fn size_of_future<A, F: Future>(_start: impl FnOnce(A) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    fn an_idle_enrollment_holds_small_futures() {
        type WorkerArgs = (
            WorkerContext<AmqpOpener>,
            Arc<LiveEnrollment>,
            StopSignals,
            u64,
        );
        let worker = size_of_future(|(ctx, live, signals, generation): WorkerArgs| {
            run(ctx, live, signals, generation)
        });
        let receive_loop = size_of_future(
            |(parts, link): (LoopParts<'static>, &'static mut AmqpLink)| receive_loop(parts, link),
        );
        let recv = size_of_future(|receiver: &'static mut Receiver| receiver.recv::<Body<Value>>());
        println!("worker {worker}, receive loop {receive_loop}, fe2o3 recv {recv} bytes");
        assert!(worker <= 1024, "the worker's future is {worker} bytes");
        assert!(
            receive_loop <= 2560,
            "the receive loop's future is {receive_loop} bytes"
        );
        assert!(recv <= 256, "fe2o3's recv future is {recv} bytes");
    }
}
