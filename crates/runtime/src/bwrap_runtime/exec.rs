//! Commands: one fork+exec in the init per request, output pumped from plain pipes.

use super::*;
use crate::runtime::{Delivery, consumer_gone, deliver};

impl BwrapRuntime {
    pub(super) async fn do_exec_stream(
        &self,
        sandbox_id: &str,
        req: ExecRequest,
    ) -> Result<ExecStream> {
        let env = self.running(sandbox_id).await?;
        let timeout = self.timeout(req.timeout);
        let cwd = resolve_workdir_in(&env.root, &req.workdir)?;
        check_command(&req.command)?;
        let envv = build_env(&env.user, &req.env, &[])?;
        let argv = vec!["/bin/sh".to_owned(), "-c".to_owned(), req.command.clone()];
        let running = env.spawn_command(argv, envv, cwd, req.stdin).await?;
        let (tx, rx) = mpsc::channel(64);
        let command = req.command;
        tokio::spawn(async move {
            drive(env, running, timeout, tx, command).await;
        });
        Ok(ExecStream::new(rx))
    }

    pub(super) async fn do_exec(&self, sandbox_id: &str, req: ExecRequest) -> Result<ExecResult> {
        let started = Instant::now();
        let stream = self.do_exec_stream(sandbox_id, req).await?;
        stream
            .collect(self.cfg.output_cap, sandbox_id, started)
            .await
    }
}

/// A command started in the init.
pub(super) struct Running {
    id: u64,
    rx: mpsc::UnboundedReceiver<Incoming>,
    stdout: pipe::Receiver,
    stderr: pipe::Receiver,
    started: Instant,
    cgroup: Option<ExecCgroup>,
}

impl Env {
    pub(super) async fn spawn_command(
        &self,
        argv: Vec<String>,
        env: Vec<String>,
        cwd: String,
        stdin: Vec<u8>,
    ) -> Result<Running> {
        let io_err = |op| {
            move |e: nix::Error| RuntimeError::Io {
                op,
                source: e.into(),
            }
        };
        let (in_r, in_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io_err("pipe"))?;
        let (out_r, out_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io_err("pipe"))?;
        let (err_r, err_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io_err("pipe"))?;
        let pipe_err = |source| RuntimeError::Io {
            op: "register pipe",
            source,
        };
        let stdout = pipe::Receiver::from_owned_fd(out_r).map_err(pipe_err)?;
        let stderr = pipe::Receiver::from_owned_fd(err_r).map_err(pipe_err)?;
        let stdin_tx = pipe::Sender::from_owned_fd(in_w).map_err(pipe_err)?;
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let mut cgroup = self.child_cgroup(&format!("e{id}"))?;
        let cg_dir = cgroup.as_mut().and_then(|c| c.take_handle());
        let mut fds = vec![in_r.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()];
        fds.extend(cg_dir.as_ref().map(|f| f.as_raw_fd()));
        let rx = self.chan.register(id);
        let sent = self
            .chan
            .send(
                &Request::Exec {
                    id,
                    argv,
                    env,
                    cwd,
                    tty: false,
                },
                &fds,
            )
            .await;
        drop((in_r, out_w, err_w, cg_dir));
        if let Err(e) = sent {
            self.chan.unregister(id);
            if let Some(c) = &cgroup {
                c.remove_if_empty();
            }
            return Err(e);
        }
        // Feed stdin in the background, then close it (EOF for the command).
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let mut w = stdin_tx;
            let _ = w.write_all(&stdin).await;
        });
        Ok(Running {
            id,
            rx,
            stdout,
            stderr,
            started: Instant::now(),
            cgroup,
        })
    }

    /// A per-command (or per-session) cgroup, when the host has a v2 hierarchy.
    pub(super) fn child_cgroup(&self, name: &str) -> Result<Option<ExecCgroup>> {
        match &self.cgroup {
            Some(cg) => cg.exec_cgroup(name),
            None => Ok(None),
        }
    }

    /// Compares the cgroup limit counters with the last seen values and reports increases.
    pub(super) fn check_limits(&self, command: &str, session_id: Option<&str>) -> Vec<LimitKind> {
        let Some(cg) = &self.cgroup else {
            return Vec::new();
        };
        crate::cgroup::report_limit_hits(
            &self.counters,
            cg.counters(),
            &self.events,
            &self.sandbox_id,
            command,
            session_id,
        )
    }
}

/// Pumps a command's pipes into `tx` until it exits, enforcing the deadline.
pub(super) async fn drive(
    env: Arc<Env>,
    mut r: Running,
    timeout: Duration,
    tx: mpsc::Sender<Result<ExecEvent>>,
    command: String,
) {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut out_chunker = Utf8Chunker::default();
    let mut err_chunker = Utf8Chunker::default();
    let (mut out_open, mut err_open) = (true, true);
    let mut exit: Option<i32> = None;
    let mut pgid: Option<i32> = None;
    let mut timed_out = false;
    let mut grace: Option<tokio::time::Instant> = None;
    let mut obuf = vec![0u8; 16 * 1024];
    let mut ebuf = vec![0u8; 16 * 1024];
    let far = deadline + Duration::from_secs(86_400 * 365);
    let kill = |env: Arc<Env>, id: u64| async move {
        let _ = env
            .chan
            .send(
                &Request::Signal {
                    id,
                    signal: libc::SIGKILL,
                },
                &[],
            )
            .await;
    };
    let result: Result<i32> = loop {
        if exit.is_some() && !out_open && !err_open {
            break Ok(exit.unwrap_or(0));
        }
        let ev = tokio::select! {
            n = r.stdout.read(&mut obuf), if out_open => match n {
                Ok(n) if n > 0 => Some(ExecEvent::Stdout(out_chunker.push(&obuf[..n]))),
                _ => { out_open = false; let t = out_chunker.finish(); (!t.is_empty()).then_some(ExecEvent::Stdout(t)) }
            },
            n = r.stderr.read(&mut ebuf), if err_open => match n {
                Ok(n) if n > 0 => Some(ExecEvent::Stderr(err_chunker.push(&ebuf[..n]))),
                _ => { err_open = false; let t = err_chunker.finish(); (!t.is_empty()).then_some(ExecEvent::Stderr(t)) }
            },
            msg = r.rx.recv(), if exit.is_none() => match msg {
                Some((Reply::Exited { code, pid, .. }, _)) => {
                    exit = Some(code);
                    pgid = Some(pid);
                    grace = Some(tokio::time::Instant::now() + OUTPUT_GRACE);
                    if timed_out {
                        break Err(RuntimeError::Timeout { timeout, stdout: String::new(), stderr: String::new() });
                    }
                    None
                }
                Some((Reply::SpawnFailed { step, errno, .. }, _)) => break Err(setup_error(step, errno)),
                Some((Reply::Failed { message, .. }, _)) => break Err(RuntimeError::CommandSetup { step: "exec".into(), message, errno: 0 }),
                Some(_) => None,
                None => break Err(RuntimeError::NotRunning { sandbox_id: env.sandbox_id.clone() }),
            },
            _ = tokio::time::sleep_until(if timed_out { deadline + KILL_GRACE } else { deadline }), if exit.is_none() => {
                if timed_out {
                    break Err(RuntimeError::Timeout { timeout, stdout: String::new(), stderr: String::new() });
                }
                timed_out = true;
                // Kill the command's whole tree: its cgroup (which also catches processes that
                // left its session), and its process group (the only handle without cgroup v2).
                if let Some(cg) = &r.cgroup {
                    cg.kill();
                }
                kill(env.clone(), r.id).await;
                None
            },
            _ = tx.closed(), if exit.is_none() => {
                // The stream was dropped (client gone): kill the command now rather than at its
                // deadline.
                if let Some(cg) = &r.cgroup {
                    cg.kill();
                }
                kill(env.clone(), r.id).await;
                break Err(consumer_gone());
            },
            _ = tokio::time::sleep_until(grace.unwrap_or(far)), if grace.is_some() => {
                // Something in the background keeps the pipes open: take what is buffered.
                let mut tail = Vec::new();
                for (open, rx, chunker, is_out) in [
                    (&mut out_open, &r.stdout, &mut out_chunker, true),
                    (&mut err_open, &r.stderr, &mut err_chunker, false),
                ] {
                    if *open {
                        let mut buf = vec![0u8; 64 * 1024];
                        let mut text = String::new();
                        while let Ok(n) = rx.try_read(&mut buf) {
                            if n == 0 { break; }
                            text.push_str(&chunker.push(&buf[..n]));
                        }
                        text.push_str(&chunker.finish());
                        *open = false;
                        if !text.is_empty() {
                            tail.push(if is_out { ExecEvent::Stdout(text) } else { ExecEvent::Stderr(text) });
                        }
                    }
                }
                let mut gone = false;
                for ev in tail {
                    if tx.send(Ok(ev)).await.is_err() { gone = true; }
                }
                if gone { break Ok(exit.unwrap_or(0)); }
                None
            },
        };
        if let Some(ev) = ev {
            match deliver(&tx, ev, deadline).await {
                Delivery::Sent => {}
                Delivery::ConsumerGone => {
                    // The consumer went away: kill the command.
                    if let Some(cg) = &r.cgroup {
                        cg.kill();
                    }
                    kill(env.clone(), r.id).await;
                    break Err(consumer_gone());
                }
                Delivery::PastDeadline => {
                    // Blocked on a slow consumer past the deadline.
                    kill(env.clone(), r.id).await;
                    timed_out = true;
                }
            }
        }
    };
    env.chan.unregister(r.id);
    if matches!(result, Err(RuntimeError::Timeout { .. }))
        && let Some(cg) = &r.cgroup
    {
        // Answer once the tree is really gone (SIGKILL delivery is asynchronous).
        cg.wait_empty(Duration::from_millis(300)).await;
    }
    let hits = env.check_limits(&command, None);
    if hits.contains(&LimitKind::Pids) {
        // A command that exhausted the pids limit (a fork bomb) must not keep the sandbox
        // unusable: whatever it left behind goes.
        if let Some(cg) = &r.cgroup {
            cg.kill();
        }
        if let Some(pgid) = pgid {
            let _ = env.chan.send(&Request::KillGroup { pgid }, &[]).await;
        }
    }
    if let Some(cg) = &r.cgroup {
        cg.remove_if_empty();
    }
    match &result {
        Ok(code) => {
            tracing::debug!(sandbox_id = %env.sandbox_id, exec_id = r.id, exit_code = code, elapsed = ?r.started.elapsed(), "command finished")
        }
        Err(e) => {
            tracing::debug!(sandbox_id = %env.sandbox_id, exec_id = r.id, error = %e, "command failed")
        }
    }
    let last = match result {
        Ok(exit_code) => Ok(ExecEvent::Exit {
            exit_code,
            duration: r.started.elapsed(),
        }),
        Err(e) => Err(e),
    };
    let _ = tx.send(last).await;
}
