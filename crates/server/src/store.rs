//! Durable metadata in SQLite: codebases, sandboxes (rules, labels, limits, status,
//! timestamps) and sessions.
//!
//! The schema is versioned with `PRAGMA user_version`; [`MIGRATIONS`] is append-only (never
//! edit or remove a step). Migrations run in one exclusive transaction at open. SQLite calls
//! block: async callers go through `spawn_blocking`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agentfense_core::{PermissionRule, ResourceLimits, RuntimeKind, SandboxStatus, SessionStatus};
use rusqlite::{Connection, OptionalExtension, Row, params};

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
];

/// A metadata operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened or created.
    #[error("cannot open metadata database {path}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rusqlite::Error,
    },
    /// The database's schema is newer than this binary knows.
    #[error(
        "metadata database {path} has schema version {found}; this server knows up to {known}: upgrade the server"
    )]
    TooNew {
        /// The database file.
        path: PathBuf,
        /// Its version.
        found: i64,
        /// Ours.
        known: usize,
    },
    /// A migration step failed.
    #[error("migrating the metadata database to version {version} failed")]
    Migrate {
        /// The version being reached.
        version: usize,
        /// Why.
        #[source]
        source: rusqlite::Error,
    },
    /// A query failed.
    #[error("metadata query failed: {op}")]
    Query {
        /// What was being done.
        op: &'static str,
        /// Why.
        #[source]
        source: rusqlite::Error,
    },
    /// A stored value could not be decoded (corruption or a bug).
    #[error("stored {what} for {id} is corrupt: {detail}")]
    Corrupt {
        /// Which column.
        what: &'static str,
        /// Row id.
        id: String,
        /// Decoder message.
        detail: String,
    },
}

/// A codebase's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodebaseRecord {
    /// Its id.
    pub id: CodebaseId,
    /// Display name.
    pub name: String,
    /// Owner: the client's label (the tenant for non-admin callers when auth is on).
    pub owner_id: String,
    /// The tenant it belongs to (`default` while authentication is off).
    pub tenant: String,
    /// Sum of file sizes, bytes.
    pub size: i64,
    /// Number of files.
    pub file_count: i64,
    /// Creation time.
    pub created_at: SystemTime,
    /// Last content change.
    pub updated_at: SystemTime,
}

/// A sandbox's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxRecord {
    /// Its id.
    pub id: SandboxId,
    /// The codebase it works on.
    pub codebase_id: CodebaseId,
    /// The codebase's owner (quota accounting).
    pub owner_id: String,
    /// The tenant it belongs to (its codebase's).
    pub tenant: String,
    /// Access rules, in request order.
    pub rules: Vec<PermissionRule>,
    /// Lifecycle state.
    pub status: SandboxStatus,
    /// Why it is in ERROR or was stopped by the server, if it is.
    pub status_reason: Option<String>,
    /// User labels.
    pub labels: BTreeMap<String, String>,
    /// Runtime.
    pub runtime: RuntimeKind,
    /// Container image (docker), else empty.
    pub image: String,
    /// Effective resource limits.
    pub resources: ResourceLimits,
    /// Creation time.
    pub created_at: SystemTime,
    /// Last start.
    pub started_at: Option<SystemTime>,
    /// Last stop.
    pub stopped_at: Option<SystemTime>,
    /// When the reaper destroys it.
    pub expires_at: Option<SystemTime>,
}

/// A session's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// Its id.
    pub id: SessionId,
    /// Its sandbox.
    pub sandbox_id: SandboxId,
    /// Shell path.
    pub shell: String,
    /// Initial environment.
    pub env: BTreeMap<String, String>,
    /// State.
    pub status: SessionStatus,
    /// Creation time.
    pub created_at: SystemTime,
    /// When it closed.
    pub closed_at: Option<SystemTime>,
}

/// Which sandboxes a listing returns (every field narrows it; the default is all).
#[derive(Debug, Clone, Copy, Default)]
pub struct SandboxFilter<'a> {
    /// Only this codebase's.
    pub codebase: Option<&'a CodebaseId>,
    /// Only this tenant's.
    pub tenant: Option<&'a str>,
    /// Only this one.
    pub id: Option<&'a SandboxId>,
}

/// One page of a listing and the token for the next one (empty at the end).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    /// The items.
    pub items: Vec<T>,
    /// Opaque token for the next page; empty when there is none.
    pub next_token: String,
}

/// The metadata store.
#[derive(Debug)]
pub struct Store {
    conn: Mutex<Connection>,
}

fn to_nanos(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

fn from_nanos(n: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(n.max(0) as u64)
}

fn q(op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Query { op, source }
}

fn status_str(s: SandboxStatus) -> &'static str {
    match s {
        SandboxStatus::Pending => "pending",
        SandboxStatus::Running => "running",
        SandboxStatus::Stopped => "stopped",
        SandboxStatus::Error => "error",
    }
}

impl Store {
    /// Opens (creating if needed) the database at `path` and migrates it.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let open_err = |source| StoreError::Open {
            path: path.to_owned(),
            source,
        };
        let conn = Connection::open(path).map_err(open_err)?;
        Store::init(conn, path)
    }

    /// An in-memory database, for tests.
    pub fn open_in_memory() -> Result<Store, StoreError> {
        let conn = Connection::open_in_memory().map_err(|source| StoreError::Open {
            path: ":memory:".into(),
            source,
        })?;
        Store::init(conn, Path::new(":memory:"))
    }

    fn init(mut conn: Connection, path: &Path) -> Result<Store, StoreError> {
        let open_err = |source| StoreError::Open {
            path: path.to_owned(),
            source,
        };
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
                path: path.to_owned(),
                found: version,
                known: MIGRATIONS.len(),
            });
        }
        for (i, step) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            tx.execute_batch(step)
                .and_then(|()| tx.pragma_update(None, "user_version", (i + 1) as i64))
                .map_err(|source| StoreError::Migrate {
                    version: i + 1,
                    source,
                })?;
        }
        tx.commit().map_err(open_err)?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    pub(crate) fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent (statements are
        // atomic), so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    // ---- codebases ---------------------------------------------------------------------

    /// Inserts a new codebase.
    pub fn insert_codebase(&self, c: &CodebaseRecord) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "INSERT INTO codebases (id, name, owner_id, size, file_count, created_at, updated_at,
                 tenant) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
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

    fn codebase_row(r: &Row<'_>) -> rusqlite::Result<(String, CodebaseRecord)> {
        let id: String = r.get(0)?;
        Ok((
            id.clone(),
            CodebaseRecord {
                id: CodebaseId::parse(&id).unwrap_or_else(|_| CodebaseId::generate()),
                name: r.get(1)?,
                owner_id: r.get(2)?,
                size: r.get(3)?,
                file_count: r.get(4)?,
                created_at: from_nanos(r.get(5)?),
                updated_at: from_nanos(r.get(6)?),
                tenant: r.get(7)?,
            },
        ))
    }

    fn check_codebase(pair: (String, CodebaseRecord)) -> Result<CodebaseRecord, StoreError> {
        if pair.0 == pair.1.id.as_str() {
            Ok(pair.1)
        } else {
            Err(StoreError::Corrupt {
                what: "codebase id",
                id: pair.0,
                detail: "not of the form cb_<16 hex>".into(),
            })
        }
    }

    /// The codebase with this id.
    pub fn get_codebase(&self, id: &CodebaseId) -> Result<Option<CodebaseRecord>, StoreError> {
        self.conn()
            .query_row(
                "SELECT id, name, owner_id, size, file_count, created_at, updated_at, tenant
                 FROM codebases WHERE id = ?1",
                [id.as_str()],
                Store::codebase_row,
            )
            .optional()
            .map_err(q("get codebase"))?
            .map(Store::check_codebase)
            .transpose()
    }

    /// Codebases in creation order, optionally of one tenant and one owner; `after` is a
    /// page token.
    pub fn list_codebases(
        &self,
        tenant: Option<&str>,
        owner: Option<&str>,
        after: i64,
        limit: usize,
    ) -> Result<Page<CodebaseRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT id, name, owner_id, size, file_count, created_at, updated_at, tenant, seq
                 FROM codebases WHERE seq > ?1 AND (?2 IS NULL OR owner_id = ?2)
                 AND (?4 IS NULL OR tenant = ?4)
                 ORDER BY seq LIMIT ?3",
            )
            .map_err(q("list codebases"))?;
        let rows = stmt
            .query_map(params![after, owner, (limit + 1) as i64, tenant], |r| {
                Ok((Store::codebase_row(r)?, r.get::<_, i64>(8)?))
            })
            .map_err(q("list codebases"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(q("list codebases"))?;
        paginate(rows, limit, Store::check_codebase)
    }

    /// Adds deltas to a codebase's size and file count and sets `updated_at`.
    pub fn adjust_codebase_stats(
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

    /// Deletes a codebase row; false if there was none.
    pub fn delete_codebase(&self, id: &CodebaseId) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .execute("DELETE FROM codebases WHERE id = ?1", [id.as_str()])
            .map_err(q("delete codebase"))?;
        Ok(n > 0)
    }

    // ---- sandboxes ---------------------------------------------------------------------

    /// Inserts a new sandbox (no limits: see [`Store::insert_sandbox_limited`]).
    pub fn insert_sandbox(&self, s: &SandboxRecord) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(q("insert sandbox"))?;
        insert_sandbox_row(&tx, s)?;
        tx.commit().map_err(q("insert sandbox"))
    }

    /// Writes every mutable field of a sandbox (status, reason, timestamps, expiry).
    pub fn update_sandbox(&self, s: &SandboxRecord) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "UPDATE sandboxes SET status = ?2, status_reason = ?3, started_at = ?4,
                 stopped_at = ?5, expires_at = ?6 WHERE id = ?1",
                params![
                    s.id.as_str(),
                    status_str(s.status),
                    s.status_reason,
                    s.started_at.map(to_nanos),
                    s.stopped_at.map(to_nanos),
                    s.expires_at.map(to_nanos),
                ],
            )
            .map_err(q("update sandbox"))?;
        Ok(())
    }

    /// Replaces a sandbox's labels.
    pub fn update_labels(
        &self,
        id: &SandboxId,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), StoreError> {
        let encoded = serde_json::to_string(labels).map_err(|e| StoreError::Corrupt {
            what: "sandbox labels",
            id: id.to_string(),
            detail: e.to_string(),
        })?;
        self.conn()
            .execute(
                "UPDATE sandboxes SET labels = ?2 WHERE id = ?1",
                params![id.as_str(), encoded],
            )
            .map_err(q("update labels"))?;
        Ok(())
    }

    const SANDBOX_COLS: &'static str = "id, codebase_id, owner_id, rules, status, status_reason, labels, runtime, image, resources, created_at, started_at, stopped_at, expires_at, seq, tenant";

    /// The sandbox with this id.
    pub fn get_sandbox(&self, id: &SandboxId) -> Result<Option<SandboxRecord>, StoreError> {
        let conn = self.conn();
        let sql = format!(
            "SELECT {} FROM sandboxes WHERE id = ?1",
            Store::SANDBOX_COLS
        );
        let raw = conn
            .query_row(&sql, [id.as_str()], RawSandbox::from_row)
            .optional()
            .map_err(q("get sandbox"))?;
        raw.map(RawSandbox::decode).transpose()
    }

    /// Sandboxes in creation order, optionally of one codebase, one tenant, or just one.
    pub fn list_sandboxes(
        &self,
        filter: SandboxFilter<'_>,
        after: i64,
        limit: usize,
    ) -> Result<Page<SandboxRecord>, StoreError> {
        let conn = self.conn();
        let sql = format!(
            "SELECT {} FROM sandboxes WHERE seq > ?1 AND (?2 IS NULL OR codebase_id = ?2)
             AND (?4 IS NULL OR tenant = ?4) AND (?5 IS NULL OR id = ?5)
             ORDER BY seq LIMIT ?3",
            Store::SANDBOX_COLS
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
                |r| Ok((RawSandbox::from_row(r)?, r.get::<_, i64>(14)?)),
            )
            .map_err(q("list sandboxes"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(q("list sandboxes"))?;
        paginate(rows, limit, RawSandbox::decode)
    }

    /// Every sandbox (for startup recovery and the reaper).
    pub fn all_sandboxes(&self) -> Result<Vec<SandboxRecord>, StoreError> {
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let conn = self.conn();
            let sql = format!(
                "SELECT {} FROM sandboxes WHERE seq > ?1 ORDER BY seq LIMIT 500",
                Store::SANDBOX_COLS
            );
            let mut stmt = conn.prepare_cached(&sql).map_err(q("list sandboxes"))?;
            let rows = stmt
                .query_map([after], |r| {
                    Ok((RawSandbox::from_row(r)?, r.get::<_, i64>(14)?))
                })
                .map_err(q("list sandboxes"))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(q("list sandboxes"))?;
            let Some(last) = rows.last().map(|r| r.1) else {
                break;
            };
            after = last;
            for (raw, _) in rows {
                out.push(raw.decode()?);
            }
        }
        Ok(out)
    }

    /// Number of sandboxes in each status (`pending`, `running`, `stopped`, `error`).
    pub fn count_sandboxes_by_status(&self) -> Result<Vec<(String, u64)>, StoreError> {
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

    /// Number of sandboxes whose codebase belongs to `owner`.
    pub fn count_sandboxes_of_owner(&self, owner: &str) -> Result<u64, StoreError> {
        self.conn()
            .query_row(
                "SELECT COUNT(*) FROM sandboxes WHERE owner_id = ?1",
                [owner],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
            .map_err(q("count sandboxes"))
    }

    /// Ids of the sandboxes on a codebase.
    pub fn sandboxes_of_codebase(&self, id: &CodebaseId) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached("SELECT id FROM sandboxes WHERE codebase_id = ?1 ORDER BY seq")
            .map_err(q("sandboxes of codebase"))?;
        stmt.query_map([id.as_str()], |r| r.get(0))
            .map_err(q("sandboxes of codebase"))?
            .collect::<Result<Vec<String>, _>>()
            .map_err(q("sandboxes of codebase"))
    }

    /// Deletes a sandbox and its sessions; false if there was none.
    pub fn delete_sandbox(&self, id: &SandboxId) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .execute("DELETE FROM sandboxes WHERE id = ?1", [id.as_str()])
            .map_err(q("delete sandbox"))?;
        Ok(n > 0)
    }

    // ---- sessions ----------------------------------------------------------------------

    /// Inserts a new session.
    pub fn insert_session(&self, s: &SessionRecord) -> Result<(), StoreError> {
        let env = serde_json::to_string(&s.env).map_err(|e| StoreError::Corrupt {
            what: "session env",
            id: s.id.to_string(),
            detail: e.to_string(),
        })?;
        self.conn()
            .execute(
                "INSERT INTO sessions (id, sandbox_id, shell, env, status, created_at, closed_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
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
        Ok(())
    }

    /// Marks a session closed at `when` (no-op if it already is).
    pub fn close_session(&self, id: &SessionId, when: SystemTime) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "UPDATE sessions SET status = 'closed', closed_at = COALESCE(closed_at, ?2)
                 WHERE id = ?1",
                params![id.as_str(), to_nanos(when)],
            )
            .map_err(q("close session"))?;
        Ok(())
    }

    /// Marks every active session of a sandbox closed (its shells are gone).
    pub fn close_sessions_of(
        &self,
        sandbox: &SandboxId,
        when: SystemTime,
    ) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "UPDATE sessions SET status = 'closed', closed_at = COALESCE(closed_at, ?2)
                 WHERE sandbox_id = ?1",
                params![sandbox.as_str(), to_nanos(when)],
            )
            .map_err(q("close sessions"))?;
        Ok(())
    }

    /// Deletes a session; false if there was none.
    pub fn delete_session(&self, id: &SessionId) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .execute("DELETE FROM sessions WHERE id = ?1", [id.as_str()])
            .map_err(q("delete session"))?;
        Ok(n > 0)
    }

    /// The session with this id.
    pub fn get_session(&self, id: &SessionId) -> Result<Option<SessionRecord>, StoreError> {
        let conn = self.conn();
        conn.query_row(
            "SELECT id, sandbox_id, shell, env, status, created_at, closed_at FROM sessions WHERE id = ?1",
            [id.as_str()],
            session_row,
        )
        .optional()
        .map_err(q("get session"))?
        .transpose()
    }

    /// Active sessions opened before `before`: (session, sandbox, tenant, created at).
    pub fn sessions_open_since(
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
        .map(|row| {
            row.map(|(id, sb, tenant, at)| {
                (
                    id,
                    sb,
                    tenant,
                    std::time::UNIX_EPOCH
                        + std::time::Duration::from_nanos(u64::try_from(at).unwrap_or(0)),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(q("list old sessions"))
    }

    /// Sessions of a sandbox, oldest first.
    pub fn list_sessions(&self, sandbox: &SandboxId) -> Result<Vec<SessionRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT id, sandbox_id, shell, env, status, created_at, closed_at FROM sessions
                 WHERE sandbox_id = ?1 ORDER BY seq",
            )
            .map_err(q("list sessions"))?;
        let rows = stmt
            .query_map([sandbox.as_str()], session_row)
            .map_err(q("list sessions"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(q("list sessions"))?;
        rows.into_iter().collect()
    }
}

fn session_status_str(s: SessionStatus) -> &'static str {
    match s {
        SessionStatus::Active => "active",
        SessionStatus::Closed => "closed",
    }
}

fn session_row(r: &Row<'_>) -> rusqlite::Result<Result<SessionRecord, StoreError>> {
    let id: String = r.get(0)?;
    let sandbox: String = r.get(1)?;
    let env: String = r.get(3)?;
    let status: String = r.get(4)?;
    let shell: String = r.get(2)?;
    let created: i64 = r.get(5)?;
    let closed: Option<i64> = r.get(6)?;
    let corrupt = |what: &'static str, detail: String| StoreError::Corrupt {
        what,
        id: id.clone(),
        detail,
    };
    Ok((|| {
        Ok(SessionRecord {
            id: SessionId::parse(&id).map_err(|e| corrupt("session id", e.to_string()))?,
            sandbox_id: SandboxId::parse(&sandbox)
                .map_err(|e| corrupt("session sandbox id", e.to_string()))?,
            shell,
            env: serde_json::from_str(&env).map_err(|e| corrupt("session env", e.to_string()))?,
            status: match status.as_str() {
                "active" => SessionStatus::Active,
                "closed" => SessionStatus::Closed,
                other => return Err(corrupt("session status", other.to_owned())),
            },
            created_at: from_nanos(created),
            closed_at: closed.map(from_nanos),
        })
    })())
}

fn paginate<R, T>(
    mut rows: Vec<(R, i64)>,
    limit: usize,
    decode: impl Fn(R) -> Result<T, StoreError>,
) -> Result<Page<T>, StoreError> {
    let next_token = if rows.len() > limit {
        rows.truncate(limit);
        rows.last().map(|r| r.1.to_string()).unwrap_or_default()
    } else {
        String::new()
    };
    let items = rows
        .into_iter()
        .map(|(r, _)| decode(r))
        .collect::<Result<_, _>>()?;
    Ok(Page { items, next_token })
}

type EncodedSandbox = (String, String, Option<String>);

fn encode_sandbox(s: &SandboxRecord) -> Result<EncodedSandbox, StoreError> {
    let err = |what: &'static str| {
        let id = s.id.to_string();
        move |e: serde_json::Error| StoreError::Corrupt {
            what,
            id,
            detail: e.to_string(),
        }
    };
    Ok((
        serde_json::to_string(&s.rules).map_err(err("sandbox rules"))?,
        serde_json::to_string(&s.labels).map_err(err("sandbox labels"))?,
        Some(serde_json::to_string(&s.resources).map_err(err("sandbox resources"))?),
    ))
}

struct RawSandbox {
    id: String,
    codebase_id: String,
    owner_id: String,
    rules: String,
    status: String,
    status_reason: Option<String>,
    labels: String,
    runtime: String,
    image: String,
    resources: Option<String>,
    created_at: i64,
    started_at: Option<i64>,
    stopped_at: Option<i64>,
    expires_at: Option<i64>,
    tenant: String,
}

impl RawSandbox {
    fn from_row(r: &Row<'_>) -> rusqlite::Result<RawSandbox> {
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
            tenant: r.get(15)?,
        })
    }

    fn decode(self) -> Result<SandboxRecord, StoreError> {
        let id = self.id.clone();
        let corrupt = |what: &'static str, detail: String| StoreError::Corrupt {
            what,
            id: id.clone(),
            detail,
        };
        Ok(SandboxRecord {
            id: SandboxId::parse(&self.id).map_err(|e| corrupt("sandbox id", e.to_string()))?,
            codebase_id: CodebaseId::parse(&self.codebase_id)
                .map_err(|e| corrupt("sandbox codebase id", e.to_string()))?,
            owner_id: self.owner_id,
            tenant: self.tenant,
            rules: serde_json::from_str(&self.rules)
                .map_err(|e| corrupt("sandbox rules", e.to_string()))?,
            status: match self.status.as_str() {
                "pending" => SandboxStatus::Pending,
                "running" => SandboxStatus::Running,
                "stopped" => SandboxStatus::Stopped,
                "error" => SandboxStatus::Error,
                other => return Err(corrupt("sandbox status", other.to_owned())),
            },
            status_reason: self.status_reason,
            labels: serde_json::from_str(&self.labels)
                .map_err(|e| corrupt("sandbox labels", e.to_string()))?,
            runtime: self
                .runtime
                .parse()
                .map_err(|e: String| corrupt("sandbox runtime", e))?,
            image: self.image,
            resources: match self.resources {
                Some(r) => serde_json::from_str(&r)
                    .map_err(|e| corrupt("sandbox resources", e.to_string()))?,
                None => ResourceLimits::default(),
            },
            created_at: from_nanos(self.created_at),
            started_at: self.started_at.map(from_nanos),
            stopped_at: self.stopped_at.map(from_nanos),
            expires_at: self.expires_at.map(from_nanos),
        })
    }
}

mod auth;
#[cfg(test)]
mod tests;

pub use auth::{KeyLookup, KeyRecord, LimitHit, TenantRecord, TenantUsage};

/// Inserts a sandbox row (inside a caller's transaction).
fn insert_sandbox_row(tx: &rusqlite::Transaction<'_>, s: &SandboxRecord) -> Result<(), StoreError> {
    let (rules, labels, resources) = encode_sandbox(s)?;
    tx.execute(
        "INSERT INTO sandboxes (id, codebase_id, owner_id, rules, status, status_reason,
         labels, runtime, image, resources, created_at, started_at, stopped_at, expires_at,
         tenant) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
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
        ],
    )
    .map_err(q("insert sandbox"))?;
    Ok(())
}
