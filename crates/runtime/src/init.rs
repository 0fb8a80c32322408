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
//! [`ShellImages`]): the kernel makes a process that executes a file it cannot read
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
    std::fs::create_dir_all(&cfg.home)?;
    std::fs::set_permissions(&cfg.home, std::fs::Permissions::from_mode(0o700))?;
    nix::unistd::chown(
        cfg.home.as_str(),
        Some(Uid::from_raw(cfg.uid)),
        Some(Gid::from_raw(cfg.gid)),
    )?;
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

/// The names of one session call's files in [`CHANNEL_DIR`]: `<kind>-<32 random hex digits>`.
#[derive(Debug, Clone)]
struct CallFiles {
    command: String,
    stdout: String,
    stderr: String,
    status: String,
}

impl CallFiles {
    fn new() -> io::Result<Self> {
        let name = |kind: &str| -> io::Result<String> {
            let mut b = [0u8; 16];
            let mut filled = 0;
            while filled < b.len() {
                filled += rustix::rand::getrandom(
                    &mut b[filled..],
                    rustix::rand::GetRandomFlags::empty(),
                )?;
            }
            Ok(format!("{kind}-{:032x}", u128::from_le_bytes(b)))
        };
        Ok(CallFiles {
            command: name("c")?,
            stdout: name("o")?,
            stderr: name("e")?,
            status: name("s")?,
        })
    }

    /// Removes whichever of the files exist (relative to the channel directory: never a path).
    fn remove(&self, chan: &OwnedFd) {
        for name in [&self.command, &self.stdout, &self.stderr, &self.status] {
            let _ =
                nix::unistd::unlinkat(chan, name.as_str(), nix::unistd::UnlinkatFlags::NoRemoveDir);
        }
    }
}

/// Execute-only copies of session shells, one per binary: a root-owned, sealed memfd with
/// mode 0111. The kernel makes a process that executes a file it may not read non-dumpable,
/// so no other process of the sandbox user can reach into the shell (`/proc/<pid>/fd`,
/// `/proc/<pid>/mem`, ptrace), which holds the session channel.
#[derive(Default)]
struct ShellImages {
    /// By device, inode, size and modification time of the original.
    by_file: HashMap<(u64, u64, i64, i64, i64), OwnedFd>,
}

impl ShellImages {
    /// The image of `shell` (searched in the `PATH` of `env` when it has no `/`), opened with
    /// the sandbox user's file-system identity: the init never opens for the sandbox what the
    /// sandbox could not open itself, wherever a link points.
    fn get(
        &mut self,
        cfg: &InitConfig,
        shell: &str,
        env: &[String],
        cwd: &str,
    ) -> Result<BorrowedFd<'_>, (&'static str, Errno)> {
        let file = as_sandbox_fs_user(cfg, || open_shell(shell, env, cwd))?;
        let st = nix::sys::stat::fstat(&file).map_err(|e| ("exec", e))?;
        let key = (
            st.st_dev,
            st.st_ino,
            st.st_size,
            st.st_mtime,
            st.st_mtime_nsec,
        );
        // Bounded: a sandbox opening sessions on ever new shells of its own must not grow
        // the init (running shells keep their image mapped).
        if self.by_file.len() >= MAX_SHELL_IMAGES && !self.by_file.contains_key(&key) {
            self.by_file.clear();
        }
        let image: &OwnedFd = match self.by_file.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(copy_execute_only(file).map_err(|e| ("image", e))?)
            }
        };
        Ok(image.as_fd())
    }
}

/// Most shell images the init keeps (see [`ShellImages`]).
const MAX_SHELL_IMAGES: usize = 8;

/// Runs `f` with the file-system uid and gid of the sandbox user (the init is single-threaded).
fn as_sandbox_fs_user<T>(cfg: &InitConfig, f: impl FnOnce() -> T) -> T {
    nix::unistd::setfsgid(Gid::from_raw(cfg.gid));
    nix::unistd::setfsuid(Uid::from_raw(cfg.uid));
    let r = f();
    nix::unistd::setfsuid(Uid::from_raw(0));
    nix::unistd::setfsgid(Gid::from_raw(0));
    r
}

/// Opens the executable regular file `shell` would run, like `execvp` finds it.
fn open_shell(shell: &str, env: &[String], cwd: &str) -> Result<OwnedFd, (&'static str, Errno)> {
    let candidates: Vec<String> = if shell.starts_with('/') {
        vec![shell.to_owned()]
    } else if shell.contains('/') {
        vec![format!("{cwd}/{shell}")]
    } else {
        let path = env
            .iter()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or(crate::DEFAULT_PATH);
        path.split(':')
            .filter(|d| !d.is_empty())
            .map(|d| format!("{d}/{shell}"))
            .collect()
    };
    let mut last = Errno::ENOENT;
    for c in candidates {
        // O_NONBLOCK: a FIFO planted as the shell must not block PID 1.
        let flags = OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK | OFlag::O_NOCTTY;
        match nix::fcntl::open(c.as_str(), flags, Mode::empty()) {
            Ok(fd) => match nix::sys::stat::fstat(&fd) {
                Ok(st)
                    if st.st_mode & libc::S_IFMT == libc::S_IFREG
                        && st.st_mode & 0o111 != 0
                        && u64::try_from(st.st_size).is_ok_and(|n| n <= MAX_SHELL_SIZE) =>
                {
                    return Ok(fd);
                }
                Ok(_) => last = Errno::EACCES,
                Err(e) => last = e,
            },
            Err(e) => last = e,
        }
    }
    Err(("exec", last))
}

/// Largest shell binary the init copies (bash is ~1.3 MiB).
const MAX_SHELL_SIZE: u64 = 64 << 20;

/// Copies `file` (at most [`MAX_SHELL_SIZE`] bytes, even if it grows meanwhile) into a sealed,
/// root-owned memfd with mode 0111.
fn copy_execute_only(file: OwnedFd) -> Result<OwnedFd, Errno> {
    use rustix::fs::{MemfdFlags, SealFlags};
    let flags = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING;
    // MFD_EXEC (Linux >= 6.3) keeps the memfd executable whatever `vm.memfd_noexec` says
    // below 2; older kernels reject the flag and make every memfd executable.
    let memfd = match rustix::fs::memfd_create("agentfense-shell", flags | MemfdFlags::EXEC) {
        // `vm.memfd_noexec = 2` answers EACCES: the exec then fails with a clear errno.
        Err(rustix::io::Errno::INVAL | rustix::io::Errno::ACCESS) => {
            rustix::fs::memfd_create("agentfense-shell", flags)
        }
        r => r,
    }
    .map_err(|e| Errno::from_raw(e.raw_os_error()))?;
    let mut dst = std::fs::File::from(memfd);
    let mut src = std::io::Read::take(std::fs::File::from(file), MAX_SHELL_SIZE);
    std::io::copy(&mut src, &mut dst)
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    let memfd = OwnedFd::from(dst);
    let sys = |e: rustix::io::Errno| Errno::from_raw(e.raw_os_error());
    rustix::fs::fchmod(&memfd, rustix::fs::Mode::from_raw_mode(0o111)).map_err(sys)?;
    rustix::fs::fcntl_add_seals(
        &memfd,
        SealFlags::SEAL | SealFlags::SHRINK | SealFlags::GROW | SealFlags::WRITE,
    )
    .map_err(sys)?;
    Ok(memfd)
}

/// How [`spawn`] starts a program.
#[derive(Debug, Clone, Copy)]
struct SpawnMode<'a> {
    /// Execute this file (sessions: the shell's execute-only image) instead of the absolute
    /// path `argv[0]`, which stays the program's name.
    image: Option<BorrowedFd<'a>>,
    /// Stdin is a terminal: make it the controlling terminal of the new session.
    tty: bool,
}

/// Forks and execs `argv` as the sandbox user in a new session with `stdio` as fds 0, 1, 2,
/// in the cgroup whose directory is `cgroup` (opened by the host).
/// Reports the failing step and errno if anything before `execve` fails (via a CLOEXEC pipe).
fn spawn(
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
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// `CLONE_INTO_CGROUP` (Linux 5.7).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Forks; with `cgroup` (a cgroup directory), the child starts in that cgroup when the kernel
/// can do it (`clone3` with `CLONE_INTO_CGROUP`, Linux >= 5.7): a process created in place
/// is never migrated, and a cgroup v2 migration after an idle pause waits for an RCU grace
/// period (7-25 ms measured), which every exec would pay. Returns whether the child is
/// already in `cgroup`; if not, it joins through `cgroup.procs` itself.
fn fork_into(cgroup: Option<BorrowedFd<'_>>) -> Result<(ForkResult, bool), Errno> {
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
fn child(
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
