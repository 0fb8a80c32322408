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
        }
    }
}
