//! The target settings: `TARGET_ALLOWLIST`, `TARGET_DENY_PRIVATE` and `RESPONSE_MAX_BYTES`.

use crate::config::{ConfigError, invalid};
use crate::enrollment::target::{TargetAllowlist, TargetPolicy};

/// Largest `RESPONSE_MAX_BYTES`: an answer is held whole while it is read, per POST in flight.
pub const MAX_RESPONSE_BYTES: u64 = 16 * 1024 * 1024;

pub(super) fn target_policy(
    allowlist: Option<&str>,
    deny_private: bool,
) -> Result<TargetPolicy, ConfigError> {
    let allowlist = TargetAllowlist::parse(allowlist.unwrap_or(""))
        .map_err(|e| invalid("TARGET_ALLOWLIST", e))?;
    Ok(TargetPolicy {
        allowlist,
        deny_private,
    })
}

pub(super) fn response_max_bytes(bytes: u64) -> Result<usize, ConfigError> {
    if bytes > MAX_RESPONSE_BYTES {
        return Err(invalid(
            "RESPONSE_MAX_BYTES",
            format!("must be from 0 to {MAX_RESPONSE_BYTES} (16 MiB)"),
        ));
    }
    usize::try_from(bytes).map_err(|_| invalid("RESPONSE_MAX_BYTES", "too large"))
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn cfg(vars: &[(&str, &str)]) -> Result<Config, crate::config::ConfigError> {
        Config::from_vars(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn target_settings_default_and_bounds() {
        let c = cfg(&[]).expect("defaults");
        assert_eq!(c.delivery_defaults.response_max_bytes, 64 * 1024);
        assert!(!c.target_policy.deny_private);
        let c =
            cfg(&[("TARGET_DENY_PRIVATE", "true"), ("RESPONSE_MAX_BYTES", "0")]).expect("valid");
        assert!(c.target_policy.deny_private);
        assert_eq!(c.delivery_defaults.response_max_bytes, 0);
        for (var, value) in [
            ("RESPONSE_MAX_BYTES", "16777217"),
            ("RESPONSE_MAX_BYTES", "-1"),
            ("TARGET_DENY_PRIVATE", "maybe"),
        ] {
            let err = cfg(&[(var, value)]).expect_err(value).to_string();
            assert!(err.contains(var), "{err}");
        }
    }
}
