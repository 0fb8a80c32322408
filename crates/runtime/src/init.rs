//! The init: PID 1 inside every bubblewrap sandbox (binary `agentfense-init`).
//!
//! Single-threaded on purpose (it forks): one `poll` loop over the control socket (fd 3) and a
//! `signalfd` for `SIGCHLD`. It reaps every zombie, starts commands on request with the fds the
//! host passed (so output flows through plain pipes, never through the init), drops each child
//! to the sandbox uid in a new session (whose controlling terminal is the passed pty slave when
//! the host asks for a tty), and reports exit statuses. It hardens itself first
//! (Landlock, seccomp) so every command inherits the restrictions. When the control socket
//! closes (host gone), it kills everything and exits, which tears down the PID namespace.
//!
//! Sessions: the shell runs interactively with its stdin on a pipe the init holds. For each call
//! the init writes the command to a file, creates three FIFOs (stdout, stderr, status) and hands
//! their read ends to the host, then types one line into the shell:
//!
//! `command . CMD >OUT 2>ERR </dev/null; echo $? >STATUS` (`command` keeps a syntax error in CMD
//! from aborting the line, so the status is always written). No marker ever appears in the
//! output.
//!
//! # The channel is out of the sandbox's reach
//! The init runs as root, so it never resolves a path in a place the sandbox can write: the call
//! files live in [`CHANNEL_DIR`], a root-owned directory (mode 0711: traversable, not listable)
//! the init creates once, and every file in it is created relative to that directory's fd with
//! `O_CREAT|O_EXCL|O_NOFOLLOW` (or `mkfifoat`, which never follows links). Nothing is ever
//! chowned or chmodded after creation: the command file is root-owned 0444 (no process in the
//! sandbox can rewrite what the audit recorded), the FIFOs root-owned 0622 (writable, not
//! readable, by whoever knows the name). Names carry 128 random bits per call and are removed
//! at the next call, so they cannot be guessed or listed.
//!
//! The names reach only the shell, through its stdin pipe. The shell runs from an
//! execute-only copy of its binary (a sealed, root-owned memfd with mode 0111, see
//! `init/shell.rs`): the kernel makes a process that executes a file it cannot read
//! non-dumpable, so no other process of the sandbox user can open the shell's
//! `/proc/<pid>/fd/*` (its stdin pipe), read its memory or trace it. A background job started
//! by an earlier call therefore can neither inject lines into the shell, nor learn, rewrite or
//! forge the next call's command, output or status. (Commands the shell runs are ordinary
//! executables again, dumpable as usual.)
use std::collections::HashMap;
use std::ffi::CString;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, FdFlag, OFlag};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::MsgFlags;
use nix::sys::stat::Mode;
use nix::sys::wait::{WaitPidFlag, WaitStatus};
use nix::unistd::{ForkResult, Gid, Pid, Uid};

use crate::bwrap::{CHANNEL_DIR, SANDBOX_RUN_DIR};
use crate::hardening::SeccompFilters;
use crate::protocol::{CONTROL_FD, InitConfig, Reply, Request, recv_packet, send_packet};

/// The seccomp filters, once built; commands install their part before exec.
static COMMAND_FILTERS: std::sync::OnceLock<SeccompFilters> = std::sync::OnceLock::new();

/// The umask the init started with, which commands get back (the init itself runs with 0).
static COMMAND_UMASK: std::sync::OnceLock<Mode> = std::sync::OnceLock::new();

/// Entry point of the `agentfense-init` binary. Never returns.
pub fn run_main() -> ! {
    let code = match run() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("agentfense-init: {e}");
            1
        }
    };
    std::process::exit(code)
}

#[derive(Debug)]
struct Proc {
    id: u64,
    session: bool,
}

#[derive(Debug)]
struct Session {
    pid: Pid,
    stdin: OwnedFd,
    /// The files of the last call, removed at the next call or when the session ends.
    last: Option<CallFiles>,
}

struct Init {
    sock: OwnedFd,
    cfg: InitConfig,
    /// [`CHANNEL_DIR`], opened once: every call file is created relative to it.
    chan: OwnedFd,
    images: ShellImages,
    procs: HashMap<Pid, Proc>,
    by_id: HashMap<u64, Pid>,
    sessions: HashMap<u64, Session>,
}

fn run() -> io::Result<()> {
    // The host passes the control socket's fd number as the only argument.
    let fd: RawFd = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(CONTROL_FD);
    if fd < 3 {
        return Err(io::Error::other("control fd must be >= 3"));
    }
    // Nothing but stdio and the control socket may come in from bwrap or its caller.
    close_fds_from(3, Some(fd), false);
    // SAFETY: by contract with the host (bwrap is spawned with the control socket inherited as
    // `fd`), that descriptor is ours and nothing else in this process owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    nix::fcntl::fcntl(&sock, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;

    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    mask.thread_block()?;
    let sigfd = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)?;

    let cfg = match recv_packet::<Request>(sock.as_fd(), MsgFlags::empty())? {
        Some((Request::Configure(cfg), _)) => cfg,
        Some(_) => return Err(io::Error::other("first message must be configure")),
        None => return Ok(()),
    };
    let (landlock, chan) = configure(&cfg)?;
    send_packet(sock.as_fd(), &Reply::Ready { landlock }, &[])?;

    let mut init = Init {
        sock,
        cfg,
        chan,
        images: ShellImages::default(),
        procs: HashMap::new(),
        by_id: HashMap::new(),
        sessions: HashMap::new(),
    };
    loop {
        let (sock_ready, sig_ready) = {
            let mut fds = [
                PollFd::new(init.sock.as_fd(), PollFlags::POLLIN),
                PollFd::new(sigfd.as_fd(), PollFlags::POLLIN),
            ];
            match nix::poll::poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
            let ready = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
            (ready(&fds[0]), ready(&fds[1]))
        };
        if sig_ready {
            while let Ok(Some(_)) = sigfd.read_signal() {}
            init.reap();
        }
        if sock_ready {
            match recv_packet::<Request>(init.sock.as_fd(), MsgFlags::MSG_DONTWAIT) {
                Ok(Some((req, fds))) => {
                    if init.handle(req, fds) {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Ok(None) | Err(_) => break,
            }
        }
    }
    // Host gone or shutdown requested: as PID 1, our exit kills the whole namespace; kill
    // explicitly first so nothing lingers while we exit.
    let _ = nix::sys::signal::kill(Pid::from_raw(-1), Signal::SIGKILL);
    Ok(())
}

/// Prepares `$HOME` and the session channel directory, and hardens the init (inherited by
/// every command). Returns the Landlock status and the open channel directory.
fn configure(cfg: &InitConfig) -> io::Result<(String, OwnedFd)> {
    // Files the init creates get exactly the modes it asks for; commands get the umask back.
    let _ = COMMAND_UMASK.set(nix::sys::stat::umask(Mode::empty()));
    // No supplementary groups (root's): the init opens session shells with the sandbox
    // user's fs uid and gid, and root's groups must not widen that.
    nix::unistd::setgroups(&[])?;
    // A persistent home bound by the runtime is the user's already (and a mount the init
    // may not chmod); a fresh one is made here, in the /tmp tmpfs.
    let persistent = std::fs::symlink_metadata(&cfg.home)
        .is_ok_and(|m| m.is_dir() && std::os::unix::fs::MetadataExt::uid(&m) == cfg.uid);
    if !persistent {
        std::fs::create_dir_all(&cfg.home)?;
        std::fs::set_permissions(&cfg.home, std::fs::Permissions::from_mode(0o700))?;
        nix::unistd::chown(
            cfg.home.as_str(),
            Some(Uid::from_raw(cfg.uid)),
            Some(Gid::from_raw(cfg.gid)),
        )?;
    }
    // bwrap creates the mount point's parent 0700; sessions need to traverse it (not list it).
    // Both directories are root's, on the root-only `/run` tmpfs: nothing in them can have
    // been planted by the sandbox, which has not run yet.
    std::fs::set_permissions(SANDBOX_RUN_DIR, std::fs::Permissions::from_mode(0o711))?;
    nix::unistd::mkdir(CHANNEL_DIR, Mode::from_bits_truncate(0o711))?;
    let chan = nix::fcntl::open(
        CHANNEL_DIR,
        OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY,
        Mode::empty(),
    )?;
    rustix::thread::set_no_new_privs(true)?;
    let landlock = if cfg.landlock {
        crate::hardening::apply_landlock(&cfg.writable)
            .map_err(io::Error::other)?
            .to_owned()
    } else {
        "disabled".to_owned()
    };
    if cfg.seccomp {
        let filters = SeccompFilters::build().map_err(io::Error::other)?;
        filters.install_base().map_err(io::Error::other)?;
        // Each command adds the rest between fork and exec (see `child`).
        let _ = COMMAND_FILTERS.set(filters);
    }
    drop_capabilities()?;
    Ok((landlock, chan))
}

/// What the init still needs once configured: switching users in its children and while it
/// opens a session's shell (SETUID, SETGID) and signalling sandbox processes (KILL). Nothing
/// that overrides file permissions or ownership: the files it creates are its own, in its own
/// directory.
pub const INIT_CAPABILITIES: rustix::thread::CapabilitySet = rustix::thread::CapabilitySet::KILL
    .union(rustix::thread::CapabilitySet::SETGID)
    .union(rustix::thread::CapabilitySet::SETUID);

/// Highest descriptor the fallback of [`close_fds_from`] visits.
const FALLBACK_MAX_FD: u32 = 65535;

/// Closes (or, with `cloexec`, marks close-on-exec) every descriptor from `first` on, except
/// `keep`. Async-signal-safe (one or two `close_range` calls).
fn close_fds_from(first: u32, keep: Option<RawFd>, cloexec: bool) {
    let flags = if cloexec {
        libc::CLOSE_RANGE_CLOEXEC as libc::c_int
    } else {
        0
    };
    let ranges = match keep.and_then(|k| u32::try_from(k).ok()) {
        Some(k) if k >= first => [(first, k.checked_sub(1)), (k + 1, Some(u32::MAX))],
        _ => [(first, Some(u32::MAX)), (0, None)],
    };
    for (lo, hi) in ranges {
        if let Some(hi) = hi
            && lo <= hi
        {
            // SAFETY: close_range only closes (or flags) descriptors; the caller owns every
            // descriptor in the range, none of which is used through a live Rust handle
            // afterwards (`cloexec` leaves them open).
            if unsafe { libc::close_range(lo, hi, flags) } != 0 {
                // Linux < 5.11 (no CLOSE_RANGE_CLOEXEC) or < 5.9: one descriptor at a time.
                for fd in lo..=hi.min(FALLBACK_MAX_FD) {
                    let Ok(fd) = libc::c_int::try_from(fd) else {
                        break;
                    };
                    // SAFETY: as above, on one descriptor; EBADF for unused numbers is fine.
                    unsafe {
                        if cloexec {
                            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                        } else {
                            libc::close(fd);
                        }
                    }
                }
            }
        }
    }
}

/// Shrinks the init's bounding, permitted and effective sets to [`INIT_CAPABILITIES`] (bwrap
/// leaves real root with nearly all of them; in a user namespace, with
/// [`crate::bwrap::USERNS_INIT_CAPS`]). Clearing the inheritable set also clears the ambient
/// set bwrap fills in a user namespace.
fn drop_capabilities() -> io::Result<()> {
    use rustix::thread::{CapabilitySet, CapabilitySets};
    for bit in CapabilitySet::all().iter() {
        // In a user namespace bwrap already left only a few (and dropping one that is not
        // there would still need CAP_SETPCAP).
        if INIT_CAPABILITIES.contains(bit)
            || !rustix::thread::capability_is_in_bounding_set(bit).unwrap_or(true)
        {
            continue;
        }
        match rustix::thread::remove_capability_from_bounding_set(bit) {
            // Unknown to this kernel: nothing to drop.
            Ok(()) | Err(rustix::io::Errno::INVAL) => {}
            Err(e) => return Err(e.into()),
        }
    }
    rustix::thread::set_capabilities(
        None,
        CapabilitySets {
            effective: INIT_CAPABILITIES,
            permitted: INIT_CAPABILITIES,
            inheritable: CapabilitySet::empty(),
        },
    )?;
    Ok(())
}

fn exit_code(status: WaitStatus) -> Option<(Pid, i32)> {
    match status {
        WaitStatus::Exited(pid, code) => Some((pid, code)),
        WaitStatus::Signaled(pid, sig, _) => Some((pid, 128 + sig as i32)),
        _ => None,
    }
}

impl Init {
    fn reply(&self, r: &Reply, fds: &[RawFd]) {
        if let Err(e) = send_packet(self.sock.as_fd(), r, fds) {
            eprintln!("agentfense-init: reply failed: {e}");
        }
    }

    fn spawn_failed(&self, id: u64, step: &str, errno: Errno) {
        self.reply(
            &Reply::SpawnFailed {
                id,
                step: step.to_owned(),
                errno: errno as i32,
            },
            &[],
        );
    }

    /// Reaps every exited child; reports the ones the host asked for.
    fn reap(&mut self) {
        loop {
            let st = match nix::sys::wait::waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(st) => st,
            };
            let Some((pid, code)) = exit_code(st) else {
                continue;
            };
            if let Some(p) = self.procs.remove(&pid) {
                self.by_id.remove(&p.id);
                if p.session {
                    // The shell is gone: its leftovers (background jobs) go with it.
                    let _ = nix::sys::signal::killpg(pid, Signal::SIGKILL);
                    if let Some(s) = self.sessions.remove(&p.id)
                        && let Some(files) = s.last
                    {
                        files.remove(&self.chan);
                    }
                }
                self.reply(
                    &Reply::Exited {
                        id: p.id,
                        code,
                        pid: pid.as_raw(),
                    },
                    &[],
                );
            }
        }
    }

    /// Handles one request; true means "shut down".
    fn handle(&mut self, req: Request, fds: Vec<OwnedFd>) -> bool {
        match req {
            Request::Configure(_) => {}
            Request::Shutdown => return true,
            Request::Exec {
                id,
                argv,
                env,
                cwd,
                tty,
            } => {
                if fds.len() != 3 && fds.len() != 4 {
                    self.reply(
                        &Reply::Failed {
                            id,
                            message: format!("exec needs 3 or 4 fds, got {}", fds.len()),
                        },
                        &[],
                    );
                    return false;
                }
                let stdio = [fds[0].as_fd(), fds[1].as_fd(), fds[2].as_fd()];
                let cg = fds.get(3).map(|f| f.as_fd());
                let mode = SpawnMode { image: None, tty };
                let mut result = spawn(&self.cfg, &argv, &env, &cwd, stdio, cg, mode);
                // Right after a fork bomb was killed, the pids limit frees up only as the init
                // reaps the corpses: reap and retry for up to half a second.
                for _ in 0..50 {
                    if !matches!(result, Err(("fork", Errno::EAGAIN))) {
                        break;
                    }
                    self.reap();
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    result = spawn(&self.cfg, &argv, &env, &cwd, stdio, cg, mode);
                }
                match result {
                    Ok(pid) => {
                        self.procs.insert(pid, Proc { id, session: false });
                        self.by_id.insert(id, pid);
                    }
                    Err((step, errno)) => self.spawn_failed(id, step, errno),
                }
            }
            Request::Signal { id, signal } => {
                if let (Some(pid), Ok(sig)) = (self.by_id.get(&id), Signal::try_from(signal)) {
                    let _ = nix::sys::signal::killpg(*pid, sig);
                }
            }
            Request::KillGroup { pgid } => {
                if pgid > 1 {
                    let _ = nix::sys::signal::killpg(Pid::from_raw(pgid), Signal::SIGKILL);
                }
            }
            Request::SessionOpen { id, argv, env, cwd } => {
                self.session_open(id, argv, env, cwd, fds.first())
            }
            Request::SessionExec { id, seq, command } => {
                if let Err(e) = self.session_exec(id, seq, &command) {
                    self.reply(
                        &Reply::Failed {
                            id,
                            message: format!("session call {seq}: {e}"),
                        },
                        &[],
                    );
                }
            }
            Request::SessionClose { id } => {
                if let Some(s) = self.sessions.get(&id) {
                    let _ = nix::sys::signal::killpg(s.pid, Signal::SIGKILL);
                }
            }
        }
        false
    }

    fn session_open(
        &mut self,
        id: u64,
        argv: Vec<String>,
        env: Vec<String>,
        cwd: String,
        cgroup: Option<&OwnedFd>,
    ) {
        let pipes = || -> io::Result<(OwnedFd, OwnedFd, OwnedFd)> {
            let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
            let flags = OFlag::from_bits_truncate(nix::fcntl::fcntl(&w, FcntlArg::F_GETFL)?);
            nix::fcntl::fcntl(&w, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
            let null = nix::fcntl::open(
                "/dev/null",
                OFlag::O_WRONLY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )?;
            Ok((r, w, null))
        };
        let (r, w, null) = match pipes() {
            Ok(x) => x,
            Err(e) => {
                self.reply(
                    &Reply::Failed {
                        id,
                        message: format!("session setup: {e}"),
                    },
                    &[],
                );
                return;
            }
        };
        // The shell's protection is that it is not dumpable; with `fs.suid_dumpable = 1` the
        // kernel would make it dumpable anyway, and other processes could reach into it.
        if std::fs::read_to_string("/proc/sys/fs/suid_dumpable").is_ok_and(|v| v.trim() == "1") {
            self.reply(
                &Reply::Failed {
                    id,
                    message: "fs.suid_dumpable is 1 on this host, so a session shell would be \
                              open to every process of the sandbox; set it to 0 or 2"
                        .into(),
                },
                &[],
            );
            return;
        }
        let shell = argv.first().map(String::as_str).unwrap_or_default();
        let spawned = self
            .images
            .get(&self.cfg, shell, &env, &cwd)
            .and_then(|image| {
                spawn(
                    &self.cfg,
                    &argv,
                    &env,
                    &cwd,
                    [r.as_fd(), null.as_fd(), null.as_fd()],
                    cgroup.map(|f| f.as_fd()),
                    SpawnMode {
                        image: Some(image),
                        tty: false,
                    },
                )
            });
        match spawned {
            Ok(pid) => {
                self.procs.insert(pid, Proc { id, session: true });
                self.by_id.insert(id, pid);
                self.sessions.insert(
                    id,
                    Session {
                        pid,
                        stdin: w,
                        last: None,
                    },
                );
                self.reply(&Reply::Started { id }, &[]);
            }
            Err((step, errno)) => self.spawn_failed(id, step, errno),
        }
    }

    fn session_exec(&mut self, id: u64, seq: u64, command: &str) -> io::Result<()> {
        let s = self
            .sessions
            .get_mut(&id)
            .ok_or_else(|| io::Error::other("no such session"))?;
        if let Some(prev) = s.last.take() {
            prev.remove(&self.chan);
        }
        let files = CallFiles::new()?;
        // Recorded before anything is created, so a failure half-way is cleaned up next time.
        s.last = Some(files.clone());
        let chan = self.chan.as_fd();
        let cmd = nix::fcntl::openat(
            chan,
            files.command.as_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o444),
        )?;
        std::fs::File::from(cmd).write_all(command.as_bytes())?;
        let mut fds = Vec::new();
        for name in [&files.stdout, &files.stderr, &files.status] {
            nix::unistd::mkfifoat(chan, name.as_str(), Mode::from_bits_truncate(0o622))?;
            // Open before the shell does: a FIFO's read end opens at once with O_NONBLOCK, and
            // the shell's open for writing then finds a reader.
            fds.push(nix::fcntl::openat(
                chan,
                name.as_str(),
                OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )?);
        }
        let line = format!(
            "command . {CHANNEL_DIR}/{c} >{CHANNEL_DIR}/{o} 2>{CHANNEL_DIR}/{e} </dev/null; \
             echo $? >{CHANNEL_DIR}/{s}\n",
            c = files.command,
            o = files.stdout,
            e = files.stderr,
            s = files.status
        );
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        send_packet(self.sock.as_fd(), &Reply::SessionFifos { id, seq }, &raw)?;
        drop(fds);
        let mut stdin = std::fs::File::from(s.stdin.try_clone()?);
        stdin.write_all(line.as_bytes())?;
        Ok(())
    }
}

mod shell;
mod spawn;

use shell::*;
use spawn::*;
