//! Persistent sessions: an interactive shell per session; each call sources a command file with
//! its own FIFOs for stdout, stderr and the exit status (no in-band markers).

use super::*;

/// A persistent shell.
#[derive(Debug)]
pub(super) struct Session {
    id: u64,
    cgroup: Option<ExecCgroup>,
    public_id: String,
    inner: Mutex<SessionInner>,
    /// Becomes true when the session is closed; stops the background drains.
    pub(super) closed_tx: watch::Sender<bool>,
}

#[derive(Debug)]
pub(super) struct SessionInner {
    seq: u64,
    rx: mpsc::UnboundedReceiver<Incoming>,
    exit_code: Option<i32>,
}

impl BwrapRuntime {
    pub(super) async fn do_session_create(
        &self,
        sandbox_id: &str,
        spec: SessionSpec,
    ) -> Result<String> {
        let env = self.running(sandbox_id).await?;
        let cwd = resolve_workdir_in(&env.root, &spec.workdir)?;
        let shell = if spec.shell.is_empty() {
            "/bin/sh".to_owned()
        } else {
            spec.shell.clone()
        };
        if shell.contains('\0') || shell.contains(char::is_whitespace) {
            return Err(RuntimeError::invalid("shell must be a single path"));
        }
        let base = shell.rsplit('/').next().unwrap_or(&shell);
        // Interactive, so an interrupt aborts the current command line and returns to the prompt
        // (the shell survives); prompts go to the shell's own stderr, which is /dev/null.
        let mut argv = vec![shell.clone()];
        if base.contains("bash") {
            argv.extend(["--noprofile".to_owned(), "--norc".to_owned()]);
        }
        argv.push("-i".to_owned());
        let envv = build_env(&env.user, &spec.env, &[("PS1", ""), ("PS2", "")])?;
        let id = env.next_id.fetch_add(1, Ordering::SeqCst);
        let mut cgroup = env.child_cgroup(&format!("s{id}"))?;
        let cg_dir = cgroup.as_mut().and_then(|c| c.take_handle());
        let fds: Vec<RawFd> = cg_dir.iter().map(|f| f.as_raw_fd()).collect();
        let mut rx = env.chan.register(id);
        let sent = env
            .chan
            .send(
                &Request::SessionOpen {
                    id,
                    argv,
                    env: envv,
                    cwd,
                },
                &fds,
            )
            .await;
        drop(cg_dir);
        if let Err(e) = sent {
            env.chan.unregister(id);
            return Err(e);
        }
        let reply = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
        match reply {
            Ok(Some((Reply::Started { .. }, _))) => {}
            Ok(Some((Reply::SpawnFailed { step, errno, .. }, _))) => {
                env.chan.unregister(id);
                return Err(setup_error(step, errno));
            }
            Ok(Some((Reply::Failed { message, .. }, _))) => {
                env.chan.unregister(id);
                return Err(RuntimeError::CommandSetup {
                    step: "session".into(),
                    message,
                    errno: 0,
                });
            }
            _ => {
                env.chan.unregister(id);
                return Err(RuntimeError::NotRunning {
                    sandbox_id: sandbox_id.to_owned(),
                });
            }
        }
        let public_id = new_session_id();
        let (closed_tx, _) = watch::channel(false);
        let s = Arc::new(Session {
            id,
            cgroup,
            public_id: public_id.clone(),
            inner: Mutex::new(SessionInner {
                seq: 0,
                rx,
                exit_code: None,
            }),
            closed_tx,
        });
        if let Ok(mut m) = env.sessions.lock() {
            m.insert(public_id.clone(), s);
        }
        Ok(public_id)
    }

    pub(super) fn session(env: &Env, session_id: &str) -> Result<Arc<Session>> {
        crate::find_session(&env.sessions, session_id)
    }

    pub(super) async fn do_session_exec(
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

    /// Like [`BwrapRuntime::do_session_exec`], with the output streamed as the command
    /// produces it; the last item is the exit (or the error that ended the call).
    pub(super) async fn do_session_exec_stream(
        &self,
        sandbox_id: &str,
        session_id: &str,
        command: &str,
        timeout: Option<Duration>,
    ) -> Result<ExecStream> {
        let call = self
            .session_call(sandbox_id, session_id, command, timeout)
            .await?;
        Ok(crate::runtime::stream_call(|tx| call.run(Some(tx))))
    }

    /// Checks a session call and gathers what running it needs.
    async fn session_call(
        &self,
        sandbox_id: &str,
        session_id: &str,
        command: &str,
        timeout: Option<Duration>,
    ) -> Result<SessionCall> {
        let env = self.running(sandbox_id).await?;
        let session = Self::session(&env, session_id)?;
        check_command(command)?;
        Ok(SessionCall {
            env,
            session,
            sandbox_id: sandbox_id.to_owned(),
            session_id: session_id.to_owned(),
            command: command.to_owned(),
            timeout: self.timeout(timeout),
            output_cap: self.cfg.output_cap,
        })
    }

    pub(super) async fn do_session_destroy(
        &self,
        sandbox_id: &str,
        session_id: &str,
    ) -> Result<()> {
        let env = self.running(sandbox_id).await?;
        let s = Self::session(&env, session_id)?;
        if let Ok(mut m) = env.sessions.lock() {
            m.remove(session_id);
        }
        close_session(&env, &s).await;
        Ok(())
    }
}

pub(super) async fn close_session(env: &Env, s: &Session) {
    let _ = s.closed_tx.send(true);
    if let Some(cg) = &s.cgroup {
        cg.kill();
    }
    let _ = env
        .chan
        .send(&Request::SessionClose { id: s.id }, &[])
        .await;
    // Wait briefly for the shell's exit report so the caller sees it gone.
    if let Ok(mut inner) = tokio::time::timeout(Duration::from_secs(1), s.inner.lock()).await
        && inner.exit_code.is_none()
    {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while let Some((reply, _)) = inner.rx.recv().await {
                if let Reply::Exited { code, .. } = reply {
                    inner.exit_code = Some(code);
                    break;
                }
            }
        })
        .await;
    }
    env.chan.unregister(s.id);
    if let Some(cg) = &s.cgroup {
        cg.remove_if_empty();
    }
    tracing::debug!(sandbox_id = %env.sandbox_id, session_id = %s.public_id, "session closed");
}

/// One command in a session, ready to run (see [`SessionCall::run`]).
pub(super) struct SessionCall {
    env: Arc<Env>,
    session: Arc<Session>,
    sandbox_id: String,
    session_id: String,
    command: String,
    timeout: Duration,
    output_cap: usize,
}

impl SessionCall {
    /// Runs the command in the session's shell; with `sink`, its output is also sent there as
    /// it comes (and the call is interrupted if the receiver goes away).
    async fn run(self, sink: Option<mpsc::Sender<Result<ExecEvent>>>) -> Result<ExecResult> {
        let SessionCall {
            env,
            session: s,
            sandbox_id,
            session_id,
            command,
            timeout,
            output_cap: cap,
        } = self;
        let (sandbox_id, session_id, command) = (&sandbox_id, &session_id, command.as_str());
        let started = Instant::now();
        let closed = || RuntimeError::SessionClosed {
            session_id: session_id.clone(),
        };
        let mut inner = s.inner.lock().await;
        // Anything that arrived between calls (the shell died, e.g. killed by the OOM killer).
        while let Ok((reply, _)) = inner.rx.try_recv() {
            if let Reply::Exited { code, .. } = reply {
                inner.exit_code = Some(code);
            }
        }
        if inner.exit_code.is_some() || *s.closed_tx.borrow() {
            let _ = s.closed_tx.send(true);
            return Err(closed());
        }
        inner.seq += 1;
        let seq = inner.seq;
        env.chan
            .send(
                &Request::SessionExec {
                    id: s.id,
                    seq,
                    command: command.to_owned(),
                },
                &[],
            )
            .await?;
        let fds = loop {
            match tokio::time::timeout(Duration::from_secs(10), inner.rx.recv()).await {
                Ok(Some((Reply::SessionFifos { seq: got, .. }, fds))) if got == seq => break fds,
                Ok(Some((Reply::SessionFifos { .. }, _))) => continue,
                Ok(Some((Reply::Exited { code, .. }, _))) => {
                    inner.exit_code = Some(code);
                    let _ = s.closed_tx.send(true);
                    return Err(closed());
                }
                Ok(Some((Reply::Failed { message, .. }, _))) => {
                    return Err(RuntimeError::CommandSetup {
                        step: "session".into(),
                        message,
                        errno: 0,
                    });
                }
                Ok(Some(_)) => continue,
                Ok(None) => {
                    return Err(RuntimeError::NotRunning {
                        sandbox_id: sandbox_id.to_owned(),
                    });
                }
                Err(_) => {
                    return Err(RuntimeError::CommandSetup {
                        step: "session".into(),
                        message: "no answer from the sandbox init".into(),
                        errno: 0,
                    });
                }
            }
        };
        let [out, err, status]: [OwnedFd; 3] =
            fds.try_into().map_err(|_| RuntimeError::CommandSetup {
                step: "session".into(),
                message: "expected three FIFOs".into(),
                errno: 0,
            })?;
        let tee = |wrap: fn(String) -> ExecEvent| sink.clone().map(|tx| Tee { tx, wrap });
        let out = Collector::spawn(out, cap, s.closed_tx.subscribe(), tee(ExecEvent::Stdout))?;
        let err = Collector::spawn(err, cap, s.closed_tx.subscribe(), tee(ExecEvent::Stderr))?;
        let status = Collector::spawn(status, 64, s.closed_tx.subscribe(), None)?;
        let consumer_gone = async {
            match &sink {
                Some(tx) => tx.closed().await,
                None => std::future::pending().await,
            }
        };
        let deadline = tokio::time::Instant::now() + timeout;

        let code = tokio::select! {
            _ = status.eof() => {
                let text = status.take().0;
                text.trim().parse::<i32>().ok()
            }
            msg = inner.rx.recv() => {
                match msg {
                    Some((Reply::Exited { code, .. }, _)) => {
                        // `exit` (or a kill) ended the shell; this call's result is its status.
                        inner.exit_code = Some(code);
                        Some(code)
                    }
                    _ => None,
                }
            }
            _ = consumer_gone => {
                // Nobody reads the output any more: stop the foreground command, as a timeout
                // would; the session stays usable.
                let _ = env.chan.send(&Request::Signal { id: s.id, signal: libc::SIGINT }, &[]).await;
                return Err(crate::runtime::consumer_gone());
            }
            _ = tokio::time::sleep_until(deadline) => {
                // Interrupt the foreground command only: the interactive shell returns to its
                // prompt; background jobs ignore SIGINT (no job control).
                let _ = env.chan.send(&Request::Signal { id: s.id, signal: libc::SIGINT }, &[]).await;
                let _ = env.check_limits(command, Some(session_id));
                let (stdout, _) = out.take();
                let (stderr, _) = err.take();
                return Err(RuntimeError::Timeout { timeout, stdout, stderr });
            }
        };
        out.eof_or(OUTPUT_GRACE).await;
        err.eof_or(OUTPUT_GRACE).await;
        let (stdout, stdout_truncated) = out.take();
        let (stderr, stderr_truncated) = err.take();
        let _ = env.check_limits(command, Some(session_id));
        if inner.exit_code.is_some() {
            // The shell ended (`exit`): nothing of the session may outlive it.
            let _ = s.closed_tx.send(true);
            if let Some(cg) = &s.cgroup {
                cg.kill();
            }
        }
        let Some(exit_code) = code else {
            return Err(RuntimeError::NotRunning {
                sandbox_id: sandbox_id.to_owned(),
            });
        };
        Ok(ExecResult {
            exit_code,
            stdout,
            stderr,
            stdout_truncated,
            stderr_truncated,
            duration: started.elapsed(),
        })
    }
}

/// Collects one FIFO of a session call in the background; keeps draining (discarding) after
/// the call returns so late writers (background jobs) never hit `SIGPIPE`, until end-of-file or
/// the session closes.
pub(super) struct Collector {
    buf: Arc<StdMutex<(CappedText, bool)>>,
    eof: watch::Receiver<bool>,
}

/// Where a streamed session call sends a FIFO's output as it comes, and as what.
pub(super) struct Tee {
    tx: mpsc::Sender<Result<ExecEvent>>,
    wrap: fn(String) -> ExecEvent,
}

impl Collector {
    /// Starts collecting `fd`. With `tee`, each chunk is also sent there while the call lasts
    /// (until [`Collector::take`]), in order and before the call's result; a slow receiver
    /// slows the reading (the writer blocks on the FIFO), a gone one stops the sending.
    pub(super) fn spawn(
        fd: OwnedFd,
        cap: usize,
        mut closed: watch::Receiver<bool>,
        mut tee: Option<Tee>,
    ) -> Result<Self> {
        let mut rx = pipe::Receiver::from_owned_fd(fd).map_err(|source| RuntimeError::Io {
            op: "register fifo",
            source,
        })?;
        let buf = Arc::new(StdMutex::new((CappedText::new(cap), true)));
        let (eof_tx, eof) = watch::channel(false);
        let b = buf.clone();
        tokio::spawn(async move {
            let mut chunker = Utf8Chunker::default();
            let mut data = vec![0u8; 16 * 1024];
            loop {
                let n = tokio::select! {
                    n = rx.read(&mut data) => n,
                    _ = closed.wait_for(|c| *c) => break,
                };
                let n = match n {
                    Ok(n) if n > 0 => n,
                    _ => break,
                };
                let text = chunker.push(&data[..n]);
                // A permit first (awaiting a slow receiver), then push and send under the
                // lock: nothing is sent after `take` ends the call.
                let permit = match &tee {
                    Some(t) if !text.is_empty() => t.tx.clone().reserve_owned().await.ok(),
                    _ => None,
                };
                if permit.is_none() && tee.as_ref().is_some_and(|t| t.tx.is_closed()) {
                    tee = None;
                }
                if let Ok(mut g) = b.lock()
                    && g.1
                {
                    g.0.push(&text);
                    if let (Some(p), Some(t)) = (permit, &tee) {
                        p.send(Ok((t.wrap)(text)));
                    }
                }
            }
            let text = chunker.finish();
            let permit = match &tee {
                Some(t) if !text.is_empty() => t.tx.clone().reserve_owned().await.ok(),
                _ => None,
            };
            if let Ok(mut g) = b.lock()
                && g.1
            {
                g.0.push(&text);
                if let (Some(p), Some(t)) = (permit, &tee) {
                    p.send(Ok((t.wrap)(text)));
                }
            }
            let _ = eof_tx.send(true);
        });
        Ok(Collector { buf, eof })
    }

    pub(super) async fn eof(&self) {
        let mut rx = self.eof.clone();
        let _ = rx.wait_for(|e| *e).await;
        // A closed watch (task ended) also means end of file.
    }

    pub(super) async fn eof_or(&self, grace: Duration) {
        let _ = tokio::time::timeout(grace, self.eof()).await;
    }

    /// Takes the text collected so far; later data is discarded.
    pub(super) fn take(&self) -> (String, bool) {
        match self.buf.lock() {
            Ok(mut g) => {
                g.1 = false;
                let t = std::mem::replace(&mut g.0, CappedText::new(0));
                t.finish()
            }
            Err(_) => (String::new(), false),
        }
    }
}

pub(super) fn new_session_id() -> String {
    let mut b = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    let n = u64::from_le_bytes(b)
        ^ (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0));
    format!("sess_{n:016x}")
}
