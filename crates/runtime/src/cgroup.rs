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
pub use v1::V1;
pub use v2::V2;

mod v1;
mod v2;
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
    V2(V2),
    /// cgroup v1 controllers (and maybe a controller-less v2 `unified` hierarchy for kill/track).
    V1(V1),
}

impl Layout {
    fn hierarchy(&self) -> &dyn Hierarchy {
        match self {
            Layout::V2(h) => h,
            Layout::V1(h) => h,
        }
    }
}

/// What differs between cgroup v1 and v2 (one implementation each, in `v1.rs` and `v2.rs`, as
/// youki splits them): where sandbox cgroups live, how limits are written, where the
/// limit-hit counters are read. Everything else (joining, kill, removal, per-command cgroups)
/// works on the directories alone.
trait Hierarchy: Send + Sync + std::fmt::Debug {
    /// The parent directories holding this service's sandbox cgroups.
    fn bases(&self) -> Vec<&Path>;

    /// Creates sandbox `name`'s cgroups in `dirs` (recording each directory as soon as it
    /// exists, so that a failure can remove it) and writes `limits`.
    fn create(
        &self,
        fs: &dyn CgroupFs,
        name: &str,
        limits: &ResourceLimits,
        dirs: &mut SandboxDirs,
    ) -> Result<()>;

    /// Reads the limit-hit counters of a sandbox (missing files count as zero).
    fn counters(&self, fs: &dyn CgroupFs, dirs: &SandboxDirs) -> LimitCounters;
}

/// The directories of one sandbox, one per hierarchy it has.
#[derive(Debug, Default)]
struct SandboxDirs {
    memory: Option<PathBuf>,
    pids: Option<PathBuf>,
    cpu: Option<PathBuf>,
    /// The v2 directory (pure v2, or the controller-less unified hierarchy of a hybrid host).
    unified: Option<PathBuf>,
}

impl SandboxDirs {
    fn all(&self) -> Vec<&PathBuf> {
        [&self.memory, &self.pids, &self.cpu, &self.unified]
            .into_iter()
            .flatten()
            .collect()
    }
}

/// The value of `key` in a flat-keyed cgroup file (`memory.events`, `pids.events`, ...);
/// zero when the file or the key is missing.
fn read_counter(fs: &dyn CgroupFs, path: Option<PathBuf>, key: &str) -> u64 {
    let Some(path) = path else { return 0 };
    let Ok(text) = fs.read(&path) else {
        return 0;
    };
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

/// `mkdir -p` with the error the runtime reports.
fn mkdir(fs: &dyn CgroupFs, p: &Path) -> Result<()> {
    fs.create_dir_all(p).map_err(|source| RuntimeError::Cgroup {
        op: "mkdir",
        path: p.to_path_buf(),
        source,
    })
}

/// Writes one control file, with the error the runtime reports.
fn set(fs: &dyn CgroupFs, p: PathBuf, v: &str) -> Result<()> {
    fs.write(&p, v).map_err(|source| RuntimeError::Cgroup {
        op: "write",
        path: p,
        source,
    })
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
    layout: Arc<Layout>,
}

/// What a sandbox uses now, read from its cgroups.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// CPU time used since it started, microseconds.
    pub cpu_usec: u64,
    /// Memory in use, bytes.
    pub memory_bytes: u64,
    /// Processes (tasks) now.
    pub pids: u64,
}

/// The first number in a cgroup file (`memory.current`, `pids.current`, ...), if readable.
fn read_number(fs: &dyn CgroupFs, path: &Path) -> Option<u64> {
    fs.read(path).ok()?.split_whitespace().next()?.parse().ok()
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
            Layout::V2(V2 {
                base: root.join(svc).join(parent_name),
            })
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
            let v1 = V1 {
                memory: ctrl("memory"),
                pids: ctrl("pids"),
                cpu: ctrl("cpu"),
                unified,
            };
            if v1.bases().is_empty() {
                return Err(unavailable(format!(
                    "no cgroup v1 or v2 hierarchy under {}",
                    root.display()
                )));
            }
            Layout::V1(v1)
        };
        Ok(CgroupManager {
            fs,
            layout: Arc::new(layout),
        })
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
        let bases = self.layout.hierarchy().bases();
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
            layout: self.layout.clone(),
            delegate: None,
            dirs: SandboxDirs::default(),
        };
        let r = self
            .layout
            .hierarchy()
            .create(&*self.fs, name, limits, &mut cg.dirs);
        if r.is_err() {
            cg.remove_dirs_once();
        }
        r.map(|()| cg)
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
    layout: Arc<Layout>,
    /// The host (uid, gid) of the sandbox's init when it runs in its own user namespace:
    /// it must be able to place commands in their per-command cgroups (see
    /// [`SandboxCgroup::delegate_to`]).
    delegate: Option<(u32, u32)>,
    dirs: SandboxDirs,
}

impl SandboxCgroup {
    fn dirs(&self) -> Vec<&PathBuf> {
        self.dirs.all()
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
        if let Some(dir) = &self.dirs.unified {
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

    /// What the sandbox uses now (cgroup v2 files, else their v1 counterparts; missing files
    /// count as zero).
    pub fn usage(&self) -> Usage {
        let fs = &*self.fs;
        let d = &self.dirs;
        let first = |dir: &Option<PathBuf>, names: &[&str]| -> Option<u64> {
            let dir = dir.as_ref().or(d.unified.as_ref())?;
            names.iter().find_map(|n| read_number(fs, &dir.join(n)))
        };
        // cgroup v2 keeps `cpu.stat` in every directory, with or without the cpu controller.
        let cpu_usec = [&d.cpu, &d.unified, &d.memory, &d.pids]
            .into_iter()
            .flatten()
            .map(|dir| read_counter(fs, Some(dir.join("cpu.stat")), "usage_usec"))
            .find(|v| *v > 0)
            .or_else(|| first(&d.cpu, &["cpuacct.usage"]).map(|ns| ns / 1000))
            .unwrap_or(0);
        Usage {
            cpu_usec,
            memory_bytes: first(&d.memory, &["memory.current", "memory.usage_in_bytes"])
                .unwrap_or(0),
            pids: first(&d.pids, &["pids.current"]).unwrap_or(0),
        }
    }

    /// Reads the limit-hit counters (missing files count as zero).
    pub fn counters(&self) -> LimitCounters {
        self.layout.hierarchy().counters(&*self.fs, &self.dirs)
    }

    /// Kills every process in the sandbox: `cgroup.kill` where the kernel has it, otherwise
    /// SIGKILL to every pid listed in `cgroup.procs`.
    pub fn kill_all(&self) {
        if let Some(dir) = &self.dirs.unified {
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
        let Some(base) = &self.dirs.unified else {
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
        if let Some(u) = &self.dirs.unified
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
mod tests;
