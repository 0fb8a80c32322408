//! Commands: one docker exec of `/bin/sh -c <command>` per request, without a TTY, output
//! demultiplexed into stdout and stderr; exit noticed with a pidfd on the exec's host pid; the
//! deadline kills the process tree from the host.

use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentfense_runtime::output::Utf8Chunker;
use agentfense_runtime::{
    Delivery, ExecEvent, ExecRequest, ExecResult, ExecStream, LimitKind, Result, RuntimeError,
    check_command, consumer_gone, deliver,
};
use bollard::container::LogOutput;
use bollard::exec::{StartExecOptions, StartExecResults};
use bollard::models::ExecConfig;
use futures_util::{Stream, StreamExt};
use rustix::process::Signal;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::{Container, DockerRuntime};
use crate::error::invalid;
use crate::error::{DockerError, into_runtime};
use crate::kill::{self, PidfdState};
use crate::spec::{self, WORKSPACE};

/// After the command exits, how long to wait for its output to reach end-of-file (a background
/// process may keep it open) before taking what has arrived.
pub(crate) const OUTPUT_GRACE: Duration = Duration::from_millis(50);
/// After a timeout kill, how long to wait for the stream to end.
const KILL_GRACE: Duration = Duration::from_secs(1);
/// Largest command text accepted (`MAX_ARG_STRLEN` for `sh -c`).
/// What docker writes into the stream when runc cannot start the process.
const OCI_FAILURE: &[u8] = b"OCI runtime exec failed";

pub(crate) type Output =
    Pin<Box<dyn Stream<Item = std::result::Result<LogOutput, bollard::errors::Error>> + Send>>;
pub(crate) type Input = Pin<Box<dyn AsyncWrite + Send>>;

/// A started docker exec.
pub(crate) struct Started {
    pub(crate) exec_id: String,
    pub(crate) output: Output,
    pub(crate) input: Input,
}

impl Container {
    /// Creates and starts an exec (attached, no TTY).
    pub(crate) async fn start_exec(
        &self,
        cmd: Vec<String>,
        env: Vec<String>,
        workdir: String,
        attach_stdin: bool,
    ) -> std::result::Result<Started, DockerError> {
        self.start_exec_as(cmd, env, workdir, attach_stdin, None)
            .await
    }

    /// [`Self::start_exec`] as `user` (`None`: the container's user).
    pub(crate) async fn start_exec_as(
        &self,
        cmd: Vec<String>,
        env: Vec<String>,
        workdir: String,
        attach_stdin: bool,
        user: Option<&str>,
    ) -> std::result::Result<Started, DockerError> {
        let exec = self
            .docker
            .create_exec(
                &self.id,
                ExecConfig {
                    attach_stdin: Some(attach_stdin),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    tty: Some(false),
                    env: Some(env),
                    cmd: Some(cmd),
                    working_dir: Some(workdir),
                    user: user.map(str::to_owned),
                    privileged: Some(false),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| {
                if crate::error::is_conflict(&e) || crate::error::is_not_found(&e) {
                    // 409 "container is not running" / 404 "no such container".
                    self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
                    DockerError::ContainerNotRunning {
                        sandbox_id: self.sandbox_id.clone(),
                    }
                } else {
                    DockerError::api("create exec", &self.sandbox_id)(e)
                }
            })?;
        let started = self
            .docker
            .start_exec(
                &exec.id,
                Some(StartExecOptions {
                    detach: false,
                    tty: false,
                    output_capacity: Some(64 * 1024),
                }),
            )
            .await
            .map_err(DockerError::api("start exec", &self.sandbox_id))?;
        match started {
            StartExecResults::Attached { output, input } => Ok(Started {
                exec_id: exec.id,
                output,
                input,
            }),
            StartExecResults::Detached => Err(DockerError::Protocol {
                step: "start exec",
                sandbox_id: self.sandbox_id.clone(),
                message: "the daemon did not attach the exec".into(),
            }),
        }
    }

    /// Runs `cmd` to its end as `user` (`None`: the container's user) with `stdin` as its
    /// input; returns its exit code and stdout (at most `cap` bytes; more is an error).
    pub(crate) async fn run_captured(
        &self,
        cmd: Vec<String>,
        user: Option<&str>,
        stdin: Option<Vec<u8>>,
        cap: usize,
    ) -> std::result::Result<(i32, Vec<u8>), DockerError> {
        let started = self
            .start_exec_as(cmd, Vec::new(), "/".into(), stdin.is_some(), user)
            .await?;
        let feeder = stdin.map(|data| tokio::spawn(feed_stdin(started.input, data)));
        let mut out = Vec::new();
        let mut output = started.output;
        while let Some(item) = output.next().await {
            match item {
                Ok(LogOutput::StdOut { message }) | Ok(LogOutput::Console { message }) => {
                    if out.len() + message.len() > cap {
                        return Err(DockerError::Protocol {
                            step: "capture",
                            sandbox_id: self.sandbox_id.clone(),
                            message: format!("output larger than {cap} bytes"),
                        });
                    }
                    out.extend_from_slice(&message);
                }
                Ok(_) => {}
                Err(e) => return Err(DockerError::api("read exec output", &self.sandbox_id)(e)),
            }
        }
        if let Some(f) = feeder {
            let _ = f.await;
        }
        Ok((self.exit_code(&started.exec_id).await?, out))
    }

    /// The exec's host pid once the daemon reports it (`None` if it finished without one or
    /// the daemon does not answer).
    pub(crate) async fn exec_pid(&self, exec_id: &str) -> Option<u32> {
        let mut wait = Duration::from_millis(1);
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            match self.docker.inspect_exec(exec_id).await {
                Ok(i) => {
                    if let Some(pid) = i.pid.filter(|p| *p > 0) {
                        return u32::try_from(pid).ok();
                    }
                    if i.exit_code.is_some() && i.running != Some(true) {
                        return None;
                    }
                }
                Err(e) => {
                    tracing::debug!(sandbox_id = %self.sandbox_id, error = %e, "inspect exec failed");
                    return None;
                }
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(20));
        }
        None
    }

    /// The exec's exit code (waits briefly for the daemon to record it).
    pub(crate) async fn exit_code(&self, exec_id: &str) -> std::result::Result<i32, DockerError> {
        let mut wait = Duration::from_millis(1);
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            let i = self
                .docker
                .inspect_exec(exec_id)
                .await
                .map_err(DockerError::api("inspect exec", &self.sandbox_id))?;
            if i.running != Some(true)
                && let Some(code) = i.exit_code
            {
                return Ok(code as i32);
            }
            if Instant::now() >= until {
                return Err(DockerError::Protocol {
                    step: "inspect exec",
                    sandbox_id: self.sandbox_id.clone(),
                    message: "no exit code after the command's output ended".into(),
                });
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(20));
        }
    }

    /// How to notice the exit of the exec's process (`None`: it has already exited).
    pub(crate) fn watch(&self, pid: u32) -> Option<ExitWatch> {
        match kill::pidfd(pid, &self.id) {
            PidfdState::Open(fd) => {
                // SAFETY: `fd` is an open pidfd owned by the `OwnedFd` moved into the
                // `AsyncFd`; it stays open, and refers to the same process, until the `AsyncFd`
                // is dropped.
                match unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
                {
                    Ok(fd) => Some(ExitWatch::Fd(fd)),
                    Err(_) => Some(ExitWatch::Poll),
                }
            }
            PidfdState::Exited => None,
            PidfdState::Foreign => Some(ExitWatch::Poll),
        }
    }

    /// Whether the daemon reports the exec finished.
    pub(crate) async fn exec_finished(&self, exec_id: &str) -> bool {
        match self.docker.inspect_exec(exec_id).await {
            Ok(i) => i.running != Some(true) && i.exit_code.is_some(),
            Err(_) => true,
        }
    }

    /// SIGKILLs the exec's process group and descendants (blocking work off the runtime).
    pub(crate) async fn kill_tree(self: &Arc<Self>, pid: u32, signal: Signal) {
        let id = self.id.clone();
        let _ = tokio::task::spawn_blocking(move || kill::kill_tree(pid, &id, signal)).await;
    }
}

/// Resolves a request's workdir to an absolute path inside `/workspace` (same rules as bwrap).
pub(crate) fn resolve_workdir(workdir: &str) -> Result<String> {
    let w = agentfense_runtime::resolve_workdir(workdir)?;
    debug_assert!(w.starts_with(WORKSPACE));
    Ok(w)
}

impl DockerRuntime {
    /// Runs `/bin/sh -c <command>` and returns its events (tagged output chunks, then
    /// [`ExecEvent::Exit`], or an error item such as [`RuntimeError::Timeout`]). Dropping the
    /// receiver kills the command. [`Runtime::exec_stream`](agentfense_runtime::Runtime) wraps
    /// this.
    pub async fn exec_events(
        &self,
        sandbox_id: &str,
        req: ExecRequest,
    ) -> Result<mpsc::Receiver<Result<ExecEvent>>> {
        let c = self.running(sandbox_id).await?;
        let timeout = self.timeout(req.timeout);
        let cwd = resolve_workdir(&req.workdir)?;
        check_command(&req.command)?;
        let env = spec::merge_env(&c.env, &req.env, &[]).map_err(invalid)?;
        let argv = vec!["/bin/sh".to_owned(), "-c".to_owned(), req.command.clone()];
        let started = c
            .start_exec(argv, env, cwd, !req.stdin.is_empty())
            .await
            .map_err(|e| into_runtime(sandbox_id, e))?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(drive(c, started, req.stdin, timeout, tx, req.command));
        Ok(rx)
    }

    pub(crate) async fn do_exec_stream(
        &self,
        sandbox_id: &str,
        req: ExecRequest,
    ) -> Result<ExecStream> {
        let rx = self.exec_events(sandbox_id, req).await?;
        into_exec_stream(rx)
    }

    pub(crate) async fn do_exec(&self, sandbox_id: &str, req: ExecRequest) -> Result<ExecResult> {
        let started = Instant::now();
        let stream = ExecStream::new(self.exec_events(sandbox_id, req).await?);
        stream
            .collect(self.cfg.output_cap, sandbox_id, started)
            .await
    }
}

/// The trait's stream type over our event channel.
fn into_exec_stream(rx: mpsc::Receiver<Result<ExecEvent>>) -> Result<ExecStream> {
    Ok(ExecStream::new(rx))
}

/// Pumps one exec into `tx` until it exits, enforcing the deadline.
async fn drive(
    c: Arc<Container>,
    st: Started,
    stdin: Vec<u8>,
    timeout: Duration,
    tx: mpsc::Sender<Result<ExecEvent>>,
    command: String,
) {
    let started = Instant::now();
    let Started {
        exec_id,
        mut output,
        input,
    } = st;
    if !stdin.is_empty() {
        tokio::spawn(feed_stdin(input, stdin));
    } else {
        drop(input);
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let far = deadline + Duration::from_secs(86_400 * 365);
    let mut out_chunker = Utf8Chunker::default();
    let mut err_chunker = Utf8Chunker::default();
    let mut open = true;
    let mut first = true;
    let mut setup_failure: Option<String> = None;
    let mut pid: Option<u32> = None;
    let mut pid_pending = true;
    let mut watcher: Option<ExitWatch> = None;
    let mut exited = false;
    let mut timed_out = false;
    let mut grace: Option<tokio::time::Instant> = None;
    let c2 = c.clone();
    let exec_id2 = exec_id.clone();
    let mut pid_lookup = Box::pin(async move { c2.exec_pid(&exec_id2).await });
    let mut consumer_left = false;

    let failure: Option<RuntimeError> = loop {
        if !open {
            break None;
        }
        let ev = tokio::select! {
            item = output.next() => match item {
                Some(Ok(LogOutput::StdOut { message })) | Some(Ok(LogOutput::Console { message })) => {
                    if first && message.starts_with(OCI_FAILURE) {
                        setup_failure = Some(String::from_utf8_lossy(&message).into_owned());
                        None
                    } else {
                        first = false;
                        Some(ExecEvent::Stdout(out_chunker.push(&message)))
                    }
                }
                Some(Ok(LogOutput::StdErr { message })) => {
                    if first && message.starts_with(OCI_FAILURE) {
                        setup_failure = Some(String::from_utf8_lossy(&message).into_owned());
                        None
                    } else {
                        first = false;
                        Some(ExecEvent::Stderr(err_chunker.push(&message)))
                    }
                }
                Some(Ok(LogOutput::StdIn { .. })) => None,
                Some(Err(e)) => {
                    tracing::debug!(sandbox_id = %c.sandbox_id, error = %e, "exec output stream failed");
                    open = false;
                    None
                }
                None => { open = false; None }
            },
            p = &mut pid_lookup, if pid_pending => {
                pid_pending = false;
                pid = p;
                watcher = p.and_then(|p| c.watch(p));
                if watcher.is_none() {
                    // Already gone: give the output a moment, then finish.
                    exited = true;
                    grace = Some(tokio::time::Instant::now() + OUTPUT_GRACE);
                }
                if timed_out && let Some(p) = pid {
                    c.kill_tree(p, Signal::KILL).await;
                }
                None
            },
            _ = wait_exit(&c, &exec_id, watcher.as_ref()), if watcher.is_some() && !exited => {
                // Readable pidfd: the command's main process has exited.
                exited = true;
                grace = Some(tokio::time::Instant::now() + OUTPUT_GRACE);
                None
            },
            _ = tokio::time::sleep_until(if timed_out { deadline + KILL_GRACE } else { deadline }) => {
                if timed_out {
                    break Some(timeout_error(timeout));
                }
                timed_out = true;
                if let Some(p) = pid {
                    c.kill_tree(p, Signal::KILL).await;
                }
                None
            },
            _ = tx.closed() => {
                // The consumer went away: kill the command now rather than at its deadline
                // (below, once its pid is known).
                consumer_left = true;
                break Some(consumer_gone());
            },
            _ = tokio::time::sleep_until(grace.unwrap_or(far)), if grace.is_some() => {
                // A background process keeps the output open: take what has arrived.
                open = false;
                None
            },
        };
        if let Some(ev) = ev {
            match deliver(&tx, ev, deadline).await {
                Delivery::Sent => {}
                Delivery::ConsumerGone => {
                    consumer_left = true;
                    break Some(consumer_gone());
                }
                Delivery::PastDeadline => {
                    // Blocked on a slow consumer past the deadline.
                    timed_out = true;
                    if let Some(p) = pid {
                        c.kill_tree(p, Signal::KILL).await;
                    }
                }
            }
        }
    };
    if consumer_left {
        // A consumer that leaves before the command's pid is known must not leave it running.
        if pid.is_none() && pid_pending {
            pid = pid_lookup.await;
        }
        if let Some(p) = pid {
            c.kill_tree(p, Signal::KILL).await;
        }
    }
    // Flush held-back partial characters.
    for (text, is_out) in [(out_chunker.finish(), true), (err_chunker.finish(), false)] {
        if !text.is_empty() && failure.is_none() && !timed_out {
            let ev = if is_out {
                ExecEvent::Stdout(text)
            } else {
                ExecEvent::Stderr(text)
            };
            let _ = tx.send(Ok(ev)).await;
        }
    }
    let result: Result<i32> = match failure {
        Some(e) => Err(e),
        None if timed_out => Err(timeout_error(timeout)),
        None => match c.exit_code(&exec_id).await {
            Ok(code) => match setup_failure {
                Some(msg) if code == 126 || code == 127 => Err(setup_error(&msg)),
                _ => Ok(code),
            },
            Err(e) => Err(into_runtime(&c.sandbox_id, e)),
        },
    };
    // Stop/Destroy killed the container under the command (its exit code would read 137).
    let result = if c.closed.load(std::sync::atomic::Ordering::SeqCst) && !timed_out {
        Err(RuntimeError::NotRunning {
            sandbox_id: c.sandbox_id.clone(),
        })
    } else {
        result
    };
    let hits = c.check_limits(&command, None);
    if hits.contains(&LimitKind::Pids)
        && let Some(p) = pid
    {
        // A command that exhausted the pids limit (a fork bomb) must not leave the sandbox
        // unusable: whatever it left behind goes.
        c.kill_tree(p, Signal::KILL).await;
    }
    match &result {
        Ok(code) => {
            tracing::debug!(sandbox_id = %c.sandbox_id, exec_id = %exec_id, exit_code = code, elapsed = ?started.elapsed(), "command finished")
        }
        Err(e) => {
            tracing::debug!(sandbox_id = %c.sandbox_id, exec_id = %exec_id, error = %e, "command failed")
        }
    }
    let last = result.map(|exit_code| ExecEvent::Exit {
        exit_code,
        duration: started.elapsed(),
    });
    let _ = tx.send(last).await;
}

/// How the exit of an exec's main process is noticed.
#[derive(Debug)]
pub(crate) enum ExitWatch {
    /// A pidfd: readable once the process exits.
    Fd(AsyncFd<OwnedFd>),
    /// No usable pid (daemon in another pid namespace): poll the exec's state.
    Poll,
}

/// Resolves once the exec's main process has exited; never without a watch.
pub(crate) async fn wait_exit(c: &Container, exec_id: &str, w: Option<&ExitWatch>) {
    match w {
        Some(ExitWatch::Fd(fd)) => {
            let _ = fd.readable().await;
        }
        Some(ExitWatch::Poll) => loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if c.exec_finished(exec_id).await {
                return;
            }
        },
        None => std::future::pending().await,
    }
}

pub(crate) async fn feed_stdin(mut input: Input, data: Vec<u8>) {
    let _ = input.write_all(&data).await;
    let _ = input.flush().await;
    // Half-close: the command sees end-of-file.
    let _ = input.shutdown().await;
}

pub(crate) fn timeout_error(timeout: Duration) -> RuntimeError {
    RuntimeError::Timeout {
        timeout,
        stdout: String::new(),
        stderr: String::new(),
    }
}

/// Maps docker's "OCI runtime exec failed" text to the bwrap runtime's setup error (a missing
/// workdir is `chdir`, a missing program is `exec` + ENOENT: both INVALID_ARGUMENT).
pub(crate) fn setup_error(msg: &str) -> RuntimeError {
    let msg = msg.trim().to_owned();
    let (step, errno) = if msg.contains("chdir to cwd") {
        ("chdir", libc::ENOENT)
    } else if msg.contains("no such file or directory") || msg.contains("executable file not found")
    {
        ("exec", libc::ENOENT)
    } else if msg.contains("permission denied") {
        ("exec", libc::EACCES)
    } else {
        ("exec", 0)
    };
    RuntimeError::CommandSetup {
        step: step.into(),
        message: msg,
        errno,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentfense_runtime::ErrorKind;

    #[test]
    fn oci_failures_map_like_bwrap_setup_errors() {
        let e = setup_error(
            "OCI runtime exec failed: exec failed: unable to start container process: chdir to cwd (\"/workspace/missing\") set in config.json failed: no such file or directory: unknown\r\n",
        );
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        let e = setup_error(
            "OCI runtime exec failed: exec failed: unable to start container process: exec: \"/bin/zsh\": stat /bin/zsh: no such file or directory: unknown",
        );
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert_eq!(
            setup_error("OCI runtime exec failed: boom").kind(),
            ErrorKind::Internal
        );
    }
}
