//! Resource-limit hits of a container, from its cgroup counters (v1 `memory.oom_control` /
//! `pids.events`, v2 `memory.events` / `pids.events`).

use std::path::{Path, PathBuf};

use agentfense_runtime::cgroup::{LimitCounters, service_path};

/// The counter files of one container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CounterFiles {
    /// File with an `oom_kill N` line.
    pub oom: Option<PathBuf>,
    /// File with a `max N` line.
    pub pids: Option<PathBuf>,
}

impl CounterFiles {
    /// Finds the files of the container whose init has host pid `pid`, from its
    /// `/proc/<pid>/cgroup` text, under the cgroup root `root` (normally `/sys/fs/cgroup`).
    pub fn locate(root: &Path, proc_cgroup: &str) -> CounterFiles {
        let v1 = |ctrl: &str, file: &str| {
            service_path(proc_cgroup, ctrl)
                .map(|p| root.join(ctrl).join(p).join(file))
                .filter(|p| p.exists())
        };
        let oom = v1("memory", "memory.oom_control");
        let pids = v1("pids", "pids.events");
        if oom.is_some() || pids.is_some() {
            return CounterFiles { oom, pids };
        }
        // Pure v2: one directory holds every controller.
        let v2 = service_path(proc_cgroup, "").map(|p| root.join(p));
        CounterFiles {
            oom: v2
                .as_ref()
                .map(|d| d.join("memory.events"))
                .filter(|p| p.exists()),
            pids: v2
                .as_ref()
                .map(|d| d.join("pids.events"))
                .filter(|p| p.exists()),
        }
    }

    /// Reads the counters (missing files count as zero).
    pub fn read(&self) -> LimitCounters {
        let field = |path: &Option<PathBuf>, key: &str| -> u64 {
            let Some(text) = path.as_ref().and_then(|p| std::fs::read_to_string(p).ok()) else {
                return 0;
            };
            text.lines()
                .filter_map(|l| l.split_once(' '))
                .find(|(k, _)| *k == key)
                .and_then(|(_, v)| v.trim().parse().ok())
                .unwrap_or(0)
        };
        LimitCounters {
            oom_kills: field(&self.oom, "oom_kill"),
            pids_max: field(&self.pids, "max"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    #[test]
    fn locates_v1_and_v2_files() {
        let root = tempfile::tempdir().unwrap();
        let mem = root.path().join("memory/docker/abc");
        let pids = root.path().join("pids/docker/abc");
        std::fs::create_dir_all(&mem).unwrap();
        std::fs::create_dir_all(&pids).unwrap();
        std::fs::write(
            mem.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )
        .unwrap();
        std::fs::write(pids.join("pids.events"), "max 7\n").unwrap();
        let v1 = "12:pids:/docker/abc\n5:memory:/docker/abc\n0::/docker/abc\n";
        let f = CounterFiles::locate(root.path(), v1);
        assert_eq!(
            f.read(),
            LimitCounters {
                oom_kills: 2,
                pids_max: 7
            }
        );

        let root = tempfile::tempdir().unwrap();
        let d = root.path().join("system.slice/docker-abc.scope");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        )
        .unwrap();
        std::fs::write(d.join("pids.events"), "max 0\n").unwrap();
        let f = CounterFiles::locate(root.path(), "0::/system.slice/docker-abc.scope\n");
        assert_eq!(
            f.read(),
            LimitCounters {
                oom_kills: 1,
                pids_max: 0
            }
        );
    }
}
