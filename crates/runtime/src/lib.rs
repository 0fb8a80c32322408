//! Isolated execution for AgentFense: sandbox environments, exec, sessions, resource limits.
//!
//! The [`Runtime`] trait is the interface the server uses; [`BwrapRuntime`] implements it with
//! one long-lived bubblewrap environment per started sandbox. Inside, our own init
//! (`agentfense-init`, see [`init`]) is PID 1: it reaps zombies and starts commands on request
//! over an inherited control socket ([`protocol`]), so an exec is a fork+exec inside the existing
//! environment. Commands run as an unprivileged user with no capabilities, `no_new_privs`, their
//! own session, a seccomp deny-list and Landlock ([`hardening`]), in a clean environment.
//! Resource limits use cgroup v1 or v2 ([`cgroup`]); limit hits are reported as
//! [`RuntimeEvent`]s on a channel the server consumes.
//!
//! Interactive programs (`agentfense shell`) run on a pty the caller allocates:
//! [`BwrapRuntime::exec_tty`] hands only the slave into the sandbox, where it becomes the
//! program's controlling terminal.
//!
//! The runtime knows nothing about FUSE: it binds the workspace directory it is given at
//! `/workspace`.
//!
//! # Wiring it into the server
//!
//! ```no_run
//! use std::sync::Arc;
//! use agentfense_runtime::cgroup::CgroupManager;
//! use agentfense_runtime::{BwrapConfig, BwrapRuntime, ExecRequest, Runtime, SandboxSpec};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! // The init ships next to the server binary.
//! let init = std::env::current_exe()?.with_file_name("agentfense-init");
//! let mut cfg = BwrapConfig::new(init, "/var/lib/agentfense/runtime");
//! cfg.cgroups = Some(CgroupManager::detect_host("agentfense")?);
//! let (events_tx, mut events_rx) = tokio::sync::mpsc::channel(256);
//! let rt: Arc<dyn Runtime> = Arc::new(BwrapRuntime::new(cfg, events_tx)?);
//! // Record `resource_limit_exceeded` audit events.
//! tokio::spawn(async move { while let Some(_ev) = events_rx.recv().await {} });
//!
//! let spec = SandboxSpec {
//!     image: None,
//!     workspace: "/run/agentfense/mnt/sb1".into(), // the FUSE mount
//!     limits: Default::default(),
//!     network: Default::default(),
//!     tmp_size: None,
//!     workspace_path: None,
//!     home: None,
//! };
//! rt.create("sb1", spec).await?;
//! rt.start("sb1").await?;
//! let req = ExecRequest { command: "ls -la".into(), ..Default::default() };
//! let res = rt.exec("sb1", req).await?;
//! println!("{} {}", res.exit_code, res.stdout);
//! rt.destroy("sb1").await?;
//! # Ok(()) }
//! ```
//!
//! Errors carry a wire category ([`RuntimeError::kind`]) for the server's single mapping to
//! gRPC codes.

pub mod bwrap;
mod bwrap_runtime;
pub mod cgroup;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod error;
pub mod hardening;
pub mod init;
pub mod output;
pub mod protocol;
mod runtime;
pub mod types;
pub mod userns;

pub use bwrap_runtime::{
    BwrapConfig, BwrapRuntime, DEFAULT_PATH, SANDBOX_OWNER, SandboxInfo, TtyProcess, build_env,
    check_workspace_path, resolve_workdir, resolve_workdir_in,
};
pub use error::{ErrorKind, Result, RuntimeError};
pub use runtime::{
    BoxFuture, Delivery, ExecStream, Runtime, consumer_gone, deliver, find_session, process_tree,
    stream_call,
};
/// A 64-bit FNV-1a hash of `bytes`, stable across builds and versions: for names of state
/// kept on the host (cgroup trees, work directories) that a restarted or upgraded process
/// must find again.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    use std::hash::Hasher;
    let mut h = fnv::FnvHasher::default();
    h.write(bytes);
    h.finish()
}

pub use types::{
    ExecEvent, ExecRequest, ExecResult, LimitKind, MAX_COMMAND, NetworkMode, ResourceLimits,
    RuntimeEvent, SandboxSpec, SessionSpec, TtyRequest, check_command,
};

#[cfg(test)]
mod tests {
    #[test]
    fn stable_hash_is_fnv1a_64() {
        // Published FNV-1a test vectors: names derived from it must never change.
        assert_eq!(super::stable_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(super::stable_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(super::stable_hash(b"foobar"), 0x8594_4171_f739_67e8);
    }
}
