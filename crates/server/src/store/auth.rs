//! API keys, sandbox tokens, tenants (blocking) and the per-tenant usage quotas are checked
//! against.

use std::time::SystemTime;

use super::from_nanos;

/// An API key or sandbox token as stored: everything but the secret, which is kept only as a
/// keyed hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// Public id (`key_...`), shown in listings and audit events.
    pub id: String,
    /// The tenant it acts for.
    pub tenant: String,
    /// Scope names.
    pub scopes: Vec<String>,
    /// For sandbox tokens: the one sandbox it may touch.
    pub sandbox_id: Option<String>,
    /// For sandbox tokens: the key that minted it (revoking that key revokes the token).
    pub parent_id: Option<String>,
    /// Creation time.
    pub created_at: SystemTime,
    /// When it stops working, if ever.
    pub expires_at: Option<SystemTime>,
    /// Last successful use (updated at most once a minute).
    pub last_used_at: Option<SystemTime>,
    /// When it was revoked.
    pub revoked_at: Option<SystemTime>,
}

/// A tenant known to the store (made when a key is first created for it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantRecord {
    /// Its name.
    pub name: String,
    /// When it was first seen.
    pub created_at: SystemTime,
    /// When it was blocked, if it is.
    pub blocked_at: Option<SystemTime>,
    /// Why.
    pub block_reason: Option<String>,
}

/// The limit a sandbox creation hit, with the count that reached it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitHit {
    /// `sandbox.max_per_user` (per owner).
    Owner(u64),
    /// `quotas.*.sandboxes`.
    Tenant(u64),
    /// `quotas.*.creations_per_hour`.
    PerHour(u64),
}

/// What a tenant holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TenantUsage {
    /// Sandboxes in any state.
    pub sandboxes: u64,
    /// Sandboxes running.
    pub running: u64,
    /// Sum of its codebases' sizes, bytes.
    pub codebase_bytes: u64,
}

/// The columns of a key row, in the order the backends read them.
pub(super) const KEY_COLS: &str =
    "id, tenant, scopes, sandbox_id, created_at, expires_at, last_used_at, revoked_at, parent_id";

/// A stored key as the gate needs it.
#[derive(Debug, Clone)]
pub struct KeyLookup {
    /// The key.
    pub key: KeyRecord,
    /// Its stored hash.
    pub hash: Vec<u8>,
    /// Its tenant is blocked.
    pub tenant_blocked: bool,
    /// It was minted by a key that is now revoked, expired or gone.
    pub parent_dead: bool,
}

/// A key row as stored, decoded by [`RawKey::decode`].
pub(super) struct RawKey {
    pub(super) id: String,
    pub(super) tenant: String,
    /// Comma-separated scope names.
    pub(super) scopes: String,
    pub(super) sandbox_id: Option<String>,
    pub(super) created_at: i64,
    pub(super) expires_at: Option<i64>,
    pub(super) last_used_at: Option<i64>,
    pub(super) revoked_at: Option<i64>,
    pub(super) parent_id: Option<String>,
}

impl RawKey {
    pub(super) fn decode(self) -> KeyRecord {
        KeyRecord {
            id: self.id,
            tenant: self.tenant,
            scopes: self
                .scopes
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
            sandbox_id: self.sandbox_id,
            parent_id: self.parent_id,
            created_at: from_nanos(self.created_at),
            expires_at: self.expires_at.map(from_nanos),
            last_used_at: self.last_used_at.map(from_nanos),
            revoked_at: self.revoked_at.map(from_nanos),
        }
    }
}
