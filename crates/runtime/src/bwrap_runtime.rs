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
    shared_etc,
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

mod exec;
mod session;
mod tty;

use session::Session;
pub use tty::TtyProcess;

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
    /// Host directory for the runtime's state (the generated `/etc` the sandboxes share);
    /// created if missing.
    pub state_dir: PathBuf,
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
            user: SandboxUser {
                name: "sandbox".into(),
                uid: 1000,
                gid: 1000,
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
}

type Incoming = (Reply, Vec<OwnedFd>);

/// The host end of the control socket, with reply routing by id.
#[derive(Debug)]
struct Channel {
    sandbox_id: String,
    sock: AsyncFd<OwnedFd>,
    pending: StdMutex<HashMap<u64, mpsc::UnboundedSender<Incoming>>>,
    closed: AtomicBool,
}

impl Channel {
    fn register(&self, id: u64) -> mpsc::UnboundedReceiver<Incoming> {
        let (tx, rx) = mpsc::unbounded_channel();
        if let Ok(mut p) = self.pending.lock()
            && !self.closed.load(Ordering::SeqCst)
        {
            p.insert(id, tx);
        }
        rx
    }

    fn unregister(&self, id: u64) {
        if let Ok(mut p) = self.pending.lock() {
            p.remove(&id);
        }
    }

    async fn send(&self, req: &Request, fds: &[RawFd]) -> Result<()> {
        let err = |source| RuntimeError::Channel {
            sandbox_id: self.sandbox_id.clone(),
            op: "send",
            source,
        };
        loop {
            let mut guard = self.sock.writable().await.map_err(err)?;
            match guard.try_io(|s| send_packet(s.get_ref().as_fd(), req, fds)) {
                Ok(r) => return r.map_err(err),
                Err(_would_block) => continue,
            }
        }
    }

    /// Routes replies until the init closes the socket.
    async fn read_loop(self: Arc<Self>) {
        loop {
            let r = match self.sock.readable().await {
                Ok(mut guard) => {
                    match guard.try_io(|s| {
                        recv_packet::<Reply>(s.get_ref().as_fd(), MsgFlags::MSG_DONTWAIT)
                    }) {
                        Ok(r) => r,
                        Err(_would_block) => continue,
                    }
                }
                Err(e) => Err(e),
            };
            let (reply, fds) = match r {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(sandbox_id = %self.sandbox_id, error = %e, "control channel read failed");
                    break;
                }
            };
            let id = match &reply {
                Reply::Ready { .. } => 0,
                Reply::Started { id }
                | Reply::SpawnFailed { id, .. }
                | Reply::Exited { id, .. }
                | Reply::SessionFifos { id, .. }
                | Reply::Failed { id, .. } => *id,
            };
            let tx = self.pending.lock().ok().and_then(|p| p.get(&id).cloned());
            match tx {
                Some(tx) => {
                    let _ = tx.send((reply, fds));
                }
                None => tracing::debug!(sandbox_id = %self.sandbox_id, ?reply, "unrouted reply"),
            }
        }
        self.closed.store(true, Ordering::SeqCst);
        if let Ok(mut p) = self.pending.lock() {
            p.clear();
        }
    }
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

    async fn spawn_env(&self, sandbox_id: &str, spec: &SandboxSpec) -> Result<Env> {
        let etc = shared_etc(&self.cfg.state_dir, &self.cfg.user, &self.cfg.hostname)
            .map_err(|(path, source)| RuntimeError::PrepareState { path, source })?;

        let lease = self.lease(sandbox_id);
        let cgroup = match &self.cfg.cgroups {
            Some(m) => {
                let mut cg = m.create(&cgroup_name(sandbox_id), &spec.limits)?;
                if let Some(l) = &lease
                    && let Err(e) = cg.delegate_to(l.base(), l.base())
                {
                    let _ = cg.destroy().await;
                    return Err(e);
                }
                Some(cg)
            }
            None => None,
        };
        self.spawn_env_in(sandbox_id, spec, &etc, cgroup, lease.as_deref())
            .await
    }

    async fn spawn_env_in(
        &self,
        sandbox_id: &str,
        spec: &SandboxSpec,
        etc: &Path,
        cgroup: Option<SandboxCgroup>,
        lease: Option<&IdLease>,
    ) -> Result<Env> {
        let fail = |cgroup: Option<SandboxCgroup>, err: RuntimeError| async move {
            if let Some(cg) = cgroup {
                let _ = cg.destroy().await;
            }
            Err(err)
        };
        let (host_sock, child_sock) = match socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        ) {
            Ok(p) => p,
            Err(e) => {
                return fail(
                    cgroup,
                    RuntimeError::Io {
                        op: "socketpair",
                        source: e.into(),
                    },
                )
                .await;
            }
        };
        // The init's end must block (it is a plain poll loop).
        if let Err(e) = set_blocking(&child_sock) {
            return fail(
                cgroup,
                RuntimeError::Io {
                    op: "fcntl",
                    source: e,
                },
            )
            .await;
        }
        let staging = match lease
            .map(|_| Staging::new(&spec.workspace, &self.cfg.init_path, etc, &self.host))
            .transpose()
        {
            Ok(u) => u,
            Err(source) => {
                return fail(
                    cgroup,
                    RuntimeError::Io {
                        op: "preparing the user namespace",
                        source,
                    },
                )
                .await;
            }
        };
        let (workspace, init_path, etc_dir) = match &staging {
            Some(_) => Staging::paths(),
            None => (
                spec.workspace.clone(),
                self.cfg.init_path.clone(),
                etc.to_path_buf(),
            ),
        };
        let opts = BwrapOptions {
            init_path,
            workspace,
            etc_dir,
            network: spec.network,
            tmp_size: spec.tmp_size.unwrap_or(self.cfg.tmp_size),
            // Not counted against a disk quota (memory, bounded by the memory limit): it keeps
            // the runtime's size whatever the quota.
            shm_size: self.cfg.tmp_size,
            hostname: self.cfg.hostname.clone(),
            control_fd: child_sock.as_raw_fd(),
            userns: staging.as_ref().map(Staging::for_bwrap),
        };
        let args = bwrap_args(&opts, &self.host);
        // Open the cgroup.procs files now: the child only writes to them (no allocation or
        // path lookup between fork and exec).
        let mut procs: Vec<std::fs::File> = Vec::new();
        if let Some(cg) = &cgroup {
            for p in cg.procs_files() {
                match std::fs::OpenOptions::new().write(true).open(&p) {
                    Ok(f) => procs.push(f),
                    Err(source) => {
                        return fail(
                            cgroup,
                            RuntimeError::Cgroup {
                                op: "open",
                                path: p,
                                source,
                            },
                        )
                        .await;
                    }
                }
            }
        }
        let proc_fds: Vec<RawFd> = procs.iter().map(|f| f.as_raw_fd()).collect();
        let ctl_fd = child_sock.as_raw_fd();
        let inherit = staging.as_ref().map(Staging::inherited).unwrap_or_default();
        let stage = staging.as_ref().map(Staging::root);
        // With a user namespace bwrap runs as the block's first uid (root inside) from the
        // start: nothing of the sandbox ever holds a capability in the host's namespace.
        let run_as = lease.map(IdLease::base);
        let nofile = self.cfg.sandbox_nofile.map(|(soft, hard)| libc::rlimit {
            rlim_cur: soft,
            rlim_max: hard,
        });
        let mut cmd = tokio::process::Command::new(&self.cfg.bwrap_path);
        cmd.args(&args)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // SAFETY: the closure runs between fork and exec; it only calls async-signal-safe
        // syscalls (write, fcntl, close_range, setrlimit, unshare, mount, mkdir, open, the
        // set*id calls) on fds and strings prepared before the fork, and allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                // Join every cgroup before exec, so nothing of the sandbox ever runs outside.
                for fd in &proc_fds {
                    if libc::write(*fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // Only stdio and the control socket reach bwrap (and so the sandbox): any
                // descriptor of the server that is not close-on-exec is made so here.
                if libc::close_range(3, u32::MAX, libc::CLOSE_RANGE_CLOEXEC as libc::c_int) != 0 {
                    // Linux < 5.11: one descriptor at a time (EBADF for unused numbers), up to
                    // the highest number this process may have open.
                    let mut lim = libc::rlimit {
                        rlim_cur: 0,
                        rlim_max: 0,
                    };
                    let top = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
                        libc::c_int::try_from(lim.rlim_cur).unwrap_or(libc::c_int::MAX)
                    } else {
                        1 << 20
                    };
                    for fd in 3..top {
                        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                    }
                }
                // The server's own descriptor limit is raised for its FUSE daemons; sandboxes
                // get the one it started with (after the loop above, which needs the raised one).
                if let Some(lim) = &nofile
                    && libc::setrlimit(libc::RLIMIT_NOFILE, lim) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                // Let the control socket (and the user namespace's descriptors) survive exec
                // (they were created close-on-exec so other concurrently spawned processes
                // never inherit them).
                for fd in std::iter::once(ctl_fd).chain(inherit.into_iter().filter(|&f| f > 0)) {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some(st) = &stage {
                    // SAFETY: this is the forked child, about to exec.
                    st.enter()?;
                }
                if let Some(id) = run_as
                    && (libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setresgid(id, id, id) != 0
                        || libc::setresuid(id, id, id) != 0)
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let started = Instant::now();
        // `--die-with-parent` is tied to the spawning *thread*: this runs on a runtime worker
        // thread (never spawn_blocking, whose threads exit when idle). The init also exits when
        // the control socket closes, so a dead server never leaves a sandbox behind.
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(source) => {
                return fail(
                    cgroup,
                    RuntimeError::SpawnBwrap {
                        bwrap: self.cfg.bwrap_path.clone(),
                        source,
                    },
                )
                .await;
            }
        };
        drop(child_sock);
        drop(procs);
        if let (Some(fds), Some(lease)) = (staging, lease)
            && let Err(source) = fds.map_ids(lease, self.cfg.start_timeout).await
        {
            let _ = child.kill().await;
            return fail(
                cgroup,
                RuntimeError::Io {
                    op: "mapping the sandbox's user namespace",
                    source,
                },
            )
            .await;
        }

        let stderr_log = Arc::new(StdMutex::new(String::new()));
        if let Some(mut err) = child.stderr.take() {
            let log = stderr_log.clone();
            let id = sandbox_id.to_owned();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while let Ok(n) = err.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    tracing::warn!(sandbox_id = %id, stderr = %text.trim_end(), "sandbox environment stderr");
                    if let Ok(mut l) = log.lock()
                        && l.len() < 64 * 1024
                    {
                        l.push_str(&text);
                    }
                }
            });
        }

        // SAFETY: `host_sock` is an OwnedFd moved into the AsyncFd: it stays open and refers to
        // the same socket until the AsyncFd is dropped.
        let sock = match unsafe { AsyncFd::register(host_sock) } {
            Ok(s) => s,
            Err(e) => {
                let source = std::io::Error::other(e.to_string());
                return fail(
                    cgroup,
                    RuntimeError::Io {
                        op: "register control socket",
                        source,
                    },
                )
                .await;
            }
        };
        let chan = Arc::new(Channel {
            sandbox_id: sandbox_id.to_owned(),
            sock,
            pending: StdMutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
        });
        let mut ready = chan.register(0);
        tokio::spawn(chan.clone().read_loop());
        let mut writable = vec![
            WORKSPACE.to_owned(),
            "/tmp".to_owned(),
            CHANNEL_DIR.to_owned(),
        ];
        writable.extend(WRITABLE_DEVICES.iter().map(|d| (*d).to_owned()));
        if !self.cfg.user.home.starts_with("/tmp/") {
            writable.push(self.cfg.user.home.clone());
        }
        let config = Request::Configure(InitConfig {
            uid: self.cfg.user.uid,
            gid: self.cfg.user.gid,
            home: self.cfg.user.home.clone(),
            writable,
            seccomp: self.cfg.seccomp,
            landlock: self.cfg.landlock,
        });
        let sent = chan.send(&config, &[]).await;
        let outcome = match sent {
            Ok(()) => tokio::time::timeout(self.cfg.start_timeout, ready.recv()).await,
            Err(_) => Ok(None),
        };
        chan.unregister(0);
        let landlock_status = match outcome {
            Ok(Some((Reply::Ready { landlock }, _))) => {
                tracing::info!(sandbox_id, landlock, elapsed = ?started.elapsed(), "sandbox environment ready");
                landlock
            }
            Ok(_) => {
                // The init died (or bwrap failed before running it): report bwrap in full.
                let status = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
                let stderr = stderr_log.lock().map(|s| s.clone()).unwrap_or_default();
                let err = match status {
                    Ok(Ok(status)) => RuntimeError::BwrapFailed {
                        status,
                        stdout: String::new(),
                        stderr,
                    },
                    _ => {
                        let _ = child.kill().await;
                        RuntimeError::StartTimeout {
                            timeout: self.cfg.start_timeout,
                            stderr,
                        }
                    }
                };
                return fail(cgroup, err).await;
            }
            Err(_) => {
                let _ = child.kill().await;
                let stderr = stderr_log.lock().map(|s| s.clone()).unwrap_or_default();
                return fail(
                    cgroup,
                    RuntimeError::StartTimeout {
                        timeout: self.cfg.start_timeout,
                        stderr,
                    },
                )
                .await;
            }
        };
        // The sandbox's /tmp (with $HOME), seen through its init, for disk quotas.
        let scratch = child.id().and_then(|bwrap| {
            let children =
                std::fs::read_to_string(format!("/proc/{bwrap}/task/{bwrap}/children")).ok()?;
            let init = children.split_whitespace().next()?;
            rustix::fs::open(
                format!("/proc/{init}/root/tmp"),
                rustix::fs::OFlags::PATH
                    | rustix::fs::OFlags::DIRECTORY
                    | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
            .ok()
        });
        if let (Some(fd), Ok(mut m)) = (scratch, self.scratch.lock()) {
            m.insert(sandbox_id.to_owned(), Arc::new(fd));
        }
        let counters = cgroup.as_ref().map(|c| c.counters()).unwrap_or_default();
        Ok(Env {
            sandbox_id: sandbox_id.to_owned(),
            chan,
            child: Mutex::new(Some(child)),
            cgroup,
            counters: StdMutex::new(counters),
            sessions: StdMutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            landlock: landlock_status,
            start_duration: started.elapsed(),
            user: self.cfg.user.clone(),
            events: self.events.clone(),
        })
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

/// Kills everything of a running environment and removes its cgroups.
async fn shutdown_env(env: Arc<Env>) {
    let sessions: Vec<Arc<Session>> = env
        .sessions
        .lock()
        .map(|mut m| m.drain().map(|(_, s)| s).collect())
        .unwrap_or_default();
    for s in sessions {
        let _ = s.closed_tx.send(true);
    }
    let _ = env.chan.send(&Request::Shutdown, &[]).await;
    let child = env.child.lock().await.take();
    if let Some(mut child) = child
        && tokio::time::timeout(Duration::from_secs(2), child.wait())
            .await
            .is_err()
    {
        let _ = child.kill().await;
    }
    if let Some(cg) = &env.cgroup {
        cg.kill_all();
    }
    // Env may still be referenced by in-flight calls; take the cgroup out when we are last.
    match Arc::try_unwrap(env) {
        Ok(env) => {
            if let Some(cg) = env.cgroup
                && let Err(e) = cg.destroy().await
            {
                tracing::warn!(error = %e, "removing sandbox cgroup failed");
            }
        }
        Err(env) => {
            // In-flight calls fail with NotRunning as the channel closed; retry the removal in
            // the background once they let go.
            tokio::spawn(async move {
                let mut env = env;
                for _ in 0..100 {
                    match Arc::try_unwrap(env) {
                        Ok(inner) => {
                            if let Some(cg) = inner.cgroup {
                                let _ = cg.destroy().await;
                            }
                            return;
                        }
                        Err(e) => env = e,
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                tracing::warn!(sandbox_id = %env.sandbox_id, "sandbox cgroup left behind: still referenced");
            });
        }
    }
}

fn setup_error(step: String, errno: i32) -> RuntimeError {
    RuntimeError::CommandSetup {
        message: nix::errno::Errno::from_raw(errno).desc().to_owned(),
        step,
        errno,
    }
}

fn check_executable(p: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let m = std::fs::metadata(p).map_err(|source| RuntimeError::MissingBinary {
        path: p.to_path_buf(),
        source,
    })?;
    if !m.is_file() || m.permissions().mode() & 0o111 == 0 {
        return Err(RuntimeError::MissingBinary {
            path: p.to_path_buf(),
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        });
    }
    Ok(())
}

fn set_blocking(fd: &OwnedFd) -> std::io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK))?;
    Ok(())
}

fn validate_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && !id.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(RuntimeError::invalid(format!(
            "sandbox id {id:?} must be 1-128 characters of [A-Za-z0-9_-]"
        )))
    }
}

/// Rejects limits the environment itself could not live with (the init, bwrap and a shell
/// need some room) or that the kernel refuses.
fn validate_limits(l: &crate::types::ResourceLimits) -> Result<()> {
    let too_small = |what: &str, min: u64, v: Option<u64>| match v {
        Some(v) if v > 0 && v < min => Err(RuntimeError::invalid(format!(
            "{what} must be at least {min} (or 0 for no limit), got {v}"
        ))),
        _ => Ok(()),
    };
    too_small("memory_bytes", 16 << 20, l.memory_bytes)?;
    too_small("pids_limit", 8, l.pids_limit)?;
    too_small("cpu_quota_us", 1_000, l.cpu_quota_us)?;
    too_small("cpu_shares", 2, l.cpu_shares)?;
    Ok(())
}

fn cgroup_name(sandbox_id: &str) -> String {
    format!("sb-{sandbox_id}")
}

/// Resolves a request's workdir to an absolute path inside `/workspace`.
pub fn resolve_workdir(workdir: &str) -> Result<String> {
    let rel = if workdir.starts_with('/') {
        if workdir == WORKSPACE {
            ""
        } else if let Some(rest) = workdir.strip_prefix("/workspace/") {
            rest
        } else {
            return Err(RuntimeError::invalid(format!(
                "workdir {workdir:?} is outside /workspace"
            )));
        }
    } else {
        workdir
    };
    let p = SandboxPath::parse(rel).map_err(|e| RuntimeError::invalid(format!("workdir: {e}")))?;
    Ok(if p.is_root() {
        WORKSPACE.to_owned()
    } else {
        format!("{WORKSPACE}{}", p.as_str())
    })
}

/// The clean default environment plus `extra` (request values win over defaults).
pub fn build_env(
    user: &SandboxUser,
    extra: &BTreeMap<String, String>,
    fixed: &[(&str, &str)],
) -> Result<Vec<String>> {
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    env.insert("PATH".into(), DEFAULT_PATH.into());
    env.insert("HOME".into(), user.home.clone());
    env.insert("LANG".into(), "C.UTF-8".into());
    env.insert("TERM".into(), "dumb".into());
    env.insert("USER".into(), user.name.clone());
    for (k, v) in fixed {
        env.insert((*k).into(), (*v).into());
    }
    for (k, v) in extra {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(RuntimeError::invalid(format!(
                "invalid environment variable {k:?}"
            )));
        }
        env.insert(k.clone(), v.clone());
    }
    Ok(env.into_iter().map(|(k, v)| format!("{k}={v}")).collect())
}

impl Runtime for BwrapRuntime {
    fn create<'a>(&'a self, sandbox_id: &'a str, spec: SandboxSpec) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.do_create(sandbox_id, spec))
    }
    fn sandbox_owner(&self, sandbox_id: &str) -> Option<(u32, u32)> {
        self.host_user(sandbox_id)
    }

    fn scratch(&self, sandbox_id: &str) -> Option<OwnedFd> {
        let fd = self.scratch.lock().ok()?.get(sandbox_id)?.clone();
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

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    #[test]
    fn workdir_stays_inside_workspace() {
        assert_eq!(resolve_workdir("").unwrap(), "/workspace");
        assert_eq!(resolve_workdir("/workspace").unwrap(), "/workspace");
        assert_eq!(resolve_workdir("a/./b/").unwrap(), "/workspace/a/b");
        assert_eq!(
            resolve_workdir("/workspace/a/../c").unwrap(),
            "/workspace/c"
        );
        for bad in [
            "..",
            "a/../../x",
            "/etc",
            "/workspacex",
            "/workspace/../etc",
            "a\0b",
        ] {
            assert!(
                matches!(
                    resolve_workdir(bad),
                    Err(RuntimeError::InvalidArgument { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn env_is_clean_default_plus_request() {
        let user = SandboxUser {
            name: "sandbox".into(),
            uid: 1000,
            gid: 1000,
            home: "/tmp/home".into(),
        };
        let mut extra = BTreeMap::new();
        extra.insert("FOO".to_owned(), "bar".to_owned());
        extra.insert("TERM".to_owned(), "xterm".to_owned());
        let env = build_env(&user, &extra, &[]).unwrap();
        assert_eq!(
            env,
            vec![
                "FOO=bar".to_owned(),
                "HOME=/tmp/home".to_owned(),
                "LANG=C.UTF-8".to_owned(),
                format!("PATH={DEFAULT_PATH}"),
                "TERM=xterm".to_owned(),
                "USER=sandbox".to_owned(),
            ]
        );
        extra.insert("A=B".to_owned(), "x".to_owned());
        assert!(build_env(&user, &extra, &[]).is_err());
    }

    #[test]
    fn limits_are_validated() {
        use crate::types::ResourceLimits;
        assert!(validate_limits(&ResourceLimits::default()).is_ok());
        let ok = ResourceLimits {
            memory_bytes: Some(64 << 20),
            cpu_quota_us: Some(50_000),
            cpu_shares: Some(512),
            pids_limit: Some(50),
        };
        assert!(validate_limits(&ok).is_ok());
        for bad in [
            ResourceLimits {
                memory_bytes: Some(1),
                ..ok
            },
            ResourceLimits {
                pids_limit: Some(2),
                ..ok
            },
            ResourceLimits {
                cpu_quota_us: Some(10),
                ..ok
            },
        ] {
            assert!(matches!(
                validate_limits(&bad),
                Err(RuntimeError::InvalidArgument { .. })
            ));
        }
    }

    #[test]
    fn ids_are_validated() {
        assert!(validate_id("sb_1-a").is_ok());
        for bad in ["", "../x", "a/b", "-x", "a b"] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
        let s = session::new_session_id();
        assert_eq!(s.len(), 5 + 16);
        assert!(s.starts_with("sess_"));
    }
}
