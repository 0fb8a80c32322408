//! [`BwrapRuntime`]: one long-lived bubblewrap environment per started sandbox, with our init as
//! PID 1, driven over a control socket.
//!
//! This module holds the lifecycle (create/start/stop/destroy) and the control channel;
//! `exec` runs commands, `session` persistent shells and `tty` interactive programs on a
//! terminal over it.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use nix::sys::socket::{AddressFamily, MsgFlags, SockFlag, SockType, socketpair};
use tokio::io::AsyncReadExt;
use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;
use tokio::sync::{Mutex, mpsc, watch};

use agentfense_core::SandboxPath;

use crate::bwrap::{
    BwrapOptions, CHANNEL_DIR, HostLayout, SandboxUser, WORKSPACE, WRITABLE_DEVICES, bwrap_args,
    shared_etc, shared_init,
};
use crate::cgroup::{CgroupManager, ExecCgroup, LimitCounters, SandboxCgroup};
use crate::error::{Result, RuntimeError};
use crate::output::{CappedText, Utf8Chunker};
use crate::protocol::{InitConfig, Reply, Request, recv_packet, send_packet};
use crate::runtime::{BoxFuture, ExecStream, Runtime};
use crate::types::{
    ExecEvent, ExecRequest, ExecResult, LimitKind, MAX_COMMAND, NetworkMode, RuntimeEvent,
    SandboxSpec, SessionSpec, TtyRequest, check_command,
};
use crate::userns::{IdLease, IdPool, Staging};

mod channel;
mod exec;
mod session;
mod spawn;
mod tty;
mod validate;

use channel::{Channel, Incoming};
use spawn::{check_executable, setup_error, shutdown_env};
pub use validate::{build_env, check_workspace_path, resolve_workdir, resolve_workdir_in};
use validate::{cgroup_name, validate_id, validate_limits};

use session::Session;
pub use tty::TtyProcess;

/// The sandbox user's (uid, gid) as files show it when a runtime has no user namespace of
/// its own for the sandbox ([`crate::Runtime::sandbox_owner`] is `None`): the same ids the
/// sandbox user has inside.
pub const SANDBOX_OWNER: (u32, u32) = (1000, 1000);

/// `PATH` inside the sandbox.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// After a command exits, how long to wait for its pipes to reach end-of-file (a background
/// process may keep them open) before taking what is buffered.
const OUTPUT_GRACE: Duration = Duration::from_millis(50);
/// After a timeout kill, how long to wait for the exit report.
const KILL_GRACE: Duration = Duration::from_secs(1);

/// Configuration of the bwrap runtime (plain values; the server builds it from its config).
#[derive(Debug, Clone)]
pub struct BwrapConfig {
    /// The bwrap binary.
    pub bwrap_path: PathBuf,
    /// The `agentfense-init` binary (the server ships it next to its own executable).
    pub init_path: PathBuf,
    /// Host directory for the runtime's state; created if missing.
    pub state_dir: PathBuf,
    /// Where the init and the generated `/etc` are bound from ([`crate::bwrap::SHARED_DIR`]:
    /// a path that reveals nothing to `/proc/self/mountinfo`); the state directory when it
    /// cannot be written.
    pub shared_dir: PathBuf,
    /// The unprivileged user commands run as.
    pub user: SandboxUser,
    /// Deadline when a request gives none.
    pub default_timeout: Duration,
    /// Upper bound for any deadline.
    pub max_timeout: Duration,
    /// Cap of captured stdout and of stderr (each) for unary results.
    pub output_cap: usize,
    /// Size of the sandbox's `/tmp` tmpfs in bytes.
    pub tmp_size: u64,
    /// Server-wide switch: sandboxes may ask for [`NetworkMode::Host`] only when true.
    pub allow_network: bool,
    /// cgroups for limits and whole-tree kill; `None` makes any limit request fail closed.
    pub cgroups: Option<CgroupManager>,
    /// Install the seccomp filter (default true).
    pub seccomp: bool,
    /// Apply Landlock where the kernel has it (default true).
    pub landlock: bool,
    /// Hostname inside sandboxes.
    pub hostname: String,
    /// How long `start` waits for the environment.
    pub start_timeout: Duration,
    /// `RLIMIT_NOFILE` (soft, hard) of sandboxes, when the server raised its own above what
    /// sandboxes should inherit; `None` inherits the server's.
    pub sandbox_nofile: Option<(u64, u64)>,
    /// Blocks of host ids for per-sandbox user namespaces (see [`crate::userns`]); `None`
    /// runs sandboxes in the host's user namespace (the init as host root, commands as
    /// [`BwrapConfig::user`]'s uid on the host).
    pub userns: Option<Arc<IdPool>>,
}

impl BwrapConfig {
    /// Defaults: `/usr/bin/bwrap`, uid/gid 1000 `sandbox` with `HOME=/tmp/home`, 30 s default
    /// and 10 min maximum timeouts, 1 MiB output cap, 512 MiB `/tmp`, no network, hardening on.
    pub fn new(init_path: impl Into<PathBuf>, state_dir: impl Into<PathBuf>) -> Self {
        BwrapConfig {
            bwrap_path: "/usr/bin/bwrap".into(),
            init_path: init_path.into(),
            state_dir: state_dir.into(),
            shared_dir: crate::bwrap::SHARED_DIR.into(),
            user: SandboxUser {
                name: "sandbox".into(),
                uid: SANDBOX_OWNER.0,
                gid: SANDBOX_OWNER.1,
                home: "/tmp/home".into(),
            },
            default_timeout: Duration::from_secs(30),
            max_timeout: Duration::from_secs(600),
            output_cap: 1 << 20,
            tmp_size: 512 << 20,
            allow_network: false,
            cgroups: None,
            seccomp: true,
            landlock: true,
            hostname: "sandbox".into(),
            start_timeout: Duration::from_secs(10),
            sandbox_nofile: None,
            userns: None,
        }
    }
}

/// Diagnostics about one sandbox (see [`BwrapRuntime::info`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxInfo {
    /// Whether the environment is up.
    pub running: bool,
    /// Host pids of the environment (bwrap, the init, and everything below), for RSS accounting.
    pub host_pids: Vec<u32>,
    /// Landlock status reported by the init (`fully_enforced`, `partially_enforced`,
    /// `not_enforced`, `disabled`); empty when not running.
    pub landlock: String,
    /// How long the last start took.
    pub start_duration: Option<Duration>,
    /// The sandbox's cgroup directories on the host.
    pub cgroups: Vec<PathBuf>,
}

/// The bubblewrap runtime.
#[derive(Debug)]
pub struct BwrapRuntime {
    cfg: BwrapConfig,
    host: HostLayout,
    events: mpsc::Sender<RuntimeEvent>,
    sandboxes: StdMutex<HashMap<String, Arc<Mutex<Entry>>>>,
    /// The `/tmp` of each running sandbox (see [`Runtime::scratch`]).
    scratch: StdMutex<HashMap<String, Arc<OwnedFd>>>,
    /// The network namespace of each running sandbox with its own (see
    /// [`Runtime::network_namespace`]).
    netns: StdMutex<HashMap<String, Arc<OwnedFd>>>,
    /// The host id block of each created sandbox (with [`BwrapConfig::userns`]), from create
    /// to destroy.
    leases: StdMutex<HashMap<String, Arc<IdLease>>>,
}

#[derive(Debug)]
struct Entry {
    spec: SandboxSpec,
    env: Option<Arc<Env>>,
}

/// A running environment.
#[derive(Debug)]
struct Env {
    sandbox_id: String,
    chan: Arc<Channel>,
    child: Mutex<Option<tokio::process::Child>>,
    cgroup: Option<SandboxCgroup>,
    counters: StdMutex<LimitCounters>,
    sessions: StdMutex<HashMap<String, Arc<Session>>>,
    next_id: AtomicU64,
    landlock: String,
    start_duration: Duration,
    user: SandboxUser,
    events: mpsc::Sender<RuntimeEvent>,
    /// Where commands start: the sandbox's workspace path, else `/workspace`.
    root: String,
}

impl BwrapRuntime {
    /// Builds the runtime; fails if bwrap or the init binary is missing. `events` receives
    /// [`RuntimeEvent`]s (never blocks: events are dropped with a warning when it is full).
    pub fn new(cfg: BwrapConfig, events: mpsc::Sender<RuntimeEvent>) -> Result<Self> {
        for p in [&cfg.bwrap_path, &cfg.init_path] {
            check_executable(p)?;
        }
        Ok(BwrapRuntime {
            cfg,
            host: HostLayout::probe(),
            events,
            sandboxes: StdMutex::new(HashMap::new()),
            leases: StdMutex::new(HashMap::new()),
            scratch: StdMutex::new(HashMap::new()),
            netns: StdMutex::new(HashMap::new()),
        })
    }

    /// The host (uid, gid) the sandbox user of `sandbox_id` has (its id block's, with a user
    /// namespace), once created.
    pub fn host_user(&self, sandbox_id: &str) -> Option<(u32, u32)> {
        let (uid, gid) = (self.cfg.user.uid, self.cfg.user.gid);
        if self.cfg.userns.is_none() {
            return Some((uid, gid));
        }
        let lease = self.lease(sandbox_id)?;
        Some((lease.host_id(uid), lease.host_id(gid)))
    }

    fn forget_scratch(&self, sandbox_id: &str) {
        if let Ok(mut m) = self.netns.lock() {
            m.remove(sandbox_id);
        }
        if let Ok(mut m) = self.scratch.lock() {
            m.remove(sandbox_id);
        }
    }

    fn lease(&self, sandbox_id: &str) -> Option<Arc<IdLease>> {
        self.leases.lock().ok()?.get(sandbox_id).cloned()
    }

    /// Diagnostics about a sandbox.
    pub async fn info(&self, sandbox_id: &str) -> Result<SandboxInfo> {
        let entry = self.entry(sandbox_id)?;
        let e = entry.lock().await;
        let Some(env) = &e.env else {
            return Ok(SandboxInfo {
                running: false,
                host_pids: Vec::new(),
                landlock: String::new(),
                start_duration: None,
                cgroups: Vec::new(),
            });
        };
        let root = env.child.lock().await.as_ref().and_then(|c| c.id());
        Ok(SandboxInfo {
            running: !env.chan.closed.load(Ordering::SeqCst),
            host_pids: root.map(crate::runtime::process_tree).unwrap_or_default(),
            landlock: env.landlock.clone(),
            start_duration: Some(env.start_duration),
            cgroups: env.cgroup.as_ref().map(|c| c.paths()).unwrap_or_default(),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &BwrapConfig {
        &self.cfg
    }

    fn entry(&self, sandbox_id: &str) -> Result<Arc<Mutex<Entry>>> {
        self.sandboxes
            .lock()
            .ok()
            .and_then(|m| m.get(sandbox_id).cloned())
            .ok_or_else(|| RuntimeError::SandboxNotFound {
                sandbox_id: sandbox_id.to_owned(),
            })
    }

    async fn running(&self, sandbox_id: &str) -> Result<Arc<Env>> {
        let entry = self.entry(sandbox_id)?;
        let e = entry.lock().await;
        match &e.env {
            Some(env) if !env.chan.closed.load(Ordering::SeqCst) => Ok(env.clone()),
            _ => Err(RuntimeError::NotRunning {
                sandbox_id: sandbox_id.to_owned(),
            }),
        }
    }

    fn timeout(&self, t: Option<Duration>) -> Duration {
        t.filter(|d| !d.is_zero())
            .unwrap_or(self.cfg.default_timeout)
            .min(self.cfg.max_timeout)
    }

    async fn do_create(&self, sandbox_id: &str, spec: SandboxSpec) -> Result<()> {
        validate_id(sandbox_id)?;
        if let Some(p) = &spec.workspace_path {
            check_workspace_path(p)?;
        }
        let meta =
            std::fs::metadata(&spec.workspace).map_err(|source| RuntimeError::Workspace {
                path: spec.workspace.clone(),
                source,
            })?;
        if !meta.is_dir() {
            return Err(RuntimeError::Workspace {
                path: spec.workspace.clone(),
                source: std::io::Error::from(std::io::ErrorKind::NotADirectory),
            });
        }
        if spec.network == NetworkMode::Host && !self.cfg.allow_network {
            return Err(RuntimeError::invalid(
                "networking is disabled for sandboxes on this server",
            ));
        }
        validate_limits(&spec.limits)?;
        if !spec.limits.is_empty() && self.cfg.cgroups.is_none() {
            return Err(RuntimeError::CgroupsUnavailable {
                reason: "resource limits requested but the runtime has no cgroup manager".into(),
            });
        }
        let mut map = self
            .sandboxes
            .lock()
            .map_err(|_| RuntimeError::invalid("runtime state poisoned"))?;
        if map.contains_key(sandbox_id) {
            return Err(RuntimeError::SandboxExists {
                sandbox_id: sandbox_id.to_owned(),
            });
        }
        if let Some(pool) = &self.cfg.userns {
            let lease = pool.lease()?;
            if let Ok(mut l) = self.leases.lock() {
                l.insert(sandbox_id.to_owned(), Arc::new(lease));
            }
        }
        map.insert(
            sandbox_id.to_owned(),
            Arc::new(Mutex::new(Entry { spec, env: None })),
        );
        Ok(())
    }

    async fn do_start(&self, sandbox_id: &str) -> Result<()> {
        let entry = self.entry(sandbox_id)?;
        let mut e = entry.lock().await;
        if let Some(env) = &e.env {
            if !env.chan.closed.load(Ordering::SeqCst) {
                return Err(RuntimeError::AlreadyRunning {
                    sandbox_id: sandbox_id.to_owned(),
                });
            }
            // The environment died on its own: clean up before starting again.
            if let Some(env) = e.env.take() {
                shutdown_env(env).await;
            }
        }
        let env = self.spawn_env(sandbox_id, &e.spec).await?;
        e.env = Some(Arc::new(env));
        Ok(())
    }

    async fn do_stop(&self, sandbox_id: &str) -> Result<()> {
        let entry = self.entry(sandbox_id)?;
        self.forget_scratch(sandbox_id);
        let mut e = entry.lock().await;
        match e.env.take() {
            Some(env) => {
                shutdown_env(env).await;
                Ok(())
            }
            None => Err(RuntimeError::NotRunning {
                sandbox_id: sandbox_id.to_owned(),
            }),
        }
    }

    async fn do_destroy(&self, sandbox_id: &str) -> Result<()> {
        let entry = self.entry(sandbox_id)?;
        self.forget_scratch(sandbox_id);
        {
            let mut e = entry.lock().await;
            if let Some(env) = e.env.take() {
                shutdown_env(env).await;
            }
        }
        // The per-sandbox state directory of versions before the shared `/etc`, if any.
        let _ = std::fs::remove_dir_all(self.cfg.state_dir.join(sandbox_id));
        if let Ok(mut m) = self.sandboxes.lock() {
            m.remove(sandbox_id);
        }
        // Every process of the sandbox is gone: its id block may go to another sandbox.
        if let Ok(mut l) = self.leases.lock() {
            l.remove(sandbox_id);
        }
        Ok(())
    }
}

impl Drop for BwrapRuntime {
    /// Best effort when the runtime goes away without `destroy`: bwrap processes die with their
    /// `Child` handles (`kill_on_drop`; the init follows via `--die-with-parent`), and the
    /// cgroups are killed and removed here.
    fn drop(&mut self) {
        let Ok(map) = self.sandboxes.get_mut() else {
            return;
        };
        for entry in map.values() {
            if let Ok(e) = entry.try_lock()
                && let Some(env) = &e.env
            {
                if let Ok(mut child) = env.child.try_lock()
                    && let Some(c) = child.as_mut()
                {
                    let _ = c.start_kill();
                }
                if let Some(cg) = &env.cgroup {
                    cg.destroy_blocking();
                }
            }
        }
    }
}

impl Runtime for BwrapRuntime {
    fn create<'a>(&'a self, sandbox_id: &'a str, spec: SandboxSpec) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.do_create(sandbox_id, spec))
    }
    fn sandbox_owner(&self, sandbox_id: &str) -> Option<(u32, u32)> {
        self.host_user(sandbox_id)
    }

    fn usage(&self, sandbox_id: &str) -> Option<crate::cgroup::Usage> {
        let entry = self.entry(sandbox_id).ok()?;
        let e = entry.try_lock().ok()?;
        e.env.as_ref()?.cgroup.as_ref().map(SandboxCgroup::usage)
    }

    fn scratch(&self, sandbox_id: &str) -> Option<OwnedFd> {
        let fd = self.scratch.lock().ok()?.get(sandbox_id)?.clone();
        fd.try_clone().ok()
    }

    fn network_namespace(&self, sandbox_id: &str) -> Option<OwnedFd> {
        let fd = self.netns.lock().ok()?.get(sandbox_id)?.clone();
        fd.try_clone().ok()
    }

    fn cleanup_stale(&self) -> BoxFuture<'_, Result<usize>> {
        Box::pin(async move {
            let Some(m) = self.cfg.cgroups.clone() else {
                return Ok(0);
            };
            let removed = tokio::task::spawn_blocking(move || m.remove_stale())
                .await
                .map_err(|e| RuntimeError::Io {
                    op: "cleaning stale cgroups",
                    source: std::io::Error::other(e),
                })?;
            Ok(removed.len())
        })
    }
    fn start<'a>(&'a self, sandbox_id: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.do_start(sandbox_id))
    }
    fn exec<'a>(
        &'a self,
        sandbox_id: &'a str,
        req: ExecRequest,
    ) -> BoxFuture<'a, Result<ExecResult>> {
        Box::pin(self.do_exec(sandbox_id, req))
    }
    fn exec_stream<'a>(
        &'a self,
        sandbox_id: &'a str,
        req: ExecRequest,
    ) -> BoxFuture<'a, Result<ExecStream>> {
        Box::pin(self.do_exec_stream(sandbox_id, req))
    }
    fn session_create<'a>(
        &'a self,
        sandbox_id: &'a str,
        spec: SessionSpec,
    ) -> BoxFuture<'a, Result<String>> {
        Box::pin(self.do_session_create(sandbox_id, spec))
    }
    fn session_exec<'a>(
        &'a self,
        sandbox_id: &'a str,
        session_id: &'a str,
        command: &'a str,
        timeout: Option<Duration>,
    ) -> BoxFuture<'a, Result<ExecResult>> {
        Box::pin(self.do_session_exec(sandbox_id, session_id, command, timeout))
    }

    fn session_exec_stream<'a>(
        &'a self,
        sandbox_id: &'a str,
        session_id: &'a str,
        command: &'a str,
        timeout: Option<Duration>,
    ) -> BoxFuture<'a, Result<ExecStream>> {
        Box::pin(self.do_session_exec_stream(sandbox_id, session_id, command, timeout))
    }
    fn session_destroy<'a>(
        &'a self,
        sandbox_id: &'a str,
        session_id: &'a str,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.do_session_destroy(sandbox_id, session_id))
    }
    fn stop<'a>(&'a self, sandbox_id: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.do_stop(sandbox_id))
    }
    fn destroy<'a>(&'a self, sandbox_id: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.do_destroy(sandbox_id))
    }
}
