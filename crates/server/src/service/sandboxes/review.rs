//! Review of a sandbox's work (our `agentfense.v1.Review` service): its pending changes, a
//! git-compatible diff, applying or discarding a selection, and checkpoints.
//!
//! Every operation works on running sandboxes (through the mount, which keeps the kernel's
//! caches right) and on stopped ones (on the delta directory), under the sandbox's lifecycle
//! lock so that a start or stop cannot run in between.

use std::collections::BTreeMap;

use agentfense_fs::review::patch::{Patch, PatchOptions};
use agentfense_fs::{
    ApplyRefusal, ChangeSet, CheckpointInfo, Delta, FsError, Selection, View, compare, diff_of,
    parse_expectation,
};

use super::*;

/// Most changes a listing returns unless the caller asks for fewer (deletions are always all
/// listed).
pub const DEFAULT_CHANGES_LIMIT: usize = 10_000;
/// Most bytes of a diff unless the caller asks for fewer.
pub const DEFAULT_DIFF_BYTES: usize = 64 << 20;
/// The most bytes of a diff a caller may ask for.
pub const MAX_DIFF_BYTES: usize = 256 << 20;
/// How many paths an audit event lists.
const AUDITED_PATHS: usize = 100;

/// One side of a comparison between states of a sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateRef {
    /// The codebase, without the sandbox's changes.
    Base,
    /// The sandbox as it is now.
    Current,
    /// A checkpoint.
    Checkpoint(String),
}

impl StateRef {
    /// Parses `base`, `current` (or empty) and checkpoint ids.
    pub fn parse(s: &str) -> Result<StateRef, ServiceError> {
        match s {
            "" | "current" => Ok(StateRef::Current),
            "base" => Ok(StateRef::Base),
            id if agentfense_fs::valid_checkpoint_id(id) => Ok(StateRef::Checkpoint(id.into())),
            other => Err(ServiceError::InvalidArgument(format!(
                "{other:?} is not a checkpoint id (cp-<n>), \"base\" or \"current\""
            ))),
        }
    }
}

/// What a review operation works on.
struct Access<'a> {
    delta: &'a Delta,
    /// The mount, when the sandbox runs.
    mount: Option<&'a dyn Mounted>,
    policy: &'a Policy,
}

fn fs_error(context: &str, e: FsError) -> ServiceError {
    match e {
        FsError::NotFound { path } => {
            ServiceError::NotFound(format!("{} not found", path.display()))
        }
        FsError::InvalidName { name } => ServiceError::InvalidArgument(name),
        e @ FsError::NoSpace { .. } => ServiceError::ResourceExhausted(format!(
            "{context}: {e} (checkpoints count against the sandbox's disk quota)"
        )),
        e => ServiceError::internal(context.to_owned(), e),
    }
}

fn selection(paths: &[String]) -> Result<Selection, ServiceError> {
    Selection::globs(paths).map_err(|e| match e {
        FsError::InvalidName { name } => ServiceError::InvalidArgument(format!("path glob {name}")),
        e => ServiceError::internal("path globs", e),
    })
}

/// `select`, showing a caller acting for the sandbox (its token) only the codebase content
/// the sandbox's rules let it read: the base of a file it replaced may have become a secret.
fn for_caller(select: Selection, agent: bool, a: &Access<'_>) -> Result<Selection, ServiceError> {
    if !agent {
        return Ok(select);
    }
    let reveal = agentfense_fs::codebase_reader(a.delta.lower_path(), a.policy.clone())
        .map_err(|e| ServiceError::internal("judging what the sandbox may read", e))?;
    Ok(select.revealing(reveal))
}

/// Parses `path -> sha256` pairs (`absent` or empty: the path has no such version).
fn digests(
    pairs: BTreeMap<String, String>,
    field: &str,
) -> Result<BTreeMap<PathBuf, Option<[u8; 32]>>, ServiceError> {
    let mut out = BTreeMap::new();
    for (p, sha) in pairs {
        let rel = SandboxPath::parse(&p)
            .map_err(|e| ServiceError::InvalidArgument(format!("{field} path {p:?}: {e}")))?;
        let digest = parse_expectation(&sha).ok_or_else(|| {
            ServiceError::InvalidArgument(format!(
                "{field}[{p:?}] = {sha:?}: not a SHA-256 in hex (or \"absent\")"
            ))
        })?;
        out.insert(PathBuf::from(rel.relative()), digest);
    }
    Ok(out)
}

fn listed(paths: impl IntoIterator<Item = PathBuf>) -> Vec<String> {
    paths
        .into_iter()
        .take(AUDITED_PATHS)
        .map(|p| p.display().to_string())
        .collect()
}

fn refusal(r: ApplyRefusal) -> ServiceError {
    let join = |v: Vec<String>| {
        let n = v.len();
        let mut s: Vec<String> = v.into_iter().take(20).collect();
        if n > 20 {
            s.push(format!("and {} more", n - 20));
        }
        s.join("; ")
    };
    match r {
        ApplyRefusal::Conflicts(c) => ServiceError::FailedPrecondition(format!(
            "nothing applied: {} path(s) cannot be applied as they are (the codebase changed \
             since the sandbox or the review saw them, or a symlink leaves the project): {}",
            c.len(),
            join(
                c.into_iter()
                    .map(|c| format!("{}: {}", c.path.display(), c.reason))
                    .collect()
            )
        )),
        ApplyRefusal::NotWritable(p) => ServiceError::PermissionDenied(format!(
            "nothing applied: the sandbox's rules do not let it write {}",
            join(p.into_iter().map(|p| p.display().to_string()).collect())
        )),
        ApplyRefusal::NotPending(p) => ServiceError::InvalidArgument(format!(
            "expected names path(s) with no selected pending change: {}",
            join(p.into_iter().map(|p| p.display().to_string()).collect())
        )),
        ApplyRefusal::Fs(e) => fs_error("applying changes", e),
    }
}

impl Service {
    /// Runs `f` on the sandbox's delta (through its mount when it runs), on a blocking
    /// thread, under the sandbox's lifecycle lock.
    async fn with_delta<T, F>(
        self: &Arc<Self>,
        caller: &Caller,
        sandbox_id: &str,
        f: F,
    ) -> Result<T, ServiceError>
    where
        F: FnOnce(&Arc<Self>, &SandboxRecord, Access<'_>) -> Result<T, ServiceError>
            + Send
            + 'static,
        T: Send + 'static,
    {
        let id = Service::sandbox_id(sandbox_id)?;
        self.sandbox_for(caller, &id).await?;
        let lock = self.engine.lock(&id);
        let _g = lock.lock().await;
        let rec = self.sandbox(&id).await?;
        self.own(&rec)?;
        let live = self.engine.live(&id);
        let floor = self.settings.config.policy.mandatory.clone();
        let policy = Policy::compile_with_floor(rec.rules.clone(), floor)
            .map_err(|e| ServiceError::internal("compiling stored rules", e))?;
        let (_, delta_dir) = self.mount_dirs(&id);
        let lower = self.files.dir(&rec.codebase_id);
        let this = self.clone();
        blocking(move || {
            if let Some(live) = &live
                && let Some(delta) = live.mount.delta()
            {
                return f(
                    &this,
                    &rec,
                    Access {
                        delta,
                        mount: Some(&*live.mount),
                        policy: &policy,
                    },
                );
            }
            let delta = Delta::open(&lower, &delta_dir)
                .map_err(|e| ServiceError::internal("opening the sandbox's delta", e))?;
            f(
                &this,
                &rec,
                Access {
                    delta: &delta,
                    mount: None,
                    policy: &policy,
                },
            )
        })
        .await
    }

    /// The sandbox's pending changes against its codebase.
    pub async fn list_changes(
        self: &Arc<Self>,
        caller: &Caller,
        sandbox_id: &str,
        paths: Vec<String>,
        limit: usize,
    ) -> Result<ChangeSet, ServiceError> {
        let select = selection(&paths)?;
        let limit = if limit == 0 {
            DEFAULT_CHANGES_LIMIT
        } else {
            limit
        };
        let agent = caller.sandbox.is_some();
        self.with_delta(caller, sandbox_id, move |_, _, a| {
            let select = for_caller(select, agent, &a)?;
            a.delta
                .review(&select, limit)
                .map_err(|e| fs_error("listing changes", e))
        })
        .await
    }

    /// A git-compatible diff between two states of the sandbox (default: the codebase and the
    /// sandbox now), with the changes it covers.
    pub async fn diff_states(
        self: &Arc<Self>,
        caller: &Caller,
        sandbox_id: &str,
        from: StateRef,
        to: StateRef,
        paths: Vec<String>,
        max_bytes: usize,
    ) -> Result<(Patch, ChangeSet), ServiceError> {
        let select = selection(&paths)?;
        let opts = PatchOptions {
            max_bytes: if max_bytes == 0 {
                DEFAULT_DIFF_BYTES
            } else {
                max_bytes.min(MAX_DIFF_BYTES)
            },
            ..PatchOptions::default()
        };
        let agent = caller.sandbox.is_some();
        self.with_delta(caller, sandbox_id, move |_, _, a| {
            let select = for_caller(select, agent, &a)?;
            let open = |s: &StateRef| match s {
                StateRef::Checkpoint(id) => a
                    .delta
                    .open_checkpoint(id)
                    .map(Some)
                    .map_err(|e| fs_error("opening the checkpoint", e)),
                _ => Ok(None),
            };
            let (fa, fb) = (open(&from)?, open(&to)?);
            fn view<'v>(s: &StateRef, opened: &'v Option<Delta>, live: &'v Delta) -> View<'v> {
                match (s, opened) {
                    (StateRef::Base, _) => View::Base(live),
                    (_, Some(d)) => View::Merged(d),
                    _ => View::Merged(live),
                }
            }
            let (va, vb) = (view(&from, &fa, a.delta), view(&to, &fb, a.delta));
            let mut changes = compare(va, vb, &select, 0).map_err(|e| fs_error("diff", e))?;
            let patch = diff_of(va, vb, &changes, &opts).map_err(|e| fs_error("diff", e))?;
            if changes.changes.len() > DEFAULT_CHANGES_LIMIT {
                changes.changes.truncate(DEFAULT_CHANGES_LIMIT);
                changes.truncated = true;
            }
            Ok((patch, changes))
        })
        .await
    }

    /// Writes the selected pending changes into the codebase, all or nothing. `expected`:
    /// path -> the codebase version's SHA-256 the reviewer saw; `content`: path -> the
    /// sandbox version's (`absent` or empty: none).
    pub async fn apply_changes(
        self: &Arc<Self>,
        caller: &Caller,
        sandbox_id: &str,
        paths: Vec<String>,
        expected: BTreeMap<String, String>,
        content: BTreeMap<String, String>,
    ) -> Result<PublishReport, ServiceError> {
        let select = selection(&paths)?;
        let want = digests(expected, "expected")?;
        let seen = digests(content, "expected_content")?;
        let actor = caller.actor();
        self.with_delta(caller, sandbox_id, move |this, rec, a| {
            this.may_publish()?;
            let pending: Vec<PathBuf> = a.delta.pending();
            let before = this.files.usage(&rec.codebase_id, &pending);
            let report = match a.mount {
                Some(m) => m.apply(&select, &want, &seen),
                None => agentfense_fs::apply_unmounted(
                    a.delta,
                    a.policy,
                    &this.engine.mounts,
                    &select,
                    &want,
                    &seen,
                ),
            }
            .map_err(refusal)?;
            if let (Ok((s0, n0)), Ok((s1, n1))) =
                (before, this.files.usage(&rec.codebase_id, &pending))
            {
                let _ = this.store.adjust_codebase_stats(
                    &rec.codebase_id,
                    s1 as i64 - s0 as i64,
                    n1 as i64 - n0 as i64,
                    SystemTime::now(),
                );
            }
            this.audit.record_as(
                actor,
                AuditEvent::ChangesApplied {
                    sandbox_id: rec.id.to_string(),
                    paths: listed(report.written.iter().chain(&report.deleted).cloned()),
                    written: report.written.len(),
                    deleted: report.deleted.len(),
                    failed: report.failed.len(),
                },
            );
            Ok(report)
        })
        .await
    }

    /// Drops the selected pending changes from the sandbox.
    pub async fn discard_changes(
        self: &Arc<Self>,
        caller: &Caller,
        sandbox_id: &str,
        paths: Vec<String>,
    ) -> Result<Vec<PathBuf>, ServiceError> {
        let select = selection(&paths)?;
        let actor = caller.actor();
        self.with_delta(caller, sandbox_id, move |this, rec, a| {
            let gone = match a.mount {
                Some(m) => m.discard(&select),
                None => a.delta.discard(&select),
            }
            .map_err(|e| fs_error("discarding changes", e))?;
            this.audit.record_as(
                actor,
                AuditEvent::ChangesDiscarded {
                    sandbox_id: rec.id.to_string(),
                    paths: listed(gone.iter().cloned()),
                    count: gone.len(),
                },
            );
            Ok(gone)
        })
        .await
    }

    /// Takes a checkpoint of the sandbox's changes, then applies the retention.
    pub async fn create_checkpoint(
        self: &Arc<Self>,
        caller: &Caller,
        sandbox_id: &str,
        label: String,
    ) -> Result<CheckpointInfo, ServiceError> {
        if label.len() > 1024 || label.chars().any(char::is_control) {
            return Err(ServiceError::InvalidArgument(
                "label: at most 1024 bytes, no control characters".into(),
            ));
        }
        let actor = caller.actor();
        // A sandbox token is the agent: its checkpoints are counted apart from a reviewer's.
        let by_agent = caller.sandbox.is_some();
        self.with_delta(caller, sandbox_id, move |this, rec, a| {
            this.checkpoint_now(rec.id.as_str(), a.delta, a.mount, &label, by_agent, actor)
        })
        .await
    }

    fn checkpoint_now(
        &self,
        sandbox_id: &str,
        delta: &Delta,
        mount: Option<&dyn Mounted>,
        label: &str,
        by_agent: bool,
        actor: Actor,
    ) -> Result<CheckpointInfo, ServiceError> {
        let info = match mount {
            Some(m) => m.checkpoint(label, by_agent),
            None => delta.checkpoint_as(label, by_agent),
        }
        .map_err(|e| fs_error("taking a checkpoint", e))?;
        self.prune_checkpoints(delta);
        self.audit.record_as(
            actor,
            AuditEvent::CheckpointCreated {
                sandbox_id: sandbox_id.to_owned(),
                checkpoint_id: info.id.clone(),
                label: info.label.clone(),
                count: info.paths,
            },
        );
        Ok(info)
    }

    fn prune_checkpoints(&self, delta: &Delta) {
        let c = &self.settings.config.sandbox.checkpoints;
        let ttl = (!c.ttl.is_zero()).then_some(c.ttl);
        if let Err(e) = delta.prune_checkpoints(c.keep, ttl) {
            tracing::warn!(error = %chain(&e), "checkpoint retention failed");
        }
    }

    /// The sandbox's checkpoints, oldest first (after the retention).
    pub async fn list_checkpoints(
        self: &Arc<Self>,
        caller: &Caller,
        sandbox_id: &str,
    ) -> Result<Vec<CheckpointInfo>, ServiceError> {
        self.with_delta(caller, sandbox_id, move |this, _, a| {
            this.prune_checkpoints(a.delta);
            a.delta
                .checkpoints()
                .map_err(|e| fs_error("listing checkpoints", e))
        })
        .await
    }

    /// Deletes a checkpoint.
    pub async fn delete_checkpoint(
        self: &Arc<Self>,
        caller: &Caller,
        sandbox_id: &str,
        checkpoint_id: String,
    ) -> Result<(), ServiceError> {
        StateRef::parse(&checkpoint_id)?;
        self.with_delta(caller, sandbox_id, move |_, _, a| {
            a.delta
                .delete_checkpoint(&checkpoint_id)
                .map_err(|e| fs_error("deleting the checkpoint", e))
        })
        .await
    }

    /// Brings the sandbox back to a checkpoint; with `dry_run`, only says what that would
    /// change. Returns the changes from the present state to the checkpoint's.
    pub async fn restore_checkpoint(
        self: &Arc<Self>,
        caller: &Caller,
        sandbox_id: &str,
        checkpoint_id: String,
        dry_run: bool,
    ) -> Result<ChangeSet, ServiceError> {
        StateRef::parse(&checkpoint_id)?;
        let actor = caller.actor();
        let agent = caller.sandbox.is_some();
        self.with_delta(caller, sandbox_id, move |this, rec, a| {
            let cp = a
                .delta
                .open_checkpoint(&checkpoint_id)
                .map_err(|e| fs_error("opening the checkpoint", e))?;
            let changes = compare(
                View::Merged(a.delta),
                View::Merged(&cp),
                &for_caller(Selection::all(), agent, &a)?,
                DEFAULT_CHANGES_LIMIT,
            )
            .map_err(|e| fs_error("comparing with the checkpoint", e))?;
            drop(cp);
            if dry_run {
                return Ok(changes);
            }
            let touched = match a.mount {
                Some(m) => m.restore_checkpoint(&checkpoint_id),
                None => a.delta.restore_checkpoint(&checkpoint_id),
            }
            .map_err(|e| fs_error("restoring the checkpoint", e))?;
            this.audit.record_as(
                actor,
                AuditEvent::CheckpointRestored {
                    sandbox_id: rec.id.to_string(),
                    checkpoint_id: checkpoint_id.clone(),
                    paths: listed(changes.changes.iter().map(|c| c.path.clone())),
                    count: touched.len(),
                },
            );
            Ok(changes)
        })
        .await
    }

    /// Before a command of a sandbox labelled `agentfense.checkpoint=auto`: a checkpoint
    /// labelled with the command. A checkpoint that cannot be taken (the disk quota is full)
    /// does not stop the command: it is logged and the command runs.
    pub(super) async fn before_command(
        self: &Arc<Self>,
        live: &Arc<Live>,
        actor: &Actor,
        command: &str,
    ) {
        if !live.auto_checkpoint {
            return;
        }
        let mut label = format!("auto: {command}");
        if label.len() > 200 {
            let mut cut = 200;
            while !label.is_char_boundary(cut) {
                cut -= 1;
            }
            label.truncate(cut);
        }
        let label: String = label
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        let (this, l, actor) = (self.clone(), live.clone(), actor.clone());
        let r = blocking(move || {
            let Some(delta) = l.mount.delta() else {
                return Ok(());
            };
            this.checkpoint_now(l.id.as_str(), delta, Some(&*l.mount), &label, true, actor)
                .map(drop)
        })
        .await;
        if let Err(e) = r {
            tracing::warn!(sandbox_id = %live.id, error = %chain(&e), "automatic checkpoint not taken");
        }
    }
}
