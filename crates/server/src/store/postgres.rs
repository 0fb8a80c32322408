//! PostgreSQL backend (`storage.database_url: postgres://...`), for metadata that several
//! processes share or that lives on a managed database.
//!
//! The same rows as SQLite, with PostgreSQL types (`BIGINT` nanoseconds, `BYTEA` hashes,
//! identity columns for the listing order). Its own append-only [`MIGRATIONS`], recorded in
//! `agentfense_schema` and applied under an advisory lock, so replicas starting together
//! migrate once. Limits that must hold across processes (sandbox creation) serialise on an
//! advisory transaction lock, as SQLite's `BEGIN IMMEDIATE` does within one file.
//!
//! The client is the synchronous `postgres` crate behind an r2d2 pool: like rusqlite, it is
//! called from blocking threads only (it runs its own small runtime per connection, which
//! panics on an async worker).
//!
//! TLS: PostgreSQL has none on a Unix socket; over TCP it is required unless the URL says
//! `sslmode=disable` (libpq's default, `prefer`, would continue in plaintext when the
//! server, or anyone in the path, answers that it has no TLS, so here it means `require`).
//! The server's certificate is always verified, name included, against
//! `storage.database_ca_file` or else the public web roots.
//!
//! Every transaction runs at READ COMMITTED whatever the database's default: the advisory
//! locks that serialise migrations, creations and codebase inserts rely on each statement
//! seeing what the previous lock holder committed. TCP connections have keepalives and a
//! user timeout, and every statement a timeout, so a vanished database fails calls instead of
//! hanging the threads that make them.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use postgres::Row;
use postgres::types::ToSql;
use r2d2_postgres::PostgresConnectionManager;
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_rustls::rustls;

use super::auth::{KEY_COLS, RawKey};
use super::{
    BackendError, Beat, CODEBASE_COLS, CodebaseRecord, KeyLookup, KeyRecord, LimitHit, LostNode,
    NODE_COLS, NODE_STATE_SQL, NodeRecord, Page, REGISTER_NODE_SQL, RawCodebase, RawNode,
    RawSandbox, RawSession, SANDBOX_COLS, SANDBOX_FENCE_SQL, SANDBOX_SEQ, SERVER_LEASE,
    SESSION_COLS, SandboxFilter, SandboxRecord, SessionRecord, Store, StoreError, TenantRecord,
    TenantUsage, UPDATE_SANDBOX_SQL, encode_sandbox, fence, from_nanos, heartbeat_sql,
    holds_claim_sql, insert_session_sql, lease_sql, limit_hit, lost_node, lost_sql, no_session,
    paginate, q, refused_beat, session_status_str, stale_before, status_str, to_json, to_nanos,
    ttl_nanos,
};
use crate::ids::{CodebaseId, SandboxId, SessionId};

/// Ordered, append-only schema migrations; step `i` moves the recorded version from `i` to
/// `i + 1`. Step 1 is the whole schema SQLite reached in its steps 1-3.
pub const MIGRATIONS: &[&str] = &[
    // 1: everything SQLite reached in its steps 1-3.
    "CREATE TABLE codebases (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL,
        owner_id TEXT NOT NULL,
        size BIGINT NOT NULL DEFAULT 0,
        file_count BIGINT NOT NULL DEFAULT 0,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        tenant TEXT NOT NULL DEFAULT 'default'
    );
    CREATE INDEX codebases_by_owner ON codebases(owner_id, seq);
    CREATE INDEX codebases_by_tenant ON codebases(tenant, seq);
    CREATE TABLE sandboxes (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
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
        created_at BIGINT NOT NULL,
        started_at BIGINT,
        stopped_at BIGINT,
        expires_at BIGINT,
        tenant TEXT NOT NULL DEFAULT 'default'
    );
    CREATE INDEX sandboxes_by_codebase ON sandboxes(codebase_id, seq);
    CREATE INDEX sandboxes_by_owner ON sandboxes(owner_id);
    CREATE INDEX sandboxes_by_tenant ON sandboxes(tenant, seq);
    CREATE TABLE sessions (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        sandbox_id TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
        shell TEXT NOT NULL,
        env TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        closed_at BIGINT
    );
    CREATE INDEX sessions_by_sandbox ON sessions(sandbox_id, seq);
    CREATE TABLE tenants (
        name TEXT PRIMARY KEY,
        created_at BIGINT NOT NULL,
        blocked_at BIGINT,
        block_reason TEXT,
        block_enforced_at BIGINT
    );
    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        scopes TEXT NOT NULL,
        hash BYTEA NOT NULL,
        sandbox_id TEXT,
        parent_id TEXT,
        created_at BIGINT NOT NULL,
        expires_at BIGINT,
        last_used_at BIGINT,
        revoked_at BIGINT
    );
    CREATE INDEX api_keys_by_sandbox ON api_keys(sandbox_id);
    CREATE TABLE sandbox_creations (tenant TEXT NOT NULL, at BIGINT NOT NULL);
    CREATE INDEX sandbox_creations_by_tenant ON sandbox_creations(tenant, at);
    CREATE TABLE leases (
        name TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        expires_at BIGINT NOT NULL
    );",
    // 2: nodes, and the node each sandbox lives on ('' for sandboxes made before nodes).
    "CREATE TABLE nodes (
        id TEXT PRIMARY KEY,
        boot_id TEXT NOT NULL,
        cpus BIGINT NOT NULL,
        memory_bytes BIGINT NOT NULL,
        draining BOOLEAN NOT NULL DEFAULT FALSE,
        registered_at BIGINT NOT NULL,
        heartbeat_at BIGINT NOT NULL
    );
    ALTER TABLE sandboxes ADD COLUMN node TEXT NOT NULL DEFAULT '';",
    // 3: a node's host name, shown beside its id (the data directory's instance id).
    "ALTER TABLE nodes ADD COLUMN host TEXT NOT NULL DEFAULT '';",
    // 4: lost nodes, and the sandboxes lost with them. Heartbeats were the nodes' clocks
    // until now, the database's from now on: every node known gets a full `lost_after`
    // before it can be declared lost.
    "ALTER TABLE nodes ADD COLUMN lost_at BIGINT;
    ALTER TABLE sandboxes ADD COLUMN lost_at BIGINT;
    UPDATE nodes SET heartbeat_at = (EXTRACT(EPOCH FROM clock_timestamp()) * 1000000000)::BIGINT;",
];

/// The database's clock in nanoseconds since the epoch, as SQL: every server sharing the
/// database times leases and heartbeats by this one clock.
const NOW: &str = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000000)::BIGINT";

/// Advisory lock keys (`pg_advisory_xact_lock`): migrations, sandbox creation (and with it
/// the order of sandbox rows), codebase creation (the order of codebase rows).
const MIGRATION_LOCK: i64 = 0x4146_6e63_0001;
const CREATION_LOCK: i64 = 0x4146_6e63_0002;
const CODEBASE_LOCK: i64 = 0x4146_6e63_0003;

/// Connections kept per process; store calls come from tokio's blocking pool.
const POOL_SIZE: u32 = 8;

/// A pooled connection, whichever the pool.
type Conn = Box<dyn std::ops::DerefMut<Target = postgres::Client>>;

/// The connection pool: plain for Unix sockets (where PostgreSQL has no TLS, and the rustls
/// connector cannot even be made: it needs a host name), TLS-capable for TCP hosts.
enum Pool {
    Socket(r2d2::Pool<PostgresConnectionManager<postgres::NoTls>>),
    Tcp(r2d2::Pool<PostgresConnectionManager<MakeRustlsConnect>>),
}

impl Pool {
    /// Connects once (so that a failure says why at once: the pool would only say that it
    /// timed out, after retrying for the whole timeout), then builds the pool; `tls` is used
    /// unless every host is a Unix socket.
    fn open(config: postgres::Config, tls: MakeRustlsConnect) -> Result<Pool, BackendError> {
        fn build<T>(
            config: postgres::Config,
            tls: T,
        ) -> Result<r2d2::Pool<PostgresConnectionManager<T>>, BackendError>
        where
            T: postgres::tls::MakeTlsConnect<postgres::Socket> + Clone + Send + Sync + 'static,
            T::Stream: Send,
            T::TlsConnect: Send,
            <T::TlsConnect as postgres::tls::TlsConnect<postgres::Socket>>::Future: Send,
        {
            drop(config.connect(tls.clone())?);
            Ok(r2d2::Pool::builder()
                .max_size(POOL_SIZE)
                .min_idle(Some(1))
                .connection_timeout(Duration::from_secs(10))
                .build(PostgresConnectionManager::new(config, tls))?)
        }
        Ok(if unix_only(&config) {
            Pool::Socket(build(config, postgres::NoTls)?)
        } else {
            Pool::Tcp(build(config, tls)?)
        })
    }

    fn get(&self) -> Result<Conn, r2d2::Error> {
        Ok(match self {
            Pool::Socket(p) => Box::new(p.get()?),
            Pool::Tcp(p) => Box::new(p.get()?),
        })
    }
}
type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// The PostgreSQL store: a small connection pool.
pub struct PgStore {
    /// Always `Some` until dropped.
    pool: Option<Pool>,
    target: String,
}

impl Drop for PgStore {
    /// Closing a connection blocks on the client's own runtime, which panics on an async
    /// worker, where the last handle on the store is often dropped (server shutdown): the
    /// pool is closed on a thread of its own.
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            let _ = std::thread::spawn(move || drop(pool)).join();
        }
    }
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// Checks a `storage.database_url` and returns it without its password, for messages.
pub fn check_url(url: &str) -> Result<String, StoreError> {
    parse_url(url).map(|(_, shown)| shown)
}

/// A `storage.database_url`'s connection settings, and the URL without its password.
fn parse_url(url: &str) -> Result<(postgres::Config, String), StoreError> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(StoreError::BadUrl(
            "must start with postgres:// or postgresql:// (leave it unset for the embedded SQLite file)"
                .into(),
        ));
    }
    let config = postgres::Config::from_str(url).map_err(|e| StoreError::BadUrl(e.to_string()))?;
    let shown = describe(&config);
    Ok((config, shown))
}

/// `postgres://user@host:port/db`, never the password.
fn describe(config: &postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .zip(config.get_ports().iter().chain(std::iter::repeat(&5432)))
        .map(|(h, p)| match h {
            postgres::config::Host::Tcp(h) => format!("{h}:{p}"),
            postgres::config::Host::Unix(d) => format!("{}:{p}", d.display()),
        })
        .collect();
    format!(
        "postgres://{}@{}/{}",
        config.get_user().unwrap_or(""),
        hosts.join(","),
        config.get_dbname().unwrap_or("")
    )
}

/// Whether every way `config` names to reach the server is a Unix socket.
fn unix_only(config: &postgres::Config) -> bool {
    !config.get_hosts().is_empty()
        && config.get_hostaddrs().is_empty()
        && config
            .get_hosts()
            .iter()
            .all(|h| matches!(h, postgres::config::Host::Unix(_)))
}

/// A transaction at READ COMMITTED (see the module docs).
fn begin(conn: &mut postgres::Client) -> Result<postgres::Transaction<'_>, postgres::Error> {
    conn.build_transaction()
        .isolation_level(postgres::IsolationLevel::ReadCommitted)
        .start()
}

/// The TLS connector: rustls verifying the server against the CAs in `ca_file`, or else
/// the public web roots.
fn tls(ca_file: Option<&Path>) -> Result<MakeRustlsConnect, StoreError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = crate::tls::read_certs(path)
                .map_err(|e| StoreError::BadUrl(format!("storage.database_ca_file: {e}")))?;
            for cert in certs {
                roots.add(cert).map_err(|e| {
                    StoreError::BadUrl(format!(
                        "storage.database_ca_file: {} holds an unusable CA certificate: {e}",
                        path.display()
                    ))
                })?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let config = rustls::ClientConfig::builder_with_provider(crate::tls::crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::BadUrl(format!("TLS setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

impl PgStore {
    /// Connects to `url` (TLS verified against `ca_file`'s CAs, else the public web roots),
    /// checks the schema version and migrates. Fails (naming the server, never the
    /// password) when the database cannot be reached within 10 s. The password may come from
    /// `PGPASSWORD` instead of the URL, as with libpq (for secrets passed as environment).
    pub fn connect(url: &str, ca_file: Option<&Path>) -> Result<PgStore, StoreError> {
        let (mut config, target) = parse_url(url)?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        if config.get_password().is_none()
            && let Some(p) = std::env::var_os("PGPASSWORD")
        {
            config.password(p.as_encoded_bytes());
        }
        config.application_name("agentfense");
        if !unix_only(&config) {
            if config.get_ssl_mode() == postgres::config::SslMode::Prefer {
                config.ssl_mode(postgres::config::SslMode::Require);
            }
            config.keepalives(true);
            config.keepalives_idle(Duration::from_secs(30));
            if config.get_tcp_user_timeout().is_none() {
                config.tcp_user_timeout(Duration::from_secs(30));
            }
        }
        if config.get_options().is_none() {
            config.options("-c statement_timeout=60s -c idle_in_transaction_session_timeout=60s");
        }
        // Made (and a bad CA file reported) even where only a socket is used.
        let tls = tls(ca_file)?;
        let pool = Pool::open(config, tls).map_err(|source| StoreError::Open {
            target: target.clone(),
            source,
        })?;
        let store = PgStore {
            pool: Some(pool),
            target,
        };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&self) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        let open_err = |e: postgres::Error| StoreError::Open {
            target: self.target.clone(),
            source: Box::new(e),
        };
        let mut tx = begin(&mut conn).map_err(open_err)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .map_err(open_err)?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS agentfense_schema (version INTEGER NOT NULL)")
            .map_err(open_err)?;
        let version: i32 = match tx
            .query_opt("SELECT version FROM agentfense_schema", &[])
            .map_err(open_err)?
        {
            Some(row) => row.try_get(0).map_err(open_err)?,
            None => {
                tx.execute("INSERT INTO agentfense_schema (version) VALUES (0)", &[])
                    .map_err(open_err)?;
                0
            }
        };
        if version < 0 || version as usize > MIGRATIONS.len() {
            return Err(StoreError::TooNew {
                target: self.target.clone(),
                found: i64::from(version),
                known: MIGRATIONS.len(),
            });
        }
        for (i, step) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let next = (i + 1) as i32;
            tx.batch_execute(step)
                .and_then(|()| {
                    tx.execute("UPDATE agentfense_schema SET version = $1", &[&next])
                        .map(drop)
                })
                .map_err(|e| StoreError::Migrate {
                    version: i + 1,
                    source: Box::new(e),
                })?;
        }
        tx.commit().map_err(open_err)
    }

    fn conn(&self) -> Result<Conn, StoreError> {
        let pool = self.pool.as_ref().ok_or_else(|| StoreError::Query {
            op: "connect",
            source: "the store is closed".into(),
        })?;
        pool.get().map_err(|e| StoreError::Query {
            op: "connect",
            source: Box::new(e),
        })
    }

    /// Runs one statement; the number of rows it changed.
    fn exec(&self, op: &'static str, sql: &str, params: Params<'_>) -> Result<u64, StoreError> {
        self.conn()?.execute(sql, params).map_err(q(op))
    }

    /// Runs one query; every row.
    fn rows(
        &self,
        op: &'static str,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Vec<Row>, StoreError> {
        self.conn()?.query(sql, params).map_err(q(op))
    }

    /// Runs one query; its row, if any.
    fn row(
        &self,
        op: &'static str,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Option<Row>, StoreError> {
        self.conn()?.query_opt(sql, params).map_err(q(op))
    }

    /// Runs one query returning one count.
    fn count(&self, op: &'static str, sql: &str, params: Params<'_>) -> Result<u64, StoreError> {
        let row = self.conn()?.query_one(sql, params).map_err(q(op))?;
        let n: i64 = row.try_get(0).map_err(q(op))?;
        Ok(n.max(0) as u64)
    }
}

/// Decodes every row with `f`, naming `op` on failure.
fn decode<T>(
    op: &'static str,
    rows: Vec<Row>,
    f: impl Fn(&Row) -> Result<T, postgres::Error>,
) -> Result<Vec<T>, StoreError> {
    rows.iter().map(|r| f(r).map_err(q(op))).collect()
}

fn codebase_row(r: &Row) -> Result<RawCodebase, postgres::Error> {
    Ok(RawCodebase {
        id: r.try_get(0)?,
        name: r.try_get(1)?,
        owner_id: r.try_get(2)?,
        size: r.try_get(3)?,
        file_count: r.try_get(4)?,
        created_at: r.try_get(5)?,
        updated_at: r.try_get(6)?,
        tenant: r.try_get(7)?,
    })
}

fn sandbox_row(r: &Row) -> Result<RawSandbox, postgres::Error> {
    Ok(RawSandbox {
        id: r.try_get(0)?,
        codebase_id: r.try_get(1)?,
        owner_id: r.try_get(2)?,
        rules: r.try_get(3)?,
        status: r.try_get(4)?,
        status_reason: r.try_get(5)?,
        labels: r.try_get(6)?,
        runtime: r.try_get(7)?,
        image: r.try_get(8)?,
        resources: r.try_get(9)?,
        created_at: r.try_get(10)?,
        started_at: r.try_get(11)?,
        stopped_at: r.try_get(12)?,
        expires_at: r.try_get(13)?,
        tenant: r.try_get(14)?,
        node: r.try_get(15)?,
        lost_at: r.try_get(16)?,
    })
}

fn node_row(r: &Row) -> Result<RawNode, postgres::Error> {
    Ok(RawNode {
        id: r.try_get(0)?,
        boot_id: r.try_get(1)?,
        cpus: r.try_get(2)?,
        memory_bytes: r.try_get(3)?,
        draining: r.try_get(4)?,
        registered_at: r.try_get(5)?,
        heartbeat_at: r.try_get(6)?,
        host: r.try_get(7)?,
        lost_at: r.try_get(8)?,
    })
}

fn session_row(r: &Row) -> Result<RawSession, postgres::Error> {
    Ok(RawSession {
        id: r.try_get(0)?,
        sandbox_id: r.try_get(1)?,
        shell: r.try_get(2)?,
        env: r.try_get(3)?,
        status: r.try_get(4)?,
        created_at: r.try_get(5)?,
        closed_at: r.try_get(6)?,
    })
}

fn key_row(r: &Row) -> Result<KeyRecord, postgres::Error> {
    Ok(RawKey {
        id: r.try_get(0)?,
        tenant: r.try_get(1)?,
        scopes: r.try_get(2)?,
        sandbox_id: r.try_get(3)?,
        created_at: r.try_get(4)?,
        expires_at: r.try_get(5)?,
        last_used_at: r.try_get(6)?,
        revoked_at: r.try_get(7)?,
        parent_id: r.try_get(8)?,
    }
    .decode())
}

/// Pairs each decoded row with its `seq` (the column after `width` others), for [`paginate`].
fn with_seq<T>(
    op: &'static str,
    rows: Vec<Row>,
    width: usize,
    f: impl Fn(&Row) -> Result<T, postgres::Error>,
) -> Result<Vec<(T, i64)>, StoreError> {
    decode(op, rows, |r| Ok((f(r)?, r.try_get(width)?)))
}

/// Inserts a sandbox row (inside a caller's transaction).
fn insert_sandbox_row(
    tx: &mut postgres::Transaction<'_>,
    s: &SandboxRecord,
) -> Result<(), StoreError> {
    let (rules, labels, resources) = encode_sandbox(s)?;
    tx.execute(
        &format!(
            "INSERT INTO sandboxes ({SANDBOX_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9,
             $10, $11, $12, $13, $14, $15, $16, $17)"
        ),
        &[
            &s.id.as_str(),
            &s.codebase_id.as_str(),
            &s.owner_id,
            &rules,
            &status_str(s.status),
            &s.status_reason,
            &labels,
            &s.runtime.as_str(),
            &s.image,
            &resources,
            &to_nanos(s.created_at),
            &s.started_at.map(to_nanos),
            &s.stopped_at.map(to_nanos),
            &s.expires_at.map(to_nanos),
            &s.tenant,
            &s.node,
            &s.lost_at.map(to_nanos),
        ],
    )
    .map_err(q("insert sandbox"))?;
    Ok(())
}

fn strings(op: &'static str, rows: Vec<Row>) -> Result<Vec<String>, StoreError> {
    decode(op, rows, |r| r.try_get(0))
}

fn string_pairs(op: &'static str, rows: Vec<Row>) -> Result<Vec<(String, String)>, StoreError> {
    decode(op, rows, |r| Ok((r.try_get(0)?, r.try_get(1)?)))
}

impl Store for PgStore {
    // ---- codebases ---------------------------------------------------------------------

    fn insert_codebase(&self, c: &CodebaseRecord) -> Result<(), StoreError> {
        let op = "insert codebase";
        let mut conn = self.conn()?;
        let mut tx = begin(&mut conn).map_err(q(op))?;
        // Inserts in commit order = identity order, so that a listing's `seq > token` never
        // skips a codebase committed after a later one.
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&CODEBASE_LOCK])
            .map_err(q(op))?;
        tx.execute(
            &format!(
                "INSERT INTO codebases ({CODEBASE_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
            ),
            &[
                &c.id.as_str(),
                &c.name,
                &c.owner_id,
                &c.size,
                &c.file_count,
                &to_nanos(c.created_at),
                &to_nanos(c.updated_at),
                &c.tenant,
            ],
        )
        .map_err(q(op))?;
        tx.commit().map_err(q(op))
    }

    fn get_codebase(&self, id: &CodebaseId) -> Result<Option<CodebaseRecord>, StoreError> {
        let op = "get codebase";
        self.row(
            op,
            &format!("SELECT {CODEBASE_COLS} FROM codebases WHERE id = $1"),
            &[&id.as_str()],
        )?
        .map(|r| codebase_row(&r).map_err(q(op))?.decode())
        .transpose()
    }

    fn list_codebases(
        &self,
        tenant: Option<&str>,
        owner: Option<&str>,
        after: i64,
        limit: usize,
    ) -> Result<Page<CodebaseRecord>, StoreError> {
        let op = "list codebases";
        let rows = self.rows(
            op,
            &format!(
                "SELECT {CODEBASE_COLS}, seq FROM codebases WHERE seq > $1
                 AND ($2::text IS NULL OR owner_id = $2) AND ($4::text IS NULL OR tenant = $4)
                 ORDER BY seq LIMIT $3"
            ),
            &[&after, &owner, &((limit + 1) as i64), &tenant],
        )?;
        paginate(
            with_seq(op, rows, 8, codebase_row)?,
            limit,
            RawCodebase::decode,
        )
    }

    fn adjust_codebase_stats(
        &self,
        id: &CodebaseId,
        size_delta: i64,
        count_delta: i64,
        now: SystemTime,
    ) -> Result<(), StoreError> {
        self.exec(
            "update codebase stats",
            "UPDATE codebases SET size = GREATEST(0, size + $2),
             file_count = GREATEST(0, file_count + $3), updated_at = $4 WHERE id = $1",
            &[&id.as_str(), &size_delta, &count_delta, &to_nanos(now)],
        )
        .map(drop)
    }

    fn delete_codebase(&self, id: &CodebaseId) -> Result<bool, StoreError> {
        let n = self.exec(
            "delete codebase",
            "DELETE FROM codebases WHERE id = $1",
            &[&id.as_str()],
        )?;
        Ok(n > 0)
    }

    // ---- sandboxes ---------------------------------------------------------------------

    fn insert_sandbox(&self, s: &SandboxRecord) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        let mut tx = begin(&mut conn).map_err(q("insert sandbox"))?;
        insert_sandbox_row(&mut tx, s)?;
        tx.commit().map_err(q("insert sandbox"))
    }

    fn insert_sandbox_limited(
        &self,
        s: &SandboxRecord,
        max_per_owner: u32,
        max_per_tenant: u32,
        per_hour: u32,
        now: SystemTime,
    ) -> Result<Result<(), LimitHit>, StoreError> {
        let op = "create sandbox";
        let hour_ago = to_nanos(now.checked_sub(Duration::from_secs(3600)).unwrap_or(now));
        let mut conn = self.conn()?;
        let mut tx = begin(&mut conn).map_err(q(op))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&CREATION_LOCK])
            .map_err(q(op))?;
        tx.execute(
            "DELETE FROM sandbox_creations WHERE tenant = $1 AND at <= $2",
            &[&s.tenant, &hour_ago],
        )
        .map_err(q(op))?;
        let count = |sql: &str, v: &str| -> Result<u64, StoreError> {
            let n: i64 = tx
                .query_one(sql, &[&v])
                .and_then(|r| r.try_get(0))
                .map_err(q(op))?;
            Ok(n.max(0) as u64)
        };
        let limits = (max_per_owner, max_per_tenant, per_hour);
        if let Some(hit) = limit_hit(s, limits, count)? {
            return Ok(Err(hit));
        }
        insert_sandbox_row(&mut tx, s)?;
        tx.execute(
            "INSERT INTO sandbox_creations (tenant, at) VALUES ($1, $2)",
            &[&s.tenant, &to_nanos(now)],
        )
        .map_err(q(op))?;
        tx.commit().map_err(q(op))?;
        Ok(Ok(()))
    }

    fn update_sandbox(&self, s: &SandboxRecord) -> Result<(), StoreError> {
        let op = "update sandbox";
        let mut conn = self.conn()?;
        let n = conn
            .execute(
                UPDATE_SANDBOX_SQL,
                &[
                    &status_str(s.status),
                    &s.status_reason,
                    &s.started_at.map(to_nanos),
                    &s.stopped_at.map(to_nanos),
                    &s.expires_at.map(to_nanos),
                    &s.id.as_str(),
                    &s.node,
                ],
            )
            .map_err(q(op))?;
        if n > 0 {
            return Ok(());
        }
        let row = conn
            .query_opt(SANDBOX_FENCE_SQL, &[&s.id.as_str()])
            .map_err(q(op))?
            .map(|r| Ok::<_, postgres::Error>((r.try_get(0)?, r.try_get(1)?)))
            .transpose()
            .map_err(q(op))?;
        fence(s, row)
    }

    fn update_labels(
        &self,
        id: &SandboxId,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), StoreError> {
        let encoded = to_json("sandbox labels", id.as_str(), labels)?;
        self.exec(
            "update labels",
            "UPDATE sandboxes SET labels = $2 WHERE id = $1",
            &[&id.as_str(), &encoded],
        )
        .map(drop)
    }

    fn get_sandbox(&self, id: &SandboxId) -> Result<Option<SandboxRecord>, StoreError> {
        let op = "get sandbox";
        self.row(
            op,
            &format!("SELECT {SANDBOX_COLS} FROM sandboxes WHERE id = $1"),
            &[&id.as_str()],
        )?
        .map(|r| sandbox_row(&r).map_err(q(op))?.decode())
        .transpose()
    }

    fn list_sandboxes(
        &self,
        filter: SandboxFilter<'_>,
        after: i64,
        limit: usize,
    ) -> Result<Page<SandboxRecord>, StoreError> {
        let op = "list sandboxes";
        let rows = self.rows(
            op,
            &format!(
                "SELECT {SANDBOX_COLS}, seq FROM sandboxes WHERE seq > $1
                 AND ($2::text IS NULL OR codebase_id = $2) AND ($4::text IS NULL OR tenant = $4)
                 AND ($5::text IS NULL OR id = $5) ORDER BY seq LIMIT $3"
            ),
            &[
                &after,
                &filter.codebase.map(|c| c.as_str()),
                &((limit + 1) as i64),
                &filter.tenant,
                &filter.id.map(|c| c.as_str()),
            ],
        )?;
        paginate(
            with_seq(op, rows, SANDBOX_SEQ, sandbox_row)?,
            limit,
            RawSandbox::decode,
        )
    }

    fn count_sandboxes_by_status(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let op = "count sandboxes by status";
        let rows = self.rows(
            op,
            "SELECT status, COUNT(*) FROM sandboxes GROUP BY status",
            &[],
        )?;
        decode(op, rows, |r| {
            Ok((r.try_get(0)?, r.try_get::<_, i64>(1)?.max(0) as u64))
        })
    }

    fn count_sandboxes_of_owner(&self, owner: &str) -> Result<u64, StoreError> {
        self.count(
            "count sandboxes",
            "SELECT COUNT(*) FROM sandboxes WHERE owner_id = $1",
            &[&owner],
        )
    }

    fn sandboxes_of_codebase(&self, id: &CodebaseId) -> Result<Vec<String>, StoreError> {
        let op = "sandboxes of codebase";
        let rows = self.rows(
            op,
            "SELECT id FROM sandboxes WHERE codebase_id = $1 ORDER BY seq",
            &[&id.as_str()],
        )?;
        strings(op, rows)
    }

    fn delete_sandbox(&self, id: &SandboxId) -> Result<bool, StoreError> {
        let n = self.exec(
            "delete sandbox",
            "DELETE FROM sandboxes WHERE id = $1",
            &[&id.as_str()],
        )?;
        Ok(n > 0)
    }

    // ---- sessions ----------------------------------------------------------------------

    fn insert_session(&self, s: &SessionRecord) -> Result<(), StoreError> {
        let env = to_json("session env", s.id.as_str(), &s.env)?;
        let n = self.exec(
            "insert session",
            &insert_session_sql(" FOR SHARE"),
            &[
                &s.id.as_str(),
                &s.sandbox_id.as_str(),
                &s.shell,
                &env,
                &session_status_str(s.status),
                &to_nanos(s.created_at),
                &s.closed_at.map(to_nanos),
            ],
        )?;
        if n == 0 {
            return Err(no_session(s));
        }
        Ok(())
    }

    fn close_session(&self, id: &SessionId, when: SystemTime) -> Result<(), StoreError> {
        self.exec(
            "close session",
            "UPDATE sessions SET status = 'closed', closed_at = COALESCE(closed_at, $2)
             WHERE id = $1",
            &[&id.as_str(), &to_nanos(when)],
        )
        .map(drop)
    }

    fn close_sessions_of(&self, sandbox: &SandboxId, when: SystemTime) -> Result<(), StoreError> {
        self.exec(
            "close sessions",
            "UPDATE sessions SET status = 'closed', closed_at = COALESCE(closed_at, $2)
             WHERE sandbox_id = $1",
            &[&sandbox.as_str(), &to_nanos(when)],
        )
        .map(drop)
    }

    fn delete_session(&self, id: &SessionId) -> Result<bool, StoreError> {
        let n = self.exec(
            "delete session",
            "DELETE FROM sessions WHERE id = $1",
            &[&id.as_str()],
        )?;
        Ok(n > 0)
    }

    fn get_session(&self, id: &SessionId) -> Result<Option<SessionRecord>, StoreError> {
        let op = "get session";
        self.row(
            op,
            &format!("SELECT {SESSION_COLS} FROM sessions WHERE id = $1"),
            &[&id.as_str()],
        )?
        .map(|r| session_row(&r).map_err(q(op))?.decode())
        .transpose()
    }

    fn sessions_open_since(
        &self,
        before: SystemTime,
    ) -> Result<Vec<(String, String, String, SystemTime)>, StoreError> {
        let op = "list old sessions";
        let rows = self.rows(
            op,
            "SELECT s.id, s.sandbox_id, sb.tenant, s.created_at FROM sessions s
             JOIN sandboxes sb ON sb.id = s.sandbox_id
             WHERE s.status = 'active' AND s.created_at < $1 ORDER BY s.seq",
            &[&to_nanos(before)],
        )?;
        decode(op, rows, |r| {
            Ok((
                r.try_get(0)?,
                r.try_get(1)?,
                r.try_get(2)?,
                from_nanos(r.try_get(3)?),
            ))
        })
    }

    fn list_sessions(&self, sandbox: &SandboxId) -> Result<Vec<SessionRecord>, StoreError> {
        let op = "list sessions";
        let rows = self.rows(
            op,
            &format!("SELECT {SESSION_COLS} FROM sessions WHERE sandbox_id = $1 ORDER BY seq"),
            &[&sandbox.as_str()],
        )?;
        decode(op, rows, session_row)?
            .into_iter()
            .map(RawSession::decode)
            .collect()
    }

    // ---- keys and tenants --------------------------------------------------------------

    fn insert_key(&self, k: &KeyRecord, hash: &[u8]) -> Result<(), StoreError> {
        let op = "insert key";
        let mut conn = self.conn()?;
        let mut tx = begin(&mut conn).map_err(q(op))?;
        tx.execute(
            "INSERT INTO tenants (name, created_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&k.tenant, &to_nanos(k.created_at)],
        )
        .map_err(q("insert tenant"))?;
        tx.execute(
            &format!(
                "INSERT INTO api_keys ({KEY_COLS}, hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
            ),
            &[
                &k.id,
                &k.tenant,
                &k.scopes.join(","),
                &k.sandbox_id,
                &to_nanos(k.created_at),
                &k.expires_at.map(to_nanos),
                &k.last_used_at.map(to_nanos),
                &k.revoked_at.map(to_nanos),
                &k.parent_id,
                &hash,
            ],
        )
        .map_err(q(op))?;
        tx.commit().map_err(q(op))
    }

    fn key(&self, id: &str, now: SystemTime) -> Result<Option<KeyLookup>, StoreError> {
        let op = "get key";
        let Some(r) = self.row(
            op,
            "SELECT k.id, k.tenant, k.scopes, k.sandbox_id, k.created_at, k.expires_at,
             k.last_used_at, k.revoked_at, k.parent_id, k.hash, t.blocked_at IS NOT NULL,
             k.parent_id IS NOT NULL AND (p.id IS NULL OR p.revoked_at IS NOT NULL
                 OR (p.expires_at IS NOT NULL AND p.expires_at <= $2))
             FROM api_keys k LEFT JOIN tenants t ON t.name = k.tenant
             LEFT JOIN api_keys p ON p.id = k.parent_id
             WHERE k.id = $1",
            &[&id, &to_nanos(now)],
        )?
        else {
            return Ok(None);
        };
        let lookup = (|| {
            Ok::<_, postgres::Error>(KeyLookup {
                key: key_row(&r)?,
                hash: r.try_get(9)?,
                tenant_blocked: r.try_get(10)?,
                parent_dead: r.try_get(11)?,
            })
        })()
        .map_err(q(op))?;
        Ok(Some(lookup))
    }

    fn key_ids(&self) -> Result<Vec<String>, StoreError> {
        let op = "key ids";
        strings(op, self.rows(op, "SELECT id FROM api_keys", &[])?)
    }

    fn count_tokens_of(&self, sandbox_id: &str) -> Result<u64, StoreError> {
        self.count(
            "count tokens",
            "SELECT COUNT(*) FROM api_keys WHERE sandbox_id = $1",
            &[&sandbox_id],
        )
    }

    fn running_of_blocked(&self) -> Result<Vec<(String, String)>, StoreError> {
        let op = "running of blocked";
        let rows = self.rows(
            op,
            "SELECT s.id, s.tenant FROM sandboxes s JOIN tenants t ON t.name = s.tenant
             WHERE t.blocked_at IS NOT NULL AND s.status = 'running' ORDER BY s.seq",
            &[],
        )?;
        string_pairs(op, rows)
    }

    fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        let op = "list keys";
        let rows = self.rows(
            op,
            &format!("SELECT {KEY_COLS} FROM api_keys ORDER BY created_at, id COLLATE \"C\""),
            &[],
        )?;
        decode(op, rows, key_row)
    }

    fn revoke_key(&self, id: &str, now: SystemTime) -> Result<bool, StoreError> {
        let n = self.exec(
            "revoke key",
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $2) WHERE id = $1",
            &[&id, &to_nanos(now)],
        )?;
        Ok(n > 0)
    }

    fn touch_key(&self, id: &str, now: SystemTime) -> Result<(), StoreError> {
        self.exec(
            "touch key",
            "UPDATE api_keys SET last_used_at = $2 WHERE id = $1",
            &[&id, &to_nanos(now)],
        )
        .map(drop)
    }

    fn delete_tokens_of(&self, sandbox_id: &str) -> Result<(), StoreError> {
        self.exec(
            "delete sandbox tokens",
            "DELETE FROM api_keys WHERE sandbox_id = $1",
            &[&sandbox_id],
        )
        .map(drop)
    }

    fn block_tenant(&self, name: &str, reason: &str, now: SystemTime) -> Result<bool, StoreError> {
        let op = "block tenant";
        let mut conn = self.conn()?;
        let mut tx = begin(&mut conn).map_err(q(op))?;
        tx.execute(
            "INSERT INTO tenants (name, created_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&name, &to_nanos(now)],
        )
        .map_err(q(op))?;
        let n = tx
            .execute(
                "UPDATE tenants SET blocked_at = $2, block_reason = $3, block_enforced_at = NULL
                 WHERE name = $1 AND blocked_at IS NULL",
                &[&name, &to_nanos(now), &reason],
            )
            .map_err(q(op))?;
        tx.commit().map_err(q(op))?;
        Ok(n > 0)
    }

    fn unblock_tenant(&self, name: &str) -> Result<bool, StoreError> {
        let n = self.exec(
            "unblock tenant",
            "UPDATE tenants SET blocked_at = NULL, block_reason = NULL,
             block_enforced_at = NULL WHERE name = $1 AND blocked_at IS NOT NULL",
            &[&name],
        )?;
        Ok(n > 0)
    }

    fn tenant_blocked(&self, name: &str) -> Result<bool, StoreError> {
        let op = "tenant blocked";
        match self.row(
            op,
            "SELECT blocked_at IS NOT NULL FROM tenants WHERE name = $1",
            &[&name],
        )? {
            Some(r) => r.try_get(0).map_err(q(op)),
            None => Ok(false),
        }
    }

    fn list_tenants(&self) -> Result<Vec<TenantRecord>, StoreError> {
        let op = "list tenants";
        let rows = self.rows(
            op,
            "SELECT name, created_at, blocked_at, block_reason FROM tenants ORDER BY name COLLATE \"C\"",
            &[],
        )?;
        decode(op, rows, |r| {
            Ok(TenantRecord {
                name: r.try_get(0)?,
                created_at: from_nanos(r.try_get(1)?),
                blocked_at: r.try_get::<_, Option<i64>>(2)?.map(from_nanos),
                block_reason: r.try_get(3)?,
            })
        })
    }

    fn blocks_to_enforce(&self) -> Result<Vec<(String, String)>, StoreError> {
        let op = "pending blocks";
        let rows = self.rows(
            op,
            "SELECT name, COALESCE(block_reason, '') FROM tenants
             WHERE blocked_at IS NOT NULL AND block_enforced_at IS NULL
             ORDER BY name COLLATE \"C\"",
            &[],
        )?;
        string_pairs(op, rows)
    }

    fn block_enforced(&self, name: &str, now: SystemTime) -> Result<(), StoreError> {
        self.exec(
            "block enforced",
            "UPDATE tenants SET block_enforced_at = $2 WHERE name = $1",
            &[&name, &to_nanos(now)],
        )
        .map(drop)
    }

    fn tenant_usage(&self, tenant: &str) -> Result<TenantUsage, StoreError> {
        let op = "tenant usage";
        let r = self
            .row(
                op,
                "SELECT (SELECT COUNT(*) FROM sandboxes WHERE tenant = $1),
                 (SELECT COUNT(*) FROM sandboxes WHERE tenant = $1 AND status = 'running'),
                 (SELECT COALESCE(SUM(size), 0)::BIGINT FROM codebases WHERE tenant = $1)",
                &[&tenant],
            )?
            .ok_or(StoreError::Corrupt {
                what: "tenant usage",
                id: tenant.to_owned(),
                detail: "no row".into(),
            })?;
        let get = |i| {
            r.try_get::<_, i64>(i)
                .map(|n| n.max(0) as u64)
                .map_err(q(op))
        };
        Ok(TenantUsage {
            sandboxes: get(0)?,
            running: get(1)?,
            codebase_bytes: get(2)?,
        })
    }

    // ---- nodes -------------------------------------------------------------------------

    fn register_node(&self, n: &NodeRecord) -> Result<(), StoreError> {
        self.exec(
            "register node",
            REGISTER_NODE_SQL,
            &[
                &n.id,
                &n.boot_id,
                &i64::from(n.cpus),
                &i64::try_from(n.memory_bytes).unwrap_or(i64::MAX),
                &to_nanos(n.registered_at),
                &n.host,
            ],
        )
        .map(drop)
    }

    fn heartbeat_node(&self, id: &str, boot_id: &str) -> Result<Beat, StoreError> {
        let op = "node heartbeat";
        let mut conn = self.conn()?;
        let n = conn
            .execute(&heartbeat_sql(NOW), &[&id, &boot_id])
            .map_err(q(op))?;
        if n > 0 {
            return Ok(Beat::Alive);
        }
        let row = conn
            .query_opt(NODE_STATE_SQL, &[&id])
            .map_err(q(op))?
            .map(|r| Ok::<_, postgres::Error>((r.try_get(0)?, r.try_get(1)?)))
            .transpose()
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
        let mut conn = self.conn()?;
        let mut tx = begin(&mut conn).map_err(q(op))?;
        let now: i64 = tx
            .query_one(&format!("SELECT {NOW}"), &[])
            .and_then(|r| r.try_get(0))
            .map_err(q(op))?;
        // FOR SHARE: nobody takes the lease over until this transaction has ended.
        let held = tx
            .query(
                &format!("{} FOR SHARE", lost_sql::HELD),
                &[&SERVER_LEASE, &holder, &now],
            )
            .map_err(q(op))?;
        if held.is_empty() {
            return Ok(Vec::new());
        }
        // FOR UPDATE: two replicas marking at once declare each node lost once.
        let stale = tx
            .query(
                &format!("{} FOR UPDATE", lost_sql::STALE),
                &[&keeper, &stale_before(now, lost_after)],
            )
            .map_err(q(op))?
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .collect::<Result<Vec<(String, String, i64)>, postgres::Error>>()
            .map_err(q(op))?;
        let mut lost = Vec::new();
        for node in stale {
            let (id, host, beat) = (&node.0, &node.1, node.2);
            tx.execute(lost_sql::MARK, &[&now, id]).map_err(q(op))?;
            let moved = tx
                .query(lost_sql::MOVE, &[&keeper, id])
                .map_err(q(op))?
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<Vec<String>, _>>()
                .map_err(q(op))?;
            let reason = super::lost_reason(id, host, from_nanos(beat));
            let sandboxes = tx
                .query(lost_sql::LOSE, &[&reason, &now, id])
                .map_err(q(op))?
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect::<Result<Vec<(String, String)>, postgres::Error>>()
                .map_err(q(op))?;
            tx.execute(lost_sql::CLOSE_SESSIONS, &[&now, id])
                .map_err(q(op))?;
            lost.push(lost_node(node, now, moved, sandboxes)?);
        }
        tx.commit().map_err(q(op))?;
        Ok(lost)
    }

    fn holds_claim(&self, name: &str, holder: &str, node: &str) -> Result<bool, StoreError> {
        let op = "check claim";
        let row = self
            .conn()?
            .query_one(&holds_claim_sql(NOW), &[&name, &holder, &node])
            .map_err(q(op))?;
        let held: i64 = row.try_get(0).map_err(q(op))?;
        let lost: i64 = row.try_get(1).map_err(q(op))?;
        Ok(held > 0 && lost == 0)
    }

    fn get_node(&self, id: &str) -> Result<Option<NodeRecord>, StoreError> {
        let op = "get node";
        self.row(
            op,
            &format!("SELECT {NODE_COLS} FROM nodes WHERE id = $1"),
            &[&id],
        )?
        .map(|r| node_row(&r).map(RawNode::decode).map_err(q(op)))
        .transpose()
    }

    fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let op = "list nodes";
        let rows = self.rows(
            op,
            &format!("SELECT {NODE_COLS} FROM nodes ORDER BY id COLLATE \"C\""),
            &[],
        )?;
        Ok(decode(op, rows, node_row)?
            .into_iter()
            .map(RawNode::decode)
            .collect())
    }

    fn remove_lost_node(&self, id: &str) -> Result<bool, StoreError> {
        let n = self.exec(
            "remove node",
            "DELETE FROM nodes WHERE id = $1 AND lost_at IS NOT NULL",
            &[&id],
        )?;
        Ok(n > 0)
    }

    fn set_node_draining(&self, id: &str, draining: bool) -> Result<bool, StoreError> {
        let n = self.exec(
            "drain node",
            "UPDATE nodes SET draining = $2 WHERE id = $1",
            &[&id, &draining],
        )?;
        Ok(n > 0)
    }

    fn set_sandbox_node(&self, id: &SandboxId, node: &str) -> Result<(), StoreError> {
        self.exec(
            "set sandbox node",
            "UPDATE sandboxes SET node = $2 WHERE id = $1 AND lost_at IS NULL",
            &[&id.as_str(), &node],
        )
        .map(drop)
    }

    // ---- leases ------------------------------------------------------------------------

    fn try_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, StoreError> {
        let sql = lease_sql(NOW);
        let n = self.exec("take lease", &sql, &[&name, &holder, &ttl_nanos(ttl)])?;
        Ok(n > 0)
    }

    fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        self.exec(
            "release lease",
            "DELETE FROM leases WHERE name = $1 AND holder = $2",
            &[&name, &holder],
        )
        .map(drop)
    }

    fn shared(&self) -> bool {
        true
    }
}
