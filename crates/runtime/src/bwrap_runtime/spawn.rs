//! Starting a sandbox's environment (bwrap, its user namespace, cgroups, the init) and
//! shutting it down.

use super::*;

impl BwrapRuntime {
    pub(super) async fn spawn_env(&self, sandbox_id: &str, spec: &SandboxSpec) -> Result<Env> {
        // Bound from a path that reveals nothing in the sandbox's mountinfo; from the state
        // directory only when the shared one cannot be written.
        let etc = shared_etc(&self.cfg.shared_dir, &self.cfg.user, &self.cfg.hostname)
            .or_else(|_| shared_etc(&self.cfg.state_dir, &self.cfg.user, &self.cfg.hostname))
            .map_err(|(path, source)| RuntimeError::PrepareState { path, source })?;
        let init = shared_init(&self.cfg.shared_dir, &self.cfg.init_path);

        let lease = self.lease(sandbox_id);
        let cgroup = match &self.cfg.cgroups {
            Some(m) => {
                let mut cg = m.create(&cgroup_name(sandbox_id), &spec.limits)?;
                if let Some(l) = &lease
                    && let Err(e) = cg.delegate_to(l.base(), l.base())
                {
                    let _ = cg.destroy().await;
                    return Err(e);
                }
                Some(cg)
            }
            None => None,
        };
        self.spawn_env_in(sandbox_id, spec, &init, &etc, cgroup, lease.as_deref())
            .await
    }

    pub(super) async fn spawn_env_in(
        &self,
        sandbox_id: &str,
        spec: &SandboxSpec,
        init: &Path,
        etc: &Path,
        cgroup: Option<SandboxCgroup>,
        lease: Option<&IdLease>,
    ) -> Result<Env> {
        let fail = |cgroup: Option<SandboxCgroup>, err: RuntimeError| async move {
            if let Some(cg) = cgroup {
                let _ = cg.destroy().await;
            }
            Err(err)
        };
        let (host_sock, child_sock) = match socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        ) {
            Ok(p) => p,
            Err(e) => {
                return fail(
                    cgroup,
                    RuntimeError::Io {
                        op: "socketpair",
                        source: e.into(),
                    },
                )
                .await;
            }
        };
        // The init's end must block (it is a plain poll loop).
        if let Err(e) = set_blocking(&child_sock) {
            return fail(
                cgroup,
                RuntimeError::Io {
                    op: "fcntl",
                    source: e,
                },
            )
            .await;
        }
        let staging = match lease
            .map(|_| Staging::new(&spec.workspace, init, etc, spec.home.as_deref(), &self.host))
            .transpose()
        {
            Ok(u) => u,
            Err(source) => {
                return fail(
                    cgroup,
                    RuntimeError::Io {
                        op: "preparing the user namespace",
                        source,
                    },
                )
                .await;
            }
        };
        let (workspace, init_path, etc_dir) = match &staging {
            Some(_) => Staging::paths(),
            None => (
                spec.workspace.clone(),
                init.to_path_buf(),
                etc.to_path_buf(),
            ),
        };
        let opts = BwrapOptions {
            init_path,
            workspace,
            workspace_path: spec.workspace_path.clone(),
            home: match (&staging, &spec.home) {
                (Some(_), Some(_)) => Some(Staging::home_path().into()),
                (None, h) => h.clone(),
                (Some(_), None) => None,
            },
            home_path: self.cfg.user.home.clone(),
            etc_dir,
            network: spec.network,
            tmp_size: spec.tmp_size.unwrap_or(self.cfg.tmp_size),
            // Not counted against a disk quota (memory, bounded by the memory limit): it keeps
            // the runtime's size whatever the quota.
            shm_size: self.cfg.tmp_size,
            hostname: self.cfg.hostname.clone(),
            control_fd: child_sock.as_raw_fd(),
            userns: staging.as_ref().map(Staging::for_bwrap),
        };
        let args = bwrap_args(&opts, &self.host);
        // Open the cgroup.procs files now: the child only writes to them (no allocation or
        // path lookup between fork and exec).
        let mut procs: Vec<std::fs::File> = Vec::new();
        if let Some(cg) = &cgroup {
            for p in cg.procs_files() {
                match std::fs::OpenOptions::new().write(true).open(&p) {
                    Ok(f) => procs.push(f),
                    Err(source) => {
                        return fail(
                            cgroup,
                            RuntimeError::Cgroup {
                                op: "open",
                                path: p,
                                source,
                            },
                        )
                        .await;
                    }
                }
            }
        }
        let proc_fds: Vec<RawFd> = procs.iter().map(|f| f.as_raw_fd()).collect();
        let ctl_fd = child_sock.as_raw_fd();
        let inherit = staging.as_ref().map(Staging::inherited).unwrap_or_default();
        let stage = staging.as_ref().map(Staging::root);
        // With a user namespace bwrap runs as the block's first uid (root inside) from the
        // start: nothing of the sandbox ever holds a capability in the host's namespace.
        let run_as = lease.map(IdLease::base);
        let nofile = self.cfg.sandbox_nofile.map(|(soft, hard)| libc::rlimit {
            rlim_cur: soft,
            rlim_max: hard,
        });
        let mut cmd = tokio::process::Command::new(&self.cfg.bwrap_path);
        cmd.args(&args)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // SAFETY: the closure runs between fork and exec; it only calls async-signal-safe
        // syscalls (write, fcntl, close_range, setrlimit, unshare, mount, mkdir, open, the
        // set*id calls) on fds and strings prepared before the fork, and allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                // Join every cgroup before exec, so nothing of the sandbox ever runs outside.
                for fd in &proc_fds {
                    if libc::write(*fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // Only stdio and the control socket reach bwrap (and so the sandbox): any
                // descriptor of the server that is not close-on-exec is made so here.
                if libc::close_range(3, u32::MAX, libc::CLOSE_RANGE_CLOEXEC as libc::c_int) != 0 {
                    // Linux < 5.11: one descriptor at a time (EBADF for unused numbers), up to
                    // the highest number this process may have open.
                    let mut lim = libc::rlimit {
                        rlim_cur: 0,
                        rlim_max: 0,
                    };
                    let top = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
                        libc::c_int::try_from(lim.rlim_cur).unwrap_or(libc::c_int::MAX)
                    } else {
                        1 << 20
                    };
                    for fd in 3..top {
                        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                    }
                }
                // The server's own descriptor limit is raised for its FUSE daemons; sandboxes
                // get the one it started with (after the loop above, which needs the raised one).
                if let Some(lim) = &nofile
                    && libc::setrlimit(libc::RLIMIT_NOFILE, lim) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                // Let the control socket (and the user namespace's descriptors) survive exec
                // (they were created close-on-exec so other concurrently spawned processes
                // never inherit them).
                for fd in std::iter::once(ctl_fd).chain(inherit.into_iter().filter(|&f| f > 0)) {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some(st) = &stage {
                    // SAFETY: this is the forked child, about to exec.
                    st.enter()?;
                }
                if let Some(id) = run_as
                    && (libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setresgid(id, id, id) != 0
                        || libc::setresuid(id, id, id) != 0)
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let started = Instant::now();
        // `--die-with-parent` is tied to the spawning *thread*: this runs on a runtime worker
        // thread (never spawn_blocking, whose threads exit when idle). The init also exits when
        // the control socket closes, so a dead server never leaves a sandbox behind.
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(source) => {
                return fail(
                    cgroup,
                    RuntimeError::SpawnBwrap {
                        bwrap: self.cfg.bwrap_path.clone(),
                        source,
                    },
                )
                .await;
            }
        };
        drop(child_sock);
        drop(procs);
        if let (Some(fds), Some(lease)) = (staging, lease)
            && let Err(source) = fds.map_ids(lease, self.cfg.start_timeout).await
        {
            let _ = child.kill().await;
            return fail(
                cgroup,
                RuntimeError::Io {
                    op: "mapping the sandbox's user namespace",
                    source,
                },
            )
            .await;
        }

        let stderr_log = Arc::new(StdMutex::new(String::new()));
        if let Some(mut err) = child.stderr.take() {
            let log = stderr_log.clone();
            let id = sandbox_id.to_owned();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while let Ok(n) = err.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    tracing::warn!(sandbox_id = %id, stderr = %text.trim_end(), "sandbox environment stderr");
                    if let Ok(mut l) = log.lock()
                        && l.len() < 64 * 1024
                    {
                        l.push_str(&text);
                    }
                }
            });
        }

        // SAFETY: `host_sock` is an OwnedFd moved into the AsyncFd: it stays open and refers to
        // the same socket until the AsyncFd is dropped.
        let sock = match unsafe { AsyncFd::register(host_sock) } {
            Ok(s) => s,
            Err(e) => {
                let source = std::io::Error::other(e.to_string());
                return fail(
                    cgroup,
                    RuntimeError::Io {
                        op: "register control socket",
                        source,
                    },
                )
                .await;
            }
        };
        let chan = Arc::new(Channel {
            sandbox_id: sandbox_id.to_owned(),
            sock,
            pending: StdMutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
        });
        let mut ready = chan.register(0);
        tokio::spawn(chan.clone().read_loop());
        let mut writable = vec![
            WORKSPACE.to_owned(),
            "/tmp".to_owned(),
            CHANNEL_DIR.to_owned(),
        ];
        writable.extend(WRITABLE_DEVICES.iter().map(|d| (*d).to_owned()));
        if !self.cfg.user.home.starts_with("/tmp/") {
            writable.push(self.cfg.user.home.clone());
        }
        let config = Request::Configure(InitConfig {
            uid: self.cfg.user.uid,
            gid: self.cfg.user.gid,
            home: self.cfg.user.home.clone(),
            writable,
            seccomp: self.cfg.seccomp,
            landlock: self.cfg.landlock,
        });
        let sent = chan.send(&config, &[]).await;
        let outcome = match sent {
            Ok(()) => tokio::time::timeout(self.cfg.start_timeout, ready.recv()).await,
            Err(_) => Ok(None),
        };
        chan.unregister(0);
        let landlock_status = match outcome {
            Ok(Some((Reply::Ready { landlock }, _))) => {
                tracing::info!(sandbox_id, landlock, elapsed = ?started.elapsed(), "sandbox environment ready");
                landlock
            }
            Ok(_) => {
                // The init died (or bwrap failed before running it): report bwrap in full.
                let status = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
                let stderr = stderr_log.lock().map(|s| s.clone()).unwrap_or_default();
                let err = match status {
                    Ok(Ok(status)) => RuntimeError::BwrapFailed {
                        status,
                        stdout: String::new(),
                        stderr,
                    },
                    _ => {
                        let _ = child.kill().await;
                        RuntimeError::StartTimeout {
                            timeout: self.cfg.start_timeout,
                            stderr,
                        }
                    }
                };
                return fail(cgroup, err).await;
            }
            Err(_) => {
                let _ = child.kill().await;
                let stderr = stderr_log.lock().map(|s| s.clone()).unwrap_or_default();
                return fail(
                    cgroup,
                    RuntimeError::StartTimeout {
                        timeout: self.cfg.start_timeout,
                        stderr,
                    },
                )
                .await;
            }
        };
        // The sandbox's /tmp (with $HOME), seen through its init, for disk quotas; and its
        // own network namespace, for the egress proxy.
        let init = child.id().and_then(|bwrap| {
            let children =
                std::fs::read_to_string(format!("/proc/{bwrap}/task/{bwrap}/children")).ok()?;
            children.split_whitespace().next().map(str::to_owned)
        });
        let scratch = init.as_ref().and_then(|init| {
            rustix::fs::open(
                format!("/proc/{init}/root/tmp"),
                rustix::fs::OFlags::PATH
                    | rustix::fs::OFlags::DIRECTORY
                    | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
            .ok()
        });
        if let (Some(fd), Ok(mut m)) = (scratch, self.scratch.lock()) {
            m.insert(sandbox_id.to_owned(), Arc::new(fd));
        }
        let netns = init
            .as_ref()
            .filter(|_| spec.network == NetworkMode::None)
            .and_then(|init| {
                rustix::fs::open(
                    format!("/proc/{init}/ns/net"),
                    rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
                    rustix::fs::Mode::empty(),
                )
                .ok()
            });
        if let (Some(fd), Ok(mut m)) = (netns, self.netns.lock()) {
            m.insert(sandbox_id.to_owned(), Arc::new(fd));
        }
        let counters = cgroup.as_ref().map(|c| c.counters()).unwrap_or_default();
        Ok(Env {
            sandbox_id: sandbox_id.to_owned(),
            chan,
            child: Mutex::new(Some(child)),
            cgroup,
            counters: StdMutex::new(counters),
            sessions: StdMutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            landlock: landlock_status,
            start_duration: started.elapsed(),
            user: self.cfg.user.clone(),
            events: self.events.clone(),
            root: spec
                .workspace_path
                .clone()
                .unwrap_or_else(|| WORKSPACE.to_owned()),
        })
    }
}

/// Kills everything of a running environment and removes its cgroups.
pub(super) async fn shutdown_env(env: Arc<Env>) {
    let sessions: Vec<Arc<Session>> = env
        .sessions
        .lock()
        .map(|mut m| m.drain().map(|(_, s)| s).collect())
        .unwrap_or_default();
    for s in sessions {
        let _ = s.closed_tx.send(true);
    }
    let _ = env.chan.send(&Request::Shutdown, &[]).await;
    let child = env.child.lock().await.take();
    if let Some(mut child) = child
        && tokio::time::timeout(Duration::from_secs(2), child.wait())
            .await
            .is_err()
    {
        let _ = child.kill().await;
    }
    if let Some(cg) = &env.cgroup {
        cg.kill_all();
    }
    // Env may still be referenced by in-flight calls; take the cgroup out when we are last.
    match Arc::try_unwrap(env) {
        Ok(env) => {
            if let Some(cg) = env.cgroup
                && let Err(e) = cg.destroy().await
            {
                tracing::warn!(error = %e, "removing sandbox cgroup failed");
            }
        }
        Err(env) => {
            // In-flight calls fail with NotRunning as the channel closed; retry the removal in
            // the background once they let go.
            tokio::spawn(async move {
                let mut env = env;
                for _ in 0..100 {
                    match Arc::try_unwrap(env) {
                        Ok(inner) => {
                            if let Some(cg) = inner.cgroup {
                                let _ = cg.destroy().await;
                            }
                            return;
                        }
                        Err(e) => env = e,
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                tracing::warn!(sandbox_id = %env.sandbox_id, "sandbox cgroup left behind: still referenced");
            });
        }
    }
}

pub(super) fn setup_error(step: String, errno: i32) -> RuntimeError {
    RuntimeError::CommandSetup {
        message: nix::errno::Errno::from_raw(errno).desc().to_owned(),
        step,
        errno,
    }
}

pub(super) fn check_executable(p: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let m = std::fs::metadata(p).map_err(|source| RuntimeError::MissingBinary {
        path: p.to_path_buf(),
        source,
    })?;
    if !m.is_file() || m.permissions().mode() & 0o111 == 0 {
        return Err(RuntimeError::MissingBinary {
            path: p.to_path_buf(),
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        });
    }
    Ok(())
}

pub(super) fn set_blocking(fd: &OwnedFd) -> std::io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK))?;
    Ok(())
}
