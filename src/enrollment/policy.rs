//! The effective delivery policy of an enrollment: its settings over the daemon's defaults,
//! with the retry delays it implies and a redacted copy for display.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::enrollment::batch::{BatchInput, BatchPolicy};
use crate::enrollment::settings::{Auth, BackoffKind, DeliverySettings, REDACTED, Signing};
use crate::enrollment::status_pattern::StatusPattern;

/// The daemon-wide defaults (from the environment) that fill what an enrollment leaves out.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryDefaults {
    pub max_in_flight: u32,
    pub timeout: Duration,
    pub retry: RetryPolicy,
    pub breaker_threshold: u32,
    pub breaker_open: Duration,
    /// `RESPONSE_MAX_BYTES`.
    pub response_max_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, utoipa::ToSchema)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub backoff: BackoffKind,
    pub base_ms: u64,
    pub max_ms: u64,
    pub jitter: bool,
}

impl RetryPolicy {
    /// The wait before attempt `attempt + 1`, after `attempt` (1-based) failed attempts;
    /// `jitter` is a number in [0, 1) that spreads the wait over [delay/2, delay].
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let n = u64::from(attempt.max(1));
        let raw = match self.backoff {
            BackoffKind::Fixed => self.base_ms,
            BackoffKind::Linear => self.base_ms.saturating_mul(n),
            BackoffKind::Exponential => {
                let shift = (n - 1).min(32) as u32;
                self.base_ms.saturating_mul(1u64 << shift)
            }
        }
        .min(self.max_ms);
        let ms = if self.jitter {
            let half = raw as f64 / 2.0;
            half + half * jitter.clamp(0.0, 1.0)
        } else {
            raw as f64
        };
        Duration::from_millis(ms as u64)
    }
}

/// The effective delivery policy of one enrollment.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct DeliveryPolicy {
    pub max_in_flight: u32,
    pub timeout_ms: u64,
    pub retry: RetryPolicy,
    pub retry_on: Vec<StatusPattern>,
    pub unavailable_on: Vec<StatusPattern>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_hold_ms: Option<u64>,
    pub reject_on: Vec<StatusPattern>,
    pub drop_on: Vec<StatusPattern>,
    pub circuit_breaker: BreakerPolicy,
    pub rate_limit_per_sec: Option<f64>,
    pub headers: BTreeMap<String, String>,
    pub auth: Option<Auth>,
    pub signing: Option<Signing>,
    /// How much of a target's answer is read; a longer one is dropped with its connection
    /// (the verdict comes from the status alone).
    pub response_max_bytes: usize,
    /// Whether the final answer is published to a message's `reply-to`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub reply: bool,
    /// Response headers the reply carries as application properties.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reply_headers: Vec<String>,
    /// Several messages per POST; `None`: one message per POST.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch: Option<BatchPolicy>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct BreakerPolicy {
    pub failure_threshold: u32,
    pub open_ms: u64,
}

/// The default unavailable class: 429, 502, 503 and 504 (network errors and timeouts are always
/// unavailable). A message answered with one of these is held, not counted.
pub fn default_unavailable_on() -> Vec<StatusPattern> {
    vec![StatusPattern::code(429), StatusPattern::range(502, 504)]
}

/// The default retry class: 408, 425, 429 and 5xx (network errors and timeouts always retry).
pub fn default_retry_on() -> Vec<StatusPattern> {
    vec![
        StatusPattern::code(408),
        StatusPattern::code(425),
        StatusPattern::code(429),
        StatusPattern::range(500, 599),
    ]
}
impl DeliverySettings {
    /// The effective policy: these settings over the daemon's defaults.
    pub fn resolve(&self, defaults: &DeliveryDefaults) -> DeliveryPolicy {
        let r = self.retry.clone().unwrap_or_default();
        let base_ms = r.base_ms.unwrap_or(defaults.retry.base_ms);
        let retry = RetryPolicy {
            max_attempts: r.max_attempts.unwrap_or(defaults.retry.max_attempts),
            backoff: r.backoff.unwrap_or(defaults.retry.backoff),
            base_ms,
            max_ms: r.max_ms.unwrap_or(defaults.retry.max_ms).max(base_ms),
            jitter: r.jitter.unwrap_or(defaults.retry.jitter),
        };
        let b = self.circuit_breaker.clone().unwrap_or_default();
        DeliveryPolicy {
            max_in_flight: self.max_in_flight.unwrap_or(defaults.max_in_flight),
            timeout_ms: self
                .timeout_ms
                .unwrap_or(defaults.timeout.as_millis() as u64),
            retry,
            retry_on: self.retry_on.clone().unwrap_or_else(default_retry_on),
            unavailable_on: self
                .unavailable_on
                .clone()
                .unwrap_or_else(default_unavailable_on),
            max_hold_ms: self.max_hold_ms,
            reject_on: self.reject_on.clone().unwrap_or_default(),
            drop_on: self.drop_on.clone().unwrap_or_default(),
            circuit_breaker: BreakerPolicy {
                failure_threshold: b.failure_threshold.unwrap_or(defaults.breaker_threshold),
                open_ms: b
                    .open_ms
                    .unwrap_or(defaults.breaker_open.as_millis() as u64),
            },
            rate_limit_per_sec: self.rate_limit_per_sec,
            headers: self.headers.clone().unwrap_or_default(),
            auth: self.auth.clone(),
            signing: self.signing.clone(),
            response_max_bytes: defaults.response_max_bytes,
            reply: self.reply.unwrap_or(false),
            reply_headers: self.reply_headers.clone().unwrap_or_default(),
            batch: self.batch.as_ref().map(BatchInput::resolve),
        }
    }
}

impl DeliveryPolicy {
    /// A copy safe to show: credentials and the signing secret replaced.
    pub fn redacted(&self) -> Self {
        let mut shown = self.clone();
        shown.auth = shown.auth.map(|a| match a {
            Auth::Bearer { .. } => Auth::Bearer {
                token: REDACTED.into(),
            },
            Auth::Basic { username, .. } => Auth::Basic {
                username,
                password: REDACTED.into(),
            },
            Auth::Header { name, .. } => Auth::Header {
                name,
                value: REDACTED.into(),
            },
        });
        shown.signing = shown.signing.map(|_| Signing {
            secret: REDACTED.into(),
        });
        shown
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn defaults() -> DeliveryDefaults {
        DeliveryDefaults {
            max_in_flight: 1,
            timeout: Duration::from_secs(10),
            retry: RetryPolicy {
                max_attempts: 5,
                backoff: BackoffKind::Exponential,
                base_ms: 1000,
                max_ms: 30_000,
                jitter: true,
            },
            breaker_threshold: 10,
            breaker_open: Duration::from_secs(5),
            response_max_bytes: 64 * 1024,
        }
    }

    #[test]
    fn retry_delays_follow_the_kind_and_cap() {
        let mut r = defaults().retry;
        r.jitter = false;
        r.base_ms = 100;
        r.max_ms = 1000;
        let ms = |r: &RetryPolicy, n| r.delay(n, 0.0).as_millis() as u64;
        assert_eq!(
            [1, 2, 3, 4, 5].map(|n| ms(&r, n)),
            [100, 200, 400, 800, 1000]
        );
        r.backoff = BackoffKind::Linear;
        assert_eq!([1, 2, 3, 11].map(|n| ms(&r, n)), [100, 200, 300, 1000]);
        r.backoff = BackoffKind::Fixed;
        assert_eq!([1, 7].map(|n| ms(&r, n)), [100, 100]);
        r.jitter = true;
        assert_eq!(r.delay(1, 0.0).as_millis(), 50);
        assert_eq!(r.delay(1, 0.999).as_millis(), 99);
    }
}
