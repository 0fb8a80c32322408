//! cgroup v1 (hybrid hosts): one directory per controller, plus the controller-less v2
//! `unified` hierarchy where it is mounted (per-command cgroups and `cgroup.kill` live there).

use std::path::{Path, PathBuf};

use super::{
    CPU_PERIOD_US, CgroupFs, Hierarchy, LimitCounters, SandboxDirs, mkdir, nz, read_counter, set,
};
use crate::error::{Result, RuntimeError};
use crate::types::ResourceLimits;

/// A v1 (or hybrid) host: the service's parent directory in each hierarchy it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V1 {
    /// `<root>/memory/<service memory cgroup>/<parent_name>`.
    pub memory: Option<PathBuf>,
    /// Same for `pids`.
    pub pids: Option<PathBuf>,
    /// Same for `cpu`.
    pub cpu: Option<PathBuf>,
    /// `<root>/unified/<service cgroup>/<parent_name>` when mounted.
    pub unified: Option<PathBuf>,
}

/// A limit asked for in a hierarchy the host does not have.
fn missing(controller: &str, what: &str) -> RuntimeError {
    RuntimeError::CgroupsUnavailable {
        reason: format!("{what} limit requested but no {controller} controller"),
    }
}

impl Hierarchy for V1 {
    fn bases(&self) -> Vec<&Path> {
        [&self.memory, &self.pids, &self.cpu, &self.unified]
            .into_iter()
            .flatten()
            .map(PathBuf::as_path)
            .collect()
    }

    fn create(
        &self,
        fs: &dyn CgroupFs,
        name: &str,
        limits: &ResourceLimits,
        dirs: &mut SandboxDirs,
    ) -> Result<()> {
        if let Some(base) = &self.unified {
            let dir = base.join(name);
            mkdir(fs, &dir)?;
            dirs.unified = Some(dir);
        }
        if let Some(base) = &self.memory {
            let dir = base.join(name);
            mkdir(fs, &dir)?;
            dirs.memory = Some(dir.clone());
            if let Some(m) = nz(limits.memory_bytes) {
                set(fs, dir.join("memory.limit_in_bytes"), &m.to_string())?;
                let memsw = dir.join("memory.memsw.limit_in_bytes");
                if fs.exists(&memsw) {
                    set(fs, memsw, &m.to_string())?;
                }
            }
        } else if nz(limits.memory_bytes).is_some() {
            return Err(missing("memory", "memory"));
        }
        if let Some(base) = &self.pids {
            let dir = base.join(name);
            mkdir(fs, &dir)?;
            dirs.pids = Some(dir.clone());
            if let Some(p) = nz(limits.pids_limit) {
                set(fs, dir.join("pids.max"), &p.to_string())?;
            }
        } else if nz(limits.pids_limit).is_some() {
            return Err(missing("pids", "pids"));
        }
        if let Some(base) = &self.cpu {
            let dir = base.join(name);
            mkdir(fs, &dir)?;
            dirs.cpu = Some(dir.clone());
            if let Some(q) = nz(limits.cpu_quota_us) {
                set(
                    fs,
                    dir.join("cpu.cfs_period_us"),
                    &CPU_PERIOD_US.to_string(),
                )?;
                set(fs, dir.join("cpu.cfs_quota_us"), &q.to_string())?;
            }
            if let Some(s) = nz(limits.cpu_shares) {
                set(fs, dir.join("cpu.shares"), &s.to_string())?;
            }
        } else if nz(limits.cpu_quota_us).or(nz(limits.cpu_shares)).is_some() {
            return Err(missing("cpu", "cpu"));
        }
        Ok(())
    }

    fn counters(&self, fs: &dyn CgroupFs, dirs: &SandboxDirs) -> LimitCounters {
        LimitCounters {
            oom_kills: read_counter(
                fs,
                dirs.memory.as_ref().map(|d| d.join("memory.oom_control")),
                "oom_kill",
            ),
            pids_max: read_counter(fs, dirs.pids.as_ref().map(|d| d.join("pids.events")), "max"),
        }
    }
}
