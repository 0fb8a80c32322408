//! Review commands: `changes`, `diff`, `apply`, `discard`, `checkpoint`, for a sandbox on a
//! server (`sb_...`, through `agentfense.v1.Review`) or the changes `agentfense run` keeps for
//! a local directory.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use agentfense_fs::review::patch::PatchOptions;
use agentfense_fs::{ApplyRefusal, Delta, Selection, View};
use agentfense_proto::agentfense_v1 as x;
use agentfense_server::grpc::review::{checkpoint as wire_checkpoint, path_change};
use agentfense_server::rest::{change_json, checkpoint_json};
use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::json;

use crate::client_cmd::{Conn, block_on, connect, print_json, status};

/// What a review command works on.
#[derive(Debug, Args)]
pub struct Target {
    /// A sandbox id on the server (`sb_...`), or a project directory whose changes
    /// `agentfense run` kept.
    #[arg(value_name = "SANDBOX|DIR")]
    pub target: String,
    /// Only paths matching this glob, or below it (repeatable; `src/**`, `*.md`, `docs`).
    #[arg(long = "path", value_name = "GLOB")]
    pub paths: Vec<String>,
    /// Where local runs keep their changes (default: the server's data directory).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Connection options (server sandboxes).
    #[command(flatten)]
    pub conn: Conn,
}

impl Target {
    /// A server sandbox id, unless a directory of that name exists.
    fn sandbox(&self) -> Option<&str> {
        (self.target.starts_with("sb_") && !Path::new(&self.target).exists())
            .then_some(self.target.as_str())
    }

    /// The kept delta of a local directory, locked, or a clear error.
    fn local(&self) -> anyhow::Result<(crate::local::KeptDelta, Delta)> {
        let kept = crate::local::kept_delta(Path::new(&self.target), self.data_dir.as_deref())?
            .with_context(|| {
                format!(
                    "no changes are kept for {} (agentfense run keeps them unless --apply or \
                     --discard)",
                    self.target
                )
            })?;
        let delta = Delta::open(&kept.dir, &kept.delta)
            .with_context(|| format!("cannot open the kept changes in {}", kept.delta.display()))?;
        Ok((kept, delta))
    }

    fn selection(&self) -> anyhow::Result<Selection> {
        Selection::globs(&self.paths).map_err(|e| anyhow::anyhow!("--path: {e}"))
    }
}

/// `agentfense changes`
#[derive(Debug, Args)]
pub struct ChangesArgs {
    #[command(flatten)]
    target: Target,
    /// Most changes listed besides deletions (default 10000).
    #[arg(long)]
    limit: Option<u32>,
}

/// `agentfense diff`
#[derive(Debug, Args)]
pub struct DiffArgs {
    #[command(flatten)]
    target: Target,
    /// Diff from this checkpoint (or `base`, the default: the codebase).
    #[arg(long, value_name = "CHECKPOINT")]
    from: Option<String>,
    /// Diff to this checkpoint (or `base`; default: the sandbox now).
    #[arg(long, value_name = "CHECKPOINT")]
    to: Option<String>,
}

/// `agentfense apply`
#[derive(Debug, Args)]
pub struct ApplyArgs {
    #[command(flatten)]
    target: Target,
    /// Apply only if PATH's codebase copy still has this SHA-256 (as `changes` showed it;
    /// `absent`: it must not exist) (repeatable).
    #[arg(long = "expect", value_name = "PATH=SHA256")]
    expect: Vec<String>,
    /// Apply only if the sandbox's own version of PATH still has this SHA-256 (the `sha256`
    /// `changes` showed; `absent` for a deletion): what is applied is what was reviewed
    /// (repeatable).
    #[arg(long = "expect-content", value_name = "PATH=SHA256")]
    expect_content: Vec<String>,
}

/// `agentfense checkpoint ...`
#[derive(Debug, Subcommand)]
pub enum CheckpointCmd {
    /// Save the sandbox's changes as a checkpoint.
    Create {
        #[command(flatten)]
        target: Target,
        /// What to call it.
        #[arg(long, default_value = "")]
        label: String,
    },
    /// List the checkpoints, oldest first.
    Ls {
        #[command(flatten)]
        target: Target,
    },
    /// Bring the sandbox back to a checkpoint (changes made since are dropped).
    Restore {
        #[command(flatten)]
        target: Target,
        /// The checkpoint (`cp-<n>`).
        checkpoint: String,
        /// Only show what the restore would change.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete a checkpoint.
    Rm {
        #[command(flatten)]
        target: Target,
        /// The checkpoint (`cp-<n>`).
        checkpoint: String,
    },
}

fn text_change(c: &x::PathChange) -> String {
    let mut extra = Vec::new();
    if c.status == "mode_changed"
        || (c.status == "modified" && c.mode != c.old_mode && c.old_mode != 0)
    {
        extra.push(format!("mode {:o} -> {:o}", c.old_mode, c.mode));
    }
    if c.status == "type_changed" {
        extra.push(format!("{} -> {}", c.old_kind, c.kind));
    }
    if c.binary {
        extra.push("binary".into());
    }
    if c.base_moved {
        extra.push("the codebase changed since: apply refuses it".into());
    }
    if c.hidden {
        extra.push("the codebase's side is hidden by the rules".into());
    }
    let extra = if extra.is_empty() {
        String::new()
    } else {
        format!("  ({})", extra.join(", "))
    };
    let dir = if c.kind == "directory" { "/" } else { "" };
    format!(
        "{:<12} {}{dir}{extra}",
        c.status,
        crate::terminal::escape(&c.path)
    )
}

fn print_changes(
    out: &mut dyn Write,
    json: bool,
    changes: &[x::PathChange],
    truncated: bool,
    total: usize,
) -> anyhow::Result<()> {
    if json {
        return print_json(
            out,
            &json!({
                "changes": changes.iter().map(change_json).collect::<Vec<_>>(),
                "truncated": truncated,
                "total": total,
            }),
        );
    }
    for c in changes {
        writeln!(out, "{}", text_change(c))?;
    }
    if truncated {
        writeln!(
            out,
            "... {} more change(s) not listed (--limit, --path)",
            total.saturating_sub(changes.len())
        )?;
    }
    Ok(())
}

/// `agentfense changes`
pub(crate) fn changes(a: ChangesArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let limit = a.limit.unwrap_or(0) as usize;
    let t = &a.target;
    let (list, truncated, total) = match t.sandbox() {
        Some(sb) => block_on(async {
            let mut c = connect(&t.conn).await?;
            let r =
                c.rv.list_changes(x::ListChangesRequest {
                    sandbox_id: sb.to_owned(),
                    paths: t.paths.clone(),
                    limit: i32::try_from(limit).unwrap_or(i32::MAX),
                })
                .await
                .map_err(status)?
                .into_inner();
            let total = usize::try_from(r.total).unwrap_or(0);
            anyhow::Ok((r.changes, r.truncated, total))
        })??,
        None => {
            let (_kept, d) = t.local()?;
            let set = d.review(&t.selection()?, if limit == 0 { 10_000 } else { limit })?;
            (
                set.changes.iter().map(path_change).collect(),
                set.truncated,
                set.total,
            )
        }
    };
    print_changes(out, t.conn.json, &list, truncated, total)?;
    Ok(ExitCode::SUCCESS)
}

/// A state named on the command line (`base`, `current`, `cp-<n>`) of a local delta.
fn local_view<'a>(
    d: &'a Delta,
    name: Option<&str>,
    opened: &'a mut Option<Delta>,
    default: &str,
) -> anyhow::Result<View<'a>> {
    match name.unwrap_or(default) {
        "base" => Ok(View::Base(d)),
        "" | "current" => Ok(View::Merged(d)),
        id => {
            *opened = Some(d.open_checkpoint(id)?);
            Ok(View::Merged(opened.as_ref().unwrap_or(d)))
        }
    }
}

/// `agentfense diff`
pub(crate) fn diff(a: DiffArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let t = &a.target;
    let (text, truncated) = match t.sandbox() {
        Some(sb) => block_on(async {
            let mut c = connect(&t.conn).await?;
            let from = a.from.clone().unwrap_or_else(|| "base".into());
            if from == "base" && a.to.as_deref().is_none_or(|s| s == "current") {
                let r =
                    c.rv.get_diff(x::GetDiffRequest {
                        sandbox_id: sb.to_owned(),
                        paths: t.paths.clone(),
                        max_bytes: 0,
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                return anyhow::Ok((r.diff, r.truncated));
            }
            let r =
                c.rv.diff_checkpoints(x::DiffCheckpointsRequest {
                    sandbox_id: sb.to_owned(),
                    checkpoint_id: from,
                    to: a.to.clone().unwrap_or_default(),
                    paths: t.paths.clone(),
                    max_bytes: 0,
                })
                .await
                .map_err(status)?
                .into_inner();
            anyhow::Ok((r.diff, r.truncated))
        })??,
        None => {
            let (_kept, d) = t.local()?;
            let (mut fa, mut fb) = (None, None);
            let from = local_view(&d, a.from.as_deref(), &mut fa, "base")?;
            let to = local_view(&d, a.to.as_deref(), &mut fb, "current")?;
            let p = agentfense_fs::diff(from, to, &t.selection()?, &PatchOptions::default())?;
            (p.text, p.truncated)
        }
    };
    out.write_all(&text)?;
    if truncated {
        eprintln!(
            "agentfense: the diff is truncated: files were left out past its size cap (--path)"
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn report(
    out: &mut dyn Write,
    json: bool,
    written: &[String],
    deleted: &[String],
    failed: &[String],
) -> anyhow::Result<ExitCode> {
    if json {
        print_json(
            out,
            &json!({ "written": written, "deleted": deleted, "failed": failed }),
        )?;
    } else {
        for p in written {
            writeln!(out, "written  {}", crate::terminal::escape(p))?;
        }
        for p in deleted {
            writeln!(out, "deleted  {}", crate::terminal::escape(p))?;
        }
        for p in failed {
            writeln!(out, "FAILED   {}", crate::terminal::escape(p))?;
        }
    }
    Ok(if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn strings(v: &[PathBuf]) -> Vec<String> {
    v.iter().map(|p| p.display().to_string()).collect()
}

/// `agentfense apply`
pub(crate) fn apply(a: ApplyArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let t = &a.target;
    let pairs = |list: &[String], flag: &str| -> anyhow::Result<BTreeMap<String, String>> {
        list.iter()
            .map(|e| {
                e.rsplit_once('=')
                    .map(|(p, sha)| (p.to_owned(), sha.to_owned()))
                    .with_context(|| format!("{flag} {e:?} is not PATH=SHA256"))
            })
            .collect()
    };
    let expected = pairs(&a.expect, "--expect")?;
    let content = pairs(&a.expect_content, "--expect-content")?;
    let (written, deleted, failed) = match t.sandbox() {
        Some(sb) => block_on(async {
            let mut c = connect(&t.conn).await?;
            let r =
                c.rv.apply_changes(x::ApplyChangesRequest {
                    sandbox_id: sb.to_owned(),
                    paths: t.paths.clone(),
                    expected: expected.into_iter().collect(),
                    expected_content: content.into_iter().collect(),
                })
                .await
                .map_err(status)?
                .into_inner();
            anyhow::Ok((r.written, r.deleted, r.failed))
        })??,
        None => {
            let (kept, d) = t.local()?;
            let digests = |m: BTreeMap<String, String>, flag: &str| {
                m.into_iter()
                    .map(|(p, sha)| {
                        let digest = agentfense_fs::parse_expectation(&sha).with_context(|| {
                            format!("{flag} {p}={sha}: not a SHA-256 in hex (or \"absent\")")
                        })?;
                        let rel = p.trim_start_matches("./").trim_start_matches('/');
                        anyhow::Ok((PathBuf::from(rel), digest))
                    })
                    .collect::<anyhow::Result<BTreeMap<_, _>>>()
            };
            let want = digests(expected, "--expect")?;
            let seen = digests(content, "--expect-content")?;
            // Each path is judged by the rules of the run that kept the changes, as
            // `run --apply` would have judged it.
            let policy = kept.policy.clone().context(
                "the rules these changes were made under are not recorded (kept by an older \
                 version): run again, or use agentfense run --apply",
            )?;
            let r = agentfense_fs::apply_unmounted(
                &d,
                &policy,
                &agentfense_fs::Mounts::new(),
                &t.selection()?,
                &want,
                &seen,
            )
            .map_err(|r| match r {
                ApplyRefusal::Conflicts(c) => anyhow::anyhow!(
                    "nothing applied: {} path(s) in {} cannot be applied as they are: {}",
                    c.len(),
                    d.lower_path().display(),
                    c.iter()
                        .map(|c| format!("{}: {}", c.path.display(), c.reason))
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
                ApplyRefusal::NotPending(p) => anyhow::anyhow!(
                    "--expect names path(s) with no selected change: {}",
                    strings(&p).join(", ")
                ),
                ApplyRefusal::NotWritable(p) => anyhow::anyhow!(
                    "nothing applied: the run's rules do not let the sandbox write {}",
                    strings(&p).join(", ")
                ),
                ApplyRefusal::Fs(e) => anyhow::Error::new(e).context("cannot apply"),
            })?;
            (
                strings(&r.written),
                strings(&r.deleted),
                r.failed
                    .iter()
                    .map(|(p, why)| format!("{}: {why}", p.display()))
                    .collect(),
            )
        }
    };
    report(out, t.conn.json, &written, &deleted, &failed)
}

/// `agentfense discard`
pub(crate) fn discard(t: Target, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let gone = match t.sandbox() {
        Some(sb) => block_on(async {
            let mut c = connect(&t.conn).await?;
            let r =
                c.rv.discard_changes(x::DiscardChangesRequest {
                    sandbox_id: sb.to_owned(),
                    paths: t.paths.clone(),
                })
                .await
                .map_err(status)?
                .into_inner();
            anyhow::Ok(r.discarded)
        })??,
        None => {
            let (_kept, d) = t.local()?;
            strings(&d.discard(&t.selection()?)?)
        }
    };
    if t.conn.json {
        print_json(out, &json!({ "discarded": gone }))?;
    } else {
        for p in &gone {
            writeln!(out, "discarded  {}", crate::terminal::escape(p))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_checkpoints(out: &mut dyn Write, json: bool, cps: &[x::Checkpoint]) -> anyhow::Result<()> {
    if json {
        return print_json(
            out,
            &json!({ "checkpoints": cps.iter().map(checkpoint_json).collect::<Vec<_>>() }),
        );
    }
    for c in cps {
        let v = checkpoint_json(c);
        writeln!(
            out,
            "{}  {}  {} path(s)  {}",
            c.id,
            v["createdAt"].as_str().unwrap_or(""),
            c.paths,
            crate::terminal::escape(&c.label)
        )?;
    }
    Ok(())
}

/// `agentfense checkpoint ...`
pub(crate) fn checkpoint(cmd: CheckpointCmd, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    match cmd {
        CheckpointCmd::Create { target: t, label } => {
            let cp = match t.sandbox() {
                Some(sb) => block_on(async {
                    let mut c = connect(&t.conn).await?;
                    let r =
                        c.rv.create_checkpoint(x::CreateCheckpointRequest {
                            sandbox_id: sb.to_owned(),
                            label,
                        })
                        .await
                        .map_err(status)?
                        .into_inner();
                    anyhow::Ok(r)
                })??,
                None => {
                    let (_kept, d) = t.local()?;
                    wire_checkpoint(&d.checkpoint(&label)?)
                }
            };
            if t.conn.json {
                print_json(out, &checkpoint_json(&cp))?;
            } else {
                writeln!(out, "{}", cp.id)?;
            }
        }
        CheckpointCmd::Ls { target: t } => {
            let cps = match t.sandbox() {
                Some(sb) => block_on(async {
                    let mut c = connect(&t.conn).await?;
                    let r =
                        c.rv.list_checkpoints(x::ListCheckpointsRequest {
                            sandbox_id: sb.to_owned(),
                        })
                        .await
                        .map_err(status)?
                        .into_inner();
                    anyhow::Ok(r.checkpoints)
                })??,
                None => {
                    let (_kept, d) = t.local()?;
                    d.checkpoints()?.iter().map(wire_checkpoint).collect()
                }
            };
            print_checkpoints(out, t.conn.json, &cps)?;
        }
        CheckpointCmd::Restore {
            target: t,
            checkpoint,
            dry_run,
        } => {
            let changes = match t.sandbox() {
                Some(sb) => block_on(async {
                    let mut c = connect(&t.conn).await?;
                    let r =
                        c.rv.restore_checkpoint(x::RestoreCheckpointRequest {
                            sandbox_id: sb.to_owned(),
                            checkpoint_id: checkpoint.clone(),
                            dry_run,
                        })
                        .await
                        .map_err(status)?
                        .into_inner();
                    anyhow::Ok(r.changes)
                })??,
                None => {
                    let (_kept, d) = t.local()?;
                    let cp = d.open_checkpoint(&checkpoint)?;
                    let set = agentfense_fs::compare(
                        View::Merged(&d),
                        View::Merged(&cp),
                        &Selection::all(),
                        0,
                    )?;
                    drop(cp);
                    if !dry_run {
                        d.restore_checkpoint(&checkpoint)?;
                    }
                    set.changes.iter().map(path_change).collect()
                }
            };
            let n = changes.len();
            print_changes(out, t.conn.json, &changes, false, n)?;
            if !t.conn.json {
                let verb = if dry_run { "would change" } else { "changed" };
                eprintln!("agentfense: restoring {checkpoint} {verb} {n} path(s)");
            }
        }
        CheckpointCmd::Rm {
            target: t,
            checkpoint,
        } => match t.sandbox() {
            Some(sb) => block_on(async {
                let mut c = connect(&t.conn).await?;
                c.rv.delete_checkpoint(x::DeleteCheckpointRequest {
                    sandbox_id: sb.to_owned(),
                    checkpoint_id: checkpoint,
                })
                .await
                .map_err(status)?;
                anyhow::Ok(())
            })??,
            None => {
                let (_kept, d) = t.local()?;
                d.delete_checkpoint(&checkpoint)?;
            }
        },
    }
    Ok(ExitCode::SUCCESS)
}
