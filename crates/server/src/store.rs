//! Durable metadata: codebases, sandboxes (rules, labels, limits, status, timestamps),
//! sessions, API keys and tenants, behind one [`Store`] trait with two backends: SQLite (the
//! embedded default, [`SqliteStore`]) and PostgreSQL (`storage.database_url`, [`PgStore`]).
//!
//! Both backends keep the same rows with the same meaning; `tests.rs` is one conformance
//! suite run against each. Each has its own append-only migration list. Store calls block:
//! async callers go through `spawn_blocking` (the PostgreSQL client must never be called on
//! an async worker thread).

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agentfense_core::{PermissionRule, ResourceLimits, RuntimeKind, SandboxStatus, SessionStatus};

use crate::config::Settings;
use crate::ids::{CodebaseId, SandboxId, SessionId};

mod auth;
mod postgres;
mod sqlite;
#[cfg(test)]
mod tests;

pub use auth::{KeyLookup, KeyRecord, LimitHit, TenantRecord, TenantUsage};
pub use postgres::{PgStore, check_url};
pub use sqlite::{MIGRATIONS, SqliteStore};

/// Why a backend call failed, as the backend reported it.
pub type BackendError = Box<dyn std::error::Error + Send + Sync>;

/// A metadata operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened, created or reached.
    #[error("cannot open metadata database {target}")]
    Open {
        /// The database file, or the URL without its password.
        target: String,
        /// Why.
        #[source]
        source: BackendError,
    },
    /// The database's schema is newer than this binary knows.
    #[error(
        "metadata database {target} has schema version {found}; this server knows up to {known}: upgrade the server"
    )]
    TooNew {
        /// The database file, or the URL without its password.
        target: String,
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
        source: BackendError,
    },
    /// A query failed.
    #[error("metadata query failed: {op}")]
    Query {
        /// What was being done.
        op: &'static str,
        /// Why.
        #[source]
        source: BackendError,
    },
    /// `storage.database_url` names a database this server cannot use.
    #[error("{0}")]
    BadUrl(String),
    /// A change to a sandbox was refused because its record moved on without this process:
    /// it was declared lost with its node, or placed on another node meanwhile. The writer
    /// is stale (a paused or partitioned server) and must not act on the sandbox.
    #[error("sandbox {id}: {why}")]
    Fenced {
        /// The sandbox.
        id: String,
        /// What happened to it.
        why: String,
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
    /// The node that holds its delta and runs it (empty: recorded before nodes existed).
    pub node: String,
    /// When it was declared lost with its node ([`Store::mark_lost_nodes`]): its changes
    /// were on that node and are gone; it can only be destroyed.
    pub lost_at: Option<SystemTime>,
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

/// A machine that runs sandboxes, as the store knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    /// Its id: the instance id of its data directory (stable when the host is renamed or the
    /// directory moves to another host; distinct for two directories on one host).
    pub id: String,
    /// Its host name when it last registered (for people).
    pub host: String,
    /// The kernel's boot id when it registered: a node that rebooted is a new boot.
    pub boot_id: String,
    /// CPUs it has.
    pub cpus: u32,
    /// Memory it has, bytes.
    pub memory_bytes: u64,
    /// New sandboxes are not placed on it (`agentfense nodes drain`).
    pub draining: bool,
    /// When its current boot registered.
    pub registered_at: SystemTime,
    /// Its last heartbeat, by the database's clock.
    pub heartbeat_at: SystemTime,
    /// When it was declared lost (no heartbeat for longer than `nodes.lost_after`); cleared
    /// when it registers again.
    pub lost_at: Option<SystemTime>,
}

/// What a node's heartbeat found ([`Store::heartbeat_node`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    /// Recorded: the node is alive.
    Alive,
    /// The store knows another boot of this node (or none): it must stop acting as it.
    Superseded,
    /// The node was declared lost at this time: its sandboxes are in ERROR, and it must
    /// stop what it still runs of them.
    Lost(SystemTime),
}

/// A node [`Store::mark_lost_nodes`] declared lost, and what that did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostNode {
    /// The node.
    pub id: String,
    /// Its host name.
    pub host: String,
    /// Its last heartbeat.
    pub heartbeat_at: SystemTime,
    /// When it was declared lost (the database's clock).
    pub lost_at: SystemTime,
    /// Its sandboxes now in ERROR, with their tenants.
    pub sandboxes: Vec<(SandboxId, String)>,
    /// Sandboxes that had never started there, moved to the keeper (nothing of them was lost).
    pub moved: Vec<SandboxId>,
}

/// Why a lost node's sandbox is in ERROR (its `status_reason`).
fn lost_reason(node: &str, host: &str, heartbeat_at: SystemTime) -> String {
    let host = if host.is_empty() {
        String::new()
    } else {
        format!(" on host {host}")
    };
    format!(
        "lost with its node {node}{host}, which sent no heartbeat after {}: changes not \
         published are gone with that node, published work is in the codebase; destroy this \
         sandbox and create a new one",
        humantime::format_rfc3339_seconds(heartbeat_at)
    )
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

/// The metadata store. Every method is one atomic change or one consistent read.
pub trait Store: Send + Sync + fmt::Debug {
    // ---- codebases ---------------------------------------------------------------------

    /// Inserts a new codebase.
    fn insert_codebase(&self, c: &CodebaseRecord) -> Result<(), StoreError>;
    /// The codebase with this id.
    fn get_codebase(&self, id: &CodebaseId) -> Result<Option<CodebaseRecord>, StoreError>;
    /// Codebases in creation order, optionally of one tenant and one owner; `after` is a
    /// page token.
    fn list_codebases(
        &self,
        tenant: Option<&str>,
        owner: Option<&str>,
        after: i64,
        limit: usize,
    ) -> Result<Page<CodebaseRecord>, StoreError>;
    /// Adds deltas to a codebase's size and file count (never below 0) and sets `updated_at`.
    fn adjust_codebase_stats(
        &self,
        id: &CodebaseId,
        size_delta: i64,
        count_delta: i64,
        now: SystemTime,
    ) -> Result<(), StoreError>;
    /// Deletes a codebase row; false if there was none. Fails while sandboxes use it.
    fn delete_codebase(&self, id: &CodebaseId) -> Result<bool, StoreError>;

    // ---- sandboxes ---------------------------------------------------------------------

    /// Inserts a new sandbox (no limits: see [`Store::insert_sandbox_limited`]).
    fn insert_sandbox(&self, s: &SandboxRecord) -> Result<(), StoreError>;
    /// Inserts a new sandbox within its owner's (`max_per_owner`), its tenant's
    /// (`max_per_tenant`) and the tenant's hourly creation (`per_hour`) limits, 0 meaning
    /// none, and counts the creation; inserts nothing when a limit is reached. Atomic:
    /// concurrent creates (from any process sharing the database) cannot slip past a limit
    /// together.
    fn insert_sandbox_limited(
        &self,
        s: &SandboxRecord,
        max_per_owner: u32,
        max_per_tenant: u32,
        per_hour: u32,
        now: SystemTime,
    ) -> Result<Result<(), LimitHit>, StoreError>;
    /// Writes every mutable field of a sandbox (status, reason, timestamps, expiry).
    fn update_sandbox(&self, s: &SandboxRecord) -> Result<(), StoreError>;
    /// Replaces a sandbox's labels.
    fn update_labels(
        &self,
        id: &SandboxId,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), StoreError>;
    /// The sandbox with this id.
    fn get_sandbox(&self, id: &SandboxId) -> Result<Option<SandboxRecord>, StoreError>;
    /// Sandboxes in creation order, optionally of one codebase, one tenant, or just one.
    fn list_sandboxes(
        &self,
        filter: SandboxFilter<'_>,
        after: i64,
        limit: usize,
    ) -> Result<Page<SandboxRecord>, StoreError>;
    /// Every sandbox (for startup recovery and the reaper), in creation order.
    fn all_sandboxes(&self) -> Result<Vec<SandboxRecord>, StoreError> {
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let page = self.list_sandboxes(SandboxFilter::default(), after, 500)?;
            out.extend(page.items);
            match page.next_token.parse() {
                Ok(next) => after = next,
                Err(_) => return Ok(out),
            }
        }
    }
    /// Number of sandboxes in each status (`pending`, `running`, `stopped`, `error`).
    fn count_sandboxes_by_status(&self) -> Result<Vec<(String, u64)>, StoreError>;
    /// Number of sandboxes whose codebase belongs to `owner`.
    fn count_sandboxes_of_owner(&self, owner: &str) -> Result<u64, StoreError>;
    /// Ids of the sandboxes on a codebase, oldest first.
    fn sandboxes_of_codebase(&self, id: &CodebaseId) -> Result<Vec<String>, StoreError>;
    /// Deletes a sandbox and its sessions; false if there was none.
    fn delete_sandbox(&self, id: &SandboxId) -> Result<bool, StoreError>;

    // ---- sessions ----------------------------------------------------------------------

    /// Inserts a new session.
    fn insert_session(&self, s: &SessionRecord) -> Result<(), StoreError>;
    /// Marks a session closed at `when` (keeps the first close time).
    fn close_session(&self, id: &SessionId, when: SystemTime) -> Result<(), StoreError>;
    /// Marks every session of a sandbox closed (its shells are gone).
    fn close_sessions_of(&self, sandbox: &SandboxId, when: SystemTime) -> Result<(), StoreError>;
    /// Deletes a session; false if there was none.
    fn delete_session(&self, id: &SessionId) -> Result<bool, StoreError>;
    /// The session with this id.
    fn get_session(&self, id: &SessionId) -> Result<Option<SessionRecord>, StoreError>;
    /// Active sessions opened before `before`: (session, sandbox, tenant, created at), oldest
    /// first.
    fn sessions_open_since(
        &self,
        before: SystemTime,
    ) -> Result<Vec<(String, String, String, SystemTime)>, StoreError>;
    /// Sessions of a sandbox, oldest first.
    fn list_sessions(&self, sandbox: &SandboxId) -> Result<Vec<SessionRecord>, StoreError>;

    // ---- keys and tenants --------------------------------------------------------------

    /// Stores a new key (and makes its tenant known).
    fn insert_key(&self, k: &KeyRecord, hash: &[u8]) -> Result<(), StoreError>;
    /// The key with this id, as of `now`: its record, stored hash, whether its tenant is
    /// blocked and whether the key that minted it (for tokens) still works.
    fn key(&self, id: &str, now: SystemTime) -> Result<Option<KeyLookup>, StoreError>;
    /// The ids of every key and token (the gate answers unknown ids without a query).
    fn key_ids(&self) -> Result<Vec<String>, StoreError>;
    /// How many tokens exist for a sandbox.
    fn count_tokens_of(&self, sandbox_id: &str) -> Result<u64, StoreError>;
    /// Running sandboxes of blocked tenants, with the tenant.
    fn running_of_blocked(&self) -> Result<Vec<(String, String)>, StoreError>;
    /// Every key and token, oldest first.
    fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError>;
    /// Revokes a key; false if there is no such key (revoking twice keeps the first time).
    fn revoke_key(&self, id: &str, now: SystemTime) -> Result<bool, StoreError>;
    /// Records a successful use.
    fn touch_key(&self, id: &str, now: SystemTime) -> Result<(), StoreError>;
    /// Deletes the tokens minted for a sandbox (it is gone, so are they).
    fn delete_tokens_of(&self, sandbox_id: &str) -> Result<(), StoreError>;
    /// Blocks a tenant (known or not): its keys stop working, and the server stops its
    /// sandboxes ([`Store::blocks_to_enforce`]). False if it already was.
    fn block_tenant(&self, name: &str, reason: &str, now: SystemTime) -> Result<bool, StoreError>;
    /// Lifts a block; false if the tenant was not blocked.
    fn unblock_tenant(&self, name: &str) -> Result<bool, StoreError>;
    /// Whether a tenant is blocked.
    fn tenant_blocked(&self, name: &str) -> Result<bool, StoreError>;
    /// Known tenants, by name.
    fn list_tenants(&self) -> Result<Vec<TenantRecord>, StoreError>;
    /// Blocked tenants whose block the server has not acted on yet, with the reason.
    fn blocks_to_enforce(&self) -> Result<Vec<(String, String)>, StoreError>;
    /// Notes that a block was acted on.
    fn block_enforced(&self, name: &str, now: SystemTime) -> Result<(), StoreError>;
    /// What a tenant holds now.
    fn tenant_usage(&self, tenant: &str) -> Result<TenantUsage, StoreError>;

    // ---- nodes -------------------------------------------------------------------------

    /// Records a node starting (a new boot): its boot id, capacity and first heartbeat. Keeps
    /// whether it is draining.
    fn register_node(&self, n: &NodeRecord) -> Result<(), StoreError>;
    /// Records that node `id`, in boot `boot_id`, is alive now (by the database's clock,
    /// which [`Store::mark_lost_nodes`] compares with), unless it was declared lost or the
    /// store knows another boot of it: see [`Beat`].
    fn heartbeat_node(&self, id: &str, boot_id: &str) -> Result<Beat, StoreError>;
    /// Declares lost every node but `keeper` that has sent no heartbeat for `lost_after` (by
    /// the database's clock) and is not lost already, in one transaction: its sandboxes go
    /// to ERROR with the reason and can no longer be changed by that node
    /// ([`Store::update_sandbox`] refuses it), their sessions close, and sandboxes that never
    /// started there move to `keeper`. Only while `holder` holds the lease [`SERVER_LEASE`]
    /// (a server that lost its claim, paused or cut off, declares nothing); else nothing.
    fn mark_lost_nodes(
        &self,
        lost_after: Duration,
        keeper: &str,
        holder: &str,
    ) -> Result<Vec<LostNode>, StoreError>;
    /// Whether `holder` holds the lease `name` now (by the database's clock) and node `node`
    /// is not lost: what a server checks just before writing to a codebase.
    fn holds_claim(&self, name: &str, holder: &str, node: &str) -> Result<bool, StoreError>;
    /// The node with this id.
    fn get_node(&self, id: &str) -> Result<Option<NodeRecord>, StoreError>;
    /// Every node, by id.
    fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError>;
    /// Forgets a lost node (`agentfense nodes rm`); false if there is no such node or it is
    /// not lost. Its lost sandboxes stay (until destroyed); if it comes back it registers anew.
    fn remove_lost_node(&self, id: &str) -> Result<bool, StoreError>;
    /// Drains a node (no new sandboxes) or lifts it; false if there is no such node.
    fn set_node_draining(&self, id: &str, draining: bool) -> Result<bool, StoreError>;
    /// Sets the node of a sandbox (a server adopting a sandbox recorded before nodes existed,
    /// or whose delta it holds).
    fn set_sandbox_node(&self, id: &SandboxId, node: &str) -> Result<(), StoreError>;

    // ---- leases ------------------------------------------------------------------------

    /// Takes or renews the lease `name` for `holder` for `ttl` from now, by the database's
    /// clock; true if `holder` holds it now. A lease held by someone else is taken only once
    /// it has expired, so among processes sharing the database at most one holds a lease at
    /// any time (work that must run once runs under one).
    fn try_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, StoreError>;
    /// Gives a lease up if `holder` holds it (a clean shutdown frees it at once).
    fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError>;

    /// Whether other machines can reach this database, and so could take a lease this
    /// process fails to renew. A local file cannot be written by anyone else when this
    /// process cannot write it (a full disk): failures to renew are then no reason to stop.
    fn shared(&self) -> bool {
        false
    }
}

/// Opens the store the configuration names: PostgreSQL when `storage.database_url` is set,
/// else the SQLite file at `storage.db_path`. Blocks (connects, migrates): call it off the
/// async workers.
pub fn open(settings: &Settings) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    match &settings.config.storage.database_url {
        Some(url) => Ok(std::sync::Arc::new(PgStore::connect(
            &url.0,
            settings.config.storage.database_ca_file.as_deref(),
        )?)),
        None => Ok(std::sync::Arc::new(SqliteStore::open(&settings.paths.db)?)),
    }
}

fn to_nanos(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

fn from_nanos(n: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(n.max(0) as u64)
}

/// Maps a backend error to [`StoreError::Query`] naming `op`.
fn q<E: std::error::Error + Send + Sync + 'static>(
    op: &'static str,
) -> impl FnOnce(E) -> StoreError {
    move |source| StoreError::Query {
        op,
        source: Box::new(source),
    }
}

fn status_str(s: SandboxStatus) -> &'static str {
    match s {
        SandboxStatus::Pending => "pending",
        SandboxStatus::Running => "running",
        SandboxStatus::Stopped => "stopped",
        SandboxStatus::Error => "error",
    }
}

fn session_status_str(s: SessionStatus) -> &'static str {
    match s {
        SessionStatus::Active => "active",
        SessionStatus::Closed => "closed",
    }
}

/// A session row as stored, decoded by [`RawSession::decode`].
struct RawSession {
    id: String,
    sandbox_id: String,
    shell: String,
    env: String,
    status: String,
    created_at: i64,
    closed_at: Option<i64>,
}

impl RawSession {
    fn decode(self) -> Result<SessionRecord, StoreError> {
        let id = self.id;
        let corrupt = |what: &'static str, detail: String| StoreError::Corrupt {
            what,
            id: id.clone(),
            detail,
        };
        Ok(SessionRecord {
            id: SessionId::parse(&id).map_err(|e| corrupt("session id", e.to_string()))?,
            sandbox_id: SandboxId::parse(&self.sandbox_id)
                .map_err(|e| corrupt("session sandbox id", e.to_string()))?,
            shell: self.shell,
            env: serde_json::from_str(&self.env)
                .map_err(|e| corrupt("session env", e.to_string()))?,
            status: match self.status.as_str() {
                "active" => SessionStatus::Active,
                "closed" => SessionStatus::Closed,
                other => return Err(corrupt("session status", other.to_owned())),
            },
            created_at: from_nanos(self.created_at),
            closed_at: self.closed_at.map(from_nanos),
        })
    }
}

/// A codebase row as stored, decoded by [`RawCodebase::decode`].
struct RawCodebase {
    id: String,
    name: String,
    owner_id: String,
    size: i64,
    file_count: i64,
    created_at: i64,
    updated_at: i64,
    tenant: String,
}

impl RawCodebase {
    fn decode(self) -> Result<CodebaseRecord, StoreError> {
        let id = CodebaseId::parse(&self.id).map_err(|e| StoreError::Corrupt {
            what: "codebase id",
            id: self.id.clone(),
            detail: e.to_string(),
        })?;
        Ok(CodebaseRecord {
            id,
            name: self.name,
            owner_id: self.owner_id,
            tenant: self.tenant,
            size: self.size,
            file_count: self.file_count,
            created_at: from_nanos(self.created_at),
            updated_at: from_nanos(self.updated_at),
        })
    }
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

/// The columns of a codebase row, in the order the backends read them.
const CODEBASE_COLS: &str = "id, name, owner_id, size, file_count, created_at, updated_at, tenant";
/// The columns of a sandbox row, in the order the backends read them.
const SANDBOX_COLS: &str = "id, codebase_id, owner_id, rules, status, status_reason, labels, runtime, image, resources, created_at, started_at, stopped_at, expires_at, tenant, node, lost_at";
/// Where a listing's `seq` comes after [`SANDBOX_COLS`].
const SANDBOX_SEQ: usize = 17;
/// The columns of a node row, in the order the backends read them.
const NODE_COLS: &str =
    "id, boot_id, cpus, memory_bytes, draining, registered_at, heartbeat_at, host, lost_at";
/// Registers a node: (id, boot id, cpus, memory, now, host). The same in both dialects.
///
/// SQLite reads `$N` as a named parameter numbered by first appearance, which `params![]`
/// binds by position: in SQL shared by both dialects the placeholders must first appear in
/// ascending order, as here and in [`lease_sql`].
const REGISTER_NODE_SQL: &str = "INSERT INTO nodes (id, boot_id, cpus, memory_bytes, draining,
    registered_at, heartbeat_at, host) VALUES ($1, $2, $3, $4, FALSE, $5, $5, $6)
    ON CONFLICT (id) DO UPDATE SET boot_id = excluded.boot_id, cpus = excluded.cpus,
    memory_bytes = excluded.memory_bytes, registered_at = excluded.registered_at,
    heartbeat_at = excluded.heartbeat_at, host = excluded.host, lost_at = NULL";
/// The columns of a session row, in the order the backends read them.
const SESSION_COLS: &str = "id, sandbox_id, shell, env, status, created_at, closed_at";

/// Takes or renews a lease: ($1 name, $2 holder, $3 TTL in nanoseconds), timed by the
/// database's clock `now` (an SQL expression in nanoseconds since the epoch), so that hosts
/// whose clocks disagree still agree on when a lease expires. A row held by another holder
/// changes only once expired.
fn lease_sql(now: &str) -> String {
    format!(
        "INSERT INTO leases (name, holder, expires_at) VALUES ($1, $2, {now} + $3)
         ON CONFLICT (name) DO UPDATE SET holder = excluded.holder,
         expires_at = excluded.expires_at
         WHERE leases.holder = excluded.holder OR leases.expires_at <= {now}"
    )
}

/// Records a heartbeat ($1 id, $2 boot id), timed by the database's clock `now` (as in
/// [`lease_sql`]), so that [`Store::mark_lost_nodes`] compares times of one clock.
fn heartbeat_sql(now: &str) -> String {
    format!(
        "UPDATE nodes SET heartbeat_at = {now} WHERE id = $1 AND boot_id = $2 AND lost_at IS NULL"
    )
}

/// After a refused heartbeat: the node's boot and when it was lost ($1 id).
const NODE_STATE_SQL: &str = "SELECT boot_id, lost_at FROM nodes WHERE id = $1";

/// What a refused heartbeat of boot `boot_id` means, from [`NODE_STATE_SQL`]'s row.
fn refused_beat(row: Option<(String, Option<i64>)>, boot_id: &str) -> Beat {
    match row {
        Some((boot, Some(lost))) if boot == boot_id => Beat::Lost(from_nanos(lost)),
        _ => Beat::Superseded,
    }
}

/// The lease a server holds on its metadata database: it runs every sandbox the database
/// records on its node, reaps them and declares silent nodes lost. Its holder is the server's
/// instance id, which is also its node id.
pub const SERVER_LEASE: &str = "server";

/// [`Store::holds_claim`]'s query ($1 lease, $2 holder, $3 node), timed by `now`: two counts.
fn holds_claim_sql(now: &str) -> String {
    format!(
        "SELECT (SELECT COUNT(*) FROM leases WHERE name = $1 AND holder = $2
         AND expires_at > {now}), (SELECT COUNT(*) FROM nodes WHERE id = $3
         AND lost_at IS NOT NULL)"
    )
}

/// The steps of [`Store::mark_lost_nodes`], run in one transaction by each backend.
mod lost_sql {
    /// A row when the keeper holds the server lease ($1 lease, $2 holder, $3 now).
    pub(super) const HELD: &str =
        "SELECT 1 FROM leases WHERE name = $1 AND holder = $2 AND expires_at > $3";
    /// Nodes to declare lost: ($1 keeper, $2 the latest heartbeat that is too old).
    pub(super) const STALE: &str = "SELECT id, host, heartbeat_at FROM nodes
        WHERE lost_at IS NULL AND id <> $1 AND heartbeat_at <= $2 ORDER BY id";
    /// ($1 now, $2 node).
    pub(super) const MARK: &str = "UPDATE nodes SET lost_at = $1 WHERE id = $2";
    /// Sandboxes that never ran there lose nothing: they move ($1 keeper, $2 node).
    pub(super) const MOVE: &str = "UPDATE sandboxes SET node = $1
        WHERE node = $2 AND status = 'pending' AND started_at IS NULL AND lost_at IS NULL
        RETURNING id";
    /// The others are lost ($1 reason, $2 now, $3 node).
    pub(super) const LOSE: &str = "UPDATE sandboxes SET status = 'error', status_reason = $1,
        stopped_at = $2, lost_at = $2 WHERE node = $3 AND lost_at IS NULL RETURNING id, tenant";
    /// And their sessions close ($1 now, $2 node).
    pub(super) const CLOSE_SESSIONS: &str = "UPDATE sessions SET status = 'closed', closed_at = $1
        WHERE closed_at IS NULL AND sandbox_id IN
        (SELECT id FROM sandboxes WHERE node = $2 AND lost_at = $1)";
}

/// Updates a sandbox's state ($1 status, $2 reason, $3 started, $4 stopped, $5 expiry, $6 id,
/// $7 the node the writer thinks it is on): only while it is still on that node and not
/// lost, so a stale writer changes nothing.
const UPDATE_SANDBOX_SQL: &str = "UPDATE sandboxes SET status = $1, status_reason = $2,
    started_at = $3, stopped_at = $4, expires_at = $5
    WHERE id = $6 AND node = $7 AND lost_at IS NULL";

/// Inserts a session ($1 id .. $7 closed), only while its sandbox ($2) exists and is not
/// lost: a stale server cannot open a session nobody would ever close. (Casts: PostgreSQL
/// types a bare parameter of a SELECT list as text.) `lock` is PostgreSQL's ` FOR SHARE`:
/// the sandbox row stays as read until the insert commits, so a concurrent declaration of its
/// loss either comes after (and closes this session with the others) or before (and the
/// insert finds it lost); SQLite serialises writers anyway.
fn insert_session_sql(lock: &str) -> String {
    format!(
        "INSERT INTO sessions ({SESSION_COLS}) SELECT CAST($1 AS TEXT), CAST($2 AS TEXT),
         CAST($3 AS TEXT), CAST($4 AS TEXT), CAST($5 AS TEXT), CAST($6 AS BIGINT),
         CAST($7 AS BIGINT) WHERE EXISTS (SELECT 1 FROM sandboxes WHERE id = $2
         AND lost_at IS NULL{lock})"
    )
}

/// Why [`insert_session_sql`] inserted nothing.
fn no_session(s: &SessionRecord) -> StoreError {
    StoreError::Fenced {
        id: s.sandbox_id.to_string(),
        why: "no session can be opened: it no longer exists, or was declared lost with its node"
            .into(),
    }
}

/// After an update that changed nothing: where the sandbox is ($1 id).
const SANDBOX_FENCE_SQL: &str = "SELECT node, lost_at FROM sandboxes WHERE id = $1";

/// Why an update of `s` changed nothing, from [`SANDBOX_FENCE_SQL`]'s row: a destroyed
/// sandbox is no error (as before fencing), a lost or moved one is.
fn fence(s: &SandboxRecord, row: Option<(String, Option<i64>)>) -> Result<(), StoreError> {
    let why = match row {
        None => return Ok(()),
        Some((_, Some(lost))) => format!(
            "it was declared lost with node {} at {}",
            s.node,
            humantime::format_rfc3339_seconds(from_nanos(lost))
        ),
        Some((node, None)) if node != s.node => {
            format!("it was moved from node {} to node {node}", s.node)
        }
        Some(_) => return Ok(()),
    };
    Err(StoreError::Fenced {
        id: s.id.to_string(),
        why,
    })
}

/// Parses a sandbox id returned by a statement.
fn returned_id(raw: &str) -> Result<SandboxId, StoreError> {
    SandboxId::parse(raw).map_err(|e| StoreError::Corrupt {
        what: "sandbox id",
        id: raw.to_owned(),
        detail: e.to_string(),
    })
}

/// A [`LostNode`] from its [`lost_sql::STALE`] row and what the other steps returned.
fn lost_node(
    (id, host, heartbeat_at): (String, String, i64),
    now: i64,
    moved: Vec<String>,
    sandboxes: Vec<(String, String)>,
) -> Result<LostNode, StoreError> {
    Ok(LostNode {
        id,
        host,
        heartbeat_at: from_nanos(heartbeat_at),
        lost_at: from_nanos(now),
        sandboxes: sandboxes
            .into_iter()
            .map(|(id, tenant)| Ok((returned_id(&id)?, tenant)))
            .collect::<Result<_, StoreError>>()?,
        moved: moved
            .iter()
            .map(|id| returned_id(id))
            .collect::<Result<_, _>>()?,
    })
}

/// The newest heartbeat that counts as too old at `now` (nanoseconds).
fn stale_before(now: i64, lost_after: Duration) -> i64 {
    now.saturating_sub(ttl_nanos(lost_after))
}

/// A TTL in nanoseconds, as stored.
fn ttl_nanos(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_nanos()).unwrap_or(i64::MAX / 2)
}

/// The first creation limit `s` would exceed, 0 meaning no limit; `count(sql, value)` runs
/// one count query (`$1` = value) inside the caller's locked transaction. Both dialects
/// bind `$1` positionally.
fn limit_hit(
    s: &SandboxRecord,
    (max_per_owner, max_per_tenant, per_hour): (u32, u32, u32),
    mut count: impl FnMut(&'static str, &str) -> Result<u64, StoreError>,
) -> Result<Option<LimitHit>, StoreError> {
    let over = |limit: u32, n: u64| limit > 0 && n >= u64::from(limit);
    let recent = count(
        "SELECT COUNT(*) FROM sandbox_creations WHERE tenant = $1",
        &s.tenant,
    )?;
    if over(per_hour, recent) {
        return Ok(Some(LimitHit::PerHour(recent)));
    }
    let tenant_has = count(
        "SELECT COUNT(*) FROM sandboxes WHERE tenant = $1",
        &s.tenant,
    )?;
    if over(max_per_tenant, tenant_has) {
        return Ok(Some(LimitHit::Tenant(tenant_has)));
    }
    let owner_has = count(
        "SELECT COUNT(*) FROM sandboxes WHERE owner_id = $1",
        &s.owner_id,
    )?;
    if over(max_per_owner, owner_has) {
        return Ok(Some(LimitHit::Owner(owner_has)));
    }
    Ok(None)
}

/// A value stored as JSON text.
fn to_json<T: serde::Serialize + ?Sized>(
    what: &'static str,
    id: &str,
    v: &T,
) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt {
        what,
        id: id.to_owned(),
        detail: e.to_string(),
    })
}

type EncodedSandbox = (String, String, String);

fn encode_sandbox(s: &SandboxRecord) -> Result<EncodedSandbox, StoreError> {
    let id = s.id.as_str();
    Ok((
        to_json("sandbox rules", id, &s.rules)?,
        to_json("sandbox labels", id, &s.labels)?,
        to_json("sandbox resources", id, &s.resources)?,
    ))
}

/// A sandbox row as stored, decoded by [`RawSandbox::decode`].
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
    node: String,
    lost_at: Option<i64>,
}

impl RawSandbox {
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
            node: self.node,
            lost_at: self.lost_at.map(from_nanos),
        })
    }
}

/// A node row as stored, decoded by [`RawNode::decode`].
struct RawNode {
    id: String,
    boot_id: String,
    cpus: i64,
    memory_bytes: i64,
    draining: bool,
    registered_at: i64,
    heartbeat_at: i64,
    host: String,
    lost_at: Option<i64>,
}

impl RawNode {
    fn decode(self) -> NodeRecord {
        NodeRecord {
            id: self.id,
            host: self.host,
            boot_id: self.boot_id,
            cpus: u32::try_from(self.cpus).unwrap_or(0),
            memory_bytes: u64::try_from(self.memory_bytes).unwrap_or(0),
            draining: self.draining,
            registered_at: from_nanos(self.registered_at),
            heartbeat_at: from_nanos(self.heartbeat_at),
            lost_at: self.lost_at.map(from_nanos),
        }
    }
}
