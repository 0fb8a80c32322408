//! Whether a destination may be reached, and at which addresses.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use agentfense_core::egress::normalize_name;

use crate::Proxy;

/// Why an address is not a public destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressClass {
    /// 127.0.0.0/8, ::1.
    Loopback,
    /// 10/8, 172.16/12, 192.168/16, fc00::/7.
    Private,
    /// 169.254/16, fe80::/10.
    LinkLocal,
    /// Multicast and broadcast.
    Multicast,
    /// 0.0.0.0/8, ::.
    Unspecified,
    /// 100.64.0.0/10 (carrier-grade NAT, also some clouds' internal ranges).
    Shared,
    /// Cloud metadata services (169.254.169.254, fd00:ec2::254, 100.100.100.200).
    Metadata,
    /// Reserved or documentation ranges (192.0.0.0/24, 198.18.0.0/15, 240.0.0.0/4, ...).
    Reserved,
}

impl AddressClass {
    fn as_str(self) -> &'static str {
        match self {
            AddressClass::Loopback => "a loopback address",
            AddressClass::Private => "a private address",
            AddressClass::LinkLocal => "a link-local address",
            AddressClass::Multicast => "a multicast or broadcast address",
            AddressClass::Unspecified => "an unspecified address",
            AddressClass::Shared => "a shared (CGNAT) address",
            AddressClass::Metadata => "a cloud metadata address",
            AddressClass::Reserved => "a reserved address",
        }
    }
}

/// The class of a non-public address; `None` for a public one.
pub fn classify(ip: IpAddr) -> Option<AddressClass> {
    match ip.to_canonical() {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

/// Cloud metadata services: AWS/GCP/Azure IMDS (and AWS's IPv6 one), Alibaba's, Azure's
/// WireServer.
pub const METADATA: [IpAddr; 4] = [
    IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)),
    IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)),
    IpAddr::V4(Ipv4Addr::new(168, 63, 129, 16)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
];

/// Whether every address of `block` is private or shared (a LAN, a VPC), and none of them a
/// metadata service: what a user who names the block may reach without `private_allow`.
pub fn wholly_private(block: &agentfense_core::egress::Cidr) -> bool {
    let private = |ip| {
        matches!(
            classify(ip),
            Some(AddressClass::Private | AddressClass::Shared)
        )
    };
    let (first, last) = block.bounds();
    private(first) && private(last) && !METADATA.iter().any(|m| block.contains(*m))
}

fn classify_v4(ip: Ipv4Addr) -> Option<AddressClass> {
    let [a, b, c, _] = ip.octets();
    Some(if METADATA.contains(&IpAddr::V4(ip)) {
        AddressClass::Metadata
    } else if ip.is_loopback() {
        AddressClass::Loopback
    } else if ip.is_private() {
        AddressClass::Private
    } else if ip.is_link_local() {
        AddressClass::LinkLocal
    } else if ip.is_multicast() || ip.is_broadcast() {
        AddressClass::Multicast
    } else if a == 0 {
        AddressClass::Unspecified
    } else if a == 100 && (64..128).contains(&b) {
        AddressClass::Shared
    } else if (a == 192 && b == 0 && c == 0)
        || (a == 198 && (b == 18 || b == 19))
        || a >= 240
        || ip.is_documentation()
    {
        AddressClass::Reserved
    } else {
        return None;
    })
}

fn classify_v6(ip: Ipv6Addr) -> Option<AddressClass> {
    let s = ip.segments();
    Some(if METADATA.contains(&IpAddr::V6(ip)) {
        AddressClass::Metadata
    } else if ip.is_loopback() {
        AddressClass::Loopback
    } else if ip.is_unspecified() {
        AddressClass::Unspecified
    } else if ip.is_multicast() {
        AddressClass::Multicast
    } else if s[0] & 0xfe00 == 0xfc00 {
        AddressClass::Private
    } else if s[0] & 0xffc0 == 0xfe80 {
        AddressClass::LinkLocal
    } else if s[0] == 0x2001 && s[1] == 0x0db8 {
        AddressClass::Reserved
    } else if s[0] & 0xffc0 == 0xfec0 {
        // Deprecated site-local: private in effect.
        AddressClass::Private
    } else if (s[0] == 0x64 && s[1] == 0xff9b) || s[..6] == [0; 6] {
        // NAT64 (well-known 64:ff9b::/96 and local-use 64:ff9b:1::/48) and IPv4-compatible
        // (::a.b.c.d): the embedded IPv4 address (the last 32 bits) decides.
        return classify_v4(v4_at(s[6], s[7]));
    } else if s[0] == 0x2002 {
        // 6to4: the IPv4 address in bits 16-48.
        return classify_v4(v4_at(s[1], s[2]));
    } else if s[0] == 0x2001 && s[1] == 0 {
        // Teredo: the server's IPv4 address in bits 32-64; the client's, obfuscated, in
        // the last 32. Either non-public makes the whole address suspect.
        return classify_v4(v4_at(s[2], s[3])).or_else(|| classify_v4(v4_at(!s[6], !s[7])));
    } else {
        return None;
    })
}

fn v4_at(hi: u16, lo: u16) -> Ipv4Addr {
    Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8)
}

/// A decision on one destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Connect to one of these addresses; `rule` is the entry that allowed it.
    Allow {
        /// Candidate addresses, in order.
        addrs: Vec<SocketAddr>,
        /// The policy entry, as written.
        rule: String,
    },
    /// Refused, and why.
    Deny(String),
}

impl Proxy {
    /// Decides whether `host:port` may be reached, resolving a name (static hosts first).
    pub async fn decide(&self, host: &str, port: u16) -> Decision {
        let policy = self.policy();
        let literal = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host)
            .parse::<IpAddr>()
            .ok();
        let (rule, candidates) = match literal {
            Some(ip) => match policy.allows_ip(ip, port) {
                Some(e) => (e.source.clone(), vec![SocketAddr::new(ip, port)]),
                None => {
                    return Decision::Deny(format!(
                        "{ip}:{port} is not allowed (an address needs an address block entry)"
                    ));
                }
            },
            None => {
                let Some(name) = normalize_name(host) else {
                    return Decision::Deny(format!("{host:?} is not a valid host name"));
                };
                let Some(e) = policy.allows_name(&name, port) else {
                    return Decision::Deny(format!("{name}:{port} is not in the allow-list"));
                };
                let rule = e.source.clone();
                let addrs = match self.resolve(&name).await {
                    Ok(ips) => ips
                        .into_iter()
                        .map(|ip| SocketAddr::new(ip, port))
                        .collect(),
                    Err(reason) => return Decision::Deny(reason),
                };
                (rule, addrs)
            }
        };
        let (allowed, refused) = self.reachable(candidates);
        if allowed.is_empty() {
            return Decision::Deny(
                refused.unwrap_or_else(|| format!("{host} has no address to connect to")),
            );
        }
        Decision::Allow {
            addrs: allowed,
            rule,
        }
    }

    /// The addresses of `candidates` that may be reached, and why the last of the others may
    /// not: the server's own listeners never, non-public addresses only when
    /// `network.private_allow` covers them.
    pub(crate) fn reachable(
        &self,
        candidates: impl IntoIterator<Item = SocketAddr>,
    ) -> (Vec<SocketAddr>, Option<String>) {
        let mut allowed = Vec::new();
        let mut refused = None;
        for a in candidates {
            let a = SocketAddr::new(a.ip().to_canonical(), a.port());
            if self
                .cfg
                .refused
                .iter()
                .any(|r| r.port() == a.port() && (r.ip() == a.ip() || r.ip().is_unspecified()))
            {
                refused = Some(format!("{a} is this server's own address"));
                continue;
            }
            if let Some(why) = self.non_public(a.ip()) {
                refused = Some(why);
                continue;
            }
            allowed.push(a);
        }
        (allowed, refused)
    }

    /// Why `ip` may not be reached, when it is a non-public address `network.private_allow`
    /// does not cover.
    pub(crate) fn non_public(&self, ip: IpAddr) -> Option<String> {
        let ip = ip.to_canonical();
        let class = classify(ip)?;
        (!self.cfg.private_allow.iter().any(|c| c.contains(ip)))
            .then(|| format!("{ip} is {} (network.private_allow)", class.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_classes() {
        let c = |s: &str| classify(s.parse().unwrap());
        assert_eq!(c("127.0.0.1"), Some(AddressClass::Loopback));
        assert_eq!(c("::1"), Some(AddressClass::Loopback));
        assert_eq!(
            c("::ffff:127.0.0.1"),
            Some(AddressClass::Loopback),
            "mapped"
        );
        assert_eq!(c("10.1.2.3"), Some(AddressClass::Private));
        assert_eq!(c("172.31.0.1"), Some(AddressClass::Private));
        assert_eq!(c("192.168.1.1"), Some(AddressClass::Private));
        assert_eq!(c("fd12::1"), Some(AddressClass::Private));
        assert_eq!(c("169.254.169.254"), Some(AddressClass::Metadata));
        assert_eq!(c("fd00:ec2::254"), Some(AddressClass::Metadata));
        assert_eq!(c("169.254.1.1"), Some(AddressClass::LinkLocal));
        assert_eq!(c("fe80::1"), Some(AddressClass::LinkLocal));
        assert_eq!(c("224.0.0.1"), Some(AddressClass::Multicast));
        assert_eq!(c("255.255.255.255"), Some(AddressClass::Multicast));
        assert_eq!(c("0.0.0.0"), Some(AddressClass::Unspecified));
        assert_eq!(c("100.64.0.1"), Some(AddressClass::Shared));
        assert_eq!(
            c("64:ff9b::7f00:1"),
            Some(AddressClass::Loopback),
            "NAT64 of 127.0.0.1"
        );
        assert_eq!(c("198.18.0.1"), Some(AddressClass::Reserved));
        assert_eq!(
            c("64:ff9b:1::a00:5"),
            Some(AddressClass::Private),
            "local-use NAT64"
        );
        assert_eq!(c("::a00:5"), Some(AddressClass::Private), "IPv4-compatible");
        assert_eq!(
            c("2002:a00:5::1"),
            Some(AddressClass::Private),
            "6to4 of 10.0.0.5"
        );
        assert_eq!(
            c("2001:0:a00:5::1"),
            Some(AddressClass::Private),
            "Teredo server"
        );
        assert_eq!(c("fec0::1"), Some(AddressClass::Private), "site-local");
        assert_eq!(c("168.63.129.16"), Some(AddressClass::Metadata));
        assert_eq!(c("2002:9765:df::1"), None, "6to4 of a public address");
        assert_eq!(c("151.101.0.223"), None);
        assert_eq!(c("2a04:4e42::223"), None);
    }

    #[test]
    fn wholly_private_blocks() {
        let w = |s: &str, p| wholly_private(&crate::Cidr::new(s.parse().unwrap(), p).unwrap());
        assert!(w("10.0.0.0", 8));
        assert!(w("192.168.1.0", 24));
        assert!(w("fd12::", 16));
        assert!(!w("0.0.0.0", 0), "the internet");
        assert!(!w("127.0.0.0", 8), "loopback");
        assert!(!w("169.254.0.0", 16), "link-local and IMDS");
        assert!(!w("100.64.0.0", 10), "holds 100.100.100.200");
        assert!(!w("fd00::", 8), "holds fd00:ec2::254");
        assert!(!w("10.0.0.0", 7), "runs into public space");
    }
}
