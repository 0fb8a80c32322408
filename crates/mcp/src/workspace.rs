//! What the tools work on: one sandbox, already created and running, reached either in
//! process (`agentfense mcp --dir`, the server's `/mcp`) or over the API
//! (`agentfense mcp --sandbox`). Every file tool runs as a command inside the sandbox, so it
//! sees exactly what the agent's commands see, checked by the same policy filesystem; the
//! workspace only runs commands and answers the review calls.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use agentfense_core::Policy;

/// A boxed future of a workspace call.
pub type WsFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, WsError>> + Send + 'a>>;

/// One command to run in the sandbox.
#[derive(Debug, Clone, Default)]
pub struct ExecCall {
    /// A shell command line (`/bin/sh -c`).
    pub command: String,
    /// Standard input.
    pub stdin: String,
    /// Extra environment variables.
    pub env: BTreeMap<String, String>,
    /// Working directory inside the sandbox; empty: the workspace root.
    pub workdir: String,
    /// Time limit; `None`: the sandbox's default.
    pub timeout: Option<Duration>,
}

/// What a command did.
#[derive(Debug, Clone, Default)]
pub struct ExecReply {
    /// Exit status; `128 + signal` when killed.
    pub exit_code: i32,
    /// Standard output (lossy UTF-8).
    pub stdout: String,
    /// Standard error (lossy UTF-8).
    pub stderr: String,
    /// Whether an output stream was cut at the sandbox's output cap.
    pub truncated: bool,
}

impl ExecReply {
    /// A reply whose streams may end in the runtime's truncation marker (output that came
    /// through the service or over the API carries no flag, only the marker).
    pub fn marked(exit_code: i32, stdout: String, stderr: String) -> ExecReply {
        ExecReply {
            exit_code,
            truncated: stdout.contains(TRUNCATION_MARKER) || stderr.contains(TRUNCATION_MARKER),
            stdout,
            stderr,
        }
    }
}

/// The sandbox's effective access, as the policy resource shows it and denials explain it.
#[derive(Debug, Clone)]
pub struct PolicyView {
    /// The sandbox's id.
    pub sandbox_id: String,
    /// Where the project appears inside the sandbox (the first is where commands start).
    pub roots: Vec<String>,
    /// The compiled rules (the server's mandatory floor included).
    pub policy: Arc<Policy>,
    /// The network: `none`, `host`, or the egress allow-list.
    pub network: serde_json::Value,
}

/// Why a workspace call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WsError {
    /// Bad arguments (a malformed glob, an unknown checkpoint).
    #[error("{0}")]
    InvalidArgument(String),
    /// The caller may not do this.
    #[error("permission denied: {0}")]
    Denied(String),
    /// The thing named does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The sandbox is not in a state to do it (stopped, being changed).
    #[error("{0}")]
    Unavailable(String),
    /// The command ran past its time limit.
    #[error("timed out: {0}")]
    Timeout(String),
    /// Anything else.
    #[error("{0}")]
    Failed(String),
}

/// One sandbox, as the tools see it.
pub trait Workspace: Send + Sync {
    /// Runs a command in the sandbox (audited like any other command).
    fn exec(&self, call: ExecCall) -> WsFuture<'_, ExecReply>;
    /// The effective rules and network.
    fn policy(&self) -> WsFuture<'_, PolicyView>;
    /// The pending changes against the codebase (the review API's JSON).
    fn changes(&self) -> WsFuture<'_, serde_json::Value>;
    /// A git diff of the changes under `paths` (globs; empty: all), and whether it was cut.
    fn diff(&self, paths: Vec<String>) -> WsFuture<'_, (String, bool)>;
    /// Takes a checkpoint of the sandbox's changes (the review API's JSON).
    fn checkpoint(&self, label: String) -> WsFuture<'_, serde_json::Value>;
    /// Brings the sandbox back to a checkpoint (or with `dry_run`, says what that would
    /// change).
    fn restore(&self, checkpoint: String, dry_run: bool) -> WsFuture<'_, serde_json::Value>;
    /// A tool was refused by the policy. Refusals the kernel makes from a file's mode bits
    /// (a write to a read-only file) never reach the policy filesystem's own audit, so the
    /// workspace records them where it keeps an audit trail.
    fn denied(&self, _denial: &Denial) {}
}

/// A refusal by the sandbox's policy, as a tool met it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// The operation refused (`open`, `mkdir`, ...).
    pub operation: &'static str,
    /// The path inside the project (`/src/main.py`).
    pub path: String,
    /// The path's level.
    pub level: agentfense_core::Level,
    /// The deciding rule's pattern, if a rule decided.
    pub rule: Option<String>,
}

/// The marker the runtime appends to a stream cut at its cap (see the runtime's
/// `truncation_marker`): output that came over the API carries no flag, only the marker.
pub const TRUNCATION_MARKER: &str = "\n[agentfense: output truncated: ";
