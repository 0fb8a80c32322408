//! `network.*`: what the egress proxy lets sandboxes reach.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Deserialize;

/// `network.*`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// Named allow-lists, usable as `preset:NAME` in `agentfense.egress`. `registries` (the
    /// package hosts of PyPI, npm, crates.io, the Go proxy and GitHub) is built in unless
    /// redefined here.
    pub presets: BTreeMap<String, Vec<String>>,
    /// The most any sandbox may be granted, as egress entries; absent = no ceiling.
    pub ceiling: Option<Vec<String>>,
    /// Static names → addresses (internal mirrors), used instead of DNS.
    pub hosts: BTreeMap<String, Vec<IpAddr>>,
    /// Address blocks the proxy may reach although they are private or local.
    pub private_allow: Vec<String>,
    /// DNS servers (`IP` or `IP:port`, port 53 by default) the proxy resolves allowed names
    /// with; empty = the system's resolver. Only names a sandbox's policy allows are ever
    /// sent to them.
    pub upstream_dns: Vec<String>,
}

impl NetworkConfig {
    /// `network.upstream_dns` as socket addresses; the entry that is not one, as an error.
    pub fn upstream_dns_addrs(&self) -> Result<Vec<std::net::SocketAddr>, String> {
        self.upstream_dns
            .iter()
            .map(|s| {
                let t = s.trim();
                t.parse::<std::net::SocketAddr>()
                    .or_else(|_| {
                        t.parse::<IpAddr>()
                            .map(|ip| std::net::SocketAddr::new(ip, 53))
                    })
                    .map_err(|_| {
                        format!("{s:?} is not an address (e.g. 10.0.0.2 or 10.0.0.2:5353)")
                    })
            })
            .collect()
    }
}

/// The built-in `registries` preset.
pub const REGISTRIES: &[&str] = &[
    // PyPI
    "pypi.org",
    "files.pythonhosted.org",
    // npm
    "registry.npmjs.org",
    // crates.io
    "crates.io",
    "index.crates.io",
    "static.crates.io",
    // Go module proxy and checksum database
    "proxy.golang.org",
    "sum.golang.org",
    // GitHub (clones, releases, raw files)
    "github.com",
    "codeload.github.com",
    "objects.githubusercontent.com",
    "raw.githubusercontent.com",
];

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            presets: BTreeMap::from([(
                "registries".to_owned(),
                REGISTRIES.iter().map(|s| (*s).to_owned()).collect(),
            )]),
            ceiling: None,
            hosts: BTreeMap::new(),
            private_allow: Vec::new(),
            upstream_dns: Vec::new(),
        }
    }
}
