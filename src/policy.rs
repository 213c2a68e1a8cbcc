//! Per-enrollment delivery settings: the `delivery` object of `POST /enroll` as stored, its
//! validation, the effective policy after the environment's defaults fill the gaps, the
//! status classes, and the pure decision from one POST's result to what happens next.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::enrollment::EnrollmentError;

/// The `delivery` object as the user sent it; absent fields take the daemon's defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeliverySettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryInput>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_on: Option<Vec<StatusPattern>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reject_on: Option<Vec<StatusPattern>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_on: Option<Vec<StatusPattern>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<BreakerInput>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_per_sec: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<Auth>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing: Option<Signing>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryInput {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<BackoffKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BreakerInput {
    /// Consecutive failed POSTs that open the breaker; 0 turns it off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_threshold: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BackoffKind {
    Fixed,
    Linear,
    Exponential,
}

impl FromStr for BackoffKind {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "fixed" => Ok(Self::Fixed),
            "linear" => Ok(Self::Linear),
            "exponential" => Ok(Self::Exponential),
            _ => Err(()),
        }
    }
}

/// Credentials for the target. Stored and used; shown only redacted.
#[derive(Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Auth {
    Bearer { token: String },
    Basic { username: String, password: String },
    Header { name: String, value: String },
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Bearer { .. } => "Auth::Bearer(***)",
            Self::Basic { .. } => "Auth::Basic(***)",
            Self::Header { .. } => "Auth::Header(***)",
        })
    }
}

/// Standard Webhooks signing key. A `whsec_` prefix marks a base64 key (the spec's form);
/// any other string is used as raw bytes.
#[derive(Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Signing {
    pub secret: String,
}

impl fmt::Debug for Signing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Signing(***)")
    }
}

pub const REDACTED: &str = "***";

/// One status code (`404`) or an inclusive range (`"500-599"`, or `"5xx"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusPattern {
    pub low: u16,
    pub high: u16,
}

impl StatusPattern {
    pub const fn code(code: u16) -> Self {
        Self {
            low: code,
            high: code,
        }
    }
    pub const fn range(low: u16, high: u16) -> Self {
        Self { low, high }
    }
    pub fn matches(&self, code: u16) -> bool {
        (self.low..=self.high).contains(&code)
    }
}

impl FromStr for StatusPattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let valid = |c: u16| (100..=599).contains(&c);
        let bad =
            || format!("`{s}` is not a status code, a range like 500-599, or a class like 5xx");
        if let Some(class) = s.strip_suffix("xx").or_else(|| s.strip_suffix("XX")) {
            let digit: u16 = class.parse().map_err(|_| bad())?;
            if !(1..=5).contains(&digit) {
                return Err(bad());
            }
            return Ok(Self::range(digit * 100, digit * 100 + 99));
        }
        if let Some((a, b)) = s.split_once('-') {
            let low: u16 = a.trim().parse().map_err(|_| bad())?;
            let high: u16 = b.trim().parse().map_err(|_| bad())?;
            if !valid(low) || !valid(high) || low > high {
                return Err(bad());
            }
            return Ok(Self::range(low, high));
        }
        let code: u16 = s.parse().map_err(|_| bad())?;
        if !valid(code) {
            return Err(bad());
        }
        Ok(Self::code(code))
    }
}

impl utoipa::PartialSchema for StatusPattern {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Type};
        OneOfBuilder::new()
            .item(ObjectBuilder::new().schema_type(Type::Integer))
            .item(ObjectBuilder::new().schema_type(Type::String))
            .description(Some(
                "An HTTP status code (404 or \"404\"), an inclusive range (\"500-599\") or a class (\"5xx\")",
            ))
            .into()
    }
}

impl utoipa::ToSchema for StatusPattern {}

impl Serialize for StatusPattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.low == self.high {
            s.serialize_u16(self.low)
        } else {
            s.serialize_str(&format!("{}-{}", self.low, self.high))
        }
    }
}

impl<'de> Deserialize<'de> for StatusPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Code(u16),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Code(c) if (100..=599).contains(&c) => Ok(Self::code(c)),
            Raw::Code(c) => Err(serde::de::Error::custom(format!(
                "{c} is not an HTTP status code"
            ))),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// The daemon-wide defaults (from the environment) that fill what an enrollment leaves out.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryDefaults {
    pub max_in_flight: u32,
    pub timeout: Duration,
    pub retry: RetryPolicy,
    pub breaker_threshold: u32,
    pub breaker_open: Duration,
}

/// Bounds that keep one enrollment from taking the daemon's memory or sockets.
pub const MAX_IN_FLIGHT: u32 = 1_000;
pub const MAX_ATTEMPTS: u32 = 100;

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
    pub reject_on: Vec<StatusPattern>,
    pub drop_on: Vec<StatusPattern>,
    pub circuit_breaker: BreakerPolicy,
    pub rate_limit_per_sec: Option<f64>,
    pub headers: BTreeMap<String, String>,
    pub auth: Option<Auth>,
    pub signing: Option<Signing>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct BreakerPolicy {
    pub failure_threshold: u32,
    pub open_ms: u64,
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
    /// Parses and validates the `delivery` object. Type errors are `Malformed` (400), values
    /// out of range `Invalid` (422); each message names the field by its path.
    pub fn from_json(value: serde_json::Value) -> Result<Self, EnrollmentError> {
        let settings: Self = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            let message = format!("`delivery.{path}`: {inner}");
            if inner.starts_with("invalid type") {
                EnrollmentError::Malformed(message)
            } else {
                EnrollmentError::Invalid(message)
            }
        })?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), EnrollmentError> {
        let invalid = |field: &str, why: &str| {
            Err(EnrollmentError::Invalid(format!(
                "`delivery.{field}` {why}"
            )))
        };
        if let Some(n) = self.max_in_flight
            && !(1..=MAX_IN_FLIGHT).contains(&n)
        {
            return invalid(
                "max_in_flight",
                &format!("must be from 1 to {MAX_IN_FLIGHT}"),
            );
        }
        if self.timeout_ms == Some(0) {
            return invalid("timeout_ms", "must be greater than 0");
        }
        if let Some(r) = &self.retry {
            if let Some(n) = r.max_attempts
                && !(1..=MAX_ATTEMPTS).contains(&n)
            {
                return invalid(
                    "retry.max_attempts",
                    &format!("must be from 1 to {MAX_ATTEMPTS}"),
                );
            }
            if r.base_ms == Some(0) {
                return invalid("retry.base_ms", "must be greater than 0");
            }
            if let (Some(base), Some(max)) = (r.base_ms, r.max_ms)
                && max < base
            {
                return invalid("retry.max_ms", "must not be smaller than retry.base_ms");
            }
        }
        if let Some(b) = &self.circuit_breaker
            && b.open_ms == Some(0)
        {
            return invalid("circuit_breaker.open_ms", "must be greater than 0");
        }
        if let Some(rate) = self.rate_limit_per_sec
            && !(rate.is_finite() && rate > 0.0 && rate <= 1_000_000.0)
        {
            return invalid(
                "rate_limit_per_sec",
                "must be a number above 0 and at most 1000000",
            );
        }
        if let Some(headers) = &self.headers {
            for (name, value) in headers {
                let parsed = reqwest::header::HeaderName::from_bytes(name.as_bytes());
                if parsed.is_err() || reqwest::header::HeaderValue::from_str(value).is_err() {
                    return invalid(&format!("headers.{name}"), "is not a valid HTTP header");
                }
            }
        }
        match &self.auth {
            Some(Auth::Bearer { token }) if token.is_empty() => {
                return invalid("auth.token", "must not be empty");
            }
            Some(Auth::Basic { username, .. }) if username.is_empty() || username.contains(':') => {
                return invalid("auth.username", "must be non-empty and contain no `:`");
            }
            Some(Auth::Header { name, value })
                if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err()
                    || reqwest::header::HeaderValue::from_str(value).is_err() =>
            {
                return invalid("auth", "name and value must form a valid HTTP header");
            }
            _ => {}
        }
        if let Some(s) = &self.signing {
            if s.secret.is_empty() {
                return invalid("signing.secret", "must not be empty");
            }
            if crate::signing::signing_key(&s.secret).is_none() {
                return invalid(
                    "signing.secret",
                    "has a whsec_ prefix but is not valid base64",
                );
            }
        }
        Ok(())
    }

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

/// What one POST's result means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// 2xx: accept.
    Success,
    /// Retry class: try again locally while attempts remain.
    Retry,
    /// `reject_on`: AMQP `rejected`, the broker dead-letters at once.
    Reject,
    /// `drop_on`: accept and count as dropped.
    Drop,
    /// Any other answer: the failure outcome at once.
    Fail,
}

/// The status-class decision. `status` is `None` for a network error or a timeout.
/// Precedence: 2xx, then `reject_on`, `drop_on`, `retry_on`, and everything else fails.
pub fn verdict(status: Option<u16>, policy: &DeliveryPolicy) -> Verdict {
    let Some(code) = status else {
        return Verdict::Retry;
    };
    let any = |list: &[StatusPattern]| list.iter().any(|p| p.matches(code));
    if (200..300).contains(&code) {
        Verdict::Success
    } else if any(&policy.reject_on) {
        Verdict::Reject
    } else if any(&policy.drop_on) {
        Verdict::Drop
    } else if any(&policy.retry_on) {
        Verdict::Retry
    } else {
        Verdict::Fail
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
        }
    }

    #[test]
    fn verdict_table() {
        let mut policy = DeliverySettings::default().resolve(&defaults());
        policy.reject_on = vec![StatusPattern::code(422)];
        policy.drop_on = vec![StatusPattern::code(404), StatusPattern::code(503)];
        let cases = [
            (None, Verdict::Retry),
            (Some(200), Verdict::Success),
            (Some(204), Verdict::Success),
            (Some(408), Verdict::Retry),
            (Some(425), Verdict::Retry),
            (Some(429), Verdict::Retry),
            (Some(500), Verdict::Retry),
            (Some(599), Verdict::Retry),
            (Some(503), Verdict::Drop),
            (Some(422), Verdict::Reject),
            (Some(404), Verdict::Drop),
            (Some(400), Verdict::Fail),
            (Some(301), Verdict::Fail),
            (Some(100), Verdict::Fail),
        ];
        for (status, want) in cases {
            assert_eq!(verdict(status, &policy), want, "{status:?}");
        }
    }

    #[test]
    fn status_patterns_parse() {
        assert_eq!("5xx".parse(), Ok(StatusPattern::range(500, 599)));
        assert_eq!("500-504".parse(), Ok(StatusPattern::range(500, 504)));
        assert_eq!("404".parse(), Ok(StatusPattern::code(404)));
        for bad in ["6xx", "99", "600", "504-500", "abc", ""] {
            assert!(bad.parse::<StatusPattern>().is_err(), "{bad}");
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

    #[test]
    fn settings_validate_and_name_the_field() {
        let ok = DeliverySettings::from_json(json!({
            "max_in_flight": 16, "timeout_ms": 500,
            "retry": {"max_attempts": 3, "backoff": "fixed", "base_ms": 10, "max_ms": 100, "jitter": false},
            "reject_on": [422], "drop_on": ["404", "410-411"], "retry_on": ["5xx"],
            "circuit_breaker": {"failure_threshold": 0},
            "rate_limit_per_sec": 2.5, "headers": {"x-team": "a"},
            "auth": {"type": "basic", "username": "u", "password": "p"},
            "signing": {"secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}
        }))
        .expect("valid");
        let p = ok.resolve(&defaults());
        assert_eq!(p.max_in_flight, 16);
        assert_eq!(p.retry.max_attempts, 3);
        assert_eq!(p.circuit_breaker.failure_threshold, 0);
        let shown = serde_json::to_string(&p.redacted()).expect("json");
        assert!(
            !shown.contains("\"p\"") && !shown.contains("MfKQ"),
            "{shown}"
        );

        for (body, field, malformed) in [
            (json!({"max_in_flight": 0}), "max_in_flight", false),
            (json!({"max_in_flight": "2"}), "max_in_flight", true),
            (
                json!({"retry": {"max_attempts": 0}}),
                "retry.max_attempts",
                false,
            ),
            (
                json!({"retry": {"backoff": "random"}}),
                "retry.backoff",
                false,
            ),
            (
                json!({"retry": {"base_ms": 100, "max_ms": 10}}),
                "retry.max_ms",
                false,
            ),
            (json!({"reject_on": [700]}), "reject_on", false),
            (json!({"drop_on": ["7xx"]}), "drop_on", false),
            (
                json!({"rate_limit_per_sec": -1}),
                "rate_limit_per_sec",
                false,
            ),
            (json!({"auth": {"type": "bearer"}}), "auth", false),
            (
                json!({"auth": {"type": "magic", "token": "x"}}),
                "auth",
                false,
            ),
            (json!({"signing": {"secret": ""}}), "signing.secret", false),
            (json!({"colour": 1}), "colour", false),
            (json!({"headers": {"bad name": "x"}}), "headers", false),
        ] {
            let err = DeliverySettings::from_json(body.clone()).expect_err("refused");
            assert!(err.to_string().contains(field), "{body}: {err}");
            assert_eq!(
                matches!(err, EnrollmentError::Malformed(_)),
                malformed,
                "{body}: {err:?}"
            );
        }
    }
}
