//! `agentfense shell`: an interactive shell in a sandbox over a local directory.
//!
//! Same sandbox, policy and delta as `agentfense run` ([`crate::local`]), but on a real
//! terminal. We allocate a pty pair on the host and hand only the slave into the sandbox
//! ([`BwrapRuntime::exec_tty`](agentfense_runtime::BwrapRuntime::exec_tty)), where the init
//! makes it the controlling terminal of the shell's new session: line editing, job control
//! (Ctrl-Z, `fg`, Ctrl-C to the foreground job) and `SIGWINCH` are the kernel's pty business.
//! The user's terminal goes into raw mode (restored on every way out, see [`RawMode`]) and a
//! thread proxies bytes between it and the master; window-size changes are copied onto the
//! master. The user's terminal fd never enters the sandbox, so nothing inside can inject
//! input into it (`TIOCSTI`) or reconfigure it: a sandboxed process only ever sees the slave.

use std::io::{IsTerminal, PipeReader};
use std::os::fd::{AsFd, OwnedFd};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use agentfense_runtime::{RuntimeError, TtyRequest};
use anyhow::Context;
use clap::Args;
use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::io::Errno;
use rustix::process::Signal;
use rustix::termios::{OptionalActions, Termios, tcgetattr, tcgetwinsize, tcsetattr, tcsetwinsize};
use tokio::signal::unix::{SignalKind, signal};

use crate::local::{LocalArgs, LocalSandbox, exit_code};

/// Options of `agentfense shell`.
#[derive(Debug, Args)]
pub struct ShellArgs {
    /// Sandbox and policy options.
    #[command(flatten)]
    pub local: LocalArgs,
    /// The shell to start, an absolute path inside the sandbox.
    #[arg(long, default_value = "/bin/bash", value_name = "PATH")]
    pub shell: String,
    /// Kill the shell after this many seconds (default: no limit).
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<f64>,
    /// The project directory (read-only lower layer).
    #[arg(value_name = "DIR")]
    pub dir: std::path::PathBuf,
}

/// How the interactive part ended.
enum Outcome {
    /// The shell exited with this code.
    Exited(i32),
    /// We were told to stop (this signal); the shell was killed.
    Signalled(i32),
    /// `--timeout` passed; the shell was killed.
    TimedOut(Duration),
}

pub(crate) fn run(args: ShellArgs) -> anyhow::Result<ExitCode> {
    // Checked before anything is mounted or started.
    anyhow::ensure!(
        std::io::stdin().is_terminal(),
        "agentfense shell needs an interactive terminal, but stdin is not one; to run commands \
         from a script or a pipe use `agentfense run DIR -- COMMAND`"
    );
    let timeout = match args.timeout {
        Some(t) => {
            anyhow::ensure!(
                t.is_finite() && t > 0.0,
                "--timeout must be a positive number of seconds"
            );
            Some(Duration::from_secs_f64(t))
        }
        None => None,
    };
    let local = LocalSandbox::mount(
        &args.local,
        &args.dir,
        timeout.unwrap_or(Duration::from_secs(600)),
    )?;

    let mut env = local.env.clone();
    let term = std::env::var("TERM")
        .ok()
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| "xterm".into());
    env.entry("TERM".into()).or_insert(term);
    if args.shell.ends_with("bash") {
        // No rc file in the sandbox sets one; say where the user is.
        env.entry("PS1".into())
            .or_insert_with(|| r"(sandbox) \w \$ ".into());
    }
    let shell_path = args.shell.clone();
    let req = TtyRequest {
        argv: vec![args.shell.clone()],
        env,
        workdir: String::new(),
        timeout,
    };

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let outcome = rt.block_on(local.with_sandbox(async |runtime, id| {
        let (master, slave) = open_pty().context("cannot allocate a pseudo-terminal")?;
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin).context("cannot read the terminal settings")?;
        // The shell starts with the user's terminal settings (erase character, ...) and size
        // (listening for changes first, so none is missed in between).
        let mut winch = signal(SignalKind::window_change())?;
        let _ = tcsetattr(&slave, OptionalActions::Now, &saved);
        copy_winsize(&master);
        // Stopping signals are handled (not fatal), so the terminal is restored, the
        // sandbox destroyed and the filesystem unmounted on the way out.
        let (t, mut s1) = stop_signal(Signal::TERM)?;
        let (h, mut s2) = stop_signal(Signal::HUP)?;
        let (i, mut s3) = stop_signal(Signal::INT)?;
        let (q, mut s4) = stop_signal(Signal::QUIT)?;
        let mut shell = runtime
            .exec_tty(id, req, slave.as_fd())
            .await
            .with_context(|| format!("cannot start the shell {shell_path}"))?;
        // Only the sandbox holds the slave now: the master sees EIO once the shell and
        // everything it started are gone.
        drop(slave);

        let raw = RawMode::enable(saved)?;
        let (stop_r, stop_w) = std::io::pipe()?;
        let (done_tx, mut done_rx) = tokio::sync::oneshot::channel();
        let pump_master = master.try_clone()?;
        let pump = std::thread::spawn(move || {
            let r = pump(&pump_master, &stop_r);
            let _ = done_tx.send(r);
        });
        let mut pump_running = true;
        let outcome = loop {
            tokio::select! {
                r = shell.wait() => break match r {
                    Ok(code) => Ok(Outcome::Exited(code)),
                    Err(RuntimeError::Timeout { timeout, .. }) => Ok(Outcome::TimedOut(timeout)),
                    Err(e @ RuntimeError::CommandSetup { .. }) => Err(anyhow::Error::from(e)
                        .context(format!("cannot start the shell {shell_path} (is it installed? pick another with --shell)"))),
                    Err(e) => Err(e.into()),
                },
                _ = winch.recv() => copy_winsize(&master),
                r = &mut done_rx, if pump_running => {
                    pump_running = false;
                    // The terminal side failed: nobody can talk to the shell any more.
                    if let Ok(Err(e)) = r {
                        break Err(anyhow::Error::from(e).context("terminal I/O failed"));
                    }
                }
                _ = s1.recv() => break Ok(Outcome::Signalled(t)),
                _ = s2.recv() => break Ok(Outcome::Signalled(h)),
                _ = s3.recv() => break Ok(Outcome::Signalled(i)),
                _ = s4.recv() => break Ok(Outcome::Signalled(q)),
            }
        };
        // Kills the shell if it is still running (a signal or an error got us here).
        drop(shell);
        drop(stop_w);
        let _ = pump.join();
        drop(master);
        drop(raw);
        outcome
    }));
    let outcome = outcome?;
    let code = match outcome {
        Outcome::Exited(code) => code,
        Outcome::Signalled(sig) => {
            eprintln!("agentfense: stopped by signal {sig}; the shell was killed");
            128 + sig
        }
        Outcome::TimedOut(t) => {
            eprintln!(
                "agentfense: the shell was killed after --timeout {}s",
                t.as_secs_f64()
            );
            124
        }
    };
    local.finish()?;
    Ok(exit_code(code))
}

/// A handler for a signal we stop on, with its number (for the `128 + n` exit code).
fn stop_signal(sig: Signal) -> std::io::Result<(i32, tokio::signal::unix::Signal)> {
    Ok((sig.as_raw(), signal(SignalKind::from_raw(sig.as_raw()))?))
}

/// A fresh pty pair (master, slave), both close-on-exec; the slave is opened with `O_NOCTTY`
/// so it never becomes our controlling terminal.
fn open_pty() -> std::io::Result<(OwnedFd, OwnedFd)> {
    use rustix::pty::{OpenptFlags, grantpt, ioctl_tiocgptpeer, openpt, unlockpt};
    let flags = OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC;
    let master = openpt(flags)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let slave = ioctl_tiocgptpeer(&master, flags)?;
    Ok((master, slave))
}

/// The user's terminal size onto the pty (the kernel then sends `SIGWINCH` to the shell's
/// foreground job).
fn copy_winsize(master: &OwnedFd) {
    if let Ok(ws) = tcgetwinsize(std::io::stdin()) {
        let _ = tcsetwinsize(master, ws);
    }
}

/// The user's terminal in raw mode; the saved settings come back on drop, which runs on
/// every way out of the session: normal exit, `?` errors, panics (unwinding), and the
/// signals we stop on (handled, so they return normally).
struct RawMode {
    saved: Termios,
}

impl RawMode {
    fn enable(saved: Termios) -> anyhow::Result<Self> {
        let mut raw = saved.clone();
        raw.make_raw();
        tcsetattr(std::io::stdin(), OptionalActions::Now, &raw)
            .context("cannot put the terminal in raw mode")?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // Drain: let pending output reach the terminal before the settings change.
        let _ = tcsetattr(std::io::stdin(), OptionalActions::Drain, &self.saved);
    }
}

/// Largest amount of typed input held back while the shell does not read.
const MAX_PENDING: usize = 64 * 1024;

/// Proxies bytes between the user's terminal (stdin/stdout) and the pty master until every
/// slave is closed or `stop` becomes readable (closed by the writer); then takes what is
/// still buffered on the master. The master is non-blocking, so a shell that stops reading
/// never blocks its output; the user's fds keep their blocking mode (it is shared with the
/// user's shell).
fn pump(master: &OwnedFd, stop: &PipeReader) -> std::io::Result<()> {
    rustix::io::ioctl_fionbio(master, true)?;
    let stdin = std::io::stdin();
    let stdin = stdin.as_fd();
    let mut pending: Vec<u8> = Vec::new();
    let mut stdin_open = true;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let mut master_ev = PollFlags::IN;
        if !pending.is_empty() {
            master_ev |= PollFlags::OUT;
        }
        let mut fds = vec![
            PollFd::from_borrowed_fd(stop.as_fd(), PollFlags::IN),
            PollFd::from_borrowed_fd(master.as_fd(), master_ev),
        ];
        if stdin_open && pending.len() < MAX_PENDING {
            fds.push(PollFd::from_borrowed_fd(stdin, PollFlags::IN));
        }
        match poll(&mut fds, None) {
            Ok(_) => {}
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
        let ready = PollFlags::IN | PollFlags::HUP | PollFlags::ERR;
        let stop_ev = fds[0].revents();
        let master_ev = fds[1].revents();
        let stdin_ev = fds.get(2).map_or(PollFlags::empty(), |f| f.revents());
        if !stop_ev.is_empty() {
            return drain(master);
        }
        if master_ev.intersects(ready) {
            match rustix::io::read(master, &mut buf) {
                // Every slave is closed: the shell and all it started are gone.
                Ok(0) | Err(Errno::IO) => return Ok(()),
                Ok(n) => write_out(&buf[..n])?,
                Err(Errno::AGAIN | Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if stdin_ev.intersects(ready) {
            match rustix::io::read(stdin, &mut buf) {
                Ok(0) => stdin_open = false,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
                Err(Errno::AGAIN | Errno::INTR) => {}
                Err(_) => stdin_open = false,
            }
        }
        if !pending.is_empty() {
            match rustix::io::write(master, &pending) {
                Ok(n) => {
                    pending.drain(..n);
                }
                Err(Errno::AGAIN | Errno::INTR) => {}
                // The slave side is gone; the read side reports the end.
                Err(Errno::IO) => pending.clear(),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// After the shell exited: copy what is still on its way through the pty (the kernel pushes
/// slave output to the master asynchronously), until it has been quiet for a moment.
fn drain(master: &OwnedFd) -> std::io::Result<()> {
    let quiet = Timespec {
        tv_sec: 0,
        tv_nsec: 50_000_000,
    };
    let give_up = Instant::now() + Duration::from_secs(2);
    let mut buf = vec![0u8; 16 * 1024];
    while Instant::now() < give_up {
        let mut fds = [PollFd::from_borrowed_fd(master.as_fd(), PollFlags::IN)];
        match poll(&mut fds, Some(&quiet)) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
        match rustix::io::read(master, &mut buf) {
            Ok(0) | Err(Errno::IO) => return Ok(()),
            Ok(n) => write_out(&buf[..n])?,
            Err(Errno::AGAIN | Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Writes to fd 1 directly: the `Stdout` lock is held by the caller of the command for its
/// whole run (and we buffer nothing anyway).
fn write_out(mut bytes: &[u8]) -> std::io::Result<()> {
    let stdout = std::io::stdout();
    let fd = stdout.as_fd();
    while !bytes.is_empty() {
        match rustix::io::write(fd, bytes) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(Errno::INTR) => {}
            Err(Errno::AGAIN) => {
                // Someone made the terminal non-blocking: wait until it takes more.
                let mut fds = [PollFd::from_borrowed_fd(fd, PollFlags::OUT)];
                let _ = poll(&mut fds, None);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
