//! The FUSE adapter: a thin shell over [`Delta`] that enforces the rules.
//!
//! Every `fuser::Filesystem` method calls an inner `fn ... -> Result<T, FsError>` and makes
//! one reply call; [`FsError::errno`] is the only errno table. Enforcement, per operation, with
//! P the level of the target path (issue 3):
//!
//! | operation | none | view | read | write |
//! |---|---|---|---|---|
//! | lookup / stat | ENOENT | ok | ok | ok |
//! | open for reading, readlink | ENOENT | EACCES | ok | ok |
//! | open for writing, O_TRUNC, truncate, chmod, utimes, xattr set | ENOENT | EACCES | EACCES | ok |
//! | create / mkdir / symlink / mknod at a new path | EACCES | EACCES | EACCES | ok |
//! | unlink / rmdir | ENOENT | EACCES | EACCES | ok |
//! | rename | source and target both need write; a hidden target answers EACCES | | | |
//! | access(2) | ENOENT | R_OK: EACCES (files) | W_OK: EACCES | ok |
//!
//! Every denial is reported to the audit channel. Mode bits follow the rules too: no write
//! bits below `write`, no bits at all on `view` files.
//!
//! A create at a path that exists but is hidden answers EACCES, exactly like a create at a
//! missing path where writing is denied, and touches nothing. Directory renames move only
//! what lives in the delta and only when every moved path is writable at both ends;
//! otherwise EXDEV, so `mv` falls back to copy + delete, which is checked file by file.
//! Hard links are refused (EPERM). xattrs read as absent and cannot be set (EOPNOTSUPP).
//! `statfs` reports no used space and directories report a fixed size and link count, so
//! neither `df` nor `stat` on a directory reveals how much is hidden. Inode numbers are
//! handed out only for visible entries, so their sequence reveals nothing either.
//!
//! ## Zero-message opens
//! `open` and `opendir` answer ENOSYS, which tells the kernel (FUSE "no open" mode, Linux >=
//! 4.19 / 5.1) never to send them again: opening a file or directory costs no round trip, file
//! pages stay in the kernel's page cache across opens, listings stay in its directory cache,
//! and closing sends nothing. On a warm cache `grep -r`, `find` and `git status` therefore run
//! without reaching the daemon. The rules are enforced where data moves instead: every READ
//! needs `read`, every WRITE and truncation needs `write`, and each denial is audited. The
//! visible difference: opening a `view` file (or a `read` file for appending) succeeds, and the
//! first read (or write) fails with EACCES; opens with `O_TRUNC` still fail at open, since the
//! kernel truncates through SETATTR first. Without open requests the daemon serves I/O by inode
//! from a small cache of host files ([`IoCache`]); a file unlinked or replaced while the kernel
//! still knows its inode keeps its host file there until the kernel forgets it. Files made with
//! `create` keep a real handle (the kernel always sends CREATE). Cached pages are dropped when
//! the rules change or another sandbox publishes the file.
//!
//! ## Passthrough mode
//! [`IoMode::Passthrough`] trades the zero-message opens for native streaming speed. The
//! kernel sends one OPEN per open(2) and the rules decide there, exactly as in the table
//! (`read` to open for reading, `write` to open for writing; audited as `open-read` and
//! `open-write`). A file this sandbox may only read is then handed to the kernel as a
//! passthrough file: its reads (and mmap) go straight to the host file and its page cache,
//! never to the daemon nor to this mount's page cache. That matters for large files: this
//! mount's page cache holds single pages (FUSE has no large folios in Linux 6.18), which
//! makes warm sequential reads ~1.5x slower than from ext4's large folios. Writable files are
//! served by the daemon as in no-open mode. The kernel needs every open of an inode with a
//! passthrough file to share that file ([`PtState`]): a reader opening a codebase file that
//! another sandbox replaced meanwhile gets the version the open readers have, until they all
//! close; a write open of such a file (possible only after a rule change) fails with ETXTBSY.

use std::collections::{HashMap, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, Weak};
use std::time::{Duration, SystemTime};

use agentfense_core::{Basis, Cursor, Decision, Level, NodeKind, Policy};
use fuser::{
    AccessFlags, BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use tracing::{debug, warn};

use crate::audit::{Auditor, display_path};
use crate::delta::{Attr, Delta, EntryKind, Layer};
use crate::error::FsError;
use crate::mount::IoMode;
use crate::quota::allocated;
use shown::{MergedView, ShownDirs, Vanished};

/// Options of the adapter (a subset of `FsConfig`).
#[derive(Clone, Debug)]
pub(crate) struct FsOptions {
    pub(crate) entry_ttl: Duration,
    pub(crate) attr_ttl: Duration,
    pub(crate) owner: Option<(u32, u32)>,
    pub(crate) io_mode: IoMode,
    /// Most handles (host files) the daemon keeps open for this sandbox.
    pub(crate) max_open_files: usize,
}

/// One known path.
#[derive(Debug)]
pub(crate) struct Node {
    /// Delta-relative path; `None` once the entry was deleted or replaced.
    pub(crate) path: Option<PathBuf>,
    /// The path a detached node had: I/O on a file still open after an unlink or a
    /// replacement is checked against the rules of the path it had.
    pub(crate) former: Option<PathBuf>,
    pub(crate) lookups: u64,
}

/// Inode table: our inode numbers are stable per path for the mount's lifetime.
#[derive(Debug, Default)]
pub(crate) struct Nodes {
    pub(crate) by_ino: HashMap<u64, Node>,
    pub(crate) by_path: HashMap<PathBuf, u64>,
    next: u64,
}

impl Nodes {
    fn new() -> Nodes {
        let mut n = Nodes {
            next: 2,
            ..Nodes::default()
        };
        n.by_ino.insert(
            1,
            Node {
                path: Some(PathBuf::new()),
                former: None,
                lookups: 1,
            },
        );
        n.by_path.insert(PathBuf::new(), 1);
        n
    }

    fn get_or_insert(&mut self, path: &Path) -> u64 {
        if let Some(&ino) = self.by_path.get(path) {
            return ino;
        }
        let ino = self.next;
        self.next += 1;
        self.by_ino.insert(
            ino,
            Node {
                path: Some(path.to_path_buf()),
                former: None,
                lookups: 0,
            },
        );
        self.by_path.insert(path.to_path_buf(), ino);
        ino
    }

    /// Forgets the path of the node at `path` (deleted, replaced, or renumbered): it keeps
    /// serving open handles, and the next lookup of `path` gets a new inode.
    pub(crate) fn detach(&mut self, path: &Path) {
        if let Some(ino) = self.by_path.remove(path)
            && let Some(n) = self.by_ino.get_mut(&ino)
        {
            n.former = n.path.take();
        }
    }

    fn moved(&mut self, from: &Path, to: &Path) {
        self.detach(to);
        let moved: Vec<(PathBuf, u64)> = self
            .by_path
            .iter()
            .filter(|(p, _)| p.starts_with(from))
            .map(|(p, i)| (p.clone(), *i))
            .collect();
        for (p, ino) in moved {
            self.by_path.remove(&p);
            // Anything already at a destination path below `to` is gone now.
            let Ok(suffix) = p.strip_prefix(from) else {
                continue;
            };
            let np = if suffix.as_os_str().is_empty() {
                to.to_path_buf()
            } else {
                to.join(suffix)
            };
            self.detach(&np);
            self.by_path.insert(np.clone(), ino);
            if let Some(n) = self.by_ino.get_mut(&ino) {
                n.path = Some(np);
            }
        }
    }
}

/// An open file the kernel holds a handle of: one made by CREATE (the only open the kernel
/// sends in no-open mode), or an OPEN in [`IoMode::Passthrough`].
struct Handle {
    ino: u64,
    /// The host file behind it: I/O goes through it for files made by CREATE; for the others
    /// it answers `fstat` after an unlink.
    file: Arc<File>,
    write: bool,
    kind: HandleKind,
}

enum HandleKind {
    /// Made by CREATE: direct I/O through the handle's file.
    Created,
    /// An OPEN served by the daemon by inode ([`IoCache`]), through the page cache.
    Cached,
    /// An OPEN handed to the kernel as a passthrough file: reads never reach the daemon.
    /// Keeps the backing registered while the handle lives.
    Passthrough(Arc<BackingId>),
}

/// Per-inode I/O state in [`IoMode::Passthrough`]. The kernel (fs/fuse/iomode.c) requires
/// that while an inode has a passthrough file, *every* open of it is passthrough with that same
/// backing (anything else fails the open), and it refuses passthrough while page-cached opens
/// of the inode exist. Hence passthrough only for files this sandbox may only read: they are
/// never copied up under an open reader, so their host file stays the same.
#[derive(Default)]
struct PtState {
    /// The live backing (gone once every passthrough handle of the inode is released).
    backing: Option<Weak<BackingId>>,
    cached_opens: usize,
}

/// A host file serving I/O on an inode opened without a FUSE open.
struct IoFile {
    file: Arc<File>,
    write: bool,
    /// Detached (unlinked or replaced) while the kernel still knows the inode: kept until
    /// FORGET and never evicted, since its path no longer leads to it.
    pinned: bool,
    /// A detached delta file whose space is charged to the disk quota until FORGET (the
    /// removal that detached it discharged it, but the data stays on disk while held).
    charged: bool,
}

/// Host files by inode, for READ and WRITE requests that carry no handle. Unpinned entries
/// are evicted oldest first beyond [`IO_CACHE_MAX`]: a file needs one only while its pages
/// are not yet in the kernel's page cache, so a small cache serves any working set.
#[derive(Default)]
pub(crate) struct IoCache {
    files: HashMap<u64, IoFile>,
    order: VecDeque<u64>,
    /// Bumped whenever entries are dropped, so that a file opened concurrently with a drop
    /// (an outside change) is not cached afterwards.
    epoch: u64,
}

/// Unpinned host files kept open per mount.
const IO_CACHE_MAX: usize = 64;

impl IoCache {
    /// The host file cached for `ino`, if it serves `write`s when asked to.
    fn get(&self, ino: u64, write: bool) -> Option<Arc<File>> {
        self.held(ino).filter(|(_, w)| *w || !write).map(|(f, _)| f)
    }

    fn insert(&mut self, ino: u64, file: Arc<File>, write: bool) {
        if let Some(f) = self.files.get_mut(&ino) {
            f.file = file;
            f.write = write;
            return;
        }
        self.files.insert(
            ino,
            IoFile {
                file,
                write,
                pinned: false,
                charged: false,
            },
        );
        self.order.push_back(ino);
        while self.order.len() > IO_CACHE_MAX {
            if let Some(old) = self.order.pop_front() {
                self.files.remove(&old);
            }
        }
    }

    /// Keeps `ino`'s host file (the cached one, else `open()`'s) until FORGET.
    fn pin(&mut self, ino: u64, open: impl FnOnce() -> Option<(File, bool)>) {
        if let Some(f) = self.files.get_mut(&ino) {
            f.pinned = true;
        } else if let Some((file, write)) = open() {
            self.files.insert(
                ino,
                IoFile {
                    file: Arc::new(file),
                    write,
                    pinned: true,
                    charged: false,
                },
            );
        }
        self.order.retain(|&i| i != ino);
    }

    /// Drops the unpinned entry of `ino` (its path now leads to another host file).
    pub(crate) fn invalidate(&mut self, ino: u64) {
        self.epoch += 1;
        if self.files.get(&ino).is_some_and(|f| !f.pinned) {
            self.files.remove(&ino);
            self.order.retain(|&i| i != ino);
        }
    }

    fn forget(&mut self, ino: u64) -> Option<IoFile> {
        let f = self.files.remove(&ino)?;
        self.order.retain(|&i| i != ino);
        Some(f)
    }

    /// Whether `ino` is a detached delta file charged to the quota.
    fn is_charged(&self, ino: u64) -> bool {
        self.files.get(&ino).is_some_and(|f| f.charged)
    }

    /// The pinned file of `ino`, marked as charged to the quota, unless it already was. The
    /// caller knows it is a delta file (whether the cached descriptor is writable or not: a
    /// file read before its removal is held through a read-only one).
    fn charge_detached(&mut self, ino: u64) -> Option<Arc<File>> {
        let f = self.files.get_mut(&ino)?;
        if !f.pinned || f.charged {
            return None;
        }
        f.charged = true;
        Some(f.file.clone())
    }

    /// Whether `ino`'s host file is kept until FORGET.
    fn is_pinned(&self, ino: u64) -> bool {
        self.files.get(&ino).is_some_and(|f| f.pinned)
    }

    /// The host file cached for `ino` and whether it is writable.
    fn held(&self, ino: u64) -> Option<(Arc<File>, bool)> {
        self.files.get(&ino).map(|f| (f.file.clone(), f.write))
    }

    pub(crate) fn len(&self) -> usize {
        self.files.len()
    }
}

/// State shared between the FUSE threads and the [`crate::MountHandle`].
pub(crate) struct Shared {
    pub(crate) delta: Delta,
    pub(crate) audit: Auditor,
    pub(crate) policy: RwLock<(Arc<Policy>, u64)>,
    pub(crate) nodes: Mutex<Nodes>,
    handles: Mutex<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
    pub(crate) io: Mutex<IoCache>,
    /// Held (shared) around every write into a cached host file and (exclusive) by publish,
    /// which may drop the delta copy such a file is: a write never lands in a dropped copy.
    pub(crate) write_gate: RwLock<()>,
    pub(crate) passthrough_opens: AtomicU64,
    pub(crate) daemon_opens: AtomicU64,
    /// What files hold, for content-conditioned rules (see [`content`]).
    pub(crate) contents: Mutex<content::ContentVerdicts>,
    /// Verdicts on directories shown only for traversal (see [`shown`]).
    pub(crate) shown: Mutex<ShownDirs>,
    /// Where to send the names of directories that vanished, for the kernel to forget (set
    /// by the mount once its session exists).
    pub(crate) vanished: OnceLock<Vanished>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    pub(crate) fn new(delta: Delta, audit: Auditor, policy: Policy) -> Shared {
        Shared {
            delta,
            audit,
            policy: RwLock::new((Arc::new(policy), 0)),
            nodes: Mutex::new(Nodes::new()),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            io: Mutex::new(IoCache::default()),
            write_gate: RwLock::new(()),
            passthrough_opens: AtomicU64::new(0),
            daemon_opens: AtomicU64::new(0),
            contents: Mutex::new(content::ContentVerdicts::default()),
            shown: Mutex::new(ShownDirs::default()),
            vanished: OnceLock::new(),
        }
    }

    pub(crate) fn policy(&self) -> (Arc<Policy>, u64) {
        let g = self.policy.read().unwrap_or_else(|p| p.into_inner());
        (g.0.clone(), g.1)
    }

    pub(crate) fn set_policy(&self, policy: Policy) {
        let mut g = self.policy.write().unwrap_or_else(|p| p.into_inner());
        g.0 = Arc::new(policy);
        g.1 += 1;
        lock(&self.shown).clear();
    }

    /// Whether `rel` has a CREATE or passthrough handle open. A published file that is still
    /// open that way keeps its delta copy (and stays pending): its writer goes on writing into
    /// that copy, and a passthrough reader's host file stays the one later opens share.
    /// (Files served by inode are re-resolved after a publish, see [`IoCache`].)
    pub(crate) fn busy(&self, rel: &Path) -> bool {
        let handles = lock(&self.handles);
        let nodes = lock(&self.nodes);
        handles.values().any(|h| {
            !matches!(h.kind, HandleKind::Cached)
                && nodes
                    .by_ino
                    .get(&h.ino)
                    .and_then(|n| n.path.as_deref())
                    .is_some_and(|p| p == rel)
        })
    }

    /// Keeps the cached host files of `paths` (deleted from outside) until FORGET.
    pub(crate) fn pin_io(&self, paths: &[PathBuf]) {
        self.each_io(paths, |io, ino| io.pin(ino, || None));
    }

    /// Forgets the cached host files of `paths` (published, or changed from outside).
    pub(crate) fn invalidate_io(&self, paths: &[PathBuf]) {
        self.each_io(paths, IoCache::invalidate);
    }

    /// Calls `f` with the I/O cache for the inode of each of `paths` that has one.
    fn each_io(&self, paths: &[PathBuf], mut f: impl FnMut(&mut IoCache, u64)) {
        let nodes = lock(&self.nodes);
        let mut io = lock(&self.io);
        for ino in paths.iter().filter_map(|p| nodes.by_path.get(p)) {
            f(&mut io, *ino);
        }
    }
}

/// The filesystem.
pub(crate) struct PolicyFs {
    shared: Arc<Shared>,
    opts: FsOptions,
    /// Cursor per inode, valid for policy generation `.0`.
    cursors: Mutex<(u64, HashMap<u64, Cursor>)>,
    /// Listings being read (READDIR at offset 0 builds one, the empty end of it drops it).
    listings: Mutex<HashMap<u64, Arc<Listing>>>,
    /// [`IoMode::Passthrough`]: per-inode open state, and whether the kernel took passthrough.
    pt: Mutex<HashMap<u64, PtState>>,
    passthrough: AtomicBool,
}

/// The visible entries of a directory, `.` and `..` first.
type Listing = Vec<(u64, FileType, OsString)>;

fn kind_of(k: EntryKind) -> NodeKind {
    if k == EntryKind::Dir {
        NodeKind::Dir
    } else {
        NodeKind::File
    }
}

fn file_type(k: EntryKind) -> FileType {
    match k {
        EntryKind::Dir => FileType::Directory,
        EntryKind::File => FileType::RegularFile,
        EntryKind::Symlink => FileType::Symlink,
        EntryKind::Other => FileType::NamedPipe,
    }
}

fn check_name(name: &OsStr) -> Result<(), FsError> {
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') || b.contains(&0) {
        return Err(FsError::InvalidName {
            name: name.to_string_lossy().into_owned(),
        });
    }
    Ok(())
}

impl PolicyFs {
    pub(crate) fn new(shared: Arc<Shared>, opts: FsOptions) -> Self {
        PolicyFs {
            shared,
            opts,
            cursors: Mutex::new((0, HashMap::new())),
            listings: Mutex::new(HashMap::new()),
            pt: Mutex::new(HashMap::new()),
            passthrough: AtomicBool::new(false),
        }
    }

    fn path_of(&self, ino: u64) -> Result<PathBuf, FsError> {
        let nodes = lock(&self.shared.nodes);
        match nodes.by_ino.get(&ino) {
            Some(Node { path: Some(p), .. }) => Ok(p.clone()),
            Some(_) => Err(FsError::NotFound {
                path: PathBuf::from("(deleted)"),
            }),
            None => Err(FsError::Stale { id: ino }),
        }
    }

    /// The cursor of the path of `ino` under `policy` (generation `gen`).
    fn cursor(&self, policy: &Policy, gen_: u64, path: &Path) -> Cursor {
        let mut cache = lock(&self.cursors);
        if cache.0 != gen_ {
            cache.0 = gen_;
            cache.1.clear();
        }
        let nodes = lock(&self.shared.nodes);
        let ino_of = |p: &Path| nodes.by_path.get(p).copied();
        // Walk up to the nearest cached ancestor, then step down.
        let mut chain: Vec<&Path> = Vec::new();
        let mut start: Option<Cursor> = None;
        for anc in path.ancestors() {
            if let Some(c) = ino_of(anc).and_then(|i| cache.1.get(&i)) {
                start = Some(c.clone());
                break;
            }
            if anc.as_os_str().is_empty() {
                break;
            }
            chain.push(anc);
        }
        let mut cur = match start {
            Some(c) => c,
            None => {
                let c = policy.cursor_root();
                cache.1.insert(1, c.clone());
                c
            }
        };
        for p in chain.into_iter().rev() {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default();
            cur = policy.cursor_child(&cur, &name);
            if let Some(i) = ino_of(p) {
                cache.1.insert(i, cur.clone());
            }
        }
        cur
    }

    /// The decision for `path` as an object of kind `kind`.
    fn decision(&self, path: &Path, kind: EntryKind) -> Decision {
        let (policy, gen_) = self.shared.policy();
        let c = self.cursor(&policy, gen_, path);
        self.decide(&policy, &c, path, kind)
    }

    /// The decision for `path` (cursor `c`) in this mount's merged view: a directory shown
    /// only for traversal must hold something visible (see [`shown`]), and a content
    /// condition is judged on the file (see [`content`]).
    fn decide(&self, policy: &Policy, c: &Cursor, path: &Path, kind: EntryKind) -> Decision {
        let d = policy.decide(c, kind_of(kind));
        let from_tree = match d.basis {
            Basis::Traversal { .. } => true,
            Basis::Rule(r) => policy.rule(r).content.is_some(),
            _ => false,
        };
        if !from_tree {
            return d;
        }
        let view = MergedView {
            shared: &self.shared,
            generation: lock(&self.shared.shown).generation(),
            ttl: self.opts.entry_ttl,
        };
        policy.decide_in(&view, &path.to_path_buf(), c, kind_of(kind))
    }

    /// After `path` left this mount's view (unlink, rmdir, the source of a rename): forgets
    /// the verdicts it changed, and has the kernel forget the ancestors that vanished with it.
    fn removed(&self, path: &Path, dir: bool) {
        let had = lock(&self.shared.shown).forget(path, dir);
        for (anc, was_shown) in had {
            if !was_shown || self.decision(&anc, EntryKind::Dir).level != Level::None {
                continue;
            }
            let parent = anc.parent().unwrap_or(Path::new(""));
            let ino = lock(&self.shared.nodes).by_path.get(parent).copied();
            if let (Some(ino), Some(name), Some(tx)) =
                (ino, anc.file_name(), self.shared.vanished.get())
            {
                let _ = tx.send((ino, name.to_os_string()));
            }
        }
    }

    /// Reports a denial and returns its error: ENOENT for a hidden path, else EACCES.
    fn deny(&self, op: &'static str, path: &Path, d: Decision) -> FsError {
        self.deny_at(op, path, d, false)
    }

    /// [`Self::deny`] for a path about to be created (create, mkdir, symlink, link, rename
    /// target): a hidden entry there must look like a missing one in a place where writing
    /// is denied, so always EACCES, never ENOENT.
    fn deny_new(&self, op: &'static str, path: &Path, d: Decision) -> FsError {
        self.deny_at(op, path, d, true)
    }

    fn deny_at(&self, op: &'static str, path: &Path, d: Decision, new_path: bool) -> FsError {
        let shown = display_path(path);
        self.shared.audit.denied(op, &shown, d.level, || {
            d.rule().map(|r| {
                let (policy, _) = self.shared.policy();
                (r, policy.describe(r))
            })
        });
        debug!(op, path = %shown, level = %d.level, "denied");
        if d.level == Level::None && !new_path {
            FsError::NotFound { path: path.into() }
        } else {
            FsError::Denied {
                op,
                path: path.into(),
                level: d.level,
            }
        }
    }

    /// Looks up `path` and requires it visible; returns its attributes and decision.
    fn visible(&self, op: &'static str, path: &Path) -> Result<(Attr, Decision), FsError> {
        let attr = self
            .shared
            .delta
            .lookup(path)?
            .ok_or_else(|| FsError::NotFound { path: path.into() })?;
        let d = self.decision(path, attr.kind);
        if d.level == Level::None {
            return Err(self.deny(op, path, d));
        }
        Ok((attr, d))
    }

    fn require(
        &self,
        op: &'static str,
        path: &Path,
        d: Decision,
        need: Level,
    ) -> Result<(), FsError> {
        if d.level < need {
            return Err(self.deny(op, path, d));
        }
        Ok(())
    }

    /// For a new entry: the parent must be a visible directory and the new path writable.
    /// An existing hidden entry is reported exactly like a missing one in a denied place.
    fn check_new(
        &self,
        op: &'static str,
        parent: u64,
        name: &OsStr,
        kind: EntryKind,
    ) -> Result<PathBuf, FsError> {
        check_name(name)?;
        let ppath = self.path_of(parent)?;
        self.visible(op, &ppath)?;
        let path = ppath.join(name);
        match self.shared.delta.lookup(&path)? {
            Some(a) => {
                let d = self.decision(&path, a.kind);
                if d.level == Level::None {
                    return Err(self.deny_new(op, &path, d));
                }
                Err(FsError::Exists { path })
            }
            None => {
                let d = self.decision(&path, kind);
                if d.level < Level::Write {
                    return Err(self.deny_new(op, &path, d));
                }
                Ok(path)
            }
        }
    }

    fn file_attr(&self, ino: u64, a: &Attr, level: Level) -> FileAttr {
        let mut perm = a.perm;
        if level < Level::Write {
            perm &= !0o222;
        }
        if level == Level::View && a.kind != EntryKind::Dir {
            perm &= !0o555;
        }
        let (uid, gid) = self.opts.owner.unwrap_or((a.uid, a.gid));
        let (size, blocks, nlink) = if a.kind == EntryKind::Dir {
            // nlink 1 means "unknown" to tools that count subdirectories from it (find's leaf
            // optimisation); the real count would include hidden subdirectories.
            (4096, 8, 1)
        } else {
            (a.size, a.blocks, 1)
        };
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks,
            atime: a.atime,
            mtime: a.mtime,
            ctime: a.ctime,
            crtime: a.ctime,
            kind: file_type(a.kind),
            perm: u16::try_from(perm & 0o7777).unwrap_or(0),
            nlink,
            uid,
            gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn entry(&self, path: &Path, count_lookup: bool) -> Result<FileAttr, FsError> {
        let (attr, d) = self.visible("lookup", path)?;
        let ino = {
            let mut nodes = lock(&self.shared.nodes);
            let ino = nodes.get_or_insert(path);
            if count_lookup && let Some(n) = nodes.by_ino.get_mut(&ino) {
                n.lookups += 1;
            }
            ino
        };
        Ok(self.file_attr(ino, &attr, d.level))
    }

    fn do_lookup(&self, parent: u64, name: &OsStr) -> Result<FileAttr, FsError> {
        check_name(name).map_err(|_| FsError::NotFound { path: name.into() })?;
        let ppath = self.path_of(parent)?;
        self.visible("lookup", &ppath)?;
        self.entry(&ppath.join(name), true)
    }

    fn do_getattr(&self, ino: u64, fh: Option<FileHandle>) -> Result<FileAttr, FsError> {
        match self.path_of(ino) {
            Ok(path) => self.entry(&path, false),
            Err(e) => {
                // A deleted file still open: answer from its handle or its pinned host file.
                let held = match fh.filter(|fh| fh.0 != 0) {
                    Some(fh) => lock(&self.shared.handles)
                        .get(&fh.0)
                        .map(|h| (h.file.clone(), h.write)),
                    None => lock(&self.shared.io).held(ino),
                };
                let Some((file, write)) = held else {
                    return Err(e);
                };
                let st = rustix::fs::fstat(&*file)
                    .map_err(|e| FsError::io("fstat", "(open file)", e.into()))?;
                let a = crate::delta::attr_of_stat(&st);
                let level = if write { Level::Write } else { Level::Read };
                Ok(self.file_attr(ino, &a, level))
            }
        }
    }

    /// Refuses a new handle (EMFILE inside this sandbox only) once the sandbox holds
    /// `max_open_files` host files through the daemon: the daemon shares its process's
    /// descriptor table with every other sandbox and the API.
    fn check_open_files(&self) -> Result<(), FsError> {
        let limit = self.opts.max_open_files;
        // One lock at a time (no lock order to keep).
        let handles = lock(&self.shared.handles).len();
        let held = handles + lock(&self.shared.io).len();
        if held >= limit {
            self.shared.audit.limit_exceeded(
                "open_files",
                format!("{held} host files held for this sandbox; limit {limit}"),
            );
            return Err(FsError::TooManyOpenFiles { limit });
        }
        Ok(())
    }

    fn add_handle(&self, h: Handle) -> u64 {
        let fh = self.shared.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.shared.handles).insert(fh, h);
        fh
    }

    /// The path that decides I/O on `ino`, and whether the node still has it (a detached
    /// node answers with the path it had).
    fn io_path(&self, ino: u64) -> Result<(PathBuf, bool), FsError> {
        let nodes = lock(&self.shared.nodes);
        match nodes.by_ino.get(&ino) {
            Some(Node { path: Some(p), .. }) => Ok((p.clone(), true)),
            Some(Node {
                former: Some(p), ..
            }) => Ok((p.clone(), false)),
            _ => Err(FsError::Stale { id: ino }),
        }
    }

    /// The host file for I/O on `ino` without a handle: the rules are checked on every call
    /// (`read` to read, `write` to write), then the cached host file is used or opened (for
    /// writing: copied up first).
    fn io_file(&self, ino: u64, write: bool) -> Result<Arc<File>, FsError> {
        let (path, live) = self.io_allowed(ino, write)?;
        let epoch = {
            let io = lock(&self.shared.io);
            if let Some(f) = io.get(ino, write) {
                return Ok(f);
            }
            io.epoch
        };
        if !live {
            return Err(FsError::Vanished { path });
        }
        let file = Arc::new(if write {
            self.shared.delta.open_write(&path, false)?
        } else {
            self.shared.delta.open_read(&path)?.0
        });
        let mut io = lock(&self.shared.io);
        if io.epoch == epoch {
            io.insert(ino, file.clone(), write);
        }
        Ok(file)
    }

    /// Checks that the rules let `ino` be written (`write`) or read, and returns the path that
    /// decided it and whether the node still has that path.
    fn io_allowed(&self, ino: u64, write: bool) -> Result<(PathBuf, bool), FsError> {
        let (path, live) = self.io_path(ino)?;
        let d = self.decision(&path, EntryKind::File);
        let (op, need) = if write {
            ("write", Level::Write)
        } else {
            ("read", Level::Read)
        };
        self.require(op, &path, d, need)?;
        Ok((path, live))
    }

    /// Keeps the host file of the file at `path` for I/O after it is unlinked or replaced,
    /// when the kernel knows its inode (a process may hold it open).
    /// Fails (EMFILE, nothing removed) when pinning a new host file would exceed the
    /// sandbox's open-files cap: a pinned file holds a descriptor like an open handle.
    /// Returns the inode pinned and whether it is a delta file, for [`Self::charge_detached`]
    /// once the removal is done.
    fn pin_before_removal(&self, path: &Path, attr: &Attr) -> Result<Option<(u64, bool)>, FsError> {
        if attr.kind != EntryKind::File {
            return Ok(None);
        }
        let ino = {
            let nodes = lock(&self.shared.nodes);
            match nodes.by_path.get(path) {
                Some(&ino) if nodes.by_ino.get(&ino).is_some_and(|n| n.lookups > 0) => ino,
                _ => return Ok(None),
            }
        };
        // Every new pin counts, also of a file already in the read cache: pinned files leave
        // the cache's bound, so the cap is what bounds them.
        if !lock(&self.shared.io).is_pinned(ino) {
            self.check_open_files()?;
        }
        let delta = &self.shared.delta;
        lock(&self.shared.io).pin(ino, || match attr.layer {
            Layer::Upper => delta.open_write(path, false).ok().map(|f| (f, true)),
            Layer::Lower => delta.open_read(path).ok().map(|(f, _)| (f, false)),
        });
        Ok(Some((ino, attr.layer == Layer::Upper)))
    }

    /// After a removal detached the delta file pinned for `ino`: its data stays on disk while
    /// the kernel holds it, so it stays charged to the quota until FORGET.
    fn charge_detached(&self, pinned: Option<(u64, bool)>) {
        let Some((ino, true)) = pinned else { return };
        let Some(file) = lock(&self.shared.io).charge_detached(ino) else {
            return;
        };
        if let Ok(m) = file.metadata() {
            let bytes = allocated(std::os::unix::fs::MetadataExt::blocks(&m));
            self.shared.delta.usage().hold_detached(bytes);
        }
    }

    fn finish_create(
        &self,
        reply: ReplyCreate,
        ttl: Duration,
        attr: FileAttr,
        file: File,
        write: bool,
    ) {
        let fh = self.add_handle(Handle {
            ino: attr.ino.0,
            file: Arc::new(file),
            write,
            kind: HandleKind::Created,
        });
        // Direct I/O: a file being written does not pass through this mount's page cache on
        // top of the delta's (half the copying and memory for large outputs); the kernel
        // drops cached pages that such a write overlaps, so other opens stay coherent.
        reply.created(
            &ttl,
            &attr,
            Generation(0),
            FileHandle(fh),
            FopenFlags::FOPEN_DIRECT_IO,
        );
    }

    /// OPEN in [`IoMode::Passthrough`]: the rules decide here (`read` to read, `write` to write
    /// or truncate), then the file is handed to the kernel as a passthrough file when this
    /// sandbox may only read it, else served by the daemon through the page cache.
    fn do_open(
        &self,
        ino: u64,
        flags: OpenFlags,
        reply: &ReplyOpen,
    ) -> Result<(u64, Option<Arc<BackingId>>), FsError> {
        let path = self.path_of(ino)?;
        let (attr, d) = self.visible("open", &path)?;
        if attr.kind == EntryKind::Dir {
            return Err(FsError::IsDir { path });
        }
        let write = flags.0 & libc::O_ACCMODE != libc::O_RDONLY || flags.0 & libc::O_TRUNC != 0;
        if write {
            self.require("open-write", &path, d, Level::Write)?;
            self.check_writable(ino)?;
        } else {
            self.require("open-read", &path, d, Level::Read)?;
        }
        self.check_open_files()?;
        let epoch = lock(&self.shared.io).epoch;
        let file = Arc::new(if write {
            self.shared.delta.open_write(&path, false)?
        } else {
            self.shared.delta.open_read(&path)?.0
        });
        let eligible = !write && d.level < Level::Write && self.passthrough.load(Ordering::Relaxed);
        let backing = self.pt_backing(ino, &file, eligible, |f| reply.open_backing(f))?;
        let kind = match &backing {
            Some(b) => {
                self.shared
                    .passthrough_opens
                    .fetch_add(1, Ordering::Relaxed);
                HandleKind::Passthrough(b.clone())
            }
            None => {
                self.shared.daemon_opens.fetch_add(1, Ordering::Relaxed);
                // Seed the I/O cache with the file just opened (the first READ or WRITE
                // would open it again otherwise), unless an outside change dropped entries
                // meanwhile (as in `io_file`).
                let mut io = lock(&self.shared.io);
                if io.epoch == epoch && io.get(ino, write).is_none() {
                    io.insert(ino, file.clone(), write);
                }
                HandleKind::Cached
            }
        };
        let fh = self.add_handle(Handle {
            ino,
            file,
            write,
            kind,
        });
        Ok((fh, backing))
    }

    /// Refuses a write open before copying anything up while the inode's readers use the
    /// codebase file as their passthrough file (see [`PtState`]; only after a rule change).
    fn check_writable(&self, ino: u64) -> Result<(), FsError> {
        match lock(&self.pt).get(&ino).and_then(|st| st.backing.as_ref()) {
            Some(w) if w.strong_count() > 0 => Err(FsError::Busy { ino }),
            _ => Ok(()),
        }
    }

    /// The passthrough backing for a new open of `ino` on host file `file`, or `None` to serve
    /// it through the page cache (counted as a cached open). A live backing is shared by every
    /// open of the inode: new readers of a codebase file that another sandbox replaced in the
    /// meantime read the version the open readers have, until they all close.
    fn pt_backing(
        &self,
        ino: u64,
        file: &File,
        eligible: bool,
        open_backing: impl FnOnce(&File) -> std::io::Result<BackingId>,
    ) -> Result<Option<Arc<BackingId>>, FsError> {
        let mut pt = lock(&self.pt);
        let st = pt.entry(ino).or_default();
        if let Some(weak) = &st.backing {
            // Only read-only opens get here (`check_writable` refuses write opens first).
            if let Some(b) = weak.upgrade() {
                return Ok(Some(b));
            }
            st.backing = None;
        }
        if eligible && st.cached_opens == 0 {
            match open_backing(file) {
                Ok(b) => {
                    let b = Arc::new(b);
                    st.backing = Some(Arc::downgrade(&b));
                    return Ok(Some(b));
                }
                Err(e) => {
                    // "Not possible here" turns passthrough off for the mount; anything else
                    // (e.g. out of file descriptors) only for this open.
                    let unsupported = matches!(
                        e.raw_os_error(),
                        Some(
                            libc::EPERM
                                | libc::ENOTTY
                                | libc::EOPNOTSUPP
                                | libc::ENOSYS
                                | libc::EINVAL
                        )
                    );
                    warn!(error = %e, unsupported, "FUSE passthrough refused; the daemon serves this file");
                    if unsupported {
                        self.passthrough.store(false, Ordering::Relaxed);
                    }
                }
            }
        }
        st.cached_opens += 1;
        Ok(None)
    }

    /// RELEASE: drops the handle and its share of the inode's open state.
    fn do_release(&self, fh: u64) {
        let Some(h) = lock(&self.shared.handles).remove(&fh) else {
            return;
        };
        let mut pt = lock(&self.pt);
        let Some(st) = pt.get_mut(&h.ino) else {
            return;
        };
        match h.kind {
            HandleKind::Cached => st.cached_opens = st.cached_opens.saturating_sub(1),
            HandleKind::Passthrough(b) => drop(b),
            HandleKind::Created => {}
        }
        if st.cached_opens == 0 && st.backing.as_ref().is_none_or(|w| w.strong_count() == 0) {
            pt.remove(&h.ino);
        }
    }

    /// Who a new host file should belong to: the creating process, unless every file is
    /// shown with one owner anyway. Then the host files stay the service's: the creator's uid
    /// may be a sandbox's user-namespace id that a later sandbox reuses, and nothing but the
    /// shown owner depends on it.
    fn host_owner(&self, creator: (u32, u32)) -> Option<(u32, u32)> {
        self.opts.owner.is_none().then_some(creator)
    }

    fn do_create(
        &self,
        owner: (u32, u32),
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
    ) -> Result<(FileAttr, File, bool), FsError> {
        if mode & libc::S_IFMT != 0 && mode & libc::S_IFMT != libc::S_IFREG {
            let path = self.check_new("mknod", parent, name, EntryKind::Other)?;
            return Err(FsError::NotSupported {
                op: "special files",
                path,
            });
        }
        let path = self.check_new("create", parent, name, EntryKind::File)?;
        self.check_open_files()?;
        let file =
            self.shared
                .delta
                .create_file(&path, mode & !umask & 0o7777, self.host_owner(owner))?;
        let attr = self.entry(&path, true)?;
        let write = flags & libc::O_ACCMODE != libc::O_RDONLY;
        Ok((attr, file, write))
    }

    fn do_mkdir(
        &self,
        owner: (u32, u32),
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
    ) -> Result<FileAttr, FsError> {
        let path = self.check_new("mkdir", parent, name, EntryKind::Dir)?;
        self.shared
            .delta
            .mkdir(&path, mode & !umask & 0o7777, self.host_owner(owner))?;
        self.entry(&path, true)
    }

    fn do_symlink(
        &self,
        owner: (u32, u32),
        parent: u64,
        name: &OsStr,
        target: &Path,
    ) -> Result<FileAttr, FsError> {
        let path = self.check_new("symlink", parent, name, EntryKind::Symlink)?;
        self.shared
            .delta
            .symlink(&path, target, self.host_owner(owner))?;
        self.entry(&path, true)
    }

    fn do_remove(&self, parent: u64, name: &OsStr, dir: bool) -> Result<(), FsError> {
        check_name(name)?;
        let ppath = self.path_of(parent)?;
        self.visible("lookup", &ppath)?;
        let path = ppath.join(name);
        let op = if dir { "rmdir" } else { "unlink" };
        let (attr, d) = self.visible(op, &path)?;
        self.require(op, &path, d, Level::Write)?;
        let pinned = self.pin_before_removal(&path, &attr)?;
        if dir {
            self.shared.delta.rmdir(&path)?;
        } else {
            self.shared.delta.unlink(&path)?;
        }
        self.charge_detached(pinned);
        lock(&self.shared.nodes).detach(&path);
        self.removed(&path, dir);
        Ok(())
    }

    fn do_rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: RenameFlags,
    ) -> Result<(), FsError> {
        check_name(name)?;
        check_name(newname)?;
        let from = self.path_of(parent)?.join(name);
        let tparent = self.path_of(newparent)?;
        self.visible("lookup", &tparent)?;
        let to = tparent.join(newname);
        if flags.contains(RenameFlags::RENAME_EXCHANGE)
            || flags.contains(RenameFlags::RENAME_WHITEOUT)
        {
            return Err(FsError::NotSupported {
                op: "rename exchange/whiteout",
                path: from,
            });
        }
        let (src, d) = self.visible("rename", &from)?;
        self.require("rename", &from, d, Level::Write)?;
        let mut pinned = None;
        match self.shared.delta.lookup(&to)? {
            Some(dst) => {
                let dd = self.decision(&to, dst.kind);
                if dd.level < Level::Write {
                    return Err(self.deny_new("rename", &to, dd));
                }
                if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                    return Err(FsError::Exists { path: to });
                }
                pinned = self.pin_before_removal(&to, &dst)?;
            }
            None => {
                let dd = self.decision(&to, src.kind);
                if dd.level < Level::Write {
                    return Err(self.deny_new("rename", &to, dd));
                }
            }
        }
        if src.kind == EntryKind::Dir {
            // Every moved path must be writable where it is and where it goes; otherwise
            // let the tool copy + delete file by file.
            for p in self.shared.delta.dir_rename_paths(&from)? {
                let Ok(suffix) = p.strip_prefix(&from) else {
                    continue;
                };
                let np = if suffix.as_os_str().is_empty() {
                    to.clone()
                } else {
                    to.join(suffix)
                };
                let kind = self
                    .shared
                    .delta
                    .lookup(&p)?
                    .map_or(EntryKind::File, |a| a.kind);
                if self.decision(&p, kind).level < Level::Write
                    || self.decision(&np, kind).level < Level::Write
                {
                    return Err(FsError::CrossDevice { path: from });
                }
            }
        }
        self.shared.delta.rename(&from, &to)?;
        self.charge_detached(pinned);
        // A codebase file moves by copy-up: a host file cached for reading it is the old one.
        self.shared.invalidate_io(std::slice::from_ref(&from));
        lock(&self.shared.nodes).moved(&from, &to);
        // Cursors depend on paths: recompute lazily.
        lock(&self.cursors).1.clear();
        lock(&self.shared.shown).forget(&to, true);
        self.removed(&from, src.kind == EntryKind::Dir);
        Ok(())
    }

    fn do_link(&self, ino: u64, newparent: u64, newname: &OsStr) -> Result<FileAttr, FsError> {
        let src = self.path_of(ino)?;
        self.visible("link", &src)?;
        let path = self.check_new("link", newparent, newname, EntryKind::File)?;
        Err(FsError::NotPermitted {
            op: "hard link",
            path,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn do_setattr(
        &self,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        fh: Option<FileHandle>,
    ) -> Result<FileAttr, FsError> {
        let path = self.path_of(ino)?;
        let (attr, d) = self.visible("setattr", &path)?;
        let op = if size.is_some() {
            "truncate"
        } else if mode.is_some() {
            "chmod"
        } else if uid.is_some() || gid.is_some() {
            "chown"
        } else {
            "utimes"
        };
        self.require(op, &path, d, Level::Write)?;
        let (cur_uid, cur_gid) = self.opts.owner.unwrap_or((attr.uid, attr.gid));
        if uid.is_some_and(|u| u != cur_uid) || gid.is_some_and(|g| g != cur_gid) {
            return Err(FsError::NotPermitted { op: "chown", path });
        }
        // Any change copies the file up: a host file cached for reading it is the old one.
        self.shared.invalidate_io(std::slice::from_ref(&path));
        if let Some(size) = size {
            let via_handle = fh.and_then(|fh| self.created_file(fh, true));
            match via_handle {
                // Charged like a write: what the file allocates before and after.
                Some(f) => {
                    let before = f.metadata().ok();
                    let r = f.set_len(size);
                    self.charge_growth(ino, before.as_ref(), &f);
                    r.map_err(|e| FsError::io("truncate", &path, e))?;
                }
                None => {
                    let _gate = self
                        .shared
                        .write_gate
                        .read()
                        .unwrap_or_else(|p| p.into_inner());
                    self.shared.delta.truncate(&path, size)?;
                }
            }
        }
        if let Some(mode) = mode {
            self.shared.delta.set_mode(&path, mode)?;
        }
        if atime.is_some() || mtime.is_some() {
            let t = |t: Option<TimeOrNow>| {
                t.map(|t| match t {
                    TimeOrNow::SpecificTime(t) => t,
                    TimeOrNow::Now => SystemTime::now(),
                })
            };
            self.shared.delta.set_times(&path, t(atime), t(mtime))?;
        }
        self.entry(&path, false)
    }

    fn do_readlink(&self, ino: u64) -> Result<Vec<u8>, FsError> {
        let path = self.path_of(ino)?;
        let (_, d) = self.visible("readlink", &path)?;
        self.require("readlink", &path, d, Level::Read)?;
        self.shared.delta.readlink(&path)
    }

    /// The host file behind `fh` if it is a CREATE handle (writable if `write`).
    fn created_file(&self, fh: FileHandle, write: bool) -> Option<Arc<File>> {
        match lock(&self.shared.handles).get(&fh.0) {
            Some(h) if matches!(h.kind, HandleKind::Created) && (h.write || !write) => {
                Some(h.file.clone())
            }
            _ => None,
        }
    }

    /// The host file for I/O on `ino`: the CREATE handle `fh` if it is one, else by inode.
    /// Rules apply to every transfer, through a CREATE handle too (the rules may have changed
    /// since the file was made).
    fn io_target(&self, ino: u64, fh: FileHandle, write: bool) -> Result<Arc<File>, FsError> {
        if fh.0 != 0
            && let Some(file) = self.created_file(fh, write)
        {
            self.io_allowed(ino, write)?;
            Ok(file)
        } else {
            self.io_file(ino, write)
        }
    }

    fn do_read(
        &self,
        ino: u64,
        fh: FileHandle,
        offset: u64,
        size: u32,
    ) -> Result<Vec<u8>, FsError> {
        let file = self.io_target(ino, fh, false)?;
        let mut buf = vec![0; size as usize];
        let mut n = 0;
        while n < buf.len() {
            match file.read_at(&mut buf[n..], offset + n as u64) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(FsError::io("read", "(open file)", e)),
            }
        }
        buf.truncate(n);
        Ok(buf)
    }

    fn do_write(&self, ino: u64, fh: FileHandle, offset: u64, data: &[u8]) -> Result<u32, FsError> {
        let _gate = self
            .shared
            .write_gate
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let file = self.io_target(ino, fh, true)?;
        // Charged to the disk quota by what the write allocates (fstat around it); refused
        // (ENOSPC) when what it may allocate does not fit: the growth of the file, or all of
        // the data where the file has holes (filling a sparse file allocates within its size).
        use std::os::unix::fs::MetadataExt;
        let usage = self.shared.delta.usage();
        let before = file.metadata().ok();
        if let Some(m) = &before {
            let end = offset.saturating_add(data.len() as u64);
            let sparse = u64::try_from(allocated(m.blocks())).unwrap_or(0) < m.len();
            // Past the end (a seek leaves a hole) and into holes, a write allocates its data;
            // over allocated blocks, nothing.
            let needed = if sparse || offset >= m.len() {
                data.len() as u64
            } else {
                end.saturating_sub(m.len())
            };
            usage.check_room(needed, 0)?;
        }
        let written = file.write_all_at(data, offset);
        self.charge_growth(ino, before.as_ref(), &file);
        written.map_err(|e| FsError::io("write", "(open file)", e))?;
        Ok(u32::try_from(data.len()).unwrap_or(u32::MAX))
    }

    /// Charges to the disk quota what host file `file` of `ino` allocates now beyond what it
    /// did `before` (negative when it shrank).
    fn charge_growth(&self, ino: u64, before: Option<&std::fs::Metadata>, file: &File) {
        use std::os::unix::fs::MetadataExt;
        let (Some(b), Ok(a)) = (before, file.metadata()) else {
            return;
        };
        let grown = allocated(a.blocks()) - allocated(b.blocks());
        if grown == 0 {
            return;
        }
        let usage = self.shared.delta.usage();
        // A detached file's blocks are charged apart, until the kernel lets go of it.
        if lock(&self.shared.io).is_charged(ino) {
            usage.grow_detached(grown);
        } else {
            usage.charge(grown, 0);
        }
    }

    fn do_fsync(&self, ino: u64, fh: FileHandle, datasync: bool) -> Result<(), FsError> {
        let file = if let Some(f) = self.created_file(fh, false) {
            Some(f)
        } else {
            let held = lock(&self.shared.io).held(ino).map(|(f, _)| f);
            match held {
                Some(f) => Some(f),
                // Evicted from the cache: what was written is in the delta copy, if any.
                None => match self.io_path(ino)? {
                    (path, true) => match self.shared.delta.open_read(&path)? {
                        (f, Layer::Upper) => Some(Arc::new(f)),
                        (_, Layer::Lower) => None,
                    },
                    (_, false) => None,
                },
            }
        };
        let Some(file) = file else { return Ok(()) };
        let res = if datasync {
            file.sync_data()
        } else {
            file.sync_all()
        };
        res.map_err(|e| FsError::io("fsync", "(open file)", e))
    }

    /// The listing of directory `ino` for a READDIR at `offset`: built afresh at offset 0
    /// (a new listing), else the one being read.
    fn listing(&self, ino: u64, offset: u64) -> Result<Arc<Listing>, FsError> {
        if offset != 0
            && let Some(l) = lock(&self.listings).get(&ino)
        {
            return Ok(l.clone());
        }
        let path = self.path_of(ino)?;
        let (attr, _) = self.visible("readdir", &path)?;
        if attr.kind != EntryKind::Dir {
            return Err(FsError::NotDir { path });
        }
        let listing = self.shared.delta.list(&path)?;
        let (policy, gen_) = self.shared.policy();
        let parent_cursor = self.cursor(&policy, gen_, &path);
        let mut entries = Vec::with_capacity(listing.len() + 2);
        entries.push((ino, FileType::Directory, OsString::from(".")));
        entries.push((ino, FileType::Directory, OsString::from("..")));
        let mut shown = Vec::with_capacity(listing.len());
        for (name, kind) in listing {
            let c = policy.cursor_child(&parent_cursor, &name.to_string_lossy());
            let child = path.join(&name);
            if self.decide(&policy, &c, &child, kind).level != Level::None {
                shown.push((child, kind, name));
            }
        }
        let mut nodes = lock(&self.shared.nodes);
        for (child, kind, name) in shown {
            let child_ino = nodes.get_or_insert(&child);
            entries.push((child_ino, file_type(kind), name));
        }
        drop(nodes);
        let entries = Arc::new(entries);
        lock(&self.listings).insert(ino, entries.clone());
        Ok(entries)
    }

    fn do_access(&self, ino: u64, mask: AccessFlags) -> Result<(), FsError> {
        let path = self.path_of(ino)?;
        let (attr, d) = self.visible("access", &path)?;
        let is_dir = attr.kind == EntryKind::Dir;
        if mask.contains(AccessFlags::W_OK) {
            self.require("access-write", &path, d, Level::Write)?;
        }
        if mask.contains(AccessFlags::R_OK) && !is_dir {
            self.require("access-read", &path, d, Level::Read)?;
        }
        if mask.contains(AccessFlags::X_OK) && !is_dir {
            self.require("access-exec", &path, d, Level::Read)?;
            if attr.perm & 0o111 == 0 {
                return Err(FsError::Denied {
                    op: "access-exec",
                    path,
                    level: d.level,
                });
            }
        }
        Ok(())
    }

    fn do_setxattr(&self, ino: u64) -> Result<(), FsError> {
        let path = self.path_of(ino)?;
        let (_, d) = self.visible("setxattr", &path)?;
        self.require("setxattr", &path, d, Level::Write)?;
        Err(FsError::NotSupported {
            op: "extended attributes",
            path,
        })
    }

    /// (total blocks, free blocks, total files, free files, block size): the host file
    /// system's free space, or the disk quota where one is set (never more than the host has).
    fn do_statfs(&self) -> Result<(u64, u64, u64, u64, u32), FsError> {
        let st = rustix::fs::statvfs(self.shared.delta.lower_path())
            .map_err(|e| FsError::io("statfs", self.shared.delta.lower_path(), e.into()))?;
        let frsize = st.f_frsize.max(1);
        let (used_b, used_i) = self.shared.delta.usage().used();
        let (max_b, max_i) = self.shared.delta.usage().limits();
        // Total = free without a quota: the used space (which includes hidden files) is not
        // shown.
        let (blocks, bfree) = if max_b > 0 {
            (
                max_b / frsize,
                (max_b.saturating_sub(used_b) / frsize).min(st.f_bavail),
            )
        } else {
            (st.f_bavail, st.f_bavail)
        };
        let (files, ffree) = if max_i > 0 {
            (max_i, max_i.saturating_sub(used_i).min(st.f_favail))
        } else {
            (st.f_favail, st.f_favail)
        };
        Ok((
            blocks,
            bfree,
            files,
            ffree,
            u32::try_from(frsize).unwrap_or(4096),
        ))
    }
}

/// Longest time the kernel may remember that a name does not exist.
const NEGATIVE_TTL: Duration = Duration::from_secs(1);

/// The attributes of a negative lookup reply (only the node id 0 matters).
fn negative_attr() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: SystemTime::UNIX_EPOCH,
        mtime: SystemTime::UNIX_EPOCH,
        ctime: SystemTime::UNIX_EPOCH,
        crtime: SystemTime::UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn errno(e: &FsError) -> Errno {
    let code = e.errno();
    if code == libc::EIO {
        warn!(error = %crate::delta::error_chain(e), "internal filesystem error");
    } else {
        debug!(error = %e, "fs error");
    }
    Errno::from_i32(code)
}

impl Filesystem for PolicyFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // No READDIRPLUS: with it the kernel re-asks for the attributes of every entry on
        // each listing, which made warm `git status`/`ls` 2-3x slower than plain READDIR plus
        // cached lookups (measured with bench/fs.sh).
        // Shared mmap of files opened with direct I/O (files made by CREATE); without it
        // such an mmap fails with ENODEV (Linux >= 6.6; older kernels refuse only that).
        // Cached pages of a file whose size or mtime changed behind the kernel's back (a
        // codebase edited outside the server) are dropped when its attributes are refreshed.
        if config
            .add_capabilities(InitFlags::FUSE_AUTO_INVAL_DATA)
            .is_err()
        {
            debug!("kernel without FUSE_AUTO_INVAL_DATA");
        }
        if config
            .add_capabilities(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP)
            .is_err()
        {
            debug!("kernel without FUSE_DIRECT_IO_ALLOW_MMAP: no shared mmap of new files");
        }
        if self.opts.io_mode == IoMode::Passthrough {
            // Stack depth 2: the codebase may itself be on a stacked filesystem (overlayfs,
            // e.g. a server in a container).
            let ok = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(2).is_ok();
            if !ok {
                warn!(
                    "kernel without FUSE passthrough (Linux < 6.9?): the daemon serves every open file"
                );
            }
            self.passthrough.store(ok, Ordering::Relaxed);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.do_lookup(parent.0, name) {
            Ok(a) => reply.entry(&self.opts.entry_ttl, &a, Generation(0)),
            // A negative entry (node id 0): the kernel answers repeated probes of a missing
            // (or hidden: same answer) name itself for a short while. Creations through this
            // mount replace it; changes from outside drop it by invalidation or within 1 s.
            Err(FsError::NotFound { .. }) => {
                let ttl = self.opts.entry_ttl.min(NEGATIVE_TTL);
                reply.entry(&ttl, &negative_attr(), Generation(0));
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        if ino.0 == 1 {
            return;
        }
        let mut nodes = lock(&self.shared.nodes);
        let gone = match nodes.by_ino.get_mut(&ino.0) {
            Some(n) => {
                n.lookups = n.lookups.saturating_sub(nlookup);
                n.lookups == 0
            }
            None => false,
        };
        if gone
            && let Some(n) = nodes.by_ino.remove(&ino.0)
            && let Some(p) = n.path
        {
            nodes.by_path.remove(&p);
        }
        drop(nodes);
        if gone {
            lock(&self.cursors).1.remove(&ino.0);
            let held = lock(&self.shared.io).forget(ino.0);
            if let Some(f) = held.filter(|f| f.charged) {
                let bytes = f
                    .file
                    .metadata()
                    .map(|m| allocated(std::os::unix::fs::MetadataExt::blocks(&m)))
                    .unwrap_or(0);
                self.shared.delta.usage().release_detached(bytes);
            }
            lock(&self.listings).remove(&ino.0);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.do_getattr(ino.0, fh) {
            Ok(a) => reply.attr(&self.opts.attr_ttl, &a),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.do_setattr(ino.0, mode, uid, gid, size, atime, mtime, fh) {
            Ok(a) => reply.attr(&self.opts.attr_ttl, &a),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.do_readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        match self.do_create(
            (req.uid(), req.gid()),
            parent.0,
            name,
            mode,
            umask,
            libc::O_RDONLY,
        ) {
            Ok((a, _file, _)) => reply.entry(&self.opts.entry_ttl, &a, Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        match self.do_mkdir((req.uid(), req.gid()), parent.0, name, mode, umask) {
            Ok(a) => reply.entry(&self.opts.entry_ttl, &a, Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.do_remove(parent.0, name, false) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.do_remove(parent.0, name, true) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        match self.do_symlink((req.uid(), req.gid()), parent.0, link_name, target) {
            Ok(a) => reply.entry(&self.opts.entry_ttl, &a, Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        match self.do_rename(parent.0, name, newparent.0, newname, flags) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        match self.do_link(ino.0, newparent.0, newname) {
            Ok(a) => reply.entry(&self.opts.entry_ttl, &a, Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// No-open mode: ENOSYS, and the kernel stops sending OPEN for good (module docs).
    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if self.opts.io_mode == IoMode::NoOpen {
            return reply.error(Errno::ENOSYS);
        }
        match self.do_open(ino.0, flags, &reply) {
            Ok((fh, Some(b))) => reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &b),
            // Pages stay cached across opens, as in no-open mode: changes from outside drop
            // them (invalidation, or a new size or mtime seen at an attribute refresh).
            Ok((fh, None)) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.do_read(ino.0, fh, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.do_write(ino.0, fh, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// ENOSYS: nothing happens at close; the kernel stops sending FLUSH for good.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.do_release(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.do_fsync(ino.0, fh, datasync) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// ENOSYS: no-opendir mode; listings are served by READDIR alone and the kernel caches
    /// them (invalidated on changes).
    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.error(Errno::ENOSYS);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.listing(ino.0, offset) {
            Ok(l) => l,
            Err(e) => return reply.error(errno(&e)),
        };
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        if start >= entries.len() {
            // The end of this listing: the next READDIR at offset 0 starts a new one.
            lock(&self.listings).remove(&ino.0);
        }
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(start) {
            if reply.add(INodeNo(*ino), (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.do_statfs() {
            Ok((blocks, bfree, files, ffree, frsize)) => {
                reply.statfs(blocks, bfree, bfree, files, ffree, frsize, 255, frsize);
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        match self.do_setxattr(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, _name: &OsStr, _size: u32, reply: ReplyXattr) {
        match self
            .path_of(ino.0)
            .and_then(|p| self.visible("getxattr", &p))
        {
            Ok(_) => reply.error(Errno::NO_XATTR),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self
            .path_of(ino.0)
            .and_then(|p| self.visible("listxattr", &p))
        {
            Ok(_) if size == 0 => reply.size(0),
            Ok(_) => reply.data(&[]),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        match self.do_setxattr(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        match self.do_access(ino.0, mask) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        match self.do_create((req.uid(), req.gid()), parent.0, name, mode, umask, flags) {
            Ok((attr, file, write)) => {
                self.finish_create(reply, self.opts.entry_ttl, attr, file, write);
            }
            Err(e) => reply.error(errno(&e)),
        }
    }
}

pub(crate) mod content;
mod shown;
#[cfg(test)]
mod tests;
