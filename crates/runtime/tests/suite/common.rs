//! Fixture: a started sandbox over a temporary workspace, cleaned up on drop; the bwrap target
//! of the conformance suite.

use std::sync::Arc;
use std::time::Duration;

use agentfense_runtime::cgroup::{CgroupManager, StdCgroupFs};
use agentfense_runtime::conformance::{self, Options, Sandbox, Target};
use agentfense_runtime::userns::{self, IdPool};
use agentfense_runtime::{BwrapConfig, BwrapRuntime, ResourceLimits};
use tokio::sync::mpsc;

pub use agentfense_runtime::conformance::req;

pub const INIT: &str = env!("CARGO_BIN_EXE_agentfense-init");

/// Why the privileged tests cannot run here, if they cannot.
pub fn missing_prerequisite() -> Option<String> {
    use agentfense_testsupport as ts;
    if let Some(missing) = ts::all(&[ts::root(), ts::bwrap()]) {
        return Some(missing);
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
    conformance::skip_unless_ci(test, missing_prerequisite())
}

/// The conformance suite's probe: `None` means skip.
pub async fn prepare(test: &str) -> Option<()> {
    (!skip(test)).then_some(())
}

/// The bwrap runtime as a conformance target.
pub fn target() -> Target {
    Target {
        start: |o| Box::pin(async move { start_with(o, true).await.into_dyn() }),
        // Our init (PID 1) runs no `sleep`.
        idle_sleeps: 0,
        // init, sh, ps, wc.
        processes_at_rest: 4,
        reap_grace: Duration::from_millis(100),
        // Writes to the root fail with EACCES (Permission denied), not EROFS.
        read_only_root_is_erofs: false,
        // Inherited from the init (see `isolation::landlock_and_init_capabilities`); the
        // commands' other sets are empty and `no_new_privs` is set.
        command_bounding_set: 0xe0,
        extra_env: &[],
    }
}

pub type Fixture = Sandbox<BwrapRuntime>;

/// The host id blocks of this test process's sandboxes (the server's defaults: one pool per
/// process, leases host-wide).
pub fn id_pool() -> Arc<IdPool> {
    static POOL: std::sync::OnceLock<Arc<IdPool>> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        Arc::new(
            IdPool::new(
                userns::DEFAULT_BASE,
                userns::DEFAULT_SLOTS,
                userns::DEFAULT_LEASE_DIR.as_ref(),
            )
            .unwrap(),
        )
    })
    .clone()
}

pub async fn start() -> Fixture {
    start_with(Options::default(), true).await
}

/// A started sandbox; without `cgroups` the runtime kills process groups only.
pub async fn start_with(opts: Options, cgroups: bool) -> Fixture {
    let ws = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut cfg = BwrapConfig::new(INIT, state.path());
    cfg.output_cap = opts.output_cap;
    cfg.allow_network = true;
    let proc_self = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    cfg.cgroups = cgroups.then(|| {
        CgroupManager::detect(
            Arc::new(StdCgroupFs),
            "/sys/fs/cgroup".as_ref(),
            &proc_self,
            &format!("agentfense-test-{}", std::process::id()),
        )
        .unwrap()
    });
    cfg.userns = Some(id_pool());
    let (tx, events) = mpsc::channel(64);
    let rt = Arc::new(BwrapRuntime::new(cfg, tx).unwrap());
    let workspace = ws.path().to_path_buf();
    Sandbox::create_and_start(
        rt,
        events,
        workspace,
        opts.limits,
        opts.network,
        (ws, state),
    )
    .await
}
