//! Review of a sandbox's work: what changed, path by path, between two states (the codebase,
//! the delta, a checkpoint); dropping changes; applying a selection of them with its
//! preconditions checked first.
//!
//! A state is a [`View`]: the codebase alone ([`View::Base`]) or a delta over it
//! ([`View::Merged`], the sandbox's live delta or a checkpoint's). Two views can only differ at
//! paths one of them changed, so a comparison visits the union of their changed paths and
//! never walks the tree: its cost follows the size of the change, not of the codebase.

use std::io::Read;

use sha2::{Digest, Sha256};

use super::*;

/// What happened to a path between two states.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ChangeStatus {
    /// Absent before, present after.
    Added,
    /// The content (or a symlink's target) changed.
    Modified,
    /// Present before, absent after.
    Deleted,
    /// A different type of object (file, directory, symlink) at the same path.
    TypeChanged,
    /// Only the permission bits changed.
    ModeChanged,
}

impl ChangeStatus {
    /// The wire and CLI name (`added`, `modified`, `deleted`, `type_changed`, `mode_changed`).
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeStatus::Added => "added",
            ChangeStatus::Modified => "modified",
            ChangeStatus::Deleted => "deleted",
            ChangeStatus::TypeChanged => "type_changed",
            ChangeStatus::ModeChanged => "mode_changed",
        }
    }
}

/// One path that differs between two states.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathChange {
    /// The path, relative to the codebase root.
    pub path: PathBuf,
    /// What happened.
    pub status: ChangeStatus,
    /// The object after the change (before it, for a deletion).
    pub kind: EntryKind,
    /// The object before the change (`None` when it was added).
    pub old_kind: Option<EntryKind>,
    /// Size after the change (0 for a deletion).
    pub size: u64,
    /// Size before the change (0 when added).
    pub old_size: u64,
    /// Permission bits after the change (`None` for a deletion).
    pub mode: Option<u32>,
    /// Permission bits before the change (`None` when it was added).
    pub old_mode: Option<u32>,
    /// SHA-256 of the content after the change (a symlink's target; `None` for directories
    /// and deletions).
    pub sha256: Option<[u8; 32]>,
    /// SHA-256 of the content it was made from (`None` when it was added or is a directory).
    pub base_sha256: Option<[u8; 32]>,
    /// Either side holds binary content (a NUL byte in its first 8000 bytes, as git judges).
    pub binary: bool,
    /// The codebase's copy changed since this sandbox took the path over (another sandbox
    /// published it, or it was uploaded): applying it would overwrite that change. Only set
    /// for comparisons against the codebase.
    pub base_moved: bool,
    /// One side is the codebase's content, which the caller may not see (the sandbox's rules
    /// hide it): no digest for it, and no diff.
    pub hidden: bool,
}

/// The result of a comparison.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChangeSet {
    /// The changes, sorted by path (deletions are never left out).
    pub changes: Vec<PathChange>,
    /// Whether other changes were left out (past the caller's limit).
    pub truncated: bool,
    /// How many changes there are in all.
    pub total: usize,
}

/// Which paths an operation takes: all of them, or those matching one of some globs (`src/**`,
/// `*.md`, `docs`) or below a match (naming a directory takes everything in it).
#[derive(Clone, Default)]
pub struct Selection {
    set: Option<globset::GlobSet>,
    reveal: Option<Reveal>,
}

/// Decides whether the codebase's content at a path may be shown (see
/// [`Selection::revealing`]).
pub type Reveal = std::sync::Arc<dyn Fn(&Path) -> bool + Send + Sync>;

impl std::fmt::Debug for Selection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Selection")
            .field("all", &self.set.is_none())
            .field("reveal", &self.reveal.is_some())
            .finish()
    }
}

impl Selection {
    /// Every path.
    pub fn all() -> Selection {
        Selection::default()
    }

    /// Paths matching one of `globs` (`*` stays within a name, `**` crosses directories), or
    /// below one that does. No globs selects every path.
    pub fn globs<S: AsRef<str>>(globs: &[S]) -> Result<Selection, FsError> {
        if globs.is_empty() {
            return Ok(Selection::all());
        }
        let mut b = globset::GlobSetBuilder::new();
        for g in globs {
            let raw = g.as_ref().trim_start_matches("./").trim_end_matches('/');
            // `src/**` takes `src` itself too (its mode, its deletion).
            let dir = raw.strip_suffix("/**").filter(|d| !d.is_empty());
            for pat in std::iter::once(raw).chain(dir) {
                let glob = globset::GlobBuilder::new(pat)
                    .literal_separator(true)
                    .backslash_escape(true)
                    .build()
                    .map_err(|e| FsError::InvalidName {
                        name: format!("{}: {e}", g.as_ref()),
                    })?;
                b.add(glob);
            }
        }
        let set = b.build().map_err(|e| FsError::InvalidName {
            name: e.to_string(),
        })?;
        Ok(Selection {
            set: Some(set),
            reveal: None,
        })
    }

    /// Shows the codebase's content (in digests and diffs) only where `reveal` says so: for a
    /// caller who may see only what the sandbox's rules let it read. A hidden side is listed
    /// with `hidden` set and no digest, and left out of diffs.
    pub fn revealing(mut self, reveal: Reveal) -> Selection {
        self.reveal = Some(reveal);
        self
    }

    /// Whether this selects every path.
    pub fn is_all(&self) -> bool {
        self.set.is_none()
    }

    /// Whether `rel` is selected.
    pub fn selects(&self, rel: &Path) -> bool {
        let Some(set) = &self.set else { return true };
        rel.ancestors()
            .take_while(|a| !a.as_os_str().is_empty())
            .any(|a| set.is_match(a))
    }
}

/// A path that cannot be applied because the codebase moved under it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApplyConflict {
    /// The path.
    pub path: PathBuf,
    /// Why: what was expected and what the codebase has.
    pub reason: String,
}

/// Why [`Delta::apply`] wrote nothing.
#[derive(Debug)]
pub enum ApplyRefusal {
    /// The codebase changed under these paths since the sandbox (or the reviewer) saw them.
    Conflicts(Vec<ApplyConflict>),
    /// The sandbox's rules do not let it write these paths (any more).
    NotWritable(Vec<PathBuf>),
    /// A path in `expected` is not a pending change.
    NotPending(Vec<PathBuf>),
    /// The delta could not be read.
    Fs(FsError),
}

impl From<FsError> for ApplyRefusal {
    fn from(e: FsError) -> Self {
        ApplyRefusal::Fs(e)
    }
}

/// One state of the tree seen for a comparison.
#[derive(Clone, Copy)]
pub enum View<'a> {
    /// The codebase without any sandbox's changes.
    Base(&'a Delta),
    /// The codebase seen through a delta.
    Merged(&'a Delta),
}

/// An object as a comparison sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Node {
    kind: EntryKind,
    perm: u32,
    size: u64,
    /// The codebase's own entry (not one of a delta).
    lower: bool,
}

/// Content fingerprint of a file or symlink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Digested {
    sha256: [u8; 32],
    binary: bool,
}

/// How far into a file git looks for a NUL byte to call it binary.
const BINARY_PROBE: usize = 8000;

impl<'a> View<'a> {
    /// The object at `rel`, `None` if absent. Fifos and sockets are meeting points of a
    /// sandbox's processes, never part of its work: absent here.
    fn node(&self, rel: &Path) -> Result<Option<Node>, FsError> {
        let node = match *self {
            View::Base(d) => match host::lstat(d.lower.as_fd(), rel) {
                Ok(st) => {
                    let a = Attr::from_stat(Layer::Lower, &st);
                    Some(Node {
                        kind: a.kind,
                        perm: a.perm,
                        size: a.size,
                        lower: true,
                    })
                }
                Err(e) if is_absent(&e) => None,
                Err(e) => return Err(FsError::io("lstat codebase", rel, e)),
            },
            View::Merged(d) => d.lookup(rel)?.map(|a| Node {
                kind: a.kind,
                perm: a.perm,
                size: a.size,
                lower: a.layer == Layer::Lower,
            }),
        };
        Ok(node.filter(|n| !n.kind.is_local_node()))
    }

    /// Opens file `rel` of this view.
    fn open(&self, rel: &Path) -> Result<File, FsError> {
        match *self {
            View::Base(d) => host::open_file(d.lower.as_fd(), rel, OFlags::RDONLY)
                .map(File::from)
                .map_err(|e| FsError::io("open codebase file", rel, e)),
            View::Merged(d) => d.open_read(rel).map(|(f, _)| f),
        }
    }

    fn readlink(&self, rel: &Path) -> Result<Vec<u8>, FsError> {
        match *self {
            View::Base(d) => host::readlink(d.lower.as_fd(), rel)
                .map_err(|e| FsError::io("readlink codebase", rel, e)),
            View::Merged(d) => d.readlink(rel),
        }
    }

    /// The bytes of file or symlink `rel` (a symlink's target).
    pub(crate) fn bytes(&self, rel: &Path, kind: EntryKind) -> Result<Vec<u8>, FsError> {
        match kind {
            EntryKind::Symlink => self.readlink(rel),
            _ => {
                let mut out = Vec::new();
                self.open(rel)?
                    .read_to_end(&mut out)
                    .map_err(|e| FsError::io("read", rel, e))?;
                Ok(out)
            }
        }
    }

    fn digest(&self, rel: &Path, kind: EntryKind) -> Result<Digested, FsError> {
        let mut h = Sha256::new();
        let mut binary = false;
        if kind == EntryKind::Symlink {
            let t = self.readlink(rel)?;
            h.update(&t);
            binary = t.contains(&0);
        } else {
            let mut f = self.open(rel)?;
            let mut buf = vec![0u8; 64 << 10];
            let mut seen = 0usize;
            loop {
                let n = match f.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(FsError::io("read", rel, e)),
                };
                if seen < BINARY_PROBE {
                    let probe = &buf[..n.min(BINARY_PROBE - seen)];
                    binary |= probe.contains(&0);
                }
                seen = seen.saturating_add(n);
                h.update(&buf[..n]);
            }
        }
        Ok(Digested {
            sha256: h.finalize().into(),
            binary,
        })
    }

    /// The paths this view changed against the codebase.
    fn changed(&self) -> BTreeSet<PathBuf> {
        match *self {
            View::Base(_) => BTreeSet::new(),
            View::Merged(d) => {
                let meta = d.lock();
                meta.dirty
                    .iter()
                    .chain(meta.whiteouts.iter())
                    .cloned()
                    .collect()
            }
        }
    }
}

/// Lower-case hex of a digest.
pub fn hex_digest(d: &[u8; 32]) -> String {
    hex(d)
}

/// Parses a lower-case or upper-case hex SHA-256.
pub fn parse_digest(s: &str) -> Option<[u8; 32]> {
    unhex(&s.to_ascii_lowercase())?.try_into().ok()
}

/// Parses what a reviewer expects a path to hold: a SHA-256 in hex, or `absent` (or empty)
/// for no such version. `None`: neither.
pub fn parse_expectation(s: &str) -> Option<Option<[u8; 32]>> {
    match s {
        "" | "absent" => Some(None),
        s => parse_digest(s).map(Some),
    }
}

/// Compares `from` with `to` over the paths either changed, keeping those `select` takes. At
/// most `limit` changes other than deletions are listed (0: no limit); deletions always are.
pub fn compare(
    from: View<'_>,
    to: View<'_>,
    select: &Selection,
    limit: usize,
) -> Result<ChangeSet, FsError> {
    let mut paths = from.changed();
    paths.extend(to.changed());
    let base_of = match (from, to) {
        (View::Base(_), View::Merged(d)) => Some(d),
        _ => None,
    };
    let mut out = ChangeSet::default();
    let mut listed = 0usize;
    for p in paths {
        if !select.selects(&p) {
            continue;
        }
        let Some(mut c) = compare_path(from, to, &p, select.reveal.as_deref())? else {
            continue;
        };
        if let Some(d) = base_of {
            let meta = d.lock();
            c.base_moved = if c.old_kind == Some(EntryKind::Dir) {
                matches!(c.status, ChangeStatus::Deleted | ChangeStatus::TypeChanged)
                    && d.gained_below(&meta, &p).is_some()
            } else {
                let now = host::lstat(d.lower.as_fd(), &p).ok();
                d.conflict(&meta, &p, now.as_ref()).is_some()
            };
        }
        out.total += 1;
        if c.status != ChangeStatus::Deleted {
            if limit > 0 && listed >= limit {
                out.truncated = true;
                continue;
            }
            listed += 1;
        }
        out.changes.push(c);
    }
    Ok(out)
}

/// Files larger than this (on either side) are left out of diffs: the diff is built in
/// memory, at several times the size of what it shows.
pub const DIFF_FILE_MAX: u64 = 8 << 20;

/// A git-compatible patch taking `from` to `to` for the selected paths (see
/// [`crate::review::patch`]): files and symlinks only (git has no directories), binaries as
/// `GIT binary patch` literals. Past `opts.max_bytes` whole files are left out and the patch
/// says it is truncated.
pub fn diff(
    from: View<'_>,
    to: View<'_>,
    select: &Selection,
    opts: &crate::review::patch::PatchOptions,
) -> Result<crate::review::patch::Patch, FsError> {
    let set = compare(from, to, select, 0)?;
    diff_of(from, to, &set, opts)
}

/// [`diff`] of changes already compared (`set`, from [`compare`] of the same two views with
/// no limit): a caller that lists them too compares once.
pub fn diff_of(
    from: View<'_>,
    to: View<'_>,
    set: &ChangeSet,
    opts: &crate::review::patch::PatchOptions,
) -> Result<crate::review::patch::Patch, FsError> {
    use crate::review::patch::{Blob, FileChange, GitMode, render};
    let blob = |v: View<'_>, rel: &Path, kind: Option<EntryKind>, mode: Option<u32>| match kind {
        Some(k @ (EntryKind::File | EntryKind::Symlink)) => v.bytes(rel, k).map(|bytes| {
            Some(Blob {
                mode: GitMode::of(k == EntryKind::Symlink, mode.unwrap_or(0o644)),
                bytes,
            })
        }),
        _ => Ok(None),
    };
    // Contents are read until they alone pass the cap: what is read past it is never shown.
    let mut read = 0usize;
    let mut truncated_early = false;
    let mut blobs: Vec<(Vec<u8>, Option<Blob>, Option<Blob>)> = Vec::new();
    let mut left_out = false;
    for c in &set.changes {
        // Content the caller may not see, and files too large to diff in memory, are left
        // out (and the patch says it is incomplete).
        if c.hidden || c.size.max(c.old_size) > DIFF_FILE_MAX {
            left_out = true;
            continue;
        }
        let new_kind = (c.status != ChangeStatus::Deleted).then_some(c.kind);
        let old = blob(from, &c.path, c.old_kind, c.old_mode)?;
        let new = blob(to, &c.path, new_kind, c.mode)?;
        if old.is_none() && new.is_none() {
            continue;
        }
        read +=
            old.as_ref().map_or(0, |b| b.bytes.len()) + new.as_ref().map_or(0, |b| b.bytes.len());
        blobs.push((c.path.as_os_str().as_bytes().to_vec(), old, new));
        if read > opts.max_bytes.saturating_mul(4).max(1 << 20) {
            truncated_early = true;
            break;
        }
    }
    let changes: Vec<FileChange<'_>> = blobs
        .iter()
        .map(|(p, o, n)| FileChange {
            path: p,
            old: o.as_ref(),
            new: n.as_ref(),
        })
        .collect();
    let mut patch = render(&changes, opts);
    patch.truncated |= truncated_early || set.truncated || left_out;
    Ok(patch)
}

/// How `rel` differs between `from` and `to`, `None` if it does not (a file rewritten with the
/// same bytes and mode is no change).
fn compare_path(
    from: View<'_>,
    to: View<'_>,
    rel: &Path,
    reveal: Option<&(dyn Fn(&Path) -> bool + Send + Sync)>,
) -> Result<Option<PathChange>, FsError> {
    let (a, b) = (from.node(rel)?, to.node(rel)?);
    if a.is_some_and(|x| x.lower) && b.is_some_and(|y| y.lower) {
        // Both sides see the codebase's own entry.
        return Ok(None);
    }
    // The codebase's content is shown only where the caller may read it.
    let hidden = |n: &Node| n.lower && reveal.is_some_and(|r| !r(rel));
    let digest = |v: View<'_>, n: &Node| -> Result<Option<Digested>, FsError> {
        match n.kind {
            EntryKind::File | EntryKind::Symlink if !hidden(n) => v.digest(rel, n.kind).map(Some),
            _ => Ok(None),
        }
    };
    let (da, db) = match (&a, &b) {
        (None, None) => return Ok(None),
        (Some(x), None) => (digest(from, x)?, None),
        (None, Some(y)) => (None, digest(to, y)?),
        (Some(x), Some(y)) => (digest(from, x)?, digest(to, y)?),
    };
    let secret = a.as_ref().is_some_and(hidden) || b.as_ref().is_some_and(hidden);
    let status = match (&a, &b) {
        (None, Some(_)) => ChangeStatus::Added,
        (Some(_), None) => ChangeStatus::Deleted,
        (Some(x), Some(y)) if x.kind != y.kind => ChangeStatus::TypeChanged,
        // What the hidden side holds is not compared: shown as modified.
        (Some(_), Some(_)) if secret => ChangeStatus::Modified,
        (Some(x), Some(y)) => {
            let content = da.map(|d| d.sha256) != db.map(|d| d.sha256);
            // A symlink's own mode means nothing.
            let mode = x.perm != y.perm && x.kind != EntryKind::Symlink;
            match (content, mode) {
                (true, _) => ChangeStatus::Modified,
                (false, true) => ChangeStatus::ModeChanged,
                (false, false) => return Ok(None),
            }
        }
        (None, None) => return Ok(None),
    };
    let shown = b.or(a).map(|n| n.kind).unwrap_or(EntryKind::File);
    Ok(Some(PathChange {
        path: rel.to_path_buf(),
        status,
        kind: shown,
        old_kind: a.map(|n| n.kind),
        size: b.map(|n| n.size).unwrap_or(0),
        old_size: a.map(|n| n.size).unwrap_or(0),
        mode: b.map(|n| n.perm),
        old_mode: a.map(|n| n.perm),
        sha256: db.map(|d| d.sha256),
        base_sha256: da.map(|d| d.sha256),
        binary: da.is_some_and(|d| d.binary) || db.is_some_and(|d| d.binary),
        base_moved: false,
        hidden: secret,
    }))
}

/// Reads until `buf` is full or the file ends.
fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Whether `rel` or one of its proper ancestors is in `set`.
fn under_any(set: &LogSet, rel: &Path, proper: bool) -> Option<PathBuf> {
    rel.ancestors()
        .skip(usize::from(proper))
        .take_while(|a| !a.as_os_str().is_empty())
        .find(|a| set.contains(a))
        .map(Path::to_path_buf)
}

impl Delta {
    /// A codebase entry below directory `rel` (deleted in this sandbox) that this sandbox
    /// never deleted: the codebase gained it since, and applying the deletion would fail on
    /// it (or, worse, delete what this sandbox never saw).
    fn gained_below(&self, meta: &Meta, rel: &Path) -> Option<PathBuf> {
        let entries = host::list(self.lower.as_fd(), rel).ok()?;
        for (n, k) in entries {
            let child = rel.join(OsStr::from_bytes(&n));
            if !meta.whiteouts.contains(&child) {
                return Some(child);
            }
            if k == Kind::Dir
                && let Some(c) = self.gained_below(meta, &child)
            {
                return Some(c);
            }
        }
        None
    }

    /// Whether the merged view of `rel` is the codebase's version exactly (same type, mode
    /// and content, or both absent): a change already in the codebase.
    fn same_as_base_locked(&self, meta: &Meta, rel: &Path) -> bool {
        let merged = match self.lookup_locked(meta, rel) {
            Ok(m) => m,
            Err(_) => return false,
        };
        let base = host::lstat(self.lower.as_fd(), rel).ok();
        match (merged, base) {
            (None, None) => true,
            (Some(m), Some(_)) if m.layer == Layer::Lower => true,
            (Some(m), Some(b)) => {
                let b = Attr::from_stat(Layer::Lower, &b);
                if m.kind != b.kind || (m.kind != EntryKind::Symlink && m.perm != b.perm) {
                    return false;
                }
                match m.kind {
                    EntryKind::Symlink => {
                        host::readlink(self.upper.as_fd(), rel).ok()
                            == host::readlink(self.lower.as_fd(), rel).ok()
                    }
                    EntryKind::File => m.size == b.size && self.same_bytes(rel),
                    _ => false,
                }
            }
            _ => false,
        }
    }

    /// Whether the upper and lower copies of file `rel` hold the same bytes.
    fn same_bytes(&self, rel: &Path) -> bool {
        let open =
            |root: BorrowedFd<'_>| host::open_file(root, rel, OFlags::RDONLY).map(File::from);
        let (Ok(mut a), Ok(mut b)) = (open(self.upper.as_fd()), open(self.lower.as_fd())) else {
            return false;
        };
        let (mut x, mut y) = (vec![0u8; 64 << 10], vec![0u8; 64 << 10]);
        loop {
            let n = match read_full(&mut a, &mut x) {
                Ok(n) => n,
                Err(_) => return false,
            };
            let m = match read_full(&mut b, &mut y) {
                Ok(m) => m,
                Err(_) => return false,
            };
            if n != m || x[..n] != y[..m] {
                return false;
            }
            if n == 0 {
                return true;
            }
        }
    }

    /// Forgets pending files, symlinks and deletions that the codebase already holds (after
    /// a restore brought back changes that were applied since the checkpoint): their upper
    /// copies and stale copy-up origins would otherwise make every apply a conflict.
    pub(super) fn settle_applied(&self, meta: &mut Meta) {
        let settled: Vec<PathBuf> = meta
            .dirty
            .iter()
            .filter(|p| {
                let dir = host::lstat(self.upper.as_fd(), p)
                    .is_ok_and(|st| Kind::from_mode(st.st_mode) == Kind::Dir);
                !dir && self.same_as_base_locked(meta, p)
            })
            .cloned()
            .collect();
        for p in settled {
            if meta.lower_visible(&p) && !meta.whiteouts.contains(&p) {
                self.drop_upper(&p);
            }
            if host::lstat(self.lower.as_fd(), &p).is_err() {
                meta.whiteouts.remove(&p);
            }
            meta.origins.remove(&p);
            meta.dirty.remove(&p);
        }
    }

    /// The pending changes against the codebase (see [`compare`]).
    pub fn review(&self, select: &Selection, limit: usize) -> Result<ChangeSet, FsError> {
        compare(View::Base(self), View::Merged(self), select, limit)
    }

    /// Drops the selected changes from the delta: the view shows the codebase there again.
    /// Returns the paths whose view changed. Bringing back a codebase path whose directory
    /// was deleted or recreated needs that directory discarded too (an error names it);
    /// naming a directory takes everything in it.
    pub fn discard(&self, select: &Selection) -> Result<Vec<PathBuf>, FsError> {
        let mut meta = self.lock();
        let mut chosen: BTreeSet<PathBuf> = meta
            .dirty
            .iter()
            .chain(meta.whiteouts.iter())
            .chain(meta.opaque.iter())
            .filter(|p| select.selects(p))
            .cloned()
            .collect();
        if chosen.is_empty() {
            return Ok(Vec::new());
        }
        for p in &chosen {
            for set in [&meta.whiteouts, &meta.opaque] {
                if let Some(anc) = under_any(set, p, true)
                    && !chosen.contains(&anc)
                    && host::lstat(self.lower.as_fd(), p).is_ok()
                {
                    return Err(FsError::InvalidName {
                        name: format!(
                            "{}: its directory {} was deleted or replaced in the sandbox; \
                             discard that directory too",
                            p.display(),
                            anc.display()
                        ),
                    });
                }
            }
        }
        // Everything in the delta below a chosen directory goes with it.
        let below: Vec<PathBuf> = meta
            .origins
            .map
            .keys()
            .filter(|p| chosen.iter().any(|c| p.starts_with(c)))
            .cloned()
            .collect();
        chosen.extend(below);
        let mut order: Vec<&PathBuf> = chosen.iter().collect();
        order.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for p in order {
            remove_tree(self.upper.as_fd(), p)?;
            meta.whiteouts.remove(p);
            meta.opaque.remove(p);
            meta.dirty.remove(p);
            meta.origins.remove(p);
        }
        self.prune_upper(&meta, Path::new(""));
        self.usage
            .set_upper(footprint_below(&self.dir.join("upper")));
        self.compact(&mut meta)?;
        Ok(chosen.into_iter().collect())
    }

    /// Checks that the selected pending changes can be applied as they are: each is writable
    /// (`allow`), the codebase did not move under it since this sandbox took it over, and,
    /// for the paths in `expected`, the codebase holds the content with that SHA-256 (`None`:
    /// the path must not exist). Returns the pending paths selected.
    pub fn check_apply(
        &self,
        select: &Selection,
        expected: &BTreeMap<PathBuf, Option<[u8; 32]>>,
        allow: &dyn Fn(&Path, EntryKind) -> bool,
    ) -> Result<BTreeSet<PathBuf>, ApplyRefusal> {
        let meta = self.lock();
        self.check_apply_locked(&meta, select, expected, &BTreeMap::new(), allow)
    }

    /// [`Delta::check_apply`] with the lock held, and `content`: path -> the SHA-256 of this
    /// sandbox's version the reviewer saw (`None`: its deletion); another one is a conflict.
    fn check_apply_locked(
        &self,
        meta: &Meta,
        select: &Selection,
        expected: &BTreeMap<PathBuf, Option<[u8; 32]>>,
        content: &BTreeMap<PathBuf, Option<[u8; 32]>>,
        allow: &dyn Fn(&Path, EntryKind) -> bool,
    ) -> Result<BTreeSet<PathBuf>, ApplyRefusal> {
        let chosen: BTreeSet<PathBuf> = meta
            .dirty
            .iter()
            .filter(|p| select.selects(p))
            .cloned()
            .collect();
        let stray: Vec<PathBuf> = expected
            .keys()
            .chain(content.keys())
            .filter(|p| !chosen.contains(*p))
            .cloned()
            .collect();
        if !stray.is_empty() {
            return Err(ApplyRefusal::NotPending(stray));
        }
        let mut refused = Vec::new();
        let mut conflicts = Vec::new();
        for p in &chosen {
            let upper = host::lstat(self.upper.as_fd(), p).ok();
            let lower = host::lstat(self.lower.as_fd(), p).ok();
            let kind = upper
                .as_ref()
                .or(lower.as_ref())
                .map(|st| EntryKind::from(Kind::from_mode(st.st_mode)))
                .unwrap_or(EntryKind::File);
            if kind.is_local_node() {
                continue;
            }
            if !allow(p, kind) {
                refused.push(p.clone());
                continue;
            }
            if kind == EntryKind::Symlink
                && upper.is_some()
                && let Ok(target) = host::readlink(self.upper.as_fd(), p)
                && link_escapes(p, &target)
            {
                conflicts.push(ApplyConflict {
                    path: p.clone(),
                    reason: format!(
                        "a symlink to {} leaves the project and is never applied",
                        String::from_utf8_lossy(&target)
                    ),
                });
                continue;
            }
            let lower_kind = lower
                .as_ref()
                .map(|st| EntryKind::from(Kind::from_mode(st.st_mode)));
            let upper_dir = upper
                .as_ref()
                .is_some_and(|st| Kind::from_mode(st.st_mode) == Kind::Dir);
            if lower_kind == Some(EntryKind::Dir)
                && !upper_dir
                && let Some(extra) = self.gained_below(meta, p)
            {
                conflicts.push(ApplyConflict {
                    path: p.clone(),
                    reason: format!(
                        "a directory deleted or replaced in the sandbox, but the codebase gained \
                         {} in it since",
                        extra.display()
                    ),
                });
                continue;
            }
            if upper.is_some() && self.stored_under_another_spelling(p) {
                conflicts.push(ApplyConflict {
                    path: p.clone(),
                    reason: "the codebase stores this name under another spelling (a \
                             case-insensitive directory)"
                        .to_owned(),
                });
                continue;
            }
            if lower_kind != Some(EntryKind::Dir)
                && let Some(c) = self.conflict(meta, p, lower.as_ref())
            {
                let show = |o: Option<Origin>| match o {
                    None => "absent".to_owned(),
                    Some(o) => format!("{} bytes, inode {}", o.size, o.ino),
                };
                conflicts.push(ApplyConflict {
                    path: p.clone(),
                    reason: format!(
                        "the codebase changed since the sandbox took it over (then {}, now {})",
                        show(c.expected),
                        show(c.found)
                    ),
                });
                continue;
            }
            if let Some(want) = content.get(p) {
                let found = self.upper_digest(p);
                if found != *want {
                    let show = |d: Option<[u8; 32]>| d.map_or("absent".to_owned(), |d| hex(&d));
                    conflicts.push(ApplyConflict {
                        path: p.clone(),
                        reason: format!(
                            "the sandbox's version changed since the review: expected {} but it \
                             has {}",
                            show(*want),
                            show(found)
                        ),
                    });
                    continue;
                }
            }
            if let Some(want) = expected.get(p) {
                let found = match lower_kind {
                    Some(EntryKind::File) | Some(EntryKind::Symlink) => Some(
                        View::Base(self)
                            .digest(p, lower_kind.unwrap_or(EntryKind::File))?
                            .sha256,
                    ),
                    _ => None,
                };
                if found != *want {
                    let show = |d: Option<[u8; 32]>| d.map_or("absent".to_owned(), |d| hex(&d));
                    conflicts.push(ApplyConflict {
                        path: p.clone(),
                        reason: format!(
                            "expected base {} but the codebase has {}",
                            show(*want),
                            show(found)
                        ),
                    });
                }
            }
        }
        if !refused.is_empty() {
            return Err(ApplyRefusal::NotWritable(refused));
        }
        if !conflicts.is_empty() {
            return Err(ApplyRefusal::Conflicts(conflicts));
        }
        Ok(chosen)
    }

    /// Applies the selected pending changes to the codebase after [`Delta::check_apply`]
    /// passed for all of them; nothing is written when it does not. Changes not selected stay
    /// pending (and out of the report's `skipped`).
    pub fn apply(
        &self,
        select: &Selection,
        expected: &BTreeMap<PathBuf, Option<[u8; 32]>>,
        allow: &dyn Fn(&Path, EntryKind) -> bool,
        busy: &dyn Fn(&Path) -> bool,
    ) -> Result<PublishReport, ApplyRefusal> {
        self.apply_pinned(select, expected, &BTreeMap::new(), allow, busy)
    }

    /// [`Delta::apply`], also refusing paths whose version in this sandbox is not the one the
    /// reviewer saw (`content`: path -> SHA-256, `None` for a deletion). Checks and writes
    /// happen under one hold of the delta's lock: nothing the sandbox does can slip between.
    pub fn apply_pinned(
        &self,
        select: &Selection,
        expected: &BTreeMap<PathBuf, Option<[u8; 32]>>,
        content: &BTreeMap<PathBuf, Option<[u8; 32]>>,
        allow: &dyn Fn(&Path, EntryKind) -> bool,
        busy: &dyn Fn(&Path) -> bool,
    ) -> Result<PublishReport, ApplyRefusal> {
        let mut meta = self.lock();
        let chosen = self.check_apply_locked(&meta, select, expected, content, allow)?;
        let mut report = self.publish_locked(
            &mut meta,
            &PublishFilter {
                allow: &|p, k| chosen.contains(p) && allow(p, k),
                busy,
            },
        )?;
        report.skipped.retain(|p| chosen.contains(p));
        Ok(report)
    }

    /// SHA-256 of this sandbox's own version of `rel` (a file's bytes, a symlink's target);
    /// `None` when it has none (a deletion) or it cannot be read.
    fn upper_digest(&self, rel: &Path) -> Option<[u8; 32]> {
        let st = host::lstat(self.upper.as_fd(), rel).ok()?;
        let mut h = Sha256::new();
        match Kind::from_mode(st.st_mode) {
            Kind::Symlink => h.update(host::readlink(self.upper.as_fd(), rel).ok()?),
            Kind::File => {
                let mut f =
                    File::from(host::open_file(self.upper.as_fd(), rel, OFlags::RDONLY).ok()?);
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = read_full(&mut f, &mut buf).ok()?;
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                }
            }
            _ => return None,
        }
        Some(h.finalize().into())
    }
}

/// Removes `rel` (and everything below it) from the tree under `root`, if there.
pub(super) fn remove_tree(root: BorrowedFd<'_>, rel: &Path) -> Result<(), FsError> {
    let st = match host::lstat(root, rel) {
        Ok(st) => st,
        Err(e) if is_absent(&e) => return Ok(()),
        Err(e) => return Err(FsError::io("lstat", rel, e)),
    };
    if Kind::from_mode(st.st_mode) == Kind::Dir {
        let entries = host::list(root, rel).map_err(|e| FsError::io("list", rel, e))?;
        for (n, _) in entries {
            remove_tree(root, &rel.join(OsStr::from_bytes(&n)))?;
        }
    }
    let (parent, name) = host::split(rel).map_err(|e| FsError::io("remove", rel, e))?;
    let pdir = host::open_dir(root, parent).map_err(|e| FsError::io("remove", rel, e))?;
    match host::remove_at(pdir.as_fd(), name, Kind::from_mode(st.st_mode) == Kind::Dir) {
        Err(e) if errno(&e) != libc::ENOENT => Err(FsError::io("remove", rel, e)),
        _ => Ok(()),
    }
}
