//! Which targets an enrollment may point at: the optional `TARGET_ALLOWLIST` (host names,
//! `*.` wildcards, IP addresses and CIDR ranges), and the link-local / cloud metadata ranges
//! that are refused unless listed, since a push daemon that can be aimed at
//! `169.254.169.254` hands out cloud credentials.

use std::net::IpAddr;

use ipnet::IpNet;
use url::{Host, Url};

use crate::enrollment::address::{classify, destinations};

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

    /// Whether an allowlist entry names `ip` (or the IPv4 address it embeds).
    fn lists_address(&self, ip: IpAddr) -> bool {
        destinations(ip).any(|d| {
            self.rules
                .iter()
                .any(|rule| matches!(rule, Rule::Net(net) if net.contains(&d)))
        })
    }

    fn lists_name(&self, name: &str) -> bool {
        let name = name.to_ascii_lowercase();
        self.rules.iter().any(|rule| match rule {
            Rule::Host(host) => *host == name,
            Rule::Suffix(suffix) => name.ends_with(suffix.as_str()),
            Rule::Net(_) => false,
        })
    }
}

/// Which targets may receive POSTs: `TARGET_ALLOWLIST` and `TARGET_DENY_PRIVATE`. A URL is
/// judged by [`TargetPolicy::check_url`] when it is enrolled and loaded, and every address
/// its name resolves to by [`TargetPolicy::check_address`], at enroll time and again at each
/// connect (so a name that later resolves elsewhere is caught when it is used).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetPolicy {
    pub allowlist: TargetAllowlist,
    /// Also refuse loopback and private addresses (targets are always remote).
    pub deny_private: bool,
}

impl TargetPolicy {
    /// `Ok` when `target` may receive POSTs; otherwise the reason, for a 422 or a log line.
    /// A host name is judged by the allowlist here; its addresses by [`Self::check_address`].
    pub fn check_url(&self, target: &Url) -> Result<(), String> {
        let host = target
            .host()
            .ok_or_else(|| "`target_url` has no host".to_string())?;
        match host {
            Host::Domain(name) => {
                if !self.allowlist.is_empty() && !self.allowlist.lists_name(name) {
                    return Err(format!(
                        "`target_url` host {name} is not in TARGET_ALLOWLIST"
                    ));
                }
                Ok(())
            }
            Host::Ipv4(v4) => self.check_literal(IpAddr::V4(v4)),
            Host::Ipv6(v6) => self.check_literal(IpAddr::V6(v6)),
        }
    }

    fn check_literal(&self, ip: IpAddr) -> Result<(), String> {
        self.check_address(ip)
            .map_err(|reason| format!("`target_url` {reason}"))?;
        if !self.allowlist.is_empty() && !self.allowlist.lists_address(ip) {
            return Err(format!("`target_url` host {ip} is not in TARGET_ALLOWLIST"));
        }
        Ok(())
    }

    /// `Ok` when a connection to `ip` is allowed: it is outside the guarded classes (and, with
    /// `deny_private`, outside loopback and private ranges), or the allowlist lists it.
    pub fn check_address(&self, ip: IpAddr) -> Result<(), String> {
        let Some((class, judged)) = classify(ip) else {
            return Ok(());
        };
        if self.allowlist.lists_address(ip) {
            return Ok(());
        }
        if class.always_guarded() {
            let shown = if judged == ip {
                ip.to_string()
            } else {
                format!("{ip} (that is {judged})")
            };
            return Err(format!(
                "points at {shown}, {}, refused unless TARGET_ALLOWLIST lists it",
                class.describe()
            ));
        }
        if self.deny_private {
            return Err(format!(
                "points at {ip}, {}, refused with TARGET_DENY_PRIVATE=true unless TARGET_ALLOWLIST lists it",
                class.describe()
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

    fn policy(list: &str, deny_private: bool) -> TargetPolicy {
        TargetPolicy {
            allowlist: TargetAllowlist::parse(list).expect("valid"),
            deny_private,
        }
    }

    #[test]
    fn without_a_list_everything_but_the_guarded_ranges_passes() {
        let open = TargetPolicy::default();
        assert!(open.check_url(&url("http://example.com/x")).is_ok());
        assert!(open.check_url(&url("http://10.1.2.3/x")).is_ok());
        assert!(open.check_url(&url("http://127.0.0.1:8080/x")).is_ok());
        for refused in [
            "http://169.254.169.254/latest",
            "http://[fe80::1]/x",
            "http://[::ffff:169.254.169.254]/x",
            "http://[fd00:ec2::254]/latest",
            "http://[64:ff9b::a9fe:a9fe]/latest",
            "http://[::169.254.169.254]/",
            "http://0.0.0.0:8080/",
            "http://[::]:8080/",
            "http://224.0.0.1/",
            "http://[ff02::1]/",
            // What the url crate normalises to 169.254.169.254: integer, hex, octal, short
            // and trailing-dot spellings.
            "http://2852039166/",
            "http://0xa9fea9fe/",
            "http://0xA9.0xFE.0xA9.0xFE/",
            "http://0251.0376.0251.0376/",
            "http://169.254.43518/",
            "http://169.254.169.254./",
            "http://0/",
        ] {
            let parsed = url(refused);
            let err = open.check_url(&parsed).expect_err(refused);
            assert!(err.contains("refused"), "{refused}: {err}");
        }
    }

    #[test]
    fn deny_private_also_refuses_loopback_and_private_ranges() {
        let strict = policy("", true);
        for refused in [
            "http://127.0.0.1/",
            "http://127.1/",
            "http://2130706433/",
            "http://[::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://10.0.0.1/",
            "http://192.168.0.10/",
            "http://[fd00::1]/",
        ] {
            assert!(strict.check_url(&url(refused)).is_err(), "{refused}");
        }
        assert!(strict.check_url(&url("http://93.184.215.14/")).is_ok());
        assert!(strict.check_url(&url("http://example.com/")).is_ok());
        let listed = policy("127.0.0.1", true);
        assert!(listed.check_url(&url("http://127.0.0.1:9/")).is_ok());
        assert!(
            listed
                .check_address("127.0.0.1".parse().expect("ip"))
                .is_ok()
        );
        assert!(listed.check_address("::1".parse().expect("ip")).is_err());
    }

    #[test]
    fn a_list_admits_only_its_entries() {
        let list = policy(
            "hooks.example.com, *.internal.test,10.0.0.0/8,127.0.0.1",
            false,
        );
        for ok in [
            "http://hooks.example.com/a",
            "https://a.internal.test/",
            "http://b.c.internal.test/",
            "http://10.9.8.7:99/",
            "http://127.0.0.1:8080/",
        ] {
            assert!(list.check_url(&url(ok)).is_ok(), "{ok}");
        }
        for refused in [
            "http://example.com/",
            "http://internal.test/",
            "http://11.0.0.1/",
            "http://127.0.0.2/",
            "http://evil-hooks.example.com/",
            "http://169.254.169.254/",
        ] {
            assert!(list.check_url(&url(refused)).is_err(), "{refused}");
        }
    }

    #[test]
    fn listing_a_guarded_range_admits_it() {
        let list = policy("169.254.10.0/24", false);
        assert!(list.check_url(&url("http://169.254.10.5/")).is_ok());
        assert!(
            list.check_url(&url("http://[::ffff:169.254.10.5]/"))
                .is_ok()
        );
        assert!(list.check_url(&url("http://169.254.169.254/")).is_err());
    }

    #[test]
    fn bad_entries_are_named() {
        let err = TargetAllowlist::parse("ok.test, bad host").expect_err("refused");
        assert!(err.contains("bad host"), "{err}");
        assert!(TargetAllowlist::parse("10.0.0.0/99").is_err());
    }
}
