//! The copy-on-write delta: a read-only *lower* tree (the codebase, shared by every sandbox)
//! seen through a per-sandbox *delta* directory that receives every change.
//!
//! Plain logic over two directory roots, with no FUSE and no policy: the FUSE adapter decides
//! *whether* an operation is allowed and then calls in here to do it.
//!
//! ## Layout of the delta directory
//! ```text
//! <delta>/upper/   the agent's namespace: files and directories written by this sandbox
//! <delta>/work/    temp files for copy-up (same filesystem as upper, never visible)
//! <delta>/meta     whiteouts, opaque markers, the change journal and copy-up origins
//! ```
//! Deletions are **not** marker files inside `upper/` (the original's `.wh.<name>`, which an
//! agent could forge to delete a protected sibling on sync, and which hid codebase files whose
//! names start with `.wh.`). They live in `meta`, outside anything the agent can name.
//!
//! ## Resolution
//! A path's lower entry is visible unless the path or an ancestor is whited out, or a proper
//! ancestor is *opaque* (a directory or file recreated over a whited-out path, so the old lower
//! subtree stays dead). The upper entry, when present, wins.
//!
//! ## Journal and publish
//! Every changed path is recorded as *dirty*. [`Delta::publish`] applies only the dirty paths
//! to the lower tree (deletions deepest-first, then creations shallow-first; every file through
//! a temp file + rename in its target directory), detects lower files that changed since this
//! sandbox copied them up (size, mtime, inode recorded at copy-up: a conflict, which is
//! reported and then overwritten: the later publish wins), and then drops the published upper
//! copies so that later changes to the codebase become visible to this sandbox again.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::fs::{AtFlags, Mode, OFlags, Stat, Timespec, Timestamps};

use crate::error::FsError;
use crate::host::{self, Kind};
use crate::quota::{DiskUsage, allocated, footprint_below};

/// Which layer an entry comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layer {
    /// The sandbox's own delta.
    Upper,
    /// The shared codebase.
    Lower,
}

/// The type of a filesystem object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// A directory.
    Dir,
    /// A regular file.
    File,
    /// A symbolic link.
    Symlink,
    /// A fifo, socket or device node.
    Other,
}

impl From<Kind> for EntryKind {
    fn from(k: Kind) -> Self {
        match k {
            Kind::Dir => EntryKind::Dir,
            Kind::File => EntryKind::File,
            Kind::Symlink => EntryKind::Symlink,
            Kind::Other => EntryKind::Other,
        }
    }
}

/// Attributes of an entry in the merged view (as stored on the host).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    /// Where the entry comes from.
    pub layer: Layer,
    /// Object type.
    pub kind: EntryKind,
    /// Permission bits (`0o7777`).
    pub perm: u32,
    /// Size in bytes.
    pub size: u64,
    /// Allocated 512-byte blocks.
    pub blocks: u64,
    /// Last access.
    pub atime: SystemTime,
    /// Last modification.
    pub mtime: SystemTime,
    /// Last status change.
    pub ctime: SystemTime,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Device number for device nodes.
    pub rdev: u64,
}

fn systime(secs: i64, nsecs: i64) -> SystemTime {
    let nanos = u32::try_from(nsecs.clamp(0, 999_999_999)).unwrap_or(0);
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs.unsigned_abs(), nanos)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(nanos.into())
    }
}

impl Attr {
    fn from_stat(layer: Layer, st: &Stat) -> Attr {
        Attr {
            layer,
            kind: Kind::from_mode(st.st_mode).into(),
            perm: st.st_mode & 0o7777,
            size: u64::try_from(st.st_size).unwrap_or(0),
            blocks: u64::try_from(st.st_blocks).unwrap_or(0),
            atime: systime(st.st_atime, st.st_atime_nsec as i64),
            mtime: systime(st.st_mtime, st.st_mtime_nsec as i64),
            ctime: systime(st.st_ctime, st.st_ctime_nsec as i64),
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev,
        }
    }
}

/// Attributes of an open file (for `fstat` on a deleted but open file).
pub(crate) fn attr_of_stat(st: &Stat) -> Attr {
    Attr::from_stat(Layer::Upper, st)
}

/// Identity of a codebase file when this sandbox took it over (copy-up or delete), used to
/// detect that someone else changed it before this sandbox published.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Origin {
    /// Size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i128,
    /// Host inode number.
    pub ino: u64,
}

impl Origin {
    fn of(st: &Stat) -> Origin {
        Origin {
            size: u64::try_from(st.st_size).unwrap_or(0),
            mtime_ns: host::mtime_ns(st),
            ino: st.st_ino,
        }
    }
}

/// A codebase path that changed under this sandbox between copy-up and publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    /// The path (relative to the codebase root).
    pub path: PathBuf,
    /// What this sandbox started from (`None`: the path did not exist).
    pub expected: Option<Origin>,
    /// What the codebase had at publish time (`None`: gone).
    pub found: Option<Origin>,
}

/// One pending change (see [`Delta::changes`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// The path, relative to the codebase root.
    pub path: PathBuf,
    /// What happened to it.
    pub kind: ChangeKind,
}

/// The kind of a pending change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    /// New in this sandbox.
    Added(EntryKind),
    /// Exists in the codebase and was changed (content, mode or times).
    Modified(EntryKind),
    /// Deleted in this sandbox.
    Deleted,
}

/// What [`Delta::publish`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PublishReport {
    /// Files, symlinks and directories written to the codebase.
    pub written: Vec<PathBuf>,
    /// Paths removed from the codebase.
    pub deleted: Vec<PathBuf>,
    /// Paths whose codebase version changed since this sandbox took them over. They were
    /// overwritten anyway (the later publish wins).
    pub conflicts: Vec<Conflict>,
    /// Paths left unpublished because the caller's filter refused them; they stay pending.
    pub skipped: Vec<PathBuf>,
    /// Paths that could not be applied, with the reason; they stay pending and the next
    /// publish tries again.
    pub failed: Vec<(PathBuf, String)>,
}

/// Decides per path whether publishing may touch it, and whether it is still open for
/// writing (then its upper copy is kept and it stays pending).
pub struct PublishFilter<'a> {
    /// `false` keeps the path pending (e.g. the rules no longer grant write there).
    pub allow: &'a dyn Fn(&Path, EntryKind) -> bool,
    /// `true` when a writer still holds the file open.
    pub busy: &'a dyn Fn(&Path) -> bool,
}

impl Default for PublishFilter<'_> {
    fn default() -> Self {
        PublishFilter {
            allow: &|_, _| true,
            busy: &|_| false,
        }
    }
}

/// A set of paths whose changes are journaled: every insert/remove that changes the set
/// appends a line (`<tag>+ <hex path>` / `<tag>- <hex path>`) to `pending`.
#[derive(Debug, Default)]
struct LogSet {
    tag: char,
    set: BTreeSet<PathBuf>,
    pending: Vec<u8>,
}

fn log_line(out: &mut Vec<u8>, tag: char, op: char, p: &Path, extra: &str) {
    out.push(tag as u8);
    out.push(op as u8);
    out.push(b' ');
    out.extend_from_slice(hex(p.as_os_str().as_bytes()).as_bytes());
    out.extend_from_slice(extra.as_bytes());
    out.push(b'\n');
}

impl LogSet {
    fn new(tag: char) -> LogSet {
        LogSet {
            tag,
            ..LogSet::default()
        }
    }

    fn insert(&mut self, p: PathBuf) -> bool {
        if self.set.contains(&p) {
            return false;
        }
        log_line(&mut self.pending, self.tag, '+', &p, "");
        self.set.insert(p)
    }

    fn remove(&mut self, p: &Path) -> bool {
        let removed = self.set.remove(p);
        if removed {
            log_line(&mut self.pending, self.tag, '-', p, "");
        }
        removed
    }

    fn extend(&mut self, paths: impl IntoIterator<Item = PathBuf>) {
        for p in paths {
            self.insert(p);
        }
    }

    fn contains(&self, p: &Path) -> bool {
        self.set.contains(p)
    }

    fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    fn iter(&self) -> impl Iterator<Item = &PathBuf> {
        self.set.iter()
    }
}

/// Copy-up origins, journaled like [`LogSet`] with tag `G`.
#[derive(Debug, Default)]
struct LogMap {
    map: BTreeMap<PathBuf, Origin>,
    pending: Vec<u8>,
}

impl LogMap {
    fn insert(&mut self, p: PathBuf, o: Origin) {
        let extra = format!(" {} {} {}", o.size, o.mtime_ns, o.ino);
        log_line(&mut self.pending, 'G', '+', &p, &extra);
        self.map.insert(p, o);
    }

    fn insert_if_absent(&mut self, p: &Path, o: impl FnOnce() -> Origin) {
        if !self.map.contains_key(p) {
            self.insert(p.to_path_buf(), o());
        }
    }

    fn remove(&mut self, p: &Path) {
        if self.map.remove(p).is_some() {
            log_line(&mut self.pending, 'G', '-', p, "");
        }
    }

    fn get(&self, p: &Path) -> Option<&Origin> {
        self.map.get(p)
    }
}

/// The delta's metadata. Persisted as an append-only journal (`<delta>/meta`), replayed and
/// compacted when the delta is opened and after each publish, so that a change costs one
/// small append, not a rewrite.
#[derive(Debug)]
struct Meta {
    /// Lower paths deleted in this sandbox.
    whiteouts: LogSet,
    /// Upper entries created over a whiteout: the lower subtree below them stays dead.
    opaque: LogSet,
    /// Paths changed since the last publish.
    dirty: LogSet,
    /// Lower identity at copy-up or delete time.
    origins: LogMap,
    /// The journal, open for appending.
    log: Option<File>,
}

impl Default for Meta {
    fn default() -> Self {
        Meta {
            whiteouts: LogSet::new('W'),
            opaque: LogSet::new('O'),
            dirty: LogSet::new('D'),
            origins: LogMap::default(),
            log: None,
        }
    }
}

impl Meta {
    fn lower_visible(&self, rel: &Path) -> bool {
        if self.whiteouts.is_empty() && self.opaque.is_empty() {
            return true;
        }
        for (i, anc) in rel.ancestors().enumerate() {
            if anc.as_os_str().is_empty() {
                break;
            }
            if self.whiteouts.contains(anc) || (i > 0 && self.opaque.contains(anc)) {
                return false;
            }
        }
        true
    }

    /// Takes the journal lines of the changes made since the last call.
    fn take_pending(&mut self) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.whiteouts.pending);
        out.append(&mut self.opaque.pending);
        out.append(&mut self.dirty.pending);
        out.append(&mut self.origins.pending);
        out
    }

    /// The whole state as journal lines.
    fn snapshot(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for set in [&self.whiteouts, &self.opaque, &self.dirty] {
            for p in set.iter() {
                log_line(&mut out, set.tag, '+', p, "");
            }
        }
        for (p, o) in &self.origins.map {
            log_line(
                &mut out,
                'G',
                '+',
                p,
                &format!(" {} {} {}", o.size, o.mtime_ns, o.ino),
            );
        }
        out
    }

    /// Replays a journal.
    fn replay(text: &str, file: &Path) -> Result<Meta, FsError> {
        let mut m = Meta::default();
        // A line cut short by a crash is the tail of an append that never completed.
        let complete = match text.rfind('\n') {
            Some(end) => &text[..=end],
            None => "",
        };
        for (i, l) in complete.lines().enumerate() {
            let bad = || FsError::CorruptMeta {
                path: file.to_path_buf(),
                line: i + 1,
            };
            let mut parts = l.split(' ');
            let tag = parts.next().ok_or_else(bad)?;
            let path = parts
                .next()
                .and_then(unhex)
                .map(|b| PathBuf::from(OsString::from_vec(b)))
                .ok_or_else(bad)?;
            check_rel(&path).map_err(|_| bad())?;
            let set = match tag.get(..1) {
                Some("W") => Some(&mut m.whiteouts),
                Some("O") => Some(&mut m.opaque),
                Some("D") => Some(&mut m.dirty),
                Some("G") => None,
                _ => return Err(bad()),
            };
            match (set, tag.get(1..)) {
                (Some(set), Some("+")) => {
                    set.insert(path);
                }
                (Some(set), Some("-")) => {
                    set.remove(&path);
                }
                (None, Some("+")) => {
                    let mut num = || parts.next().ok_or_else(bad);
                    let size = num()?.parse().map_err(|_| bad())?;
                    let mtime_ns = num()?.parse().map_err(|_| bad())?;
                    let ino = num()?.parse().map_err(|_| bad())?;
                    m.origins.insert(
                        path,
                        Origin {
                            size,
                            mtime_ns,
                            ino,
                        },
                    );
                }
                (None, Some("-")) => m.origins.remove(&path),
                _ => return Err(bad()),
            }
        }
        m.take_pending();
        Ok(m)
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Checks that `rel` is a relative path of plain components (no `.`, `..`, root or NUL).
pub(crate) fn check_rel(rel: &Path) -> Result<(), FsError> {
    for c in rel.components() {
        match c {
            Component::Normal(n) if !n.as_bytes().contains(&0) => {}
            _ => {
                return Err(FsError::InvalidName {
                    name: rel.to_string_lossy().into_owned(),
                });
            }
        }
    }
    Ok(())
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

/// "Absent" for resolution purposes: missing, or blocked by a non-directory or a symlink.
fn is_absent(e: &io::Error) -> bool {
    matches!(
        errno(e),
        libc::ENOENT | libc::ENOTDIR | libc::ELOOP | libc::EXDEV
    )
}

/// A sandbox's copy-on-write view of a codebase. All methods take paths relative to the
/// codebase root (`a/b.txt`, the empty path for the root).
#[derive(Debug)]
pub struct Delta {
    lower: OwnedFd,
    upper: OwnedFd,
    work: OwnedFd,
    lower_path: PathBuf,
    meta_path: PathBuf,
    meta: Mutex<Meta>,
    counter: AtomicU64,
    /// Publish writes its temporary files in `work` (never visible in the codebase, removed
    /// at the next open if a crash leaves them) while renaming from there into the codebase
    /// works; cleared at the first EXDEV (different filesystems or mounts).
    publish_via_work: std::sync::atomic::AtomicBool,
    /// The sandbox's disk quota and what counts against it.
    usage: DiskUsage,
    /// The delta directory (for the quota's published-growth record).
    dir: PathBuf,
}

impl Delta {
    /// Opens (creating as needed) the delta at `delta_dir` over the codebase at `lower`.
    /// Existing metadata (whiteouts, journal) is loaded, so a stopped sandbox resumes.
    pub fn open(lower: &Path, delta_dir: &Path) -> Result<Delta, FsError> {
        let open_root = |p: &Path| {
            rustix::fs::open(
                p,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| FsError::io("open layer root", p, e.into()))
        };
        for sub in ["upper", "work"] {
            let p = delta_dir.join(sub);
            std::fs::create_dir_all(&p).map_err(|e| FsError::io("create delta dir", &p, e))?;
        }
        // Only the daemon reads the delta; the sandbox sees it through the mount.
        std::fs::set_permissions(
            delta_dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .map_err(|e| FsError::io("chmod delta dir", delta_dir, e))?;
        let meta_path = delta_dir.join("meta");
        let meta = match std::fs::read_to_string(&meta_path) {
            Ok(text) => Meta::replay(&text, &meta_path)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Meta::default(),
            Err(e) => return Err(FsError::io("read delta meta", &meta_path, e)),
        };
        let delta = Delta {
            lower: open_root(lower)?,
            upper: open_root(&delta_dir.join("upper"))?,
            work: open_root(&delta_dir.join("work"))?,
            lower_path: lower.to_path_buf(),
            meta_path,
            meta: Mutex::new(meta),
            counter: AtomicU64::new(0),
            publish_via_work: std::sync::atomic::AtomicBool::new(true),
            usage: DiskUsage::default(),
            dir: delta_dir.to_path_buf(),
        };
        delta
            .usage
            .set_upper(footprint_below(&delta_dir.join("upper")));
        delta.usage.load_published(delta_dir);
        delta.compact(&mut delta.lock())?;
        remove_stale_temps(&delta_dir.join("work"));
        Ok(delta)
    }

    /// The upper layer's space and quota.
    pub fn usage(&self) -> &DiskUsage {
        &self.usage
    }

    /// (allocated bytes, 1) of `rel` in the upper layer, (0, 0) if it is not there.
    fn footprint(&self, rel: &Path) -> (i64, i64) {
        match host::lstat(self.upper.as_fd(), rel) {
            Ok(st) => (allocated(u64::try_from(st.st_blocks).unwrap_or(0)), 1),
            Err(_) => (0, 0),
        }
    }

    /// Runs `f`, charging the change of the upper footprint of `rels` to the quota (each
    /// path once). Creations and removals name the parent directory too: a directory grows
    /// with its entries (and ext4's never shrinks), and what `rmdir` gives back must have been
    /// charged.
    fn accounted<T>(
        &self,
        rels: &[&Path],
        f: impl FnOnce() -> Result<T, FsError>,
    ) -> Result<T, FsError> {
        let mut paths: Vec<&Path> = Vec::with_capacity(rels.len());
        for r in rels {
            if !paths.contains(r) {
                paths.push(r);
            }
        }
        let sum = |d: &Self| {
            paths
                .iter()
                .map(|r| d.footprint(r))
                .fold((0, 0), |(b, i), (b2, i2)| (b + b2, i + i2))
        };
        let before = sum(self);
        let r = f();
        let after = sum(self);
        self.usage.charge(after.0 - before.0, after.1 - before.1);
        r
    }

    /// Rewrites the journal as a snapshot (temp file + rename) and reopens it for appending.
    fn compact(&self, meta: &mut Meta) -> Result<(), FsError> {
        meta.take_pending();
        let tmp = self.meta_path.with_extension("tmp");
        let snapshot = meta.snapshot();
        let write = || -> io::Result<File> {
            let mut f = File::create(&tmp)?;
            f.write_all(&snapshot)?;
            std::fs::rename(&tmp, &self.meta_path)?;
            File::options().append(true).open(&self.meta_path)
        };
        meta.log = Some(write().map_err(|e| FsError::io("write delta meta", &self.meta_path, e))?);
        let len = snapshot.len() as i64;
        self.usage.set_journal(len, len);
        Ok(())
    }

    /// The codebase directory.
    pub fn lower_path(&self) -> &Path {
        &self.lower_path
    }

    fn lock(&self) -> MutexGuard<'_, Meta> {
        // A panic while holding the lock leaves the metadata consistent enough to go on.
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends the changes made to `meta` since the last save to the journal.
    fn save(&self, meta: &mut Meta) -> Result<(), FsError> {
        let pending = meta.take_pending();
        if pending.is_empty() {
            return Ok(());
        }
        // The journal counts against the disk quota, and churn (the same names created and
        // removed over and over) must not grow it without end: past twice its last snapshot
        // (and 1 MiB), it is rewritten as a snapshot.
        let (journal, snapshot) = self.usage.journal();
        if journal + pending.len() as i64 > 2 * snapshot + (1 << 20) {
            return self.compact(meta);
        }
        match &mut meta.log {
            Some(log) => {
                log.write_all(&pending)
                    .map_err(|e| FsError::io("append delta meta", &self.meta_path, e))?;
                self.usage
                    .set_journal(journal + pending.len() as i64, snapshot);
                Ok(())
            }
            None => self.compact(meta),
        }
    }

    fn mark_dirty(&self, meta: &mut Meta, rel: &Path) -> Result<(), FsError> {
        // The root itself is never published (its mode and times stay the codebase's).
        if !rel.as_os_str().is_empty() && meta.dirty.insert(rel.to_path_buf()) {
            self.save(meta)?;
        }
        Ok(())
    }

    fn lookup_locked(&self, meta: &Meta, rel: &Path) -> Result<Option<Attr>, FsError> {
        match host::lstat(self.upper.as_fd(), rel) {
            Ok(st) => return Ok(Some(Attr::from_stat(Layer::Upper, &st))),
            Err(e) if errno(&e) == libc::ENOENT => {}
            Err(e) if is_absent(&e) => return Ok(None),
            Err(e) => return Err(FsError::io("lstat upper", rel, e)),
        }
        if !meta.lower_visible(rel) || rel.file_name().is_some_and(|n| is_stage_name(n.as_bytes()))
        {
            return Ok(None);
        }
        match host::lstat(self.lower.as_fd(), rel) {
            Ok(st) => Ok(Some(Attr::from_stat(Layer::Lower, &st))),
            Err(e) if is_absent(&e) => Ok(None),
            Err(e) => Err(FsError::io("lstat lower", rel, e)),
        }
    }

    /// Attributes of `rel` in the merged view, `None` if absent.
    pub fn lookup(&self, rel: &Path) -> Result<Option<Attr>, FsError> {
        check_rel(rel)?;
        let meta = self.lock();
        self.lookup_locked(&meta, rel)
    }

    fn list_locked(&self, meta: &Meta, rel: &Path) -> Result<Vec<(OsString, EntryKind)>, FsError> {
        let mut out: BTreeMap<Vec<u8>, EntryKind> = BTreeMap::new();
        match host::list(self.upper.as_fd(), rel) {
            Ok(v) => out.extend(v.into_iter().map(|(n, k)| (n, k.into()))),
            Err(e) if errno(&e) == libc::ENOENT => {}
            Err(e) if is_absent(&e) => return Err(FsError::NotDir { path: rel.into() }),
            Err(e) => return Err(FsError::io("list upper", rel, e)),
        }
        if meta.lower_visible(rel) && !meta.opaque.contains(rel) {
            match host::list(self.lower.as_fd(), rel) {
                Ok(v) => {
                    for (n, k) in v {
                        if out.contains_key(&n)
                            || is_stage_name(&n)
                            || meta.whiteouts.contains(&rel.join(OsStr::from_bytes(&n)))
                        {
                            continue;
                        }
                        out.insert(n, k.into());
                    }
                }
                Err(e) if is_absent(&e) => {}
                Err(e) => return Err(FsError::io("list lower", rel, e)),
            }
        }
        Ok(out
            .into_iter()
            .map(|(n, k)| (OsString::from_vec(n), k))
            .collect())
    }

    /// The merged entries of directory `rel`, sorted by name. Nothing is filtered by name
    /// (a codebase file called `.wh.x` is an ordinary entry) but publishing's own staging
    /// names ([`is_stage_name`]), which must never be readable under a name no rule hides.
    pub fn list(&self, rel: &Path) -> Result<Vec<(OsString, EntryKind)>, FsError> {
        check_rel(rel)?;
        let meta = self.lock();
        self.list_locked(&meta, rel)
    }

    /// Opens regular file `rel` read-only from whichever layer holds it.
    pub fn open_read(&self, rel: &Path) -> Result<(File, Layer), FsError> {
        check_rel(rel)?;
        let meta = self.lock();
        let attr = self
            .lookup_locked(&meta, rel)?
            .ok_or_else(|| FsError::NotFound { path: rel.into() })?;
        if attr.kind == EntryKind::Dir {
            return Err(FsError::IsDir { path: rel.into() });
        }
        let root = self.root(attr.layer);
        let fd = host::open_file(root, rel, OFlags::RDONLY)
            .map_err(|e| FsError::io("open for reading", rel, e))?;
        Ok((File::from(fd), attr.layer))
    }

    /// Opens regular file `rel` read-only to judge what it holds, without taking the delta's
    /// lock (publish asks while holding it): the copy in this sandbox's layer if there is one,
    /// else the codebase's. Not a merged-view lookup: callers ask only about paths they know
    /// exist, or about a deletion, whose content is the codebase's.
    pub(crate) fn open_content(&self, rel: &Path) -> std::io::Result<File> {
        check_rel(rel).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        match host::open_file(self.upper.as_fd(), rel, OFlags::RDONLY) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                host::open_file(self.lower.as_fd(), rel, OFlags::RDONLY)
            }
            r => r,
        }
        .map(File::from)
    }

    /// Reads the target of symlink `rel`.
    pub fn readlink(&self, rel: &Path) -> Result<Vec<u8>, FsError> {
        check_rel(rel)?;
        let meta = self.lock();
        let attr = self
            .lookup_locked(&meta, rel)?
            .ok_or_else(|| FsError::NotFound { path: rel.into() })?;
        host::readlink(self.root(attr.layer), rel).map_err(|e| FsError::io("readlink", rel, e))
    }

    fn root(&self, layer: Layer) -> BorrowedFd<'_> {
        match layer {
            Layer::Upper => self.upper.as_fd(),
            Layer::Lower => self.lower.as_fd(),
        }
    }

    /// Creates the upper directories of `rel` (which must exist in the merged view), giving
    /// them the modes of their lower counterparts.
    fn upper_dir(&self, rel: &Path) -> Result<OwnedFd, FsError> {
        let lower = self.lower.as_fd();
        host::mkdir_all(self.upper.as_fd(), rel, |prefix| {
            host::lstat(lower, prefix).map_or(0o755, |st| st.st_mode & 0o7777)
        })
        .map_err(|e| FsError::io("create upper directory", rel, e))
    }

    fn tmp_name(&self) -> OsString {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        OsString::from(format!(".agentfense-{}-{n}.tmp", std::process::id()))
    }

    /// Makes sure `rel` exists in the upper layer (copying it up from the codebase with its
    /// mode, owner and times if needed). Returns its kind.
    fn copy_up_locked(&self, meta: &mut Meta, rel: &Path) -> Result<EntryKind, FsError> {
        self.copy_up_with(meta, rel, true)
    }

    /// [`Self::copy_up_locked`], skipping the data when the caller truncates anyway.
    fn copy_up_with(
        &self,
        meta: &mut Meta,
        rel: &Path,
        with_data: bool,
    ) -> Result<EntryKind, FsError> {
        let attr = self
            .lookup_locked(meta, rel)?
            .ok_or_else(|| FsError::NotFound { path: rel.into() })?;
        if attr.layer == Layer::Upper {
            return Ok(attr.kind);
        }
        if rel.as_os_str().is_empty() {
            return Ok(EntryKind::Dir);
        }
        let (parent, name) = host::split(rel).map_err(|e| FsError::io("copy-up", rel, e))?;
        let pdir = self.upper_dir(parent)?;
        let lower_st =
            host::lstat(self.lower.as_fd(), rel).map_err(|e| FsError::io("lstat lower", rel, e))?;
        self.usage.check_room(
            u64::try_from(allocated(u64::try_from(lower_st.st_blocks).unwrap_or(0))).unwrap_or(0),
            1,
        )?;
        let mode = Mode::from_raw_mode(lower_st.st_mode & 0o7777);
        let io = |e: rustix::io::Errno| FsError::io("copy-up", rel, e.into());
        match attr.kind {
            EntryKind::Dir => match rustix::fs::mkdirat(&pdir, name, mode) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(io(e)),
            },
            EntryKind::Symlink => {
                let target = host::readlink(self.lower.as_fd(), rel)
                    .map_err(|e| FsError::io("readlink lower", rel, e))?;
                let tmp = self.tmp_name();
                rustix::fs::symlinkat(OsStr::from_bytes(&target), &self.work, &tmp).map_err(io)?;
                rustix::fs::renameat(&self.work, &tmp, &pdir, name).map_err(io)?;
            }
            EntryKind::File => {
                let src = host::open_file(self.lower.as_fd(), rel, OFlags::RDONLY)
                    .map_err(|e| FsError::io("open lower for copy-up", rel, e))?;
                let tmp = self.tmp_name();
                let dst = rustix::fs::openat(
                    &self.work,
                    &tmp,
                    OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::WRONLY
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(io)?;
                let res = copy_contents(with_data.then_some(src), dst, &lower_st);
                if let Err(e) = res.and_then(|()| {
                    rustix::fs::renameat(&self.work, &tmp, &pdir, name).map_err(Into::into)
                }) {
                    let _ = rustix::fs::unlinkat(&self.work, &tmp, AtFlags::empty());
                    return Err(FsError::io("copy-up", rel, e));
                }
            }
            EntryKind::Other => {
                return Err(FsError::NotSupported {
                    op: "copy-up of a special file",
                    path: rel.into(),
                });
            }
        }
        if attr.kind != EntryKind::Dir {
            meta.origins.insert_if_absent(rel, || Origin::of(&lower_st));
        }
        meta.dirty.insert(rel.to_path_buf());
        self.save(meta)?;
        Ok(attr.kind)
    }

    /// Copies the data of codebase file `rel`, when it is about to be copied up and large,
    /// into a temporary file *without* holding the delta lock (everything else in the sandbox
    /// goes on meanwhile), then installs it under the lock if `rel` still is that same
    /// codebase file. Best effort: in any other case the copy is dropped and the caller's
    /// locked copy-up does the work.
    fn stage_copy_up(&self, rel: &Path) {
        // Already in the delta (the usual case after the first write): nothing to copy, and
        // no reason to take the lock here. A race only makes the locked path decide.
        if host::lstat(self.upper.as_fd(), rel).is_ok() {
            return;
        }
        let lower_st = {
            let meta = self.lock();
            match self.lookup_locked(&meta, rel) {
                Ok(Some(a))
                    if a.layer == Layer::Lower
                        && a.kind == EntryKind::File
                        && a.size >= UNLOCKED_COPY_MIN => {}
                _ => return,
            }
            match host::lstat(self.lower.as_fd(), rel) {
                Ok(st) => st,
                Err(_) => return,
            }
        };
        let Ok(src) = host::open_file(self.lower.as_fd(), rel, OFlags::RDONLY) else {
            return;
        };
        if !rustix::fs::fstat(&src).is_ok_and(|st| same_version(&st, &lower_st)) {
            return;
        }
        // A copy that would not fit the quota is left to the locked path, which refuses it.
        if self
            .usage
            .fits(allocated(u64::try_from(lower_st.st_blocks).unwrap_or(0)), 1)
            .is_err()
        {
            return;
        }
        let tmp = self.tmp_name();
        let Ok(dst) = rustix::fs::openat(
            &self.work,
            &tmp,
            OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        ) else {
            return;
        };
        let copied = copy_contents(Some(src), dst, &lower_st).is_ok();
        let mut meta = self.lock();
        let installed = copied
            && matches!(self.lookup_locked(&meta, rel), Ok(Some(a)) if a.layer == Layer::Lower)
            && host::lstat(self.lower.as_fd(), rel).is_ok_and(|st| same_version(&st, &lower_st))
            && host::split(rel).is_ok_and(|(parent, name)| {
                self.upper_dir(parent)
                    .is_ok_and(|pdir| rustix::fs::renameat(&self.work, &tmp, &pdir, name).is_ok())
            });
        if !installed {
            let _ = rustix::fs::unlinkat(&self.work, &tmp, AtFlags::empty());
            return;
        }
        meta.origins.insert_if_absent(rel, || Origin::of(&lower_st));
        meta.dirty.insert(rel.to_path_buf());
        // A failed journal write shows again (and fails the call) at the caller's own save.
        let _ = self.save(&mut meta);
    }

    /// Copies `rel` up (if it is not already in the delta) and records it as changed.
    fn copy_up_raw(&self, rel: &Path) -> Result<EntryKind, FsError> {
        check_rel(rel)?;
        self.stage_copy_up(rel);
        let mut meta = self.lock();
        let kind = self.copy_up_locked(&mut meta, rel)?;
        self.mark_dirty(&mut meta, rel)?;
        Ok(kind)
    }

    /// Opens regular file `rel` for writing (read-write), copying it up first.
    fn open_write_raw(&self, rel: &Path, truncate: bool) -> Result<File, FsError> {
        check_rel(rel)?;
        if !truncate {
            self.stage_copy_up(rel);
        }
        let mut meta = self.lock();
        let kind = self
            .lookup_locked(&meta, rel)?
            .ok_or_else(|| FsError::NotFound { path: rel.into() })?
            .kind;
        if kind != EntryKind::File {
            return Err(if kind == EntryKind::Dir {
                FsError::IsDir { path: rel.into() }
            } else {
                FsError::NotSupported {
                    op: "write to a non-regular file",
                    path: rel.into(),
                }
            });
        }
        self.copy_up_with(&mut meta, rel, !truncate)?;
        let mut flags = OFlags::RDWR;
        if truncate {
            flags |= OFlags::TRUNC;
        }
        let fd = host::open_file(self.upper.as_fd(), rel, flags)
            .map_err(|e| FsError::io("open for writing", rel, e))?;
        self.mark_dirty(&mut meta, rel)?;
        Ok(File::from(fd))
    }

    /// Bookkeeping for a new entry at `rel`: a whiteout there becomes an opaque marker, so
    /// that the deleted lower subtree stays dead below the new entry.
    fn note_created(&self, meta: &mut Meta, rel: &Path) -> Result<(), FsError> {
        if meta.whiteouts.remove(rel) {
            meta.opaque.insert(rel.to_path_buf());
        }
        meta.dirty.insert(rel.to_path_buf());
        self.save(meta)
    }

    fn prepare_new(&self, meta: &Meta, rel: &Path) -> Result<(OwnedFd, PathBuf), FsError> {
        refuse_stage_name(rel)?;
        if self.lookup_locked(meta, rel)?.is_some() {
            return Err(FsError::Exists { path: rel.into() });
        }
        let (parent, _) = host::split(rel).map_err(|e| FsError::io("create", rel, e))?;
        match self.lookup_locked(meta, parent)? {
            Some(a) if a.kind == EntryKind::Dir => {}
            Some(_) => {
                return Err(FsError::NotDir {
                    path: parent.into(),
                });
            }
            None => {
                return Err(FsError::NotFound {
                    path: parent.into(),
                });
            }
        }
        Ok((self.upper_dir(parent)?, parent.to_path_buf()))
    }

    /// Creates regular file `rel` (which must not exist) with `mode`, owned by `owner` when
    /// given, and opens it read-write.
    fn create_file_raw(
        &self,
        rel: &Path,
        mode: u32,
        owner: Option<(u32, u32)>,
    ) -> Result<File, FsError> {
        check_rel(rel)?;
        let mut meta = self.lock();
        let (pdir, _) = self.prepare_new(&meta, rel)?;
        let (_, name) = host::split(rel).map_err(|e| FsError::io("create", rel, e))?;
        let fd = rustix::fs::openat(
            &pdir,
            name,
            OFlags::CREATE | OFlags::EXCL | OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(agent_mode(mode, EntryKind::File)),
        )
        .map_err(|e| FsError::io("create file", rel, e.into()))?;
        // The umask already applied; set the exact bits the kernel asked for.
        let _ = rustix::fs::fchmod(&fd, Mode::from_raw_mode(agent_mode(mode, EntryKind::File)));
        if let Some((u, g)) = owner {
            chown_fd(&fd, u, g);
        }
        self.note_created(&mut meta, rel)?;
        Ok(File::from(fd))
    }

    /// Creates directory `rel`.
    fn mkdir_raw(&self, rel: &Path, mode: u32, owner: Option<(u32, u32)>) -> Result<(), FsError> {
        check_rel(rel)?;
        let mut meta = self.lock();
        let (pdir, _) = self.prepare_new(&meta, rel)?;
        let (_, name) = host::split(rel).map_err(|e| FsError::io("mkdir", rel, e))?;
        rustix::fs::mkdirat(
            &pdir,
            name,
            Mode::from_raw_mode(agent_mode(mode, EntryKind::Dir)),
        )
        .map_err(|e| FsError::io("mkdir", rel, e.into()))?;
        chown_new(&pdir, name, owner);
        self.note_created(&mut meta, rel)
    }

    /// Creates symlink `rel` pointing at `target` (stored verbatim, never resolved here).
    fn symlink_raw(
        &self,
        rel: &Path,
        target: &Path,
        owner: Option<(u32, u32)>,
    ) -> Result<(), FsError> {
        check_rel(rel)?;
        let mut meta = self.lock();
        let (pdir, _) = self.prepare_new(&meta, rel)?;
        let (_, name) = host::split(rel).map_err(|e| FsError::io("symlink", rel, e))?;
        rustix::fs::symlinkat(target, &pdir, name)
            .map_err(|e| FsError::io("symlink", rel, e.into()))?;
        chown_new(&pdir, name, owner);
        self.note_created(&mut meta, rel)
    }

    fn lower_entry(&self, meta: &Meta, rel: &Path) -> Option<Stat> {
        if !meta.lower_visible(rel) {
            return None;
        }
        host::lstat(self.lower.as_fd(), rel).ok()
    }

    /// Removes `rel` (already checked to exist and to be of the right type, and to be empty
    /// when a directory).
    fn remove_locked(&self, meta: &mut Meta, rel: &Path, attr: &Attr) -> Result<(), FsError> {
        let lower = self.lower_entry(meta, rel);
        if attr.layer == Layer::Upper {
            let (parent, name) = host::split(rel).map_err(|e| FsError::io("remove", rel, e))?;
            let pdir = host::open_dir(self.upper.as_fd(), parent)
                .map_err(|e| FsError::io("open upper directory", parent, e))?;
            host::remove_at(pdir.as_fd(), name, attr.kind == EntryKind::Dir)
                .map_err(|e| FsError::io("remove", rel, e))?;
        }
        meta.opaque.remove(rel);
        if let Some(st) = lower {
            meta.origins.insert_if_absent(rel, || Origin::of(&st));
            meta.whiteouts.insert(rel.to_path_buf());
        } else {
            meta.origins.remove(rel);
        }
        meta.dirty.insert(rel.to_path_buf());
        self.save(meta)
    }

    /// Deletes non-directory `rel`.
    fn unlink_raw(&self, rel: &Path) -> Result<(), FsError> {
        check_rel(rel)?;
        let mut meta = self.lock();
        let attr = self
            .lookup_locked(&meta, rel)?
            .ok_or_else(|| FsError::NotFound { path: rel.into() })?;
        if attr.kind == EntryKind::Dir {
            return Err(FsError::IsDir { path: rel.into() });
        }
        self.remove_locked(&mut meta, rel, &attr)
    }

    /// Deletes directory `rel`, which must be empty in the merged view. Entries the rules
    /// hide count: a directory holding only hidden files is not empty, and nothing is deleted.
    fn rmdir_raw(&self, rel: &Path) -> Result<(), FsError> {
        check_rel(rel)?;
        if rel.as_os_str().is_empty() {
            return Err(FsError::NotPermitted {
                op: "rmdir of the root",
                path: rel.into(),
            });
        }
        let mut meta = self.lock();
        let attr = self
            .lookup_locked(&meta, rel)?
            .ok_or_else(|| FsError::NotFound { path: rel.into() })?;
        if attr.kind != EntryKind::Dir {
            return Err(FsError::NotDir { path: rel.into() });
        }
        if !self.list_locked(&meta, rel)?.is_empty() {
            return Err(FsError::NotEmpty { path: rel.into() });
        }
        self.remove_locked(&mut meta, rel, &attr)
    }

    /// Whether `rel` (a directory) has a codebase part that would have to move with it.
    fn has_lower_part(&self, meta: &Meta, rel: &Path) -> bool {
        self.lower_entry(meta, rel).is_some() && !meta.opaque.contains(rel)
    }

    /// Every upper path at or below `rel`.
    fn upper_subtree(&self, rel: &Path, out: &mut Vec<PathBuf>) {
        out.push(rel.to_path_buf());
        if let Ok(entries) = host::list(self.upper.as_fd(), rel) {
            for (n, k) in entries {
                let child = rel.join(OsStr::from_bytes(&n));
                if k == Kind::Dir {
                    self.upper_subtree(&child, out);
                } else {
                    out.push(child);
                }
            }
        }
    }

    /// The paths a rename of directory `from` would move (for the caller's policy checks),
    /// or `CrossDevice` when the directory has a codebase part (then tools copy + delete).
    pub fn dir_rename_paths(&self, from: &Path) -> Result<Vec<PathBuf>, FsError> {
        check_rel(from)?;
        let meta = self.lock();
        if self.has_lower_part(&meta, from) {
            return Err(FsError::CrossDevice { path: from.into() });
        }
        let mut out = Vec::new();
        self.upper_subtree(from, &mut out);
        Ok(out)
    }

    /// Renames `from` to `to`, replacing `to` if it exists (an empty directory, or a
    /// non-directory when `from` is one). A directory can only be renamed when it lives
    /// entirely in the delta; otherwise `CrossDevice`.
    fn rename_raw(&self, from: &Path, to: &Path) -> Result<(), FsError> {
        check_rel(from)?;
        check_rel(to)?;
        if from.as_os_str().is_empty() || to.as_os_str().is_empty() {
            return Err(FsError::NotPermitted {
                op: "rename of the root",
                path: from.into(),
            });
        }
        refuse_stage_name(to)?;
        if to.starts_with(from) && from != to {
            return Err(FsError::InvalidName {
                name: to.to_string_lossy().into_owned(),
            });
        }
        let mut meta = self.lock();
        let src = self
            .lookup_locked(&meta, from)?
            .ok_or_else(|| FsError::NotFound { path: from.into() })?;
        if from == to {
            return Ok(());
        }
        let is_dir = src.kind == EntryKind::Dir;
        if is_dir && self.has_lower_part(&meta, from) {
            return Err(FsError::CrossDevice { path: from.into() });
        }
        let (to_parent, to_name) = host::split(to).map_err(|e| FsError::io("rename", to, e))?;
        match self.lookup_locked(&meta, to_parent)? {
            Some(a) if a.kind == EntryKind::Dir => {}
            Some(_) => {
                return Err(FsError::NotDir {
                    path: to_parent.into(),
                });
            }
            None => {
                return Err(FsError::NotFound {
                    path: to_parent.into(),
                });
            }
        }
        if let Some(dst) = self.lookup_locked(&meta, to)? {
            match (is_dir, dst.kind == EntryKind::Dir) {
                (true, false) => return Err(FsError::NotDir { path: to.into() }),
                (false, true) => return Err(FsError::IsDir { path: to.into() }),
                (true, true) if !self.list_locked(&meta, to)?.is_empty() => {
                    return Err(FsError::NotEmpty { path: to.into() });
                }
                _ => {}
            }
            self.remove_locked(&mut meta, to, &dst)?;
        }
        let from_lower = self.lower_entry(&meta, from);
        if src.layer == Layer::Lower {
            self.copy_up_locked(&mut meta, from)?;
        }
        let (from_parent, from_name) =
            host::split(from).map_err(|e| FsError::io("rename", from, e))?;
        let fdir = host::open_dir(self.upper.as_fd(), from_parent)
            .map_err(|e| FsError::io("open upper directory", from_parent, e))?;
        let tdir = self.upper_dir(to_parent)?;
        rustix::fs::renameat(&fdir, from_name, &tdir, to_name)
            .map_err(|e| FsError::io("rename", from, e.into()))?;
        // Upper-only opaque markers travel with the directory.
        let moved: Vec<PathBuf> = meta
            .opaque
            .iter()
            .filter(|p| p.starts_with(from) && p.as_path() != from)
            .cloned()
            .collect();
        for p in moved {
            meta.opaque.remove(&p);
            if let Ok(suffix) = p.strip_prefix(from) {
                meta.opaque.insert(to.join(suffix));
            }
        }
        meta.opaque.remove(from);
        if let Some(st) = from_lower {
            meta.origins.insert_if_absent(from, || Origin::of(&st));
            meta.whiteouts.insert(from.to_path_buf());
        } else {
            meta.origins.remove(from);
        }
        meta.dirty.insert(from.to_path_buf());
        let mut moved_paths = Vec::new();
        self.upper_subtree(to, &mut moved_paths);
        meta.dirty.extend(moved_paths);
        self.note_created(&mut meta, to)
    }

    /// chmod: copies up and sets the permission bits.
    fn set_mode_raw(&self, rel: &Path, mode: u32) -> Result<(), FsError> {
        check_rel(rel)?;
        self.stage_copy_up(rel);
        let mut meta = self.lock();
        let kind = self.copy_up_locked(&mut meta, rel)?;
        if kind == EntryKind::Symlink {
            return Err(FsError::NotSupported {
                op: "chmod of a symlink",
                path: rel.into(),
            });
        }
        let fd = open_any(self.upper.as_fd(), rel, kind)?;
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(agent_mode(mode, kind)))
            .map_err(|e| FsError::io("chmod", rel, e.into()))?;
        self.mark_dirty(&mut meta, rel)
    }

    /// utimes: copies up and sets the times (`None` leaves one unchanged).
    fn set_times_raw(
        &self,
        rel: &Path,
        atime: Option<SystemTime>,
        mtime: Option<SystemTime>,
    ) -> Result<(), FsError> {
        check_rel(rel)?;
        self.stage_copy_up(rel);
        let mut meta = self.lock();
        self.copy_up_locked(&mut meta, rel)?;
        let ts = |t: Option<SystemTime>| match t {
            Some(t) => to_timespec(t),
            None => Timespec {
                tv_sec: 0,
                tv_nsec: rustix::fs::UTIME_OMIT,
            },
        };
        let times = Timestamps {
            last_access: ts(atime),
            last_modification: ts(mtime),
        };
        let (parent, name) = if rel.as_os_str().is_empty() {
            (Path::new(""), OsStr::new("."))
        } else {
            host::split(rel).map_err(|e| FsError::io("utimes", rel, e))?
        };
        let pdir = host::open_dir(self.upper.as_fd(), parent)
            .map_err(|e| FsError::io("open upper directory", parent, e))?;
        rustix::fs::utimensat(&pdir, name, &times, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| FsError::io("utimes", rel, e.into()))?;
        self.mark_dirty(&mut meta, rel)
    }

    /// truncate: copies up and sets the size.
    fn truncate_raw(&self, rel: &Path, size: u64) -> Result<(), FsError> {
        let f = self.open_write_raw(rel, size == 0)?;
        f.set_len(size).map_err(|e| FsError::io("truncate", rel, e))
    }

    /// [`Self::copy_up_raw`], charged to the disk quota.
    pub fn copy_up(&self, rel: &Path) -> Result<EntryKind, FsError> {
        self.accounted(&[rel], || self.copy_up_raw(rel))
    }

    /// [`Self::open_write_raw`], charged to the disk quota.
    pub fn open_write(&self, rel: &Path, truncate: bool) -> Result<File, FsError> {
        self.accounted(&[rel], || self.open_write_raw(rel, truncate))
    }

    /// [`Self::unlink_raw`], charged to the disk quota.
    pub fn unlink(&self, rel: &Path) -> Result<(), FsError> {
        self.accounted(&[rel, parent_of(rel)], || self.unlink_raw(rel))
    }

    /// [`Self::rmdir_raw`], charged to the disk quota.
    pub fn rmdir(&self, rel: &Path) -> Result<(), FsError> {
        self.accounted(&[rel, parent_of(rel)], || self.rmdir_raw(rel))
    }

    /// [`Self::rename_raw`], charged to the disk quota.
    pub fn rename(&self, from: &Path, to: &Path) -> Result<(), FsError> {
        self.accounted(&[from, to, parent_of(from), parent_of(to)], || {
            self.rename_raw(from, to)
        })
    }

    /// [`Self::set_mode_raw`], charged to the disk quota.
    pub fn set_mode(&self, rel: &Path, mode: u32) -> Result<(), FsError> {
        self.accounted(&[rel], || self.set_mode_raw(rel, mode))
    }

    /// [`Self::truncate_raw`], charged to the disk quota.
    pub fn truncate(&self, rel: &Path, size: u64) -> Result<(), FsError> {
        self.accounted(&[rel], || self.truncate_raw(rel, size))
    }

    /// [`Self::create_file_raw`], charged to the disk quota.
    pub fn create_file(
        &self,
        rel: &Path,
        mode: u32,
        owner: Option<(u32, u32)>,
    ) -> Result<File, FsError> {
        self.usage.check_room(0, 1)?;
        self.accounted(&[rel, parent_of(rel)], || {
            self.create_file_raw(rel, mode, owner)
        })
    }

    /// [`Self::mkdir_raw`], charged to the disk quota.
    pub fn mkdir(&self, rel: &Path, mode: u32, owner: Option<(u32, u32)>) -> Result<(), FsError> {
        self.usage.check_room(0, 1)?;
        self.accounted(&[rel, parent_of(rel)], || self.mkdir_raw(rel, mode, owner))
    }

    /// [`Self::symlink_raw`], charged to the disk quota.
    pub fn symlink(
        &self,
        rel: &Path,
        target: &Path,
        owner: Option<(u32, u32)>,
    ) -> Result<(), FsError> {
        self.usage.check_room(0, 1)?;
        self.accounted(&[rel, parent_of(rel)], || {
            self.symlink_raw(rel, target, owner)
        })
    }

    /// [`Self::set_times_raw`], charged to the disk quota.
    pub fn set_times(
        &self,
        rel: &Path,
        atime: Option<SystemTime>,
        mtime: Option<SystemTime>,
    ) -> Result<(), FsError> {
        self.accounted(&[rel], || self.set_times_raw(rel, atime, mtime))
    }

    /// Paths changed since the last publish.
    pub fn pending(&self) -> Vec<PathBuf> {
        self.lock().dirty.iter().cloned().collect()
    }

    /// Whether nothing is pending, answered without waiting: `false` also when the delta is
    /// busy (a copy-up or publish in progress), so a caller that must not block can take the
    /// slow path then.
    pub fn surely_clean(&self) -> bool {
        match self.meta.try_lock() {
            Ok(m) => m.dirty.is_empty(),
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner().dirty.is_empty(),
            Err(std::sync::TryLockError::WouldBlock) => false,
        }
    }

    /// What a publish would do now, path by path (for review and diff workflows).
    pub fn changes(&self) -> Vec<Change> {
        let meta = self.lock();
        meta.dirty
            .iter()
            .filter_map(|p| {
                let kind = match host::lstat(self.upper.as_fd(), p) {
                    Ok(st) => {
                        let in_lower = host::lstat(self.lower.as_fd(), p).is_ok();
                        let entry = EntryKind::from(Kind::from_mode(st.st_mode));
                        if in_lower {
                            ChangeKind::Modified(entry)
                        } else {
                            ChangeKind::Added(entry)
                        }
                    }
                    Err(_) if meta.whiteouts.contains(p) => ChangeKind::Deleted,
                    Err(_) => return None,
                };
                Some(Change {
                    path: p.clone(),
                    kind,
                })
            })
            .collect()
    }

    /// Applies the changes made since the last publish to the codebase (see the module docs).
    pub fn publish(&self, filter: &PublishFilter<'_>) -> Result<PublishReport, FsError> {
        let mut meta = self.lock();
        let mut report = PublishReport::default();
        // Most commands change nothing: no tree walk and no journal rewrite for them (this runs
        // after every command, before its result is returned).
        if meta.dirty.is_empty() {
            return Ok(report);
        }
        let dirty: Vec<PathBuf> = meta.dirty.iter().cloned().collect();
        // What this publish adds to the codebase counts against the sandbox's quota.
        let lower_before = self.lower_footprint(&dirty);
        let mut puts = Vec::new();
        let mut dels = Vec::new();
        for p in dirty.iter().cloned() {
            match host::lstat(self.upper.as_fd(), &p) {
                Ok(st) => puts.push((p, st)),
                Err(_) if meta.whiteouts.contains(&p) => dels.push(p),
                Err(_) => {
                    meta.dirty.remove(&p);
                }
            }
        }
        // Deletions, deepest first, so that directories are empty when their turn comes.
        dels.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for p in dels {
            let kind = host::lstat(self.lower.as_fd(), &p)
                .map(|st| EntryKind::from(Kind::from_mode(st.st_mode)))
                .unwrap_or(EntryKind::File);
            if !(filter.allow)(&p, kind) {
                report.skipped.push(p);
                continue;
            }
            match self.publish_delete(&meta, &p) {
                Ok(conflict) => {
                    report.conflicts.extend(conflict);
                    report.deleted.push(p.clone());
                    meta.whiteouts.remove(&p);
                    meta.origins.remove(&p);
                    meta.dirty.remove(&p);
                }
                // Left pending: retried by the next publish.
                Err(e) => report.failed.push((p.clone(), error_chain(&e))),
            }
        }
        // Creations, shallowest first, so that parents exist.
        puts.sort_by(|a, b| {
            (a.0.components().count(), &a.0).cmp(&(b.0.components().count(), &b.0))
        });
        // Published entries keep the owner of what they replace; new ones get the owner of
        // the directory they land in (a user's checkout stays theirs, whatever uid the sandbox
        // wrote as). Shallowest first, so a new directory is its owner's before its entries.
        let owner_of = |rel: &Path| {
            host::lstat(self.lower.as_fd(), rel)
                .map(|st| (st.st_uid, st.st_gid))
                .ok()
        };
        for (p, st) in puts {
            let kind = EntryKind::from(Kind::from_mode(st.st_mode));
            if !(filter.allow)(&p, kind) {
                report.skipped.push(p);
                continue;
            }
            let owner = owner_of(&p).or_else(|| p.ancestors().skip(1).find_map(owner_of));
            let put = self.publish_put(&meta, &p, &st);
            if put.is_ok()
                && let (Some(owner), Ok((parent, name))) = (owner, host::split(&p))
                && let Ok(pdir) = host::open_dir(self.lower.as_fd(), parent)
            {
                chown_new(&pdir, name, Some(owner));
            }
            match put {
                Ok((conflict, new_lower)) => {
                    report.conflicts.extend(conflict);
                    report.written.push(p.clone());
                    if kind == EntryKind::Dir {
                        meta.dirty.remove(&p);
                        if !meta.whiteouts.iter().any(|w| w.starts_with(&p)) {
                            meta.opaque.remove(&p);
                        }
                    } else if (filter.busy)(&p) {
                        if let Some(o) = new_lower {
                            meta.origins.insert(p.clone(), o);
                        }
                    } else {
                        self.drop_upper(&p);
                        meta.opaque.remove(&p);
                        meta.origins.remove(&p);
                        meta.dirty.remove(&p);
                    }
                }
                Err(e) => report.failed.push((p.clone(), error_chain(&e))),
            }
        }
        self.prune_upper(&meta, Path::new(""));
        let lower_after = self.lower_footprint(&dirty);
        self.usage.add_published(
            &self.dir,
            lower_after.0 - lower_before.0,
            lower_after.1 - lower_before.1,
        );
        // Published files left the upper layer (and emptied directories were pruned): measure
        // it afresh rather than following each removal.
        self.usage
            .set_upper(footprint_below(&self.dir.join("upper")));
        self.compact(&mut meta)?;
        Ok(report)
    }

    /// (allocated bytes, entries) that `paths` take in the codebase.
    fn lower_footprint(&self, paths: &[PathBuf]) -> (i64, i64) {
        paths
            .iter()
            .filter_map(|p| host::lstat(self.lower.as_fd(), p).ok())
            // A file with other links keeps its blocks when one name goes: each name carries
            // its share.
            .fold((0, 0), |(b, i), st| {
                let links = i64::try_from(st.st_nlink).unwrap_or(1).max(1);
                (
                    b + allocated(u64::try_from(st.st_blocks).unwrap_or(0)) / links,
                    i + 1,
                )
            })
    }

    fn drop_upper(&self, rel: &Path) {
        if let Ok((parent, name)) = host::split(rel)
            && let Ok(pdir) = host::open_dir(self.upper.as_fd(), parent)
        {
            let _ = host::remove_at(pdir.as_fd(), name, false);
        }
    }

    /// Removes upper directories left empty by a publish (unless they mask codebase content
    /// or still have pending changes), so the sandbox sees the codebase through them again.
    fn prune_upper(&self, meta: &Meta, rel: &Path) -> bool {
        let Ok(entries) = host::list(self.upper.as_fd(), rel) else {
            return false;
        };
        let mut empty = true;
        for (n, k) in entries {
            let child = rel.join(OsStr::from_bytes(&n));
            if k == Kind::Dir && self.prune_upper(meta, &child) {
                continue;
            }
            empty = false;
        }
        if empty
            && !rel.as_os_str().is_empty()
            && !meta.opaque.contains(rel)
            && !meta.dirty.contains(rel)
            && self
                .lower_entry(meta, rel)
                .is_some_and(|st| Kind::from_mode(st.st_mode) == Kind::Dir)
            && let Ok((parent, name)) = host::split(rel)
            && let Ok(pdir) = host::open_dir(self.upper.as_fd(), parent)
        {
            return host::remove_at(pdir.as_fd(), name, true).is_ok();
        }
        false
    }

    fn conflict(&self, meta: &Meta, rel: &Path, found: Option<&Stat>) -> Option<Conflict> {
        let expected = meta.origins.get(rel).copied();
        let found = found.map(Origin::of);
        (expected != found).then(|| Conflict {
            path: rel.into(),
            expected,
            found,
        })
    }

    fn publish_delete(&self, meta: &Meta, rel: &Path) -> Result<Option<Conflict>, FsError> {
        let (parent, name) = host::split(rel).map_err(|e| FsError::io("publish delete", rel, e))?;
        let pdir = match host::open_dir(self.lower.as_fd(), parent) {
            Ok(d) => d,
            Err(e) if errno(&e) == libc::ENOENT => return Ok(None),
            Err(e) => return Err(FsError::io("open codebase directory", parent, e)),
        };
        let st = match rustix::fs::statat(&pdir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(rustix::io::Errno::NOENT) => return Ok(None),
            Err(e) => return Err(FsError::io("lstat codebase", rel, e.into())),
        };
        let is_dir = Kind::from_mode(st.st_mode) == Kind::Dir;
        // Directories are removed only when empty: entries added since (by another sandbox or
        // an upload) are never deleted behind the agent's back.
        let conflict = if is_dir {
            None
        } else {
            self.conflict(meta, rel, Some(&st))
        };
        host::remove_at(pdir.as_fd(), name, is_dir)
            .map_err(|e| FsError::io("publish delete", rel, e))?;
        Ok(conflict)
    }

    fn publish_put(
        &self,
        meta: &Meta,
        rel: &Path,
        st: &Stat,
    ) -> Result<(Option<Conflict>, Option<Origin>), FsError> {
        let kind = Kind::from_mode(st.st_mode);
        let (parent, name) = host::split(rel).map_err(|e| FsError::io("publish", rel, e))?;
        let upper = self.upper.as_fd();
        let pdir = host::mkdir_all(self.lower.as_fd(), parent, |prefix| {
            host::lstat(upper, prefix).map_or(0o755, |st| st.st_mode & 0o7777)
        })
        .map_err(|e| FsError::io("create codebase directory", parent, e))?;
        let io = |op: &'static str| move |e: rustix::io::Errno| FsError::io(op, rel, e.into());
        let current = match rustix::fs::statat(&pdir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(s) => Some(s),
            Err(rustix::io::Errno::NOENT) => None,
            Err(e) => return Err(io("lstat codebase")(e)),
        };
        let cur_kind = current.as_ref().map(|s| Kind::from_mode(s.st_mode));
        if kind == Kind::Dir {
            if cur_kind.is_some_and(|k| k != Kind::Dir) {
                rustix::fs::unlinkat(&pdir, name, AtFlags::empty())
                    .map_err(io("replace with directory"))?;
            }
            match rustix::fs::mkdirat(&pdir, name, Mode::from_raw_mode(st.st_mode & 0o7777)) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(io("publish mkdir")(e)),
            }
            let d = rustix::fs::openat(
                &pdir,
                name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(io("open codebase directory"))?;
            rustix::fs::fchmod(&d, Mode::from_raw_mode(st.st_mode & 0o7777))
                .map_err(io("chmod"))?;
            return Ok((None, None));
        }
        let conflict = self.conflict(meta, rel, current.as_ref());
        if cur_kind == Some(Kind::Dir) {
            rustix::fs::unlinkat(&pdir, name, AtFlags::REMOVEDIR)
                .map_err(io("replace directory"))?;
        }
        let via_work = self.publish_via_work.load(Ordering::Relaxed);
        if !via_work && kind == Kind::File {
            // The codebase is on another file system than the delta: no name of ours may
            // appear in the codebase while the copy is written (another sandbox would read it
            // under a name its rules do not hide, and a crash would leave it for good).
            match stage_unnamed(&pdir, upper, rel, st) {
                Ok(staged) => {
                    let placed = place_staged(&staged, &pdir, name).map_err(io("publish rename"));
                    return placed.map(|()| (conflict, current_origin(&pdir, name)));
                }
                Err(Staging::Unsupported) => {}
                Err(Staging::Failed(e)) => return Err(e),
            }
        }
        let tmp = if via_work {
            self.tmp_name()
        } else {
            stage_name().map_err(|e| FsError::io("random staging name", rel, e))?
        };
        let tdir = if via_work {
            self.work.as_fd()
        } else {
            pdir.as_fd()
        };
        let mut result = (|| -> Result<(), FsError> {
            match kind {
                Kind::File => {
                    let src = host::open_file(upper, rel, OFlags::RDONLY)
                        .map_err(|e| FsError::io("open delta file", rel, e))?;
                    let dst = rustix::fs::openat(
                        tdir,
                        &tmp,
                        OFlags::CREATE
                            | OFlags::EXCL
                            | OFlags::WRONLY
                            | OFlags::NOFOLLOW
                            | OFlags::CLOEXEC,
                        Mode::from_raw_mode(0o600),
                    )
                    .map_err(io("create temp file"))?;
                    copy_contents(Some(src), dst, st)
                        .map_err(|e| FsError::io("publish copy", rel, e))?;
                }
                Kind::Symlink => {
                    let target = host::readlink(upper, rel)
                        .map_err(|e| FsError::io("readlink delta", rel, e))?;
                    rustix::fs::symlinkat(OsStr::from_bytes(&target), tdir, &tmp)
                        .map_err(io("publish symlink"))?;
                }
                _ => {
                    return Err(FsError::NotSupported {
                        op: "publish of a special file",
                        path: rel.into(),
                    });
                }
            }
            Ok(())
        })();
        if result.is_ok() {
            match rustix::fs::renameat(tdir, &tmp, &pdir, name) {
                Ok(()) => {}
                Err(rustix::io::Errno::XDEV) if via_work => {
                    // The codebase is elsewhere: stage in the target directory from now on.
                    let _ = rustix::fs::unlinkat(tdir, &tmp, AtFlags::empty());
                    self.publish_via_work.store(false, Ordering::Relaxed);
                    return self.publish_put(meta, rel, st);
                }
                Err(e) => result = Err(io("publish rename")(e)),
            }
        }
        if let Err(e) = result {
            let _ = rustix::fs::unlinkat(tdir, &tmp, AtFlags::empty());
            return Err(e);
        }
        Ok((conflict, current_origin(&pdir, name)))
    }
}

/// The origin of what `name` in `dir` is now.
fn current_origin(dir: &OwnedFd, name: &OsStr) -> Option<Origin> {
    rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
        .ok()
        .map(|s| Origin::of(&s))
}

/// Prefix of the names publishing gives files in a codebase directory for the instant between
/// linking a finished copy and renaming it over its target (or, without `O_TMPFILE`, while it is
/// written). Followed by 32 random hex digits; the merged view never shows such a codebase
/// entry (see [`is_stage_name`]), so no sandbox can read a file under it.
pub const STAGE_PREFIX: &str = ".agentfense-stage-";

/// A fresh [`STAGE_PREFIX`] name.
fn stage_name() -> io::Result<OsString> {
    let mut b = [0u8; 16];
    let mut filled = 0;
    while filled < b.len() {
        filled += rustix::rand::getrandom(&mut b[filled..], rustix::rand::GetRandomFlags::empty())?;
    }
    Ok(OsString::from(format!(
        "{STAGE_PREFIX}{:032x}",
        u128::from_le_bytes(b)
    )))
}

/// Refuses a new entry named like a staging file: once published it would be in the
/// codebase where no sandbox can see or remove it.
fn refuse_stage_name(rel: &Path) -> Result<(), FsError> {
    if rel.file_name().is_some_and(|n| is_stage_name(n.as_bytes())) {
        return Err(FsError::NotPermitted {
            op: "a name reserved for publishing",
            path: rel.into(),
        });
    }
    Ok(())
}

/// Whether `name` is a staging name of [`stage_name`]'s exact shape.
pub fn is_stage_name(name: &[u8]) -> bool {
    name.strip_prefix(STAGE_PREFIX.as_bytes())
        .is_some_and(|rest| rest.len() == 32 && rest.iter().all(u8::is_ascii_hexdigit))
}

enum Staging {
    /// The file system has no `O_TMPFILE`: stage under a name.
    Unsupported,
    Failed(FsError),
}

/// Copies delta file `rel` into an unnamed file (`O_TMPFILE`) in codebase directory `dir`.
fn stage_unnamed(
    dir: &OwnedFd,
    upper: BorrowedFd<'_>,
    rel: &Path,
    st: &Stat,
) -> Result<OwnedFd, Staging> {
    let dst = match rustix::fs::openat(
        dir,
        ".",
        OFlags::TMPFILE | OFlags::WRONLY | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    ) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::ISDIR | rustix::io::Errno::INVAL) => {
            return Err(Staging::Unsupported);
        }
        Err(e) => {
            return Err(Staging::Failed(FsError::io(
                "create unnamed file",
                rel,
                e.into(),
            )));
        }
    };
    let keep = dst
        .try_clone()
        .map_err(|e| Staging::Failed(FsError::io("dup", rel, e)))?;
    let src = host::open_file(upper, rel, OFlags::RDONLY)
        .map_err(|e| Staging::Failed(FsError::io("open delta file", rel, e)))?;
    copy_contents(Some(src), dst, st)
        .map_err(|e| Staging::Failed(FsError::io("publish copy", rel, e)))?;
    Ok(keep)
}

/// Gives the finished unnamed file `staged` a staging name in `dir` and renames it over `name`
/// at once; the staging name is removed if the rename fails.
fn place_staged(staged: &OwnedFd, dir: &OwnedFd, name: &OsStr) -> rustix::io::Result<()> {
    let tmp = stage_name()
        .map_err(|e| rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::IO))?;
    // linkat(AT_EMPTY_PATH) needs CAP_DAC_READ_SEARCH; the /proc link needs nothing.
    let proc_path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(staged));
    rustix::fs::linkat(
        rustix::fs::CWD,
        proc_path.as_str(),
        dir,
        &tmp,
        AtFlags::SYMLINK_FOLLOW,
    )?;
    rustix::fs::renameat(dir, &tmp, dir, name).inspect_err(|_| {
        let _ = rustix::fs::unlinkat(dir, &tmp, AtFlags::empty());
    })
}

/// Mode bits an agent may set: never set-user-ID, and set-group-ID only on directories
/// (where it only affects group inheritance), so that nothing published to the codebase can
/// become a privileged executable.
fn agent_mode(mode: u32, kind: EntryKind) -> u32 {
    if kind == EntryKind::Dir {
        mode & 0o3777
    } else {
        mode & 0o1777
    }
}

pub(crate) fn error_chain(e: &FsError) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

fn to_timespec(t: SystemTime) -> Timespec {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timespec {
            tv_sec: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: d.subsec_nanos().into(),
        },
        Err(e) => {
            let d = e.duration();
            Timespec {
                tv_sec: -i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                tv_nsec: 0,
            }
        }
    }
}

fn chown_fd(fd: &OwnedFd, uid: u32, gid: u32) {
    let _ = rustix::fs::fchown(
        fd,
        Some(rustix::fs::Uid::from_raw(uid)),
        Some(rustix::fs::Gid::from_raw(gid)),
    );
}

/// Opens `rel` (of kind `kind`) in `root` so that its metadata can be changed.
fn open_any(root: BorrowedFd<'_>, rel: &Path, kind: EntryKind) -> Result<OwnedFd, FsError> {
    let flags = if kind == EntryKind::Dir {
        OFlags::RDONLY | OFlags::DIRECTORY
    } else {
        OFlags::RDONLY
    };
    let res = if kind == EntryKind::Dir {
        host::open_dir_read(root, rel)
    } else {
        host::open_file(root, rel, flags)
    };
    res.map_err(|e| FsError::io("open", rel, e))
}

/// Removes copy-up temporaries ([`Delta::tmp_name`]) left in `work` by a process that died
/// mid-copy (a crashed or killed server): they would hold disk space forever. Those of this
/// process (another `Delta` on the same directory) are left alone.
fn remove_stale_temps(work: &Path) {
    let Ok(entries) = std::fs::read_dir(work) else {
        return;
    };
    let own = format!(".agentfense-{}-", std::process::id());
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(".agentfense-") && name.ends_with(".tmp") && !name.starts_with(&own) {
            match std::fs::remove_file(e.path()) {
                Ok(()) => {
                    tracing::info!(file = %e.path().display(), "removed a stale copy-up temporary")
                }
                Err(err) => {
                    tracing::warn!(file = %e.path().display(), error = %err, "cannot remove a stale copy-up temporary")
                }
            }
        }
    }
}

/// Codebase files at least this large are copied up outside the delta lock
/// ([`Delta::stage_copy_up`]); smaller ones are quicker to copy than to check twice.
const UNLOCKED_COPY_MIN: u64 = 1 << 20;

/// Whether two stats describe the same version of the same file.
fn same_version(a: &Stat, b: &Stat) -> bool {
    (
        a.st_dev,
        a.st_ino,
        a.st_size,
        a.st_mtime,
        a.st_mtime_nsec,
        a.st_ctime,
        a.st_ctime_nsec,
    ) == (
        b.st_dev,
        b.st_ino,
        b.st_size,
        b.st_mtime,
        b.st_mtime_nsec,
        b.st_ctime,
        b.st_ctime_nsec,
    )
}

/// Copies the data of `src` into `dst`, then gives `dst` the mode, owner and times of `st`.
fn copy_contents(src: Option<OwnedFd>, dst: OwnedFd, st: &Stat) -> io::Result<()> {
    let mut dst = File::from(dst);
    if let Some(src) = src {
        io::copy(&mut File::from(src), &mut dst)?;
    }
    rustix::fs::fchmod(&dst, Mode::from_raw_mode(st.st_mode & 0o7777))?;
    // Ownership is best effort: it fails when the daemon is not root, which is fine.
    let _ = rustix::fs::fchown(
        &dst,
        Some(rustix::fs::Uid::from_raw(st.st_uid)),
        Some(rustix::fs::Gid::from_raw(st.st_gid)),
    );
    let times = Timestamps {
        last_access: Timespec {
            tv_sec: st.st_atime,
            tv_nsec: st.st_atime_nsec as _,
        },
        last_modification: Timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec as _,
        },
    };
    rustix::fs::futimens(&dst, &times)?;
    Ok(())
}

/// The directory `rel` is in (`""`, the root, for a top-level name).
fn parent_of(rel: &Path) -> &Path {
    rel.parent().unwrap_or(Path::new(""))
}

#[cfg(test)]
mod tests;

/// Gives a new entry `name` in `pdir` to `owner`, when one is set. Best effort: the entry
/// exists either way, and only what `stat` shows depends on it.
fn chown_new(pdir: &OwnedFd, name: &OsStr, owner: Option<(u32, u32)>) {
    if let Some((u, g)) = owner {
        let _ = rustix::fs::chownat(
            pdir,
            name,
            Some(rustix::fs::Uid::from_raw(u)),
            Some(rustix::fs::Gid::from_raw(g)),
            AtFlags::SYMLINK_NOFOLLOW,
        );
    }
}
