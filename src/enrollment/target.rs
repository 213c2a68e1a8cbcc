//! Which targets an enrollment may point at: the optional `TARGET_ALLOWLIST` (host names,
//! `*.` wildcards, IP addresses and CIDR ranges), and the link-local / cloud metadata ranges
//! that are refused unless listed, since a push daemon that can be aimed at
//! `169.254.169.254` hands out cloud credentials.

use std::net::IpAddr;

use ipnet::IpNet;
use url::{Host, Url};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Rule {
    /// `orders.example.com`: that host only.
    Host(String),
    /// `*.example.com`: any host below `example.com` (not `example.com` itself).
    Suffix(String),
    /// `10.0.0.0/8` or a single address.
    Net(IpNet),
}

/// The parsed `TARGET_ALLOWLIST`; empty means "any target except the guarded ranges".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetAllowlist {
    rules: Vec<Rule>,
}

fn guarded_ranges() -> [IpNet; 2] {
    [
        IpNet::new(IpAddr::from([169, 254, 0, 0]), 16).unwrap_or_default(),
        IpNet::new(IpAddr::from([0xfe80, 0, 0, 0, 0, 0, 0, 0]), 10).unwrap_or_default(),
    ]
}

impl TargetAllowlist {
    /// Parses a comma-separated list. Errors name the entry that is not understood.
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut rules = Vec::new();
        for raw in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let entry = raw.to_ascii_lowercase();
            let rule = if let Ok(net) = entry.parse::<IpNet>() {
                Rule::Net(net)
            } else if let Ok(ip) = entry.parse::<IpAddr>() {
                Rule::Net(IpNet::from(ip))
            } else if let Some(suffix) = entry.strip_prefix("*.") {
                if !valid_host_name(suffix) {
                    return Err(format!("`{raw}` is not a host name pattern"));
                }
                Rule::Suffix(format!(".{suffix}"))
            } else if valid_host_name(&entry) {
                Rule::Host(entry)
            } else {
                return Err(format!(
                    "`{raw}` is not a host name, *.wildcard, IP address or CIDR range"
                ));
            };
            rules.push(rule);
        }
        Ok(Self { rules })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// `Ok` when `target` may receive POSTs; otherwise the reason, for a 422 or a log line.
    pub fn check(&self, target: &Url) -> Result<(), String> {
        let host = target
            .host()
            .ok_or_else(|| "`target_url` has no host".to_string())?;
        let ip = match &host {
            Host::Ipv4(v4) => Some(IpAddr::V4(*v4)),
            // `::ffff:169.254.169.254` reaches the same IPv4 host: judge it as IPv4.
            Host::Ipv6(v6) => Some(v6.to_ipv4_mapped().map_or(IpAddr::V6(*v6), IpAddr::V4)),
            Host::Domain(_) => None,
        };
        let listed = self.rules.iter().any(|rule| match (rule, &host, ip) {
            (Rule::Net(net), _, Some(ip)) => net.contains(&ip),
            (Rule::Host(name), Host::Domain(d), _) => d.eq_ignore_ascii_case(name),
            (Rule::Suffix(suffix), Host::Domain(d), _) => {
                d.to_ascii_lowercase().ends_with(suffix.as_str())
            }
            _ => false,
        });
        if let Some(ip) = ip
            && !listed
            && guarded_ranges().iter().any(|net| net.contains(&ip))
        {
            return Err(format!(
                "`target_url` points at the link-local/metadata address {ip}, refused unless TARGET_ALLOWLIST lists it"
            ));
        }
        if !self.is_empty() && !listed {
            return Err(format!(
                "`target_url` host {host} is not in TARGET_ALLOWLIST"
            ));
        }
        Ok(())
    }
}

fn valid_host_name(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|label| {
            !label.is_empty()
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        Url::parse(s).expect("url")
    }

    #[test]
    fn without_a_list_everything_but_the_guarded_ranges_passes() {
        let open = TargetAllowlist::default();
        assert!(open.check(&url("http://example.com/x")).is_ok());
        assert!(open.check(&url("http://10.1.2.3/x")).is_ok());
        assert!(open.check(&url("http://169.254.169.254/latest")).is_err());
        assert!(open.check(&url("http://[fe80::1]/x")).is_err());
        assert!(
            open.check(&url("http://[::ffff:169.254.169.254]/x"))
                .is_err()
        );
    }

    #[test]
    fn a_list_admits_only_its_entries() {
        let list =
            TargetAllowlist::parse("hooks.example.com, *.internal.test,10.0.0.0/8,127.0.0.1")
                .expect("valid");
        for ok in [
            "http://hooks.example.com/a",
            "https://a.internal.test/",
            "http://b.c.internal.test/",
            "http://10.9.8.7:99/",
            "http://127.0.0.1:8080/",
        ] {
            assert!(list.check(&url(ok)).is_ok(), "{ok}");
        }
        for refused in [
            "http://example.com/",
            "http://internal.test/",
            "http://11.0.0.1/",
            "http://127.0.0.2/",
            "http://evil-hooks.example.com/",
            "http://169.254.169.254/",
        ] {
            assert!(list.check(&url(refused)).is_err(), "{refused}");
        }
    }

    #[test]
    fn listing_a_guarded_range_admits_it() {
        let list = TargetAllowlist::parse("169.254.10.0/24").expect("valid");
        assert!(list.check(&url("http://169.254.10.5/")).is_ok());
        assert!(list.check(&url("http://169.254.169.254/")).is_err());
    }

    #[test]
    fn bad_entries_are_named() {
        let err = TargetAllowlist::parse("ok.test, bad host").expect_err("refused");
        assert!(err.contains("bad host"), "{err}");
        assert!(TargetAllowlist::parse("10.0.0.0/99").is_err());
    }
}
