//! Plain values crossing the [`Runtime`](crate::Runtime) interface.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// Resource limits of one sandbox. `None` (or zero) means "no limit".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResourceLimits {
    /// Memory limit in bytes (OOM kill inside the sandbox beyond it, exit 137).
    pub memory_bytes: Option<u64>,
    /// CPU time in microseconds per 100 ms period (100_000 = one full CPU).
    pub cpu_quota_us: Option<u64>,
    /// Relative CPU weight, cgroup v1 `cpu.shares` scale (1024 = default).
    pub cpu_shares: Option<u64>,
    /// Maximum number of tasks (processes and threads) in the sandbox.
    pub pids_limit: Option<u64>,
}

impl ResourceLimits {
    /// True when no limit is set.
    pub fn is_empty(&self) -> bool {
        [
            self.memory_bytes,
            self.cpu_quota_us,
            self.cpu_shares,
            self.pids_limit,
        ]
        .iter()
        .all(|v| v.unwrap_or(0) == 0)
    }
}

impl From<&agentfense_core::ResourceLimits> for ResourceLimits {
    /// The cgroup limits of a sandbox's resources (where 0 means unlimited). The disk quota is
    /// not a cgroup limit: the filesystem and the size of `/tmp` enforce it.
    fn from(r: &agentfense_core::ResourceLimits) -> Self {
        let nz = |v: u64| (v > 0).then_some(v);
        ResourceLimits {
            memory_bytes: nz(r.memory_bytes),
            cpu_quota_us: nz(r.cpu_quota),
            cpu_shares: nz(r.cpu_shares),
            pids_limit: nz(r.pids_limit),
        }
    }
}

/// Network mode of a sandbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum NetworkMode {
    /// A fresh network namespace with only `lo` (the default).
    #[default]
    None,
    /// Share the host's network (only when the server configuration allows it and the request
    /// asks for it).
    Host,
}

/// Everything the runtime needs to know about a sandbox at `create`.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    /// The host directory to bind at `/workspace` (the policy filesystem's mount point).
    pub workspace: PathBuf,
    /// Resource limits (enforced with cgroups).
    pub limits: ResourceLimits,
    /// Network access.
    pub network: NetworkMode,
    /// Container image, for runtimes that run images (`None`: the runtime's default; the
    /// bwrap runtime runs none and ignores it).
    pub image: Option<String>,
    /// Size of the sandbox's `/tmp` tmpfs (which holds `$HOME`) in bytes, e.g. its disk quota;
    /// `None`: the runtime's configured size.
    pub tmp_size: Option<u64>,
    /// Where the workspace also appears inside, an absolute path (a local project at its own
    /// host path, so that venvs, shebangs and error messages name real paths); commands start
    /// there. `None`: only `/workspace`. Checked by [`crate::check_workspace_path`].
    pub workspace_path: Option<String>,
    /// A host directory bound at the sandbox user's `$HOME`, so that it outlives the sandbox
    /// (caches, tool state). `None`: `$HOME` lives in the `/tmp` tmpfs and goes with it.
    pub home: Option<PathBuf>,
}

/// One command to run with `/bin/sh -c`.
#[derive(Debug, Clone, Default)]
pub struct ExecRequest {
    /// The shell command line.
    pub command: String,
    /// Bytes fed to the command's standard input (then closed).
    pub stdin: Vec<u8>,
    /// Variables set on top of the clean default environment.
    pub env: BTreeMap<String, String>,
    /// Working directory relative to `/workspace` (or an absolute path inside it). Empty means
    /// `/workspace`.
    pub workdir: String,
    /// Deadline; `None` means the runtime's configured default. Capped at the configured maximum.
    pub timeout: Option<Duration>,
}

/// The result of a finished command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecResult {
    /// Exit code; `128 + signal` when killed by a signal (137 after an OOM kill).
    pub exit_code: i32,
    /// Standard output, lossy UTF-8, capped (with a truncation marker).
    pub stdout: String,
    /// Standard error, lossy UTF-8, capped (with a truncation marker).
    pub stderr: String,
    /// Whether stdout was cut at the cap.
    pub stdout_truncated: bool,
    /// Whether stderr was cut at the cap.
    pub stderr_truncated: bool,
    /// Wall time from request to result.
    pub duration: Duration,
}

/// One item of an [`ExecStream`](crate::ExecStream).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// Bytes the command wrote to stdout, as valid UTF-8 (invalid sequences replaced; multi-byte
    /// characters are never split across chunks).
    Stdout(String),
    /// Bytes the command wrote to stderr, same rules.
    Stderr(String),
    /// The command finished; always the last item of a successful stream.
    Exit {
        /// Same convention as [`ExecResult::exit_code`].
        exit_code: i32,
        /// Wall time.
        duration: Duration,
    },
}

/// An interactive program attached to a terminal (see
/// [`BwrapRuntime::exec_tty`](crate::BwrapRuntime::exec_tty)).
#[derive(Debug, Clone, Default)]
pub struct TtyRequest {
    /// Program and arguments; `argv[0]` is an absolute path inside the sandbox.
    pub argv: Vec<String>,
    /// Variables set on top of the clean default environment (pass the user's `TERM`).
    pub env: BTreeMap<String, String>,
    /// Working directory, same rules as [`ExecRequest::workdir`].
    pub workdir: String,
    /// Deadline, capped at the configured maximum. Unlike [`ExecRequest::timeout`], `None`
    /// means no deadline: an interactive program runs until it exits.
    pub timeout: Option<Duration>,
}

/// A persistent shell's parameters.
#[derive(Debug, Clone, Default)]
pub struct SessionSpec {
    /// The shell binary inside the sandbox; empty means `/bin/sh`.
    pub shell: String,
    /// Variables set on top of the clean default environment.
    pub env: BTreeMap<String, String>,
    /// Starting directory, same rules as [`ExecRequest::workdir`].
    pub workdir: String,
}

/// Which resource limit was hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitKind {
    /// The memory limit (a process was OOM-killed).
    Memory,
    /// The pids limit (a fork/clone failed).
    Pids,
}

impl LimitKind {
    /// Stable name for audit logs.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::Memory => "memory",
            LimitKind::Pids => "pids",
        }
    }
}

/// Something the server should record (consumed from the channel given to the runtime).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuntimeEvent {
    /// A command hit a resource limit; record the audit event `resource_limit_exceeded`.
    ResourceLimitExceeded {
        /// The sandbox.
        sandbox_id: String,
        /// The session, when the command ran in one.
        session_id: Option<String>,
        /// The limit.
        limit: LimitKind,
        /// The command that was running when the limit was hit.
        command: String,
    },
}

/// Largest command text accepted (`MAX_ARG_STRLEN` for `sh -c`).
pub const MAX_COMMAND: usize = 128 * 1024;

/// Checks a command line before any runtime runs it: at most [`MAX_COMMAND`] bytes and no NUL
/// (which `execve` cannot carry and a session script would truncate). One rule for every
/// runtime and for sessions as well as exec.
pub fn check_command(command: &str) -> crate::Result<()> {
    if command.len() > MAX_COMMAND || command.contains('\0') {
        return Err(crate::RuntimeError::invalid(
            "command must be at most 128 KiB and contain no NUL byte",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod command_tests {
    use super::*;

    #[test]
    fn commands_are_bounded_and_nul_free() {
        assert!(check_command("echo hi").is_ok());
        assert!(check_command(&"x".repeat(MAX_COMMAND)).is_ok());
        assert!(check_command(&"x".repeat(MAX_COMMAND + 1)).is_err());
        let err = check_command("echo a\0b").unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument);
    }
}
