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
    /// A named pipe.
    Fifo,
    /// A unix socket.
    Socket,
    /// A device node.
    Other,
}

impl EntryKind {
    /// A fifo or socket: a rendezvous of processes in this sandbox, never published.
    pub fn is_local_node(self) -> bool {
        matches!(self, EntryKind::Fifo | EntryKind::Socket)
    }
}

impl From<Kind> for EntryKind {
    fn from(k: Kind) -> Self {
        match k {
            Kind::Dir => EntryKind::Dir,
            Kind::File => EntryKind::File,
            Kind::Symlink => EntryKind::Symlink,
            Kind::Fifo => EntryKind::Fifo,
            Kind::Socket => EntryKind::Socket,
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
    /// Symlinks never applied because their target leaves the project ([`link_escapes`]),
    /// with the target; they stay in the sandbox's view.
    pub refused: Vec<(PathBuf, String)>,
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
    /// Which lower directories fold letter case (lower entries resolve only as stored).
    spellings: spelling::Spellings,
    /// Serialises checkpoint creation, deletion, retention and restore.
    checkpoints_lock: Mutex<()>,
    /// Held shared by every change the quota measures around ([`Delta::accounted`]) and
    /// exclusively by removals and renames, whose refunds are what is on disk when they
    /// run: a name removed (or moved away) between a copy-up and the measure after it would
    /// otherwise be refunded without ever having been charged.
    accounting: std::sync::RwLock<()>,
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
        checkpoint::finish_interrupted_restore(delta_dir)?;
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
            spellings: spelling::Spellings::default(),
            checkpoints_lock: Mutex::new(()),
            accounting: std::sync::RwLock::new(()),
        };
        delta
            .usage
            .set_upper(footprint_below(&delta_dir.join("upper")));
        delta.usage.load_published(delta_dir);
        delta.remove_stale_checkpoints();
        delta.measure_checkpoints();
        delta.compact(&mut delta.lock())?;
        remove_stale_temps(&delta_dir.join("work"));
        Ok(delta)
    }

    /// The upper layer's space and quota.
    pub fn usage(&self) -> &DiskUsage {
        &self.usage
    }

    /// (allocated bytes, 1) of `rel` in the upper layer, (0, 0) if it is not there. A file
    /// with other names carries no bytes here: its blocks are charged by inode (as writes
    /// grow it) and stay charged while any name is left, so that linking and unlinking a
    /// second name can neither charge them twice nor give them back early.
    fn footprint(&self, rel: &Path) -> (i64, i64) {
        host::lstat(self.upper.as_fd(), rel).map_or((0, 0), |st| footprint_of(&st))
    }

    /// Runs `f`, charging the change of the upper footprint of `rels` and of the directories
    /// `dirs` to the quota (each path once). Changes that add or remove a name name its
    /// directory too: a directory grows with its entries (and ext4's never shrinks), and what
    /// `rmdir` gives back must have been charged. A directory in `dirs` that `f` made was
    /// charged as it was made ([`Delta::upper_dir`]), so only one that was there before is
    /// measured again.
    fn accounted<T>(
        &self,
        rels: &[&Path],
        dirs: &[&Path],
        f: impl FnOnce() -> Result<T, FsError>,
    ) -> Result<T, FsError> {
        let _measuring = self.accounting.read().unwrap_or_else(|p| p.into_inner());
        self.measured(rels, dirs, f)
    }

    /// Runs `f` with no change the quota measures around in flight (see `accounting`).
    fn removing<T>(&self, f: impl FnOnce() -> T) -> T {
        let _alone = self.accounting.write().unwrap_or_else(|p| p.into_inner());
        f()
    }

    /// [`Delta::accounted`] without taking `accounting` (the caller holds it).
    fn measured<T>(
        &self,
        rels: &[&Path],
        dirs: &[&Path],
        f: impl FnOnce() -> Result<T, FsError>,
    ) -> Result<T, FsError> {
        let mut paths: Vec<(&Path, bool)> = Vec::with_capacity(rels.len() + dirs.len());
        for (list, is_dir) in [(rels, false), (dirs, true)] {
            for r in list {
                if !paths.iter().any(|(p, _)| p == r) {
                    paths.push((r, is_dir));
                }
            }
        }
        let before: Vec<(i64, i64)> = paths.iter().map(|(r, _)| self.footprint(r)).collect();
        let r = f();
        let (mut bytes, mut entries) = (0, 0);
        for ((rel, is_dir), was) in paths.iter().zip(before) {
            if *is_dir && was == (0, 0) {
                continue;
            }
            let now = self.footprint(rel);
            bytes += now.0 - was.0;
            entries += now.1 - was.1;
        }
        self.usage.charge(bytes, entries);
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

    /// A handle on directory `rel` of the codebase itself (the lower layer), for reading
    /// files the caller knows are the codebase's.
    pub(crate) fn lower_dir(&self, rel: &Path) -> io::Result<OwnedFd> {
        check_rel(rel).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        host::open_dir(self.lower.as_fd(), rel)
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
            Ok(st) => {
                // The rules judged the name as typed; a case-folding directory must not hand
                // out an entry stored under another spelling.
                let exact = self
                    .spellings
                    .stored_as_typed(self.lower.as_fd(), rel, &st)
                    .map_err(|e| FsError::io("check spelling", rel, e))?;
                Ok(exact.then(|| Attr::from_stat(Layer::Lower, &st)))
            }
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
        self.merged(meta, rel, host::list, |_, k| k.into())
    }

    /// The merged entries of directory `rel`, sorted by name: each layer's listing by `list`,
    /// its entries turned into `T` by `entry`; the upper layer's win, whiteouts and
    /// publishing's staging names are left out, and the lower layer only counts where it
    /// shows through.
    fn merged<E, T>(
        &self,
        meta: &Meta,
        rel: &Path,
        list: impl Fn(BorrowedFd<'_>, &Path) -> io::Result<Vec<(Vec<u8>, E)>>,
        entry: impl Fn(Layer, E) -> T,
    ) -> Result<Vec<(OsString, T)>, FsError> {
        let mut out: BTreeMap<Vec<u8>, T> = BTreeMap::new();
        match list(self.upper.as_fd(), rel) {
            Ok(v) => out.extend(v.into_iter().map(|(n, e)| (n, entry(Layer::Upper, e)))),
            Err(e) if errno(&e) == libc::ENOENT => {}
            Err(e) if is_absent(&e) => return Err(FsError::NotDir { path: rel.into() }),
            Err(e) => return Err(FsError::io("list upper", rel, e)),
        }
        if meta.lower_visible(rel) && !meta.opaque.contains(rel) {
            match list(self.lower.as_fd(), rel) {
                Ok(v) => {
                    for (n, e) in v {
                        if out.contains_key(&n)
                            || is_stage_name(&n)
                            || meta.whiteouts.contains(&rel.join(OsStr::from_bytes(&n)))
                        {
                            continue;
                        }
                        out.insert(n, entry(Layer::Lower, e));
                    }
                }
                Err(e) if is_absent(&e) => {}
                Err(e) => return Err(FsError::io("list lower", rel, e)),
            }
        }
        Ok(out
            .into_iter()
            .map(|(n, t)| (OsString::from_vec(n), t))
            .collect())
    }

    /// [`Delta::list`] with each entry's attributes, as [`Delta::lookup`] would give them,
    /// read relative to the open directory (one host call per entry instead of a walk of
    /// its whole path in each layer).
    pub fn list_attrs(&self, rel: &Path) -> Result<Vec<(OsString, Attr)>, FsError> {
        check_rel(rel)?;
        let meta = self.lock();
        self.merged(&meta, rel, host::list_stat, |layer, st| {
            Attr::from_stat(layer, &st)
        })
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

    /// Opens regular file `rel` of this sandbox's layer read-write as it is (no copy-up, no
    /// bookkeeping): for keeping a file the caller knows is there open across its removal.
    pub(crate) fn open_upper(&self, rel: &Path) -> io::Result<File> {
        check_rel(rel).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        host::open_file(self.upper.as_fd(), rel, OFlags::RDWR).map(File::from)
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
    /// them the modes of their lower counterparts, and charges each one made to the quota
    /// (removing it gives as much back).
    fn upper_dir(&self, rel: &Path) -> Result<OwnedFd, FsError> {
        let lower = self.lower.as_fd();
        host::mkdir_all(
            self.upper.as_fd(),
            rel,
            |prefix| host::lstat(lower, prefix).map_or(0o755, |st| st.st_mode & 0o7777),
            |dir| {
                let (bytes, entries) =
                    rustix::fs::fstat(dir).map_or((0, 1), |st| footprint_of(&st));
                self.usage.charge(bytes, entries);
            },
        )
        .map_err(|e| FsError::io("create upper directory", rel, e))
    }

    fn tmp_name(&self) -> OsString {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        OsString::from(format!(".agentfense-{}-{n}.tmp", std::process::id()))
    }
}

mod checkpoint;
mod files;
mod journal;
mod ops;
mod publish;
mod review;
mod spelling;
mod xattr;

pub use checkpoint::{CheckpointInfo, valid_checkpoint_id};
pub use review::{
    ApplyConflict, ApplyRefusal, ChangeSet, ChangeStatus, DIFF_FILE_MAX, PathChange, Reveal,
    Selection, View, compare, diff, diff_of, hex_digest, parse_digest, parse_expectation,
};
pub use xattr::{USER_XATTR_PREFIX, XattrWrite};

pub(crate) use files::error_chain;
use files::*;
pub use files::{STAGE_PREFIX, is_stage_name, link_escapes};
use journal::*;
#[cfg(test)]
mod review_tests;
#[cfg(test)]
mod tests;
