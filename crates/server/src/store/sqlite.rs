//! The embedded default backend: one SQLite file (WAL) under the data directory.
//!
//! The schema is versioned with `PRAGMA user_version`; [`MIGRATIONS`] is append-only (never
//! edit or remove a step). Migrations run in one exclusive transaction at open.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::auth::{KEY_COLS, RawKey};
use super::{
    Beat, LostNode, NODE_COLS, NODE_STATE_SQL, NodeRecord, REGISTER_NODE_SQL, RawNode,
    SANDBOX_FENCE_SQL, SANDBOX_SEQ, SERVER_LEASE, UPDATE_SANDBOX_SQL, fence, heartbeat_sql,
    holds_claim_sql, insert_session_sql, lease_sql, lost_node, lost_sql, no_session, refused_beat,
    stale_before, ttl_nanos,
};
use super::{
    CODEBASE_COLS, CodebaseRecord, KeyLookup, KeyRecord, LimitHit, Page, RawCodebase, RawSandbox,
    RawSession, SANDBOX_COLS, SESSION_COLS, SandboxFilter, SandboxRecord, SessionRecord, Store,
    StoreError, TenantRecord, TenantUsage, encode_sandbox, from_nanos, limit_hit, paginate, q,
    session_status_str, status_str, to_json, to_nanos,
};
use crate::ids::{CodebaseId, SandboxId, SessionId};

/// Ordered, append-only schema migrations; step `i` moves `user_version` from `i` to `i + 1`.
pub const MIGRATIONS: &[&str] = &[
    // 1: initial schema. `seq` gives a stable insertion order for pagination tokens.
    "CREATE TABLE codebases (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL,
        owner_id TEXT NOT NULL,
        size INTEGER NOT NULL DEFAULT 0,
        file_count INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    );
    CREATE INDEX codebases_by_owner ON codebases(owner_id, seq);
    CREATE TABLE sandboxes (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        codebase_id TEXT NOT NULL REFERENCES codebases(id),
        owner_id TEXT NOT NULL,
        rules TEXT NOT NULL,
        status TEXT NOT NULL,
        status_reason TEXT,
        labels TEXT NOT NULL,
        runtime TEXT NOT NULL,
        image TEXT NOT NULL,
        resources TEXT,
        created_at INTEGER NOT NULL,
        started_at INTEGER,
        stopped_at INTEGER,
        expires_at INTEGER
    );
    CREATE INDEX sandboxes_by_codebase ON sandboxes(codebase_id, seq);
    CREATE INDEX sandboxes_by_owner ON sandboxes(owner_id);
    CREATE TABLE sessions (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        sandbox_id TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
        shell TEXT NOT NULL,
        env TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        closed_at INTEGER
    );
    CREATE INDEX sessions_by_sandbox ON sessions(sandbox_id, seq);",
    // 2: tenants and API keys. Rows made before authentication existed belong to the
    // `default` tenant (the one every caller has while auth.enabled is false).
    "ALTER TABLE codebases ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default';
    CREATE INDEX codebases_by_tenant ON codebases(tenant, seq);
    ALTER TABLE sandboxes ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default';
    CREATE INDEX sandboxes_by_tenant ON sandboxes(tenant, seq);
    CREATE TABLE tenants (
        name TEXT PRIMARY KEY,
        created_at INTEGER NOT NULL,
        blocked_at INTEGER,
        block_reason TEXT,
        block_enforced_at INTEGER
    );
    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        scopes TEXT NOT NULL,
        hash BLOB NOT NULL,
        sandbox_id TEXT,
        parent_id TEXT,
        created_at INTEGER NOT NULL,
        expires_at INTEGER,
        last_used_at INTEGER,
        revoked_at INTEGER
    );
    CREATE INDEX api_keys_by_sandbox ON api_keys(sandbox_id);
    CREATE TABLE sandbox_creations (tenant TEXT NOT NULL, at INTEGER NOT NULL);
    CREATE INDEX sandbox_creations_by_tenant ON sandbox_creations(tenant, at);",
    // 3: leases, for work one process among those sharing the database does at a time.
    "CREATE TABLE leases (
        name TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        expires_at INTEGER NOT NULL
    );",
    // 4: nodes, and the node each sandbox lives on ('' for sandboxes made before nodes).
    "CREATE TABLE nodes (
        id TEXT PRIMARY KEY,
        boot_id TEXT NOT NULL,
        cpus INTEGER NOT NULL,
        memory_bytes INTEGER NOT NULL,
        draining BOOLEAN NOT NULL DEFAULT FALSE,
        registered_at INTEGER NOT NULL,
        heartbeat_at INTEGER NOT NULL
    );
    ALTER TABLE sandboxes ADD COLUMN node TEXT NOT NULL DEFAULT '';",
    // 5: a node's host name, shown beside its id (the data directory's instance id).
    "ALTER TABLE nodes ADD COLUMN host TEXT NOT NULL DEFAULT '';",
    // 6: lost nodes, and the sandboxes lost with them.
    "ALTER TABLE nodes ADD COLUMN lost_at INTEGER;
    ALTER TABLE sandboxes ADD COLUMN lost_at INTEGER;",
];

/// The database's clock in nanoseconds since the epoch, as SQL (the clock of the only host
/// that can open this file).
const NOW: &str = "CAST((julianday('now') - 2440587.5) * 86400000000000.0 AS INTEGER)";

/// The SQLite store: one connection behind a mutex (SQLite serialises writers anyway).
#[derive(Debug)]
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

/// Maps an error opening `path` to [`StoreError::Open`].
fn open_err(path: &Path) -> impl Fn(rusqlite::Error) -> StoreError + Copy + '_ {
    move |source| StoreError::Open {
        target: path.display().to_string(),
        source: Box::new(source),
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and migrates it.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let conn = Connection::open(path).map_err(open_err(path))?;
        SqliteStore::init(conn, path)
    }

    /// An in-memory database, for tests.
    pub fn open_in_memory() -> Result<SqliteStore, StoreError> {
        let path = Path::new(":memory:");
        let conn = Connection::open_in_memory().map_err(open_err(path))?;
        SqliteStore::init(conn, path)
    }

    fn init(mut conn: Connection, path: &Path) -> Result<SqliteStore, StoreError> {
        let open_err = open_err(path);
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(open_err)?;
        // WAL: readers never block the writer; synchronous=NORMAL is durable across process
        // crashes (kill -9), which is what we promise; a power cut may lose the last commit.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", true)
            .map_err(open_err)?;
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)
            .map_err(open_err)?;
        let version: i64 = tx
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(open_err)?;
        if version as usize > MIGRATIONS.len() || version < 0 {
            return Err(StoreError::TooNew {
                target: path.display().to_string(),
                found: version,
                known: MIGRATIONS.len(),
            });
        }
        for (i, step) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            tx.execute_batch(step)
                .and_then(|()| tx.pragma_update(None, "user_version", (i + 1) as i64))
                .map_err(|source| StoreError::Migrate {
                    version: i + 1,
                    source: Box::new(source),
                })?;
        }
        tx.commit().map_err(open_err)?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
        })
    }

    pub(crate) fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent (statements are
        // atomic), so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Store for SqliteStore {
    // ---- codebases ---------------------------------------------------------------------

    fn insert_codebase(&self, c: &CodebaseRecord) -> Result<(), StoreError> {
        self.conn()
            .execute(
                &format!("INSERT INTO codebases ({CODEBASE_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"),
                params![
                    c.id.as_str(),
                    c.name,
                    c.owner_id,
                    c.size,
                    c.file_count,
                    to_nanos(c.created_at),
                    to_nanos(c.updated_at),
                    c.tenant,
                ],
            )
            .map_err(q("insert codebase"))?;
        Ok(())
    }

    fn get_codebase(&self, id: &CodebaseId) -> Result<Option<CodebaseRecord>, StoreError> {
        self.conn()
            .query_row(
                &format!("SELECT {CODEBASE_COLS} FROM codebases WHERE id = ?1"),
                [id.as_str()],
                codebase_row,
            )
            .optional()
            .map_err(q("get codebase"))?
            .map(RawCodebase::decode)
            .transpose()
    }

    fn list_codebases(
        &self,
        tenant: Option<&str>,
        owner: Option<&str>,
        after: i64,
        limit: usize,
    ) -> Result<Page<CodebaseRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {CODEBASE_COLS}, seq FROM codebases WHERE seq > ?1
                 AND (?2 IS NULL OR owner_id = ?2) AND (?4 IS NULL OR tenant = ?4)
                 ORDER BY seq LIMIT ?3"
            ))
            .map_err(q("list codebases"))?;
        let rows = stmt
            .query_map(params![after, owner, (limit + 1) as i64, tenant], |r| {
                Ok((codebase_row(r)?, r.get::<_, i64>(8)?))
            })
            .map_err(q("list codebases"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(q("list codebases"))?;
        paginate(rows, limit, RawCodebase::decode)
    }

    fn adjust_codebase_stats(
        &self,
        id: &CodebaseId,
        size_delta: i64,
        count_delta: i64,
        now: SystemTime,
    ) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "UPDATE codebases SET size = MAX(0, size + ?2), file_count = MAX(0, file_count + ?3),
                 updated_at = ?4 WHERE id = ?1",
                params![id.as_str(), size_delta, count_delta, to_nanos(now)],
            )
            .map_err(q("update codebase stats"))?;
        Ok(())
    }

    fn delete_codebase(&self, id: &CodebaseId) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .execute("DELETE FROM codebases WHERE id = ?1", [id.as_str()])
            .map_err(q("delete codebase"))?;
        Ok(n > 0)
    }

    // ---- sandboxes ---------------------------------------------------------------------

    fn insert_sandbox(&self, s: &SandboxRecord) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(q("insert sandbox"))?;
        insert_sandbox_row(&tx, s)?;
        tx.commit().map_err(q("insert sandbox"))
    }

    fn update_sandbox(&self, s: &SandboxRecord) -> Result<(), StoreError> {
        let op = "update sandbox";
        let conn = self.conn();
        let n = conn
            .execute(
                UPDATE_SANDBOX_SQL,
                params![
                    status_str(s.status),
                    s.status_reason,
                    s.started_at.map(to_nanos),
                    s.stopped_at.map(to_nanos),
                    s.expires_at.map(to_nanos),
                    s.id.as_str(),
                    s.node,
                ],
            )
            .map_err(q(op))?;
        if n > 0 {
            return Ok(());
        }
        let row = conn
            .query_row(SANDBOX_FENCE_SQL, [s.id.as_str()], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()
            .map_err(q(op))?;
        fence(s, row)
    }

    fn update_labels(
        &self,
        id: &SandboxId,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), StoreError> {
        let encoded = to_json("sandbox labels", id.as_str(), labels)?;
        self.conn()
            .execute(
                "UPDATE sandboxes SET labels = ?2 WHERE id = ?1",
                params![id.as_str(), encoded],
            )
            .map_err(q("update labels"))?;
        Ok(())
    }

    fn get_sandbox(&self, id: &SandboxId) -> Result<Option<SandboxRecord>, StoreError> {
        let conn = self.conn();
        let sql = format!("SELECT {SANDBOX_COLS} FROM sandboxes WHERE id = ?1");
        let raw = conn
            .query_row(&sql, [id.as_str()], sandbox_row)
            .optional()
            .map_err(q("get sandbox"))?;
        raw.map(RawSandbox::decode).transpose()
    }

    fn list_sandboxes(
        &self,
        filter: SandboxFilter<'_>,
        after: i64,
        limit: usize,
    ) -> Result<Page<SandboxRecord>, StoreError> {
        let conn = self.conn();
        let sql = format!(
            "SELECT {SANDBOX_COLS}, seq FROM sandboxes WHERE seq > ?1
             AND (?2 IS NULL OR codebase_id = ?2) AND (?4 IS NULL OR tenant = ?4)
             AND (?5 IS NULL OR id = ?5) ORDER BY seq LIMIT ?3"
        );
        let mut stmt = conn.prepare_cached(&sql).map_err(q("list sandboxes"))?;
        let rows = stmt
            .query_map(
                params![
                    after,
                    filter.codebase.map(|c| c.as_str()),
                    (limit + 1) as i64,
                    filter.tenant,
                    filter.id.map(|c| c.as_str()),
                ],
                |r| Ok((sandbox_row(r)?, r.get::<_, i64>(SANDBOX_SEQ)?)),
            )
            .map_err(q("list sandboxes"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(q("list sandboxes"))?;
        paginate(rows, limit, RawSandbox::decode)
    }

    fn count_sandboxes_by_status(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT status, COUNT(*) FROM sandboxes GROUP BY status")
            .map_err(q("count sandboxes by status"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
            })
            .map_err(q("count sandboxes by status"))?;
        rows.collect::<Result<_, _>>()
            .map_err(q("count sandboxes by status"))
    }

    fn count_sandboxes_of_owner(&self, owner: &str) -> Result<u64, StoreError> {
        self.conn()
            .query_row(
                "SELECT COUNT(*) FROM sandboxes WHERE owner_id = ?1",
                [owner],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
            .map_err(q("count sandboxes"))
    }

    fn sandboxes_of_codebase(&self, id: &CodebaseId) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached("SELECT id FROM sandboxes WHERE codebase_id = ?1 ORDER BY seq")
            .map_err(q("sandboxes of codebase"))?;
        stmt.query_map([id.as_str()], |r| r.get(0))
            .map_err(q("sandboxes of codebase"))?
            .collect::<Result<Vec<String>, _>>()
            .map_err(q("sandboxes of codebase"))
    }

    fn delete_sandbox(&self, id: &SandboxId) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .execute("DELETE FROM sandboxes WHERE id = ?1", [id.as_str()])
            .map_err(q("delete sandbox"))?;
        Ok(n > 0)
    }

    // ---- sessions ----------------------------------------------------------------------

    fn insert_session(&self, s: &SessionRecord) -> Result<(), StoreError> {
        let env = to_json("session env", s.id.as_str(), &s.env)?;
        let n = self
            .conn()
            .execute(
                &insert_session_sql(""),
                params![
                    s.id.as_str(),
                    s.sandbox_id.as_str(),
                    s.shell,
                    env,
                    session_status_str(s.status),
                    to_nanos(s.created_at),
                    s.closed_at.map(to_nanos)
                ],
            )
            .map_err(q("insert session"))?;
        if n == 0 {
            return Err(no_session(s));
        }
        Ok(())
    }

    fn close_session(&self, id: &SessionId, when: SystemTime) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "UPDATE sessions SET status = 'closed', closed_at = COALESCE(closed_at, ?2)
                 WHERE id = ?1",
                params![id.as_str(), to_nanos(when)],
            )
            .map_err(q("close session"))?;
        Ok(())
    }

    fn close_sessions_of(&self, sandbox: &SandboxId, when: SystemTime) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "UPDATE sessions SET status = 'closed', closed_at = COALESCE(closed_at, ?2)
                 WHERE sandbox_id = ?1",
                params![sandbox.as_str(), to_nanos(when)],
            )
            .map_err(q("close sessions"))?;
        Ok(())
    }

    fn delete_session(&self, id: &SessionId) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .execute("DELETE FROM sessions WHERE id = ?1", [id.as_str()])
            .map_err(q("delete session"))?;
        Ok(n > 0)
    }

    fn get_session(&self, id: &SessionId) -> Result<Option<SessionRecord>, StoreError> {
        let conn = self.conn();
        conn.query_row(
            &format!("SELECT {SESSION_COLS} FROM sessions WHERE id = ?1"),
            [id.as_str()],
            session_row,
        )
        .optional()
        .map_err(q("get session"))?
        .map(RawSession::decode)
        .transpose()
    }

    fn sessions_open_since(
        &self,
        before: SystemTime,
    ) -> Result<Vec<(String, String, String, SystemTime)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT s.id, s.sandbox_id, sb.tenant, s.created_at FROM sessions s
                 JOIN sandboxes sb ON sb.id = s.sandbox_id
                 WHERE s.status = 'active' AND s.created_at < ?1 ORDER BY s.seq",
            )
            .map_err(q("list old sessions"))?;
        stmt.query_map([to_nanos(before)], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })
        .map_err(q("list old sessions"))?
        .map(|row| row.map(|(id, sb, tenant, at)| (id, sb, tenant, from_nanos(at))))
        .collect::<Result<Vec<_>, _>>()
        .map_err(q("list old sessions"))
    }

    fn list_sessions(&self, sandbox: &SandboxId) -> Result<Vec<SessionRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {SESSION_COLS} FROM sessions WHERE sandbox_id = ?1 ORDER BY seq"
            ))
            .map_err(q("list sessions"))?;
        let rows = stmt
            .query_map([sandbox.as_str()], session_row)
            .map_err(q("list sessions"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(q("list sessions"))?;
        rows.into_iter().map(RawSession::decode).collect()
    }

    // ---- keys and tenants --------------------------------------------------------------

    fn insert_key(&self, k: &KeyRecord, hash: &[u8]) -> Result<(), StoreError> {
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

    fn key(&self, id: &str, now: SystemTime) -> Result<Option<KeyLookup>, StoreError> {
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

    fn key_ids(&self) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached("SELECT id FROM api_keys")
            .map_err(q("key ids"))?;
        stmt.query_map([], |r| r.get(0))
            .map_err(q("key ids"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(q("key ids"))
    }

    fn count_tokens_of(&self, sandbox_id: &str) -> Result<u64, StoreError> {
        self.conn()
            .query_row(
                "SELECT COUNT(*) FROM api_keys WHERE sandbox_id = ?1",
                [sandbox_id],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n.max(0) as u64)
            .map_err(q("count tokens"))
    }

    fn running_of_blocked(&self) -> Result<Vec<(String, String)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT s.id, s.tenant FROM sandboxes s JOIN tenants t ON t.name = s.tenant
                 WHERE t.blocked_at IS NOT NULL AND s.status = 'running' ORDER BY s.seq",
            )
            .map_err(q("running of blocked"))?;
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(q("running of blocked"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(q("running of blocked"))
    }

    fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
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

    fn revoke_key(&self, id: &str, now: SystemTime) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .execute(
                "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?2) WHERE id = ?1",
                params![id, to_nanos(now)],
            )
            .map_err(q("revoke key"))?;
        Ok(n > 0)
    }

    fn touch_key(&self, id: &str, now: SystemTime) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "UPDATE api_keys SET last_used_at = ?2 WHERE id = ?1",
                params![id, to_nanos(now)],
            )
            .map_err(q("touch key"))?;
        Ok(())
    }

    fn delete_tokens_of(&self, sandbox_id: &str) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM api_keys WHERE sandbox_id = ?1", [sandbox_id])
            .map_err(q("delete sandbox tokens"))?;
        Ok(())
    }

    fn block_tenant(&self, name: &str, reason: &str, now: SystemTime) -> Result<bool, StoreError> {
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

    fn unblock_tenant(&self, name: &str) -> Result<bool, StoreError> {
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

    fn tenant_blocked(&self, name: &str) -> Result<bool, StoreError> {
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

    fn list_tenants(&self) -> Result<Vec<TenantRecord>, StoreError> {
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

    fn blocks_to_enforce(&self) -> Result<Vec<(String, String)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT name, COALESCE(block_reason, '') FROM tenants
                 WHERE blocked_at IS NOT NULL AND block_enforced_at IS NULL ORDER BY name",
            )
            .map_err(q("pending blocks"))?;
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(q("pending blocks"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(q("pending blocks"))
    }

    fn block_enforced(&self, name: &str, now: SystemTime) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "UPDATE tenants SET block_enforced_at = ?2 WHERE name = ?1",
                params![name, to_nanos(now)],
            )
            .map_err(q("block enforced"))?;
        Ok(())
    }

    fn tenant_usage(&self, tenant: &str) -> Result<TenantUsage, StoreError> {
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

    fn insert_sandbox_limited(
        &self,
        s: &SandboxRecord,
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
        let count = |sql: &str, v: &str| -> Result<u64, StoreError> {
            tx.query_row(sql, [v], |r| r.get::<_, i64>(0))
                .map(|n| n.max(0) as u64)
                .map_err(q("create sandbox"))
        };
        let limits = (max_per_owner, max_per_tenant, per_hour);
        if let Some(hit) = limit_hit(s, limits, count)? {
            return Ok(Err(hit));
        }
        insert_sandbox_row(&tx, s)?;
        tx.execute(
            "INSERT INTO sandbox_creations (tenant, at) VALUES (?1, ?2)",
            params![s.tenant, to_nanos(now)],
        )
        .map_err(q("create sandbox"))?;
        tx.commit().map_err(q("create sandbox"))?;
        Ok(Ok(()))
    }

    // ---- nodes -------------------------------------------------------------------------

    fn register_node(&self, n: &NodeRecord) -> Result<(), StoreError> {
        self.conn()
            .execute(
                REGISTER_NODE_SQL,
                params![
                    n.id,
                    n.boot_id,
                    i64::from(n.cpus),
                    i64::try_from(n.memory_bytes).unwrap_or(i64::MAX),
                    to_nanos(n.registered_at),
                    n.host
                ],
            )
            .map_err(q("register node"))?;
        Ok(())
    }

    fn heartbeat_node(&self, id: &str, boot_id: &str) -> Result<Beat, StoreError> {
        let op = "node heartbeat";
        let conn = self.conn();
        let n = conn
            .execute(&heartbeat_sql(NOW), params![id, boot_id])
            .map_err(q(op))?;
        if n > 0 {
            return Ok(Beat::Alive);
        }
        let row = conn
            .query_row(NODE_STATE_SQL, [id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
            .map_err(q(op))?;
        Ok(refused_beat(row, boot_id))
    }

    fn mark_lost_nodes(
        &self,
        lost_after: Duration,
        keeper: &str,
        holder: &str,
    ) -> Result<Vec<LostNode>, StoreError> {
        let op = "mark lost nodes";
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(q(op))?;
        let now: i64 = tx
            .query_row(&format!("SELECT {NOW}"), [], |r| r.get(0))
            .map_err(q(op))?;
        let held = tx
            .query_row(lost_sql::HELD, params![SERVER_LEASE, holder, now], |_| {
                Ok(())
            })
            .optional()
            .map_err(q(op))?;
        if held.is_none() {
            return Ok(Vec::new());
        }
        let stale: Vec<(String, String, i64)> = {
            let mut stmt = tx.prepare(lost_sql::STALE).map_err(q(op))?;
            stmt.query_map(params![keeper, stale_before(now, lost_after)], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .map_err(q(op))?
            .collect::<Result<_, _>>()
            .map_err(q(op))?
        };
        let mut lost = Vec::new();
        for node in stale {
            let (id, host, beat) = (&node.0, &node.1, node.2);
            tx.execute(lost_sql::MARK, params![now, id])
                .map_err(q(op))?;
            let moved: Vec<String> = tx
                .prepare(lost_sql::MOVE)
                .map_err(q(op))?
                .query_map(params![keeper, id], |r| r.get(0))
                .map_err(q(op))?
                .collect::<Result<_, _>>()
                .map_err(q(op))?;
            let reason = super::lost_reason(id, host, from_nanos(beat));
            let sandboxes: Vec<(String, String)> = tx
                .prepare(lost_sql::LOSE)
                .map_err(q(op))?
                .query_map(params![reason, now, id], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(q(op))?
                .collect::<Result<_, _>>()
                .map_err(q(op))?;
            tx.execute(lost_sql::CLOSE_SESSIONS, params![now, id])
                .map_err(q(op))?;
            lost.push(lost_node(node, now, moved, sandboxes)?);
        }
        tx.commit().map_err(q(op))?;
        Ok(lost)
    }

    fn holds_claim(&self, name: &str, holder: &str, node: &str) -> Result<bool, StoreError> {
        let (held, lost): (i64, i64) = self
            .conn()
            .query_row(&holds_claim_sql(NOW), params![name, holder, node], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .map_err(q("check claim"))?;
        Ok(held > 0 && lost == 0)
    }

    fn get_node(&self, id: &str) -> Result<Option<NodeRecord>, StoreError> {
        self.conn()
            .query_row(
                &format!("SELECT {NODE_COLS} FROM nodes WHERE id = ?1"),
                [id],
                node_row,
            )
            .optional()
            .map_err(q("get node"))
            .map(|n| n.map(RawNode::decode))
    }

    fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!("SELECT {NODE_COLS} FROM nodes ORDER BY id"))
            .map_err(q("list nodes"))?;
        stmt.query_map([], node_row)
            .map_err(q("list nodes"))?
            .map(|r| r.map(RawNode::decode))
            .collect::<Result<Vec<_>, _>>()
            .map_err(q("list nodes"))
    }

    fn remove_lost_node(&self, id: &str) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .execute(
                "DELETE FROM nodes WHERE id = ?1 AND lost_at IS NOT NULL",
                [id],
            )
            .map_err(q("remove node"))?;
        Ok(n > 0)
    }

    fn set_node_draining(&self, id: &str, draining: bool) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .execute(
                "UPDATE nodes SET draining = ?2 WHERE id = ?1",
                params![id, draining],
            )
            .map_err(q("drain node"))?;
        Ok(n > 0)
    }

    fn set_sandbox_node(&self, id: &SandboxId, node: &str) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "UPDATE sandboxes SET node = ?2 WHERE id = ?1 AND lost_at IS NULL",
                params![id.as_str(), node],
            )
            .map_err(q("set sandbox node"))?;
        Ok(())
    }

    // ---- leases ------------------------------------------------------------------------

    fn try_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, StoreError> {
        let sql = lease_sql(NOW);
        let n = self
            .conn()
            .execute(&sql, params![name, holder, ttl_nanos(ttl)])
            .map_err(q("take lease"))?;
        Ok(n > 0)
    }

    fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "DELETE FROM leases WHERE name = ?1 AND holder = ?2",
                params![name, holder],
            )
            .map_err(q("release lease"))?;
        Ok(())
    }
}

fn codebase_row(r: &Row<'_>) -> rusqlite::Result<RawCodebase> {
    Ok(RawCodebase {
        id: r.get(0)?,
        name: r.get(1)?,
        owner_id: r.get(2)?,
        size: r.get(3)?,
        file_count: r.get(4)?,
        created_at: r.get(5)?,
        updated_at: r.get(6)?,
        tenant: r.get(7)?,
    })
}

fn sandbox_row(r: &Row<'_>) -> rusqlite::Result<RawSandbox> {
    Ok(RawSandbox {
        id: r.get(0)?,
        codebase_id: r.get(1)?,
        owner_id: r.get(2)?,
        rules: r.get(3)?,
        status: r.get(4)?,
        status_reason: r.get(5)?,
        labels: r.get(6)?,
        runtime: r.get(7)?,
        image: r.get(8)?,
        resources: r.get(9)?,
        created_at: r.get(10)?,
        started_at: r.get(11)?,
        stopped_at: r.get(12)?,
        expires_at: r.get(13)?,
        tenant: r.get(14)?,
        node: r.get(15)?,
        lost_at: r.get(16)?,
    })
}

fn node_row(r: &Row<'_>) -> rusqlite::Result<RawNode> {
    Ok(RawNode {
        id: r.get(0)?,
        boot_id: r.get(1)?,
        cpus: r.get(2)?,
        memory_bytes: r.get(3)?,
        draining: r.get(4)?,
        registered_at: r.get(5)?,
        heartbeat_at: r.get(6)?,
        host: r.get(7)?,
        lost_at: r.get(8)?,
    })
}

fn session_row(r: &Row<'_>) -> rusqlite::Result<RawSession> {
    Ok(RawSession {
        id: r.get(0)?,
        sandbox_id: r.get(1)?,
        shell: r.get(2)?,
        env: r.get(3)?,
        status: r.get(4)?,
        created_at: r.get(5)?,
        closed_at: r.get(6)?,
    })
}

fn key_row(r: &Row<'_>) -> rusqlite::Result<KeyRecord> {
    Ok(RawKey {
        id: r.get(0)?,
        tenant: r.get(1)?,
        scopes: r.get(2)?,
        sandbox_id: r.get(3)?,
        created_at: r.get(4)?,
        expires_at: r.get(5)?,
        last_used_at: r.get(6)?,
        revoked_at: r.get(7)?,
        parent_id: r.get(8)?,
    }
    .decode())
}

/// Inserts a sandbox row (inside a caller's transaction).
fn insert_sandbox_row(tx: &rusqlite::Transaction<'_>, s: &SandboxRecord) -> Result<(), StoreError> {
    let (rules, labels, resources) = encode_sandbox(s)?;
    tx.execute(
        &format!(
            "INSERT INTO sandboxes ({SANDBOX_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9,
             ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)"
        ),
        params![
            s.id.as_str(),
            s.codebase_id.as_str(),
            s.owner_id,
            rules,
            status_str(s.status),
            s.status_reason,
            labels,
            s.runtime.as_str(),
            s.image,
            resources,
            to_nanos(s.created_at),
            s.started_at.map(to_nanos),
            s.stopped_at.map(to_nanos),
            s.expires_at.map(to_nanos),
            s.tenant,
            s.node,
            s.lost_at.map(to_nanos),
        ],
    )
    .map_err(q("insert sandbox"))?;
    Ok(())
}
