//! Persistent sessions: one long-lived interactive shell per session, run as a docker exec
//! whose stdin we write to and whose stdout and stderr stay separate (no TTY).
//!
//! # Framing (exact output without marker noise)
//! Each call writes one script to the shell ([`call_script`]): a here-document (with a random
//! 128-bit delimiter) read by builtins into a variable, then
//! `printf START >&8; printf START >&9; command eval "$cmd" </dev/null >&8 2>&9;
//! printf END:$? >&8; printf END >&9`, where fds 8 and 9 are the shell's copies of the exec's
//! stdout and stderr made at session start (so `exec >/dev/null` in a command cannot swallow
//! the markers), and `command` keeps a syntax error from aborting the rest of the line.
//! The markers are `\x1e AFS|AFE <nonce> \x1e` with a fresh nonce per call, so the command's
//! own output can never be mistaken for them (it would have to print the nonce). [`Framer`]
//! keeps exactly the bytes between START and END on each stream; whatever arrives before START
//! (prompts, job-control warnings, late output of an interrupted call) is dropped. The command
//! runs in the shell itself (`eval`), so `cd`, variables, functions, `. venv/bin/activate` and
//! background jobs persist, and `exit` ends the shell: the call then returns the shell's exit
//! status and the session is closed.
//!
//! The shell runs from an execute-only copy of its binary ([`DockerRuntime::shell_image`]), so
//! the kernel makes it non-dumpable: no other process of the sandbox user (a background job of
//! an earlier call) can open its stdin or fds 8 and 9 through `/proc`, so none can type into it
//! or forge a marker.
//!
//! Differences from the bwrap runtime's FIFO-per-call design, both documented limits: output
//! that a background job of an earlier call writes while a later call runs is counted as the
//! later call's output (the bwrap runtime discards it), and a command that reuses the shell's
//! fds 8 or 9 for its own redirections (`exec 8>file`) hides the markers until the call's
//! deadline.
//!
//! # Interrupts
//! No job control (no TTY), so foreground commands share the shell's process group while
//! background jobs ignore SIGINT. A timeout sends SIGINT to the group from the host: the command
//! dies, the interactive shell returns to its prompt, background jobs survive. Destroy SIGKILLs
//! the group and every descendant of the shell.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use agentfense_runtime::output::{CappedText, Utf8Chunker};
use agentfense_runtime::{
    ExecEvent, ExecResult, ExecStream, Result, RuntimeError, SessionSpec, check_command,
    stream_call,
};
use bollard::container::LogOutput;
use futures_util::StreamExt;
use rustix::process::Signal;
use tokio::io::AsyncWriteExt;
use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinHandle;

use super::exec::{
    ExitWatch, Input, OUTPUT_GRACE, Output, resolve_workdir, setup_error, wait_exit,
};
use super::{Container, DockerRuntime};
use crate::error::into_runtime;
use crate::error::invalid;
use crate::spec;

/// How long `session_create` waits for the shell to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A persistent shell.
#[derive(Debug)]
pub(crate) struct Session {
    public_id: String,
    exec_id: String,
    /// Host pid of the shell (leader of its process group).
    pid: Option<u32>,
    inner: Mutex<Inner>,
    closed: AtomicBool,
    reader: StdMutex<Option<JoinHandle<()>>>,
}

struct Inner {
    input: Input,
    out_rx: mpsc::Receiver<Vec<u8>>,
    err_rx: mpsc::Receiver<Vec<u8>>,
    watcher: Option<ExitWatch>,
    exit_code: Option<i32>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("exit_code", &self.exit_code)
            .finish_non_exhaustive()
    }
}

/// The script of one call (see the module docs).
pub fn call_script(nonce: &str, command: &str) -> String {
    format!(
        "__af_c=; while IFS= read -r __af_l; do __af_c=\"$__af_c$__af_l\n\"; done <<'AF_{nonce}'\n\
         {command}\n\
         AF_{nonce}\n\
         printf '\\036AFS%s\\036' {nonce} >&8; printf '\\036AFS%s\\036' {nonce} >&9; \
         command eval \"$__af_c\" </dev/null >&8 2>&9; \
         printf '\\036AFE%s:%d\\036' {nonce} \"$?\" >&8; printf '\\036AFE%s\\036' {nonce} >&9\n"
    )
}

/// Extracts one call's bytes from a stream: drops everything up to the START marker, passes the
/// body through, stops at the END marker and keeps its tail (`:<status>` on stdout).
#[derive(Debug)]
pub struct Framer {
    start: Vec<u8>,
    end: Vec<u8>,
    started: bool,
    tail: Option<String>,
    buf: Vec<u8>,
}

impl Framer {
    /// A framer for the call with this nonce.
    pub fn new(nonce: &str) -> Self {
        Framer {
            start: format!("\x1eAFS{nonce}\x1e").into_bytes(),
            end: format!("\x1eAFE{nonce}").into_bytes(),
            started: false,
            tail: None,
            buf: Vec::new(),
        }
    }

    /// Feeds stream bytes; returns body bytes that are certain (a possible partial marker at the
    /// end is held back).
    pub fn push(&mut self, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        if self.tail.is_some() {
            return out;
        }
        self.buf.extend_from_slice(data);
        loop {
            if !self.started {
                match find(&self.buf, &self.start) {
                    Some(i) => {
                        self.buf.drain(..i + self.start.len());
                        self.started = true;
                    }
                    None => {
                        let keep = self.buf.len().min(self.start.len() - 1);
                        self.buf.drain(..self.buf.len() - keep);
                        return out;
                    }
                }
            } else {
                match find(&self.buf, &self.end) {
                    Some(i) => {
                        out.extend_from_slice(&self.buf[..i]);
                        let rest = &self.buf[i + self.end.len()..];
                        match rest.iter().position(|b| *b == 0x1e) {
                            Some(j) => {
                                self.tail = Some(String::from_utf8_lossy(&rest[..j]).into_owned());
                                self.buf.clear();
                            }
                            None => {
                                self.buf.drain(..i);
                            }
                        }
                        return out;
                    }
                    None => {
                        // Hold back only what may begin the END marker, so that output
                        // streams as it comes.
                        let keep = partial_suffix(&self.buf, &self.end);
                        out.extend(self.buf.drain(..self.buf.len() - keep));
                        return out;
                    }
                }
            }
        }
    }

    /// The END marker's tail once seen (`":0"` on stdout, `""` on stderr).
    pub fn tail(&self) -> Option<&str> {
        self.tail.as_deref()
    }

    /// End of stream without an END marker (the shell exited): the held-back body bytes.
    pub fn finish(&mut self) -> Vec<u8> {
        if self.started && self.tail.is_none() {
            std::mem::take(&mut self.buf)
        } else {
            Vec::new()
        }
    }
}

/// The length of the longest proper prefix of `marker` that `buf` ends with.
fn partial_suffix(buf: &[u8], marker: &[u8]) -> usize {
    (1..marker.len().min(buf.len() + 1))
        .rev()
        .find(|&k| buf.ends_with(&marker[..k]))
        .unwrap_or(0)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    let salt = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        .to_le_bytes();
    b.iter()
        .enumerate()
        .map(|(i, x)| format!("{:02x}", x ^ if i < 8 { salt[i] } else { 0 }))
        .collect()
}

/// Moves the exec's output into per-stream channels (bounded: a chatty background job is
/// back-pressured until the next call drains it).
fn spawn_reader(
    mut output: Output,
    out_tx: mpsc::Sender<Vec<u8>>,
    err_tx: mpsc::Sender<Vec<u8>>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(item) = output.next().await {
            let sent = match item {
                Ok(LogOutput::StdOut { message }) | Ok(LogOutput::Console { message }) => {
                    out_tx.send(message.to_vec()).await
                }
                Ok(LogOutput::StdErr { message }) => err_tx.send(message.to_vec()).await,
                Ok(LogOutput::StdIn { .. }) => Ok(()),
                Err(_) => break,
            };
            if sent.is_err() {
                break;
            }
        }
    })
}

impl Session {
    /// Kills the shell and everything it started; the session is unusable afterwards.
    pub(crate) async fn close(&self, c: &Arc<Container>) {
        self.closed.store(true, Ordering::SeqCst);
        if let Some(pid) = self.pid {
            c.kill_tree(pid, Signal::KILL).await;
        }
        if let Ok(mut r) = self.reader.lock()
            && let Some(h) = r.take()
        {
            h.abort();
        }
        if let Ok(mut inner) = tokio::time::timeout(Duration::from_secs(1), self.inner.lock()).await
        {
            let _ = inner.input.shutdown().await;
        }
        tracing::debug!(sandbox_id = %c.sandbox_id, session_id = %self.public_id, "session closed");
    }
}

impl DockerRuntime {
    pub(crate) async fn do_session_create(
        &self,
        sandbox_id: &str,
        spec: SessionSpec,
    ) -> Result<String> {
        let c = self.running(sandbox_id).await?;
        let cwd = resolve_workdir(&spec.workdir)?;
        let shell = if spec.shell.is_empty() {
            "/bin/sh".to_owned()
        } else {
            spec.shell.clone()
        };
        if shell.contains('\0') || shell.contains(char::is_whitespace) {
            return Err(invalid("shell must be a single path"));
        }
        let base = shell.rsplit('/').next().unwrap_or(&shell).to_owned();
        let is_bash = base.contains("bash");
        let image_path = self.shell_image(&c, &shell, &cwd).await?;
        // Interactive, so an interrupt aborts the current command and returns to the prompt
        // (the shell survives); prompts are empty.
        let mut argv = vec![image_path.clone()];
        if is_bash {
            argv.extend(["--noprofile".to_owned(), "--norc".to_owned()]);
        }
        argv.push("-i".to_owned());
        let env =
            spec::merge_env(&c.env, &spec.env, &[("PS1", ""), ("PS2", "")]).map_err(invalid)?;
        let started = c
            .start_exec(argv, env, cwd, true)
            .await
            .map_err(|e| into_runtime(sandbox_id, e))?;
        let (out_tx, mut out_rx) = mpsc::channel(256);
        let (err_tx, mut err_rx) = mpsc::channel(256);
        let reader = spawn_reader(started.output, out_tx, err_tx);
        let mut input = started.input;
        let pid = c.exec_pid(&started.exec_id).await;
        let watcher = pid.and_then(|p| c.watch(p));

        // Handshake: history expansion off for bash (a `!` in a command must stay literal),
        // then a ready marker proves the shell reads our input.
        let nonce = random_hex(16);
        let mut hello = String::new();
        if is_bash {
            hello.push_str("set +H\n");
        }
        // Our own copies of the exec's stdout/stderr: markers and each command's output go
        // there, so a command that redirects the shell's fd 1 or 2 for good (`exec >/dev/null`)
        // cannot swallow the markers, and the next call starts with fresh stdout/stderr.
        hello.push_str(&format!(
            "exec 8>&1 9>&2\nprintf '\\036AFR%s\\036' {nonce} >&8\n"
        ));
        let ready = format!("\x1eAFR{nonce}\x1e").into_bytes();
        let _ = input.write_all(hello.as_bytes()).await;
        let _ = input.flush().await;
        let mut seen = Vec::new();
        let mut errs = Vec::new();
        let ok = tokio::time::timeout(READY_TIMEOUT, async {
            let (mut out_open, mut err_open) = (true, true);
            while out_open || err_open {
                tokio::select! {
                    b = out_rx.recv(), if out_open => match b {
                        Some(b) => {
                            seen.extend_from_slice(&b);
                            if find(&seen, &ready).is_some() {
                                return true;
                            }
                        }
                        None => out_open = false,
                    },
                    b = err_rx.recv(), if err_open => match b {
                        Some(b) => errs.extend_from_slice(&b),
                        None => err_open = false,
                    },
                }
            }
            false
        })
        .await
        .unwrap_or(false);
        if !ok {
            reader.abort();
            if let Some(p) = pid {
                c.kill_tree(p, Signal::KILL).await;
            }
            let code = c.exit_code(&started.exec_id).await.ok();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&seen),
                String::from_utf8_lossy(&errs)
            );
            return Err(match code {
                // Docker answers 126 (or 127) when runc cannot start the program at all.
                Some(126 | 127) if text.trim().is_empty() => RuntimeError::CommandSetup {
                    step: "exec".into(),
                    message: format!("shell {shell} could not be started"),
                    errno: libc::ENOENT,
                },
                Some(126 | 127) => setup_error(&text),
                _ => RuntimeError::CommandSetup {
                    step: "session".into(),
                    message: format!(
                        "shell {shell} did not start (exit code {code:?}): {}",
                        text.trim()
                    ),
                    errno: 0,
                },
            });
        }
        // The shell runs from its image now; the file itself is no longer needed (the tmpfs
        // would fill up with one copy per session).
        {
            let c = c.clone();
            let dir = image_path
                .rsplit_once('/')
                .map_or(image_path.clone(), |(d, _)| d.to_owned());
            let rm = vec!["/bin/rm".to_owned(), "-rf".to_owned(), dir];
            tokio::spawn(async move {
                let _ = c.run_captured(rm, Some("0:0"), None, 0).await;
            });
        }
        // Everything the shell printed before it was ready (job-control warnings) is dropped
        // by the first call's framer.
        let public_id = format!("sess_{}", random_hex(8));
        let s = Arc::new(Session {
            public_id: public_id.clone(),
            exec_id: started.exec_id,
            pid,
            inner: Mutex::new(Inner {
                input,
                out_rx,
                err_rx,
                watcher,
                exit_code: None,
            }),
            closed: AtomicBool::new(false),
            reader: StdMutex::new(Some(reader)),
        });
        if let Ok(mut m) = c.sessions.lock() {
            m.insert(public_id.clone(), s);
        }
        tracing::debug!(sandbox_id, session_id = %public_id, shell = %shell, "session created");
        Ok(public_id)
    }

    /// An execute-only copy of `shell` for one session: read as the sandbox user (so nothing
    /// it could not read itself is copied, wherever a link points), written by root (no
    /// capabilities) into [`spec::RUN_DIR`] with mode 0111. The kernel makes a process that
    /// runs a file it cannot read non-dumpable: no other process of the sandbox user can open
    /// the shell's `/proc/<pid>/fd/*` (its stdin and marker descriptors), read its memory or
    /// trace it, so a background job cannot type into the session or forge its markers.
    async fn shell_image(&self, c: &Arc<Container>, shell: &str, cwd: &str) -> Result<String> {
        const MAX_SHELL: usize = 32 << 20;
        let sid = c.sandbox_id.clone();
        let read = vec![
            "/bin/sh".to_owned(),
            "-c".to_owned(),
            // Exit 3: no such working directory (a relative shell path is looked up there).
            "cd \"$1\" 2>/dev/null || exit 3; p=$(command -v -- \"$2\") && [ -f \"$p\" ] && [ -x \"$p\" ] && exec cat -- \"$p\""
                .to_owned(),
            "sh".to_owned(),
            cwd.to_owned(),
            shell.to_owned(),
        ];
        let (code, binary) = c
            .run_captured(read, None, None, MAX_SHELL)
            .await
            .map_err(|e| into_runtime(&sid, e))?;
        if code == 3 {
            return Err(RuntimeError::CommandSetup {
                step: "chdir".into(),
                message: format!("working directory {cwd} does not exist"),
                errno: libc::ENOENT,
            });
        }
        if code != 0 || binary.is_empty() {
            return Err(RuntimeError::CommandSetup {
                step: "exec".into(),
                message: format!("shell {shell} could not be started: not an executable file"),
                errno: libc::ENOENT,
            });
        }
        // Under the shell's own name (busybox picks its applet from it, bash its mode).
        let dir = format!("{}/shell-{}", spec::RUN_DIR, random_hex(16));
        let name = shell
            .rsplit('/')
            .next()
            .filter(|n| !n.is_empty())
            .unwrap_or("sh");
        let path = format!("{dir}/{name}");
        let write = vec![
            "/bin/sh".to_owned(),
            "-c".to_owned(),
            "mkdir -m 0755 \"$1\" && umask 0777 && cat > \"$2\" && chmod 0111 \"$2\"".to_owned(),
            "sh".to_owned(),
            dir,
            path.clone(),
        ];
        let (code, _) = c
            .run_captured(write, Some("0:0"), Some(binary), 0)
            .await
            .map_err(|e| into_runtime(&sid, e))?;
        if code != 0 {
            return Err(RuntimeError::CommandSetup {
                step: "session".into(),
                message: format!("could not prepare the shell image {path} (exit code {code})"),
                errno: 0,
            });
        }
        Ok(path)
    }

    fn session(c: &Container, session_id: &str) -> Result<Arc<Session>> {
        agentfense_runtime::find_session(&c.sessions, session_id)
    }

    pub(crate) async fn do_session_exec(
        &self,
        sandbox_id: &str,
        session_id: &str,
        command: &str,
        timeout: Option<Duration>,
    ) -> Result<ExecResult> {
        let call = self
            .session_call(sandbox_id, session_id, command, timeout)
            .await?;
        call.run(None).await
    }

    /// Like [`DockerRuntime::do_session_exec`], with the output streamed as it comes; the
    /// last item is the exit (or the error that ended the call).
    pub(crate) async fn do_session_exec_stream(
        &self,
        sandbox_id: &str,
        session_id: &str,
        command: &str,
        timeout: Option<Duration>,
    ) -> Result<ExecStream> {
        let call = self
            .session_call(sandbox_id, session_id, command, timeout)
            .await?;
        Ok(stream_call(|tx| call.run(Some(tx))))
    }

    async fn session_call(
        &self,
        sandbox_id: &str,
        session_id: &str,
        command: &str,
        timeout: Option<Duration>,
    ) -> Result<SessionCall> {
        let c = self.running(sandbox_id).await?;
        let s = Self::session(&c, session_id)?;
        check_command(command)?;
        Ok(SessionCall {
            c,
            s,
            session_id: session_id.to_owned(),
            command: command.to_owned(),
            timeout: self.timeout(timeout),
            cap: self.cfg.output_cap,
        })
    }

    pub(crate) async fn do_session_destroy(
        &self,
        sandbox_id: &str,
        session_id: &str,
    ) -> Result<()> {
        let c = self.running(sandbox_id).await?;
        let s = Self::session(&c, session_id)?;
        if let Ok(mut m) = c.sessions.lock() {
            m.remove(session_id);
        }
        s.close(&c).await;
        Ok(())
    }
}

/// One command in a session, ready to run.
struct SessionCall {
    c: Arc<Container>,
    s: Arc<Session>,
    session_id: String,
    command: String,
    timeout: Duration,
    cap: usize,
}

/// Adds output to what a call collected and, when streaming, sends it on (in order).
async fn emit(
    buf: &mut CappedText,
    text: String,
    sink: &Option<mpsc::Sender<Result<ExecEvent>>>,
    wrap: fn(String) -> ExecEvent,
) {
    if text.is_empty() {
        return;
    }
    buf.push(&text);
    if let Some(tx) = sink {
        let _ = tx.send(Ok(wrap(text))).await;
    }
}

impl SessionCall {
    /// Runs the command in the session's shell; with `sink`, its output is also sent there as
    /// it comes (and the call is interrupted if the receiver goes away).
    async fn run(self, sink: Option<mpsc::Sender<Result<ExecEvent>>>) -> Result<ExecResult> {
        let SessionCall {
            c,
            s,
            session_id,
            command,
            timeout,
            cap,
        } = self;
        let (session_id, command) = (session_id.as_str(), command.as_str());
        let started = Instant::now();
        let closed = || RuntimeError::SessionClosed {
            session_id: session_id.to_owned(),
        };
        let mut guard = s.inner.lock().await;
        let inner = &mut *guard;
        if inner.exit_code.is_some() || s.closed.load(Ordering::SeqCst) {
            return Err(closed());
        }
        let nonce = random_hex(16);
        let script = call_script(&nonce, command);
        let write = async {
            inner.input.write_all(script.as_bytes()).await?;
            inner.input.flush().await
        };
        if write.await.is_err() {
            // The shell is gone (killed, e.g. by the OOM killer).
            inner.exit_code = Some(c.exit_code(&s.exec_id).await.unwrap_or(-1));
            s.closed.store(true, Ordering::SeqCst);
            return Err(closed());
        }
        let (mut fo, mut fe) = (Framer::new(&nonce), Framer::new(&nonce));
        let (mut co, mut ce) = (Utf8Chunker::default(), Utf8Chunker::default());
        let (mut out, mut err) = (CappedText::new(cap), CappedText::new(cap));
        let (mut out_open, mut err_open) = (true, true);
        let mut shell_exited = false;
        let mut grace: Option<tokio::time::Instant> = None;
        let deadline = tokio::time::Instant::now() + timeout;
        let far = deadline + Duration::from_secs(86_400 * 365);
        loop {
            let done = fo.tail().is_some() && fe.tail().is_some();
            if done || (!out_open && !err_open) {
                break;
            }
            tokio::select! {
                b = inner.out_rx.recv(), if out_open && fo.tail().is_none() => match b {
                    Some(b) => emit(&mut out, co.push(&fo.push(&b)), &sink, ExecEvent::Stdout).await,
                    None => out_open = false,
                },
                b = inner.err_rx.recv(), if err_open && fe.tail().is_none() => match b {
                    Some(b) => emit(&mut err, ce.push(&fe.push(&b)), &sink, ExecEvent::Stderr).await,
                    None => err_open = false,
                },
                _ = wait_exit(&c, &s.exec_id, inner.watcher.as_ref()), if inner.watcher.is_some() && !shell_exited => {
                    shell_exited = true;
                    grace = Some(tokio::time::Instant::now() + OUTPUT_GRACE);
                },
                _ = tokio::time::sleep_until(grace.unwrap_or(far)), if grace.is_some() => {
                    // The shell exited but something keeps its output open: take what arrived.
                    while let Ok(b) = inner.out_rx.try_recv() {
                        emit(&mut out, co.push(&fo.push(&b)), &sink, ExecEvent::Stdout).await;
                    }
                    while let Ok(b) = inner.err_rx.try_recv() {
                        emit(&mut err, ce.push(&fe.push(&b)), &sink, ExecEvent::Stderr).await;
                    }
                    out_open = false;
                    err_open = false;
                },
                _ = async {
                    match &sink {
                        Some(tx) => tx.closed().await,
                        None => std::future::pending().await,
                    }
                } => {
                    // Nobody reads the output any more: stop the foreground command, as a
                    // timeout would; the session stays usable.
                    if let Some(pid) = s.pid {
                        c.kill_tree(pid, Signal::INT).await;
                    }
                    return Err(agentfense_runtime::consumer_gone());
                },
                _ = tokio::time::sleep_until(deadline) => {
                    // Interrupt the foreground command only: the interactive shell returns to
                    // its prompt; background jobs ignore SIGINT (no job control).
                    if let Some(pid) = s.pid {
                        c.kill_tree(pid, Signal::INT).await;
                    }
                    let _ = c.check_limits(command, Some(session_id));
                    // No END marker will come: what the framers hold back is body.
                    out.push(&co.push(&fo.finish()));
                    err.push(&ce.push(&fe.finish()));
                    out.push(&co.finish());
                    err.push(&ce.finish());
                    return Err(RuntimeError::Timeout {
                        timeout,
                        stdout: out.finish().0,
                        stderr: err.finish().0,
                    });
                },
            }
        }
        let code = match fo.tail() {
            Some(tail) => tail.trim_start_matches(':').parse::<i32>().ok(),
            None => None,
        };
        let code = match code {
            Some(code) => code,
            None => {
                // No END marker: the shell ended (`exit`, or killed); its status is the result.
                emit(&mut out, co.push(&fo.finish()), &sink, ExecEvent::Stdout).await;
                emit(&mut err, ce.push(&fe.finish()), &sink, ExecEvent::Stderr).await;
                let code = c.exit_code(&s.exec_id).await.unwrap_or(-1);
                inner.exit_code = Some(code);
                s.closed.store(true, Ordering::SeqCst);
                code
            }
        };
        emit(&mut out, co.finish(), &sink, ExecEvent::Stdout).await;
        emit(&mut err, ce.finish(), &sink, ExecEvent::Stderr).await;
        let _ = c.check_limits(command, Some(session_id));
        if inner.exit_code.is_some()
            && let Some(pid) = s.pid
        {
            // The shell ended: nothing of the session may outlive it.
            c.kill_tree(pid, Signal::KILL).await;
        }
        let (stdout, stdout_truncated) = out.finish();
        let (stderr, stderr_truncated) = err.finish();
        Ok(ExecResult {
            exit_code: code,
            stdout,
            stderr,
            stdout_truncated,
            stderr_truncated,
            duration: started.elapsed(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    fn frame(nonce: &str, chunks: &[&[u8]]) -> (Vec<u8>, Option<String>) {
        let mut f = Framer::new(nonce);
        let mut out = Vec::new();
        for c in chunks {
            out.extend(f.push(c));
        }
        (out, f.tail().map(str::to_owned))
    }

    #[test]
    fn framer_keeps_exactly_the_body() {
        let n = "0123";
        let stream = b"noise$ \x1eAFS0123\x1ehello\x1eAFE0123:7\x1elater";
        let (body, tail) = frame(n, &[stream]);
        assert_eq!(
            (body.as_slice(), tail.as_deref()),
            (&b"hello"[..], Some(":7"))
        );
        // Split at every position: same result.
        for i in 0..stream.len() {
            let (body, tail) = frame(n, &[&stream[..i], &stream[i..]]);
            assert_eq!(
                (body.as_slice(), tail.as_deref()),
                (&b"hello"[..], Some(":7")),
                "split {i}"
            );
        }
        // Byte by byte.
        let chunks: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(frame(n, &chunks).0, b"hello");
    }

    #[test]
    fn framer_ignores_other_calls_markers_and_flushes_on_exit() {
        let n = "beef";
        let mut f = Framer::new(n);
        let mut body = f.push(b"\x1eAFSdead\x1eold\x1eAFS");
        body.extend(f.push(b"beef\x1e\x1eAFEdead:1\x1e x"));
        assert_eq!(f.tail(), None);
        body.extend(f.finish());
        assert_eq!(body, b"\x1eAFEdead:1\x1e x".to_vec());
        let mut f = Framer::new(n);
        let mut body = f.push(b"\x1eAFSbeef\x1ebye\n");
        body.extend(f.finish());
        assert_eq!(body, b"bye\n");
        // Stderr's END marker has an empty tail.
        assert_eq!(
            frame(n, &[b"\x1eAFSbeef\x1e\x1eAFEbeef\x1e"]).1.as_deref(),
            Some("")
        );
    }

    #[test]
    fn call_script_quotes_the_command_in_a_heredoc() {
        let s = call_script("ab12", "echo 'x'\ncat <<EOF\n$HOME\nEOF");
        assert!(s.starts_with("__af_c=; while IFS= read -r __af_l; do"));
        assert!(s.contains("<<'AF_ab12'\necho 'x'\ncat <<EOF\n$HOME\nEOF\nAF_ab12\n"));
        assert!(s.ends_with(">&9\n"));
        assert_eq!(s.matches('\n').count(), 8);
    }
}
