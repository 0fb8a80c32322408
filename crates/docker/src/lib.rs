//! The Docker runtime for AgentFense: one container per started sandbox, driven over the Docker
//! Engine API ([`bollard`]), implementing [`agentfense_runtime::Runtime`] with the same exec,
//! stream and session semantics as the bubblewrap runtime.
//!
//! # What a sandbox container looks like
//! See [`spec::container_body`] (a pure function, unit-tested): the sandbox's workspace (the
//! policy filesystem's mount point) bind-mounted at `/workspace` (`rslave` when the host mount
//! propagates), working directory `/workspace`, network `none` unless the server enables
//! networking and the sandbox asks for it, `no-new-privileges`, every capability dropped, the
//! bubblewrap runtime's seccomp filter ([`spec::seccomp_profile`]) in place of Docker's default, a
//! read-only root filesystem with tmpfs `/tmp` and `HOME=/tmp/home`, a non-root user, docker's
//! init as PID 1 (reaps zombies) with `sleep infinity` as the only long-lived process, the
//! resource limits as cgroup settings, and labels (`agentfense.managed=true`,
//! `agentfense.instance=<name>`, `agentfense.sandbox-id=<id>`) so a restarted server finds what
//! it owns
//! ([`DockerRuntime::cleanup_orphans`]).
//!
//! # How commands run
//! Each exec is a docker exec of `/bin/sh -c <command>` without a TTY (stdout and stderr stay
//! separate). Docker makes every exec process a session and process-group leader; the runtime
//! looks up its host pid, watches it with a pidfd (exit is noticed even when a background
//! process keeps the output open), and on a deadline kills the process group and every
//! descendant from the host ([`kill`]). Sessions are one long-lived interactive shell per
//! session fed over the exec's stdin; see `runtime/session.rs` for the framing that keeps each call's
//! stdout, stderr and exit code exact.
//!
//! # Wiring it into the server
//!
//! ```no_run
//! use std::sync::Arc;
//! use agentfense_docker::{DockerConfig, DockerRuntime};
//! use agentfense_runtime::Runtime;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let mut cfg = DockerConfig::default();
//! cfg.default_image = "python:3.11-slim".into();
//! let (events_tx, _events_rx) = tokio::sync::mpsc::channel(256);
//! let docker = DockerRuntime::connect(cfg, events_tx).await?;
//! // Containers of sandboxes the server no longer knows about (after a restart).
//! docker.cleanup_orphans(&["sb1".to_owned()]).await?;
//! let rt: Arc<dyn Runtime> = Arc::new(docker);
//! # Ok(()) }
//! ```
//!
//! The per-sandbox image is given with [`DockerRuntime::create_with_image`] (the
//! [`Runtime::create`](agentfense_runtime::Runtime::create) of the trait uses the configured
//! default image).

mod config;
mod error;
pub mod kill;
pub mod limits;
mod runtime;
pub mod spec;

pub use config::DockerConfig;
pub use error::DockerError;
pub use runtime::{DockerRuntime, LABEL_INSTANCE, LABEL_MANAGED, LABEL_SANDBOX_ID};
