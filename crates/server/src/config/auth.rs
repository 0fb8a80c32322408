//! `auth.*`, `quotas.*` and the listener-security keys of `server.*` (unix socket, TLS,
//! accepted Host names and Origins).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

/// `auth.*`: who may call the API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Require a credential on every call (API key, sandbox token, a mapped unix peer or a
    /// client certificate). May be false only while every TCP listener is on loopback.
    pub enabled: bool,
    /// Unix-socket peers by uid or user name → tenant. Root (uid 0) is always admin; an
    /// unlisted peer must present a key like a TCP client.
    pub unix_users: BTreeMap<String, String>,
    /// Failed authentications accepted per source address per minute before the source is
    /// refused outright (RESOURCE_EXHAUSTED / 429) for the rest of the minute.
    pub max_failures_per_minute: u32,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            enabled: false,
            unix_users: BTreeMap::new(),
            max_failures_per_minute: 30,
        }
    }
}

/// `server.tls.*`: TLS on the gRPC and REST listeners (both or neither).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain of the server.
    pub cert: Option<PathBuf>,
    /// PEM private key of the server.
    pub key: Option<PathBuf>,
    /// PEM CA bundle: when set, clients must present a certificate it signed (mTLS), and the
    /// certificate's subject common name is the caller's tenant.
    pub client_ca: Option<PathBuf>,
}

impl TlsConfig {
    /// Whether TLS is configured.
    pub fn enabled(&self) -> bool {
        self.cert.is_some() || self.key.is_some()
    }
}

/// One tenant's limits; 0 = unlimited.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TenantQuota {
    /// Sandboxes that exist (any state).
    pub sandboxes: u32,
    /// Sandboxes running at once.
    pub running_sandboxes: u32,
    /// Sum of the sizes of the tenant's codebases, bytes.
    pub codebase_bytes: u64,
    /// Commands running at once (exec, exec stream, session exec).
    pub concurrent_execs: u32,
    /// Sandboxes created in any sliding hour.
    pub creations_per_hour: u32,
}

/// `quotas.*`: per-tenant limits, a default and named overrides (an override replaces the
/// whole default for that tenant).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct QuotaConfig {
    /// Limits of every tenant not named below.
    pub default: TenantQuota,
    /// Per-tenant limits.
    pub tenants: BTreeMap<String, TenantQuota>,
}

impl QuotaConfig {
    /// The limits that apply to `tenant`.
    pub fn of(&self, tenant: &str) -> TenantQuota {
        self.tenants.get(tenant).copied().unwrap_or(self.default)
    }
}
