//! `delivery.batch`: several messages in one POST. The setting as given, its bounds and its
//! validation, and the effective batch policy.

use serde::{Deserialize, Serialize};

use crate::enrollment::error::EnrollmentError;

/// Messages per batch at most: the target's `statuses` answer for 1,000 fits in the default
/// `RESPONSE_MAX_BYTES` (64 KiB) with short ids.
pub const MAX_BATCH_MESSAGES: u32 = 1_000;
/// Bytes of message bodies per batch at most.
pub const MAX_BATCH_BYTES: u64 = 16 * 1024 * 1024;
/// The longest a batch may wait for more messages.
pub const MAX_BATCH_WAIT_MS: u64 = 60_000;

pub const DEFAULT_BATCH_MESSAGES: u32 = 100;
pub const DEFAULT_BATCH_BYTES: u64 = 1024 * 1024;
pub const DEFAULT_BATCH_WAIT_MS: u64 = 20;

/// `delivery.batch` as the user sent it; absent fields take the defaults above.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchInput {
    /// Messages per POST at most (default 100, at most 1,000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_messages: Option<u32>,
    /// Message body bytes per POST at most (default 1 MiB, at most 16 MiB); a single larger
    /// message goes alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
    /// How long the first message of a batch waits for more (default 20 ms, at most 60 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_wait_ms: Option<u64>,
}

/// The effective batch settings of an enrollment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct BatchPolicy {
    pub max_messages: u32,
    pub max_bytes: u64,
    pub max_wait_ms: u64,
}

impl BatchInput {
    pub fn validate(&self) -> Result<(), EnrollmentError> {
        let invalid = |field: &str, why: String| {
            Err(EnrollmentError::Invalid(format!(
                "`delivery.batch.{field}` {why}"
            )))
        };
        if let Some(n) = self.max_messages
            && !(1..=MAX_BATCH_MESSAGES).contains(&n)
        {
            return invalid(
                "max_messages",
                format!("must be from 1 to {MAX_BATCH_MESSAGES}"),
            );
        }
        if let Some(n) = self.max_bytes
            && !(1..=MAX_BATCH_BYTES).contains(&n)
        {
            return invalid(
                "max_bytes",
                format!("must be from 1 to {MAX_BATCH_BYTES} (16 MiB)"),
            );
        }
        if let Some(ms) = self.max_wait_ms
            && ms > MAX_BATCH_WAIT_MS
        {
            return invalid(
                "max_wait_ms",
                format!("must be from 0 to {MAX_BATCH_WAIT_MS} (60 s)"),
            );
        }
        Ok(())
    }

    pub fn resolve(&self) -> BatchPolicy {
        BatchPolicy {
            max_messages: self.max_messages.unwrap_or(DEFAULT_BATCH_MESSAGES),
            max_bytes: self.max_bytes.unwrap_or(DEFAULT_BATCH_BYTES),
            max_wait_ms: self.max_wait_ms.unwrap_or(DEFAULT_BATCH_WAIT_MS),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn bounds_are_checked_and_defaults_fill_in() {
        let parse = |v| serde_json::from_value::<BatchInput>(v);
        let ok = parse(json!({"max_messages": 10})).expect("parses");
        assert!(ok.validate().is_ok());
        assert_eq!(
            ok.resolve(),
            BatchPolicy {
                max_messages: 10,
                max_bytes: DEFAULT_BATCH_BYTES,
                max_wait_ms: DEFAULT_BATCH_WAIT_MS
            }
        );
        for (bad, field) in [
            (json!({"max_messages": 0}), "max_messages"),
            (json!({"max_messages": 1001}), "max_messages"),
            (json!({"max_bytes": 0}), "max_bytes"),
            (json!({"max_wait_ms": 60_001}), "max_wait_ms"),
        ] {
            let input = parse(bad.clone()).expect("parses");
            let err = input.validate().expect_err("refused").to_string();
            assert!(err.contains(field), "{bad}: {err}");
        }
        assert!(parse(json!({"max_message": 3})).is_err(), "unknown field");
    }
}
