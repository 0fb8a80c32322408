//! [`RuntimeError`]: one typed error for the runtime crate, named after the step that failed.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

/// How the server should answer a [`RuntimeError`] (one mapping per wire boundary).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The sandbox or session is unknown (gRPC `NOT_FOUND`).
    NotFound,
    /// The request is malformed (gRPC `INVALID_ARGUMENT`).
    InvalidArgument,
    /// The sandbox or session is not in a state that allows the call (gRPC `FAILED_PRECONDITION`).
    FailedPrecondition,
    /// The sandbox already exists (gRPC `ALREADY_EXISTS`).
    AlreadyExists,
    /// The command ran past its deadline (gRPC `DEADLINE_EXCEEDED`).
    DeadlineExceeded,
    /// The host is missing something the runtime needs (gRPC `UNAVAILABLE` or a startup error).
    Unavailable,
    /// Anything else: log the detail, answer a generic message (gRPC `INTERNAL`).
    Internal,
}

/// Errors of the sandbox runtime.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// No sandbox with this id was created (or it was destroyed).
    #[error("sandbox {sandbox_id} not found")]
    SandboxNotFound {
        /// The id asked for.
        sandbox_id: String,
    },
    /// `create` was called twice with the same id.
    #[error("sandbox {sandbox_id} already exists")]
    SandboxExists {
        /// The id asked for.
        sandbox_id: String,
    },
    /// The sandbox exists but is not running (never started, stopped, or its environment died).
    #[error("sandbox {sandbox_id} is not running")]
    NotRunning {
        /// The sandbox.
        sandbox_id: String,
    },
    /// `start` on a sandbox that is already running.
    #[error("sandbox {sandbox_id} is already running")]
    AlreadyRunning {
        /// The sandbox.
        sandbox_id: String,
    },
    /// A request field is invalid (workdir escaping `/workspace`, NUL bytes, oversized command...).
    #[error("invalid argument: {message}")]
    InvalidArgument {
        /// What is wrong, safe to show to the client.
        message: String,
    },
    /// The command did not finish before its deadline; its whole process tree was killed.
    #[error("command timed out after {timeout:?}")]
    Timeout {
        /// The deadline that applied.
        timeout: Duration,
        /// Output captured before the deadline (lossy UTF-8, capped).
        stdout: String,
        /// Error output captured before the deadline (lossy UTF-8, capped).
        stderr: String,
    },
    /// No session with this id exists in this sandbox.
    #[error("session {session_id} not found")]
    SessionNotFound {
        /// The session asked for.
        session_id: String,
    },
    /// The session's shell has exited (`exit`, killed, or destroyed).
    #[error("session is closed")]
    SessionClosed {
        /// The session.
        session_id: String,
    },
    /// The workspace directory handed to `create` is unusable.
    #[error("workspace {path} is not a directory")]
    Workspace {
        /// The host path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A required host binary (bwrap, the init) is missing.
    #[error("required binary {path} is missing or not executable")]
    MissingBinary {
        /// The path looked at.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Preparing the sandbox's state directory (generated `/etc`) failed.
    #[error("preparing sandbox state in {path} failed")]
    PrepareState {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The bwrap process could not be spawned at all.
    #[error("spawning {bwrap} failed")]
    SpawnBwrap {
        /// The bwrap binary.
        bwrap: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// bwrap (or the init inside it) exited before the environment became ready.
    #[error("sandbox environment failed to start: bwrap exited with {status}: {stderr}")]
    BwrapFailed {
        /// bwrap's exit status.
        status: ExitStatus,
        /// bwrap's standard output.
        stdout: String,
        /// bwrap's standard error (bwrap and the init write their diagnostics here).
        stderr: String,
    },
    /// The environment did not report ready in time.
    #[error("sandbox environment did not become ready within {timeout:?}; stderr: {stderr}")]
    StartTimeout {
        /// The limit.
        timeout: Duration,
        /// What bwrap/init printed so far.
        stderr: String,
    },
    /// A cgroup file operation failed.
    #[error("cgroup {op} on {path} failed")]
    Cgroup {
        /// `mkdir`, `write`, `read`, `rmdir`, `open`.
        op: &'static str,
        /// The cgroup file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Resource limits were requested but the host offers no usable cgroup hierarchy.
    #[error("resource limits requested but cgroups are unavailable: {reason}")]
    CgroupsUnavailable {
        /// Why.
        reason: String,
    },
    /// Talking to the init over the control socket failed.
    #[error("control channel to sandbox {sandbox_id} failed during {op}")]
    Channel {
        /// The sandbox.
        sandbox_id: String,
        /// `send`, `recv`, `encode`, `decode`.
        op: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The init could not start the command (fork, privilege drop, chdir, exec...).
    #[error("starting the command failed at step {step}: {message}")]
    CommandSetup {
        /// The step inside the init that failed.
        step: String,
        /// The OS error text.
        message: String,
        /// The raw errno.
        errno: i32,
    },
    /// A pipe or other host-side I/O resource for a command could not be created.
    #[error("{op} failed")]
    Io {
        /// What was being done.
        op: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl RuntimeError {
    /// The wire category of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            RuntimeError::SandboxNotFound { .. } | RuntimeError::SessionNotFound { .. } => {
                ErrorKind::NotFound
            }
            RuntimeError::SandboxExists { .. } => ErrorKind::AlreadyExists,
            RuntimeError::NotRunning { .. }
            | RuntimeError::AlreadyRunning { .. }
            | RuntimeError::SessionClosed { .. } => ErrorKind::FailedPrecondition,
            RuntimeError::InvalidArgument { .. } | RuntimeError::Workspace { .. } => {
                ErrorKind::InvalidArgument
            }
            // A missing workdir, or a session shell that does not exist.
            RuntimeError::CommandSetup { step, errno, .. }
                if step == "chdir" || (step == "exec" && *errno == libc::ENOENT) =>
            {
                ErrorKind::InvalidArgument
            }
            RuntimeError::Timeout { .. } => ErrorKind::DeadlineExceeded,
            RuntimeError::MissingBinary { .. } | RuntimeError::CgroupsUnavailable { .. } => {
                ErrorKind::Unavailable
            }
            _ => ErrorKind::Internal,
        }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        RuntimeError::InvalidArgument {
            message: message.into(),
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;
