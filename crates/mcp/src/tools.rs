//! The tools an agent gets: what each takes, what it answers, how it fails.
//!
//! File tools run as small `sh` scripts inside the sandbox (paths and patterns pass through
//! the environment, never through the command line), so they see and may touch exactly what
//! the agent's own commands do: hidden names do not exist, read-only files refuse writes, and
//! every refusal is the policy filesystem's own (and audited as such). A refusal comes back
//! naming the rule that decided it; a missing or hidden name comes back as not found, never
//! with a rule (that would tell a hidden name from a missing one).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use agentfense_core::{Level, NodeKind, SandboxPath};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::workspace::{
    Denial, ExecCall, ExecReply, PolicyView, TRUNCATION_MARKER, Workspace, WsError,
};

/// Every tool, in the order `tools/list` shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ToolName {
    /// `exec`
    Exec,
    /// `read_file`
    ReadFile,
    /// `write_file`
    WriteFile,
    /// `edit_file`
    EditFile,
    /// `list_files`
    ListFiles,
    /// `search`
    Search,
    /// `changes`
    Changes,
    /// `diff`
    Diff,
    /// `checkpoint`
    Checkpoint,
    /// `restore`
    Restore,
}

impl ToolName {
    /// All tools.
    pub const ALL: [ToolName; 10] = [
        ToolName::Exec,
        ToolName::ReadFile,
        ToolName::WriteFile,
        ToolName::EditFile,
        ToolName::ListFiles,
        ToolName::Search,
        ToolName::Changes,
        ToolName::Diff,
        ToolName::Checkpoint,
        ToolName::Restore,
    ];

    /// The tool's wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ToolName::Exec => "exec",
            ToolName::ReadFile => "read_file",
            ToolName::WriteFile => "write_file",
            ToolName::EditFile => "edit_file",
            ToolName::ListFiles => "list_files",
            ToolName::Search => "search",
            ToolName::Changes => "changes",
            ToolName::Diff => "diff",
            ToolName::Checkpoint => "checkpoint",
            ToolName::Restore => "restore",
        }
    }

    /// The tool of a wire name.
    pub fn parse(name: &str) -> Option<ToolName> {
        ToolName::ALL.into_iter().find(|t| t.as_str() == name)
    }

    /// Parses a `--tools` list (`exec,read_file`): every name must be a tool.
    pub fn parse_list(list: &str) -> Result<Vec<ToolName>, String> {
        let mut out = Vec::new();
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let t = ToolName::parse(name).ok_or_else(|| {
                format!(
                    "unknown tool {name:?} (tools: {})",
                    ToolName::ALL.map(ToolName::as_str).join(", ")
                )
            })?;
            if !out.contains(&t) {
                out.push(t);
            }
        }
        if out.is_empty() {
            return Err("the tool list is empty".to_owned());
        }
        out.sort();
        Ok(out)
    }
}

/// One tool as `tools/list` describes it.
#[derive(Debug, Clone)]
pub struct ToolSpec {
    /// Wire name.
    pub name: &'static str,
    /// Short human title.
    pub title: &'static str,
    /// What it does, for the model.
    pub description: &'static str,
    /// JSON Schema of the arguments (an object schema).
    pub input_schema: Value,
    /// Changes nothing.
    pub read_only: bool,
    /// May overwrite or remove what exists.
    pub destructive: bool,
    /// Repeating it with the same arguments changes nothing more.
    pub idempotent: bool,
}

fn object(properties: Value, required: &[&str]) -> Value {
    json!({
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": false,
    })
}

impl ToolName {
    /// The tool's description and argument schema.
    pub fn spec(self) -> ToolSpec {
        let path = json!({"type": "string", "description": "A path inside the sandbox: relative to the project root, or absolute (the project root, /tmp, $HOME)."});
        let (title, description, input_schema, read_only, destructive, idempotent) = match self {
            ToolName::Exec => (
                "Run a shell command",
                "Runs a shell command line (/bin/sh -c) in the sandbox, starting at the project root. \
                 Returns its exit code, stdout and stderr (each capped; `truncated` says so). \
                 Files the policy hides do not exist; read-only files refuse writes; the network is \
                 what the sandbox's policy allows (see the agentfense://policy resource).",
                object(
                    json!({
                        "command": {"type": "string", "description": "The command line."},
                        "timeout": {"type": "number", "exclusiveMinimum": 0, "description": "Time limit in seconds (default: the sandbox's)."},
                        "workdir": {"type": "string", "description": "Directory to start in (default: the project root)."},
                    }),
                    &["command"],
                ),
                false,
                true,
                false,
            ),
            ToolName::ReadFile => (
                "Read a file",
                "Reads a UTF-8 text file, whole or a range of lines (1-based, inclusive). \
                 Fails with not found for names that do not exist or that the policy hides, and \
                 with permission denied (naming the rule) for files that may be seen but not read.",
                object(
                    json!({
                        "path": path,
                        "start_line": {"type": "integer", "minimum": 1, "description": "First line (default 1)."},
                        "end_line": {"type": "integer", "minimum": 1, "description": "Last line (default: the end)."},
                        "line_numbers": {"type": "boolean", "description": "Prefix each line with its number and a tab (default false)."},
                    }),
                    &["path"],
                ),
                true,
                false,
                true,
            ),
            ToolName::WriteFile => (
                "Write a file",
                "Creates or replaces a file with the given text, creating missing parent \
                 directories. Fails with permission denied, naming the rule, where the policy \
                 does not allow writing.",
                object(
                    json!({
                        "path": path,
                        "content": {"type": "string", "description": "The file's new content."},
                    }),
                    &["path", "content"],
                ),
                false,
                true,
                true,
            ),
            ToolName::EditFile => (
                "Edit a file",
                "Replaces an exact string in a text file. `old_string` must occur exactly once \
                 (include surrounding lines to make it unique) unless `replace_all` is set; the \
                 call fails, changing nothing, when it is missing or not unique.",
                object(
                    json!({
                        "path": path,
                        "old_string": {"type": "string", "description": "The exact text to replace (whitespace included)."},
                        "new_string": {"type": "string", "description": "The replacement."},
                        "replace_all": {"type": "boolean", "description": "Replace every occurrence (default false)."},
                    }),
                    &["path", "old_string", "new_string"],
                ),
                false,
                true,
                false,
            ),
            ToolName::ListFiles => (
                "List files",
                "Lists the files and directories (ending in /) under a directory that match a \
                 glob: `*` and `?` stay within one name, `**` crosses directories; a pattern \
                 without / matches names at any depth (`*.py`). `.git` is skipped.",
                object(
                    json!({
                        "path": {"type": "string", "description": "Directory to list (default: the project root)."},
                        "pattern": {"type": "string", "description": "Glob (default: everything)."},
                        "limit": {"type": "integer", "minimum": 1, "maximum": 10000, "description": "Most entries returned (default 1000)."},
                    }),
                    &[],
                ),
                true,
                false,
                true,
            ),
            ToolName::Search => (
                "Search file contents",
                "Searches the text files under a path for a regular expression (POSIX extended, \
                 as `grep -E`), returning `path:line: text` matches. Binary files and `.git` are \
                 skipped; files the policy hides are never searched.",
                object(
                    json!({
                        "pattern": {"type": "string", "description": "The regular expression (grep -E syntax)."},
                        "path": {"type": "string", "description": "File or directory to search (default: the project root)."},
                        "glob": {"type": "string", "description": "Only files matching this glob (as in list_files)."},
                        "ignore_case": {"type": "boolean", "description": "Case-insensitive (default false)."},
                        "max_results": {"type": "integer", "minimum": 1, "maximum": 5000, "description": "Most matches returned (default 200)."},
                    }),
                    &["pattern"],
                ),
                true,
                false,
                true,
            ),
            ToolName::Changes => (
                "List changes",
                "Lists what this sandbox changed against its codebase (added, modified, deleted \
                 paths), as a reviewer will see it.",
                object(json!({}), &[]),
                true,
                false,
                true,
            ),
            ToolName::Diff => (
                "Show the diff",
                "A git-style diff of this sandbox's changes against its codebase, optionally \
                 limited to paths matching globs.",
                object(
                    json!({
                        "paths": {"type": "array", "items": {"type": "string"}, "description": "Globs of paths to include (default: all)."},
                    }),
                    &[],
                ),
                true,
                false,
                true,
            ),
            ToolName::Checkpoint => (
                "Take a checkpoint",
                "Saves the sandbox's current changes as a checkpoint that `restore` can return \
                 to. Returns its id.",
                object(
                    json!({
                        "label": {"type": "string", "description": "A note for the checkpoint."},
                    }),
                    &[],
                ),
                false,
                false,
                false,
            ),
            ToolName::Restore => (
                "Restore a checkpoint",
                "Brings the sandbox's files back to a checkpoint (changes made since are lost); \
                 with dry_run, only lists what would change.",
                object(
                    json!({
                        "checkpoint": {"type": "string", "description": "The checkpoint id (cp-N)."},
                        "dry_run": {"type": "boolean", "description": "Only list what would change (default false)."},
                    }),
                    &["checkpoint"],
                ),
                false,
                true,
                true,
            ),
        };
        ToolSpec {
            name: self.as_str(),
            title,
            description,
            input_schema,
            read_only,
            destructive,
            idempotent,
        }
    }
}

/// A tool's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Text for the model.
    pub text: String,
    /// The same as JSON, where the answer has structure.
    pub structured: Option<Value>,
    /// The tool failed (the text says why).
    pub is_error: bool,
}

impl Outcome {
    fn text(text: impl Into<String>) -> Outcome {
        Outcome {
            text: text.into(),
            structured: None,
            is_error: false,
        }
    }

    fn json(value: Value) -> Outcome {
        Outcome {
            text: serde_json::to_string_pretty(&value).unwrap_or_default(),
            structured: Some(value),
            is_error: false,
        }
    }

    fn error(text: impl Into<String>) -> Outcome {
        Outcome {
            text: text.into(),
            structured: None,
            is_error: true,
        }
    }
}

/// A call that is not a tool call at all (a protocol error, not a tool error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// No tool of that name (or not enabled with `--tools`).
    #[error("unknown tool {0:?}")]
    UnknownTool(String),
}

/// The enabled tools and their dispatch.
#[derive(Debug, Clone)]
pub struct Toolbox {
    enabled: Vec<ToolName>,
}

impl Default for Toolbox {
    fn default() -> Self {
        Toolbox {
            enabled: ToolName::ALL.to_vec(),
        }
    }
}

impl Toolbox {
    /// Only these tools.
    pub fn new(enabled: Vec<ToolName>) -> Toolbox {
        Toolbox { enabled }
    }

    /// The enabled tools, described.
    pub fn specs(&self) -> Vec<ToolSpec> {
        self.enabled.iter().map(|t| t.spec()).collect()
    }

    /// One enabled tool, described.
    pub fn spec(&self, name: &str) -> Option<ToolSpec> {
        ToolName::parse(name)
            .filter(|t| self.enabled.contains(t))
            .map(ToolName::spec)
    }

    /// Runs one tool call.
    pub async fn call(
        &self,
        ws: &dyn Workspace,
        name: &str,
        args: Option<serde_json::Map<String, Value>>,
    ) -> Result<Outcome, CallError> {
        let tool = ToolName::parse(name)
            .filter(|t| self.enabled.contains(t))
            .ok_or_else(|| CallError::UnknownTool(name.to_owned()))?;
        let args = Value::Object(args.unwrap_or_default());
        let result = match tool {
            ToolName::Exec => exec(ws, parse(tool, args)).await,
            ToolName::ReadFile => read_file(ws, parse(tool, args)).await,
            ToolName::WriteFile => write_file(ws, parse(tool, args)).await,
            ToolName::EditFile => edit_file(ws, parse(tool, args)).await,
            ToolName::ListFiles => list_files(ws, parse(tool, args)).await,
            ToolName::Search => search(ws, parse(tool, args)).await,
            ToolName::Changes => match parse::<NoArgs>(tool, args) {
                Ok(NoArgs {}) => ws.changes().await.map(Outcome::json).map_err(Fail::Ws),
                Err(e) => Err(e),
            },
            ToolName::Diff => diff(ws, parse(tool, args)).await,
            ToolName::Checkpoint => match parse::<CheckpointArgs>(tool, args) {
                Ok(a) => ws
                    .checkpoint(a.label.unwrap_or_default())
                    .await
                    .map(Outcome::json)
                    .map_err(Fail::Ws),
                Err(e) => Err(e),
            },
            ToolName::Restore => match parse::<RestoreArgs>(tool, args) {
                Ok(a) => ws
                    .restore(a.checkpoint, a.dry_run)
                    .await
                    .map(Outcome::json)
                    .map_err(Fail::Ws),
                Err(e) => Err(e),
            },
        };
        Ok(result.unwrap_or_else(|f| Outcome::error(f.to_string())))
    }
}

/// Why a tool call failed, as the model reads it.
#[derive(Debug, thiserror::Error)]
enum Fail {
    #[error("invalid arguments for {tool}: {msg}")]
    Args { tool: &'static str, msg: String },
    #[error("{0}")]
    Ws(WsError),
}

fn bad(tool: ToolName, msg: impl Into<String>) -> Fail {
    Fail::Args {
        tool: tool.as_str(),
        msg: msg.into(),
    }
}

fn parse<T: for<'de> Deserialize<'de>>(tool: ToolName, args: Value) -> Result<T, Fail> {
    serde_json::from_value(args).map_err(|e| bad(tool, e.to_string()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecArgs {
    command: String,
    #[serde(default)]
    timeout: Option<f64>,
    #[serde(default)]
    workdir: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadArgs {
    path: String,
    #[serde(default)]
    start_line: Option<u64>,
    #[serde(default)]
    end_line: Option<u64>,
    #[serde(default)]
    line_numbers: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteArgs {
    path: String,
    content: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EditArgs {
    path: String,
    old_string: String,
    new_string: String,
    #[serde(default)]
    replace_all: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListArgs {
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    pattern: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SearchArgs {
    pattern: String,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    glob: Option<String>,
    #[serde(default)]
    ignore_case: bool,
    #[serde(default)]
    max_results: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DiffArgs {
    #[serde(default)]
    paths: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckpointArgs {
    #[serde(default)]
    label: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RestoreArgs {
    checkpoint: String,
    #[serde(default)]
    dry_run: bool,
}

/// The longest path a tool accepts (the kernel's `PATH_MAX`).
const MAX_PATH: usize = 4096;

fn check_path(tool: ToolName, path: &str) -> Result<(), Fail> {
    if path.is_empty() {
        return Err(bad(tool, "path is empty"));
    }
    if path.len() > MAX_PATH || path.contains('\0') {
        return Err(bad(
            tool,
            "path must be at most 4096 bytes, without NUL characters",
        ));
    }
    Ok(())
}

/// Runs one of the file scripts: `LC_ALL=C` (so that errors read the same everywhere) and
/// the arguments in `AF_*` variables.
///
/// The command starts with a no-op line naming the tool and its arguments, shell-quoted, so
/// that the audit trail's `command_executed` event (and an automatic checkpoint's label) says
/// what the tool did; the script itself reads them only from the environment.
async fn script(
    ws: &dyn Workspace,
    tool: ToolName,
    body: &str,
    vars: &[(&str, &str)],
    stdin: String,
) -> Result<ExecReply, Fail> {
    let mut env = BTreeMap::new();
    env.insert("LC_ALL".to_owned(), "C".to_owned());
    let mut command = format!(": agentfense-mcp {}", tool.as_str());
    for (k, v) in vars {
        env.insert((*k).to_owned(), (*v).to_owned());
        let _ = write!(command, " {k}={}", sh_quote(v));
    }
    command.push('\n');
    command.push_str(body);
    ws.exec(ExecCall {
        command,
        stdin,
        env,
        workdir: String::new(),
        timeout: Some(FILE_TOOL_TIMEOUT),
    })
    .await
    .map_err(Fail::Ws)
}

/// `v` as one shell word: single-quoted, each `'` written as `'\''`.
fn sh_quote(v: &str) -> String {
    format!("'{}'", v.replace('\'', "'\\''"))
}

/// A file tool's time limit (a search over a large tree is the slow one).
const FILE_TOOL_TIMEOUT: Duration = Duration::from_secs(120);

/// What a failed file command's stderr says happened (`LC_ALL=C`: the C library's
/// `strerror` texts, the same for glibc, musl and busybox).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Errno {
    NotFound,
    Denied,
    IsDir,
    NotDir,
    NoSpace,
    Other,
}

fn errno_of(stderr: &str) -> Errno {
    // The reason is what follows the last `: ` of the last line (the path before it is the
    // agent's own text, and could spell any reason).
    let last = stderr.trim_end().lines().last().unwrap_or("");
    let reason = last.rsplit(": ").next().unwrap_or("").trim();
    let has = |s: &str| reason == s;
    if has("No such file or directory") || has("Directory nonexistent") {
        Errno::NotFound
    } else if has("Not a directory") {
        Errno::NotDir
    } else if has("Permission denied")
        || has("Operation not permitted")
        || has("Read-only file system")
    {
        Errno::Denied
    } else if has("Is a directory") {
        Errno::IsDir
    } else if has("No space left on device") || has("Disk quota exceeded") {
        Errno::NoSpace
    } else {
        Errno::Other
    }
}

/// The path as the policy sees it (relative to the project root), if it is in the project.
fn in_project(view: &PolicyView, path: &str) -> Option<SandboxPath> {
    let rest = if path.starts_with('/') {
        view.roots.iter().find_map(|root| {
            let root = root.trim_end_matches('/');
            if path == root {
                Some("")
            } else {
                path.strip_prefix(root).and_then(|r| r.strip_prefix('/'))
            }
        })?
    } else {
        path
    };
    SandboxPath::parse(rest).ok()
}

/// The message of a refused file operation: the rule that decided, when the policy refused.
async fn refusal(ws: &dyn Workspace, path: &str, want: Level, verb: &str, raw: &str) -> Fail {
    let view = match ws.policy().await {
        Ok(v) => v,
        Err(e) => return Fail::Ws(e),
    };
    let msg = match in_project(&view, path) {
        Some(sp) => {
            let d = view.policy.evaluate(&sp, NodeKind::File);
            if d.level < want {
                ws.denied(&Denial {
                    operation: "open",
                    path: sp.as_str().to_owned(),
                    level: d.level,
                    rule: d.rule().map(|r| view.policy.describe(r)),
                });
                format!(
                    "cannot {verb} {path}: the sandbox's policy gives it `{}` ({})",
                    d.level,
                    view.policy.explain(&d)
                )
            } else {
                format!("cannot {verb} {path}: {}", raw.trim())
            }
        }
        None => format!(
            "cannot {verb} {path}: it is outside the project, where only /tmp and $HOME are \
             writable ({})",
            raw.trim()
        ),
    };
    Fail::Ws(WsError::Denied(msg))
}

/// A failed file command as a tool error.
async fn failed(
    ws: &dyn Workspace,
    path: &str,
    want: Level,
    verb: &str,
    reply: &ExecReply,
) -> Fail {
    let raw = reply.stderr.trim();
    match errno_of(raw) {
        Errno::NotFound | Errno::NotDir => Fail::Ws(WsError::NotFound(path.to_owned())),
        Errno::Denied => refusal(ws, path, want, verb, raw).await,
        Errno::IsDir => Fail::Ws(WsError::InvalidArgument(format!(
            "cannot {verb} {path}: it is a directory"
        ))),
        Errno::NoSpace => Fail::Ws(WsError::Failed(format!(
            "cannot {verb} {path}: the sandbox's disk quota is used up ({raw})"
        ))),
        Errno::Other => Fail::Ws(WsError::Failed(format!(
            "cannot {verb} {path}: {}",
            if raw.is_empty() {
                format!("exit code {}", reply.exit_code)
            } else {
                raw.to_owned()
            }
        ))),
    }
}

async fn exec(ws: &dyn Workspace, args: Result<ExecArgs, Fail>) -> Result<Outcome, Fail> {
    let a = args?;
    let tool = ToolName::Exec;
    if a.command.trim().is_empty() {
        return Err(bad(tool, "command is empty"));
    }
    let timeout = match a.timeout {
        None => None,
        Some(t) if t.is_finite() && t > 0.0 && t <= 86_400.0 => Some(Duration::from_secs_f64(t)),
        Some(t) => {
            return Err(bad(
                tool,
                format!("timeout {t} is not 0 < seconds <= 86400"),
            ));
        }
    };
    let workdir = a.workdir.unwrap_or_default();
    if !workdir.is_empty() {
        check_path(tool, &workdir)?;
    }
    let r = ws
        .exec(ExecCall {
            command: a.command,
            stdin: String::new(),
            env: BTreeMap::new(),
            workdir,
            timeout,
        })
        .await
        .map_err(Fail::Ws)?;
    let mut text = String::new();
    text.push_str(&r.stdout);
    if !r.stderr.is_empty() {
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str("[stderr]\n");
        text.push_str(&r.stderr);
    }
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    let _ = write!(text, "[exit code {}]", r.exit_code);
    Ok(Outcome {
        text,
        structured: Some(json!({
            "exit_code": r.exit_code,
            "stdout": r.stdout,
            "stderr": r.stderr,
            "truncated": r.truncated,
        })),
        is_error: false,
    })
}

/// Reads a whole text file (or a line range), failing as a tool should.
async fn read_text(
    ws: &dyn Workspace,
    tool: ToolName,
    path: &str,
    lines: (u64, Option<u64>),
) -> Result<ExecReply, Fail> {
    check_path(tool, path)?;
    let from = lines.0.to_string();
    let to = lines.1.map_or_else(|| "$".to_owned(), |l| l.to_string());
    let r = script(
        ws,
        tool,
        r#"if [ -d "$AF_P" ]; then printf '%s: Is a directory\n' "$AF_P" >&2; exit 1; fi
exec sed -n "${AF_FROM},${AF_TO}p" -- "$AF_P""#,
        &[("AF_P", path), ("AF_FROM", &from), ("AF_TO", &to)],
        String::new(),
    )
    .await?;
    if r.exit_code != 0 {
        return Err(failed(ws, path, Level::Read, "read", &r).await);
    }
    if r.stdout.contains('\0') || r.stdout.contains('\u{FFFD}') {
        return Err(Fail::Ws(WsError::InvalidArgument(format!(
            "{path} is not UTF-8 text (a binary file?): look at it with exec, e.g. `xxd {path} | head`"
        ))));
    }
    Ok(r)
}

async fn read_file(ws: &dyn Workspace, args: Result<ReadArgs, Fail>) -> Result<Outcome, Fail> {
    let a = args?;
    let tool = ToolName::ReadFile;
    let start = a.start_line.unwrap_or(1);
    if start == 0 || a.end_line == Some(0) {
        return Err(bad(tool, "lines are numbered from 1"));
    }
    if let Some(end) = a.end_line
        && end < start
    {
        return Err(bad(
            tool,
            format!("end_line {end} is before start_line {start}"),
        ));
    }
    let r = read_text(ws, tool, &a.path, (start, a.end_line)).await?;
    let (mut body, cut) = split_marker(&r.stdout, r.truncated);
    if a.line_numbers {
        let mut numbered = String::with_capacity(body.len() + body.len() / 8);
        for (i, line) in body.split_inclusive('\n').enumerate() {
            let _ = write!(numbered, "{}\t{line}", start + i as u64);
        }
        body = numbered;
    }
    if cut {
        if !body.ends_with('\n') {
            body.push('\n');
        }
        body.push_str(
            "[agentfense: the file is longer than one answer may be: read the rest with \
             start_line/end_line]",
        );
    }
    Ok(Outcome::text(body))
}

/// The output without the runtime's truncation marker, and whether it was cut.
fn split_marker(out: &str, flagged: bool) -> (String, bool) {
    match out.rfind(TRUNCATION_MARKER) {
        Some(at) => (out[..at].to_owned(), true),
        None => (out.to_owned(), flagged),
    }
}

const WRITE_SCRIPT: &str = r#"if [ -d "$AF_P" ]; then printf '%s: Is a directory\n' "$AF_P" >&2; exit 1; fi
if [ -n "$AF_MKDIR" ]; then
  d=$(dirname -- "$AF_P")
  [ -d "$d" ] || mkdir -p -- "$d" || exit 1
fi
if [ -e "$AF_P" ]; then echo existing; else echo new; fi
exec tee -- "$AF_P" >/dev/null"#;

async fn put(
    ws: &dyn Workspace,
    tool: ToolName,
    path: &str,
    content: String,
    mkdir: bool,
) -> Result<bool, Fail> {
    let r = script(
        ws,
        tool,
        WRITE_SCRIPT,
        &[("AF_P", path), ("AF_MKDIR", if mkdir { "1" } else { "" })],
        content,
    )
    .await?;
    if r.exit_code != 0 {
        return Err(failed(ws, path, Level::Write, "write", &r).await);
    }
    Ok(r.stdout.starts_with("new"))
}

async fn write_file(ws: &dyn Workspace, args: Result<WriteArgs, Fail>) -> Result<Outcome, Fail> {
    let a = args?;
    check_path(ToolName::WriteFile, &a.path)?;
    let len = a.content.len();
    let created = put(ws, ToolName::WriteFile, &a.path, a.content, true).await?;
    Ok(Outcome::text(format!(
        "{} {} ({len} bytes)",
        if created { "created" } else { "wrote" },
        a.path
    )))
}

async fn edit_file(ws: &dyn Workspace, args: Result<EditArgs, Fail>) -> Result<Outcome, Fail> {
    let a = args?;
    let tool = ToolName::EditFile;
    if a.old_string.is_empty() {
        return Err(bad(
            tool,
            "old_string is empty (to create a file, use write_file)",
        ));
    }
    if a.old_string == a.new_string {
        return Err(bad(tool, "old_string and new_string are the same"));
    }
    let r = read_text(ws, tool, &a.path, (1, None)).await?;
    let (content, cut) = split_marker(&r.stdout, r.truncated);
    if cut {
        return Err(Fail::Ws(WsError::InvalidArgument(format!(
            "{} is too large to edit in one answer: edit it with exec (sed, patch)",
            a.path
        ))));
    }
    let count = content.matches(a.old_string.as_str()).count();
    let new = match count {
        0 => {
            return Err(Fail::Ws(WsError::InvalidArgument(format!(
                "old_string was not found in {} (it must match exactly, whitespace included)",
                a.path
            ))));
        }
        1 => content.replacen(a.old_string.as_str(), &a.new_string, 1),
        _ if a.replace_all => content.replace(a.old_string.as_str(), &a.new_string),
        n => {
            return Err(Fail::Ws(WsError::InvalidArgument(format!(
                "old_string occurs {n} times in {}: include more surrounding text to make it \
                 unique, or set replace_all",
                a.path
            ))));
        }
    };
    put(ws, tool, &a.path, new, false).await?;
    Ok(Outcome::text(format!(
        "replaced {count} occurrence{} in {}",
        if count == 1 { "" } else { "s" },
        a.path
    )))
}

/// A glob as `list_files` and `search` take it: without `/`, it matches a name at any depth.
fn glob(tool: ToolName, pattern: &str) -> Result<globset::GlobMatcher, Fail> {
    let full = if pattern.contains('/') {
        pattern.trim_start_matches("./").to_owned()
    } else {
        format!("**/{pattern}")
    };
    globset::GlobBuilder::new(&full)
        .literal_separator(true)
        .backslash_escape(true)
        .build()
        .map(|g| g.compile_matcher())
        .map_err(|e| bad(tool, format!("bad glob {pattern:?}: {e}")))
}

const LIST_SCRIPT: &str = r#"if [ ! -e "$AF_P" ]; then printf '%s: No such file or directory\n' "$AF_P" >&2; exit 1; fi
if [ ! -d "$AF_P" ]; then printf '%s: Not a directory\n' "$AF_P" >&2; exit 1; fi
case $AF_P in -*) AF_P=./$AF_P;; esac
CDPATH= cd -P -- "$AF_P" || { printf '%s: Permission denied\n' "$AF_P" >&2; exit 1; }
exec find . -mindepth 1 \( -name .git -prune \) -o \( -type d -exec printf '%s/\n' {} + \) -o -print"#;

async fn list_files(ws: &dyn Workspace, args: Result<ListArgs, Fail>) -> Result<Outcome, Fail> {
    let a = args?;
    let tool = ToolName::ListFiles;
    let path = a.path.unwrap_or_else(|| ".".to_owned());
    check_path(tool, &path)?;
    let limit = a.limit.unwrap_or(1000);
    if !(1..=10_000).contains(&limit) {
        return Err(bad(tool, "limit must be 1 to 10000"));
    }
    let matcher = match a.pattern.as_deref() {
        None | Some("") | Some("**") => None,
        Some(p) => Some(glob(tool, p)?),
    };
    let r = script(ws, tool, LIST_SCRIPT, &[("AF_P", &path)], String::new()).await?;
    if r.exit_code != 0 && r.stdout.is_empty() {
        return Err(failed(ws, &path, Level::View, "list", &r).await);
    }
    let (out, cut) = split_marker(&r.stdout, r.truncated);
    let mut entries: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("./"))
        .filter(|l| {
            matcher
                .as_ref()
                .is_none_or(|m| m.is_match(l.trim_end_matches('/')))
        })
        .collect();
    entries.sort_unstable();
    let total = entries.len();
    entries.truncate(limit);
    let mut text = entries.join("\n");
    if total > limit {
        let _ = write!(
            text,
            "\n[{} more not shown: narrow the path or pattern]",
            total - limit
        );
    } else if cut {
        text.push_str("\n[the listing was cut at the output limit: narrow the path or pattern]");
    } else if total == 0 {
        text = "no entries".to_owned();
    }
    Ok(Outcome::text(text))
}

/// The longest line of a match shown.
const MATCH_LINE_MAX: usize = 400;

const SEARCH_SCRIPT: &str = r#"if [ ! -e "$AF_P" ]; then printf '%s: No such file or directory\n' "$AF_P" >&2; exit 2; fi
exec grep -rnHIsZE ${AF_I:+-i} --exclude-dir=.git -e "$AF_RE" -- "$AF_P""#;

async fn search(ws: &dyn Workspace, args: Result<SearchArgs, Fail>) -> Result<Outcome, Fail> {
    let a = args?;
    let tool = ToolName::Search;
    if a.pattern.is_empty() {
        return Err(bad(tool, "pattern is empty"));
    }
    if a.pattern.contains('\0') || a.pattern.contains('\n') {
        return Err(bad(tool, "pattern must be one line without NUL characters"));
    }
    let path = a.path.unwrap_or_else(|| ".".to_owned());
    check_path(tool, &path)?;
    let max = a.max_results.unwrap_or(200);
    if !(1..=5000).contains(&max) {
        return Err(bad(tool, "max_results must be 1 to 5000"));
    }
    let matcher = a.glob.as_deref().map(|g| glob(tool, g)).transpose()?;
    let r = script(
        ws,
        tool,
        SEARCH_SCRIPT,
        &[
            ("AF_P", &path),
            ("AF_RE", &a.pattern),
            ("AF_I", if a.ignore_case { "1" } else { "" }),
        ],
        String::new(),
    )
    .await?;
    if r.stdout.is_empty() {
        return match r.exit_code {
            0 | 1 => Ok(Outcome::text("no matches")),
            _ if r.stderr.trim().is_empty() => Ok(Outcome::text("no matches")),
            _ => match errno_of(&r.stderr) {
                Errno::Other => Err(Fail::Ws(WsError::InvalidArgument(format!(
                    "search failed: {}",
                    r.stderr.trim()
                )))),
                _ => Err(failed(ws, &path, Level::Read, "search", &r).await),
            },
        };
    }
    let (out, cut) = split_marker(&r.stdout, r.truncated);
    let prefix = format!("{}/", path.trim_end_matches('/'));
    let mut shown = 0usize;
    let mut total = 0usize;
    let mut text = String::new();
    for line in out.lines() {
        let Some((file, rest)) = line.split_once('\0') else {
            continue;
        };
        let rel = file.strip_prefix(&prefix).unwrap_or(file);
        let rel = rel.strip_prefix("./").unwrap_or(rel);
        if matcher.as_ref().is_some_and(|m| !m.is_match(rel)) {
            continue;
        }
        total += 1;
        if shown == max {
            continue;
        }
        shown += 1;
        let (num, body) = rest.split_once(':').unwrap_or((rest, ""));
        let body = if body.len() > MATCH_LINE_MAX {
            let mut end = MATCH_LINE_MAX;
            while !body.is_char_boundary(end) {
                end -= 1;
            }
            format!("{}…", &body[..end])
        } else {
            body.to_owned()
        };
        let _ = writeln!(text, "{file}:{num}: {body}");
    }
    if total == 0 {
        return Ok(Outcome::text("no matches"));
    }
    if total > shown {
        let _ = write!(text, "[{} more matches not shown]", total - shown);
    } else if cut {
        text.push_str("[the matches were cut at the output limit: narrow the path or glob]");
    }
    Ok(Outcome::text(text.trim_end().to_owned()))
}

async fn diff(ws: &dyn Workspace, args: Result<DiffArgs, Fail>) -> Result<Outcome, Fail> {
    let a = args?;
    let (text, cut) = ws.diff(a.paths).await.map_err(Fail::Ws)?;
    let mut text = if text.is_empty() {
        "no changes".to_owned()
    } else {
        text
    };
    if cut {
        text.push_str(
            "\n[agentfense: the diff leaves out files that are too large or past the size \
             limit]",
        );
    }
    Ok(Outcome::text(text))
}

#[cfg(test)]
mod tests;
