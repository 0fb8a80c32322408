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
use agentfense_fs::{FsConfig, IoMode, MountHandle, PublishMode, PublishReport};
use agentfense_runtime::{ErrorKind, ExecEvent, NetworkMode, Runtime, RuntimeError};
use tokio::sync::mpsc;

use super::{Service, blocking, page_args};
use crate::audit::AuditEvent;
use crate::error::{ServiceError, chain};
use crate::ids::{CodebaseId, SandboxId, SessionId};
use crate::store::{Page, SandboxRecord, SessionRecord};

/// Label that asks for networking (honoured only when `runtime.allow_network` is true).
pub const LABEL_NETWORK: &str = "agentfense.network";
/// Label that keeps writes private until an explicit publish (`manual`), instead of
/// publishing after every command (`auto`, the default).
pub const LABEL_PUBLISH: &str = "agentfense.publish";
/// Label that picks how the sandbox's filesystem serves opened files: `no-open` (the default,
/// best for source trees) or `passthrough` (native read speed for large files, one round trip
/// per open); see [`IoMode`].
pub const LABEL_IO: &str = "agentfense.io";

/// Label: the sandbox's disk quota (`agentfense.disk_bytes=2G`): what its writes may take,
/// over `runtime.default_resources.disk_bytes` and at most `runtime.max_resources.disk_bytes`.
pub const LABEL_DISK_BYTES: &str = "agentfense.disk_bytes";

/// Uid and gid the runtimes run commands as (the bubblewrap runtime's default user).
pub const SANDBOX_OWNER: (u32, u32) = (1000, 1000);

/// A sandbox's live resources while it runs.
pub(crate) struct Live {
    mount: MountHandle,
    runtime: Arc<dyn Runtime>,
    /// What a command needs of the sandbox's record; fixed while it runs, so exec does not
    /// read the store (session commands still read their session's record).
    id: SandboxId,
    codebase_id: CodebaseId,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live")
            .field("mount", &self.mount)
            .finish_non_exhaustive()
    }
}

/// Everything the service needs to run sandboxes.
#[derive(Default)]
pub struct Engine {
    /// Available runtimes.
    pub runtimes: HashMap<RuntimeKind, Arc<dyn Runtime>>,
    /// Running sandboxes.
    pub(crate) live: Mutex<HashMap<SandboxId, Arc<Live>>>,
    /// Per-sandbox lifecycle locks.
    locks: Mutex<HashMap<SandboxId, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("runtimes", &self.runtimes.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
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

/// Checks the labels that configure a sandbox ([`LABEL_NETWORK`], [`LABEL_PUBLISH`],
/// [`LABEL_IO`]) at create, so that a bad value is INVALID_ARGUMENT then rather than a failed
/// start later. Other labels are the user's own and pass through.
fn check_labels(
    labels: &BTreeMap<String, String>,
    allow_network: bool,
) -> Result<(), ServiceError> {
    match labels.get(LABEL_NETWORK).map(String::as_str) {
        None | Some("none") | Some("disabled") => {}
        Some("enabled") | Some("host") if allow_network => {}
        Some("enabled") | Some("host") => {
            return Err(ServiceError::FailedPrecondition(format!(
                "label {LABEL_NETWORK} asks for networking, which this server does not allow \
                 (set runtime.allow_network: true)"
            )));
        }
        Some(other) => {
            return Err(ServiceError::InvalidArgument(format!(
                "label {LABEL_NETWORK}={other:?}: expected enabled or none"
            )));
        }
    }
    match labels.get(LABEL_PUBLISH).map(String::as_str) {
        None | Some("auto") | Some("manual") => {}
        Some(other) => {
            return Err(ServiceError::InvalidArgument(format!(
                "label {LABEL_PUBLISH}={other:?}: expected auto or manual"
            )));
        }
    }
    if let Some(v) = labels.get(LABEL_IO) {
        v.parse::<IoMode>()
            .map_err(|e| ServiceError::InvalidArgument(format!("label {LABEL_IO}: {e}")))?;
    }
    disk_label(labels)?;
    // The `agentfense.` prefix is ours: a misspelt knob must not be ignored silently.
    let known = [LABEL_NETWORK, LABEL_PUBLISH, LABEL_IO, LABEL_DISK_BYTES];
    if let Some(k) = labels
        .keys()
        .find(|k| k.starts_with("agentfense.") && !known.contains(&k.as_str()))
    {
        return Err(ServiceError::InvalidArgument(format!(
            "unknown label {k:?}: labels starting with \"agentfense.\" are settings; known: {}",
            known.join(", ")
        )));
    }
    Ok(())
}

/// The disk quota a sandbox's labels ask for ([`LABEL_DISK_BYTES`]): bytes, or a size with a
/// binary unit (`512M`, `10G`).
fn disk_label(labels: &BTreeMap<String, String>) -> Result<Option<u64>, ServiceError> {
    labels
        .get(LABEL_DISK_BYTES)
        .map(|v| match agentfense_core::parse_size(v) {
            Ok(0) => Err(format!(
                "{v:?}: a quota of 0 bytes (leave the label out for the server's default)"
            )),
            r => r,
        })
        .transpose()
        .map_err(|e| ServiceError::InvalidArgument(format!("label {LABEL_DISK_BYTES}: {e}")))
}

/// The I/O mode a sandbox's labels ask for ([`LABEL_IO`], checked at create).
fn io_mode(labels: &BTreeMap<String, String>) -> IoMode {
    labels
        .get(LABEL_IO)
        .and_then(|v| v.parse().ok())
        .unwrap_or_default()
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
    fn lock(&self, id: &SandboxId) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(id.clone()).or_default().clone()
    }

    fn live(&self, id: &SandboxId) -> Option<Arc<Live>> {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    fn take_live(&self, id: &SandboxId) -> Option<Arc<Live>> {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
    }
}

impl Service {
    fn sandbox_id(raw: &str) -> Result<SandboxId, ServiceError> {
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

    async fn save(self: &Arc<Self>, rec: &SandboxRecord) -> Result<(), ServiceError> {
        let store = self.store.clone();
        let r = rec.clone();
        blocking(move || Ok(store.update_sandbox(&r)?)).await
    }

    /// CreateSandbox.
    pub async fn create_sandbox(
        self: &Arc<Self>,
        req: CreateSandbox,
    ) -> Result<SandboxRecord, ServiceError> {
        let cb_id = Service::codebase_id(&req.codebase_id)?;
        // Rules are compiled now so that a bad pattern is INVALID_ARGUMENT at create, not a
        // failed start later.
        Policy::compile(req.rules.clone())
            .map_err(|e| ServiceError::InvalidArgument(format!("permissions: {}", chain(&e))))?;
        let kind = req.runtime.unwrap_or(self.settings.config.runtime.kind);
        if !self.engine.runtimes.contains_key(&kind) {
            let mut have: Vec<&str> = self.engine.runtimes.keys().map(|k| k.as_str()).collect();
            have.sort_unstable();
            return Err(ServiceError::FailedPrecondition(format!(
                "runtime {kind} is not available on this server (available: {})",
                if have.is_empty() {
                    "none".to_owned()
                } else {
                    have.join(", ")
                }
            )));
        }
        if kind == RuntimeKind::Bwrap && !req.image.is_empty() {
            return Err(ServiceError::InvalidArgument(format!(
                "image {:?} was given but the bwrap runtime runs no images; use runtime DOCKER",
                req.image
            )));
        }
        check_labels(&req.labels, self.settings.config.runtime.allow_network)?;
        let rt_cfg = &self.settings.config.runtime;
        let mut resources = req.resources;
        if let Some(bytes) = disk_label(&req.labels)? {
            resources.disk_bytes = bytes;
        }
        let resources = resources.or(rt_cfg.default_resources);
        if let Some((field, value, ceiling)) = resources.exceeds(&rt_cfg.max_resources) {
            let value = if value == 0 {
                "0 (unlimited)".to_owned()
            } else {
                value.to_string()
            };
            return Err(ServiceError::InvalidArgument(format!(
                "resources.{field} = {value} is above this server's ceiling \
                 runtime.max_resources.{field} = {ceiling}"
            )));
        }
        let codebase = self.codebase(&cb_id).await?;
        let max = self.settings.config.sandbox.max_per_user;
        let now = SystemTime::now();
        let expires_in = req
            .expires_in
            .unwrap_or(self.settings.config.sandbox.default_expiration);
        let rec = SandboxRecord {
            id: SandboxId::generate(),
            codebase_id: cb_id,
            owner_id: codebase.owner_id.clone(),
            rules: req.rules,
            status: SandboxStatus::Pending,
            status_reason: None,
            labels: req.labels,
            runtime: kind,
            image: req.image,
            resources,
            created_at: now,
            started_at: None,
            stopped_at: None,
            expires_at: now.checked_add(expires_in),
        };
        let store = self.store.clone();
        let r = rec.clone();
        blocking(move || {
            if store.insert_sandbox_within_quota(&r, max)? {
                return Ok(());
            }
            let n = store.count_sandboxes_of_owner(&r.owner_id)?;
            Err(ServiceError::ResourceExhausted(format!(
                "owner {:?} already has {n} sandboxes (limit sandbox.max_per_user = {max}); \
                 destroy one first",
                r.owner_id
            )))
        })
        .await?;
        self.audit.record(AuditEvent::SandboxCreated {
            sandbox_id: rec.id.to_string(),
            codebase_id: rec.codebase_id.to_string(),
            owner_id: rec.owner_id.clone(),
            rules: rec.rules.clone(),
            runtime: rec.runtime.to_string(),
            image: rec.image.clone(),
            resources: rec.resources,
            labels: rec.labels.clone(),
        });
        Ok(rec)
    }

    /// GetSandbox.
    pub async fn get_sandbox(self: &Arc<Self>, id: &str) -> Result<SandboxRecord, ServiceError> {
        let id = Service::sandbox_id(id)?;
        self.sandbox(&id).await
    }

    /// ListSandboxes.
    pub async fn list_sandboxes(
        self: &Arc<Self>,
        codebase_id: &str,
        page_size: i32,
        page_token: &str,
    ) -> Result<Page<SandboxRecord>, ServiceError> {
        let (size, after) = page_args(page_size, page_token)?;
        let cb = if codebase_id.is_empty() {
            None
        } else {
            Some(Service::codebase_id(codebase_id)?)
        };
        let store = self.store.clone();
        blocking(move || Ok(store.list_sandboxes(cb.as_ref(), after, size)?)).await
    }

    /// StartSandbox: PENDING, STOPPED or ERROR → RUNNING.
    pub async fn start_sandbox(self: &Arc<Self>, id: &str) -> Result<SandboxRecord, ServiceError> {
        let id = Service::sandbox_id(id)?;
        self.sandbox(&id).await?;
        let lock = self.engine.lock(&id);
        let _g = lock.lock().await;
        let mut rec = self.sandbox(&id).await?;
        if rec.status == SandboxStatus::Running {
            return Err(ServiceError::FailedPrecondition(format!(
                "sandbox {id} is already running"
            )));
        }
        match self.bring_up(&rec).await {
            Ok(()) => {
                rec.status = SandboxStatus::Running;
                rec.status_reason = None;
                rec.started_at = Some(SystemTime::now());
                if let Err(e) = self.save(&rec).await {
                    // Not recorded as running: nothing may run in it either.
                    self.tear_down(&rec, false).await;
                    return Err(e);
                }
                self.audit.record(AuditEvent::SandboxStarted {
                    sandbox_id: id.to_string(),
                });
                Ok(rec)
            }
            Err(e) => {
                let reason = match &e {
                    ServiceError::Internal { context, source } => format!("{context}: {source}"),
                    other => other.to_string(),
                };
                tracing::error!(sandbox_id = %id, error = %reason, "start failed");
                rec.status = SandboxStatus::Error;
                rec.status_reason = Some(reason.clone());
                self.save(&rec).await?;
                Err(match e {
                    ServiceError::Internal { source, .. } => ServiceError::Internal {
                        context: format!("failed to start sandbox {id}: {reason}"),
                        source,
                    },
                    other => other,
                })
            }
        }
    }

    /// Mounts the policy filesystem and starts the environment. Undoes everything on failure.
    async fn bring_up(self: &Arc<Self>, rec: &SandboxRecord) -> Result<(), ServiceError> {
        let runtime = self
            .engine
            .runtimes
            .get(&rec.runtime)
            .cloned()
            .ok_or_else(|| {
                ServiceError::FailedPrecondition(format!(
                    "runtime {} is not available on this server",
                    rec.runtime
                ))
            })?;
        // The server's mandatory floor ranks above the sandbox's own rules; it applies as the
        // config says at each start.
        let floor = self.settings.config.policy.mandatory.clone();
        let policy = Policy::compile_with_floor(rec.rules.clone(), floor)
            .map_err(|e| ServiceError::internal("compiling stored rules", e))?;
        let (mountpoint, delta) = self.mount_dirs(&rec.id);
        let lower = self.files.dir(&rec.codebase_id);
        let network = match rec.labels.get(LABEL_NETWORK).map(String::as_str) {
            Some("enabled") | Some("host") => NetworkMode::Host,
            _ => NetworkMode::None,
        };
        let mut r = rec.resources;
        // Sandboxes created before disk quotas existed get today's default.
        let defaults = self.settings.config.runtime.default_resources;
        if r.disk_bytes == 0 {
            r.disk_bytes = defaults.disk_bytes;
        }
        if r.disk_inodes == 0 {
            r.disk_inodes = defaults.disk_inodes;
        }
        let nz = |v: u64| (v > 0).then_some(v);
        let spec = agentfense_runtime::SandboxSpec {
            image: (!rec.image.is_empty()).then(|| rec.image.clone()),
            workspace: mountpoint.clone(),
            limits: agentfense_runtime::ResourceLimits {
                memory_bytes: nz(r.memory_bytes),
                cpu_quota_us: nz(r.cpu_quota),
                cpu_shares: nz(r.cpu_shares),
                pids_limit: nz(r.pids_limit),
            },
            network,
            // /tmp (with $HOME) counts against the disk quota: it is that size at most.
            tmp_size: nz(r.disk_bytes),
        };
        let mp = mountpoint.clone();
        blocking(move || {
            if let Some(parent) = mp.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| ServiceError::internal("creating the mount directory", e))?;
                use std::os::unix::fs::PermissionsExt;
                // allow_other mounts: keep the path to them private to the service.
                let _ = std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o700));
            }
            std::fs::create_dir_all(&mp)
                .map_err(|e| ServiceError::internal("creating the mountpoint", e))
        })
        .await?;
        // Created before the mount: the runtime decides which host uid the sandbox user has
        // (one of its own with a user namespace), and the files must show that owner.
        let sid = rec.id.to_string();
        match runtime.create(&sid, spec).await {
            Ok(()) | Err(RuntimeError::SandboxExists { .. }) => {}
            Err(e) => return Err(runtime_error(e)),
        }
        let mut cfg = FsConfig::new(rec.id.to_string(), lower, delta, mountpoint, policy);
        // Files appear owned by the sandbox user, so that tools like git do not refuse a
        // repository owned by someone else. Access is decided by the rules, not by owners.
        cfg.owner = Some(runtime.sandbox_owner(&sid).unwrap_or(SANDBOX_OWNER));
        if rec.labels.get(LABEL_PUBLISH).map(String::as_str) == Some("manual") {
            cfg.publish_mode = PublishMode::Explicit;
        }
        cfg.io_mode = io_mode(&rec.labels);
        cfg.max_open_files = self.settings.config.runtime.open_files_per_sandbox;
        cfg.disk_bytes = r.disk_bytes;
        cfg.disk_inodes = r.disk_inodes;
        let mount = match blocking(move || {
            agentfense_fs::mount(cfg)
                .map_err(|e| ServiceError::internal("mounting the policy filesystem", e))
        })
        .await
        {
            Ok(m) => m,
            Err(e) => {
                let _ = runtime.destroy(&sid).await;
                return Err(e);
            }
        };
        self.spawn_fs_audit_bridge(&mount);
        if let Err(e) = runtime.start(&sid).await.map_err(runtime_error) {
            let _ = runtime.destroy(&sid).await;
            let _ = tokio::task::spawn_blocking(move || mount.unmount()).await;
            return Err(e);
        }
        match runtime.scratch(&sid) {
            Some(tmp) => mount.count_scratch(tmp),
            None => tracing::warn!(
                sandbox_id = %sid,
                "the sandbox's /tmp cannot be seen from here: it is sized at the disk quota but \
                 not counted with the delta"
            ),
        }
        self.engine
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                rec.id.clone(),
                Arc::new(Live {
                    mount,
                    runtime,
                    id: rec.id.clone(),
                    codebase_id: rec.codebase_id.clone(),
                }),
            );
        Ok(())
    }

    fn spawn_fs_audit_bridge(self: &Arc<Self>, mount: &MountHandle) {
        let rx = mount.events();
        let audit = self.audit.clone();
        let _ = std::thread::Builder::new()
            .name("fs-audit".into())
            .spawn(move || {
                // Ends when the mount is gone and its senders are dropped. Waits for room in
                // the writer's queue: a storm of denials slows down (see agentfense_fs::audit)
                // instead of losing events.
                for ev in rx {
                    audit.record_wait(fs_event(ev));
                }
            });
    }

    /// StopSandbox: RUNNING → STOPPED. Kills everything inside, publishes what is pending in
    /// automatic mode, unmounts. The delta is kept; Start reuses it.
    pub async fn stop_sandbox(self: &Arc<Self>, id: &str) -> Result<SandboxRecord, ServiceError> {
        let id = Service::sandbox_id(id)?;
        self.sandbox(&id).await?;
        let lock = self.engine.lock(&id);
        let _g = lock.lock().await;
        let mut rec = self.sandbox(&id).await?;
        if rec.status != SandboxStatus::Running {
            return Err(ServiceError::FailedPrecondition(format!(
                "sandbox {id} is not running (status {})",
                status_name(rec.status)
            )));
        }
        self.tear_down(&rec, false).await;
        rec.status = SandboxStatus::Stopped;
        rec.stopped_at = Some(SystemTime::now());
        self.save(&rec).await?;
        self.audit.record(AuditEvent::SandboxStopped {
            sandbox_id: id.to_string(),
            reason: None,
        });
        Ok(rec)
    }

    /// Stops the environment and unmounts (best effort: errors are logged; the sandbox ends
    /// up stopped either way). With `destroy`, the runtime forgets the sandbox.
    async fn tear_down(self: &Arc<Self>, rec: &SandboxRecord, destroy: bool) {
        let sid = rec.id.to_string();
        let live = self.engine.take_live(&rec.id);
        let runtime = live
            .as_ref()
            .map(|l| l.runtime.clone())
            .or_else(|| self.engine.runtimes.get(&rec.runtime).cloned());
        if let Some(rt) = &runtime {
            let res = if destroy {
                rt.destroy(&sid).await
            } else {
                rt.stop(&sid).await
            };
            match res {
                Ok(())
                | Err(RuntimeError::SandboxNotFound { .. })
                | Err(RuntimeError::NotRunning { .. }) => {}
                Err(e) => {
                    tracing::warn!(sandbox_id = %sid, error = %chain(&e), "runtime stop failed")
                }
            }
        }
        let now = SystemTime::now();
        let store = self.store.clone();
        let id = rec.id.clone();
        let _ = blocking(move || Ok(store.close_sessions_of(&id, now)?)).await;
        if let Some(live) = live {
            let this = self.clone();
            let cb = rec.codebase_id.clone();
            let sid2 = sid.clone();
            let _ = tokio::task::spawn_blocking(move || {
                let _ = this.publish_counted(&sid2, &cb, &live, false);
                match Arc::try_unwrap(live) {
                    Ok(live) => {
                        if let Err(e) = live.mount.unmount() {
                            tracing::warn!(sandbox_id = %sid2, error = %chain(&e), "unmount failed");
                        }
                    }
                    // An in-flight request still holds it: the last holder's drop unmounts.
                    Err(_) => tracing::debug!(sandbox_id = %sid2, "mount still in use; unmounting on last release"),
                }
            })
            .await;
        }
    }

    /// DestroySandbox: from any state. Stops it, removes its delta and metadata.
    pub async fn destroy_sandbox(self: &Arc<Self>, id: &str) -> Result<(), ServiceError> {
        let id = Service::sandbox_id(id)?;
        self.destroy_inner(&id, false).await
    }

    async fn destroy_inner(
        self: &Arc<Self>,
        id: &SandboxId,
        expired: bool,
    ) -> Result<(), ServiceError> {
        self.sandbox(id).await?;
        let lock = self.engine.lock(id);
        let _g = lock.lock().await;
        let rec = self.sandbox(id).await?;
        self.tear_down(&rec, true).await;
        let (mountpoint, delta) = self.mount_dirs(id);
        let store = self.store.clone();
        let id2 = id.clone();
        blocking(move || {
            let _ = std::fs::remove_dir(&mountpoint);
            if let Err(e) = std::fs::remove_dir_all(&delta)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(path = %delta.display(), error = %e, "cannot remove delta");
            }
            Ok(store.delete_sandbox(&id2)?)
        })
        .await?;
        self.engine
            .locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        self.audit.record(if expired {
            AuditEvent::SandboxExpired {
                sandbox_id: id.to_string(),
            }
        } else {
            AuditEvent::SandboxDestroyed {
                sandbox_id: id.to_string(),
            }
        });
        Ok(())
    }

    async fn running(self: &Arc<Self>, id: &SandboxId) -> Result<Arc<Live>, ServiceError> {
        // Live resources exist exactly while the store says the sandbox runs: added by a
        // start that is then saved (or undone), taken away first when it stops. Only the
        // error path reads the store.
        if let Some(live) = self.engine.live(id) {
            return Ok(live);
        }
        let rec = self.sandbox(id).await?;
        Err(ServiceError::FailedPrecondition(format!(
            "sandbox {id} is not running (status {}); start it first",
            status_name(rec.status)
        )))
    }

    fn effective_timeout(&self, requested: Option<Duration>) -> Duration {
        let rt = &self.settings.config.runtime;
        requested
            .filter(|d| !d.is_zero())
            .unwrap_or(rt.default_timeout)
            .min(rt.max_timeout)
    }

    fn runtime_request(
        &self,
        p: ExecParams,
    ) -> Result<agentfense_runtime::ExecRequest, ServiceError> {
        if p.command.trim().is_empty() {
            return Err(ServiceError::required("command"));
        }
        if !p.workdir.is_empty() {
            let rel = p.workdir.strip_prefix("/workspace").unwrap_or(&p.workdir);
            SandboxPath::parse(rel).map_err(|e| {
                ServiceError::InvalidArgument(format!("workdir {:?}: {e}", p.workdir))
            })?;
        }
        Ok(agentfense_runtime::ExecRequest {
            timeout: Some(self.effective_timeout(p.timeout)),
            command: p.command,
            stdin: p.stdin,
            env: p.env,
            workdir: p.workdir,
        })
    }

    /// After a command: publishes what it changed (automatic mode), on a blocking thread.
    /// Most commands change nothing, and manual-publish sandboxes publish only on request:
    /// both skip the thread hop (a measurable share of a ~2 ms exec round trip).
    async fn after_command(self: &Arc<Self>, live: &Arc<Live>) {
        if live.mount.publish_mode() == PublishMode::Explicit || live.mount.surely_clean() {
            return;
        }
        let (this, live) = (self.clone(), live.clone());
        let _ = tokio::task::spawn_blocking(move || {
            this.publish_counted(live.id.as_str(), &live.codebase_id, &live, false)
        })
        .await;
    }

    /// Publishes (`explicit`: whatever the mode; else only in automatic mode) and adjusts the
    /// codebase's size and file count by what the publish changed: the pending paths are
    /// measured before and after, so the cost follows the change, never the codebase's size.
    /// Conflicts reach the audit log through the filesystem's event channel.
    fn publish_counted(
        self: &Arc<Self>,
        sandbox_id: &str,
        cb: &CodebaseId,
        live: &Live,
        explicit: bool,
    ) -> Result<Option<PublishReport>, ServiceError> {
        let pending = live.mount.pending();
        let before = if pending.is_empty() {
            Ok((0, 0))
        } else {
            self.files.usage(cb, &pending)
        };
        let report = if explicit {
            live.mount.publish().map(Some)
        } else {
            live.mount.command_finished()
        };
        let report = match report {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(sandbox_id, error = %chain(&e), "publish failed");
                return Err(ServiceError::internal("publishing", e));
            }
        };
        let Some(report) = report else {
            return Ok(None);
        };
        for (path, why) in &report.failed {
            tracing::error!(sandbox_id, path = %path.display(), reason = %why, "publish of a path failed");
        }
        if !report.written.is_empty() || !report.deleted.is_empty() {
            match (before, self.files.usage(cb, &pending)) {
                (Ok((s0, n0)), Ok((s1, n1))) => {
                    let _ = self.store.adjust_codebase_stats(
                        cb,
                        s1 as i64 - s0 as i64,
                        n1 as i64 - n0 as i64,
                        SystemTime::now(),
                    );
                }
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(codebase_id = %cb, error = %chain(&e), "codebase stats not updated")
                }
            }
        }
        Ok(Some(report))
    }

    fn audit_command(
        &self,
        sandbox_id: &SandboxId,
        session: Option<&SessionId>,
        command: &str,
        exit_code: i32,
        duration: Duration,
        timed_out: bool,
    ) {
        self.audit.record(AuditEvent::CommandExecuted {
            sandbox_id: sandbox_id.to_string(),
            session_id: session.map(|s| s.to_string()),
            command: command.to_owned(),
            exit_code,
            duration_ms: duration.as_millis() as u64,
            timed_out,
        });
    }

    /// Exec.
    pub async fn exec(
        self: &Arc<Self>,
        sandbox_id: &str,
        p: ExecParams,
    ) -> Result<ExecOutcome, ServiceError> {
        let id = Service::sandbox_id(sandbox_id)?;
        let live = self.running(&id).await?;
        let command = p.command.clone();
        let req = self.runtime_request(p)?;
        let timeout = req.timeout.unwrap_or_default();
        let started = std::time::Instant::now();
        let res = live.runtime.exec(id.as_str(), req).await;
        self.after_command(&live).await;
        match res {
            Ok(r) => {
                self.audit_command(&live.id, None, &command, r.exit_code, r.duration, false);
                Ok(ExecOutcome {
                    stdout: r.stdout,
                    stderr: r.stderr,
                    exit_code: r.exit_code,
                    duration: r.duration,
                })
            }
            Err(e) => {
                let timed_out = e.kind() == ErrorKind::DeadlineExceeded;
                if timed_out {
                    self.audit_command(&live.id, None, &command, -1, started.elapsed(), true);
                    return Err(ServiceError::DeadlineExceeded(format!(
                        "command timed out after {}",
                        humantime::format_duration(timeout)
                    )));
                }
                Err(runtime_error(e))
            }
        }
    }

    /// ExecStream: items arrive on the returned channel; the last is `Exit` or `Error`.
    pub async fn exec_stream(
        self: &Arc<Self>,
        sandbox_id: &str,
        p: ExecParams,
    ) -> Result<mpsc::Receiver<StreamItem>, ServiceError> {
        let id = Service::sandbox_id(sandbox_id)?;
        let live = self.running(&id).await?;
        let command = p.command.clone();
        let req = self.runtime_request(p)?;
        let timeout = req.timeout.unwrap_or_default();
        let mut stream = live
            .runtime
            .exec_stream(id.as_str(), req)
            .await
            .map_err(runtime_error)?;
        let (tx, rx) = mpsc::channel(64);
        let this = self.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let mut outcome: Option<(i32, Duration, bool)> = None;
            while let Some(ev) = stream.next().await {
                let item = match ev {
                    Ok(ExecEvent::Stdout(s)) => StreamItem::Stdout(s),
                    Ok(ExecEvent::Stderr(s)) => StreamItem::Stderr(s),
                    Ok(ExecEvent::Exit {
                        exit_code,
                        duration,
                    }) => {
                        outcome = Some((exit_code, duration, false));
                        StreamItem::Exit {
                            exit_code,
                            duration,
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::DeadlineExceeded => {
                        outcome = Some((-1, started.elapsed(), true));
                        StreamItem::Error(ServiceError::DeadlineExceeded(format!(
                            "command timed out after {}",
                            humantime::format_duration(timeout)
                        )))
                    }
                    Err(e) => StreamItem::Error(runtime_error(e)),
                };
                // A client that went away drops the receiver; dropping `stream` then kills
                // the command.
                if tx.send(item).await.is_err() {
                    break;
                }
            }
            drop(stream);
            this.after_command(&live).await;
            if let Some((code, d, timed_out)) = outcome {
                this.audit_command(&live.id, None, &command, code, d, timed_out);
            }
        });
        Ok(rx)
    }

    /// CreateSession.
    pub async fn create_session(
        self: &Arc<Self>,
        sandbox_id: &str,
        shell: String,
        env: BTreeMap<String, String>,
    ) -> Result<SessionRecord, ServiceError> {
        let id = Service::sandbox_id(sandbox_id)?;
        let live = self.running(&id).await?;
        let shell = if shell.is_empty() {
            "/bin/sh".to_owned()
        } else {
            shell
        };
        let spec = agentfense_runtime::SessionSpec {
            shell: shell.clone(),
            env: env.clone(),
            workdir: String::new(),
        };
        let sess = live
            .runtime
            .session_create(id.as_str(), spec)
            .await
            .map_err(runtime_error)?;
        let session_id = SessionId::parse(&sess)
            .map_err(|e| ServiceError::internal("runtime returned a malformed session id", e))?;
        let rec = SessionRecord {
            id: session_id,
            sandbox_id: id,
            shell,
            env,
            status: SessionStatus::Active,
            created_at: SystemTime::now(),
            closed_at: None,
        };
        let store = self.store.clone();
        let r = rec.clone();
        blocking(move || Ok(store.insert_session(&r)?)).await?;
        Ok(rec)
    }

    async fn session(self: &Arc<Self>, id: &SessionId) -> Result<SessionRecord, ServiceError> {
        let store = self.store.clone();
        let id2 = id.clone();
        blocking(move || Ok(store.get_session(&id2)?))
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("session {id} not found")))
    }

    /// GetSession.
    pub async fn get_session(self: &Arc<Self>, id: &str) -> Result<SessionRecord, ServiceError> {
        let id = Service::session_id(id)?;
        self.session(&id).await
    }

    /// ListSessions (an unknown sandbox lists as empty, like the original).
    pub async fn list_sessions(
        self: &Arc<Self>,
        sandbox_id: &str,
    ) -> Result<Vec<SessionRecord>, ServiceError> {
        let id = Service::sandbox_id(sandbox_id)?;
        let store = self.store.clone();
        blocking(move || Ok(store.list_sessions(&id)?)).await
    }

    /// DestroySession: kills the shell and everything it started.
    pub async fn destroy_session(self: &Arc<Self>, id: &str) -> Result<(), ServiceError> {
        let id = Service::session_id(id)?;
        let sess = self.session(&id).await?;
        if let Some(live) = self.engine.live(&sess.sandbox_id) {
            match live
                .runtime
                .session_destroy(sess.sandbox_id.as_str(), id.as_str())
                .await
            {
                Ok(())
                | Err(RuntimeError::SessionNotFound { .. })
                | Err(RuntimeError::SessionClosed { .. }) => {}
                Err(e) => return Err(runtime_error(e)),
            }
        }
        let store = self.store.clone();
        blocking(move || Ok(store.delete_session(&id)?)).await?;
        Ok(())
    }

    /// SessionExec.
    pub async fn session_exec(
        self: &Arc<Self>,
        session_id: &str,
        command: String,
        timeout: Option<Duration>,
    ) -> Result<ExecOutcome, ServiceError> {
        let sid = Service::session_id(session_id)?;
        if command.trim().is_empty() {
            return Err(ServiceError::required("command"));
        }
        let sess = self.session(&sid).await?;
        if sess.status == SessionStatus::Closed {
            return Err(ServiceError::FailedPrecondition(format!(
                "session {sid} is closed"
            )));
        }
        let live = self.running(&sess.sandbox_id).await?;
        let timeout = self.effective_timeout(timeout);
        let started = std::time::Instant::now();
        let res = live
            .runtime
            .session_exec(live.id.as_str(), sid.as_str(), &command, Some(timeout))
            .await;
        self.after_command(&live).await;
        match res {
            Ok(r) => {
                self.audit_command(
                    &live.id,
                    Some(&sid),
                    &command,
                    r.exit_code,
                    r.duration,
                    false,
                );
                Ok(ExecOutcome {
                    stdout: r.stdout,
                    stderr: r.stderr,
                    exit_code: r.exit_code,
                    duration: r.duration,
                })
            }
            Err(RuntimeError::SessionClosed { .. }) => {
                let store = self.store.clone();
                let s2 = sid.clone();
                let _ = blocking(move || Ok(store.close_session(&s2, SystemTime::now())?)).await;
                Err(ServiceError::FailedPrecondition(format!(
                    "session {sid} is closed"
                )))
            }
            Err(e) if e.kind() == ErrorKind::DeadlineExceeded => {
                self.audit_command(&live.id, Some(&sid), &command, -1, started.elapsed(), true);
                Err(ServiceError::DeadlineExceeded(format!(
                    "command timed out after {}; the session is still usable",
                    humantime::format_duration(timeout)
                )))
            }
            Err(e) => Err(runtime_error(e)),
        }
    }

    /// Publishes a manual-publish sandbox's pending changes now.
    pub async fn publish(
        self: &Arc<Self>,
        sandbox_id: &str,
    ) -> Result<PublishReport, ServiceError> {
        let id = Service::sandbox_id(sandbox_id)?;
        let live = self.running(&id).await?;
        let this = self.clone();
        blocking(move || {
            Ok(this
                .publish_counted(live.id.as_str(), &live.codebase_id, &live, true)?
                .unwrap_or_default())
        })
        .await
    }

    /// Destroys every sandbox past its expiry; returns how many.
    pub async fn reap_expired(self: &Arc<Self>) -> usize {
        let store = self.store.clone();
        let all = match blocking(move || Ok(store.all_sandboxes()?)).await {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "reaper cannot list sandboxes");
                return 0;
            }
        };
        let now = SystemTime::now();
        let mut n = 0;
        for s in all
            .into_iter()
            .filter(|s| s.expires_at.is_some_and(|t| t <= now))
        {
            match self.destroy_inner(&s.id, true).await {
                Ok(()) => n += 1,
                Err(e) => {
                    tracing::warn!(sandbox_id = %s.id, error = %e, "cannot destroy expired sandbox")
                }
            }
        }
        n
    }

    /// At startup: clear stale mounts, close sessions whose shells died with the previous
    /// process, and bring sandboxes that were running back up (or mark them STOPPED with the
    /// reason, restartable).
    pub async fn recover(self: &Arc<Self>) {
        let fuse_dir = self.settings.paths.mounts.join("fuse");
        let cleaned =
            tokio::task::spawn_blocking(move || agentfense_fs::cleanup_stale_mounts(&fuse_dir))
                .await;
        if let Ok(Ok(paths)) = cleaned
            && !paths.is_empty()
        {
            tracing::info!(
                count = paths.len(),
                "detached stale FUSE mounts from a previous run"
            );
        }
        for (kind, rt) in &self.engine.runtimes {
            match rt.cleanup_stale().await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(runtime = %kind, count = n, "removed leftovers of a previous run")
                }
                Err(e) => {
                    tracing::warn!(runtime = %kind, error = %chain(&e), "cannot clean leftovers of a previous run")
                }
            }
        }
        let store = self.store.clone();
        let all = match blocking(move || Ok(store.all_sandboxes()?)).await {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "recovery cannot list sandboxes");
                return;
            }
        };
        for mut rec in all {
            let store = self.store.clone();
            let id = rec.id.clone();
            let _ = blocking(move || Ok(store.close_sessions_of(&id, SystemTime::now())?)).await;
            if rec.status != SandboxStatus::Running {
                continue;
            }
            match self.bring_up(&rec).await {
                Ok(()) => {
                    rec.started_at = Some(SystemTime::now());
                    tracing::info!(sandbox_id = %rec.id, "sandbox restarted after server restart");
                    self.audit.record(AuditEvent::SandboxStarted {
                        sandbox_id: rec.id.to_string(),
                    });
                }
                Err(e) => {
                    rec.status = SandboxStatus::Stopped;
                    rec.stopped_at = Some(SystemTime::now());
                    rec.status_reason = Some(format!(
                        "server restarted and could not restart it: {}",
                        chain(&e)
                    ));
                    tracing::warn!(sandbox_id = %rec.id, error = %chain(&e), "sandbox could not be restarted");
                }
            }
            let _ = self.save(&rec).await;
        }
    }

    /// At shutdown: stop every running sandbox's processes and unmount, keeping their
    /// status RUNNING in the store so the next start brings them back.
    pub async fn shutdown(self: &Arc<Self>) {
        let ids: Vec<SandboxId> = self
            .engine
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        for id in ids {
            if let Ok(rec) = self.sandbox(&id).await {
                self.tear_down(&rec, false).await;
            }
        }
    }
}

fn fs_event(ev: agentfense_fs::AuditEvent) -> AuditEvent {
    match ev {
        agentfense_fs::AuditEvent::Denied {
            sandbox_id,
            op,
            path,
            level,
            rule,
            count,
        } => AuditEvent::PermissionDenied {
            sandbox_id,
            operation: op.to_owned(),
            path,
            level: Level::as_str(level).to_owned(),
            rule: rule.map(|(_, pattern)| pattern),
            count,
        },
        agentfense_fs::AuditEvent::PublishConflict {
            sandbox_id,
            conflict,
        } => AuditEvent::PublishConflict {
            sandbox_id,
            path: conflict.path.display().to_string(),
            detail: format!(
                "was {:?}, found {:?}; this sandbox's version was published",
                conflict.expected, conflict.found
            ),
        },
        agentfense_fs::AuditEvent::LimitExceeded {
            sandbox_id,
            limit,
            detail,
        } => AuditEvent::ResourceLimitExceeded {
            sandbox_id,
            limit: limit.to_owned(),
            command: String::new(),
            detail,
        },
        agentfense_fs::AuditEvent::Dropped { sandbox_id, count } => {
            AuditEvent::AuditEventsDropped {
                sandbox_id: Some(sandbox_id),
                count,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn unknown_settings_labels_are_refused() {
        for bad in ["agentfense.io-mode", "agentfense.IO", "agentfense."] {
            match check_labels(&labels(&[(bad, "passthrough")]), false) {
                Err(ServiceError::InvalidArgument(msg)) => {
                    assert!(msg.contains(bad) && msg.contains(LABEL_IO), "{msg}")
                }
                other => panic!("{bad}: expected InvalidArgument, got {other:?}"),
            }
        }
        // Other labels are the user's own.
        check_labels(&labels(&[("team", "x"), ("agentfense-like", "y")]), false).unwrap();
    }

    #[test]
    fn io_label_picks_the_mode_and_rejects_unknown_values() {
        assert_eq!(io_mode(&labels(&[])), IoMode::NoOpen);
        for (value, mode) in [
            ("no-open", IoMode::NoOpen),
            ("passthrough", IoMode::Passthrough),
        ] {
            let l = labels(&[(LABEL_IO, value), ("team", "x")]);
            check_labels(&l, false).unwrap();
            assert_eq!(io_mode(&l), mode);
        }
        for bad in ["fast", "", "Passthrough", "no_open"] {
            match check_labels(&labels(&[(LABEL_IO, bad)]), false) {
                Err(ServiceError::InvalidArgument(msg)) => assert!(
                    msg.contains(LABEL_IO)
                        && msg.contains("no-open")
                        && msg.contains("passthrough"),
                    "the error names the label and the allowed values: {msg}"
                ),
                other => panic!("{LABEL_IO}={bad:?}: expected InvalidArgument, got {other:?}"),
            }
        }
    }

    #[test]
    fn network_and_publish_labels_are_checked() {
        check_labels(&labels(&[(LABEL_PUBLISH, "manual")]), false).unwrap();
        check_labels(&labels(&[(LABEL_NETWORK, "enabled")]), true).unwrap();
        assert!(matches!(
            check_labels(&labels(&[(LABEL_NETWORK, "enabled")]), false),
            Err(ServiceError::FailedPrecondition(_))
        ));
        assert!(matches!(
            check_labels(&labels(&[(LABEL_NETWORK, "wifi")]), true),
            Err(ServiceError::InvalidArgument(_))
        ));
        assert!(matches!(
            check_labels(&labels(&[(LABEL_PUBLISH, "later")]), false),
            Err(ServiceError::InvalidArgument(_))
        ));
    }
}
