//! One enrollment's delivery machinery, shared by its in-flight messages: the POST with local
//! retries, the circuit breaker, the rate limit and the signature. It decides what happened to
//! a message ([`DeliveryOutcome`]); what the broker is then told is the pipeline's call.

use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use reqwest::header::{HeaderMap, HeaderValue};
use url::Url;
use uuid::Uuid;

use crate::delivery::breaker::{CircuitBreaker, Health, Permit};
use crate::delivery::post::{PostResult, age_since, post};
use crate::delivery::request::PushRequest;
use crate::delivery::signing;
use crate::delivery::verdict::{Verdict, verdict};
use crate::enrollment::live::LiveEnrollment;
use crate::enrollment::policy::DeliveryPolicy;
use crate::enrollment::status::BreakerState;
use crate::shutdown::StopSignals;
use crate::telemetry::events::{AttemptFailed, PostAttempted, RetryScheduled};
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
    http: reqwest::Client,
    /// Parsed once: reqwest would otherwise parse (and IDNA-map) the string per request.
    target_url: Url,
    /// `hot-potato-enrollment-id`, built once.
    enrollment_header: HeaderValue,
    policy: DeliveryPolicy,
    static_headers: HeaderMap,
    signing_key: Option<Vec<u8>>,
    /// Lives as long as the worker, across reconnects, so its state survives a broker hiccup.
    pub breaker: CircuitBreaker,
    limiter: Option<DefaultDirectRateLimiter>,
    telemetry: Arc<EnrollmentTelemetry>,
}

impl Dispatcher {
    pub fn new(
        http: reqwest::Client,
        live: &LiveEnrollment,
        telemetry: Arc<EnrollmentTelemetry>,
    ) -> Result<Self, url::ParseError> {
        let policy = live.policy.clone();
        let limiter = policy.rate_limit_per_sec.and_then(|rate| {
            Quota::with_period(Duration::from_secs_f64(1.0 / rate)).map(RateLimiter::direct)
        });
        let target_url = Url::parse(&live.enrollment.target_url)?;
        let enrollment_header = HeaderValue::from_str(&live.enrollment.id.to_string())
            .unwrap_or_else(|_| HeaderValue::from_static(""));
        Ok(Self {
            http,
            target_url,
            enrollment_header,
            static_headers: signing::static_headers(&policy),
            signing_key: policy.signing.as_ref().and_then(|s| s.key()),
            breaker: CircuitBreaker::new(policy.circuit_breaker),
            limiter,
            telemetry,
            policy,
        })
    }

    /// The header that names the enrollment on every POST.
    pub fn enrollment_header(&self) -> &HeaderValue {
        &self.enrollment_header
    }

    pub fn policy(&self) -> &DeliveryPolicy {
        &self.policy
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

    /// Delivers one message: POSTs it, retries locally with backoff while its answers are
    /// in the retry class and attempts remain, waits while the breaker is open (the message
    /// stays unsettled in hand, its delivery count unused), and says what became of it.
    pub async fn deliver(&self, request: &PushRequest, signals: &StopSignals) -> DeliveryOutcome {
        // Stable across attempts so a receiver can de-duplicate on it.
        let webhook_id = request
            .message_id
            .clone()
            .unwrap_or_else(|| format!("msg_{}", Uuid::new_v4().simple()));
        let message_id = request.message_id.as_deref().unwrap_or("");
        let max_attempts = self.policy.retry.max_attempts;
        let mut counted_attempts = 0u32;
        loop {
            let permit = tokio::select! {
                biased;
                _ = signals.stop.cancelled() => return DeliveryOutcome::HandedBack,
                permit = self.breaker.acquire() => permit,
            };
            if let Some(limiter) = &self.limiter {
                tokio::select! {
                    biased;
                    _ = signals.stop.cancelled() => {
                        self.breaker.abandon(permit);
                        return DeliveryOutcome::HandedBack;
                    }
                    _ = limiter.until_ready() => {}
                }
            }
            let headers = self.headers_for(request, &webhook_id);
            // Shutdown lets a POST finish; removal abandons it.
            let result = tokio::select! {
                biased;
                _ = signals.remove.cancelled() => {
                    self.breaker.abandon(permit);
                    return DeliveryOutcome::HandedBack;
                }
                result = self.timed_post(request, headers) => result,
            };
            if permit == Permit::Normal {
                counted_attempts += 1;
            }
            let verdict = verdict(result.code(), &self.policy);
            self.breaker.record(permit, health(verdict));
            let id = || request.message_id.clone();
            match verdict {
                Verdict::Success => {
                    return DeliveryOutcome::Delivered {
                        age: request.created_at_ms.and_then(age_since),
                    };
                }
                Verdict::Drop => {
                    return DeliveryOutcome::Dropped {
                        reason: result.describe(),
                        message_id: id(),
                    };
                }
                Verdict::Reject => {
                    return DeliveryOutcome::Rejected {
                        reason: result.describe(),
                        message_id: id(),
                    };
                }
                Verdict::Fail => {
                    return DeliveryOutcome::Failed {
                        reason: result.describe(),
                        message_id: id(),
                    };
                }
                Verdict::Retry => {
                    let reason = result.describe();
                    self.telemetry.emit(AttemptFailed {
                        message_id,
                        reason: &reason,
                    });
                    if self.breaker.state() != BreakerState::Closed {
                        // Held in hand; the next attempt waits for the breaker's probe slot.
                        continue;
                    }
                    if counted_attempts >= max_attempts {
                        return DeliveryOutcome::Failed {
                            reason,
                            message_id: id(),
                        };
                    }
                    let retry_after = match &result {
                        PostResult::Status { retry_after, .. } => *retry_after,
                        _ => None,
                    };
                    let delay = retry_after
                        .map(|d| d.min(Duration::from_millis(self.policy.retry.max_ms)))
                        .unwrap_or_else(|| {
                            self.policy.retry.delay(counted_attempts, fastrand::f64())
                        });
                    self.telemetry.emit(RetryScheduled {
                        message_id,
                        attempt: counted_attempts,
                        delay,
                    });
                    tokio::select! {
                        biased;
                        _ = signals.stop.cancelled() => return DeliveryOutcome::HandedBack,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    async fn timed_post(&self, request: &PushRequest, headers: HeaderMap) -> PostResult {
        let started = std::time::Instant::now();
        let result = post(
            &self.http,
            &self.target_url,
            request,
            headers,
            self.policy.timeout(),
        )
        .await;
        self.telemetry.emit(PostAttempted {
            status_class: status_class(result.code(), result == PostResult::Timeout),
            took: started.elapsed(),
        });
        result
    }
}

/// What a verdict says about the target's health, for the breaker.
fn health(verdict: Verdict) -> Health {
    match verdict {
        Verdict::Success => Health::Up,
        Verdict::Retry => Health::Down,
        Verdict::Reject | Verdict::Drop | Verdict::Fail => Health::Answered,
    }
}
