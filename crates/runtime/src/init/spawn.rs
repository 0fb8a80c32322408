//! Starting a command: fork (into its cgroup where the kernel can), then in the child drop to
//! the sandbox user, wire the fds and exec.

use super::*;

/// How [`spawn`] starts a program.
#[derive(Debug, Clone, Copy)]
pub(super) struct SpawnMode<'a> {
    /// Execute this file (sessions: the shell's execute-only image) instead of the absolute
    /// path `argv[0]`, which stays the program's name.
    pub(super) image: Option<BorrowedFd<'a>>,
    /// Stdin is a terminal: make it the controlling terminal of the new session.
    pub(super) tty: bool,
}

/// Forks and execs `argv` as the sandbox user in a new session with `stdio` as fds 0, 1, 2,
/// in the cgroup whose directory is `cgroup` (opened by the host).
/// Reports the failing step and errno if anything before `execve` fails (via a CLOEXEC pipe).
pub(super) fn spawn(
    cfg: &InitConfig,
    argv: &[String],
    env: &[String],
    cwd: &str,
    stdio: [BorrowedFd<'_>; 3],
    cgroup: Option<BorrowedFd<'_>>,
    mode: SpawnMode<'_>,
) -> Result<Pid, (&'static str, Errno)> {
    let cstr = |s: &str| CString::new(s).map_err(|_| ("encode", Errno::EINVAL));
    let c_argv = argv
        .iter()
        .map(|s| cstr(s))
        .collect::<Result<Vec<_>, _>>()?;
    let c_env = env.iter().map(|s| cstr(s)).collect::<Result<Vec<_>, _>>()?;
    let c_cwd = cstr(cwd)?;
    if c_argv.is_empty() {
        return Err(("argv", Errno::EINVAL));
    }
    let (err_r, err_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| ("pipe", e))?;
    match fork_into(cgroup).map_err(|e| ("fork", e))? {
        (ForkResult::Child, joined) => {
            let cgroup = if joined { None } else { cgroup };
            let (step, errno) = child(cfg, &c_argv, &c_env, &c_cwd, stdio, cgroup, mode);
            let mut msg = format!("{step}:{}", errno as i32).into_bytes();
            msg.truncate(64);
            let _ = nix::unistd::write(&err_w, &msg);
            // SAFETY: _exit is async-signal-safe and skips the parent's atexit handlers and
            // stdio buffers, which belong to the init.
            unsafe { libc::_exit(127) }
        }
        (ForkResult::Parent { child }, _) => {
            drop(err_w);
            let mut buf = Vec::new();
            let _ = std::fs::File::from(err_r).read_to_end(&mut buf);
            if buf.is_empty() {
                return Ok(child);
            }
            let _ = nix::sys::wait::waitpid(child, None);
            let text = String::from_utf8_lossy(&buf);
            let (step, errno) = text.split_once(':').unwrap_or(("exec", "0"));
            let errno = Errno::from_raw(errno.parse().unwrap_or(0));
            let step = [
                "cgroup",
                "seccomp",
                "signals",
                "setsid",
                "stdio",
                "ctty",
                "setgroups",
                "setgid",
                "setuid",
                "chdir",
                "exec",
            ]
            .into_iter()
            .find(|s| *s == step)
            .unwrap_or("exec");
            Err((step, errno))
        }
    }
}

/// `clone3` arguments (`struct clone_args` of linux/sched.h, version 2: up to `cgroup`).
#[repr(C)]
#[derive(Default)]
pub(super) struct CloneArgs {
    pub(super) flags: u64,
    pub(super) pidfd: u64,
    pub(super) child_tid: u64,
    pub(super) parent_tid: u64,
    pub(super) exit_signal: u64,
    pub(super) stack: u64,
    pub(super) stack_size: u64,
    pub(super) tls: u64,
    pub(super) set_tid: u64,
    pub(super) set_tid_size: u64,
    pub(super) cgroup: u64,
}

/// `CLONE_INTO_CGROUP` (Linux 5.7).
pub(super) const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Forks; with `cgroup` (a cgroup directory), the child starts in that cgroup when the kernel
/// can do it (`clone3` with `CLONE_INTO_CGROUP`, Linux >= 5.7): a process created in place
/// is never migrated, and a cgroup v2 migration after an idle pause waits for an RCU grace
/// period (7-25 ms measured), which every exec would pay. Returns whether the child is
/// already in `cgroup`; if not, it joins through `cgroup.procs` itself.
pub(super) fn fork_into(cgroup: Option<BorrowedFd<'_>>) -> Result<(ForkResult, bool), Errno> {
    if let Some(fd) = cgroup {
        let mut args = CloneArgs {
            flags: CLONE_INTO_CGROUP,
            exit_signal: libc::SIGCHLD as u64,
            cgroup: fd.as_raw_fd() as u64,
            ..CloneArgs::default()
        };
        // SAFETY: clone3 without CLONE_VM and without a stack behaves like fork: the child
        // continues on a copy of this (single-threaded) process. `args` outlives the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                &mut args as *mut CloneArgs,
                std::mem::size_of::<CloneArgs>(),
            )
        };
        match r {
            0 => return Ok((ForkResult::Child, true)),
            pid if pid > 0 => {
                let child = Pid::from_raw(i32::try_from(pid).map_err(|_| Errno::EOVERFLOW)?);
                return Ok((ForkResult::Parent { child }, true));
            }
            // Older kernel (ENOSYS, E2BIG, EINVAL) or a filter: fork and join by hand.
            _ => {}
        }
    }
    // SAFETY: the init is single-threaded, so the child may run arbitrary code (including
    // allocation) before execve without deadlock risk.
    let r = unsafe { nix::unistd::fork() }?;
    Ok((r, false))
}

/// Runs in the forked child; returns only on failure.
pub(super) fn child(
    cfg: &InitConfig,
    argv: &[CString],
    env: &[CString],
    cwd: &CString,
    stdio: [BorrowedFd<'_>; 3],
    cgroup: Option<BorrowedFd<'_>>,
    mode: SpawnMode<'_>,
) -> (&'static str, Errno) {
    // Join the command's own cgroup first (unless clone3 started us there), so its whole
    // tree can be killed at once.
    if let Some(dir) = cgroup {
        let joined = nix::fcntl::openat(
            dir,
            "cgroup.procs",
            OFlag::O_WRONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .and_then(|procs| nix::unistd::write(&procs, b"0"));
        if let Err(e) = joined {
            return ("cgroup", e);
        }
    }
    // The command's part of the seccomp filters (the init runs without it).
    if let Some(filters) = COMMAND_FILTERS.get()
        && let Err(e) = filters.install_command()
    {
        // The error's own errno (no syscall may have been made, so errno could be stale).
        let errno = match e {
            crate::hardening::HardeningError::InstallSeccomp(
                seccompiler::Error::Prctl(io) | seccompiler::Error::Seccomp(io),
            ) => io.raw_os_error().map_or(Errno::EINVAL, Errno::from_raw),
            _ => Errno::EINVAL,
        };
        return ("seccomp", errno);
    }
    // The init blocks SIGCHLD (signalfd) and Rust ignores SIGPIPE: neither may leak into
    // commands (`yes | head` must die of SIGPIPE).
    if let Err(e) =
        nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
    {
        return ("signals", e);
    }
    let dfl = nix::sys::signal::SigHandler::SigDfl;
    // SAFETY: resetting a disposition to SIG_DFL installs no handler; we are single-threaded.
    let reset = unsafe { nix::sys::signal::signal(Signal::SIGPIPE, dfl) };
    if let Err(e) = reset {
        return ("signals", e);
    }
    if let Err(e) = nix::unistd::setsid() {
        return ("setsid", e);
    }
    if let Some(mask) = COMMAND_UMASK.get() {
        nix::sys::stat::umask(*mask);
    }
    let r = nix::unistd::dup2_stdin(stdio[0])
        .and_then(|()| nix::unistd::dup2_stdout(stdio[1]))
        .and_then(|()| nix::unistd::dup2_stderr(stdio[2]));
    if let Err(e) = r {
        return ("stdio", e);
    }
    // Only stdio crosses exec: whatever else is open here (the init's control socket, session
    // pipes, the error pipe, the shell image) is close-on-exec from now on.
    close_fds_from(3, None, true);
    // A terminal becomes the controlling terminal of the session we just created, so the
    // shell gets job control (its foreground group receives ^C/^Z, `fg` works). The host
    // opened the pty slave with O_NOCTTY, so it is no other session's terminal; the steal
    // flag stays 0. Done as root: before the uid switch.
    if mode.tty
        && let Err(e) = rustix::process::ioctl_tiocsctty(stdio[0])
    {
        return ("ctty", Errno::from_raw(e.raw_os_error()));
    }
    let (uid, gid) = (Uid::from_raw(cfg.uid), Gid::from_raw(cfg.gid));
    if let Err(e) = nix::unistd::setgroups(&[gid]) {
        return ("setgroups", e);
    }
    if let Err(e) = nix::unistd::setresgid(gid, gid, gid) {
        return ("setgid", e);
    }
    // Leaving uid 0 clears the permitted, effective and ambient capability sets; with
    // no_new_privs nothing can bring them back.
    if let Err(e) = nix::unistd::setresuid(uid, uid, uid) {
        return ("setuid", e);
    }
    if let Err(e) = nix::unistd::chdir(cwd.as_c_str()) {
        return ("chdir", e);
    }
    let e = match mode.image {
        Some(image) => nix::unistd::fexecve(image, argv, env),
        None => nix::unistd::execve(&argv[0], argv, env),
    };
    match e {
        Err(e) => ("exec", e),
        Ok(never) => match never {},
    }
}
