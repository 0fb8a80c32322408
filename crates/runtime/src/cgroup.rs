//! Per-sandbox cgroups: limits, whole-tree kill, limit-hit counters. cgroup v1 (hybrid hosts,
//! such as this project's machines) and v2 (modern hosts).
//!
//! All file access goes through [`CgroupFs`] under an explicit root, so unit tests run against a
//! temporary directory and assert the exact writes. Sandbox cgroups are created under the
//! service's own cgroup (read from `/proc/self/cgroup`), in a `<parent_name>/<sandbox>` subtree.
//!
//! Joining: the runtime opens every `cgroup.procs` of the sandbox before spawning bwrap and the
//! child writes `0` to each between fork and exec (no window where it runs outside).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Result, RuntimeError};
use crate::types::{LimitKind, ResourceLimits, RuntimeEvent};

/// CFS period the quota is expressed against (100 ms).
pub const CPU_PERIOD_US: u64 = 100_000;

/// The narrow file-system seam for cgroup operations.
pub trait CgroupFs: Send + Sync + std::fmt::Debug {
    /// `mkdir -p`.
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Write `value` to an existing control file.
    fn write(&self, path: &Path, value: &str) -> io::Result<()>;
    /// Read a control file.
    fn read(&self, path: &Path) -> io::Result<String>;
    /// `rmdir`.
    fn remove_dir(&self, path: &Path) -> io::Result<()>;
    /// Whether `path` exists.
    fn exists(&self, path: &Path) -> bool;
    /// Subdirectories of `path`.
    fn list_dirs(&self, path: &Path) -> io::Result<Vec<PathBuf>>;
    /// Opens a cgroup directory (read-only), e.g. for `clone3(CLONE_INTO_CGROUP)`.
    fn open_dir(&self, path: &Path) -> io::Result<std::fs::File>;
    /// `chown` (not following a final symlink).
    fn chown(&self, path: &Path, uid: u32, gid: u32) -> io::Result<()>;
}

/// The real file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct StdCgroupFs;

impl CgroupFs for StdCgroupFs {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }
    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
        f.write_all(value.as_bytes())
    }
    fn read(&self, path: &Path) -> io::Result<String> {
        std::fs::read_to_string(path)
    }
    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir(path)
    }
    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
    fn list_dirs(&self, path: &Path) -> io::Result<Vec<PathBuf>> {
        list_dirs(path)
    }
    fn open_dir(&self, path: &Path) -> io::Result<std::fs::File> {
        std::fs::File::open(path)
    }
    fn chown(&self, path: &Path, uid: u32, gid: u32) -> io::Result<()> {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))
    }
}

fn list_dirs(path: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(path)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            out.push(e.path());
        }
    }
    Ok(out)
}

/// Which hierarchy layout the host has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// Pure cgroup v2: one directory holds every controller.
    V2 {
        /// `<root>/<service cgroup>/<parent_name>`.
        base: PathBuf,
    },
    /// cgroup v1 controllers (and maybe a controller-less v2 `unified` hierarchy for kill/track).
    V1 {
        /// `<root>/memory/<service memory cgroup>/<parent_name>`.
        memory: Option<PathBuf>,
        /// Same for `pids`.
        pids: Option<PathBuf>,
        /// Same for `cpu`.
        cpu: Option<PathBuf>,
        /// `<root>/unified/<service cgroup>/<parent_name>` when mounted.
        unified: Option<PathBuf>,
    },
}

/// Finds the service's cgroup path for `controller` (`""` = the v2 line) in `/proc/self/cgroup`
/// contents.
pub fn service_path(proc_self_cgroup: &str, controller: &str) -> Option<String> {
    for line in proc_self_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        let matches = if controller.is_empty() {
            ctrls.is_empty()
        } else {
            ctrls.split(',').any(|c| c == controller)
        };
        if matches {
            return Some(path.trim_start_matches('/').to_owned());
        }
    }
    None
}

/// Creates per-sandbox cgroups.
#[derive(Debug, Clone)]
pub struct CgroupManager {
    fs: Arc<dyn CgroupFs>,
    layout: Layout,
}

/// Counters that grow when a limit is hit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitCounters {
    /// OOM kills in the sandbox (`oom_kill` of `memory.oom_control` / `memory.events`).
    pub oom_kills: u64,
    /// Refused forks (`max` of `pids.events`).
    pub pids_max: u64,
}

/// Compares `now` with the counters last seen (`last`, then set to `now`): each limit hit since
/// (memory, then pids) is reported as a [`RuntimeEvent::ResourceLimitExceeded`] on `events`
/// (dropped with a warning when the channel is full or closed) and returned. Shared by the
/// runtimes, which read `now` from their own cgroups.
pub fn report_limit_hits(
    last: &std::sync::Mutex<LimitCounters>,
    now: LimitCounters,
    events: &tokio::sync::mpsc::Sender<RuntimeEvent>,
    sandbox_id: &str,
    command: &str,
    session_id: Option<&str>,
) -> Vec<LimitKind> {
    let Ok(mut last) = last.lock() else {
        return Vec::new();
    };
    let mut hits = Vec::new();
    if now.oom_kills > last.oom_kills {
        hits.push(LimitKind::Memory);
    }
    if now.pids_max > last.pids_max {
        hits.push(LimitKind::Pids);
    }
    *last = now;
    drop(last);
    for limit in hits.iter().copied() {
        tracing::info!(sandbox_id = %sandbox_id, limit = limit.as_str(), "resource limit exceeded");
        let ev = RuntimeEvent::ResourceLimitExceeded {
            sandbox_id: sandbox_id.to_owned(),
            session_id: session_id.map(str::to_owned),
            limit,
            command: command.to_owned(),
        };
        if events.try_send(ev).is_err() {
            tracing::warn!(sandbox_id = %sandbox_id, "runtime event dropped (channel full or closed)");
        }
    }
    hits
}

impl CgroupManager {
    /// Detects the layout under `root` (normally `/sys/fs/cgroup`) for a service whose
    /// `/proc/self/cgroup` reads `proc_self_cgroup`.
    pub fn detect(
        fs: Arc<dyn CgroupFs>,
        root: &Path,
        proc_self_cgroup: &str,
        parent_name: &str,
    ) -> Result<Self> {
        let unavailable = |reason: String| RuntimeError::CgroupsUnavailable { reason };
        let layout = if fs.exists(&root.join("cgroup.controllers")) {
            let svc = service_path(proc_self_cgroup, "")
                .ok_or_else(|| unavailable("no v2 line in /proc/self/cgroup".into()))?;
            Layout::V2 {
                base: root.join(svc).join(parent_name),
            }
        } else {
            let ctrl = |name: &str| {
                let dir = root.join(name);
                if !fs.exists(&dir.join("cgroup.procs")) {
                    return None;
                }
                service_path(proc_self_cgroup, name).map(|p| dir.join(p).join(parent_name))
            };
            let unified = if fs.exists(&root.join("unified").join("cgroup.procs")) {
                service_path(proc_self_cgroup, "")
                    .map(|p| root.join("unified").join(p).join(parent_name))
            } else {
                None
            };
            let l = Layout::V1 {
                memory: ctrl("memory"),
                pids: ctrl("pids"),
                cpu: ctrl("cpu"),
                unified,
            };
            if l == (Layout::V1 {
                memory: None,
                pids: None,
                cpu: None,
                unified: None,
            }) {
                return Err(unavailable(format!(
                    "no cgroup v1 or v2 hierarchy under {}",
                    root.display()
                )));
            }
            l
        };
        Ok(CgroupManager { fs, layout })
    }

    /// [`CgroupManager::detect`] on the real host: `/sys/fs/cgroup` and this process's
    /// `/proc/self/cgroup`.
    pub fn detect_host(parent_name: &str) -> Result<Self> {
        let proc_self = std::fs::read_to_string("/proc/self/cgroup").map_err(|source| {
            RuntimeError::Cgroup {
                op: "read",
                path: "/proc/self/cgroup".into(),
                source,
            }
        })?;
        Self::detect(
            Arc::new(StdCgroupFs),
            Path::new("/sys/fs/cgroup"),
            &proc_self,
            parent_name,
        )
    }

    /// The detected layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Removes every sandbox cgroup (`sb-*`) under this service's parent cgroups, killing any
    /// process still inside: what a crashed server left behind. Call it at startup, before any
    /// sandbox starts. Returns the directories removed.
    pub fn remove_stale(&self) -> Vec<PathBuf> {
        let bases: Vec<&PathBuf> = match &self.layout {
            Layout::V2 { base } => vec![base],
            Layout::V1 {
                memory,
                pids,
                cpu,
                unified,
            } => [memory, pids, cpu, unified].into_iter().flatten().collect(),
        };
        let mut removed = Vec::new();
        for base in bases {
            let Ok(children) = self.fs.list_dirs(base) else {
                continue;
            };
            for dir in children {
                let is_sandbox = dir
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("sb-"));
                if is_sandbox && self.remove_tree(&dir) {
                    removed.push(dir);
                }
            }
        }
        removed
    }

    /// Kills the processes of `dir` and its descendants and removes them, deepest first.
    fn remove_tree(&self, dir: &Path) -> bool {
        for child in self.fs.list_dirs(dir).unwrap_or_default() {
            self.remove_tree(&child);
        }
        let kill = dir.join("cgroup.kill");
        if !(self.fs.exists(&kill) && self.fs.write(&kill, "1").is_ok())
            && let Ok(procs) = self.fs.read(&dir.join("cgroup.procs"))
        {
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        // The kernel needs a moment to let killed processes leave the cgroup.
        for _ in 0..100 {
            if self.fs.remove_dir(dir).is_ok() || !self.fs.exists(dir) {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        tracing::warn!(dir = %dir.display(), "stale sandbox cgroup could not be removed");
        false
    }

    /// Creates the sandbox's cgroups and writes `limits`. Cleans up what it created on error.
    pub fn create(&self, name: &str, limits: &ResourceLimits) -> Result<SandboxCgroup> {
        let mut cg = SandboxCgroup {
            fs: self.fs.clone(),
            delegate: None,
            v2: false,
            memory: None,
            pids: None,
            cpu: None,
            unified: None,
        };
        let r = self.create_inner(&mut cg, name, limits);
        if r.is_err() {
            cg.remove_dirs_once();
        }
        r.map(|()| cg)
    }

    fn create_inner(
        &self,
        cg: &mut SandboxCgroup,
        name: &str,
        limits: &ResourceLimits,
    ) -> Result<()> {
        let fs = &*self.fs;
        let mkdir = |p: &Path| {
            fs.create_dir_all(p).map_err(|source| RuntimeError::Cgroup {
                op: "mkdir",
                path: p.to_path_buf(),
                source,
            })
        };
        let set = |p: PathBuf, v: &str| {
            fs.write(&p, v).map_err(|source| RuntimeError::Cgroup {
                op: "write",
                path: p,
                source,
            })
        };
        match &self.layout {
            Layout::V2 { base } => {
                cg.v2 = true;
                // Controllers must be enabled on the way down.
                let parent = base.parent().unwrap_or(base);
                let enable = "+memory +pids +cpu";
                let control = parent.join("cgroup.subtree_control");
                match fs.write(&control, enable) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                        // v2 "no internal processes" rule: the service's own cgroup (e.g. its
                        // systemd unit) holds the server itself. Move its processes into a
                        // leaf beside the sandboxes' subtree, then enable the controllers.
                        let leaf_name = format!(
                            "{}-server",
                            base.file_name()
                                .map(|n| n.to_string_lossy().into_owned())
                                .unwrap_or_default()
                        );
                        let leaf = parent.join(leaf_name);
                        mkdir(&leaf)?;
                        let procs = parent.join("cgroup.procs");
                        let pids = fs.read(&procs).map_err(|source| RuntimeError::Cgroup {
                            op: "read",
                            path: procs.clone(),
                            source,
                        })?;
                        for pid in pids.lines().map(str::trim).filter(|l| !l.is_empty()) {
                            // A process may exit meanwhile (ESRCH): nothing to move then.
                            if let Err(e) = fs.write(&leaf.join("cgroup.procs"), pid)
                                && e.raw_os_error() != Some(libc::ESRCH)
                            {
                                return Err(RuntimeError::Cgroup {
                                    op: "write",
                                    path: leaf.join("cgroup.procs"),
                                    source: e,
                                });
                            }
                        }
                        set(control, enable)?;
                    }
                    Err(source) => {
                        return Err(RuntimeError::Cgroup {
                            op: "write",
                            path: control,
                            source,
                        });
                    }
                }
                mkdir(base)?;
                set(base.join("cgroup.subtree_control"), enable)?;
                let dir = base.join(name);
                mkdir(&dir)?;
                cg.unified = Some(dir.clone());
                if let Some(m) = nz(limits.memory_bytes) {
                    set(dir.join("memory.max"), &m.to_string())?;
                    if fs.exists(&dir.join("memory.swap.max")) {
                        set(dir.join("memory.swap.max"), "0")?;
                    }
                }
                if let Some(p) = nz(limits.pids_limit) {
                    set(dir.join("pids.max"), &p.to_string())?;
                }
                if let Some(q) = nz(limits.cpu_quota_us) {
                    set(dir.join("cpu.max"), &format!("{q} {CPU_PERIOD_US}"))?;
                }
                if let Some(s) = nz(limits.cpu_shares) {
                    set(dir.join("cpu.weight"), &shares_to_weight(s).to_string())?;
                }
            }
            Layout::V1 {
                memory,
                pids,
                cpu,
                unified,
            } => {
                if let Some(base) = unified {
                    let dir = base.join(name);
                    mkdir(&dir)?;
                    cg.unified = Some(dir);
                }
                if let Some(base) = memory {
                    let dir = base.join(name);
                    mkdir(&dir)?;
                    cg.memory = Some(dir.clone());
                    if let Some(m) = nz(limits.memory_bytes) {
                        set(dir.join("memory.limit_in_bytes"), &m.to_string())?;
                        let memsw = dir.join("memory.memsw.limit_in_bytes");
                        if fs.exists(&memsw) {
                            set(memsw, &m.to_string())?;
                        }
                    }
                } else if nz(limits.memory_bytes).is_some() {
                    return Err(RuntimeError::CgroupsUnavailable {
                        reason: "memory limit requested but no memory controller".into(),
                    });
                }
                if let Some(base) = pids {
                    let dir = base.join(name);
                    mkdir(&dir)?;
                    cg.pids = Some(dir.clone());
                    if let Some(p) = nz(limits.pids_limit) {
                        set(dir.join("pids.max"), &p.to_string())?;
                    }
                } else if nz(limits.pids_limit).is_some() {
                    return Err(RuntimeError::CgroupsUnavailable {
                        reason: "pids limit requested but no pids controller".into(),
                    });
                }
                if let Some(base) = cpu {
                    let dir = base.join(name);
                    mkdir(&dir)?;
                    cg.cpu = Some(dir.clone());
                    if let Some(q) = nz(limits.cpu_quota_us) {
                        set(dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                        set(dir.join("cpu.cfs_quota_us"), &q.to_string())?;
                    }
                    if let Some(s) = nz(limits.cpu_shares) {
                        set(dir.join("cpu.shares"), &s.to_string())?;
                    }
                } else if nz(limits.cpu_quota_us).or(nz(limits.cpu_shares)).is_some() {
                    return Err(RuntimeError::CgroupsUnavailable {
                        reason: "cpu limit requested but no cpu controller".into(),
                    });
                }
            }
        }
        Ok(())
    }
}

fn nz(v: Option<u64>) -> Option<u64> {
    v.filter(|v| *v > 0)
}

/// Converts v1 `cpu.shares` (2..=262144, default 1024) to v2 `cpu.weight` (1..=10000, default
/// 100), the conversion used by runc/crun.
pub fn shares_to_weight(shares: u64) -> u64 {
    let s = shares.clamp(2, 262_144);
    1 + ((s - 2) * 9999) / 262_142
}

/// The cgroups of one sandbox.
#[derive(Debug)]
pub struct SandboxCgroup {
    fs: Arc<dyn CgroupFs>,
    /// The host (uid, gid) of the sandbox's init when it runs in its own user namespace:
    /// it must be able to place commands in their per-command cgroups (see
    /// [`SandboxCgroup::delegate_to`]).
    delegate: Option<(u32, u32)>,
    v2: bool,
    memory: Option<PathBuf>,
    pids: Option<PathBuf>,
    cpu: Option<PathBuf>,
    /// The v2 directory (pure v2, or the controller-less unified hierarchy of a hybrid host).
    unified: Option<PathBuf>,
}

impl SandboxCgroup {
    fn dirs(&self) -> Vec<&PathBuf> {
        [&self.memory, &self.pids, &self.cpu, &self.unified]
            .into_iter()
            .flatten()
            .collect()
    }

    /// The sandbox's cgroup directories (one per hierarchy).
    pub fn paths(&self) -> Vec<PathBuf> {
        self.dirs().into_iter().cloned().collect()
    }

    /// Lets host (`uid`, `gid`), the sandbox's init in its own user namespace, move its
    /// children into per-command cgroups: a migration needs write access to `cgroup.procs` of
    /// the destination and of the common ancestor (the sandbox's v2 cgroup), which stay
    /// root's otherwise. Limits, `cgroup.kill` and the v1 controllers stay root's.
    pub fn delegate_to(&mut self, uid: u32, gid: u32) -> Result<()> {
        if let Some(dir) = &self.unified {
            let procs = dir.join("cgroup.procs");
            self.fs
                .chown(&procs, uid, gid)
                .map_err(|source| RuntimeError::Cgroup {
                    op: "chown",
                    path: procs,
                    source,
                })?;
        }
        self.delegate = Some((uid, gid));
        Ok(())
    }

    /// Every `cgroup.procs` the sandbox's processes must join.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs()
            .into_iter()
            .map(|d| d.join("cgroup.procs"))
            .collect()
    }

    /// Reads the limit-hit counters (missing files count as zero).
    pub fn counters(&self) -> LimitCounters {
        let field = |path: Option<PathBuf>, key: &str| -> u64 {
            let Some(path) = path else { return 0 };
            let Ok(text) = self.fs.read(&path) else {
                return 0;
            };
            text.lines()
                .filter_map(|l| l.split_once(' '))
                .find(|(k, _)| *k == key)
                .and_then(|(_, v)| v.trim().parse().ok())
                .unwrap_or(0)
        };
        if self.v2 {
            let dir = self.unified.clone();
            LimitCounters {
                oom_kills: field(dir.as_ref().map(|d| d.join("memory.events")), "oom_kill"),
                pids_max: field(dir.as_ref().map(|d| d.join("pids.events")), "max"),
            }
        } else {
            LimitCounters {
                oom_kills: field(
                    self.memory.as_ref().map(|d| d.join("memory.oom_control")),
                    "oom_kill",
                ),
                pids_max: field(self.pids.as_ref().map(|d| d.join("pids.events")), "max"),
            }
        }
    }

    /// Kills every process in the sandbox: `cgroup.kill` where the kernel has it, otherwise
    /// SIGKILL to every pid listed in `cgroup.procs`.
    pub fn kill_all(&self) {
        if let Some(dir) = &self.unified {
            let kill = dir.join("cgroup.kill");
            if self.fs.exists(&kill) && self.fs.write(&kill, "1").is_ok() {
                return;
            }
        }
        for dir in self.dirs() {
            if let Ok(procs) = self.fs.read(&dir.join("cgroup.procs")) {
                for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
    }

    /// True when no process is left in any of the sandbox's cgroups.
    pub fn is_empty(&self) -> bool {
        self.dirs().into_iter().all(|d| {
            self.fs
                .read(&d.join("cgroup.procs"))
                .map(|s| s.trim().is_empty())
                .unwrap_or(true)
        })
    }

    /// Creates a per-command cgroup below the sandbox's v2 cgroup (pure v2 or the unified
    /// hierarchy of a hybrid host), so the command's whole tree can be killed with
    /// `cgroup.kill` whatever sessions or process groups it creates. `None` without a v2
    /// hierarchy (the caller falls back to killing the process group).
    pub fn exec_cgroup(&self, name: &str) -> Result<Option<ExecCgroup>> {
        let Some(base) = &self.unified else {
            return Ok(None);
        };
        let dir = base.join(name);
        self.fs
            .create_dir_all(&dir)
            .map_err(|source| RuntimeError::Cgroup {
                op: "mkdir",
                path: dir.clone(),
                source,
            })?;
        // Only `cgroup.procs`: owning the directory would let the init create cgroups below.
        if let Some((uid, gid)) = self.delegate {
            let procs = dir.join("cgroup.procs");
            if let Err(source) = self.fs.chown(&procs, uid, gid) {
                let _ = self.fs.remove_dir(&dir);
                return Err(RuntimeError::Cgroup {
                    op: "chown",
                    path: procs,
                    source,
                });
            }
        }
        let handle = match self.fs.open_dir(&dir) {
            Ok(f) => f,
            Err(source) => {
                let _ = self.fs.remove_dir(&dir);
                return Err(RuntimeError::Cgroup {
                    op: "open",
                    path: dir,
                    source,
                });
            }
        };
        Ok(Some(ExecCgroup {
            fs: self.fs.clone(),
            dir,
            handle: Some(handle),
        }))
    }

    fn remove_dirs_once(&self) -> Vec<(PathBuf, io::Error)> {
        let mut errs = Vec::new();
        if let Some(u) = &self.unified
            && let Ok(children) = self.fs.list_dirs(u)
        {
            for c in children {
                if let Err(e) = self.fs.remove_dir(&c) {
                    errs.push((c, e));
                }
            }
        }
        for d in self.dirs() {
            if self.fs.exists(d)
                && let Err(e) = self.fs.remove_dir(d)
            {
                errs.push((d.clone(), e));
            }
        }
        errs
    }

    /// Blocking variant of [`SandboxCgroup::destroy`] for `Drop` paths (no async context).
    pub fn destroy_blocking(&self) {
        self.kill_all();
        for _ in 0..200 {
            if self.is_empty() && self.remove_dirs_once().is_empty() {
                for d in self.dirs() {
                    if let Some(p) = d.parent() {
                        let _ = self.fs.remove_dir(p);
                    }
                }
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
            self.kill_all();
        }
        tracing::warn!(dirs = ?self.dirs(), "sandbox cgroup left behind");
    }

    /// Kills what is left and removes the directories, retrying while the kernel finishes
    /// tearing processes down (up to ~2 s). The shared parent directories are removed when empty.
    pub async fn destroy(self) -> Result<()> {
        self.kill_all();
        let mut last = Vec::new();
        let mut removed = false;
        for _ in 0..200 {
            if self.is_empty() {
                last = self.remove_dirs_once();
                if last.is_empty() {
                    removed = true;
                    break;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            self.kill_all();
        }
        if !removed && last.is_empty() {
            // Still not empty after ~2 s: leave the directories (a restart's `remove_stale`
            // collects them) rather than fail the destroy, but say so.
            tracing::warn!(dirs = ?self.dirs(), "sandbox cgroup still has processes; left behind");
            return Ok(());
        }
        if let Some((path, source)) = last.into_iter().next() {
            return Err(RuntimeError::Cgroup {
                op: "rmdir",
                path,
                source,
            });
        }
        // Best effort: the `<parent_name>` directories, shared with other sandboxes.
        for d in self.dirs() {
            if let Some(p) = d.parent() {
                let _ = self.fs.remove_dir(p);
            }
        }
        Ok(())
    }
}

/// The cgroup of one command (or session shell): whole-tree kill.
#[derive(Debug)]
pub struct ExecCgroup {
    fs: Arc<dyn CgroupFs>,
    dir: PathBuf,
    handle: Option<std::fs::File>,
}

impl ExecCgroup {
    /// The open cgroup directory handed to the init, which starts the command in it
    /// (`clone3` with `CLONE_INTO_CGROUP`, or `cgroup.procs` on older kernels). Taken once.
    pub fn take_handle(&mut self) -> Option<std::fs::File> {
        self.handle.take()
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// SIGKILLs every process in the cgroup (`cgroup.kill`, or each listed pid).
    pub fn kill(&self) {
        let kill = self.dir.join("cgroup.kill");
        if self.fs.exists(&kill) && self.fs.write(&kill, "1").is_ok() {
            return;
        }
        if let Ok(procs) = self.fs.read(&self.dir.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }

    /// Waits (polling) until no process is left in the cgroup, at most `limit`; true if empty.
    pub async fn wait_empty(&self, limit: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let empty = self
                .fs
                .read(&self.dir.join("cgroup.procs"))
                .map(|s| s.trim().is_empty())
                .unwrap_or(true);
            if empty {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// Removes the cgroup if it is empty (a background process may keep it alive; the sandbox's
    /// destroy removes it then).
    pub fn remove_if_empty(&self) {
        let _ = self.fs.remove_dir(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;
    use std::sync::Mutex;

    /// Records writes and delegates to the real file system under a temp root.
    #[derive(Debug, Default)]
    struct Recording {
        writes: Mutex<Vec<(PathBuf, String)>>,
        /// Paths whose first write fails with EBUSY (like a v2 cgroup with processes).
        busy_once: Mutex<Vec<PathBuf>>,
    }

    impl CgroupFs for Recording {
        fn create_dir_all(&self, path: &Path) -> io::Result<()> {
            StdCgroupFs.create_dir_all(path)
        }
        fn write(&self, path: &Path, value: &str) -> io::Result<()> {
            let mut busy = self.busy_once.lock().unwrap();
            if let Some(i) = busy.iter().position(|p| p == path) {
                busy.remove(i);
                return Err(io::Error::from_raw_os_error(libc::EBUSY));
            }
            drop(busy);
            self.writes
                .lock()
                .unwrap()
                .push((path.to_path_buf(), value.to_owned()));
            std::fs::write(path, value)
        }
        fn read(&self, path: &Path) -> io::Result<String> {
            StdCgroupFs.read(path)
        }
        // Directories here hold plain files (not cgroupfs control files), so rmdir alone
        // would fail.
        fn remove_dir(&self, path: &Path) -> io::Result<()> {
            std::fs::remove_dir_all(path)
        }
        fn exists(&self, path: &Path) -> bool {
            StdCgroupFs.exists(path)
        }
        fn list_dirs(&self, path: &Path) -> io::Result<Vec<PathBuf>> {
            StdCgroupFs.list_dirs(path)
        }
        fn chown(&self, path: &Path, _uid: u32, _gid: u32) -> io::Result<()> {
            self.writes
                .lock()
                .unwrap()
                .push((path.to_path_buf(), "chown".to_owned()));
            Ok(())
        }
        fn open_dir(&self, path: &Path) -> io::Result<std::fs::File> {
            StdCgroupFs.open_dir(path)
        }
    }

    const HYBRID: &str = "9:name=systemd:/\n8:pids:/\n4:memory:/svc/x\n1:cpu:/\n0::/\n";

    fn limits() -> ResourceLimits {
        ResourceLimits {
            memory_bytes: Some(64 << 20),
            cpu_quota_us: Some(50_000),
            cpu_shares: Some(512),
            pids_limit: Some(50),
        }
    }

    #[test]
    fn service_path_parsing() {
        assert_eq!(service_path(HYBRID, "memory").as_deref(), Some("svc/x"));
        assert_eq!(service_path(HYBRID, "pids").as_deref(), Some(""));
        assert_eq!(service_path(HYBRID, "").as_deref(), Some(""));
        assert_eq!(service_path(HYBRID, "blkio"), None);
    }

    #[test]
    fn v1_hybrid_writes_exactly_the_limits() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        for c in ["memory", "pids", "cpu", "unified"] {
            std::fs::create_dir_all(r.join(c)).unwrap();
            std::fs::write(r.join(c).join("cgroup.procs"), "").unwrap();
        }
        let fs = Arc::new(Recording::default());
        let m = CgroupManager::detect(fs.clone(), r, HYBRID, "agentfense").unwrap();
        assert_eq!(
            m.layout(),
            &Layout::V1 {
                memory: Some(r.join("memory/svc/x/agentfense")),
                pids: Some(r.join("pids/agentfense")),
                cpu: Some(r.join("cpu/agentfense")),
                unified: Some(r.join("unified/agentfense")),
            }
        );
        let cg = m.create("sb1", &limits()).unwrap();
        let writes = fs.writes.lock().unwrap().clone();
        let rel: Vec<(String, String)> = writes
            .into_iter()
            .map(|(p, v)| (p.strip_prefix(r).unwrap().display().to_string(), v))
            .collect();
        let want = vec![
            (
                "memory/svc/x/agentfense/sb1/memory.limit_in_bytes",
                "67108864",
            ),
            ("pids/agentfense/sb1/pids.max", "50"),
            ("cpu/agentfense/sb1/cpu.cfs_period_us", "100000"),
            ("cpu/agentfense/sb1/cpu.cfs_quota_us", "50000"),
            ("cpu/agentfense/sb1/cpu.shares", "512"),
        ];
        let want: Vec<(String, String)> = want
            .into_iter()
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
            .collect();
        assert_eq!(rel, want);
        assert_eq!(
            cg.procs_files(),
            vec![
                r.join("memory/svc/x/agentfense/sb1/cgroup.procs"),
                r.join("pids/agentfense/sb1/cgroup.procs"),
                r.join("cpu/agentfense/sb1/cgroup.procs"),
                r.join("unified/agentfense/sb1/cgroup.procs"),
            ]
        );
        std::fs::write(
            r.join("memory/svc/x/agentfense/sb1/memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
        )
        .unwrap();
        std::fs::write(r.join("pids/agentfense/sb1/pids.events"), "max 7\n").unwrap();
        assert_eq!(
            cg.counters(),
            LimitCounters {
                oom_kills: 3,
                pids_max: 7
            }
        );
        // Per-command cgroups live in the unified hierarchy.
        let mut ex = cg.exec_cgroup("e7").unwrap().unwrap();
        assert_eq!(ex.dir(), r.join("unified/agentfense/sb1/e7"));
        assert!(
            ex.take_handle()
                .is_some_and(|f| f.metadata().unwrap().is_dir())
        );
        assert!(ex.take_handle().is_none());
        std::fs::write(r.join("unified/agentfense/sb1/e7/cgroup.kill"), "").unwrap();
        ex.kill();
        assert_eq!(
            fs.writes.lock().unwrap().last().unwrap(),
            &(
                r.join("unified/agentfense/sb1/e7/cgroup.kill"),
                "1".to_owned()
            )
        );
        // kill_all prefers cgroup.kill of the unified hierarchy.
        std::fs::write(r.join("unified/agentfense/sb1/cgroup.kill"), "").unwrap();
        cg.kill_all();
        assert_eq!(
            fs.writes.lock().unwrap().last().unwrap(),
            &(r.join("unified/agentfense/sb1/cgroup.kill"), "1".to_owned())
        );
    }

    #[test]
    fn v2_writes_exactly_the_limits() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::write(r.join("cgroup.controllers"), "memory pids cpu").unwrap();
        std::fs::create_dir_all(r.join("srv")).unwrap();
        let fs = Arc::new(Recording::default());
        let m = CgroupManager::detect(fs.clone(), r, "0::/srv\n", "agentfense").unwrap();
        assert_eq!(
            m.layout(),
            &Layout::V2 {
                base: r.join("srv/agentfense")
            }
        );
        let _cg = m.create("sb1", &limits()).unwrap();
        let rel: Vec<(String, String)> = fs
            .writes
            .lock()
            .unwrap()
            .iter()
            .map(|(p, v)| (p.strip_prefix(r).unwrap().display().to_string(), v.clone()))
            .collect();
        let want: Vec<(String, String)> = [
            ("srv/cgroup.subtree_control", "+memory +pids +cpu"),
            (
                "srv/agentfense/cgroup.subtree_control",
                "+memory +pids +cpu",
            ),
            ("srv/agentfense/sb1/memory.max", "67108864"),
            ("srv/agentfense/sb1/pids.max", "50"),
            ("srv/agentfense/sb1/cpu.max", "50000 100000"),
            ("srv/agentfense/sb1/cpu.weight", "20"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
        .collect();
        assert_eq!(rel, want);
    }

    #[test]
    fn v2_moves_the_server_out_of_its_busy_cgroup() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::write(r.join("cgroup.controllers"), "memory pids cpu").unwrap();
        std::fs::create_dir_all(r.join("srv")).unwrap();
        std::fs::write(r.join("srv/cgroup.procs"), "41\n42\n").unwrap();
        let fs = Arc::new(Recording::default());
        fs.busy_once
            .lock()
            .unwrap()
            .push(r.join("srv/cgroup.subtree_control"));
        let m = CgroupManager::detect(fs.clone(), r, "0::/srv\n", "agentfense").unwrap();
        let _cg = m.create("sb1", &ResourceLimits::default()).unwrap();
        let rel: Vec<(String, String)> = fs
            .writes
            .lock()
            .unwrap()
            .iter()
            .map(|(p, v)| (p.strip_prefix(r).unwrap().display().to_string(), v.clone()))
            .collect();
        let want: Vec<(String, String)> = [
            ("srv/agentfense-server/cgroup.procs", "41"),
            ("srv/agentfense-server/cgroup.procs", "42"),
            ("srv/cgroup.subtree_control", "+memory +pids +cpu"),
            (
                "srv/agentfense/cgroup.subtree_control",
                "+memory +pids +cpu",
            ),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
        .collect();
        assert_eq!(rel, want);
    }

    #[test]
    fn no_limits_writes_nothing() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join("pids")).unwrap();
        std::fs::write(r.join("pids/cgroup.procs"), "").unwrap();
        let fs = Arc::new(Recording::default());
        let m = CgroupManager::detect(fs.clone(), r, HYBRID, "af").unwrap();
        let cg = m.create("sb", &ResourceLimits::default()).unwrap();
        assert!(fs.writes.lock().unwrap().is_empty());
        assert_eq!(cg.procs_files(), vec![r.join("pids/af/sb/cgroup.procs")]);
        // A memory limit without a memory controller fails closed.
        let err = m
            .create(
                "sb2",
                &ResourceLimits {
                    memory_bytes: Some(1),
                    ..Default::default()
                },
            )
            .unwrap_err();
        assert!(matches!(err, RuntimeError::CgroupsUnavailable { .. }));
    }

    #[test]
    fn weight_conversion() {
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(262_144), 10_000);
    }

    #[test]
    fn remove_stale_removes_only_sandbox_cgroups() {
        let root = tempfile::tempdir().unwrap();
        let base = root.path().join("memory/svc/agentfense");
        for d in ["sb-sb_1/cmd-1", "sb-sb_2", "other"] {
            std::fs::create_dir_all(base.join(d)).unwrap();
        }
        let mgr = CgroupManager {
            fs: Arc::new(StdCgroupFs),
            layout: Layout::V1 {
                memory: Some(base.clone()),
                pids: None,
                cpu: None,
                unified: None,
            },
        };
        let mut removed = mgr.remove_stale();
        removed.sort();
        assert_eq!(removed, vec![base.join("sb-sb_1"), base.join("sb-sb_2")]);
        assert!(base.join("other").exists());
        assert!(!base.join("sb-sb_1").exists());
    }
}
