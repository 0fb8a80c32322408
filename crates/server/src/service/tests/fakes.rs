//! A fake runtime and a fake filesystem: the lifecycle without root, FUSE or processes.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentfense_fs::{AuditEvent, FsConfig, FsError, PublishMode, PublishReport};
use agentfense_runtime::{
    BoxFuture, ExecEvent, ExecRequest, ExecResult, ExecStream, Result, Runtime, RuntimeError,
    SandboxSpec, SessionSpec,
};

use crate::service::mounter::{Mounted, Mounter};

/// A runtime that keeps each sandbox's state in memory and runs nothing: a command's stdout
/// is `ran: <command>`. Records every call.
#[derive(Default)]
pub(crate) struct FakeRuntime {
    /// Sandbox id → running?
    sandboxes: Mutex<HashMap<String, bool>>,
    /// "create sb_…", "start sb_…", …
    pub(crate) calls: Mutex<Vec<String>>,
    /// The next starts fail.
    pub(crate) fail_start: AtomicBool,
}

impl FakeRuntime {
    fn call(&self, what: &str, id: &str) {
        self.calls.lock().unwrap().push(format!("{what} {id}"));
    }

    /// How many calls of kind `what` were made for sandbox `id`.
    pub(crate) fn count(&self, what: &str, id: &str) -> usize {
        let needle = format!("{what} {id}");
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| **c == needle)
            .count()
    }

    /// Whether the runtime holds sandbox `id`, and whether it runs.
    pub(crate) fn state(&self, id: &str) -> Option<bool> {
        self.sandboxes.lock().unwrap().get(id).copied()
    }

    fn running(&self, id: &str) -> Result<()> {
        match self.state(id) {
            Some(true) => Ok(()),
            Some(false) => Err(RuntimeError::NotRunning {
                sandbox_id: id.to_owned(),
            }),
            None => Err(RuntimeError::SandboxNotFound {
                sandbox_id: id.to_owned(),
            }),
        }
    }

    fn result(command: &str) -> ExecResult {
        ExecResult {
            exit_code: 0,
            stdout: format!("ran: {command}"),
            stderr: String::new(),
            stdout_truncated: false,
            stderr_truncated: false,
            duration: Duration::from_millis(1),
        }
    }
}

impl Runtime for FakeRuntime {
    fn create<'a>(&'a self, sandbox_id: &'a str, _spec: SandboxSpec) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.call("create", sandbox_id);
            let mut m = self.sandboxes.lock().unwrap();
            if m.contains_key(sandbox_id) {
                return Err(RuntimeError::SandboxExists {
                    sandbox_id: sandbox_id.to_owned(),
                });
            }
            m.insert(sandbox_id.to_owned(), false);
            Ok(())
        })
    }

    fn start<'a>(&'a self, sandbox_id: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.call("start", sandbox_id);
            if self.fail_start.load(Ordering::SeqCst) {
                return Err(RuntimeError::Io {
                    op: "start (fake failure)",
                    source: std::io::Error::other("the fake runtime was told to fail"),
                });
            }
            let mut m = self.sandboxes.lock().unwrap();
            match m.get_mut(sandbox_id) {
                Some(r) if *r => Err(RuntimeError::AlreadyRunning {
                    sandbox_id: sandbox_id.to_owned(),
                }),
                Some(r) => {
                    *r = true;
                    Ok(())
                }
                None => Err(RuntimeError::SandboxNotFound {
                    sandbox_id: sandbox_id.to_owned(),
                }),
            }
        })
    }

    fn exec<'a>(
        &'a self,
        sandbox_id: &'a str,
        req: ExecRequest,
    ) -> BoxFuture<'a, Result<ExecResult>> {
        Box::pin(async move {
            self.call("exec", sandbox_id);
            self.running(sandbox_id)?;
            Ok(Self::result(&req.command))
        })
    }

    fn exec_stream<'a>(
        &'a self,
        sandbox_id: &'a str,
        req: ExecRequest,
    ) -> BoxFuture<'a, Result<ExecStream>> {
        Box::pin(async move {
            self.call("exec", sandbox_id);
            self.running(sandbox_id)?;
            let r = Self::result(&req.command);
            let (tx, rx) = tokio::sync::mpsc::channel(2);
            let _ = tx.try_send(Ok(ExecEvent::Stdout(r.stdout)));
            let _ = tx.try_send(Ok(ExecEvent::Exit {
                exit_code: 0,
                duration: r.duration,
            }));
            Ok(ExecStream::new(rx))
        })
    }

    fn session_create<'a>(
        &'a self,
        sandbox_id: &'a str,
        _spec: SessionSpec,
    ) -> BoxFuture<'a, Result<String>> {
        Box::pin(async move {
            self.call("session_create", sandbox_id);
            self.running(sandbox_id)?;
            Ok(format!("sess_{:016x}", self.calls.lock().unwrap().len()))
        })
    }

    fn session_exec<'a>(
        &'a self,
        sandbox_id: &'a str,
        _session_id: &'a str,
        command: &'a str,
        _timeout: Option<Duration>,
    ) -> BoxFuture<'a, Result<ExecResult>> {
        Box::pin(async move {
            self.call("session_exec", sandbox_id);
            self.running(sandbox_id)?;
            Ok(Self::result(command))
        })
    }

    fn session_destroy<'a>(
        &'a self,
        sandbox_id: &'a str,
        _session_id: &'a str,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.call("session_destroy", sandbox_id);
            Ok(())
        })
    }

    fn stop<'a>(&'a self, sandbox_id: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.call("stop", sandbox_id);
            self.running(sandbox_id)?;
            self.sandboxes
                .lock()
                .unwrap()
                .insert(sandbox_id.to_owned(), false);
            Ok(())
        })
    }

    fn destroy<'a>(&'a self, sandbox_id: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.call("destroy", sandbox_id);
            match self.sandboxes.lock().unwrap().remove(sandbox_id) {
                Some(_) => Ok(()),
                None => Err(RuntimeError::SandboxNotFound {
                    sandbox_id: sandbox_id.to_owned(),
                }),
            }
        })
    }
}

/// A filesystem that mounts nothing; counts mounts, publishes and unmounts.
#[derive(Default)]
pub(crate) struct FakeMounter {
    pub(crate) mounted: Arc<Mutex<Vec<String>>>,
    pub(crate) publishes: Arc<AtomicUsize>,
    pub(crate) unmounts: Arc<AtomicUsize>,
    /// The next mounts fail.
    pub(crate) fail: AtomicBool,
}

impl FakeMounter {
    /// Sandboxes mounted now.
    pub(crate) fn live(&self) -> Vec<String> {
        self.mounted.lock().unwrap().clone()
    }
}

impl Mounter for FakeMounter {
    fn mount(&self, cfg: FsConfig) -> std::result::Result<Box<dyn Mounted>, FsError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(FsError::Mount {
                mountpoint: cfg.mountpoint,
                source: std::io::Error::other("the fake mounter was told to fail"),
            });
        }
        self.mounted.lock().unwrap().push(cfg.sandbox_id.clone());
        let (tx, rx) = crossbeam_channel::bounded(16);
        Ok(Box::new(FakeMount {
            id: cfg.sandbox_id,
            mode: cfg.publish_mode,
            mounted: self.mounted.clone(),
            publishes: self.publishes.clone(),
            unmounts: self.unmounts.clone(),
            _events: tx,
            rx,
        }))
    }

    fn cleanup_stale(&self, _dir: &Path) -> std::result::Result<Vec<PathBuf>, FsError> {
        Ok(Vec::new())
    }
}

#[derive(Debug)]
struct FakeMount {
    id: String,
    mode: PublishMode,
    mounted: Arc<Mutex<Vec<String>>>,
    publishes: Arc<AtomicUsize>,
    unmounts: Arc<AtomicUsize>,
    /// Kept so that the audit bridge's receiver stays open while mounted.
    _events: crossbeam_channel::Sender<AuditEvent>,
    rx: crossbeam_channel::Receiver<AuditEvent>,
}

impl Mounted for FakeMount {
    fn publish(&self) -> std::result::Result<PublishReport, FsError> {
        self.publishes.fetch_add(1, Ordering::SeqCst);
        Ok(PublishReport::default())
    }
    fn command_finished(&self) -> std::result::Result<Option<PublishReport>, FsError> {
        match self.mode {
            PublishMode::AfterEachCommand => self.publish().map(Some),
            PublishMode::Explicit => Ok(None),
        }
    }
    fn publish_mode(&self) -> PublishMode {
        self.mode
    }
    fn pending(&self) -> Vec<PathBuf> {
        Vec::new()
    }
    fn surely_clean(&self) -> bool {
        // Never sure: every command goes through publish, which the tests count.
        false
    }
    fn events(&self) -> crossbeam_channel::Receiver<AuditEvent> {
        self.rx.clone()
    }
    fn count_scratch(&self, _tmp: OwnedFd, _cap: u64) {}
    fn unmount(self: Box<Self>) -> std::result::Result<(), FsError> {
        self.unmounts.fetch_add(1, Ordering::SeqCst);
        self.mounted.lock().unwrap().retain(|m| *m != self.id);
        Ok(())
    }
}
