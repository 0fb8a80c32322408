//! Client commands against a running server: `codebase`, `sandbox`, `exec`, `session`.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use agentfense_proto::agentfense_v1::{
    self as x, extensions_client::ExtensionsClient, review_client::ReviewClient,
};
use agentfense_proto::convert::rules_to_wire;
use agentfense_proto::v1::{
    self, codebase_service_client::CodebaseServiceClient,
    sandbox_service_client::SandboxServiceClient, upload_chunk::Content,
};
use anyhow::Context;
use clap::{Args, Subcommand};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The channel every client call goes through: adds `authorization: Bearer <key>` when a key
/// is configured.
type Authed = InterceptedService<Channel, ApiKey>;

/// Adds the API key to each call.
#[derive(Clone)]
pub(crate) struct ApiKey(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for ApiKey {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

use crate::PolicyArgs;

/// Where the server is.
#[derive(Debug, Clone, Args)]
pub struct Conn {
    /// gRPC endpoint of the server (`HOST:PORT`, `https://HOST:PORT` or `unix:///PATH`).
    #[arg(
        long,
        global = true,
        default_value = "localhost:9000",
        value_name = "HOST:PORT"
    )]
    pub endpoint: String,
    /// API key of an authenticated server (`agentfense keys create`); read from the
    /// environment so that it stays out of shell history and process listings.
    #[arg(
        long = "api-key",
        env = "AGENTFENSE_API_KEY",
        global = true,
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub api_key: Option<String>,
    /// Print JSON (the API's messages) instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

/// `agentfense codebase ...`
#[derive(Debug, Subcommand)]
pub enum CodebaseCmd {
    /// Create an empty codebase.
    ///
    /// Example: agentfense codebase create my-project --owner alice
    Create {
        /// Display name.
        name: String,
        /// Owner id.
        #[arg(long, default_value = "cli")]
        owner: String,
    },
    /// Upload a directory (honouring .gitignore and .sandboxignore) into a new or existing
    /// codebase, and print its id.
    ///
    /// Example: agentfense codebase upload ./project
    Upload {
        /// The project directory.
        dir: PathBuf,
        /// Upload into this codebase instead of creating one.
        #[arg(long, value_name = "ID")]
        codebase: Option<String>,
        /// Owner of a new codebase.
        #[arg(long, default_value = "cli")]
        owner: String,
    },
    /// List codebases.
    ///
    /// Example: agentfense codebase ls --owner alice
    Ls {
        /// Only this owner's.
        #[arg(long)]
        owner: Option<String>,
    },
    /// Delete a codebase (its sandboxes must be destroyed first).
    ///
    /// Example: agentfense codebase rm cb_0123456789abcdef
    Rm {
        /// Codebase id.
        id: String,
    },
}

/// `agentfense sandbox ...`
#[derive(Debug, Subcommand)]
pub enum SandboxCmd {
    /// Create a sandbox on a codebase (and start it with --start).
    ///
    /// Example: agentfense sandbox create cb_0123456789abcdef --preset agent-safe --start
    Create {
        /// Codebase id.
        codebase: String,
        #[command(flatten)]
        policy: PolicyArgs,
        /// Start it right away.
        #[arg(long)]
        start: bool,
        /// Label `KEY=VALUE` (repeatable).
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// Memory limit in MiB.
        #[arg(long, value_name = "MIB")]
        memory_mib: Option<i64>,
        /// Process limit.
        #[arg(long)]
        pids: Option<i64>,
        /// Runtime: `bwrap` or `docker` (default: the server's).
        #[arg(long, value_parser = ["bwrap", "docker"])]
        runtime: Option<String>,
        /// Docker image (docker runtime; default: the server's `runtime.docker.default_image`).
        #[arg(long)]
        image: Option<String>,
    },
    /// Start a sandbox.
    Start {
        /// Sandbox id.
        id: String,
    },
    /// Stop a sandbox (it can be started again).
    Stop {
        /// Sandbox id.
        id: String,
    },
    /// Destroy a sandbox.
    Rm {
        /// Sandbox id.
        id: String,
    },
    /// Show a sandbox.
    Get {
        /// Sandbox id.
        id: String,
    },
    /// List sandboxes.
    Ls {
        /// Only those of this codebase.
        #[arg(long)]
        codebase: Option<String>,
    },
    /// Replace a running or stopped sandbox's egress allow-list (it must have been created
    /// with the label agentfense.egress); connections the new list does not allow are closed.
    ///
    /// Example: agentfense sandbox egress sb_0123456789abcdef ''   (lock down: nothing)
    Egress {
        /// Sandbox id.
        id: String,
        /// Comma-separated entries, as in the label (`pypi.org, preset:registries`); empty
        /// allows nothing.
        egress: String,
    },
    /// Write a sandbox's pending changes into its codebase (sandboxes labelled
    /// agentfense.publish=manual).
    Publish {
        /// Sandbox id.
        id: String,
    },
    /// A running sandbox's resource use: CPU time, memory, processes, disk, denials.
    Metrics {
        /// Sandbox id.
        id: String,
    },
    /// Mint a token that may only run commands and sessions in this sandbox (printed alone on
    /// stdout, shown once).
    Token {
        /// Sandbox id.
        id: String,
        /// How long it lives (`1h`, `30m`); default: until the sandbox expires, at most a week.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
}

/// `agentfense exec SANDBOX -- COMMAND...`
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Sandbox id.
    pub sandbox: String,
    /// Timeout in seconds (default: the server's).
    #[arg(long)]
    pub timeout: Option<f64>,
    /// Working directory inside /workspace.
    #[arg(long)]
    pub workdir: Option<String>,
    /// Environment variable `KEY=VALUE` (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// The command: one argument is a shell command line (run with /bin/sh -c); several are a
    /// program and its arguments, run exactly as given.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// `agentfense session ...`
#[derive(Debug, Subcommand)]
pub enum SessionCmd {
    /// Start a persistent shell in a sandbox and print its id.
    ///
    /// Example: agentfense session create sb_0123456789abcdef --shell /bin/bash
    Create {
        /// Sandbox id.
        sandbox: String,
        /// Shell.
        #[arg(long, default_value = "/bin/sh")]
        shell: String,
    },
    /// Run one command in a session.
    ///
    /// Example: agentfense session exec sess_0123456789abcdef -- cd src
    Exec {
        /// Session id.
        session: String,
        /// Timeout in seconds.
        #[arg(long)]
        timeout: Option<f64>,
        /// The command.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// List a sandbox's sessions.
    Ls {
        /// Sandbox id.
        sandbox: String,
    },
    /// Destroy a session.
    Rm {
        /// Session id.
        session: String,
    },
}

pub(crate) struct Clients {
    cb: CodebaseServiceClient<Authed>,
    /// `sandbox.v1.SandboxService`.
    pub(crate) sb: SandboxServiceClient<Authed>,
    x: ExtensionsClient<Authed>,
    /// `agentfense.v1.Review`.
    pub(crate) rv: ReviewClient<Authed>,
}

pub(crate) async fn connect(conn: &Conn) -> anyhow::Result<Clients> {
    let url = if conn.endpoint.contains("://") || conn.endpoint.starts_with("unix:") {
        conn.endpoint.clone()
    } else {
        format!("http://{}", conn.endpoint)
    };
    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .with_context(|| format!("invalid --endpoint {:?}", conn.endpoint))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| {
            format!("cannot reach the server at {url}; is `agentfense serve` running? (--endpoint)")
        })?;
    let key = match &conn.api_key {
        None => ApiKey(None),
        Some(k) => {
            ApiKey(Some(format!("Bearer {}", k.trim()).parse().map_err(
                |_| anyhow::anyhow!("--api-key is not a valid key"),
            )?))
        }
    };
    Ok(Clients {
        cb: CodebaseServiceClient::with_interceptor(channel.clone(), key.clone())
            .max_decoding_message_size(4 << 20),
        sb: SandboxServiceClient::with_interceptor(channel.clone(), key.clone())
            .max_decoding_message_size(4 << 20),
        x: ExtensionsClient::with_interceptor(channel.clone(), key.clone()),
        rv: ReviewClient::with_interceptor(channel, key).max_decoding_message_size(256 << 20),
    })
}

pub(crate) fn status(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", e.message(), e.code())
}

fn kv(list: &[String], what: &str) -> anyhow::Result<HashMap<String, String>> {
    list.iter()
        .map(|s| {
            s.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .with_context(|| format!("{what} {s:?} is not KEY=VALUE"))
        })
        .collect()
}

fn timeout(secs: Option<f64>) -> anyhow::Result<Option<agentfense_proto::pbjson_types::Duration>> {
    match secs {
        None => Ok(None),
        Some(s) if s.is_finite() && s > 0.0 => Ok(Some(Duration::from_secs_f64(s).into())),
        Some(s) => anyhow::bail!("--timeout {s} must be a positive number of seconds"),
    }
}

pub(crate) fn print_json(out: &mut dyn Write, v: &impl serde::Serialize) -> anyhow::Result<()> {
    writeln!(out, "{}", serde_json::to_string_pretty(v)?)?;
    Ok(())
}

fn status_name(code: i32) -> String {
    v1::SandboxStatus::try_from(code)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("SANDBOX_STATUS_")
                .to_lowercase()
        })
        .unwrap_or_else(|_| code.to_string())
}

fn print_sandbox(out: &mut dyn Write, json: bool, s: &v1::Sandbox) -> anyhow::Result<()> {
    if json {
        return print_json(out, s);
    }
    writeln!(
        out,
        "{}  {:<8} codebase {}  {} rule(s)",
        s.id,
        status_name(s.status),
        s.codebase_id,
        s.permissions.len()
    )?;
    Ok(())
}

/// Follows `next_page_token`s until the last page.
async fn all_pages<T, F, Fut>(mut fetch: F) -> anyhow::Result<Vec<T>>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<(Vec<T>, String)>>,
{
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let (items, next) = fetch(token).await?;
        all.extend(items);
        if next.is_empty() {
            return Ok(all);
        }
        token = next;
    }
}

pub(crate) fn block_on<F: std::future::Future>(f: F) -> anyhow::Result<F::Output> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(f))
}

pub(crate) fn codebase(
    cmd: CodebaseCmd,
    conn: Conn,
    out: &mut dyn Write,
) -> anyhow::Result<ExitCode> {
    block_on(async move {
        let mut c = connect(&conn).await?;
        match cmd {
            CodebaseCmd::Create { name, owner } => {
                let r =
                    c.cb.create_codebase(v1::CreateCodebaseRequest {
                        name,
                        owner_id: owner,
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                if conn.json {
                    print_json(out, &r)?;
                } else {
                    writeln!(out, "{}", r.id)?;
                }
            }
            CodebaseCmd::Upload {
                dir,
                codebase,
                owner,
            } => {
                anyhow::ensure!(dir.is_dir(), "{} is not a directory", dir.display());
                let id = match codebase {
                    Some(id) => id,
                    None => {
                        let name = dir
                            .canonicalize()?
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_else(|| "project".into());
                        c.cb.create_codebase(v1::CreateCodebaseRequest {
                            name,
                            owner_id: owner,
                        })
                        .await
                        .map_err(status)?
                        .into_inner()
                        .id
                    }
                };
                let (files, bytes) = upload_dir(&mut c.cb, &id, &dir).await?;
                if conn.json {
                    print_json(
                        out,
                        &serde_json::json!({"codebase_id": id, "files": files, "bytes": bytes}),
                    )?;
                } else {
                    eprintln!("uploaded {files} file(s), {bytes} bytes");
                    writeln!(out, "{id}")?;
                }
            }
            CodebaseCmd::Ls { owner } => {
                let owner = owner.unwrap_or_default();
                let all = all_pages(|page_token| {
                    let (mut client, owner_id) = (c.cb.clone(), owner.clone());
                    async move {
                        let r = client
                            .list_codebases(v1::ListCodebasesRequest {
                                owner_id,
                                page_size: 500,
                                page_token,
                            })
                            .await
                            .map_err(status)?
                            .into_inner();
                        Ok((r.codebases, r.next_page_token))
                    }
                })
                .await?;
                if conn.json {
                    print_json(out, &all)?;
                } else {
                    for cb in all {
                        writeln!(
                            out,
                            "{}  {:<24} owner {:<12} {} file(s), {} bytes",
                            cb.id, cb.name, cb.owner_id, cb.file_count, cb.size
                        )?;
                    }
                }
            }
            CodebaseCmd::Rm { id } => {
                c.cb.delete_codebase(v1::DeleteCodebaseRequest {
                    codebase_id: id.clone(),
                })
                .await
                .map_err(status)?;
                if !conn.json {
                    writeln!(out, "deleted {id}")?;
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })?
}

/// Uploads every file below `dir` that `.gitignore`/`.sandboxignore` do not exclude.
async fn upload_dir(
    cb: &mut CodebaseServiceClient<Authed>,
    id: &str,
    dir: &Path,
) -> anyhow::Result<(u64, u64)> {
    let mut walker = ignore::WalkBuilder::new(dir);
    walker
        .hidden(false)
        .git_ignore(true)
        .git_exclude(false)
        .git_global(false)
        .require_git(false)
        .add_custom_ignore_filename(".sandboxignore")
        .filter_entry(|e| e.file_name() != ".git");
    let mut files = 0u64;
    let mut bytes = 0u64;
    for entry in walker.build() {
        let entry = entry.context("cannot walk the directory")?;
        if !entry.file_type().is_some_and(|t| t.is_file()) {
            continue;
        }
        let rel = entry.path().strip_prefix(dir).unwrap_or(entry.path());
        let rel_str = rel.to_string_lossy().into_owned();
        let data = std::fs::read(entry.path())
            .with_context(|| format!("cannot read {}", entry.path().display()))?;
        let mut msgs = vec![v1::UploadChunk {
            content: Some(Content::Metadata(v1::upload_chunk::Metadata {
                codebase_id: id.to_owned(),
                file_path: rel_str.clone(),
                total_size: data.len() as i64,
            })),
        }];
        msgs.extend(data.chunks(64 << 10).map(|c| v1::UploadChunk {
            content: Some(Content::Data(c.to_vec())),
        }));
        cb.upload_files(tokio_stream_iter(msgs))
            .await
            .map_err(|e| anyhow::anyhow!("uploading {rel_str}: {}", e.message()))?;
        files += 1;
        bytes += data.len() as u64;
        if files.is_multiple_of(200) {
            eprintln!("  {files} files, {bytes} bytes ...");
        }
    }
    Ok((files, bytes))
}

fn tokio_stream_iter<T: Send + 'static>(
    v: Vec<T>,
) -> impl tonic::codegen::tokio_stream::Stream<Item = T> + Send {
    tonic::codegen::tokio_stream::iter(v)
}

pub(crate) fn sandbox(
    cmd: SandboxCmd,
    conn: Conn,
    out: &mut dyn Write,
) -> anyhow::Result<ExitCode> {
    block_on(async move {
        let mut c = connect(&conn).await?;
        let json = conn.json;
        match cmd {
            SandboxCmd::Create {
                codebase,
                policy,
                start,
                labels,
                memory_mib,
                pids,
                runtime,
                image,
            } => {
                let rules = policy.rules()?;
                let resources =
                    (memory_mib.is_some() || pids.is_some()).then(|| v1::ResourceLimits {
                        memory_bytes: memory_mib.unwrap_or(0) << 20,
                        pids_limit: pids.unwrap_or(0),
                        ..Default::default()
                    });
                let mut s =
                    c.sb.create_sandbox(v1::CreateSandboxRequest {
                        codebase_id: codebase,
                        permissions: rules_to_wire(&rules),
                        labels: kv(&labels, "--label")?,
                        runtime: match runtime.as_deref() {
                            Some("bwrap") => v1::RuntimeType::Bwrap,
                            Some("docker") => v1::RuntimeType::Docker,
                            _ => v1::RuntimeType::Unspecified,
                        } as i32,
                        image: image.unwrap_or_default(),
                        resources,
                        ..Default::default()
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                if start {
                    s =
                        c.sb.start_sandbox(v1::StartSandboxRequest {
                            sandbox_id: s.id.clone(),
                        })
                        .await
                        .map_err(status)?
                        .into_inner();
                }
                if json {
                    print_json(out, &s)?
                } else {
                    writeln!(out, "{}", s.id)?
                }
            }
            SandboxCmd::Start { id } => {
                let s =
                    c.sb.start_sandbox(v1::StartSandboxRequest { sandbox_id: id })
                        .await
                        .map_err(status)?
                        .into_inner();
                print_sandbox(out, json, &s)?;
            }
            SandboxCmd::Stop { id } => {
                let s =
                    c.sb.stop_sandbox(v1::StopSandboxRequest { sandbox_id: id })
                        .await
                        .map_err(status)?
                        .into_inner();
                print_sandbox(out, json, &s)?;
            }
            SandboxCmd::Get { id } => {
                let s =
                    c.sb.get_sandbox(v1::GetSandboxRequest { sandbox_id: id })
                        .await
                        .map_err(status)?
                        .into_inner();
                print_sandbox(out, json, &s)?;
            }
            SandboxCmd::Egress { id, egress } => {
                c.x.set_sandbox_egress(x::SetSandboxEgressRequest {
                    sandbox_id: id.clone(),
                    egress: egress.clone(),
                })
                .await
                .map_err(status)?;
                if json {
                    let v = serde_json::json!({ "sandbox_id": id, "egress": egress });
                    writeln!(out, "{v}")?;
                } else {
                    writeln!(out, "{id}: egress set to {egress:?}")?;
                }
            }
            SandboxCmd::Publish { id } => {
                let r =
                    c.x.publish_sandbox(x::PublishSandboxRequest { sandbox_id: id })
                        .await
                        .map_err(status)?
                        .into_inner();
                if json {
                    let v = serde_json::json!({
                        "written": r.written, "deleted": r.deleted, "conflicts": r.conflicts,
                        "failed": r.failed,
                    });
                    writeln!(out, "{v}")?;
                } else {
                    for p in &r.written {
                        writeln!(out, "written  {p}")?;
                    }
                    for p in &r.deleted {
                        writeln!(out, "deleted  {p}")?;
                    }
                    for p in &r.conflicts {
                        writeln!(out, "conflict {p} (changed in the codebase meanwhile)")?;
                    }
                    for p in &r.failed {
                        writeln!(out, "failed   {p} (still pending in the sandbox)")?;
                    }
                }
            }
            SandboxCmd::Token { id, ttl } => {
                let ttl = ttl.map(|d| agentfense_proto::pbjson_types::Duration {
                    seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                    nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
                });
                let t =
                    c.x.create_sandbox_token(x::CreateSandboxTokenRequest {
                        sandbox_id: id,
                        ttl,
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                writeln!(out, "{}", t.token)?;
                eprintln!(
                    "token id {} (revoke with `agentfense keys revoke`)",
                    t.token_id
                );
            }
            SandboxCmd::Metrics { id } => {
                let m =
                    c.x.get_sandbox_metrics(x::GetSandboxMetricsRequest { sandbox_id: id })
                        .await
                        .map_err(status)?
                        .into_inner();
                if json {
                    print_json(
                        out,
                        &serde_json::json!({
                            "sandbox_id": m.sandbox_id,
                            "cpu_usec": m.cpu_usec,
                            "memory_bytes": m.memory_bytes,
                            "pids": m.pids,
                            "disk_bytes": m.disk_bytes,
                            "disk_entries": m.disk_entries,
                            "denials": m.denials,
                        }),
                    )?;
                } else {
                    let opt = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
                    writeln!(
                        out,
                        "cpu {} ms  memory {} bytes  pids {}  disk {} bytes / {} entries  denials {}",
                        m.cpu_usec
                            .map_or("-".to_owned(), |u| (u / 1000).to_string()),
                        opt(m.memory_bytes),
                        opt(m.pids),
                        m.disk_bytes,
                        m.disk_entries,
                        m.denials
                    )?;
                }
            }
            SandboxCmd::Rm { id } => {
                c.sb.destroy_sandbox(v1::DestroySandboxRequest {
                    sandbox_id: id.clone(),
                })
                .await
                .map_err(status)?;
                if !json {
                    writeln!(out, "destroyed {id}")?;
                }
            }
            SandboxCmd::Ls { codebase } => {
                let codebase = codebase.unwrap_or_default();
                let all = all_pages(|page_token| {
                    let (mut client, codebase_id) = (c.sb.clone(), codebase.clone());
                    async move {
                        let r = client
                            .list_sandboxes(v1::ListSandboxesRequest {
                                codebase_id,
                                page_size: 500,
                                page_token,
                            })
                            .await
                            .map_err(status)?
                            .into_inner();
                        Ok((r.sandboxes, r.next_page_token))
                    }
                })
                .await?;
                if json {
                    print_json(out, &all)?;
                } else {
                    for s in &all {
                        print_sandbox(out, false, s)?;
                    }
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })?
}

/// Exit code of the CLI for a command's exit code (shells use 0..=255).
fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(if code < 0 { 255 } else { (code % 256) as u8 }))
}

pub(crate) fn exec(args: ExecArgs, conn: Conn, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    block_on(async move {
        let mut c = connect(&conn).await?;
        let req = v1::ExecRequest {
            sandbox_id: args.sandbox,
            command: crate::command_line(&args.command)?,
            env: kv(&args.env, "--env")?,
            workdir: args.workdir.unwrap_or_default(),
            timeout: timeout(args.timeout)?,
            stdin: String::new(),
        };
        if conn.json {
            let r = c.sb.exec(req).await.map_err(status)?.into_inner();
            print_json(out, &r)?;
            return Ok(exit_code(r.exit_code));
        }
        // Stream, so that long commands show output as it comes.
        let resp = c.sb.exec_stream(req).await.map_err(status)?;
        let mut stream = resp.into_inner();
        while let Some(msg) = stream.message().await.map_err(status)? {
            if msg.r#type == v1::exec_output::OutputType::Stderr as i32 {
                let mut e = std::io::stderr();
                e.write_all(&msg.data)?;
                e.flush()?;
            } else {
                out.write_all(&msg.data)?;
                out.flush()?;
            }
        }
        let code = stream
            .trailers()
            .await
            .map_err(status)?
            .and_then(|t| {
                t.get("x-exit-code")
                    .and_then(|v| v.to_str().ok()?.parse::<i32>().ok())
            })
            .unwrap_or(0);
        Ok(exit_code(code))
    })?
}

pub(crate) fn session(
    cmd: SessionCmd,
    conn: Conn,
    out: &mut dyn Write,
) -> anyhow::Result<ExitCode> {
    block_on(async move {
        let mut c = connect(&conn).await?;
        match cmd {
            SessionCmd::Create { sandbox, shell } => {
                let s =
                    c.sb.create_session(v1::CreateSessionRequest {
                        sandbox_id: sandbox,
                        shell,
                        env: HashMap::new(),
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                if conn.json {
                    print_json(out, &s)?
                } else {
                    writeln!(out, "{}", s.id)?
                }
            }
            SessionCmd::Exec {
                session,
                timeout: t,
                command,
            } => {
                let r =
                    c.sb.session_exec(v1::SessionExecRequest {
                        session_id: session,
                        command: crate::command_line(&command)?,
                        timeout: timeout(t)?,
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                if conn.json {
                    print_json(out, &r)?;
                } else {
                    out.write_all(r.stdout.as_bytes())?;
                    eprint!("{}", r.stderr);
                }
                return Ok(exit_code(r.exit_code));
            }
            SessionCmd::Ls { sandbox } => {
                let r =
                    c.sb.list_sessions(v1::ListSessionsRequest {
                        sandbox_id: sandbox,
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                if conn.json {
                    print_json(out, &r.sessions)?;
                } else {
                    for s in r.sessions {
                        writeln!(
                            out,
                            "{}  {}  {}",
                            s.id,
                            s.shell,
                            if s.status == v1::SessionStatus::Active as i32 {
                                "active"
                            } else {
                                "closed"
                            }
                        )?;
                    }
                }
            }
            SessionCmd::Rm { session } => {
                c.sb.destroy_session(v1::DestroySessionRequest {
                    session_id: session.clone(),
                })
                .await
                .map_err(status)?;
                if !conn.json {
                    writeln!(out, "destroyed {session}")?;
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })?
}
