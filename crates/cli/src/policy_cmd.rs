//! `agentfense policy explain|show` and `agentfense presets`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use agentfense_core::{Cursor, Level, NodeKind, Policy, SandboxPath, presets};
use anyhow::Context;
use clap::Subcommand;
use serde::Serialize;

use crate::PolicyArgs;
use crate::host_tree::HostTree;

/// `agentfense policy ...`
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// For each path, print its level and the rule that decided it.
    ///
    /// A path ending in `/` is treated as a directory; with `--root DIR` the kind is read from
    /// the real tree instead, and a directory shown only for traversal is shown only if
    /// something below it in that tree is visible (as the mount does).
    ///
    /// Example: agentfense policy explain --preset agent-safe /.env /src/main.py /output/
    Explain {
        #[command(flatten)]
        policy: PolicyArgs,
        /// Take each path's kind (file or directory) from this directory's tree.
        #[arg(long, value_name = "DIR")]
        root: Option<PathBuf>,
        /// Print JSON lines instead of text.
        #[arg(long)]
        json: bool,
        /// Paths inside the sandbox, e.g. `/src/main.py`.
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<String>,
    },
    /// Print a directory tree as the agent would see it, with each entry's level.
    ///
    /// Hidden entries are omitted unless `--reveal` is given. Ends with counts per level.
    ///
    /// Example: agentfense policy show --preset agent-safe --rule '/docs/**=write@10' ./project
    Show {
        #[command(flatten)]
        policy: PolicyArgs,
        /// Also list hidden entries, marked `none`.
        #[arg(long)]
        reveal: bool,
        /// The project directory.
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

pub(crate) fn run(cmd: PolicyCommand, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    match cmd {
        PolicyCommand::Explain {
            policy,
            root,
            json,
            paths,
        } => {
            let policy = policy.policy()?;
            let tree = root.as_ref().map(|_| HostTree::default());
            for raw in &paths {
                let path = SandboxPath::parse(raw)
                    .with_context(|| format!("invalid sandbox path {raw:?}"))?;
                let kind = match &root {
                    Some(root) => kind_on_disk(root, &path)?,
                    None if raw.ends_with('/') && !path.is_root() => NodeKind::Dir,
                    None if path.is_root() => NodeKind::Dir,
                    None => NodeKind::File,
                };
                let d = match (&tree, &root) {
                    (Some(tree), Some(root)) => policy.decide_in(
                        tree,
                        &root.join(path.relative()),
                        &policy.cursor(&path),
                        kind,
                    ),
                    _ => policy.evaluate(&path, kind),
                };
                if json {
                    let line = ExplainJson {
                        path: path.as_str(),
                        kind: if kind == NodeKind::Dir { "dir" } else { "file" },
                        level: d.level,
                        reason: policy.explain(&d),
                        rule_index: d.rule().map(|r| r.index),
                    };
                    writeln!(out, "{}", serde_json::to_string(&line)?)?;
                } else {
                    let shown = if kind == NodeKind::Dir && !path.is_root() {
                        format!("{path}/")
                    } else {
                        path.to_string()
                    };
                    let shown = crate::terminal::escape(&shown);
                    writeln!(out, "{shown:<40} {:<5}  {}", d.level, policy.explain(&d))?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Show {
            policy,
            reveal,
            dir,
        } => {
            let policy = policy.policy()?;
            let meta = std::fs::metadata(&dir)
                .with_context(|| format!("cannot open project directory {}", dir.display()))?;
            anyhow::ensure!(meta.is_dir(), "{} is not a directory", dir.display());
            let mut counts: BTreeMap<Level, usize> = BTreeMap::new();
            writeln!(
                out,
                "{:<5}  /",
                policy.evaluate(&SandboxPath::root(), NodeKind::Dir).level
            )?;
            let tree = HostTree::default();
            let mut walker = Show {
                policy: &policy,
                tree: &tree,
                reveal,
                counts: &mut counts,
                out,
            };
            walker.walk(&dir, &SandboxPath::root(), &policy.cursor_root(), false)?;
            let total: usize = counts.values().sum();
            let parts: Vec<String> = Level::ALL
                .iter()
                .rev()
                .map(|l| {
                    let n = counts.get(l).copied().unwrap_or(0);
                    if *l == Level::None {
                        format!("{n} hidden")
                    } else {
                        format!("{n} {l}")
                    }
                })
                .collect();
            writeln!(out, "\n{total} entries: {}", parts.join(", "))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[derive(Serialize)]
struct ExplainJson<'a> {
    path: &'a str,
    kind: &'static str,
    level: Level,
    reason: String,
    rule_index: Option<usize>,
}

fn kind_on_disk(root: &Path, path: &SandboxPath) -> anyhow::Result<NodeKind> {
    let host = root.join(path.relative());
    let meta = std::fs::symlink_metadata(&host)
        .with_context(|| format!("{} does not exist under {}", path, root.display()))?;
    Ok(if meta.is_dir() {
        NodeKind::Dir
    } else {
        NodeKind::File
    })
}

struct Show<'a> {
    policy: &'a Policy,
    tree: &'a HostTree,
    reveal: bool,
    counts: &'a mut BTreeMap<Level, usize>,
    out: &'a mut dyn Write,
}

impl Show<'_> {
    fn walk(
        &mut self,
        host: &Path,
        path: &SandboxPath,
        cursor: &Cursor,
        hidden_above: bool,
    ) -> anyhow::Result<()> {
        let mut entries: Vec<(String, bool)> = std::fs::read_dir(host)
            .with_context(|| format!("cannot list {}", host.display()))?
            .map(|e| {
                let e = e.with_context(|| format!("cannot list {}", host.display()))?;
                // `file_type` does not follow symlinks: a link to a directory is not descended.
                let is_dir = e.file_type()?.is_dir();
                Ok((e.file_name().to_string_lossy().into_owned(), is_dir))
            })
            .collect::<anyhow::Result<_>>()?;
        entries.sort();
        for (name, is_dir) in entries {
            let child = path.join(&name)?;
            let cur = self.policy.cursor_child(cursor, &name);
            let kind = if is_dir {
                NodeKind::Dir
            } else {
                NodeKind::File
            };
            let level = if hidden_above {
                Level::None
            } else {
                self.policy
                    .decide_in(self.tree, &host.join(&name), &cur, kind)
                    .level
            };
            *self.counts.entry(level).or_default() += 1;
            if level.is_visible() || self.reveal {
                let indent = "  ".repeat(child.depth() - 1);
                let suffix = if is_dir { "/" } else { "" };
                let child = crate::terminal::escape(child.as_str());
                writeln!(self.out, "{level:<5}  {indent}{child}{suffix}")?;
            }
            // Hidden subtrees are still walked, so that the summary counts every entry.
            if is_dir {
                self.walk(&host.join(&name), &child, &cur, level == Level::None)?;
            }
        }
        Ok(())
    }
}

pub(crate) fn list_presets(json: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    let names = presets::names();
    if json {
        let map: BTreeMap<&str, _> = names
            .iter()
            .filter_map(|n| presets::get(n).map(|p| (*n, p.rules())))
            .collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&map)?)?;
        return Ok(());
    }
    for name in names {
        let Some(p) = presets::get(name) else {
            continue;
        };
        writeln!(out, "{name}: {}", p.description)?;
        for r in p.rules() {
            writeln!(
                out,
                "    {:<18} {:<5} priority {:>3}  ({})",
                r.pattern, r.permission, r.priority, r.pattern_type
            )?;
        }
    }
    Ok(())
}
