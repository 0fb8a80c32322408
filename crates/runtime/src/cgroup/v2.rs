//! cgroup v2: one directory per sandbox holds every controller.

use std::path::{Path, PathBuf};

use super::{
    CPU_PERIOD_US, CgroupFs, Hierarchy, LimitCounters, SandboxDirs, mkdir, nz, read_counter, set,
    shares_to_weight,
};
use crate::error::{Result, RuntimeError};
use crate::types::ResourceLimits;

/// A pure v2 host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V2 {
    /// `<root>/<service cgroup>/<parent_name>`.
    pub base: PathBuf,
}

/// The controllers every sandbox cgroup gets.
const CONTROLLERS: &str = "+memory +pids +cpu";

impl V2 {
    /// Enables the controllers in the service's cgroup for its children. Under v2's "no
    /// internal processes" rule that fails (EBUSY) while the service's own cgroup (e.g. its
    /// systemd unit) holds the server itself: the server's processes then move into a leaf
    /// beside the sandboxes' subtree first.
    fn enable_controllers(&self, fs: &dyn CgroupFs) -> Result<()> {
        let parent = self.base.parent().unwrap_or(&self.base);
        let control = parent.join("cgroup.subtree_control");
        match fs.write(&control, CONTROLLERS) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(source) => {
                return Err(RuntimeError::Cgroup {
                    op: "write",
                    path: control,
                    source,
                });
            }
        }
        let leaf_name = format!(
            "{}-server",
            self.base
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        let leaf = parent.join(leaf_name);
        mkdir(fs, &leaf)?;
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
        set(fs, control, CONTROLLERS)
    }
}

impl Hierarchy for V2 {
    fn bases(&self) -> Vec<&Path> {
        vec![&self.base]
    }

    fn create(
        &self,
        fs: &dyn CgroupFs,
        name: &str,
        limits: &ResourceLimits,
        dirs: &mut SandboxDirs,
    ) -> Result<()> {
        self.enable_controllers(fs)?;
        mkdir(fs, &self.base)?;
        set(fs, self.base.join("cgroup.subtree_control"), CONTROLLERS)?;
        let dir = self.base.join(name);
        mkdir(fs, &dir)?;
        dirs.unified = Some(dir.clone());
        if let Some(m) = nz(limits.memory_bytes) {
            set(fs, dir.join("memory.max"), &m.to_string())?;
            if fs.exists(&dir.join("memory.swap.max")) {
                set(fs, dir.join("memory.swap.max"), "0")?;
            }
        }
        if let Some(p) = nz(limits.pids_limit) {
            set(fs, dir.join("pids.max"), &p.to_string())?;
        }
        if let Some(q) = nz(limits.cpu_quota_us) {
            set(fs, dir.join("cpu.max"), &format!("{q} {CPU_PERIOD_US}"))?;
        }
        if let Some(s) = nz(limits.cpu_shares) {
            set(fs, dir.join("cpu.weight"), &shares_to_weight(s).to_string())?;
        }
        Ok(())
    }

    fn counters(&self, fs: &dyn CgroupFs, dirs: &SandboxDirs) -> LimitCounters {
        let dir = dirs.unified.as_ref();
        LimitCounters {
            oom_kills: read_counter(fs, dir.map(|d| d.join("memory.events")), "oom_kill"),
            pids_max: read_counter(fs, dir.map(|d| d.join("pids.events")), "max"),
        }
    }
}
