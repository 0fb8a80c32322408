//! Defense in depth: a seccomp deny-list the init applies to itself (and so to every command),
//! a command-only part (`clone3` answers ENOSYS) each command installs before exec, and a
//! Landlock write restriction.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Syscalls denied outright with `EPERM`: namespace changes, mounts, tracing, the kernel keyring,
/// bpf, kernel modules, reboot/kexec, and a few other host-wide knobs.
pub const DENIED_SYSCALLS: &[(&str, libc::c_long)] = &[
    ("unshare", libc::SYS_unshare),
    ("setns", libc::SYS_setns),
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("pivot_root", libc::SYS_pivot_root),
    ("chroot", libc::SYS_chroot),
    ("open_tree", libc::SYS_open_tree),
    ("move_mount", libc::SYS_move_mount),
    ("fsopen", libc::SYS_fsopen),
    ("fsconfig", libc::SYS_fsconfig),
    ("fsmount", libc::SYS_fsmount),
    ("fspick", libc::SYS_fspick),
    ("mount_setattr", libc::SYS_mount_setattr),
    ("ptrace", libc::SYS_ptrace),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("keyctl", libc::SYS_keyctl),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("reboot", libc::SYS_reboot),
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("acct", libc::SYS_acct),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("iopl", libc::SYS_iopl),
    ("ioperm", libc::SYS_ioperm),
    ("quotactl", libc::SYS_quotactl),
    ("settimeofday", libc::SYS_settimeofday),
    ("clock_settime", libc::SYS_clock_settime),
    // The host kernel log (dmesg) is host information.
    ("syslog", libc::SYS_syslog),
    // Reaching into other processes of the same user without ptrace: copying their file
    // descriptors, comparing their kernel objects.
    ("pidfd_getfd", libc::SYS_pidfd_getfd),
    ("kcmp", libc::SYS_kcmp),
    // Obsolete (a.out libraries).
    ("uselib", libc::SYS_uselib),
    // io_uring: a large kernel attack surface with a record of privilege escalations, which
    // also bypasses per-syscall filtering; runtimes (libuv, ...) fall back to plain syscalls.
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("io_uring_enter", libc::SYS_io_uring_enter),
    ("io_uring_register", libc::SYS_io_uring_register),
];

/// `clone` flags that create namespaces; `clone` with any of them is denied.
pub const CLONE_NS_FLAGS: &[libc::c_int] = &[
    libc::CLONE_NEWNS,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWCGROUP,
];

/// Errors building or installing the filter.
#[derive(Debug, thiserror::Error)]
pub enum HardeningError {
    /// The BPF program could not be built.
    #[error("building the seccomp filter failed")]
    BuildSeccomp(#[source] seccompiler::BackendError),
    /// The architecture is not supported by seccompiler.
    #[error("seccomp: unsupported architecture {0}")]
    Arch(String),
    /// Installing the filter failed.
    #[error("installing the seccomp filter failed")]
    InstallSeccomp(#[source] seccompiler::Error),
    /// Landlock failed in a way that is not "kernel too old".
    #[error("landlock ruleset failed")]
    Landlock(#[source] landlock::RulesetError),
}

/// The seccomp programs (filters stack; the kernel applies the strictest): a base the init
/// installs on itself (inherited by everything it starts), and a part each command installs
/// between fork and exec. `clone3` is only in the command part: the init starts commands
/// with `clone3(CLONE_INTO_CGROUP)` (see `crate::init`), and runs as root, so no command can
/// reach into it (no ptrace, no `/proc/1/mem` across users).
#[derive(Debug, Clone)]
pub struct SeccompFilters {
    base: BpfProgram,
    command: BpfProgram,
}

impl SeccompFilters {
    /// Builds the programs: deny [`DENIED_SYSCALLS`] and namespace-creating `clone` with `EPERM`;
    /// answer `clone3` with `ENOSYS` (its flags live in memory a filter cannot inspect, and libc
    /// falls back to `clone` on `ENOSYS`). Everything else is allowed.
    pub fn build() -> Result<Self, HardeningError> {
        let arch = TargetArch::try_from(std::env::consts::ARCH)
            .map_err(|_| HardeningError::Arch(std::env::consts::ARCH.to_owned()))?;
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
        for (_, nr) in DENIED_SYSCALLS {
            rules.insert(*nr, vec![]);
        }
        let mut clone_chain = Vec::new();
        for bit in CLONE_NS_FLAGS {
            let bit = *bit as u64;
            let cond =
                SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(bit), bit)
                    .map_err(HardeningError::BuildSeccomp)?;
            clone_chain.push(SeccompRule::new(vec![cond]).map_err(HardeningError::BuildSeccomp)?);
        }
        rules.insert(libc::SYS_clone, clone_chain);
        let deny = SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EPERM as u32),
            arch,
        )
        .map_err(HardeningError::BuildSeccomp)?;

        let mut clone3: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
        clone3.insert(libc::SYS_clone3, vec![]);
        let clone3 = SeccompFilter::new(
            clone3,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
            arch,
        )
        .map_err(HardeningError::BuildSeccomp)?;

        Ok(SeccompFilters {
            base: BpfProgram::try_from(deny).map_err(HardeningError::BuildSeccomp)?,
            command: BpfProgram::try_from(clone3).map_err(HardeningError::BuildSeccomp)?,
        })
    }

    /// Installs the base (everything but the `clone3` answer): what the init runs under.
    pub fn install_base(&self) -> Result<(), HardeningError> {
        seccompiler::apply_filter(&self.base).map_err(HardeningError::InstallSeccomp)
    }

    /// Installs the command part (`clone3` answers `ENOSYS`). Allocation-free, so it may run
    /// between fork and exec.
    pub fn install_command(&self) -> Result<(), HardeningError> {
        seccompiler::apply_filter(&self.command).map_err(HardeningError::InstallSeccomp)
    }
}

/// Restricts writes to `writable` (and below); reading and executing stay allowed everywhere.
/// Returns the enforcement status as text.
pub fn apply_landlock(writable: &[String]) -> Result<&'static str, HardeningError> {
    use landlock::{
        ABI, Access, AccessFs, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
        path_beneath_rules,
    };
    let abi = ABI::V5;
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .map_err(HardeningError::Landlock)?
        .create()
        .map_err(HardeningError::Landlock)?
        .add_rules(path_beneath_rules(["/"], AccessFs::from_read(abi)))
        .map_err(HardeningError::Landlock)?
        .add_rules(path_beneath_rules(writable, AccessFs::from_all(abi)))
        .map_err(HardeningError::Landlock)?
        .restrict_self()
        .map_err(HardeningError::Landlock)?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => "fully_enforced",
        RulesetStatus::PartiallyEnforced => "partially_enforced",
        RulesetStatus::NotEnforced => "not_enforced",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seccomp_filters_build() {
        let f = SeccompFilters::build().unwrap();
        assert!(!f.base.is_empty() && !f.command.is_empty());
    }

    #[test]
    fn deny_list_covers_the_issue() {
        let names: Vec<&str> = DENIED_SYSCALLS.iter().map(|(n, _)| *n).collect();
        for must in [
            "unshare",
            "setns",
            "mount",
            "umount2",
            "ptrace",
            "keyctl",
            "add_key",
            "request_key",
            "bpf",
            "init_module",
            "finit_module",
            "delete_module",
            "reboot",
            "kexec_load",
            "io_uring_setup",
        ] {
            assert!(names.contains(&must), "{must} missing");
        }
    }
}
