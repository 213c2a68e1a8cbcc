//! Who the client is behind trusted reverse proxies: `X-Forwarded-For` is believed only from a
//! peer in `TRUSTED_PROXIES`, so a client cannot pick its own change-limit budget.

use std::net::{IpAddr, SocketAddr};

use axum::http::HeaderMap;
use ipnet::IpNet;

const X_FORWARDED_FOR: &str = "x-forwarded-for";

/// The address the change limit keys on. From an untrusted peer (or with no proxies trusted)
/// the peer itself. From a trusted peer: the header's entries walked from the right, skipping
/// trusted proxies, the first untrusted one; the leftmost when every entry is trusted; the
/// peer when the header is missing or any entry is not an address.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut entries = Vec::new();
    for value in headers.get_all(X_FORWARDED_FOR) {
        let Ok(text) = value.to_str() else {
            return peer;
        };
        for entry in text.split(',').map(str::trim) {
            match parse_entry(entry) {
                Some(ip) => entries.push(ip),
                None => return peer,
            }
        }
    }
    entries
        .iter()
        .rev()
        .find(|ip| !is_trusted(ip))
        .or(entries.first())
        .copied()
        .unwrap_or(peer)
}

/// `192.0.2.1`, `2001:db8::1`, or either with a port (`192.0.2.1:4711`, `[2001:db8::1]:4711`).
fn parse_entry(entry: &str) -> Option<IpAddr> {
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(X_FORWARDED_FOR, v.parse().unwrap());
        }
        h
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn the_header_counts_only_from_a_trusted_peer() {
        let trusted = nets(&["10.0.0.0/8"]);
        let h = headers(&["203.0.113.9"]);
        assert_eq!(client_ip(ip("192.0.2.1"), &h, &trusted), ip("192.0.2.1"));
        assert_eq!(client_ip(ip("10.1.1.1"), &h, &trusted), ip("203.0.113.9"));
        assert_eq!(client_ip(ip("10.1.1.1"), &h, &[]), ip("10.1.1.1"));
    }

    #[test]
    fn the_walk_skips_trusted_entries_from_the_right() {
        let trusted = nets(&["10.0.0.0/8"]);
        // The client forged the leftmost entry; the rightmost untrusted one is what the
        // proxy saw.
        let h = headers(&["198.51.100.1, 203.0.113.9", "10.2.2.2"]);
        assert_eq!(client_ip(ip("10.1.1.1"), &h, &trusted), ip("203.0.113.9"));
        let all_trusted = headers(&["10.3.3.3, 10.2.2.2"]);
        assert_eq!(
            client_ip(ip("10.1.1.1"), &all_trusted, &trusted),
            ip("10.3.3.3")
        );
        let with_port = headers(&["[2001:db8::7]:4711"]);
        assert_eq!(
            client_ip(ip("10.1.1.1"), &with_port, &trusted),
            ip("2001:db8::7")
        );
    }

    #[test]
    fn a_malformed_or_missing_header_means_the_peer() {
        let trusted = nets(&["10.0.0.0/8"]);
        let peer = ip("10.1.1.1");
        assert_eq!(
            client_ip(peer, &headers(&["203.0.113.9, nope"]), &trusted),
            peer
        );
        assert_eq!(client_ip(peer, &headers(&[""]), &trusted), peer);
        assert_eq!(client_ip(peer, &HeaderMap::new(), &trusted), peer);
    }
}
