//! The publish and request settings: `PUBLISH_MAX_BYTES`, `PUBLISH_ADDRESSES`,
//! `REPLY_ADDRESS`.

use crate::config::raw::RawConfig;
use crate::config::{ConfigError, invalid};
use crate::enrollment::address_glob::AddressPatterns;

/// Largest `PUBLISH_MAX_BYTES`: a body is held whole while it is published.
pub const MAX_PUBLISH_BYTES: u64 = 64 * 1024 * 1024;

/// What `POST /publish` and `POST /request` may send, and where replies come back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelaySettings {
    /// The largest body a publish or request may carry.
    pub publish_max_bytes: usize,
    /// Where they may send; empty: anywhere.
    pub publish_addresses: AddressPatterns,
    /// Where replies to `POST /request` come back when the broker makes no dynamic node
    /// (RabbitMQ 3.x): e.g. `/queue/hot-potato-replies`. One per daemon.
    pub reply_address: Option<String>,
}

impl RelaySettings {
    pub(super) fn from_raw(raw: &RawConfig) -> Result<Self, ConfigError> {
        if !(1..=MAX_PUBLISH_BYTES).contains(&raw.publish_max_bytes) {
            return Err(invalid(
                "PUBLISH_MAX_BYTES",
                format!("must be from 1 to {MAX_PUBLISH_BYTES} (64 MiB)"),
            ));
        }
        let publish_addresses =
            AddressPatterns::parse(raw.publish_addresses.as_deref().unwrap_or(""))
                .map_err(|e| invalid("PUBLISH_ADDRESSES", e))?;
        let reply_address = raw
            .reply_address
            .as_deref()
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(str::to_string);
        Ok(Self {
            publish_max_bytes: usize::try_from(raw.publish_max_bytes)
                .map_err(|_| invalid("PUBLISH_MAX_BYTES", "too large"))?,
            publish_addresses,
            reply_address,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn cfg(vars: &[(&str, &str)]) -> Result<Config, crate::config::ConfigError> {
        Config::from_vars(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn relay_settings_default_and_bounds() {
        let c = cfg(&[]).expect("defaults");
        assert_eq!(c.relay.publish_max_bytes, 1024 * 1024);
        assert!(c.relay.publish_addresses.allows("/amq/queue/anything"));
        assert_eq!(c.relay.reply_address, None);
        let c = cfg(&[
            ("PUBLISH_ADDRESSES", "/amq/queue/a-*"),
            ("REPLY_ADDRESS", " /queue/replies "),
        ])
        .expect("valid");
        assert!(!c.relay.publish_addresses.allows("/amq/queue/b"));
        assert_eq!(c.relay.reply_address.as_deref(), Some("/queue/replies"));
        for value in ["0", "67108865", "-1"] {
            let err = cfg(&[("PUBLISH_MAX_BYTES", value)])
                .expect_err(value)
                .to_string();
            assert!(err.contains("PUBLISH_MAX_BYTES"), "{err}");
        }
    }
}
