//! Sandboxes: lifecycle (exactly the reference's state table, fixed), exec, sessions, expiry,
//! quotas, and the wiring of the policy filesystem to the runtime.
//!
//! Lifecycle operations on one sandbox are serialised by a per-sandbox lock (never a global
//! one): a slow mount or start of one sandbox does not stall the others.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use agentfense_core::{
    Level, PermissionRule, Policy, ResourceLimits, RuntimeKind, SandboxPath, SandboxStatus,
    SessionStatus,
};
use agentfense_fs::{FsConfig, IoMode, PublishMode, PublishReport};
use agentfense_runtime::{ErrorKind, ExecEvent, NetworkMode, Runtime, RuntimeError, SANDBOX_OWNER};
use tokio::sync::mpsc;

use super::mounter::{FuseMounter, Mounted, Mounter};
use super::{Service, blocking, page_args};
use crate::audit::{Actor, AuditEvent};
use crate::auth::Caller;
use crate::error::{ServiceError, chain};
use crate::ids::{CodebaseId, SandboxId, SessionId};
use crate::store::{LimitHit, Page, SandboxRecord, SessionRecord};

/// A sandbox's live resources while it runs.
pub(crate) struct Live {
    mount: Box<dyn Mounted>,
    runtime: Arc<dyn Runtime>,
    /// What a command needs of the sandbox's record; fixed while it runs, so exec does not
    /// read the store (session commands still read their session's record).
    id: SandboxId,
    codebase_id: CodebaseId,
    tenant: String,
    /// Its egress proxy, when it has an egress policy.
    pub(crate) egress: Option<super::egress::Egress>,
    /// A checkpoint before each command (`agentfense.checkpoint=auto`).
    auto_checkpoint: bool,
    /// `bwrap` or `docker` (a metrics label).
    runtime_kind: String,
    /// Permission denials since it started.
    denials: Arc<std::sync::atomic::AtomicU64>,
}

impl Live {
    /// `env` plus the proxy variables of a sandbox with an egress policy (`env` wins).
    fn with_proxy_env(&self, mut env: BTreeMap<String, String>) -> BTreeMap<String, String> {
        if self.egress.is_some() {
            for (k, v) in super::egress::proxy_env() {
                env.entry(k).or_insert(v);
            }
        }
        env
    }
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live")
            .field("mount", &self.mount)
            .finish_non_exhaustive()
    }
}

/// Everything the service needs to run sandboxes.
pub struct Engine {
    /// Available runtimes.
    pub runtimes: HashMap<RuntimeKind, Arc<dyn Runtime>>,
    /// Makes each running sandbox's filesystem ([`FuseMounter`] unless a test says otherwise).
    pub mounter: Arc<dyn Mounter>,
    /// Running sandboxes.
    pub(crate) live: Mutex<HashMap<SandboxId, Arc<Live>>>,
    /// Running sandbox id → its tenant, for events that arrive with only an id (runtime
    /// limit events), shared with their forwarder.
    pub tenants: Arc<Mutex<HashMap<String, String>>>,
    /// Per-sandbox lifecycle locks.
    locks: Mutex<HashMap<SandboxId, Arc<tokio::sync::Mutex<()>>>>,
    /// Every mount of this server: a publish or an upload reaches the other sandboxes of the
    /// codebase at once.
    pub(crate) mounts: agentfense_fs::Mounts,
}

impl Default for Engine {
    fn default() -> Self {
        Engine {
            runtimes: HashMap::new(),
            mounter: Arc::new(FuseMounter),
            live: Mutex::default(),
            tenants: Arc::default(),
            locks: Mutex::default(),
            mounts: agentfense_fs::Mounts::default(),
        }
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("runtimes", &self.runtimes.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// A running sandbox's resource use ([`Service::sandbox_metrics`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SandboxMetrics {
    /// The sandbox.
    pub sandbox_id: String,
    /// CPU time used since it started, microseconds (`None`: the runtime cannot tell).
    pub cpu_usec: Option<u64>,
    /// Memory in use, bytes.
    pub memory_bytes: Option<u64>,
    /// Processes now.
    pub pids: Option<u64>,
    /// What it takes on disk against its quota: its changes, `/tmp`, `$HOME`, checkpoints.
    pub disk_bytes: u64,
    /// Entries (inodes) of the same.
    pub disk_entries: u64,
    /// Permission denials since it started.
    pub denials: u64,
}

/// Parameters of one command.
#[derive(Debug, Clone, Default)]
pub struct ExecParams {
    /// Shell command line.
    pub command: String,
    /// Fed to the command's stdin.
    pub stdin: Vec<u8>,
    /// Added to the clean default environment.
    pub env: BTreeMap<String, String>,
    /// Working directory relative to `/workspace`.
    pub workdir: String,
    /// The request's timeout, if any.
    pub timeout: Option<Duration>,
}

/// A finished command.
#[derive(Debug, Clone)]
pub struct ExecOutcome {
    /// Captured stdout (lossy UTF-8, capped, with a truncation marker).
    pub stdout: String,
    /// Captured stderr.
    pub stderr: String,
    /// Exit code (128 + signal for a signal death, 137 for OOM kills).
    pub exit_code: i32,
    /// Wall time.
    pub duration: Duration,
}

/// One item of a streamed command.
#[derive(Debug)]
pub enum StreamItem {
    /// A chunk of stdout.
    Stdout(String),
    /// A chunk of stderr.
    Stderr(String),
    /// The command ended.
    Exit {
        /// Exit code.
        exit_code: i32,
        /// Wall time.
        duration: Duration,
    },
    /// The command failed (e.g. timed out); the stream ends.
    Error(ServiceError),
}

/// A CreateSandbox request, converted from the wire.
#[derive(Debug, Clone)]
pub struct CreateSandbox {
    /// Codebase id.
    pub codebase_id: String,
    /// Rules (already validated wire rules).
    pub rules: Vec<PermissionRule>,
    /// `expires_in`.
    pub expires_in: Option<Duration>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Requested runtime; `None` = the server's default.
    pub runtime: Option<RuntimeKind>,
    /// Image (docker).
    pub image: String,
    /// Requested limits (0 = server default).
    pub resources: ResourceLimits,
}

fn runtime_error(e: RuntimeError) -> ServiceError {
    match e.kind() {
        ErrorKind::NotFound => ServiceError::NotFound(e.to_string()),
        ErrorKind::InvalidArgument => ServiceError::InvalidArgument(e.to_string()),
        ErrorKind::FailedPrecondition | ErrorKind::AlreadyExists => {
            ServiceError::FailedPrecondition(e.to_string())
        }
        ErrorKind::DeadlineExceeded => ServiceError::DeadlineExceeded(e.to_string()),
        ErrorKind::Unavailable => ServiceError::Unavailable(e.to_string()),
        ErrorKind::Internal => ServiceError::internal("runtime", e),
    }
}

fn status_name(s: SandboxStatus) -> &'static str {
    match s {
        SandboxStatus::Pending => "PENDING",
        SandboxStatus::Running => "RUNNING",
        SandboxStatus::Stopped => "STOPPED",
        SandboxStatus::Error => "ERROR",
    }
}

impl Engine {
    /// The lifecycle lock of `id`. Callers check that the sandbox exists first, so that
    /// requests for unknown ids never add entries (destroy removes them).
    pub(crate) fn lock(&self, id: &SandboxId) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(id.clone()).or_default().clone()
    }

    pub(crate) fn live(&self, id: &SandboxId) -> Option<Arc<Live>> {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    fn take_live(&self, id: &SandboxId) -> Option<Arc<Live>> {
        self.tenants
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id.as_str());
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
    }
}

impl Service {
    pub(crate) fn sandbox_id(raw: &str) -> Result<SandboxId, ServiceError> {
        if raw.is_empty() {
            return Err(ServiceError::required("sandbox_id"));
        }
        Ok(SandboxId::parse(raw)?)
    }

    fn session_id(raw: &str) -> Result<SessionId, ServiceError> {
        if raw.is_empty() {
            return Err(ServiceError::required("session_id"));
        }
        Ok(SessionId::parse(raw)?)
    }

    /// Raises a `long_sessions` alert for each active session older than the rule allows
    /// (once per session).
    pub async fn alert_long_sessions(self: &Arc<Self>) {
        let rule = self.settings.config.alerts.long_sessions.clone();
        let Some(before) = SystemTime::now().checked_sub(rule.after) else {
            return;
        };
        let store = self.store.clone();
        let old = match blocking(move || Ok(store.sessions_open_since(before)?)).await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %chain(&e), "cannot look for long sessions");
                return;
            }
        };
        for (session, sandbox, tenant, created) in old {
            if !self.session_ages.first_time(&session) {
                continue;
            }
            let age = SystemTime::now()
                .duration_since(created)
                .unwrap_or_default();
            self.audit.record_as(
                Actor::tenant(&tenant),
                AuditEvent::Alert {
                    rule: crate::alerts::rule::LONG_SESSIONS.to_owned(),
                    severity: rule.severity.as_str().to_owned(),
                    sandbox_id: Some(sandbox),
                    count: 1,
                    window_secs: None,
                    detail: format!(
                        "session {session} open for {}",
                        humantime::format_duration(Duration::from_secs(age.as_secs()))
                    ),
                },
            );
        }
    }

    /// A running sandbox's resource use: CPU time, memory, processes (from its cgroups), what
    /// its changes take on disk (bytes, entries) and the permission denials since it started.
    pub async fn sandbox_metrics(
        self: &Arc<Self>,
        caller: &Caller,
        sandbox_id: &str,
    ) -> Result<SandboxMetrics, ServiceError> {
        let id = Service::sandbox_id(sandbox_id)?;
        let live = self.running(caller, &id).await?;
        let usage = live.runtime.usage(id.as_str());
        let (disk_bytes, disk_entries) = live
            .mount
            .delta()
            .map(|d| d.usage().used())
            .unwrap_or((0, 0));
        Ok(SandboxMetrics {
            sandbox_id: id.to_string(),
            cpu_usec: usage.map(|u| u.cpu_usec),
            memory_bytes: usage.map(|u| u.memory_bytes),
            pids: usage.map(|u| u.pids),
            disk_bytes,
            disk_entries,
            denials: live.denials.load(std::sync::atomic::Ordering::Relaxed),
        })
    }

    /// Sets the gauges read at scrape time: sandboxes by state, bytes the running sandboxes'
    /// changes take.
    pub fn observe_gauges(&self) {
        let m = crate::metrics::metrics();
        if let Ok(counts) = self.store.count_sandboxes_by_status() {
            for state in ["pending", "running", "stopped", "error"] {
                let n = counts
                    .iter()
                    .find(|(s, _)| s == state)
                    .map_or(0, |(_, n)| *n);
                m.sandboxes
                    .get_or_create(&crate::metrics::StateLabel {
                        state: state.to_owned(),
                    })
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
        let live: Vec<Arc<Live>> = self
            .engine
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        let bytes: u64 = live
            .iter()
            .filter_map(|l| l.mount.delta())
            .map(|d| d.usage().used().0)
            .sum();
        m.delta_bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        m.observe_fs_operations();
    }

    fn mount_dirs(&self, id: &SandboxId) -> (PathBuf, PathBuf) {
        let m = &self.settings.paths.mounts;
        (
            m.join("fuse").join(id.as_str()),
            m.join("delta").join(id.as_str()),
        )
    }

    async fn sandbox(self: &Arc<Self>, id: &SandboxId) -> Result<SandboxRecord, ServiceError> {
        let store = self.store.clone();
        let id2 = id.clone();
        blocking(move || Ok(store.get_sandbox(&id2)?))
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("sandbox {id} not found")))
    }

    /// The sandbox, or NOT_FOUND: also when the caller cannot see it (another tenant's, or
    /// not the one its sandbox token is for).
    pub(crate) async fn sandbox_for(
        self: &Arc<Self>,
        caller: &Caller,
        id: &SandboxId,
    ) -> Result<SandboxRecord, ServiceError> {
        match self.sandbox(id).await {
            Ok(rec) if caller.sees_sandbox(&rec.tenant, &rec.id) => Ok(rec),
            Ok(_) => Err(ServiceError::NotFound(format!("sandbox {id} not found"))),
            Err(e) => Err(e),
        }
    }

    async fn save(self: &Arc<Self>, rec: &SandboxRecord) -> Result<(), ServiceError> {
        let store = self.store.clone();
        let r = rec.clone();
        blocking(move || Ok(store.update_sandbox(&r)?)).await
    }
}

mod exec;
mod labels;
mod lifecycle;
mod review;
mod sessions;

pub use labels::{LABEL_CHECKPOINT, LABEL_IO, LABEL_NETWORK, LABEL_PUBLISH, LABEL_WORKSPACE_PATH};
use labels::{check_labels, disk_label, io_mode};
pub use review::{DEFAULT_CHANGES_LIMIT, DEFAULT_DIFF_BYTES, StateRef};
