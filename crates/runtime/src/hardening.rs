//! Defense in depth: seccomp filters the init applies to itself (and so to every command), a
//! command-only part (`clone3` answers ENOSYS) each command installs before exec, and a
//! Landlock write restriction.
//!
//! The seccomp policy is an allow-list ([`ALLOWED_SYSCALLS`], after Docker's default profile):
//! any other call answers `ENOSYS` (so libc falls back, as it does on an older kernel), and the
//! calls of [`DENIED_SYSCALLS`] answer `EPERM`. Only the native architecture gets through: a call
//! through a foreign entry point (`int 0x80` on x86_64) kills the process, and a call with the
//! x32 bit set answers `EPERM` whether or not the kernel has the x32 ABI.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch, sock_filter,
};

mod allow_list;
mod bpf;
pub use allow_list::{ALLOWED_ARCH_SYSCALLS, ALLOWED_SYSCALLS};

/// Bit 30 of a syscall number on x86_64 selects the x32 ABI, whose calls reach the same kernel
/// functions under other numbers: refused on its own, so no deny rule can be sidestepped.
pub const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// `personality(2)` values commands may set (Docker's list): `PER_LINUX`, `PER_LINUX32`,
/// `UNAME26`, `UNAME26|PER_LINUX32`, and the query `0xffffffff`.
pub const ALLOWED_PERSONALITIES: &[u64] = &[0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff];

/// Socket families left out of the allow-list (`socket` answers `ENOSYS` for them): `AF_ALG`
/// (the kernel's crypto API, a record of bugs) and `AF_VSOCK` (reaches the host or hypervisor
/// whatever the network namespace). Ascending.
pub const DENIED_SOCKET_FAMILIES: &[u64] = &[libc::AF_ALG as u64, libc::AF_VSOCK as u64];

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

/// The seccomp programs (filters stack; the kernel applies the strictest, and between two
/// errnos the later filter's): a base the init installs on itself (inherited by everything it
/// starts), and a part each command installs between fork and exec. `clone3` is only refused in
/// the command part: the init starts commands with `clone3(CLONE_INTO_CGROUP)` (see
/// `crate::init`), and runs as root, so no command can reach into it (no ptrace, no
/// `/proc/1/mem` across users).
#[derive(Debug, Clone)]
pub struct SeccompFilters {
    /// Installed in order: the allow-list, the deny-list, the ABI guard.
    base: Vec<BpfProgram>,
    command: BpfProgram,
}

fn cond(
    index: u8,
    len: SeccompCmpArgLen,
    op: SeccompCmpOp,
    value: u64,
) -> Result<SeccompCondition, HardeningError> {
    SeccompCondition::new(index, len, op, value).map_err(HardeningError::BuildSeccomp)
}

fn rule(conds: Vec<SeccompCondition>) -> Result<SeccompRule, HardeningError> {
    SeccompRule::new(conds).map_err(HardeningError::BuildSeccomp)
}

fn program(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
    arch: TargetArch,
) -> Result<BpfProgram, HardeningError> {
    let filter =
        SeccompFilter::new(rules, mismatch, matched, arch).map_err(HardeningError::BuildSeccomp)?;
    BpfProgram::try_from(filter).map_err(HardeningError::BuildSeccomp)
}

/// The bitmask of every namespace-creating `clone` flag.
fn clone_ns_mask() -> u64 {
    CLONE_NS_FLAGS.iter().fold(0, |m, f| m | *f as u64)
}

impl SeccompFilters {
    /// Builds the programs:
    /// - the allow-list: [`ALLOWED_SYSCALLS`] and [`ALLOWED_ARCH_SYSCALLS`]; `clone` without
    ///   namespace flags; `clone3` (the command part refuses it); `personality` with
    ///   [`ALLOWED_PERSONALITIES`]; `socket` but for [`DENIED_SOCKET_FAMILIES`]. Anything else:
    ///   `ENOSYS`.
    /// - the deny-list: [`DENIED_SYSCALLS`] and namespace-creating `clone` answer `EPERM`.
    /// - the ABI guard: a foreign architecture kills, the x32 bit answers `EPERM`.
    /// - the command part: `clone3` answers `ENOSYS` (its flags live in memory a filter cannot
    ///   inspect, and libc falls back to `clone`).
    pub fn build() -> Result<Self, HardeningError> {
        use SeccompCmpArgLen::Qword;
        let arch = TargetArch::try_from(std::env::consts::ARCH)
            .map_err(|_| HardeningError::Arch(std::env::consts::ARCH.to_owned()))?;

        let allow = bpf::allow_list(
            audit_arch(arch),
            &allow_rules(),
            libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
        );

        let mut deny: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
        for (_, nr) in DENIED_SYSCALLS {
            deny.insert(*nr, vec![]);
        }
        let mut clone_chain = Vec::new();
        for bit in CLONE_NS_FLAGS {
            let bit = *bit as u64;
            clone_chain.push(rule(vec![cond(
                0,
                Qword,
                SeccompCmpOp::MaskedEq(bit),
                bit,
            )?])?);
        }
        deny.insert(libc::SYS_clone, clone_chain);
        let deny = program(
            deny,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EPERM as u32),
            arch,
        )?;

        let mut clone3: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
        clone3.insert(libc::SYS_clone3, vec![]);
        let command = program(
            clone3,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
            arch,
        )?;

        Ok(SeccompFilters {
            base: vec![allow, deny, abi_guard(arch)],
            command,
        })
    }

    /// Installs the base (everything but the `clone3` answer): what the init runs under.
    pub fn install_base(&self) -> Result<(), HardeningError> {
        for p in &self.base {
            seccompiler::apply_filter(p).map_err(HardeningError::InstallSeccomp)?;
        }
        Ok(())
    }

    /// Installs the command part (`clone3` answers `ENOSYS`). Allocation-free, so it may run
    /// between fork and exec.
    pub fn install_command(&self) -> Result<(), HardeningError> {
        seccompiler::apply_filter(&self.command).map_err(HardeningError::InstallSeccomp)
    }
}

/// The allow-list's rules by syscall number (see [`SeccompFilters::build`]).
fn allow_rules() -> BTreeMap<u32, bpf::ArgRule> {
    use bpf::ArgRule;
    let nr = |n: libc::c_long| u32::try_from(n).unwrap_or(u32::MAX);
    let mut m: BTreeMap<u32, ArgRule> = ALLOWED_SYSCALLS
        .iter()
        .chain(ALLOWED_ARCH_SYSCALLS)
        .map(|(_, n)| (nr(*n), ArgRule::Any))
        .collect();
    m.insert(nr(libc::SYS_clone3), ArgRule::Any);
    // Every namespace flag is in the low 32 bits.
    m.insert(
        nr(libc::SYS_clone),
        ArgRule::NoBits(u32::try_from(clone_ns_mask()).unwrap_or(u32::MAX)),
    );
    m.insert(
        nr(libc::SYS_personality),
        ArgRule::OneOf(ALLOWED_PERSONALITIES.iter().map(|p| *p as u32).collect()),
    );
    m.insert(
        nr(libc::SYS_socket),
        ArgRule::NoneOf(DENIED_SOCKET_FAMILIES.iter().map(|f| *f as u32).collect()),
    );
    m
}

/// `AUDIT_ARCH_*` of `arch`.
fn audit_arch(arch: TargetArch) -> u32 {
    match arch {
        TargetArch::aarch64 => 183 | 0x8000_0000 | 0x4000_0000,
        TargetArch::riscv64 => 243 | 0x8000_0000 | 0x4000_0000,
        TargetArch::x86_64 => 62 | 0x8000_0000 | 0x4000_0000,
    }
}

/// The ABI guard, which seccompiler cannot express (its rules match syscall numbers, not bits
/// of them): kill a call from a foreign architecture; answer `EPERM` to a number with the x32
/// bit; allow the rest (the other filters decide).
fn abi_guard(arch: TargetArch) -> BpfProgram {
    // Offsets in `struct seccomp_data`: `nr` at 0, `arch` at 4.
    const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const JSET_K: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    let ins = |code: u16, jt: u8, jf: u8, k: u32| sock_filter { code, jt, jf, k };
    vec![
        ins(LD_W_ABS, 0, 0, 4),
        ins(JEQ_K, 1, 0, audit_arch(arch)),
        ins(RET_K, 0, 0, libc::SECCOMP_RET_KILL_PROCESS),
        ins(LD_W_ABS, 0, 0, 0),
        ins(JSET_K, 0, 1, X32_SYSCALL_BIT),
        ins(RET_K, 0, 0, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
        ins(RET_K, 0, 0, libc::SECCOMP_RET_ALLOW),
    ]
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
        assert_eq!(f.base.len(), 3);
        assert!(f.base.iter().all(|p| !p.is_empty()) && !f.command.is_empty());
        // Compact: the install-time cost grows with the program.
        assert!(f.base[0].len() < 400, "{}", f.base[0].len());
    }

    /// The allow-list program decides every syscall number as the tables say.
    #[test]
    fn the_allow_list_program_matches_the_tables() {
        let arch = TargetArch::try_from(std::env::consts::ARCH).unwrap();
        let f = SeccompFilters::build().unwrap();
        let p = &f.base[0];
        let aa = audit_arch(arch);
        let run = |nr: i64, arg0: u64| bpf::tests::run(p, aa, u32::try_from(nr).unwrap(), arg0);
        let allow = libc::SECCOMP_RET_ALLOW;
        let enosys = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;
        let listed: std::collections::BTreeSet<i64> = ALLOWED_SYSCALLS
            .iter()
            .chain(ALLOWED_ARCH_SYSCALLS)
            .map(|(_, n)| *n)
            .collect();
        let special = [
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_personality,
            libc::SYS_socket,
        ];
        for nr in 0..1024 {
            if special.contains(&nr) {
                continue;
            }
            let want = if listed.contains(&nr) { allow } else { enosys };
            assert_eq!(run(nr, 0), want, "syscall {nr}");
        }
        for (_, nr) in DENIED_SYSCALLS {
            assert_eq!(
                run(*nr, 0),
                enosys,
                "denied syscall {nr} is not on the allow-list"
            );
        }
        assert_eq!(run(libc::SYS_clone3, 0), allow);
        assert_eq!(run(libc::SYS_clone, libc::SIGCHLD as u64), allow);
        for bit in CLONE_NS_FLAGS {
            assert_eq!(
                run(libc::SYS_clone, *bit as u64 | libc::SIGCHLD as u64),
                enosys
            );
        }
        for p in ALLOWED_PERSONALITIES {
            assert_eq!(run(libc::SYS_personality, *p), allow);
        }
        assert_eq!(run(libc::SYS_personality, 0x0040_0000), enosys);
        assert_eq!(run(libc::SYS_socket, libc::AF_INET as u64), allow);
        assert_eq!(run(libc::SYS_socket, libc::AF_UNIX as u64), allow);
        for f in DENIED_SOCKET_FAMILIES {
            assert_eq!(run(libc::SYS_socket, *f), enosys);
        }
        assert_eq!(run(0x4000_0000 | 39, 0), enosys);
        assert_eq!(
            bpf::tests::run(p, aa ^ 1, 0, 0),
            libc::SECCOMP_RET_KILL_PROCESS
        );
    }

    #[test]
    fn allow_list_and_deny_list_are_disjoint_and_unique() {
        let mut seen = std::collections::BTreeSet::new();
        for (name, nr) in ALLOWED_SYSCALLS.iter().chain(ALLOWED_ARCH_SYSCALLS) {
            assert!(seen.insert(*nr), "{name} ({nr}) listed twice");
            assert!(
                !DENIED_SYSCALLS.iter().any(|(_, d)| d == nr),
                "{name} is both allowed and denied"
            );
        }
        for must in [
            "read",
            "write",
            "openat",
            "execve",
            "mmap",
            "futex",
            "wait4",
            "getdents64",
        ] {
            assert!(
                ALLOWED_SYSCALLS.iter().any(|(n, _)| *n == must),
                "{must} missing from the allow-list"
            );
        }
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
