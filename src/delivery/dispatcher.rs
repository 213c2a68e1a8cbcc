//! One enrollment's delivery machinery, shared by its in-flight messages: the POST with local
//! retries, the circuit breaker, the rate limit and the signature. It decides what happened to
//! a message ([`DeliveryOutcome`]); what the broker is then told is the pipeline's call.

use std::sync::Arc;
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use reqwest::header::{HeaderMap, HeaderValue};
use url::Url;

use crate::delivery::breaker::{CircuitBreaker, Health};
use crate::delivery::clients::{TargetHttp, TargetRoute};
use crate::delivery::post::{Answer, PostResult, age_since, request_headers};
use crate::delivery::request::PushRequest;
use crate::delivery::signing;
use crate::delivery::verdict::{Verdict, verdict};
use crate::enrollment::live::LiveEnrollment;
use crate::enrollment::policy::DeliveryPolicy;
use crate::enrollment::settings::{MAX_RATE_PER_SEC, MIN_RATE_PER_SEC};
use crate::enrollment::status::BreakerState;
use crate::shutdown::StopSignals;
use crate::telemetry::events::{
    AttemptFailed, HoldEnded, HoldStarted, PostAttempted, RetryScheduled,
};
use crate::telemetry::{EnrollmentTelemetry, metrics::status_class};

/// What became of one message's delivery. `message_id` is kept for the log line of the
/// outcomes an operator looks into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// 2xx. `age`: now minus the message's creation-time, when it has one.
    Delivered { age: Option<Duration> },
    /// The answer is in `drop_on`.
    Dropped {
        reason: String,
        message_id: Option<String>,
    },
    /// The answer is in `reject_on`.
    Rejected {
        reason: String,
        message_id: Option<String>,
    },
    /// Attempts used up, or an answer outside every class.
    Failed {
        reason: String,
        message_id: Option<String>,
    },
    /// Not the message's fault: the worker is stopping or the enrollment was deleted.
    HandedBack,
}

pub struct Dispatcher {
    /// The client the target's POSTs go through.
    route: TargetRoute,
    /// `hot-potato-enrollment-id`, built once.
    enrollment_header: HeaderValue,
    /// Read for its policy: shared with the registry rather than copied (~0.35 KiB, and
    /// the policy's lists, per idle enrollment).
    live: Arc<LiveEnrollment>,
    static_headers: HeaderMap,
    signing_key: Option<Vec<u8>>,
    /// Lives as long as the worker, across reconnects, so its state survives a broker hiccup.
    pub breaker: CircuitBreaker,
    limiter: Option<DefaultDirectRateLimiter>,
    telemetry: Arc<EnrollmentTelemetry>,
}

impl Dispatcher {
    pub fn new(
        http: TargetHttp,
        live: &Arc<LiveEnrollment>,
        telemetry: Arc<EnrollmentTelemetry>,
    ) -> Result<Self, url::ParseError> {
        let policy = &live.policy;
        let limiter = policy
            .rate_limit_per_sec
            .filter(|rate| rate.is_finite())
            // Stored enrollments are not re-validated on load: clamp, so no stored rate can
            // overflow the quota (governor panics on periods over ~584 years).
            .map(|rate| rate.clamp(MIN_RATE_PER_SEC, MAX_RATE_PER_SEC))
            .and_then(|rate| Duration::try_from_secs_f64(1.0 / rate).ok())
            .and_then(Quota::with_period)
            .map(RateLimiter::direct);
        let target_url = Url::parse(&live.enrollment.target_url)?;
        let enrollment_header = HeaderValue::from_str(&live.enrollment.id.to_string())
            .unwrap_or_else(|_| HeaderValue::from_static(""));
        Ok(Self {
            route: http.route(target_url),
            enrollment_header,
            static_headers: signing::static_headers(policy),
            signing_key: policy.signing.as_ref().and_then(|s| s.key()),
            breaker: CircuitBreaker::new(policy.circuit_breaker),
            limiter,
            telemetry,
            live: Arc::clone(live),
        })
    }

    /// The header that names the enrollment on every POST.
    pub fn enrollment_header(&self) -> &HeaderValue {
        &self.enrollment_header
    }

    /// Whether POSTs carry Standard Webhooks signature headers (and so need a `webhook-id`).
    pub fn signs(&self) -> bool {
        self.signing_key.is_some()
    }

    pub fn policy(&self) -> &DeliveryPolicy {
        &self.live.policy
    }

    fn headers_for(&self, request: &PushRequest, webhook_id: &str) -> HeaderMap {
        let mut headers = self.static_headers.clone();
        if let Some(key) = &self.signing_key {
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            headers.extend(signing::webhook_headers(
                key,
                webhook_id,
                now,
                &request.body,
            ));
        }
        headers
    }

    /// Delivers one message and says what became of it:
    /// - an error answer in the retry class (500 by default) is retried with backoff, every
    ///   attempt counted, probes included, until `retry.max_attempts`: then it fails, so a
    ///   message the target keeps failing reaches the dead-letter queue through the broker's
    ///   delivery limit and the messages behind it flow;
    /// - no answer, or an answer in `unavailable_on`, holds the message in hand, its attempts
    ///   uncounted and its delivery count untouched, retrying with backoff and through the
    ///   breaker's probes until the target is back (or `max_hold_ms` has passed);
    /// - stopping hands it back at once, removal abandons a POST under way.
    pub async fn deliver(&self, request: &PushRequest, signals: &StopSignals) -> DeliveryOutcome {
        self.deliver_keeping(request, false, signals).await.0
    }

    /// [`Self::deliver`], and with `keep` the target's final answer (the one the outcome
    /// comes from; earlier attempts' answers are not kept), for a reply.
    pub async fn deliver_keeping(
        &self,
        request: &PushRequest,
        keep: bool,
        signals: &StopSignals,
    ) -> (DeliveryOutcome, Option<Answer>) {
        let mut answer = None;
        let outcome = self.attempts(request, keep, &mut answer, signals).await;
        (outcome, answer)
    }

    async fn attempts(
        &self,
        request: &PushRequest,
        keep: bool,
        answer: &mut Option<Answer>,
        signals: &StopSignals,
    ) -> DeliveryOutcome {
        // The same on every attempt and every redelivery, so a receiver can de-duplicate on it.
        let webhook_id = &request.webhook_id;
        let message_id = request.message_id.as_deref().unwrap_or("");
        let failed = |reason: String| DeliveryOutcome::Failed {
            reason,
            message_id: request.message_id.clone(),
        };
        let mut attempts = 0u32;
        let mut held: Option<Hold<'_>> = None;
        loop {
            // A held message waiting for the breaker still leaves at `max_hold_ms`.
            let hold_ends = held
                .as_ref()
                .zip(self.policy().max_hold_ms)
                .map(|(hold, limit)| hold.since + Duration::from_millis(limit));
            let permit = tokio::select! {
                biased;
                _ = signals.stop.cancelled() => return DeliveryOutcome::HandedBack,
                _ = sleep_until(hold_ends) => {
                    let limit = self.policy().max_hold_ms.unwrap_or(0);
                    return failed(format!("target unavailable; held longer than max_hold_ms ({limit} ms)"));
                }
                permit = self.breaker.acquire() => permit,
            };
            if let Some(limiter) = &self.limiter {
                tokio::select! {
                    biased;
                    _ = signals.stop.cancelled() => return DeliveryOutcome::HandedBack,
                    _ = limiter.until_ready() => {}
                }
            }
            let headers = self.headers_for(request, webhook_id);
            // Stopping lets a POST finish; removal and the shutdown deadline abandon it.
            let result = tokio::select! {
                biased;
                _ = signals.abandon.cancelled() => return DeliveryOutcome::HandedBack,
                result = self.timed_post(request, headers, keep) => result,
            };
            let (result, kept) = result;
            *answer = kept;
            // A refused address is not the target's answer: no retry, no hold, and the
            // message is dead-lettered with the reason rather than looped.
            let verdict = match result {
                PostResult::Blocked(_) => Verdict::Reject,
                _ => verdict(result.code(), self.policy()),
            };
            permit.record(health(verdict));
            let reason = || result.describe();
            let delay = match verdict {
                Verdict::Success => {
                    return DeliveryOutcome::Delivered {
                        age: request.created_at_ms.and_then(age_since),
                    };
                }
                Verdict::Drop => {
                    return DeliveryOutcome::Dropped {
                        reason: reason(),
                        message_id: request.message_id.clone(),
                    };
                }
                Verdict::Reject => {
                    return DeliveryOutcome::Rejected {
                        reason: reason(),
                        message_id: request.message_id.clone(),
                    };
                }
                Verdict::Fail => return failed(reason()),
                Verdict::Retry => {
                    attempts = attempts.saturating_add(1);
                    let why = reason();
                    self.telemetry.emit(AttemptFailed {
                        message_id,
                        reason: &why,
                    });
                    if attempts >= self.policy().retry.max_attempts {
                        return failed(why);
                    }
                    let delay = self.retry_delay(&result, attempts);
                    self.telemetry.emit(RetryScheduled {
                        message_id,
                        attempt: attempts,
                        delay,
                    });
                    delay
                }
                Verdict::Unavailable => {
                    let why = reason();
                    self.telemetry.emit(AttemptFailed {
                        message_id,
                        reason: &why,
                    });
                    let hold =
                        held.get_or_insert_with(|| Hold::start(&self.telemetry, message_id, &why));
                    hold.tries = hold.tries.saturating_add(1);
                    if let Some(limit) = self.policy().max_hold_ms
                        && hold.since.elapsed() >= Duration::from_millis(limit)
                    {
                        return failed(format!("{why}; held longer than max_hold_ms ({limit} ms)"));
                    }
                    if self.breaker.state() != BreakerState::Closed {
                        // The next attempt waits for the breaker's probe slot.
                        continue;
                    }
                    self.retry_delay(&result, hold.tries)
                }
            };
            tokio::select! {
                biased;
                _ = signals.stop.cancelled() => return DeliveryOutcome::HandedBack,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// The wait before the next attempt: the target's `Retry-After` (capped at
    /// `retry.max_ms`), else the retry policy's backoff after `tries` failures.
    fn retry_delay(&self, result: &PostResult, tries: u32) -> Duration {
        let retry_after = match result {
            PostResult::Status { retry_after, .. } => *retry_after,
            _ => None,
        };
        retry_after
            .map(|d| d.min(Duration::from_millis(self.policy().retry.max_ms)))
            .unwrap_or_else(|| self.policy().retry.delay(tries, fastrand::f64()))
    }

    async fn timed_post(
        &self,
        request: &PushRequest,
        headers: HeaderMap,
        keep: bool,
    ) -> (PostResult, Option<Answer>) {
        let started = std::time::Instant::now();
        let headers = request_headers(request, headers);
        let body = request.body.clone();
        let bounds = (self.policy().timeout(), self.policy().response_max_bytes);
        let (result, answer) = self.route.post(headers, body, bounds, keep).await;
        self.telemetry.emit(PostAttempted {
            status_class: status_class(result.code(), result == PostResult::Timeout),
            took: started.elapsed(),
        });
        (result, answer)
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// What a verdict says about the target's health, for the breaker: only an unavailable target
/// counts against it; an error answer comes from a live target.
fn health(verdict: Verdict) -> Health {
    match verdict {
        Verdict::Success => Health::Up,
        Verdict::Unavailable => Health::Down,
        Verdict::Retry | Verdict::Reject | Verdict::Drop | Verdict::Fail => Health::Answered,
    }
}

/// A message held in hand while the target is unavailable; counted in the status for as long
/// as it lives, however the delivery ends (even when its task is aborted).
struct Hold<'a> {
    telemetry: &'a EnrollmentTelemetry,
    since: Instant,
    tries: u32,
}

impl<'a> Hold<'a> {
    fn start(telemetry: &'a EnrollmentTelemetry, message_id: &str, reason: &str) -> Self {
        telemetry.emit(HoldStarted { message_id, reason });
        Self {
            telemetry,
            since: Instant::now(),
            tries: 0,
        }
    }
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        self.telemetry.emit(HoldEnded);
    }
}
