//! Killing a command's process tree from the host.
//!
//! Docker makes every exec process a session and process-group leader, and the daemon tells us
//! its host pid. On a deadline we SIGKILL that process group and every descendant found under
//! `/proc/<pid>/task/*/children` (which also catches children that moved to another group or
//! session, e.g. with `setsid`). Only pids whose `/proc/<pid>/cgroup` names the sandbox's
//! container are touched, so a stale or foreign pid is never signalled.

use std::os::fd::OwnedFd;

use rustix::process::{Pid, Signal};

/// Whether host `pid` belongs to the container `container_id` (its cgroup path names it).
pub fn in_container(pid: u32, container_id: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .is_ok_and(|c| cgroup_in_container(&c, container_id))
}

/// Whether a process whose `/proc/<pid>/cgroup` reads `cgroup` is in container
/// `container_id`.
pub fn cgroup_in_container(cgroup: &str, container_id: &str) -> bool {
    !container_id.is_empty() && cgroup.lines().any(|l| l.contains(container_id))
}

/// Sends `signal` to the process group led by `leader` and, for SIGKILL, to every descendant of
/// `leader`. The group is signalled with `kill(-pgid)` when the leader is alive and the
/// container's; after the leader died (a session shell that ran `exit`), its remaining members
/// are found in `/proc` instead. SIGKILL rounds repeat so children forked meanwhile go too.
pub fn kill_tree(leader: u32, container_id: &str, signal: Signal) {
    for _ in 0..3 {
        let tree: Vec<u32> = agentfense_runtime::process_tree(leader)
            .into_iter()
            .filter(|p| in_container(*p, container_id))
            .collect();
        let mut members = Vec::new();
        if in_container(leader, container_id) {
            if let Some(pgid) = Pid::from_raw(leader as i32) {
                // ESRCH when the group is gone: nothing left to do.
                let _ = rustix::process::kill_process_group(pgid, signal);
            }
        } else {
            members = group_members(leader, container_id);
            for pid in members.iter().filter_map(|p| Pid::from_raw(*p as i32)) {
                let _ = rustix::process::kill_process(pid, signal);
            }
        }
        if signal != Signal::KILL {
            return;
        }
        for pid in tree.iter().filter_map(|p| Pid::from_raw(*p as i32)) {
            let _ = rustix::process::kill_process(pid, signal);
        }
        if tree.is_empty() && members.is_empty() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Host pids of the container's processes in process group `pgid` (from `/proc/*/stat`).
pub fn group_members(pgid: u32, container_id: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| stat_pgrp(&s))
                == Some(pgid)
        })
        .filter(|pid| in_container(*pid, container_id))
        .collect()
}

/// The process group field of a `/proc/<pid>/stat` line (after the parenthesised name, which
/// may itself contain spaces and parentheses).
pub fn stat_pgrp(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // state ppid pgrp ...
    rest.split_whitespace().nth(2)?.parse().ok()
}

/// What [`pidfd`] found.
#[derive(Debug)]
pub enum PidfdState {
    /// A pidfd on the container's process: readable once it exits.
    Open(OwnedFd),
    /// The process has already exited.
    Exited,
    /// The pid is not (or no longer) the container's, e.g. the daemon runs in another pid
    /// namespace: exit must be polled through the API.
    Foreign,
}

/// A pidfd on host `pid` when it is the container's process (works for processes that are
/// not our children).
pub fn pidfd(pid: u32, container_id: &str) -> PidfdState {
    let Some(p) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
        return PidfdState::Foreign;
    };
    match rustix::process::pidfd_open(p, rustix::process::PidfdFlags::NONBLOCK) {
        // Checked after opening: the pidfd pins the process, so a recycled pid is ruled out.
        Ok(fd) if in_container(pid, container_id) => PidfdState::Open(fd),
        Ok(_) => PidfdState::Foreign,
        Err(rustix::io::Errno::SRCH) => PidfdState::Exited,
        Err(_) => PidfdState::Foreign,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgrp_is_parsed_after_the_name() {
        assert_eq!(stat_pgrp("42 (sl) eep) S 1 40 40 0 -1"), Some(40));
        assert_eq!(stat_pgrp("garbage"), None);
    }

    #[test]
    fn foreign_and_gone_pids_are_recognised() {
        // Our own process is not in any container.
        assert!(matches!(
            pidfd(std::process::id(), "0123abcd"),
            PidfdState::Foreign
        ));
        assert!(!in_container(std::process::id(), ""));
        assert!(matches!(pidfd(0, "x"), PidfdState::Foreign));
    }
}
