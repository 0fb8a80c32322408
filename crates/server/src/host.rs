//! What a host needs to run sandboxes: the checks (root, FUSE, bubblewrap, user namespaces,
//! cgroups) and the bubblewrap runtime built from the `runtime` config. Shared by `serve` and
//! the CLI's local runs (`agentfense run`, `shell`), which are a server without its API.

use std::path::Path;

use crate::config::RuntimeConfig;
use crate::serve::ServeError;

/// Most descriptors the server asks for: its FUSE daemons hold files for every sandbox
/// (`runtime.open_files_per_sandbox` each), next to its sockets and pipes.
pub const NOFILE_TARGET: u64 = 1 << 20;

/// Raises this process's `RLIMIT_NOFILE` as far as the kernel allows (up to [`NOFILE_TARGET`]
/// and `fs.nr_open`). Returns the limits it started with, for sandboxes to keep, when they
/// changed.
pub fn raise_nofile_limit() -> Option<(u64, u64)> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let before = getrlimit(Resource::Nofile);
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(NOFILE_TARGET);
    let want = NOFILE_TARGET.min(nr_open);
    if before.current.is_none_or(|soft| soft >= want) {
        return None;
    }
    // Never lower the hard limit; raising it needs CAP_SYS_RESOURCE (the server runs as root),
    // and without it the soft limit goes up to the hard one.
    let raised_hard = before.maximum.map(|h| h.max(want));
    let within_hard = before.maximum.map_or(want, |h| h.min(want));
    let set = |current: u64, maximum: Option<u64>| {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(current),
                maximum,
            },
        )
    };
    if let Err(e) = set(want, raised_hard).or_else(|_| set(within_hard, before.maximum)) {
        tracing::warn!(error = %e, "cannot raise the descriptor limit (RLIMIT_NOFILE)");
        return None;
    }
    let after = getrlimit(Resource::Nofile);
    tracing::info!(
        before = ?before.current,
        after = ?after.current,
        "descriptor limit (RLIMIT_NOFILE) raised for the policy filesystems"
    );
    match (before.current, before.maximum) {
        (Some(soft), Some(hard)) if after.current != before.current => Some((soft, hard)),
        _ => None,
    }
}

/// Checks that this host can run sandboxes (root, FUSE, bubblewrap) and builds the
/// bubblewrap runtime from `rt`, with its per-sandbox state under `state_dir`. Resource-limit
/// hits are sent on `events`. Never falls back to something that does not isolate: every
/// failure says what to install or change.
pub fn bwrap_runtime(
    rt: &RuntimeConfig,
    state_dir: &Path,
    events: tokio::sync::mpsc::Sender<agentfense_runtime::RuntimeEvent>,
) -> Result<agentfense_runtime::BwrapRuntime, ServeError> {
    use agentfense_runtime::cgroup::CgroupManager;
    use agentfense_runtime::{BwrapConfig, BwrapRuntime};

    if !rustix::process::geteuid().is_root() {
        return Err(ServeError::Host(
            "sandboxes need root: AgentFense mounts a FUSE filesystem per sandbox and creates \
             namespaces and cgroups (run it with sudo)"
                .into(),
        ));
    }
    if !Path::new("/dev/fuse").exists() {
        return Err(ServeError::Host(
            "/dev/fuse is missing: install fuse3 (apt-get install fuse3) or load the fuse module \
             (modprobe fuse)"
                .into(),
        ));
    }
    if !rt.bwrap_path.is_absolute() || !rt.bwrap_path.exists() {
        return Err(ServeError::Host(format!(
            "bubblewrap not found ({}): install it with apt-get install bubblewrap, or set \
             runtime.bwrap_path",
            rt.bwrap_path.display()
        )));
    }
    let init = rt.init_path.clone().ok_or_else(|| {
        ServeError::Host("runtime.init_path is not set and no init binary was found".into())
    })?;
    let mut cfg = BwrapConfig::new(init, state_dir);
    cfg.bwrap_path = rt.bwrap_path.clone();
    cfg.default_timeout = rt.default_timeout;
    cfg.max_timeout = rt.max_timeout;
    cfg.output_cap = usize::try_from(rt.output_limit_bytes).unwrap_or(usize::MAX);
    cfg.allow_network = rt.allow_network;
    cfg.sandbox_nofile = raise_nofile_limit();
    if rt.user_namespace {
        use agentfense_runtime::userns::{
            DEFAULT_LEASE_DIR, DEFAULT_SLOTS, IdPool, host_userns_unavailable,
        };
        if let Some(why) = host_userns_unavailable() {
            return Err(ServeError::Host(format!(
                "each sandbox runs in a user namespace of its own, created by an unprivileged \
                 uid, but this host forbids that: {why}. Allow unprivileged user namespaces, or \
                 set runtime.user_namespace: false (every sandbox then shares host uid 1000 and \
                 its init runs as host root; see docs/security.md)"
            )));
        }
        let pool = IdPool::new(
            rt.sandbox_uid_base,
            DEFAULT_SLOTS,
            Path::new(DEFAULT_LEASE_DIR),
        )
        .map_err(|e| {
            ServeError::Host(format!(
                "per-sandbox user namespaces (runtime.user_namespace): {}",
                crate::error::chain(&e)
            ))
        })?;
        cfg.userns = Some(std::sync::Arc::new(pool));
    }
    // One parent cgroup per state directory: a server cleaning up after its own crash must not
    // touch the sandboxes of another server, or of `agentfense run`, on the same host.
    // FNV-1a, stable across builds: a restarted (or upgraded) server finds its cgroups again.
    let tag = agentfense_runtime::stable_hash(state_dir.to_string_lossy().as_bytes());
    match CgroupManager::detect_host(&format!("agentfense-{:08x}", tag as u32)) {
        Ok(m) => cfg.cgroups = Some(m),
        Err(e) if rt.default_resources.is_unlimited() => {
            tracing::warn!(error = %crate::error::chain(&e), "cgroups unavailable: sandboxes that ask for resource limits will fail to start");
        }
        Err(e) => {
            return Err(ServeError::Host(format!(
                "cgroups are unavailable ({}), so runtime.default_resources cannot be enforced; \
                 fix the cgroup mount or set runtime.default_resources to 0 to run without limits",
                crate::error::chain(&e)
            )));
        }
    }
    BwrapRuntime::new(cfg, events)
        .map_err(|e| ServeError::Host(format!("bubblewrap runtime: {}", crate::error::chain(&e))))
}
