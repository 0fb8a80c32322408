//! Interactive programs on a terminal: the caller allocates a pty pair on the host and hands
//! the slave over; the program gets it as stdin, stdout, stderr and controlling terminal, so
//! line editing, job control and window-size changes are the kernel's business. The caller
//! owns the master and proxies bytes; the runtime never sees the data.

use std::os::fd::BorrowedFd;

use super::*;

/// A program running on a terminal inside a sandbox (from [`BwrapRuntime::exec_tty`]).
///
/// Dropping it before [`TtyProcess::wait`] has returned kills the program and everything it
/// started.
#[derive(Debug)]
pub struct TtyProcess {
    env: Arc<Env>,
    id: u64,
    rx: mpsc::UnboundedReceiver<Incoming>,
    cgroup: Option<ExecCgroup>,
    deadline: Option<(tokio::time::Instant, Duration)>,
    program: String,
    /// The exit code, once [`TtyProcess::wait`] has seen it.
    exit: Option<i32>,
    /// Cleaned up after an exit or a failure: nothing left for `Drop`.
    finished: bool,
}

impl BwrapRuntime {
    /// Starts `req.argv` with the terminal `tty` (the slave side of a pty pair the caller
    /// opened with `O_NOCTTY`) as its stdin, stdout, stderr and controlling terminal, as the
    /// sandbox user in a new session with the usual hardening and its own cgroup.
    ///
    /// The caller keeps the master: it proxies the bytes and forwards window-size changes
    /// (`TIOCSWINSZ` on the master makes the kernel send `SIGWINCH` to the foreground job).
    /// Only the slave ever enters the sandbox: a terminal that is the caller's own controlling
    /// terminal (the user's real terminal) is refused, and the kernel would refuse to make a
    /// terminal that controls another session the program's controlling terminal anyway.
    ///
    /// Start failures (e.g. a missing program) are reported by [`TtyProcess::wait`].
    pub async fn exec_tty(
        &self,
        sandbox_id: &str,
        req: TtyRequest,
        tty: BorrowedFd<'_>,
    ) -> Result<TtyProcess> {
        let env = self.running(sandbox_id).await?;
        let cwd = resolve_workdir_in(&env.root, &req.workdir)?;
        validate_argv(&req.argv)?;
        if !nix::unistd::isatty(tty).unwrap_or(false) {
            return Err(RuntimeError::invalid("the tty fd is not a terminal"));
        }
        if nix::sys::termios::tcgetsid(tty).is_ok() {
            return Err(RuntimeError::invalid(
                "refusing to hand the caller's own controlling terminal to a sandbox: pass the \
                 slave of a fresh pty pair",
            ));
        }
        let envv = build_env(&env.user, &req.env, &[])?;
        let deadline = req
            .timeout
            .filter(|d| !d.is_zero())
            .map(|t| t.min(self.cfg.max_timeout))
            .map(|t| (tokio::time::Instant::now() + t, t));
        let program = req.argv.join(" ");

        let id = env.next_id.fetch_add(1, Ordering::SeqCst);
        let mut cgroup = env.child_cgroup(&format!("t{id}"))?;
        let cg_dir = cgroup.as_mut().and_then(|c| c.take_handle());
        let raw = tty.as_raw_fd();
        let mut fds = vec![raw, raw, raw];
        fds.extend(cg_dir.as_ref().map(|f| f.as_raw_fd()));
        let rx = env.chan.register(id);
        let sent = env
            .chan
            .send(
                &Request::Exec {
                    id,
                    argv: req.argv,
                    env: envv,
                    cwd,
                    tty: true,
                },
                &fds,
            )
            .await;
        drop(cg_dir);
        if let Err(e) = sent {
            env.chan.unregister(id);
            if let Some(c) = &cgroup {
                c.remove_if_empty();
            }
            return Err(e);
        }
        tracing::debug!(sandbox_id = %env.sandbox_id, exec_id = id, %program, "tty program started");
        Ok(TtyProcess {
            env,
            id,
            rx,
            cgroup,
            deadline,
            program,
            exit: None,
            finished: false,
        })
    }
}

/// `argv[0]` must be an absolute path (the init execs it without a `PATH` search).
fn validate_argv(argv: &[String]) -> Result<()> {
    let Some(prog) = argv.first() else {
        return Err(RuntimeError::invalid("argv must not be empty"));
    };
    if !prog.starts_with('/') {
        return Err(RuntimeError::invalid(format!(
            "program {prog:?} must be an absolute path"
        )));
    }
    if argv.iter().any(|a| a.contains('\0')) {
        return Err(RuntimeError::invalid("argv must contain no NUL byte"));
    }
    if argv.iter().map(|a| a.len() + 1).sum::<usize>() > MAX_COMMAND {
        return Err(RuntimeError::invalid("argv must be at most 128 KiB"));
    }
    Ok(())
}

impl TtyProcess {
    /// Waits for the program to exit and returns its exit code (`128 + signal` when killed
    /// by a signal). Whatever it left running (background jobs) is killed then. Past the
    /// deadline the program is killed and [`RuntimeError::Timeout`] returned. Cancel-safe;
    /// after an `Ok` it returns the same code again.
    pub async fn wait(&mut self) -> Result<i32> {
        if let Some(code) = self.exit {
            return Ok(code);
        }
        loop {
            let msg = match self.deadline {
                None => self.rx.recv().await,
                Some((at, timeout)) => match tokio::time::timeout_at(at, self.rx.recv()).await {
                    Ok(m) => m,
                    Err(_) => {
                        self.kill().await;
                        // Collect the exit report, so the init's bookkeeping is done.
                        let _ = tokio::time::timeout(KILL_GRACE, self.rx.recv()).await;
                        self.finish(None).await;
                        return Err(RuntimeError::Timeout {
                            timeout,
                            stdout: String::new(),
                            stderr: String::new(),
                        });
                    }
                },
            };
            match msg {
                Some((Reply::Exited { code, pid, .. }, _)) => {
                    self.finish(Some(pid)).await;
                    self.exit = Some(code);
                    tracing::debug!(sandbox_id = %self.env.sandbox_id, exec_id = self.id, exit_code = code, "tty program finished");
                    return Ok(code);
                }
                Some((Reply::SpawnFailed { step, errno, .. }, _)) => {
                    self.finish(None).await;
                    return Err(setup_error(step, errno));
                }
                Some((Reply::Failed { message, .. }, _)) => {
                    self.finish(None).await;
                    return Err(RuntimeError::CommandSetup {
                        step: "exec".into(),
                        message,
                        errno: 0,
                    });
                }
                Some(_) => {}
                None => {
                    self.finish(None).await;
                    return Err(RuntimeError::NotRunning {
                        sandbox_id: self.env.sandbox_id.clone(),
                    });
                }
            }
        }
    }

    /// SIGKILLs the program's tree: its cgroup and its process group.
    async fn kill(&self) {
        if let Some(cg) = &self.cgroup {
            cg.kill();
        }
        let _ = self
            .env
            .chan
            .send(
                &Request::Signal {
                    id: self.id,
                    signal: libc::SIGKILL,
                },
                &[],
            )
            .await;
    }

    /// After the program is gone: kill its leftovers, report limit hits, drop the cgroup.
    async fn finish(&mut self, pgid: Option<i32>) {
        self.finished = true;
        self.env.chan.unregister(self.id);
        if let Some(cg) = &self.cgroup {
            cg.kill();
        }
        if let Some(pgid) = pgid {
            let _ = self.env.chan.send(&Request::KillGroup { pgid }, &[]).await;
        }
        self.env.check_limits(&self.program, None);
        if let Some(cg) = self.cgroup.take() {
            cg.wait_empty(Duration::from_millis(300)).await;
            cg.remove_if_empty();
        }
    }
}

impl Drop for TtyProcess {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if let Some(cg) = self.cgroup.take() {
            cg.kill();
            cg.remove_if_empty();
        }
        self.signal_kill_detached();
    }
}

impl TtyProcess {
    /// Best effort from `Drop`: SIGKILL the process group through the init.
    fn signal_kill_detached(&self) {
        self.env.chan.unregister(self.id);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let env = self.env.clone();
            let id = self.id;
            handle.spawn(async move {
                let req = Request::Signal {
                    id,
                    signal: libc::SIGKILL,
                };
                let _ = env.chan.send(&req, &[]).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv_is_validated() {
        assert!(validate_argv(&["/bin/bash".into(), "-i".into()]).is_ok());
        for bad in [
            vec![],
            vec!["bash".to_owned()],
            vec!["/bin/sh".to_owned(), "a\0b".to_owned()],
            vec!["/bin/sh".to_owned(), "x".repeat(MAX_COMMAND)],
        ] {
            assert!(
                matches!(
                    validate_argv(&bad),
                    Err(RuntimeError::InvalidArgument { .. })
                ),
                "{bad:?}"
            );
        }
    }
}
