//! API keys, sandbox tokens, tenants (blocking) and the per-tenant usage quotas are checked
//! against.

use std::time::{Duration, SystemTime};

use rusqlite::{OptionalExtension, params};

use super::{Store, StoreError, from_nanos, q, to_nanos};

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

const KEY_COLS: &str =
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

fn key_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<KeyRecord> {
    let scopes: String = r.get(2)?;
    Ok(KeyRecord {
        id: r.get(0)?,
        tenant: r.get(1)?,
        scopes: scopes
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        sandbox_id: r.get(3)?,
        created_at: from_nanos(r.get(4)?),
        expires_at: r.get::<_, Option<i64>>(5)?.map(from_nanos),
        last_used_at: r.get::<_, Option<i64>>(6)?.map(from_nanos),
        revoked_at: r.get::<_, Option<i64>>(7)?.map(from_nanos),
        parent_id: r.get(8)?,
    })
}

impl Store {
    /// Stores a new key (and makes its tenant known).
    pub fn insert_key(&self, k: &KeyRecord, hash: &[u8]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(q("insert key"))?;
        tx.execute(
            "INSERT OR IGNORE INTO tenants (name, created_at) VALUES (?1, ?2)",
            params![k.tenant, to_nanos(k.created_at)],
        )
        .map_err(q("insert tenant"))?;
        tx.execute(
            &format!(
                "INSERT INTO api_keys ({KEY_COLS}, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
            ),
            params![
                k.id,
                k.tenant,
                k.scopes.join(","),
                k.sandbox_id,
                to_nanos(k.created_at),
                k.expires_at.map(to_nanos),
                k.last_used_at.map(to_nanos),
                k.revoked_at.map(to_nanos),
                k.parent_id,
                hash,
            ],
        )
        .map_err(q("insert key"))?;
        tx.commit().map_err(q("insert key"))
    }

    /// The key with this id, as of `now`: its record, stored hash, whether its tenant is
    /// blocked and whether the key that minted it (for tokens) still works.
    pub fn key(&self, id: &str, now: SystemTime) -> Result<Option<KeyLookup>, StoreError> {
        self.conn()
            .query_row(
                "SELECT k.id, k.tenant, k.scopes, k.sandbox_id, k.created_at, k.expires_at,
                 k.last_used_at, k.revoked_at, k.parent_id, k.hash, t.blocked_at IS NOT NULL,
                 k.parent_id IS NOT NULL AND (p.id IS NULL OR p.revoked_at IS NOT NULL
                     OR (p.expires_at IS NOT NULL AND p.expires_at <= ?2))
                 FROM api_keys k LEFT JOIN tenants t ON t.name = k.tenant
                 LEFT JOIN api_keys p ON p.id = k.parent_id
                 WHERE k.id = ?1",
                params![id, to_nanos(now)],
                |r| {
                    Ok(KeyLookup {
                        key: key_row(r)?,
                        hash: r.get(9)?,
                        tenant_blocked: r.get(10)?,
                        parent_dead: r.get(11)?,
                    })
                },
            )
            .optional()
            .map_err(q("get key"))
    }

    /// The ids of every key and token (the gate answers unknown ids without a query).
    pub fn key_ids(&self) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached("SELECT id FROM api_keys")
            .map_err(q("key ids"))?;
        stmt.query_map([], |r| r.get(0))
            .map_err(q("key ids"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(q("key ids"))
    }

    /// How many tokens exist for a sandbox.
    pub fn count_tokens_of(&self, sandbox_id: &str) -> Result<u64, StoreError> {
        self.conn()
            .query_row(
                "SELECT COUNT(*) FROM api_keys WHERE sandbox_id = ?1",
                [sandbox_id],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n.max(0) as u64)
            .map_err(q("count tokens"))
    }

    /// Running sandboxes of blocked tenants, with the tenant, and whether the block was
    /// already acted on once.
    pub fn running_of_blocked(&self) -> Result<Vec<(String, String)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT s.id, s.tenant FROM sandboxes s JOIN tenants t ON t.name = s.tenant
                 WHERE t.blocked_at IS NOT NULL AND s.status = 'running'",
            )
            .map_err(q("running of blocked"))?;
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(q("running of blocked"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(q("running of blocked"))
    }

    /// Every key and token, oldest first.
    pub fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {KEY_COLS} FROM api_keys ORDER BY created_at, id"
            ))
            .map_err(q("list keys"))?;
        stmt.query_map([], key_row)
            .map_err(q("list keys"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(q("list keys"))
    }

    /// Revokes a key; false if there is no such key (revoking twice keeps the first time).
    pub fn revoke_key(&self, id: &str, now: SystemTime) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .execute(
                "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?2) WHERE id = ?1",
                params![id, to_nanos(now)],
            )
            .map_err(q("revoke key"))?;
        Ok(n > 0)
    }

    /// Records a successful use.
    pub fn touch_key(&self, id: &str, now: SystemTime) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "UPDATE api_keys SET last_used_at = ?2 WHERE id = ?1",
                params![id, to_nanos(now)],
            )
            .map_err(q("touch key"))?;
        Ok(())
    }

    /// Deletes the tokens minted for a sandbox (it is gone, so are they).
    pub fn delete_tokens_of(&self, sandbox_id: &str) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM api_keys WHERE sandbox_id = ?1", [sandbox_id])
            .map_err(q("delete sandbox tokens"))?;
        Ok(())
    }

    /// Blocks a tenant (known or not): its keys stop working, and the server stops its
    /// sandboxes ([`Store::blocks_to_enforce`]). False if it already was.
    pub fn block_tenant(
        &self,
        name: &str,
        reason: &str,
        now: SystemTime,
    ) -> Result<bool, StoreError> {
        let conn = self.conn();
        conn.execute(
            "INSERT OR IGNORE INTO tenants (name, created_at) VALUES (?1, ?2)",
            params![name, to_nanos(now)],
        )
        .map_err(q("block tenant"))?;
        let n = conn
            .execute(
                "UPDATE tenants SET blocked_at = ?2, block_reason = ?3, block_enforced_at = NULL
                 WHERE name = ?1 AND blocked_at IS NULL",
                params![name, to_nanos(now), reason],
            )
            .map_err(q("block tenant"))?;
        Ok(n > 0)
    }

    /// Lifts a block; false if the tenant was not blocked.
    pub fn unblock_tenant(&self, name: &str) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .execute(
                "UPDATE tenants SET blocked_at = NULL, block_reason = NULL,
                 block_enforced_at = NULL WHERE name = ?1 AND blocked_at IS NOT NULL",
                [name],
            )
            .map_err(q("unblock tenant"))?;
        Ok(n > 0)
    }

    /// Whether a tenant is blocked.
    pub fn tenant_blocked(&self, name: &str) -> Result<bool, StoreError> {
        self.conn()
            .query_row(
                "SELECT blocked_at IS NOT NULL FROM tenants WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()
            .map(|v| v.unwrap_or(false))
            .map_err(q("tenant blocked"))
    }

    /// Known tenants, by name.
    pub fn list_tenants(&self) -> Result<Vec<TenantRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT name, created_at, blocked_at, block_reason FROM tenants ORDER BY name")
            .map_err(q("list tenants"))?;
        stmt.query_map([], |r| {
            Ok(TenantRecord {
                name: r.get(0)?,
                created_at: from_nanos(r.get(1)?),
                blocked_at: r.get::<_, Option<i64>>(2)?.map(from_nanos),
                block_reason: r.get(3)?,
            })
        })
        .map_err(q("list tenants"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(q("list tenants"))
    }

    /// Blocked tenants whose block the server has not acted on yet, with the reason.
    pub fn blocks_to_enforce(&self) -> Result<Vec<(String, String)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT name, COALESCE(block_reason, '') FROM tenants
                 WHERE blocked_at IS NOT NULL AND block_enforced_at IS NULL",
            )
            .map_err(q("pending blocks"))?;
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(q("pending blocks"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(q("pending blocks"))
    }

    /// Notes that a block was acted on.
    pub fn block_enforced(&self, name: &str, now: SystemTime) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "UPDATE tenants SET block_enforced_at = ?2 WHERE name = ?1",
                params![name, to_nanos(now)],
            )
            .map_err(q("block enforced"))?;
        Ok(())
    }

    /// What a tenant holds now.
    pub fn tenant_usage(&self, tenant: &str) -> Result<TenantUsage, StoreError> {
        let conn = self.conn();
        let (sandboxes, running): (i64, i64) = conn
            .query_row(
                "SELECT COUNT(*), COALESCE(SUM(status = 'running'), 0) FROM sandboxes
                 WHERE tenant = ?1",
                [tenant],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(q("tenant usage"))?;
        let bytes: i64 = conn
            .query_row(
                "SELECT COALESCE(SUM(size), 0) FROM codebases WHERE tenant = ?1",
                [tenant],
                |r| r.get(0),
            )
            .map_err(q("tenant usage"))?;
        Ok(TenantUsage {
            sandboxes: sandboxes.max(0) as u64,
            running: running.max(0) as u64,
            codebase_bytes: bytes.max(0) as u64,
        })
    }

    /// Inserts a new sandbox within its owner's (`max_per_owner`), its tenant's
    /// (`max_per_tenant`) and the tenant's hourly creation (`per_hour`) limits, 0 meaning none,
    /// and counts the creation; inserts nothing when a limit is reached. Atomic: concurrent
    /// creates cannot slip past a limit together.
    pub fn insert_sandbox_limited(
        &self,
        s: &super::SandboxRecord,
        max_per_owner: u32,
        max_per_tenant: u32,
        per_hour: u32,
        now: SystemTime,
    ) -> Result<Result<(), LimitHit>, StoreError> {
        let hour_ago = to_nanos(now.checked_sub(Duration::from_secs(3600)).unwrap_or(now));
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(q("create sandbox"))?;
        tx.execute(
            "DELETE FROM sandbox_creations WHERE tenant = ?1 AND at <= ?2",
            params![s.tenant, hour_ago],
        )
        .map_err(q("create sandbox"))?;
        let recent: i64 = tx
            .query_row(
                "SELECT COUNT(*) FROM sandbox_creations WHERE tenant = ?1",
                [&s.tenant],
                |r| r.get(0),
            )
            .map_err(q("create sandbox"))?;
        if per_hour > 0 && recent >= i64::from(per_hour) {
            return Ok(Err(LimitHit::PerHour(recent.max(0) as u64)));
        }
        let count = |sql: &str, v: &str| -> Result<u64, StoreError> {
            tx.query_row(sql, [v], |r| r.get::<_, i64>(0))
                .map(|n| n.max(0) as u64)
                .map_err(q("create sandbox"))
        };
        let tenant_has = count(
            "SELECT COUNT(*) FROM sandboxes WHERE tenant = ?1",
            &s.tenant,
        )?;
        if max_per_tenant > 0 && tenant_has >= u64::from(max_per_tenant) {
            return Ok(Err(LimitHit::Tenant(tenant_has)));
        }
        let owner_has = count(
            "SELECT COUNT(*) FROM sandboxes WHERE owner_id = ?1",
            &s.owner_id,
        )?;
        if max_per_owner > 0 && owner_has >= u64::from(max_per_owner) {
            return Ok(Err(LimitHit::Owner(owner_has)));
        }
        super::insert_sandbox_row(&tx, s)?;
        tx.execute(
            "INSERT INTO sandbox_creations (tenant, at) VALUES (?1, ?2)",
            params![s.tenant, to_nanos(now)],
        )
        .map_err(q("create sandbox"))?;
        tx.commit().map_err(q("create sandbox"))?;
        Ok(Ok(()))
    }
}
