//! Server configuration: YAML parsed once into typed structs, checked, then passed down.
//!
//! Keys follow the original AgentFense (`server.grpc_addr`, `storage.codebase_path`,
//! `runtime.default_timeout`, `sandbox.max_per_user`, `logging.level`, ...) plus our additions
//! (`storage.data_dir`, `logging.audit_path`, output caps, resource defaults, network policy).
//! Unknown keys and bad values are errors that name the key. Durations are written like
//! `30s`, `10m`, `24h`. Relative paths in a file are resolved against the file's directory.
//! See `config/agentfense.example.yaml` for every key with its default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use agentfense_core::{ResourceLimits, RuntimeKind};
use serde::Deserialize;

mod auth;
mod network;

pub use auth::{AuthConfig, QuotaConfig, TenantQuota, TlsConfig};
pub use network::{NetworkConfig, REGISTRIES};

/// A configuration that could not be loaded or is inconsistent.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The YAML does not fit the schema (the message names the key).
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// serde's message, which names the offending key.
        message: String,
    },
    /// A value is out of range or inconsistent with another.
    #[error("config key {key}: {message}")]
    Invalid {
        /// Dotted key, e.g. `server.grpc_addr`.
        key: &'static str,
        /// What is wrong and what to do.
        message: String,
    },
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable text.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Listening addresses.
    pub server: ServerConfig,
    /// Where data lives.
    pub storage: StorageConfig,
    /// Command execution.
    pub runtime: RuntimeConfig,
    /// Sandbox lifecycle and quotas.
    pub sandbox: SandboxConfig,
    /// Logs and the audit trail.
    pub logging: LoggingConfig,
    /// The policy every sandbox gets, whatever its rules.
    pub policy: PolicyConfig,
    /// Authentication.
    pub auth: AuthConfig,
    /// Per-tenant limits.
    pub quotas: QuotaConfig,
    /// What sandboxes with an egress policy may reach.
    pub network: NetworkConfig,
    /// Built-in alert rules and where alerts go.
    pub alerts: crate::alerts::AlertsConfig,
    /// Nodes sharing the metadata database.
    pub nodes: NodesConfig,
}

/// `nodes.*`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodesConfig {
    /// A node that sends no heartbeat for this long is lost (default 5 min, at least 1 min):
    /// its sandboxes go to ERROR with the reason, their unpublished changes are gone, and
    /// the node stops what it still runs of them if it comes back. Heartbeats go every 10 s.
    #[serde(with = "humantime_serde")]
    pub lost_after: Duration,
}

impl NodesConfig {
    /// The shortest `lost_after`: several missed heartbeats, and longer than a claim lasts
    /// (60 s), so a node is never declared lost while its claim could still be valid.
    pub const MIN_LOST_AFTER: Duration = Duration::from_secs(60);
}

impl Default for NodesConfig {
    fn default() -> Self {
        NodesConfig {
            lost_after: Duration::from_secs(300),
        }
    }
}

/// `policy.*`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// The mandatory floor: rules applied to every sandbox of every runtime, ranked above all
    /// of its own rules (no client rule can lift one), named `policy.mandatory: <pattern>` in
    /// `permission_denied` events. Default: real secret material hidden
    /// ([`agentfense_core::presets::FLOOR_PATTERNS`]); `[]` turns it off.
    pub mandatory: Vec<agentfense_core::PermissionRule>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            mandatory: agentfense_core::presets::default_floor(),
        }
    }
}

/// `server.*`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// gRPC listen address.
    pub grpc_addr: String,
    /// REST listen address; empty disables the REST gateway.
    pub http_addr: String,
    /// Replaced by `auth.enabled` (kept only to name its replacement when a config sets it).
    pub allow_remote: Option<bool>,
    /// The unix socket the API (gRPC) also listens on: absent = `<data_dir>/agentfense.sock`,
    /// `""` = none. Peers are identified by their uid (`auth.unix_users`).
    pub unix_socket: Option<PathBuf>,
    /// Group that owns the unix socket (mode 0660); absent = the server's own group.
    pub unix_socket_group: Option<String>,
    /// Host names (besides loopback names and addresses) REST requests may carry in `Host`.
    pub allowed_hosts: Vec<String>,
    /// Origins (`scheme://host[:port]`) whose browser requests REST accepts; none by default.
    pub cors_origins: Vec<String>,
    /// TLS for the gRPC and REST listeners.
    pub tls: TlsConfig,
    /// Longest a request may take before it is answered (gRPC DEADLINE_EXCEEDED / HTTP 408)
    /// and its handler dropped; a streamed response may go on after its first bytes. `0s`
    /// (the default) means `runtime.max_timeout` plus one minute, so that no command the
    /// server accepts outlives its request.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Where Prometheus metrics are served (`GET /metrics`), e.g. `127.0.0.1:9100`; empty (the
    /// default) serves none. A loopback address only: metrics carry no authentication.
    pub metrics_addr: String,
}

impl ServerConfig {
    /// [`ServerConfig::request_timeout`], with its default resolved against `runtime`.
    pub fn request_timeout(&self, runtime: &RuntimeConfig) -> Duration {
        if self.request_timeout.is_zero() {
            runtime.max_timeout + Duration::from_secs(60)
        } else {
            self.request_timeout
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            grpc_addr: "127.0.0.1:9000".into(),
            http_addr: "127.0.0.1:8080".into(),
            allow_remote: None,
            unix_socket: None,
            unix_socket_group: None,
            allowed_hosts: Vec::new(),
            cors_origins: Vec::new(),
            tls: TlsConfig::default(),
            request_timeout: Duration::ZERO,
            metrics_addr: String::new(),
        }
    }
}

/// `storage.*`: everything lives under `data_dir` unless a path is given explicitly.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Root of all state (default: `/var/lib/agentfense` as root, else
    /// `$XDG_DATA_HOME/agentfense` or `~/.local/share/agentfense`).
    pub data_dir: Option<PathBuf>,
    /// Codebase files (default `<data_dir>/codebases`).
    pub codebase_path: Option<PathBuf>,
    /// FUSE mount points and per-sandbox deltas (default `<data_dir>/mounts`).
    pub mount_path: Option<PathBuf>,
    /// SQLite database (default `<data_dir>/agentfense.db`), used unless `database_url` is
    /// set.
    pub db_path: Option<PathBuf>,
    /// PostgreSQL for the metadata instead of the SQLite file
    /// (`postgres://user:password@host:5432/dbname`).
    pub database_url: Option<DatabaseUrl>,
    /// PEM certificates of the CAs trusted for PostgreSQL's server certificate (default: the
    /// public web roots). TLS is negotiated as the URL's `sslmode` says.
    pub database_ca_file: Option<PathBuf>,
    /// Largest accepted uploaded file, bytes (default 1 GiB).
    pub max_upload_bytes: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            data_dir: None,
            codebase_path: None,
            mount_path: None,
            db_path: None,
            database_url: None,
            database_ca_file: None,
            max_upload_bytes: 1 << 30,
        }
    }
}

/// `storage.database_url`: kept as written, shown without its password.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct DatabaseUrl(pub String);

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match crate::store::check_url(&self.0) {
            Ok(shown) => write!(f, "{shown:?}"),
            Err(_) => f.write_str("\"<not a PostgreSQL URL>\""),
        }
    }
}

/// `runtime.*`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Which runtime runs commands.
    #[serde(rename = "type")]
    pub kind: RuntimeKind,
    /// The bubblewrap executable (a bare name is looked up in `PATH`).
    pub bwrap_path: PathBuf,
    /// The sandbox init binary (default: the server executable itself, which doubles as init).
    pub init_path: Option<PathBuf>,
    /// Timeout of a command whose request gives none.
    #[serde(with = "humantime_serde")]
    pub default_timeout: Duration,
    /// Cap on any command's timeout.
    #[serde(with = "humantime_serde")]
    pub max_timeout: Duration,
    /// Cap on captured stdout and on stderr of one unary exec, bytes each.
    pub output_limit_bytes: u64,
    /// Whether sandboxes may ask for networking (label `agentfense.network=host`).
    pub allow_network: bool,
    /// Most bytes a sandbox's `/tmp` may take (0: whatever its disk quota leaves, which it
    /// always counts against).
    pub tmp_bytes: u64,
    /// Limits applied when a request gives none (0 = no limit).
    pub default_resources: ResourceLimits,
    /// The most a request may ask for, per field (0 = no ceiling): a request above it, or one
    /// that would be unlimited, is refused with INVALID_ARGUMENT naming the field.
    pub max_resources: ResourceLimits,
    /// Most host files the policy filesystem holds open for one sandbox (files created and
    /// still open, passthrough opens): past it the sandbox gets EMFILE and a
    /// `resource_limit_exceeded` event with `limit: "open_files"`; other sandboxes and the API,
    /// which share the server's descriptor table, are unaffected.
    pub open_files_per_sandbox: usize,
    /// Run each bubblewrap sandbox in a user namespace of its own, mapped onto a block of
    /// host ids that belongs to no host account and to no other sandbox (default true). Turn
    /// off only on hosts that forbid unprivileged user namespaces; the init then runs as host
    /// root and every sandbox's user is host uid 1000.
    pub user_namespace: bool,
    /// First host uid (and gid) of the sandboxes' id blocks (65,536 ids each, 16,384 blocks);
    /// the range must hold no account or subordinate range of the host (checked at start).
    pub sandbox_uid_base: u32,
    /// Docker runtime settings.
    pub docker: DockerConfig,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            kind: RuntimeKind::Bwrap,
            bwrap_path: "bwrap".into(),
            init_path: None,
            default_timeout: Duration::from_secs(30),
            max_timeout: Duration::from_secs(600),
            output_limit_bytes: 1 << 20,
            allow_network: false,
            tmp_bytes: 0,
            // A sandbox without limits can take the host down with one fork bomb: default to a
            // generous but finite process cap and memory limit.
            default_resources: ResourceLimits {
                memory_bytes: 2 << 30,
                pids_limit: 1024,
                // A write rule must not let a sandbox fill the host's disk.
                disk_bytes: 10 << 30,
                disk_inodes: 1_000_000,
                ..ResourceLimits::default()
            },
            // Requests may go well beyond the defaults, but never unbounded: one sandbox must
            // not be able to ask for the host.
            max_resources: ResourceLimits {
                memory_bytes: 8 << 30,
                pids_limit: 16384,
                disk_bytes: 64 << 30,
                ..ResourceLimits::default()
            },
            open_files_per_sandbox: agentfense_fs::DEFAULT_MAX_OPEN_FILES,
            user_namespace: true,
            sandbox_uid_base: agentfense_runtime::userns::DEFAULT_BASE,
            docker: DockerConfig::default(),
        }
    }
}

/// `runtime.docker.*`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DockerConfig {
    /// Docker endpoint (default: the local socket).
    pub host: Option<String>,
    /// Image used when a request gives none.
    pub default_image: String,
    /// Network mode for sandboxes that may have networking.
    pub network_mode: String,
    /// Whether containers may get a network at all.
    pub enable_networking: bool,
}

impl Default for DockerConfig {
    fn default() -> Self {
        DockerConfig {
            host: None,
            default_image: "ubuntu:22.04".into(),
            network_mode: "none".into(),
            enable_networking: false,
        }
    }
}

/// `sandbox.*`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxConfig {
    /// Lifetime of a sandbox whose request gives no `expires_in`.
    #[serde(with = "humantime_serde")]
    pub default_expiration: Duration,
    /// Most sandboxes per codebase owner (0 = unlimited).
    pub max_per_user: u32,
    /// How often expired sandboxes are destroyed.
    #[serde(with = "humantime_serde")]
    pub cleanup_interval: Duration,
    /// How long the kernel may keep a sandbox's names and attributes without asking its
    /// filesystem again (default 1 h). Every change the server makes (this sandbox's writes,
    /// another's publish, an upload, a rules change) is invalidated at once whatever this
    /// is; only a change made to `<data_dir>/codebases` behind the server's back waits for
    /// it. A longer value means no slow first pass after an agent's pause.
    #[serde(with = "humantime_serde")]
    pub cache_ttl: Duration,
    /// Retention of checkpoints (`sandbox.checkpoints.*`).
    pub checkpoints: CheckpointConfig,
}

/// `sandbox.checkpoints.*`: how many checkpoints of its changes a sandbox keeps, and for how
/// long. Applied whenever one is taken or listed; the oldest go first.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Most checkpoints per sandbox (default 20; 0 = no limit).
    pub keep: usize,
    /// Checkpoints older than this are deleted (default 7 days; 0 = kept until the sandbox
    /// is destroyed).
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            keep: 20,
            ttl: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            default_expiration: Duration::from_secs(24 * 3600),
            max_per_user: 10,
            cleanup_interval: Duration::from_secs(300),
            cache_ttl: Duration::from_secs(3600),
            checkpoints: CheckpointConfig::default(),
        }
    }
}

/// `logging.*`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// `error`, `warn`, `info`, `debug`, `trace`, or an `EnvFilter` directive.
    pub level: String,
    /// Log line format.
    pub format: LogFormat,
    /// Audit trail, JSON lines (default `<data_dir>/audit.jsonl`).
    pub audit_path: Option<PathBuf>,
    /// Rotated audit files older than this are deleted (default 90 days; 0 = kept forever).
    #[serde(with = "humantime_serde")]
    pub audit_retention: Duration,
    /// The audit file is rotated past this many bytes (default 100 MiB; 0 = never by size).
    pub audit_rotate_bytes: u64,
    /// The audit file is rotated at the first record of each UTC day (default true).
    pub audit_rotate_daily: bool,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            level: "info".into(),
            format: LogFormat::Text,
            audit_path: None,
            audit_retention: Duration::from_secs(90 * 24 * 3600),
            audit_rotate_bytes: 100 << 20,
            audit_rotate_daily: true,
        }
    }
}

impl LoggingConfig {
    /// The audit trail's rotation and retention.
    pub fn trail_options(&self) -> crate::audit::TrailOptions {
        crate::audit::TrailOptions {
            rotate_bytes: self.audit_rotate_bytes,
            daily: self.audit_rotate_daily,
            retention: (!self.audit_retention.is_zero()).then_some(self.audit_retention),
        }
    }
}

/// Command-line overrides (`agentfense serve --data-dir ... --grpc-addr ...`), applied after
/// the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--data-dir`
    pub data_dir: Option<PathBuf>,
    /// `--grpc-addr`
    pub grpc_addr: Option<String>,
    /// `--http-addr`
    pub http_addr: Option<String>,
    /// `--runtime`
    pub runtime: Option<RuntimeKind>,
    /// Where the binary found the init executable (used when the config names none).
    pub init_path: Option<PathBuf>,
    /// `runtime.bwrap_path` resolved against `PATH` by the binary.
    pub bwrap_path: Option<PathBuf>,
}

/// Every path the server uses, resolved to absolute form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    /// Root of all state.
    pub data_dir: PathBuf,
    /// Codebase file trees, one directory per codebase.
    pub codebases: PathBuf,
    /// FUSE mount points and deltas.
    pub mounts: PathBuf,
    /// SQLite database file.
    pub db: PathBuf,
    /// Audit log file.
    pub audit: PathBuf,
}

/// A checked configuration with resolved paths and listen addresses.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The configuration as loaded (after overrides).
    pub config: Config,
    /// Resolved paths.
    pub paths: Paths,
    /// gRPC listen address.
    pub grpc_addr: SocketAddr,
    /// REST listen address, if enabled.
    pub http_addr: Option<SocketAddr>,
    /// The API's unix socket, if enabled.
    pub unix_socket: Option<PathBuf>,
}

impl Config {
    /// Parses YAML text. `origin` names the source in errors.
    pub fn from_yaml(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        yaml_serde::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.to_string(),
        })
    }

    /// Reads and parses a file; relative paths inside it are resolved against its directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut cfg = Config::from_yaml(&text, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let base = if base.as_os_str().is_empty() {
            Path::new(".")
        } else {
            base
        };
        for p in [
            &mut cfg.storage.data_dir,
            &mut cfg.storage.codebase_path,
            &mut cfg.storage.mount_path,
            &mut cfg.storage.db_path,
            &mut cfg.storage.database_ca_file,
            &mut cfg.logging.audit_path,
            &mut cfg.server.unix_socket,
            &mut cfg.server.tls.cert,
            &mut cfg.server.tls.key,
            &mut cfg.server.tls.client_ca,
        ]
        .into_iter()
        .flatten()
        {
            // Empty means "none" (`server.unix_socket: ""` turns the socket off).
            if p.is_relative() && !p.as_os_str().is_empty() {
                *p = base.join(&*p);
            }
        }
        Ok(cfg)
    }

    /// Applies overrides, checks every value and resolves paths. `default_data_dir` is used
    /// when neither the file nor the overrides name one (the binary picks it from the
    /// environment; libraries never read it).
    pub fn resolve(
        mut self,
        overrides: Overrides,
        default_data_dir: &Path,
    ) -> Result<Settings, ConfigError> {
        if let Some(d) = overrides.data_dir {
            self.storage.data_dir = Some(d);
        }
        if let Some(a) = overrides.grpc_addr {
            self.server.grpc_addr = a;
        }
        if let Some(a) = overrides.http_addr {
            self.server.http_addr = a;
        }
        if let Some(r) = overrides.runtime {
            self.runtime.kind = r;
        }
        if self.runtime.init_path.is_none() {
            self.runtime.init_path = overrides.init_path;
        }
        if let Some(b) = overrides.bwrap_path {
            self.runtime.bwrap_path = b;
        }

        let grpc_addr = parse_addr("server.grpc_addr", &self.server.grpc_addr)?;
        let http_addr = if self.server.http_addr.trim().is_empty() {
            None
        } else {
            Some(parse_addr("server.http_addr", &self.server.http_addr)?)
        };
        if self.server.allow_remote.is_some() {
            return Err(invalid(
                "server.allow_remote",
                "was replaced by auth.enabled: a non-loopback listener needs authentication \
                 (see docs/server.md, \"Authentication and tenants\")",
            ));
        }
        for (key, addr) in [
            ("server.grpc_addr", Some(grpc_addr)),
            ("server.http_addr", http_addr),
        ] {
            if let Some(addr) = addr
                && !addr.ip().is_loopback()
                && !self.auth.enabled
            {
                return Err(ConfigError::Invalid {
                    key,
                    message: format!(
                        "{addr} is not a loopback address: set auth.enabled: true and create \
                         keys with `agentfense keys create` to expose the API"
                    ),
                });
            }
        }
        let tls = &self.server.tls;
        if tls.cert.is_some() != tls.key.is_some() {
            return Err(invalid("server.tls", "cert and key must be given together"));
        }
        if tls.client_ca.is_some() && !tls.enabled() {
            return Err(invalid(
                "server.tls.client_ca",
                "needs server.tls.cert and server.tls.key",
            ));
        }
        for origin in &self.server.cors_origins {
            if !(origin.starts_with("http://") || origin.starts_with("https://"))
                || origin.trim_end_matches('/').matches('/').count() != 2
            {
                return Err(invalid(
                    "server.cors_origins",
                    format!("{origin:?} is not an origin (scheme://host[:port])"),
                ));
            }
        }
        if let Some(c) = &self.network.ceiling {
            agentfense_core::egress::EgressPolicy::parse(&c.join(","), &self.network.presets)
                .map_err(|e| invalid("network.ceiling", e.to_string()))?;
        }
        for (name, list) in &self.network.presets {
            for e in list {
                agentfense_core::egress::parse_entry(e)
                    .map_err(|err| invalid("network.presets", format!("{name}: {err}")))?;
            }
        }
        for c in &self.network.private_allow {
            let ok = agentfense_core::egress::parse_entry(c)
                .is_ok_and(|e| matches!(e.target, agentfense_core::egress::Target::Block(_)));
            if !ok {
                return Err(invalid(
                    "network.private_allow",
                    format!("{c:?} is not an address block (e.g. 10.20.0.0/16)"),
                ));
            }
        }
        for name in self.network.hosts.keys() {
            if agentfense_core::egress::normalize_name(name).is_none() {
                return Err(invalid(
                    "network.hosts",
                    format!("{name:?} is not a host name"),
                ));
            }
        }
        self.network
            .upstream_dns_addrs()
            .map_err(|e| invalid("network.upstream_dns", e))?;
        if let Err(e) = agentfense_core::Policy::compile(self.policy.mandatory.clone()) {
            return Err(invalid("policy.mandatory", e.to_string()));
        }
        let rt = &self.runtime;
        if rt.default_timeout.is_zero() {
            return Err(invalid("runtime.default_timeout", "must be greater than 0"));
        }
        if rt.max_timeout < rt.default_timeout {
            return Err(invalid(
                "runtime.max_timeout",
                format!(
                    "{} is shorter than runtime.default_timeout ({})",
                    humantime::format_duration(rt.max_timeout),
                    humantime::format_duration(rt.default_timeout)
                ),
            ));
        }
        if let Some((field, value, ceiling)) = rt.default_resources.exceeds(&rt.max_resources) {
            return Err(ConfigError::Invalid {
                key: "runtime.default_resources",
                message: format!(
                    "{field} = {value}{} is above runtime.max_resources.{field} = {ceiling}",
                    if value == 0 { " (unlimited)" } else { "" }
                ),
            });
        }
        if rt.open_files_per_sandbox == 0 {
            return Err(invalid(
                "runtime.open_files_per_sandbox",
                "must be greater than 0",
            ));
        }
        // Keep a unary ExecResult far below gRPC's 4 MiB message limit (stdout + stderr).
        if rt.output_limit_bytes == 0 || rt.output_limit_bytes > 1536 * 1024 {
            return Err(invalid(
                "runtime.output_limit_bytes",
                "must be between 1 and 1572864 (1.5 MiB), so that a result fits a 4 MiB gRPC message",
            ));
        }
        if let Some(url) = &self.storage.database_url {
            crate::store::check_url(&url.0)
                .map_err(|e| invalid("storage.database_url", e.to_string()))?;
        } else if self.storage.database_ca_file.is_some() {
            return Err(invalid(
                "storage.database_ca_file",
                "needs storage.database_url (it is for PostgreSQL's certificate)",
            ));
        }
        if self.nodes.lost_after < NodesConfig::MIN_LOST_AFTER {
            return Err(invalid(
                "nodes.lost_after",
                format!(
                    "{} is shorter than {}: a node must miss several heartbeats (every 10 s) \
                     and outlive its 60 s claim before it is declared lost",
                    humantime::format_duration(self.nodes.lost_after),
                    humantime::format_duration(NodesConfig::MIN_LOST_AFTER)
                ),
            ));
        }
        if self.sandbox.cleanup_interval.is_zero() {
            return Err(invalid(
                "sandbox.cleanup_interval",
                "must be greater than 0",
            ));
        }
        if self.sandbox.default_expiration.is_zero() {
            return Err(invalid(
                "sandbox.default_expiration",
                "must be greater than 0",
            ));
        }

        let data_dir = absolute(
            self.storage
                .data_dir
                .clone()
                .unwrap_or_else(|| default_data_dir.to_owned()),
        )?;
        let paths = Paths {
            codebases: absolute(
                self.storage
                    .codebase_path
                    .clone()
                    .unwrap_or_else(|| data_dir.join("codebases")),
            )?,
            mounts: absolute(
                self.storage
                    .mount_path
                    .clone()
                    .unwrap_or_else(|| data_dir.join("mounts")),
            )?,
            db: absolute(
                self.storage
                    .db_path
                    .clone()
                    .unwrap_or_else(|| data_dir.join("agentfense.db")),
            )?,
            audit: absolute(
                self.logging
                    .audit_path
                    .clone()
                    .unwrap_or_else(|| data_dir.join("audit.jsonl")),
            )?,
            data_dir,
        };
        let unix_socket = match &self.server.unix_socket {
            None => Some(paths.data_dir.join("agentfense.sock")),
            Some(p) if p.as_os_str().is_empty() => None,
            Some(p) => Some(absolute(p.clone())?),
        };
        Ok(Settings {
            config: self,
            paths,
            grpc_addr,
            http_addr,
            unix_socket,
        })
    }

    /// Largest accepted uploaded file, bytes.
    pub fn max_upload_bytes(&self) -> u64 {
        self.storage.max_upload_bytes
    }
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

fn parse_addr(key: &'static str, s: &str) -> Result<SocketAddr, ConfigError> {
    // The original's ":9000" form means every interface; keep accepting it.
    let s = s.trim();
    let candidate = if let Some(port) = s.strip_prefix(':') {
        format!("0.0.0.0:{port}")
    } else if let Some(port) = s.strip_prefix("localhost:") {
        format!("127.0.0.1:{port}")
    } else {
        s.to_owned()
    };
    candidate.parse().map_err(|_| {
        invalid(
            key,
            format!("{s:?} is not an address like 127.0.0.1:9000 or [::1]:9000"),
        )
    })
}

fn absolute(p: PathBuf) -> Result<PathBuf, ConfigError> {
    std::path::absolute(&p)
        .map_err(|e| invalid("storage", format!("cannot resolve {}: {e}", p.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    fn resolve(yaml: &str) -> Result<Settings, ConfigError> {
        Config::from_yaml(yaml, Path::new("test.yaml"))?
            .resolve(Overrides::default(), Path::new("/var/lib/agentfense"))
    }

    #[test]
    fn embedded_default_is_loopback_bwrap_under_one_data_dir() {
        let s = resolve("").unwrap();
        assert_eq!(s.grpc_addr, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(s.http_addr, Some("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(s.config.runtime.kind, RuntimeKind::Bwrap);
        assert_eq!(
            s.paths,
            Paths {
                data_dir: "/var/lib/agentfense".into(),
                codebases: "/var/lib/agentfense/codebases".into(),
                mounts: "/var/lib/agentfense/mounts".into(),
                db: "/var/lib/agentfense/agentfense.db".into(),
                audit: "/var/lib/agentfense/audit.jsonl".into(),
            }
        );
        assert_eq!(s.config.runtime.default_timeout, Duration::from_secs(30));
        assert_eq!(s.config.runtime.max_timeout, Duration::from_secs(600));
    }

    #[test]
    fn original_keys_parse() {
        let s = resolve(
            "server:\n  grpc_addr: 127.0.0.1:9100\n  http_addr: ''\n\
             storage:\n  codebase_path: /srv/cb\n  mount_path: /srv/mnt\n  db_path: /srv/db.sqlite\n\
             runtime:\n  type: docker\n  default_timeout: 5s\n  max_timeout: 1m\n  \
             docker:\n    default_image: debian:stable\n    enable_networking: false\n    network_mode: none\n\
             sandbox:\n  default_expiration: 1h\n  max_per_user: 3\n  cleanup_interval: 30s\n\
             logging:\n  level: debug\n  format: json\n",
        )
        .unwrap();
        assert_eq!(s.http_addr, None);
        assert_eq!(s.config.runtime.kind, RuntimeKind::Docker);
        assert_eq!(s.config.runtime.default_timeout, Duration::from_secs(5));
        assert_eq!(s.config.sandbox.max_per_user, 3);
        assert_eq!(s.config.logging.format, LogFormat::Json);
        assert_eq!(s.paths.codebases, PathBuf::from("/srv/cb"));
        assert_eq!(
            s.paths.audit,
            PathBuf::from("/var/lib/agentfense/audit.jsonl")
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let e = resolve("server:\n  grpc_adr: x\n").unwrap_err().to_string();
        assert!(e.contains("grpc_adr"), "{e}");
        let e = resolve("runtime:\n  default_timeout: soon\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("default_timeout"), "{e}");
        let e = resolve("runtime:\n  type: podman\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("podman"), "{e}");
        let e = resolve("runtime:\n  default_timeout: 1h\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("runtime.max_timeout"), "{e}");
        let e = resolve("server:\n  grpc_addr: nowhere\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("server.grpc_addr"), "{e}");
        // The metadata database: a URL this server can use, never echoing its password.
        for url in ["mysql://u:pw@h/db", "postgres://u:pw@h:notaport/db"] {
            let e = resolve(&format!("storage:\n  database_url: \"{url}\"\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("storage.database_url"), "{e}");
            assert!(!e.contains("pw"), "{e}");
        }
        let e = resolve("storage:\n  database_ca_file: ca.pem\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("storage.database_ca_file"), "{e}");
        let ok = resolve("storage:\n  database_url: postgres://u:pw@%2Frun%2Fpostgresql/db\n");
        // Settings are logged in debug output: never the password.
        let shown = format!("{ok:?}");
        assert!(
            shown.contains("postgres://u@/run/postgresql:5432/db"),
            "{shown}"
        );
        assert!(!shown.contains("pw"), "{shown}");
        let e = resolve("runtime:\n  default_resources:\n    pids_limit: -1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("pids_limit"), "{e}");
        // Defaults must fit under the ceiling, and be finite where one is set.
        let e = resolve("runtime:\n  default_resources:\n    memory_bytes: 0\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("runtime.default_resources")
                && e.contains("memory_bytes = 0 (unlimited)")
                && e.contains("runtime.max_resources.memory_bytes = 8589934592"),
            "{e}"
        );
        let e = resolve("runtime:\n  max_resources:\n    pids_limit: 100\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("pids_limit = 1024 is above"), "{e}");
        // A ceiling of 0 sets none.
        resolve("runtime:\n  default_resources:\n    memory_bytes: 0\n  max_resources:\n    memory_bytes: 0\n").unwrap();
    }

    #[test]
    fn the_shipped_example_config_loads_and_matches_the_defaults() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/agentfense.example.yaml");
        let example = Config::load(&path)
            .unwrap()
            .resolve(Overrides::default(), Path::new("/var/lib/agentfense"))
            .unwrap();
        let default = resolve("").unwrap();
        assert_eq!(
            format!("{:?}", example.config),
            format!("{:?}", default.config)
        );
        assert_eq!(example.paths, default.paths);
    }

    #[test]
    fn remote_binding_is_an_explicit_choice() {
        let e = resolve("server:\n  grpc_addr: 0.0.0.0:9000\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("auth.enabled") && e.contains("agentfense keys create"),
            "{e}"
        );
        let e = resolve("server:\n  grpc_addr: ':9000'\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("auth.enabled"), "{e}");
        // The old switch is gone and says what replaced it.
        let e = resolve("server:\n  grpc_addr: 0.0.0.0:9000\n  allow_remote: true\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("server.allow_remote") && e.contains("auth.enabled"),
            "{e}"
        );
        let s = resolve("server:\n  grpc_addr: 0.0.0.0:9000\nauth:\n  enabled: true\n").unwrap();
        assert!(s.grpc_addr.ip().is_unspecified());
        let e = resolve("server:\n  tls:\n    cert: c.pem\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("server.tls"), "{e}");
        let e = resolve("server:\n  cors_origins: [evil.example]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("server.cors_origins"), "{e}");
        let s = resolve("server:\n  grpc_addr: localhost:9001\n").unwrap();
        assert!(s.grpc_addr.ip().is_loopback());
    }

    #[test]
    fn overrides_win_and_relative_paths_follow_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.yaml");
        std::fs::write(
            &f,
            "storage:\n  data_dir: state\nserver:\n  grpc_addr: 127.0.0.1:1\n",
        )
        .unwrap();
        let s = Config::load(&f)
            .unwrap()
            .resolve(
                Overrides {
                    grpc_addr: Some("127.0.0.1:2".into()),
                    runtime: Some(RuntimeKind::Docker),
                    ..Overrides::default()
                },
                Path::new("/unused"),
            )
            .unwrap();
        assert_eq!(s.paths.data_dir, dir.path().join("state"));
        assert_eq!(s.grpc_addr.port(), 2);
        // Every path in the file, TLS files and the socket included.
        std::fs::write(
            &f,
            "server:\n  unix_socket: run/a.sock\n  tls:\n    cert: tls/c.pem\n    key: tls/k.pem\n    client_ca: tls/ca.pem\n",
        )
        .unwrap();
        let c = Config::load(&f).unwrap();
        let tls = &c.server.tls;
        assert_eq!(
            [
                c.server.unix_socket.as_deref(),
                tls.cert.as_deref(),
                tls.key.as_deref(),
                tls.client_ca.as_deref()
            ],
            [
                Some(dir.path().join("run/a.sock").as_path()),
                Some(dir.path().join("tls/c.pem").as_path()),
                Some(dir.path().join("tls/k.pem").as_path()),
                Some(dir.path().join("tls/ca.pem").as_path())
            ]
        );
        // An empty socket path still means no socket.
        std::fs::write(&f, "server:\n  unix_socket: \"\"\n").unwrap();
        let c = Config::load(&f).unwrap();
        assert_eq!(c.server.unix_socket.as_deref(), Some(Path::new("")));
        let none = c.resolve(Overrides::default(), dir.path()).unwrap();
        assert_eq!(none.unix_socket, None);
        assert_eq!(s.config.runtime.kind, RuntimeKind::Docker);
        let e = Config::load(&dir.path().join("missing.yaml")).unwrap_err();
        assert!(e.to_string().contains("missing.yaml"));
    }

    #[test]
    fn the_request_timeout_outlives_the_longest_command() {
        let s = resolve("").unwrap();
        assert_eq!(
            s.config.server.request_timeout(&s.config.runtime),
            Duration::from_secs(660)
        );
        let s = resolve("server:\n  request_timeout: 5s\n").unwrap();
        assert_eq!(
            s.config.server.request_timeout(&s.config.runtime),
            Duration::from_secs(5)
        );
    }
}
