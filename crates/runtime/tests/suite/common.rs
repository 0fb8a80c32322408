//! Fixture: a started sandbox over a temporary workspace, cleaned up on drop.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use agentfense_runtime::Runtime;
use agentfense_runtime::cgroup::{CgroupManager, StdCgroupFs};
use agentfense_runtime::{
    BwrapConfig, BwrapRuntime, ExecRequest, ExecResult, NetworkMode, ResourceLimits, RuntimeEvent,
    SandboxSpec,
};
use tokio::sync::mpsc;

pub const INIT: &str = env!("CARGO_BIN_EXE_agentfense-init");

/// Why the privileged tests cannot run here, if they cannot.
pub fn missing_prerequisite() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root".into());
    }
    if !std::path::Path::new("/usr/bin/bwrap").exists() {
        return Some("needs bubblewrap (/usr/bin/bwrap)".into());
    }
    // cgroups must be writable: create and remove a probe cgroup.
    let name = format!("agentfense-probe-{}", std::process::id());
    let probe = CgroupManager::detect_host(&name)
        .and_then(|m| m.create("probe", &ResourceLimits::default()));
    match probe {
        Ok(cg) => cg.destroy_blocking(),
        Err(e) => return Some(format!("needs writable cgroups: {e}")),
    }
    None
}

/// Probe: `true` means skip (after printing why); panics under CI.
pub fn skip(test: &str) -> bool {
    match missing_prerequisite() {
        None => false,
        Some(reason) => {
            if std::env::var_os("CI").is_some() {
                panic!("{test}: prerequisite missing under CI: {reason}");
            }
            eprintln!("SKIPPED {test}: {reason}");
            true
        }
    }
}

pub struct Fixture {
    pub rt: Arc<BwrapRuntime>,
    pub id: String,
    pub ws: tempfile::TempDir,
    _state: tempfile::TempDir,
    pub events: mpsc::Receiver<RuntimeEvent>,
}

pub struct Opts {
    pub limits: ResourceLimits,
    pub network: NetworkMode,
    pub cap: usize,
    /// Run without cgroups (process-group kill only).
    pub no_cgroups: bool,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            limits: ResourceLimits::default(),
            network: NetworkMode::None,
            cap: 1 << 20,
            no_cgroups: false,
        }
    }
}

impl Fixture {
    pub async fn start() -> Fixture {
        Self::with(Opts::default()).await
    }

    pub async fn with(opts: Opts) -> Fixture {
        let ws = tempfile::tempdir().unwrap();
        // The sandbox user (uid 1000) must be able to write its workspace.
        std::os::unix::fs::chown(ws.path(), Some(1000), Some(1000)).unwrap();
        let state = tempfile::tempdir().unwrap();
        let mut cfg = BwrapConfig::new(INIT, state.path());
        cfg.output_cap = opts.cap;
        cfg.allow_network = true;
        let proc_self = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        cfg.cgroups = (!opts.no_cgroups).then(|| {
            CgroupManager::detect(
                Arc::new(StdCgroupFs),
                "/sys/fs/cgroup".as_ref(),
                &proc_self,
                &format!("agentfense-test-{}", std::process::id()),
            )
            .unwrap()
        });
        let (tx, events) = mpsc::channel(64);
        let rt = Arc::new(BwrapRuntime::new(cfg, tx).unwrap());
        let id = format!("t{}", rand_suffix());
        rt.create(
            &id,
            SandboxSpec {
                image: None,
                workspace: ws.path().to_path_buf(),
                limits: opts.limits,
                network: opts.network,
            },
        )
        .await
        .unwrap();
        rt.start(&id).await.unwrap();
        Fixture {
            rt,
            id,
            ws,
            _state: state,
            events,
        }
    }

    pub async fn sh(&self, cmd: &str) -> ExecResult {
        self.rt
            .exec(&self.id, req(cmd))
            .await
            .unwrap_or_else(|e| panic!("exec {cmd:?} failed: {e:?}"))
    }

    pub async fn destroy(self) {
        self.rt.destroy(&self.id).await.unwrap();
    }
}

pub fn req(cmd: &str) -> ExecRequest {
    ExecRequest {
        command: cmd.to_owned(),
        stdin: Vec::new(),
        env: BTreeMap::new(),
        workdir: String::new(),
        timeout: Some(Duration::from_secs(20)),
    }
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}
