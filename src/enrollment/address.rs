//! What an IP address is, for the target rules: the addresses a push daemon must never be
//! aimed at (link-local, cloud metadata, unspecified, multicast, broadcast) and those only
//! remote-target deployments refuse (loopback, private, CGNAT, unique-local). An IPv6 address
//! that carries an IPv4 one (IPv4-mapped, IPv4-compatible, NAT64, 6to4) is judged by that
//! IPv4 address too, since the packet ends up there.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Why an address is guarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressClass {
    /// A cloud instance metadata service (`169.254.169.254`, `fd00:ec2::254`, Alibaba's
    /// `100.100.100.200`): it hands out the instance's credentials.
    Metadata,
    LinkLocal,
    Unspecified,
    Multicast,
    Broadcast,
    /// Refused only with `TARGET_DENY_PRIVATE=true`.
    Loopback,
    /// Refused only with `TARGET_DENY_PRIVATE=true`: RFC 1918, CGNAT, IPv6 unique-local and
    /// site-local.
    Private,
}

impl AddressClass {
    /// Whether the address is refused even without `TARGET_DENY_PRIVATE`.
    pub fn always_guarded(self) -> bool {
        !matches!(self, Self::Loopback | Self::Private)
    }

    pub fn describe(self) -> &'static str {
        match self {
            Self::Metadata => "a cloud metadata address",
            Self::LinkLocal => "a link-local address",
            Self::Unspecified => "an unspecified address",
            Self::Multicast => "a multicast address",
            Self::Broadcast => "the broadcast address",
            Self::Loopback => "a loopback address",
            Self::Private => "a private address",
        }
    }
}

/// The addresses a connection to `ip` may end up at: `ip` itself and the IPv4 address an
/// IPv6 one embeds, if any.
pub fn destinations(ip: IpAddr) -> impl Iterator<Item = IpAddr> {
    let embedded = match ip {
        IpAddr::V6(v6) => embedded_v4(v6).map(IpAddr::V4),
        IpAddr::V4(_) => None,
    };
    std::iter::once(ip).chain(embedded)
}

/// The guarded class of `ip` or of the IPv4 address it embeds, if either is guarded.
pub fn classify(ip: IpAddr) -> Option<(AddressClass, IpAddr)> {
    destinations(ip).find_map(|d| {
        match d {
            IpAddr::V4(v4) => classify_v4(v4),
            IpAddr::V6(v6) => classify_v6(v6),
        }
        .map(|class| (class, d))
    })
}

fn classify_v4(ip: Ipv4Addr) -> Option<AddressClass> {
    let [a, b, ..] = ip.octets();
    Some(
        if ip == Ipv4Addr::new(169, 254, 169, 254) || ip == Ipv4Addr::new(100, 100, 100, 200) {
            AddressClass::Metadata
        } else if ip.is_link_local() {
            AddressClass::LinkLocal
        } else if a == 0 {
            // 0.0.0.0/8 "this network": Linux connects 0.0.0.0 to the local host.
            AddressClass::Unspecified
        } else if ip.is_multicast() {
            AddressClass::Multicast
        } else if ip.is_broadcast() {
            AddressClass::Broadcast
        } else if ip.is_loopback() {
            AddressClass::Loopback
        } else if ip.is_private() || (a == 100 && (64..128).contains(&b)) {
            AddressClass::Private
        } else {
            return None;
        },
    )
}

fn classify_v6(ip: Ipv6Addr) -> Option<AddressClass> {
    let first = ip.segments()[0];
    Some(
        if ip == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) {
            AddressClass::Metadata
        } else if ip.is_unspecified() {
            AddressClass::Unspecified
        } else if ip.is_loopback() {
            AddressClass::Loopback
        } else if first & 0xffc0 == 0xfe80 {
            AddressClass::LinkLocal
        } else if ip.is_multicast() {
            AddressClass::Multicast
        } else if first & 0xfe00 == 0xfc00 || first & 0xffc0 == 0xfec0 {
            AddressClass::Private
        } else {
            return None;
        },
    )
}

/// The IPv4 address inside an IPv6 one: IPv4-mapped `::ffff:a.b.c.d`, IPv4-compatible
/// `::a.b.c.d`, NAT64 `64:ff9b::a.b.c.d` and `64:ff9b:1::/48`, and 6to4 `2002:AABB:CCDD::`.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let low = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    match s {
        // `::` and `::1` are IPv6's own unspecified and loopback addresses.
        [0, 0, 0, 0, 0, 0, 0, 0 | 1] => None,
        [0, 0, 0, 0, 0, 0, hi, lo] => Some(low(hi, lo)),
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] | [0x64, 0xff9b, 1, _, _, _, hi, lo] => {
            Some(low(hi, lo))
        }
        [0x2002, hi, lo, ..] => Some(low(hi, lo)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(s: &str) -> Option<AddressClass> {
        classify(s.parse().expect("ip")).map(|(c, _)| c)
    }

    #[test]
    fn every_spelling_of_the_metadata_address_is_metadata() {
        for s in [
            "169.254.169.254",
            "::ffff:169.254.169.254",
            "::169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b::169.254.169.254",
            "64:ff9b:1::a9fe:a9fe",
            "2002:a9fe:a9fe::1",
            "fd00:ec2::254",
            "100.100.100.200",
        ] {
            assert_eq!(class(s), Some(AddressClass::Metadata), "{s}");
        }
    }

    #[test]
    fn guarded_and_private_classes() {
        use AddressClass::*;
        for (s, want) in [
            ("169.254.1.1", Some(LinkLocal)),
            ("fe80::1", Some(LinkLocal)),
            ("febf::1", Some(LinkLocal)),
            ("0.0.0.0", Some(Unspecified)),
            ("0.1.2.3", Some(Unspecified)),
            ("::", Some(Unspecified)),
            ("224.0.0.1", Some(Multicast)),
            ("ff02::1", Some(Multicast)),
            ("255.255.255.255", Some(Broadcast)),
            ("127.0.0.1", Some(Loopback)),
            ("::1", Some(Loopback)),
            ("::ffff:127.0.0.1", Some(Loopback)),
            ("10.1.2.3", Some(Private)),
            ("172.16.0.1", Some(Private)),
            ("192.168.1.1", Some(Private)),
            ("100.64.0.1", Some(Private)),
            ("fd12::1", Some(Private)),
            ("fec0::1", Some(Private)),
            ("93.184.215.14", None),
            ("2606:4700::1111", None),
            ("172.32.0.1", None),
            ("100.128.0.1", None),
        ] {
            assert_eq!(class(s), want, "{s}");
        }
        assert!(!Loopback.always_guarded() && !Private.always_guarded());
        assert!(Metadata.always_guarded() && Multicast.always_guarded());
    }
}
