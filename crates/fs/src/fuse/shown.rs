//! Which traversable directories a mount shows (`none` means absent, for directories too).
//!
//! A directory that the rules show only for traversal is shown while the mount's merged view
//! (codebase + delta) holds a descendant visible by its own rule ([`Policy::decide_in`]).
//! [`MergedView`] is that view as an [`agentfense_core::Tree`]; its verdicts live in
//! [`ShownDirs`], per directory, until something changes below it:
//! * a removal or rename through the mount ([`super::PolicyFs`] calls [`ShownDirs::forget`]
//!   and asks the kernel to drop the names of directories that vanished, from a thread of
//!   their own, never from inside a request);
//! * a publish of another sandbox or an upload (`crate::mount::invalidate`);
//! * a new policy (every verdict);
//! * age: a verdict older than the entry TTL is recomputed, so that changes nobody reported
//!   (edits on the host) show as late as any other name does.
//!
//! Only directories visible *only* for traversal get a verdict: under presets that grant
//! `**/*`, there are none and none of this costs anything.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use agentfense_core::{Content, NodeKind, Tree};

use super::{Shared, kind_of, lock};

/// Verdicts per directory (delta-relative path): whether it holds a visible descendant.
#[derive(Debug, Default)]
pub(crate) struct ShownDirs {
    /// Bumped by every invalidation: a walk that started before one does not store its
    /// verdicts (they may describe a tree that no longer exists).
    generation: u64,
    verdicts: HashMap<PathBuf, (bool, Instant)>,
}

impl ShownDirs {
    /// Forgets what a change at `path` may have changed: the verdicts of its ancestors and,
    /// when `subtree`, of everything at or below it. Returns the ancestors that had a verdict,
    /// deepest first, with it.
    pub(crate) fn forget(&mut self, path: &Path, subtree: bool) -> Vec<(PathBuf, bool)> {
        self.generation += 1;
        if self.verdicts.is_empty() {
            return Vec::new();
        }
        if subtree {
            self.verdicts
                .retain(|p, _| !(p.starts_with(path) && p != Path::new("")));
        }
        path.ancestors()
            .skip(1)
            .filter(|a| !a.as_os_str().is_empty())
            .filter_map(|a| self.verdicts.remove(a).map(|(v, _)| (a.to_path_buf(), v)))
            .collect()
    }

    /// Forgets every verdict (new rules).
    pub(crate) fn clear(&mut self) {
        self.generation += 1;
        self.verdicts.clear();
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }
}

/// The merged view of one mount as the policy engine walks it.
pub(crate) struct MergedView<'a> {
    pub(crate) shared: &'a Shared,
    /// [`ShownDirs::generation`] when the walk began.
    pub(crate) generation: u64,
    /// How long a verdict holds without a reported change.
    pub(crate) ttl: Duration,
}

impl Tree for MergedView<'_> {
    type Node = PathBuf;

    fn children(&self, dir: &PathBuf) -> Vec<(PathBuf, String, NodeKind)> {
        // An unreadable directory shows nothing (fail closed).
        let entries = self.shared.delta.list(dir).unwrap_or_default();
        entries
            .into_iter()
            .map(|(name, kind)| {
                let s = name.to_string_lossy().into_owned();
                (dir.join(&name), s, kind_of(kind))
            })
            .collect()
    }

    fn cached(&self, dir: &PathBuf) -> Option<bool> {
        lock(&self.shared.shown)
            .verdicts
            .get(dir)
            .filter(|(_, at)| at.elapsed() < self.ttl)
            .map(|(v, _)| *v)
    }

    fn remember(&self, dir: &PathBuf, shown: bool) {
        let mut s = lock(&self.shared.shown);
        if s.generation == self.generation {
            s.verdicts.insert(dir.clone(), (shown, Instant::now()));
        }
    }

    fn holds(&self, file: &PathBuf, content: Content) -> bool {
        super::content::holds(&self.shared.delta, &self.shared.contents, file, content)
    }
}

/// Names the kernel should forget: (parent inode, name) of directories that vanished.
pub(crate) type Vanished = Sender<(u64, OsString)>;
