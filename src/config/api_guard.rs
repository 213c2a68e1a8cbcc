//! The API's defences against hostile or slow clients: the header-read and request timeouts,
//! the connection cap, how often `/ready` may probe the store, and the proxies whose
//! `X-Forwarded-For` is believed.

use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;

use super::raw::RawConfig;
use super::{ConfigError, invalid};

/// Largest `API_MAX_CONNECTIONS`: each connection holds a socket and a task; past this the
/// process's file descriptors, not the cap, would decide.
pub const MAX_API_CONNECTIONS: usize = 65_536;

/// Validated API guard settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiGuardSettings {
    /// A connection that has not sent a complete request head within this is closed; hyper
    /// also applies it to the idle wait between keep-alive requests.
    pub header_timeout: Duration,
    /// A request whose handling (body read included) takes longer is answered 408.
    pub request_timeout: Duration,
    /// Connections served at once; further accepts wait for a slot.
    pub max_connections: usize,
    /// `/ready` probes the store at most this often and answers from the last probe between.
    pub ready_probe_interval: Duration,
    /// Peers whose `X-Forwarded-For` names the client for the change limit.
    pub trusted_proxies: Vec<IpNet>,
}

impl ApiGuardSettings {
    pub(super) fn from_raw(raw: &RawConfig) -> Result<Self, ConfigError> {
        if raw.api_header_timeout_ms == 0 {
            return Err(invalid("API_HEADER_TIMEOUT_MS", "must be greater than 0"));
        }
        if raw.api_request_timeout_ms == 0 {
            return Err(invalid("API_REQUEST_TIMEOUT_MS", "must be greater than 0"));
        }
        if !(1..=MAX_API_CONNECTIONS).contains(&raw.api_max_connections) {
            return Err(invalid(
                "API_MAX_CONNECTIONS",
                format!("must be from 1 to {MAX_API_CONNECTIONS}"),
            ));
        }
        Ok(Self {
            header_timeout: Duration::from_millis(raw.api_header_timeout_ms),
            request_timeout: Duration::from_millis(raw.api_request_timeout_ms),
            max_connections: raw.api_max_connections,
            ready_probe_interval: Duration::from_millis(raw.ready_probe_interval_ms),
            trusted_proxies: parse_proxies(raw.trusted_proxies.as_deref().unwrap_or(""))?,
        })
    }
}

/// `10.0.0.0/8, 192.0.2.7` → networks; a bare address is a /32 (or /128).
fn parse_proxies(list: &str) -> Result<Vec<IpNet>, ConfigError> {
    let mut nets = Vec::new();
    for entry in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let net = entry
            .parse::<IpNet>()
            .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
            .map_err(|_| {
                invalid(
                    "TRUSTED_PROXIES",
                    format!("`{entry}` is not an address or CIDR such as 10.0.0.0/8"),
                )
            })?;
        nets.push(net);
    }
    Ok(nets)
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn cfg(vars: &[(&str, &str)]) -> Result<Config, crate::config::ConfigError> {
        Config::from_vars(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn defaults() {
        let g = cfg(&[]).expect("defaults are valid").api_guard;
        assert_eq!(g.header_timeout.as_millis(), 10_000);
        assert_eq!(g.request_timeout.as_millis(), 30_000);
        assert_eq!(g.max_connections, 512);
        assert_eq!(g.ready_probe_interval.as_millis(), 5_000);
        assert!(g.trusted_proxies.is_empty());
    }

    #[test]
    fn trusted_proxies_take_addresses_and_cidrs() {
        let g = cfg(&[("TRUSTED_PROXIES", " 10.0.0.0/8, 192.0.2.7 ,::1")])
            .expect("valid")
            .api_guard;
        let shown: Vec<String> = g.trusted_proxies.iter().map(|n| n.to_string()).collect();
        assert_eq!(shown, ["10.0.0.0/8", "192.0.2.7/32", "::1/128"]);
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (var, value) in [
            ("API_HEADER_TIMEOUT_MS", "0"),
            ("API_HEADER_TIMEOUT_MS", "soon"),
            ("API_REQUEST_TIMEOUT_MS", "0"),
            ("API_MAX_CONNECTIONS", "0"),
            ("API_MAX_CONNECTIONS", "100000"),
            ("READY_PROBE_INTERVAL_MS", "-1"),
            ("TRUSTED_PROXIES", "10.0.0.0/8, proxy.example"),
            ("TRUSTED_PROXIES", "10.0.0.0/33"),
        ] {
            let err = cfg(&[(var, value)]).expect_err(value).to_string();
            assert!(err.contains(var), "{var}={value}: {err}");
        }
    }
}
