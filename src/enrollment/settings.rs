//! The `delivery` object of `POST /enroll` as the user sent it and as it is stored, its
//! validation (each refusal names its field), the credentials and signing secret it may carry,
//! and the bounds that keep one enrollment from taking the daemon's memory or sockets.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};

use crate::enrollment::batch::BatchInput;
use crate::enrollment::error::EnrollmentError;
use crate::enrollment::status_pattern::StatusPattern;

/// Bounds that keep one enrollment from taking the daemon's memory or sockets.
pub const MAX_IN_FLIGHT: u32 = 1_000;
pub const MAX_ATTEMPTS: u32 = 100;
/// Longest `max_hold_ms`: a week.
pub const MAX_HOLD_MS: u64 = 7 * 24 * 3_600_000;
/// The largest link credit an enrollment may ask for (`subscription_args.prefetch`,
/// `DEFAULT_PREFETCH`): credit is memory held in the daemon.
pub const MAX_PREFETCH: u32 = 10_000;
/// The longest any duration setting may be (`timeout_ms`, `retry.base_ms`, `retry.max_ms`,
/// `circuit_breaker.open_ms`): 24 h. Longer waits mean a message held for days, and far
/// larger ones overflow a deadline computed as now plus the duration.
pub const MAX_DURATION_MS: u64 = 24 * 60 * 60 * 1000;
/// `rate_limit_per_sec` bounds. The limiter spaces POSTs `1 / rate` seconds apart: below the
/// minimum that period (over 16 min) only looks like a stalled enrollment, and near 0 it
/// overflows (the rate limiter panics on a period over 584 years); above the maximum it is
/// under a microsecond.
pub const MIN_RATE_PER_SEC: f64 = 0.001;
pub const MAX_RATE_PER_SEC: f64 = 1_000_000.0;
/// The highest `circuit_breaker.failure_threshold`. The breaker's count saturates, so no
/// value overflows; a threshold this high never trips in practice, and 0 is how the breaker
/// is turned off.
pub const MAX_FAILURE_THRESHOLD: u32 = 1_000_000;

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
    /// Answers that mean the target is unavailable: the message is held (its delivery count
    /// untouched) instead of using an attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unavailable_on: Option<Vec<StatusPattern>>,
    /// How long a message may be held while the target is unavailable before it is handed
    /// back with the failure outcome; absent: no limit; 0: never held, handed back at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_hold_ms: Option<u64>,
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
    /// Publish the target's final answer to a message's `reply-to` (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<bool>,
    /// Response headers copied into the reply as application properties.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_headers: Option<Vec<String>>,
    /// Several messages per POST (see [`crate::enrollment::batch`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<BatchInput>,
}

/// At most this many `delivery.reply_headers`.
pub const MAX_REPLY_HEADERS: usize = 32;

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
        if let Some(ms) = self.max_hold_ms
            && ms > MAX_HOLD_MS
        {
            return invalid(
                "max_hold_ms",
                &format!("must be from 0 (never hold) to {MAX_HOLD_MS} (7 days)"),
            );
        }
        let duration = |field: &str, value: Option<u64>| match value {
            Some(ms) if !(1..=MAX_DURATION_MS).contains(&ms) => invalid(
                field,
                &format!("must be from 1 to {MAX_DURATION_MS} (24 h), in milliseconds"),
            ),
            _ => Ok(()),
        };
        duration("timeout_ms", self.timeout_ms)?;
        if let Some(r) = &self.retry {
            if let Some(n) = r.max_attempts
                && !(1..=MAX_ATTEMPTS).contains(&n)
            {
                return invalid(
                    "retry.max_attempts",
                    &format!("must be from 1 to {MAX_ATTEMPTS}"),
                );
            }
            duration("retry.base_ms", r.base_ms)?;
            if let Some(max) = r.max_ms
                && max > MAX_DURATION_MS
            {
                return invalid(
                    "retry.max_ms",
                    &format!("must be at most {MAX_DURATION_MS} (24 h), in milliseconds"),
                );
            }
            if let (Some(base), Some(max)) = (r.base_ms, r.max_ms)
                && max < base
            {
                return invalid("retry.max_ms", "must not be smaller than retry.base_ms");
            }
        }
        if let Some(b) = &self.circuit_breaker {
            duration("circuit_breaker.open_ms", b.open_ms)?;
            if let Some(n) = b.failure_threshold
                && n > MAX_FAILURE_THRESHOLD
            {
                return invalid(
                    "circuit_breaker.failure_threshold",
                    &format!("must be from 0 (off) to {MAX_FAILURE_THRESHOLD}"),
                );
            }
        }
        if let Some(rate) = self.rate_limit_per_sec
            && !(MIN_RATE_PER_SEC..=MAX_RATE_PER_SEC).contains(&rate)
        {
            return invalid(
                "rate_limit_per_sec",
                &format!("must be a number from {MIN_RATE_PER_SEC} to {MAX_RATE_PER_SEC}"),
            );
        }
        let signed = self.signing.is_some();
        if let Some(headers) = &self.headers {
            for (name, value) in headers {
                let parsed = reqwest::header::HeaderName::from_bytes(name.as_bytes());
                if parsed.is_err() || reqwest::header::HeaderValue::from_str(value).is_err() {
                    return invalid(&format!("headers.{name}"), "is not a valid HTTP header");
                }
                if let Some(why) = reserved_header(name, signed) {
                    return invalid(&format!("headers.{name}"), why);
                }
            }
        }
        if let Some(Auth::Header { name, .. }) = &self.auth
            && let Some(why) = reserved_header(name, signed)
        {
            return invalid("auth.name", why);
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
        if let Some(batch) = &self.batch {
            batch.validate()?;
            if self.reply == Some(true) {
                // A reply answers one message; a batch's one answer has no message to go to.
                return invalid("batch", "cannot be combined with `delivery.reply`");
            }
        }
        if let Some(names) = &self.reply_headers {
            if names.len() > MAX_REPLY_HEADERS {
                return invalid(
                    "reply_headers",
                    &format!("must list at most {MAX_REPLY_HEADERS} headers"),
                );
            }
            if let Some(bad) = names
                .iter()
                .find(|n| reqwest::header::HeaderName::from_bytes(n.as_bytes()).is_err())
            {
                return invalid(
                    "reply_headers",
                    &format!("`{bad}` is not an HTTP header name"),
                );
            }
        }
        if let Some(s) = &self.signing {
            if s.secret.is_empty() {
                return invalid("signing.secret", "must not be empty");
            }
            if s.key().is_none() {
                return invalid(
                    "signing.secret",
                    "has a whsec_ prefix but is not valid base64",
                );
            }
        }
        Ok(())
    }
}

/// Why a static header name may not be set, if it may not: the names that frame the request
/// (a `Content-Length` would cut every body short, a `Host` reach another virtual host) and,
/// when signing is on, the `webhook-*` names the signature owns.
fn reserved_header(name: &str, signed: bool) -> Option<&'static str> {
    const FRAMING: [&str; 8] = [
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
    ];
    let name = name.to_ascii_lowercase();
    if FRAMING.contains(&name.as_str()) || name.starts_with("proxy-") {
        Some("frames the HTTP request and is set by hot-potato only")
    } else if signed && name.starts_with("webhook-") {
        Some("is set by the signature (signing is on)")
    } else {
        None
    }
}

impl Signing {
    /// The key bytes: base64 after a `whsec_` prefix, else the secret's own bytes. `None`
    /// for a `whsec_` secret that is not valid base64.
    pub fn key(&self) -> Option<Vec<u8>> {
        match self.secret.strip_prefix("whsec_") {
            Some(encoded) => BASE64.decode(encoded).ok(),
            None => Some(self.secret.as_bytes().to_vec()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enrollment::policy::tests::defaults;
    use serde_json::json;

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
        DeliverySettings::from_json(json!({
            "timeout_ms": MAX_DURATION_MS,
            "retry": {"base_ms": MAX_DURATION_MS, "max_ms": MAX_DURATION_MS},
            "circuit_breaker": {"open_ms": MAX_DURATION_MS, "failure_threshold": MAX_FAILURE_THRESHOLD},
            "rate_limit_per_sec": MIN_RATE_PER_SEC,
        }))
        .expect("the bounds themselves are valid");
        DeliverySettings::from_json(json!({"rate_limit_per_sec": MAX_RATE_PER_SEC}))
            .expect("the highest rate is valid");
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
            // Bounds that keep a later Duration, deadline or rate limiter from overflowing.
            (
                json!({"rate_limit_per_sec": 1e-12}),
                "rate_limit_per_sec",
                false,
            ),
            (
                json!({"rate_limit_per_sec": 0.0009}),
                "rate_limit_per_sec",
                false,
            ),
            (
                json!({"rate_limit_per_sec": 0}),
                "rate_limit_per_sec",
                false,
            ),
            (
                json!({"rate_limit_per_sec": 1e300}),
                "rate_limit_per_sec",
                false,
            ),
            (
                json!({"rate_limit_per_sec": 1_000_001}),
                "rate_limit_per_sec",
                false,
            ),
            (json!({"timeout_ms": 0}), "timeout_ms", false),
            (json!({"timeout_ms": u64::MAX}), "timeout_ms", false),
            (
                json!({"timeout_ms": MAX_DURATION_MS + 1}),
                "timeout_ms",
                false,
            ),
            (json!({"timeout_ms": 1e30}), "timeout_ms", true),
            (json!({"retry": {"base_ms": 0}}), "retry.base_ms", false),
            (
                json!({"retry": {"base_ms": MAX_DURATION_MS + 1}}),
                "retry.base_ms",
                false,
            ),
            (
                json!({"retry": {"max_ms": u64::MAX}}),
                "retry.max_ms",
                false,
            ),
            (
                json!({"circuit_breaker": {"open_ms": 0}}),
                "circuit_breaker.open_ms",
                false,
            ),
            (
                json!({"circuit_breaker": {"open_ms": u64::MAX}}),
                "circuit_breaker.open_ms",
                false,
            ),
            (
                json!({"circuit_breaker": {"failure_threshold": u32::MAX}}),
                "circuit_breaker.failure_threshold",
                false,
            ),
            (
                json!({"retry": {"max_attempts": 101}}),
                "retry.max_attempts",
                false,
            ),
            (json!({"max_in_flight": 1001}), "max_in_flight", false),
            (json!({"reply": "yes"}), "reply", true),
            (
                json!({"reply_headers": ["bad name"]}),
                "reply_headers",
                false,
            ),
            (
                json!({"reply_headers": vec!["x"; MAX_REPLY_HEADERS + 1]}),
                "reply_headers",
                false,
            ),
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

    #[test]
    fn headers_that_frame_the_request_are_refused() {
        for name in [
            "Host",
            "content-length",
            "Transfer-Encoding",
            "connection",
            "Keep-Alive",
            "TE",
            "trailer",
            "upgrade",
            "Proxy-Authorization",
            "proxy-connection",
        ] {
            let body = json!({"headers": {name: "5"}});
            let err = DeliverySettings::from_json(body).expect_err(name);
            assert!(
                err.to_string().contains(&format!("headers.{name}")),
                "{err}"
            );
            let body = json!({"auth": {"type": "header", "name": name, "value": "5"}});
            assert!(DeliverySettings::from_json(body).is_err(), "auth {name}");
        }
        let signed = json!({"signing": {"secret": "s3cret"}, "headers": {"webhook-id": "x"}});
        assert!(DeliverySettings::from_json(signed).is_err());
        let unsigned = json!({"headers": {"webhook-id": "x", "x-team": "a"}});
        assert!(DeliverySettings::from_json(unsigned).is_ok());
    }
}
