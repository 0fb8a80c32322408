//! The [`Runtime`] trait every backend implements (bwrap here; Docker in its own issue).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::error::Result;
use crate::types::{ExecEvent, ExecRequest, ExecResult, SandboxSpec, SessionSpec};

/// A boxed, sendable future (keeps [`Runtime`] usable as `Arc<dyn Runtime>`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Output of [`Runtime::exec_stream`]: tagged chunks as they are produced, then
/// [`ExecEvent::Exit`]; an `Err` item (e.g. [`RuntimeError::Timeout`](crate::RuntimeError))
/// ends the stream instead. Dropping the stream kills the command.
#[derive(Debug)]
pub struct ExecStream {
    rx: mpsc::Receiver<Result<ExecEvent>>,
}

impl ExecStream {
    /// Wraps the receiving end of a runtime's event channel (for runtimes in other crates).
    pub fn new(rx: mpsc::Receiver<Result<ExecEvent>>) -> Self {
        ExecStream { rx }
    }

    /// The next event; `None` after the exit event or an error.
    pub async fn next(&mut self) -> Option<Result<ExecEvent>> {
        self.rx.recv().await
    }

    /// Collects the whole command into an [`ExecResult`], each stream capped at `output_cap`
    /// bytes (with the truncation marker). A timeout keeps the partial output in the error.
    /// `started` is when the command was requested, for the duration.
    pub async fn collect(
        mut self,
        output_cap: usize,
        sandbox_id: &str,
        started: std::time::Instant,
    ) -> Result<ExecResult> {
        use crate::error::RuntimeError;
        use crate::output::CappedText;
        let mut out = CappedText::new(output_cap);
        let mut err = CappedText::new(output_cap);
        while let Some(ev) = self.next().await {
            match ev {
                Ok(ExecEvent::Stdout(s)) => out.push(&s),
                Ok(ExecEvent::Stderr(s)) => err.push(&s),
                Ok(ExecEvent::Exit { exit_code, .. }) => {
                    let (stdout, stdout_truncated) = out.finish();
                    let (stderr, stderr_truncated) = err.finish();
                    return Ok(ExecResult {
                        exit_code,
                        stdout,
                        stderr,
                        stdout_truncated,
                        stderr_truncated,
                        duration: started.elapsed(),
                    });
                }
                Err(RuntimeError::Timeout { timeout, .. }) => {
                    return Err(RuntimeError::Timeout {
                        timeout,
                        stdout: out.finish().0,
                        stderr: err.finish().0,
                    });
                }
                Err(e) => return Err(e),
            }
        }
        // The stream ended without an exit event: the environment went away.
        Err(RuntimeError::NotRunning {
            sandbox_id: sandbox_id.to_owned(),
        })
    }
}

/// What became of an event [`deliver`]ed to an exec stream's consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Sent (or skipped: an empty chunk is never sent).
    Sent,
    /// The consumer dropped the stream: the command must be killed, ending with
    /// [`consumer_gone`].
    ConsumerGone,
    /// The consumer left no room before the command's deadline: the command must be killed as
    /// timed out.
    PastDeadline,
}

/// Sends `ev` to an exec stream's consumer, waiting for room until `deadline` at the latest
/// (a consumer that is already late gets no wait). Empty chunks are skipped. Shared by the
/// runtimes' exec loops, which differ in how they kill.
pub async fn deliver(
    tx: &mpsc::Sender<Result<ExecEvent>>,
    ev: ExecEvent,
    deadline: tokio::time::Instant,
) -> Delivery {
    if matches!(&ev, ExecEvent::Stdout(s) | ExecEvent::Stderr(s) if s.is_empty()) {
        return Delivery::Sent;
    }
    match tokio::time::timeout_at(deadline.max(tokio::time::Instant::now()), tx.send(Ok(ev))).await
    {
        Ok(Ok(())) => Delivery::Sent,
        Ok(Err(_)) => Delivery::ConsumerGone,
        Err(_) => Delivery::PastDeadline,
    }
}

/// Streams a call that collects its result while sending its output on: `run` gets the
/// sender for the output; its result becomes the stream's last item (the exit, or the error
/// that ended it). For runtimes whose session calls stream.
pub fn stream_call<F, Fut>(run: F) -> ExecStream
where
    F: FnOnce(mpsc::Sender<Result<ExecEvent>>) -> Fut,
    Fut: std::future::Future<Output = Result<crate::types::ExecResult>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(64);
    let call = run(tx.clone());
    tokio::spawn(async move {
        let last = call.await.map(|r| ExecEvent::Exit {
            exit_code: r.exit_code,
            duration: r.duration,
        });
        let _ = tx.send(last).await;
    });
    ExecStream::new(rx)
}

/// The error ending a command whose stream consumer went away.
pub fn consumer_gone() -> crate::error::RuntimeError {
    crate::error::RuntimeError::Io {
        op: "stream consumer gone",
        source: std::io::Error::from(std::io::ErrorKind::BrokenPipe),
    }
}

/// The session `session_id` of a runtime's per-sandbox session table, or
/// [`RuntimeError::SessionNotFound`](crate::RuntimeError::SessionNotFound).
pub fn find_session<S>(
    sessions: &std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<S>>>,
    session_id: &str,
) -> Result<std::sync::Arc<S>> {
    sessions
        .lock()
        .ok()
        .and_then(|m| m.get(session_id).cloned())
        .ok_or_else(|| crate::error::RuntimeError::SessionNotFound {
            session_id: session_id.to_owned(),
        })
}

/// Sandbox lifecycle, command execution and persistent sessions.
///
/// State machine per sandbox: `create` → `start` → (`exec`, sessions)* → `stop` → (`start` …)
/// → `destroy`. Calls on a sandbox that is not running fail with
/// [`RuntimeError::NotRunning`](crate::RuntimeError::NotRunning).
pub trait Runtime: Send + Sync {
    /// Registers a sandbox; nothing runs yet.
    fn create<'a>(&'a self, sandbox_id: &'a str, spec: SandboxSpec) -> BoxFuture<'a, Result<()>>;

    /// Starts the sandbox's long-lived environment.
    fn start<'a>(&'a self, sandbox_id: &'a str) -> BoxFuture<'a, Result<()>>;

    /// Runs `/bin/sh -c <command>` and waits for it (output capped).
    fn exec<'a>(
        &'a self,
        sandbox_id: &'a str,
        req: ExecRequest,
    ) -> BoxFuture<'a, Result<ExecResult>>;

    /// Runs `/bin/sh -c <command>` and streams its output.
    fn exec_stream<'a>(
        &'a self,
        sandbox_id: &'a str,
        req: ExecRequest,
    ) -> BoxFuture<'a, Result<ExecStream>>;

    /// Starts a persistent shell; returns its id (`sess_` + 16 hex digits).
    fn session_create<'a>(
        &'a self,
        sandbox_id: &'a str,
        spec: SessionSpec,
    ) -> BoxFuture<'a, Result<String>>;

    /// Runs one command in the session's shell; calls on one session are serialised.
    fn session_exec<'a>(
        &'a self,
        sandbox_id: &'a str,
        session_id: &'a str,
        command: &'a str,
        timeout: Option<Duration>,
    ) -> BoxFuture<'a, Result<ExecResult>>;

    /// Like [`Runtime::session_exec`], with the output streamed as the command produces it.
    /// The default runs the command to completion and sends the result in three events: a
    /// runtime that can stream overrides it.
    fn session_exec_stream<'a>(
        &'a self,
        sandbox_id: &'a str,
        session_id: &'a str,
        command: &'a str,
        timeout: Option<Duration>,
    ) -> BoxFuture<'a, Result<ExecStream>> {
        Box::pin(async move {
            let r = self
                .session_exec(sandbox_id, session_id, command, timeout)
                .await?;
            let (tx, rx) = mpsc::channel(3);
            for ev in [
                ExecEvent::Stdout(r.stdout),
                ExecEvent::Stderr(r.stderr),
                ExecEvent::Exit {
                    exit_code: r.exit_code,
                    duration: r.duration,
                },
            ] {
                let _ = tx.try_send(Ok(ev));
            }
            Ok(ExecStream::new(rx))
        })
    }

    /// Kills the session's shell and all its processes.
    fn session_destroy<'a>(
        &'a self,
        sandbox_id: &'a str,
        session_id: &'a str,
    ) -> BoxFuture<'a, Result<()>>;

    /// Kills everything inside the sandbox; it can be started again.
    fn stop<'a>(&'a self, sandbox_id: &'a str) -> BoxFuture<'a, Result<()>>;

    /// Stops (if needed) and forgets the sandbox, removing its host-side state.
    fn destroy<'a>(&'a self, sandbox_id: &'a str) -> BoxFuture<'a, Result<()>>;

    /// The host (uid, gid) of the sandbox's user once the sandbox is created: what a
    /// filesystem serving its workspace should show as the files' owner, so that the
    /// sandbox user owns them inside (tools such as git check). `None`: the runtime does
    /// not say (the caller uses the conventional sandbox user, 1000).
    fn sandbox_owner(&self, sandbox_id: &str) -> Option<(u32, u32)> {
        let _ = sandbox_id;
        None
    }

    /// What the sandbox uses now (CPU time, memory, processes); `None` when the runtime cannot
    /// tell (no cgroups, not running).
    fn usage(&self, _sandbox_id: &str) -> Option<crate::cgroup::Usage> {
        None
    }

    /// An `O_PATH` descriptor of the running sandbox's `/tmp` (the file system that also
    /// holds `$HOME`), so that what it holds can count against a disk quota (`fstatfs`).
    /// `None`: not running, or the runtime cannot say.
    fn scratch(&self, sandbox_id: &str) -> Option<std::os::fd::OwnedFd> {
        let _ = sandbox_id;
        None
    }

    /// The running sandbox's network namespace (an `O_RDONLY` descriptor of
    /// `/proc/<init>/ns/net`), for the egress proxy to listen inside it. `None`: not running,
    /// shares the host's network, or the runtime cannot say.
    fn network_namespace(&self, sandbox_id: &str) -> Option<std::os::fd::OwnedFd> {
        let _ = sandbox_id;
        None
    }

    /// Removes what a crashed earlier process of this service left behind (cgroups,
    /// containers). Called once at startup, before any sandbox starts; returns how many
    /// leftovers were removed. The default has nothing to clean.
    fn cleanup_stale(&self) -> BoxFuture<'_, Result<usize>> {
        Box::pin(async { Ok(0) })
    }
}

/// `root` and all its descendants, from `/proc/<pid>/task/<tid>/children`.
pub fn process_tree(root: u32) -> Vec<u32> {
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let pid = out[i];
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for t in tasks.flatten() {
                if let Ok(c) = std::fs::read_to_string(t.path().join("children")) {
                    out.extend(c.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
                }
            }
        }
        i += 1;
    }
    out
}
