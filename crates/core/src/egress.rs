//! Egress policies: which destinations a sandbox's network traffic may reach.
//!
//! A policy is written as the label `agentfense.egress`: comma-separated entries
//!
//! | entry | matches |
//! |---|---|
//! | `pypi.org` | that name, ports 80 and 443 |
//! | `pypi.org:8443` | that name, that port |
//! | `pypi.org:*` | that name, any port |
//! | `*.pythonhosted.org[:port]` | strict subdomains of the name (not the name itself) |
//! | `10.1.0.0/16[:port]`, `10.1.2.3[:port]`, `[fd00::/8]:443` | addresses in the block |
//! | `preset:registries` | the entries of a named list from the server's configuration |
//!
//! Names match names and address blocks match addresses, never across: a client that asks
//! for an IP literal is allowed only by a block that contains it, and a name is allowed only by
//! a name entry, whatever it resolves to (what it resolves to is checked separately: private
//! and local addresses are refused unless configured). A wildcard directly over a public
//! suffix (`*.com`, `*.co.uk`) is refused. Names are compared in ASCII lower case without a
//! trailing dot; internationalized names must be written in their `xn--` form.
//!
//! Pure: no I/O, no resolution.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

/// Longest accepted policy (entries after preset expansion).
pub const MAX_EGRESS_ENTRIES: usize = 256;

/// An egress policy that could not be parsed or is not allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EgressError {
    /// An entry is malformed.
    #[error("egress entry {entry:?}: {why}")]
    Entry {
        /// The entry as written.
        entry: String,
        /// What is wrong with it.
        why: String,
    },
    /// `preset:NAME` names no configured list.
    #[error("egress entry \"preset:{name}\": no such preset (known: {known})")]
    UnknownPreset {
        /// The name.
        name: String,
        /// The configured names, comma-separated.
        known: String,
    },
    /// Too many entries.
    #[error("egress policy has {0} entries; at most {MAX_EGRESS_ENTRIES} are allowed")]
    TooMany(usize),
    /// An entry reaches beyond what the server allows (`network.ceiling`).
    #[error("egress entry {entry:?} is not within the server's ceiling (network.ceiling)")]
    AboveCeiling {
        /// The entry as written.
        entry: String,
    },
}

/// Which ports an entry allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ports {
    /// 80 and 443 (an entry written without a port).
    Web,
    /// Exactly this one.
    One(u16),
    /// Any port (`:*`).
    Any,
}

impl Ports {
    /// Whether `port` is allowed.
    pub fn allows(self, port: u16) -> bool {
        match self {
            Ports::Web => port == 80 || port == 443,
            Ports::One(p) => p == port,
            Ports::Any => true,
        }
    }

    /// Whether every port of `self` is in `other`.
    pub fn within(self, other: Ports) -> bool {
        match (self, other) {
            (_, Ports::Any) => true,
            (Ports::Any, _) => false,
            (Ports::Web, Ports::Web) => true,
            (Ports::One(p), o) => o.allows(p),
            (Ports::Web, Ports::One(_)) => false,
        }
    }
}

/// A block of addresses (`addr/prefix`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The block of `addr` with its host bits cleared.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Cidr> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then(|| Cidr {
            addr: mask(addr, prefix),
            prefix,
        })
    }

    /// Whether `ip` is in the block (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.prefix) == self.addr
    }

    /// Whether every address of `other` is in `self`.
    pub fn covers(&self, other: &Cidr) -> bool {
        other.prefix >= self.prefix && self.contains(other.addr)
    }

    /// The first and the last address of the block.
    pub fn bounds(&self) -> (IpAddr, IpAddr) {
        let last = match self.addr {
            IpAddr::V4(a) => {
                let host = u32::MAX.checked_shr(u32::from(self.prefix)).unwrap_or(0);
                IpAddr::V4((u32::from(a) | host).into())
            }
            IpAddr::V6(a) => {
                let host = u128::MAX.checked_shr(u32::from(self.prefix)).unwrap_or(0);
                IpAddr::V6((u128::from(a) | host).into())
            }
        };
        (self.addr, last)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let m = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix))
            };
            IpAddr::V4((bits & m).into())
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let m = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix))
            };
            IpAddr::V6((bits & m).into())
        }
    }
}

/// What an entry's host part matches.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// Exactly this name.
    Name(String),
    /// Strict subdomains of this name (`*.name`).
    Subdomains(String),
    /// Addresses in this block.
    Block(Cidr),
}

/// One entry of a policy.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EgressEntry {
    /// The host part.
    pub target: Target,
    /// The ports.
    pub ports: Ports,
    /// The entry as written (after preset expansion: `preset:NAME/entry`), to name it in
    /// decisions and errors.
    pub source: String,
}

impl EgressEntry {
    /// Whether this entry allows `name` (normalized: see [`normalize_name`]) on `port`.
    pub fn allows_name(&self, name: &str, port: u16) -> bool {
        self.ports.allows(port)
            && match &self.target {
                Target::Name(n) => n == name,
                Target::Subdomains(s) => is_subdomain(name, s),
                Target::Block(_) => false,
            }
    }

    /// Whether this entry allows the address `ip` on `port`.
    pub fn allows_ip(&self, ip: IpAddr, port: u16) -> bool {
        self.ports.allows(port) && matches!(&self.target, Target::Block(c) if c.contains(ip))
    }

    /// Whether everything `self` allows, `other` allows too.
    pub fn within(&self, other: &EgressEntry) -> bool {
        self.ports.within(other.ports)
            && match (&self.target, &other.target) {
                (Target::Name(a), Target::Name(b)) => a == b,
                (Target::Name(a), Target::Subdomains(b)) => is_subdomain(a, b),
                (Target::Subdomains(a), Target::Subdomains(b)) => a == b || is_subdomain(a, b),
                (Target::Block(a), Target::Block(b)) => b.covers(a),
                _ => false,
            }
    }
}

/// Whether `name` is a strict subdomain of `parent` (both normalized).
fn is_subdomain(name: &str, parent: &str) -> bool {
    name.len() > parent.len() + 1
        && name.ends_with(parent)
        && name.as_bytes()[name.len() - parent.len() - 1] == b'.'
}

/// A name as entries and requests are compared: ASCII lower case, no trailing dot; `None`
/// when it is not a valid DNS name (letters, digits and hyphens in labels of 1-63 bytes, at
/// most 253 bytes, no label starting or ending with a hyphen; `_` is accepted inside labels,
/// as service names use it).
pub fn normalize_name(name: &str) -> Option<String> {
    let n = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    if n.is_empty() || n.len() > 253 {
        return None;
    }
    for label in n.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return None;
        }
    }
    // An all-numeric last label is an address, not a name.
    if n.rsplit('.')
        .next()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
    {
        return None;
    }
    Some(n)
}

/// Whether `suffix` (normalized) is a public suffix, over which a wildcard would allow a whole
/// registry (`com`, `co.uk`, `github.io`). Unknown top-level names count as public.
pub fn is_public_suffix(suffix: &str) -> bool {
    match psl::suffix(suffix.as_bytes()) {
        Some(s) => s.as_bytes() == suffix.as_bytes(),
        None => true,
    }
}

/// Splits `host[:port]`, `[v6]:port`, `v6` (no port).
fn split_port<'a>(entry: &'a str, raw: &str) -> Result<(&'a str, Ports), EgressError> {
    let bad = |why: String| EgressError::Entry {
        entry: raw.to_owned(),
        why,
    };
    let parse_port = |p: &str| -> Result<Ports, EgressError> {
        if p == "*" {
            return Ok(Ports::Any);
        }
        match p.parse::<u16>() {
            Ok(n) if n > 0 => Ok(Ports::One(n)),
            _ => Err(bad(format!(
                "port {p:?} is not a number from 1 to 65535 (or * for any)"
            ))),
        }
    };
    if let Some(rest) = entry.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| bad("unclosed '['".into()))?;
        return match after {
            "" => Ok((host, Ports::Web)),
            _ => match after.strip_prefix(':') {
                Some(p) => Ok((host, parse_port(p)?)),
                None => Err(bad(format!("unexpected {after:?} after ']'"))),
            },
        };
    }
    // More than one ':' outside brackets: a bare IPv6 address or block, no port.
    if entry.matches(':').count() > 1 {
        return Ok((entry, Ports::Web));
    }
    match entry.split_once(':') {
        Some((h, p)) => Ok((h, parse_port(p)?)),
        None => Ok((entry, Ports::Web)),
    }
}

fn parse_block(host: &str, raw: &str) -> Result<Option<Cidr>, EgressError> {
    let bad = |why: String| EgressError::Entry {
        entry: raw.to_owned(),
        why,
    };
    let (addr, prefix) = match host.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (host, None),
    };
    let Ok(ip) = addr.parse::<IpAddr>() else {
        if prefix.is_some() {
            return Err(bad(format!("{addr:?} is not an IP address")));
        }
        return Ok(None);
    };
    let ip = ip.to_canonical();
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) => match p.parse::<u8>() {
            Ok(n) if n <= max => n,
            _ => return Err(bad(format!("prefix length {p:?} is not 0-{max}"))),
        },
    };
    if mask(ip, prefix) != ip {
        return Err(bad(format!(
            "{ip} has bits set beyond /{prefix}; write {}/{prefix}",
            mask(ip, prefix)
        )));
    }
    Ok(Cidr::new(ip, prefix))
}

/// Parses one entry (not a preset).
pub fn parse_entry(raw: &str) -> Result<EgressEntry, EgressError> {
    let entry = raw.trim();
    let bad = |why: &str| EgressError::Entry {
        entry: raw.to_owned(),
        why: why.to_owned(),
    };
    if entry.is_empty() {
        return Err(bad("empty"));
    }
    let (host, ports) = split_port(entry, raw)?;
    if let Some(block) = parse_block(host, raw)? {
        return Ok(EgressEntry {
            target: Target::Block(block),
            ports,
            source: entry.to_owned(),
        });
    }
    let target = if let Some(suffix) = host.strip_prefix("*.") {
        let s = normalize_name(suffix)
            .ok_or_else(|| bad("not a valid DNS name after \"*.\" (xn-- form for non-ASCII)"))?;
        if is_public_suffix(&s) {
            return Err(bad(
                "a wildcard over a public suffix would allow a whole registry; name a domain",
            ));
        }
        Target::Subdomains(s)
    } else if host.contains('*') {
        return Err(bad("a wildcard is allowed only as a leading \"*.\""));
    } else {
        Target::Name(
            normalize_name(host)
                .ok_or_else(|| bad("not a valid DNS name (xn-- form for non-ASCII)"))?,
        )
    };
    Ok(EgressEntry {
        target,
        ports,
        source: entry.to_owned(),
    })
}

/// A parsed policy: allow-list entries, in the order written (duplicates removed).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EgressPolicy {
    entries: Vec<EgressEntry>,
}

impl EgressPolicy {
    /// Parses a label value, expanding `preset:NAME` from `presets` (whose entries may not
    /// name presets themselves).
    pub fn parse(
        label: &str,
        presets: &BTreeMap<String, Vec<String>>,
    ) -> Result<EgressPolicy, EgressError> {
        let mut entries: Vec<EgressEntry> = Vec::new();
        for raw in label.split(',') {
            if raw.trim().is_empty() {
                continue;
            }
            if let Some(name) = raw.trim().strip_prefix("preset:") {
                let list = presets
                    .get(name)
                    .ok_or_else(|| EgressError::UnknownPreset {
                        name: name.to_owned(),
                        known: presets.keys().cloned().collect::<Vec<_>>().join(", "),
                    })?;
                for e in list {
                    let mut parsed = parse_entry(e)?;
                    parsed.source = format!("preset:{name}/{}", parsed.source);
                    entries.push(parsed);
                }
            } else {
                entries.push(parse_entry(raw)?);
            }
        }
        let mut seen = std::collections::HashSet::new();
        entries.retain(|e| seen.insert((e.target.clone(), e.ports)));
        if entries.len() > MAX_EGRESS_ENTRIES {
            return Err(EgressError::TooMany(entries.len()));
        }
        Ok(EgressPolicy { entries })
    }

    /// The entries.
    pub fn entries(&self) -> &[EgressEntry] {
        &self.entries
    }

    /// Whether nothing is allowed.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry allowing the name `host` on `port`, if any (`host` is normalized here; an
    /// IP literal is never allowed by name: use [`EgressPolicy::allows_ip`]).
    pub fn allows_name(&self, host: &str, port: u16) -> Option<&EgressEntry> {
        let name = normalize_name(host)?;
        self.entries.iter().find(|e| e.allows_name(&name, port))
    }

    /// The first entry allowing the name `host` on some port, if any (what a resolver asks:
    /// a name no entry allows is not resolved at all).
    pub fn allows_name_on_any_port(&self, host: &str) -> Option<&EgressEntry> {
        let name = normalize_name(host)?;
        self.entries.iter().find(|e| match &e.target {
            Target::Name(n) => *n == name,
            Target::Subdomains(s) => is_subdomain(&name, s),
            Target::Block(_) => false,
        })
    }

    /// The entry allowing the address `ip` on `port`, if any.
    pub fn allows_ip(&self, ip: IpAddr, port: u16) -> Option<&EgressEntry> {
        self.entries.iter().find(|e| e.allows_ip(ip, port))
    }

    /// Checks that every entry is within some entry of `ceiling`.
    pub fn check_within(&self, ceiling: &EgressPolicy) -> Result<(), EgressError> {
        for e in &self.entries {
            if !ceiling.entries.iter().any(|c| e.within(c)) {
                return Err(EgressError::AboveCeiling {
                    entry: e.source.clone(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(s: &str) -> EgressPolicy {
        EgressPolicy::parse(s, &BTreeMap::new()).unwrap()
    }

    fn err(s: &str) -> String {
        EgressPolicy::parse(s, &BTreeMap::new())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn block_bounds() {
        let b = |s: &str, p| Cidr::new(s.parse().unwrap(), p).unwrap().bounds();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(b("10.1.2.3", 8), (ip("10.0.0.0"), ip("10.255.255.255")));
        assert_eq!(b("0.0.0.0", 0), (ip("0.0.0.0"), ip("255.255.255.255")));
        assert_eq!(b("192.168.1.7", 32), (ip("192.168.1.7"), ip("192.168.1.7")));
        assert_eq!(
            b("fd00::1", 8),
            (ip("fd00::"), ip("fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"))
        );
        assert_eq!(b("::", 0).1, ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"));
    }

    #[test]
    fn names_wildcards_ports() {
        let pol = p("pypi.org, *.pythonhosted.org, registry.npmjs.org:8443, Example.COM.");
        assert!(pol.allows_name("pypi.org", 443).is_some());
        assert!(pol.allows_name("PyPI.org.", 80).is_some());
        assert!(
            pol.allows_name("pypi.org", 22).is_none(),
            "no port: 80 and 443 only"
        );
        assert!(pol.allows_name("files.pythonhosted.org", 443).is_some());
        assert!(pol.allows_name("a.b.pythonhosted.org", 443).is_some());
        assert!(
            pol.allows_name("pythonhosted.org", 443).is_none(),
            "subdomains only"
        );
        assert!(pol.allows_name("evilpythonhosted.org", 443).is_none());
        assert!(pol.allows_name("registry.npmjs.org", 8443).is_some());
        assert!(pol.allows_name("registry.npmjs.org", 443).is_none());
        assert!(
            p("git.example:*")
                .allows_name("git.example", 9418)
                .is_some()
        );
        assert!(
            pol.allows_name("sub.pypi.org", 443).is_none(),
            "exact names are exact"
        );
        assert_eq!(
            pol.allows_name("example.com", 443).unwrap().source,
            "Example.COM."
        );
        assert!(
            pol.allows_name("1.2.3.4", 443).is_none(),
            "an IP is not a name"
        );
    }

    #[test]
    fn blocks_match_only_addresses() {
        let pol = p("10.1.0.0/16, 192.0.2.7:5432, [fd00::/8]:443, 2001:db8::1, pypi.org");
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(pol.allows_ip(ip("10.1.200.3"), 443).is_some());
        assert!(pol.allows_ip(ip("10.2.0.1"), 443).is_none());
        assert!(pol.allows_ip(ip("192.0.2.7"), 5432).is_some());
        assert!(pol.allows_ip(ip("192.0.2.7"), 443).is_none());
        assert!(
            pol.allows_ip(ip("::ffff:10.1.0.9"), 80).is_some(),
            "mapped v4 is v4"
        );
        assert!(pol.allows_ip(ip("fd12::1"), 443).is_some());
        assert!(pol.allows_ip(ip("2001:db8::1"), 80).is_some());
        assert!(pol.allows_ip(ip("2001:db8::2"), 80).is_none());
        assert!(pol.allows_name("10.1.0.1", 443).is_none());
    }

    #[test]
    fn bad_entries_say_what_is_wrong() {
        for (entry, says) in [
            ("*.com", "public suffix"),
            ("*.co.uk", "public suffix"),
            ("*.github.io", "public suffix"),
            ("*.unknowntld", "public suffix"),
            ("a.*.org", "leading"),
            ("pypi.org:0", "port"),
            ("pypi.org:99999", "port"),
            ("pypi.org:http", "port"),
            ("10.0.0.1/33", "prefix"),
            ("10.0.0.1/8", "bits set"),
            ("bad_host!", "DNS name"),
            ("-lead.example", "DNS name"),
            ("bücher.example", "xn--"),
            ("[::1", "unclosed"),
            ("preset:nope", "no such preset"),
        ] {
            let e = err(entry);
            assert!(e.contains(says), "{entry}: {e}");
        }
        assert!(p("").is_empty());
        assert!(p(" , ,").is_empty());
        assert!(
            p("*.internal.example")
                .allows_name("a.internal.example", 443)
                .is_some()
        );
    }

    #[test]
    fn presets_expand_and_are_named() {
        let presets = BTreeMap::from([(
            "registries".to_owned(),
            vec!["pypi.org".to_owned(), "*.pythonhosted.org".to_owned()],
        )]);
        let pol = EgressPolicy::parse("preset:registries, pypi.org", &presets).unwrap();
        assert_eq!(pol.entries().len(), 2, "duplicates removed");
        assert_eq!(
            pol.allows_name("files.pythonhosted.org", 443)
                .unwrap()
                .source,
            "preset:registries/*.pythonhosted.org"
        );
        let e = EgressPolicy::parse("preset:x", &presets)
            .unwrap_err()
            .to_string();
        assert!(e.contains("registries"), "{e}");
    }

    #[test]
    fn the_ceiling_bounds_entries() {
        let ceiling = p("*.example.org, pypi.org, 10.0.0.0/8:*, git.example.net:22");
        for ok in [
            "a.example.org",
            "*.b.example.org",
            "*.example.org",
            "pypi.org:443",
            "10.3.0.0/16:5432",
            "git.example.net:22",
        ] {
            p(ok)
                .check_within(&ceiling)
                .unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "example.org",
            "pypi.org:22",
            "pypi.org:*",
            "11.0.0.0/8",
            "10.0.0.0/7",
            "other.org",
        ] {
            let e = p(bad).check_within(&ceiling).unwrap_err().to_string();
            assert!(e.contains("network.ceiling"), "{bad}: {e}");
        }
    }

    proptest! {
        /// Parsing never panics, and what parses is stable: re-parsing an entry's source
        /// gives the same entry.
        #[test]
        fn parse_is_total_and_stable(s in "[a-z0-9.*:/\\[\\]_-]{0,40}") {
            if let Ok(e) = parse_entry(&s) {
                prop_assert_eq!(parse_entry(&e.source).unwrap(), e);
            }
        }

        /// A block contains exactly the addresses that share its prefix bits.
        #[test]
        fn blocks_contain_their_prefix(a in any::<u32>(), b in any::<u32>(), prefix in 0u8..=32) {
            let c = Cidr::new(IpAddr::V4(a.into()), prefix).unwrap();
            let shift = 32 - u32::from(prefix);
            let same = prefix == 0 || (a >> shift) == (b >> shift);
            prop_assert_eq!(c.contains(IpAddr::V4(b.into())), same);
        }

        /// A name entry never allows a name that is not it, whatever the case or dot.
        #[test]
        fn names_match_only_themselves(x in "[a-z]{1,8}\\.[a-z]{2,5}", y in "[a-z]{1,8}\\.[a-z]{2,5}") {
            let pol = p(&x);
            prop_assert_eq!(pol.allows_name(&y, 443).is_some(), x == y);
            let loud = format!("{}.", x.to_uppercase());
            prop_assert!(pol.allows_name(&loud, 443).is_some());
        }
    }
}
