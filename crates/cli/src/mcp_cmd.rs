//! `agentfense mcp`: an MCP server over stdio whose tools work inside one sandbox.
//!
//! Two ways: `--dir` starts a local sandbox over a project (as `agentfense run` does, its
//! changes kept the same way) that lives as long as the MCP session; `--sandbox` binds to an
//! existing sandbox on a server. Either way the agent gets no tool that creates sandboxes,
//! changes rules or widens the network: the operator fixes those on the command line.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Weak};
use std::time::Duration;

use agentfense_fs::review::patch::PatchOptions;
use agentfense_fs::{FsError, Selection, View};
use agentfense_mcp::{
    ExecCall, ExecReply, Fixed, PolicyView, Server, ToolName, Toolbox, Workspace, WsError, WsFuture,
};
use agentfense_proto::agentfense_v1 as x;
use agentfense_proto::v1;
use agentfense_runtime::{ErrorKind, Runtime};
use agentfense_server::grpc::review::checkpoint;
use agentfense_server::mcp::changes_json;
use agentfense_server::rest::{change_json, checkpoint_json};
use clap::Args;
use serde_json::{Value, json};

use crate::client_cmd::{Clients, Conn, connect};
use crate::local::{LocalArgs, LocalSandbox};

/// Options of `agentfense mcp`.
#[derive(Debug, Args)]
pub struct McpArgs {
    /// Serve a local sandbox over this project directory (no server needed), for as long as
    /// the MCP session lasts; its changes are kept like `agentfense run` keeps them.
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "sandbox",
        conflicts_with = "sandbox"
    )]
    pub dir: Option<PathBuf>,
    /// Serve an existing, running sandbox on a server (--endpoint; the credential, best a
    /// sandbox token, in AGENTFENSE_API_KEY).
    #[arg(long, value_name = "ID")]
    pub sandbox: Option<String>,
    /// Only these tools, comma-separated (default: all of exec, read_file, write_file,
    /// edit_file, list_files, search, changes, diff, checkpoint, restore).
    #[arg(long, value_name = "LIST")]
    pub tools: Option<String>,
    /// With --dir: the longest a command may run, in seconds.
    #[arg(long, default_value_t = 600.0, value_name = "SECONDS")]
    pub max_timeout: f64,
    /// Sandbox and policy options (with --dir).
    #[command(flatten)]
    pub local: LocalArgs,
    /// Connection options (with --sandbox).
    #[command(flatten)]
    pub conn: Conn,
}

pub(crate) fn run(args: McpArgs) -> anyhow::Result<ExitCode> {
    let tools = match &args.tools {
        Some(list) => ToolName::parse_list(list).map_err(|e| anyhow::anyhow!("--tools: {e}"))?,
        None => ToolName::ALL.to_vec(),
    };
    let toolbox = Toolbox::new(tools);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let code = match (&args.dir, &args.sandbox) {
        (Some(dir), None) => serve_local(&args, dir.clone(), toolbox, &rt),
        (None, Some(id)) => {
            let l = &args.local;
            anyhow::ensure!(
                l.policy.rules.is_empty()
                    && l.policy.policy_file.is_none()
                    && l.egress.is_empty()
                    && !l.network
                    && !l.apply
                    && !l.discard,
                "--rule, --policy, --egress, --network, --apply and --discard go with --dir: a \
                 server sandbox's rules and network are its own, set when it was created"
            );
            rt.block_on(async {
                let clients = connect(&args.conn).await?;
                let ws = Arc::new(RemoteWorkspace {
                    clients,
                    sandbox_id: id.clone(),
                });
                // Fail before the handshake if the sandbox cannot be reached.
                ws.policy()
                    .await
                    .map_err(|e| anyhow::anyhow!("sandbox {id}: {e}"))?;
                agentfense_mcp::serve_stdio(Server::new(Arc::new(Fixed(ws)), toolbox)).await?;
                anyhow::Ok(ExitCode::SUCCESS)
            })
        }
        _ => Err(anyhow::anyhow!("give either --dir or --sandbox")),
    };
    // A read of stdin may still be blocked in its thread (a signal ended the session): do
    // not wait for it.
    rt.shutdown_background();
    code
}

fn serve_local(
    args: &McpArgs,
    dir: PathBuf,
    toolbox: Toolbox,
    rt: &tokio::runtime::Runtime,
) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        args.max_timeout.is_finite() && args.max_timeout > 0.0,
        "--max-timeout must be a positive number of seconds"
    );
    let local = Arc::new(LocalSandbox::mount(
        &args.local,
        &dir,
        Duration::from_secs_f64(args.max_timeout),
    )?);
    let ws = Arc::new(LocalWorkspace {
        sandbox: Arc::downgrade(&local),
    });
    let served = rt.block_on(local.with_sandbox_interruptible(async |_, _| {
        agentfense_mcp::serve_stdio(Server::new(Arc::new(Fixed(ws)), toolbox)).await?;
        anyhow::Ok(())
    }));
    let local = match Arc::try_unwrap(local) {
        Ok(l) => l,
        // A tool call still holds the sandbox (the client went away mid-call): it is
        // unmounted when the last holder lets go; the summary is skipped.
        Err(_) => return served.map(|()| ExitCode::SUCCESS),
    };
    match served {
        Ok(()) => {
            local.finish()?;
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => match e.downcast_ref::<crate::local::Interrupted>() {
            Some(crate::local::Interrupted(signal)) => local.finish_interrupted(*signal),
            None => Err(e),
        },
    }
}

/// A local sandbox of this process (`--dir`).
struct LocalWorkspace {
    /// Weak: the session's end must leave the sandbox to [`LocalSandbox::finish`].
    sandbox: Weak<LocalSandbox>,
}

impl LocalWorkspace {
    fn sandbox(&self) -> Result<Arc<LocalSandbox>, WsError> {
        self.sandbox
            .upgrade()
            .ok_or_else(|| WsError::Unavailable("the sandbox is shutting down".to_owned()))
    }

    /// Runs a review step on the sandbox's delta off the async threads.
    async fn on_delta<T: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce(&LocalSandbox) -> Result<T, WsError> + Send + 'static,
    ) -> Result<T, WsError> {
        let sb = self.sandbox()?;
        tokio::task::spawn_blocking(move || f(&sb))
            .await
            .map_err(|e| WsError::Failed(format!("{what}: {e}")))?
    }
}

/// A filesystem error as the tools report it.
fn fs(e: FsError) -> WsError {
    match e {
        FsError::NotFound { .. } => WsError::NotFound(e.to_string()),
        e => WsError::Failed(e.to_string()),
    }
}

/// What the agent may see of the delta's changes: never a hidden path.
fn agent_selection(sb: &LocalSandbox, paths: &[String]) -> Result<Selection, WsError> {
    let select =
        Selection::globs(paths).map_err(|e| WsError::InvalidArgument(format!("paths: {e}")))?;
    let d = sb.mount_handle().delta();
    let reveal = agentfense_fs::codebase_reader(d.lower_path(), sb.policy().clone()).map_err(fs)?;
    Ok(select.revealing(reveal))
}

/// Checkpoints of each kind kept for local sandboxes (the server's default).
const CHECKPOINTS_KEEP: usize = 20;

impl Workspace for LocalWorkspace {
    fn exec(&self, call: ExecCall) -> WsFuture<'_, ExecReply> {
        Box::pin(async move {
            let sb = self.sandbox()?;
            let mut env = sb.env.clone();
            env.extend(call.env);
            let req = agentfense_runtime::ExecRequest {
                command: call.command,
                stdin: call.stdin.into_bytes(),
                env,
                workdir: call.workdir,
                timeout: call.timeout,
            };
            match sb.runtime().exec(sb.id(), req).await {
                Ok(r) => Ok(ExecReply {
                    exit_code: r.exit_code,
                    stdout: r.stdout,
                    stderr: r.stderr,
                    truncated: r.stdout_truncated || r.stderr_truncated,
                }),
                Err(e) => Err(match e.kind() {
                    ErrorKind::DeadlineExceeded => WsError::Timeout(e.to_string()),
                    ErrorKind::InvalidArgument => WsError::InvalidArgument(e.to_string()),
                    ErrorKind::NotFound => WsError::NotFound(e.to_string()),
                    _ => WsError::Failed(e.to_string()),
                }),
            }
        })
    }

    fn policy(&self) -> WsFuture<'_, PolicyView> {
        Box::pin(async move {
            let sb = self.sandbox()?;
            let dir = sb.dir().to_string_lossy().into_owned();
            Ok(PolicyView {
                sandbox_id: sb.id().to_owned(),
                roots: vec![dir, "/workspace".to_owned()],
                policy: Arc::new(sb.policy().clone()),
                network: sb.network_json(),
            })
        })
    }

    fn changes(&self) -> WsFuture<'_, Value> {
        Box::pin(self.on_delta("listing changes", |sb| {
            let select = agent_selection(sb, &[])?;
            let set = sb
                .mount_handle()
                .delta()
                .review(&select, agentfense_server::service::DEFAULT_CHANGES_LIMIT)
                .map_err(fs)?;
            Ok(changes_json(&set))
        }))
    }

    fn diff(&self, paths: Vec<String>) -> WsFuture<'_, (String, bool)> {
        Box::pin(self.on_delta("making the diff", move |sb| {
            let select = agent_selection(sb, &paths)?;
            let d = sb.mount_handle().delta();
            let p = agentfense_fs::diff(
                View::Base(d),
                View::Merged(d),
                &select,
                &PatchOptions::default(),
            )
            .map_err(fs)?;
            Ok((String::from_utf8_lossy(&p.text).into_owned(), p.truncated))
        }))
    }

    fn checkpoint(&self, label: String) -> WsFuture<'_, Value> {
        Box::pin(self.on_delta("taking a checkpoint", move |sb| {
            if label.len() > 1024 || label.chars().any(char::is_control) {
                return Err(WsError::InvalidArgument(
                    "label: at most 1024 bytes, no control characters".into(),
                ));
            }
            let info = sb.mount_handle().checkpoint(&label, true).map_err(fs)?;
            // The newest of each kind are kept; no age limit, which would also take the
            // operator's own checkpoints of this directory.
            let _ = sb
                .mount_handle()
                .delta()
                .prune_checkpoints(CHECKPOINTS_KEEP, None);
            Ok(checkpoint_json(&checkpoint(&info)))
        }))
    }

    fn restore(&self, cp: String, dry_run: bool) -> WsFuture<'_, Value> {
        Box::pin(self.on_delta("restoring the checkpoint", move |sb| {
            let select = agent_selection(sb, &[])?;
            let d = sb.mount_handle().delta();
            let opened = d.open_checkpoint(&cp).map_err(fs)?;
            let set = agentfense_fs::compare(
                View::Merged(d),
                View::Merged(&opened),
                &select,
                agentfense_server::service::DEFAULT_CHANGES_LIMIT,
            )
            .map_err(fs)?;
            drop(opened);
            if !dry_run {
                sb.mount_handle().restore_checkpoint(&cp).map_err(fs)?;
            }
            let mut v = changes_json(&set);
            v["restored"] = Value::Bool(!dry_run);
            Ok(v)
        }))
    }
}

/// A sandbox on a server (`--sandbox`), through the API.
struct RemoteWorkspace {
    clients: Clients,
    sandbox_id: String,
}

fn status_error(s: tonic::Status) -> WsError {
    let m = s.message().to_owned();
    match s.code() {
        tonic::Code::InvalidArgument | tonic::Code::OutOfRange => WsError::InvalidArgument(m),
        tonic::Code::NotFound => WsError::NotFound(m),
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => WsError::Denied(m),
        tonic::Code::FailedPrecondition | tonic::Code::Unavailable => WsError::Unavailable(m),
        tonic::Code::DeadlineExceeded => WsError::Timeout(m),
        _ => WsError::Failed(m),
    }
}

impl Workspace for RemoteWorkspace {
    fn exec(&self, call: ExecCall) -> WsFuture<'_, ExecReply> {
        Box::pin(async move {
            let mut sb = self.clients.sb.clone();
            let r = sb
                .exec(v1::ExecRequest {
                    sandbox_id: self.sandbox_id.clone(),
                    command: call.command,
                    stdin: call.stdin,
                    env: call.env.into_iter().collect::<HashMap<_, _>>(),
                    workdir: call.workdir,
                    timeout: call.timeout.map(Into::into),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            Ok(ExecReply::marked(r.exit_code, r.stdout, r.stderr))
        })
    }

    fn policy(&self) -> WsFuture<'_, PolicyView> {
        Box::pin(async move {
            let mut sb = self.clients.sb.clone();
            let s = sb
                .get_sandbox(v1::GetSandboxRequest {
                    sandbox_id: self.sandbox_id.clone(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            let rules = agentfense_proto::convert::rules_from_wire(&s.permissions)
                .map_err(|e| WsError::Failed(format!("the sandbox's rules: {e}")))?;
            let policy = agentfense_core::Policy::compile(rules)
                .map_err(|e| WsError::Failed(format!("the sandbox's rules: {e}")))?;
            let labels = s.labels.into_iter().collect();
            Ok(PolicyView {
                sandbox_id: s.id,
                roots: agentfense_server::mcp::project_roots(&labels),
                policy: Arc::new(policy),
                network: agentfense_server::mcp::network_json(&labels),
            })
        })
    }

    fn changes(&self) -> WsFuture<'_, Value> {
        Box::pin(async move {
            let mut rv = self.clients.rv.clone();
            let r = rv
                .list_changes(x::ListChangesRequest {
                    sandbox_id: self.sandbox_id.clone(),
                    paths: Vec::new(),
                    limit: 0,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            Ok(json!({
                "changes": r.changes.iter().map(change_json).collect::<Vec<_>>(),
                "truncated": r.truncated,
                "total": r.total,
            }))
        })
    }

    fn diff(&self, paths: Vec<String>) -> WsFuture<'_, (String, bool)> {
        Box::pin(async move {
            let mut rv = self.clients.rv.clone();
            let r = rv
                .get_diff(x::GetDiffRequest {
                    sandbox_id: self.sandbox_id.clone(),
                    paths,
                    max_bytes: 0,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            Ok((String::from_utf8_lossy(&r.diff).into_owned(), r.truncated))
        })
    }

    fn checkpoint(&self, label: String) -> WsFuture<'_, Value> {
        Box::pin(async move {
            let mut rv = self.clients.rv.clone();
            let c = rv
                .create_checkpoint(x::CreateCheckpointRequest {
                    sandbox_id: self.sandbox_id.clone(),
                    label,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            Ok(checkpoint_json(&c))
        })
    }

    fn restore(&self, cp: String, dry_run: bool) -> WsFuture<'_, Value> {
        Box::pin(async move {
            let mut rv = self.clients.rv.clone();
            let r = rv
                .restore_checkpoint(x::RestoreCheckpointRequest {
                    sandbox_id: self.sandbox_id.clone(),
                    checkpoint_id: cp,
                    dry_run,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            Ok(json!({
                "changes": r.changes.iter().map(change_json).collect::<Vec<_>>(),
                "restored": r.restored,
            }))
        })
    }
}
