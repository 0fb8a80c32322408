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
//! Open files use kernel passthrough (reads and writes never reach the daemon) for delta
//! files and for codebase files below `write`; codebase files the sandbox may write are
//! page-cached instead, because a later write open copies them up and the kernel does not let
//! one inode switch backing files while readers hold it (see [`IoState`]).

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};
use std::time::{Duration, SystemTime};

use agentfense_core::{Decision, Level, NodeKind, Policy};
use fuser::{
    AccessFlags, BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use tracing::{debug, warn};

use crate::audit::{Auditor, display_path};
use crate::delta::{Attr, Delta, EntryKind, Layer};
use crate::error::FsError;

/// Options of the adapter (a subset of `FsConfig`).
#[derive(Clone, Debug)]
pub(crate) struct FsOptions {
    pub(crate) entry_ttl: Duration,
    pub(crate) attr_ttl: Duration,
    pub(crate) owner: Option<(u32, u32)>,
    pub(crate) passthrough: bool,
}

/// One known path.
#[derive(Debug)]
pub(crate) struct Node {
    /// Delta-relative path; `None` once the entry was deleted or replaced.
    pub(crate) path: Option<PathBuf>,
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
            n.path = None;
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

/// An open file or directory.
enum Handle {
    File {
        ino: u64,
        file: Arc<File>,
        write: bool,
        /// Keeps the kernel's passthrough backing open while this handle lives.
        _backing: Option<Arc<BackingId>>,
        /// Counts towards the inode's page-cached opens.
        cached: bool,
    },
    Dir {
        entries: Vec<(u64, FileType, OsString)>,
    },
}

/// Per-inode I/O mode. The kernel (fs/fuse/iomode.c) requires that while an inode has a
/// passthrough backing file, *every* open of it uses passthrough with that same backing (any
/// other answer fails the open with EIO), and it refuses passthrough while page-cached opens
/// exist. Hence: passthrough only for files that cannot be copied up under an open reader
/// (delta files, and codebase files below `write`), everything else page-cached.
#[derive(Default)]
struct IoState {
    /// The live backing: host (dev, ino), the layer it is in, and the id.
    backing: Option<((u64, u64), Layer, Weak<BackingId>)>,
    cached_opens: usize,
    /// Opened for writing at least once in this mount: no more `FOPEN_KEEP_CACHE`.
    written: bool,
}

/// State shared between the FUSE threads and the [`crate::MountHandle`].
pub(crate) struct Shared {
    pub(crate) delta: Delta,
    pub(crate) audit: Auditor,
    pub(crate) policy: RwLock<(Arc<Policy>, u64)>,
    pub(crate) nodes: Mutex<Nodes>,
    handles: Mutex<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
    pub(crate) passthrough_opens: AtomicU64,
    pub(crate) daemon_opens: AtomicU64,
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
            passthrough_opens: AtomicU64::new(0),
            daemon_opens: AtomicU64::new(0),
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
    }

    /// Whether `rel` is open. A published file that is still open keeps its delta copy
    /// (and stays pending): writers may go on writing, and a reader's passthrough backing must
    /// stay the file that later opens of the same inode get.
    pub(crate) fn busy(&self, rel: &Path) -> bool {
        let handles = lock(&self.handles);
        let nodes = lock(&self.nodes);
        handles.values().any(|h| match h {
            Handle::File { ino, .. } => nodes
                .by_ino
                .get(ino)
                .and_then(|n| n.path.as_deref())
                .is_some_and(|p| p == rel),
            _ => false,
        })
    }
}

type RootFn<C> = fn(&Policy) -> C;
type ChildFn<C> = fn(&Policy, &C, &str) -> C;
type DecideFn<C> = fn(&Policy, &C, NodeKind) -> Decision;

/// The filesystem. Generic over the engine's cursor type only because `agentfense-core`
/// does not export `Cursor` by name; `C` is always that type (see `crate::mount`).
pub(crate) struct PolicyFs<C> {
    shared: Arc<Shared>,
    opts: FsOptions,
    root: RootFn<C>,
    child: ChildFn<C>,
    decide: DecideFn<C>,
    /// Cursor per inode, valid for policy generation `.0`.
    cursors: Mutex<(u64, HashMap<u64, C>)>,
    io: Mutex<HashMap<u64, IoState>>,
    passthrough: AtomicBool,
}

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

impl<C: Clone + Send + Sync + 'static> PolicyFs<C> {
    pub(crate) fn new(
        shared: Arc<Shared>,
        opts: FsOptions,
        root: RootFn<C>,
        child: ChildFn<C>,
        decide: DecideFn<C>,
    ) -> Self {
        let passthrough = opts.passthrough;
        PolicyFs {
            shared,
            opts,
            root,
            child,
            decide,
            cursors: Mutex::new((0, HashMap::new())),
            io: Mutex::new(HashMap::new()),
            passthrough: AtomicBool::new(passthrough),
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
    fn cursor(&self, policy: &Policy, gen_: u64, path: &Path) -> C {
        let mut cache = lock(&self.cursors);
        if cache.0 != gen_ {
            cache.0 = gen_;
            cache.1.clear();
        }
        let nodes = lock(&self.shared.nodes);
        let ino_of = |p: &Path| nodes.by_path.get(p).copied();
        // Walk up to the nearest cached ancestor, then step down.
        let mut chain: Vec<&Path> = Vec::new();
        let mut start: Option<C> = None;
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
                let c = (self.root)(policy);
                cache.1.insert(1, c.clone());
                c
            }
        };
        for p in chain.into_iter().rev() {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default();
            cur = (self.child)(policy, &cur, &name);
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
        (self.decide)(&policy, &c, kind_of(kind))
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
                (r, policy.rule(r).pattern.clone())
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
                // A deleted file still open: answer from the handle.
                let Some(fh) = fh else { return Err(e) };
                let handles = lock(&self.shared.handles);
                match handles.get(&fh.0) {
                    Some(Handle::File { file, write, .. }) => {
                        let st = rustix::fs::fstat(file)
                            .map_err(|e| FsError::io("fstat", "(open file)", e.into()))?;
                        let a = crate::delta::attr_of_stat(&st);
                        let level = if *write { Level::Write } else { Level::Read };
                        Ok(self.file_attr(ino, &a, level))
                    }
                    _ => Err(e),
                }
            }
        }
    }

    fn add_handle(&self, h: Handle) -> u64 {
        let fh = self.shared.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.shared.handles).insert(fh, h);
        fh
    }

    /// Decides how to open `file` (from `layer`, for writing if `write`, the path being at
    /// `level`) for inode `ino`: passthrough with its backing id, or page-cached. Fails with
    /// `Busy` when the kernel would refuse the open (a writer of an inode whose readers are
    /// backed by the codebase file, possible only after a rule change).
    fn io_mode(
        &self,
        ino: u64,
        file: &File,
        layer: Layer,
        write: bool,
        level: Level,
        open_backing: impl FnOnce(&File) -> std::io::Result<BackingId>,
    ) -> Result<IoMode, FsError> {
        let mut io = lock(&self.io);
        let st = io.entry(ino).or_default();
        if let Some((ident, blayer, weak)) = &st.backing
            && let Some(b) = weak.upgrade()
        {
            let same = rustix::fs::fstat(file).is_ok_and(|s| (s.st_dev, s.st_ino) == *ident);
            if same || (!write && *blayer == Layer::Lower) {
                // A newer codebase version than the open readers': new readers share theirs
                // until they close (read-only either way).
                return Ok((Some(b), FopenFlags::empty(), false));
            }
            return Err(FsError::Busy { ino });
        }
        let eligible = layer == Layer::Upper || (level < Level::Write && !write);
        if eligible
            && self.passthrough.load(Ordering::Relaxed)
            && st.cached_opens == 0
            && let Ok(s) = rustix::fs::fstat(file)
        {
            match open_backing(file) {
                Ok(b) => {
                    let b = Arc::new(b);
                    st.backing = Some(((s.st_dev, s.st_ino), layer, Arc::downgrade(&b)));
                    st.written |= write;
                    return Ok((Some(b), FopenFlags::empty(), false));
                }
                Err(e) => {
                    // "Not supported here" turns passthrough off for the mount; anything
                    // else (e.g. out of file descriptors) only for this open.
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
                    warn!(error = %e, unsupported, "FUSE passthrough failed; serving this file in the daemon");
                    if unsupported {
                        self.passthrough.store(false, Ordering::Relaxed);
                    }
                }
            }
        }
        st.written |= write;
        st.cached_opens += 1;
        // Codebase files never written through this mount keep their page cache across opens;
        // a change from outside drops it (invalidation, or the attribute refresh seeing a new
        // size or mtime).
        let flags = if layer == Layer::Lower && !st.written {
            FopenFlags::FOPEN_KEEP_CACHE
        } else {
            FopenFlags::empty()
        };
        Ok((None, flags, true))
    }

    fn do_open(&self, ino: u64, flags: OpenFlags) -> Result<Opened, FsError> {
        let path = self.path_of(ino)?;
        let (attr, d) = self.visible("open", &path)?;
        if attr.kind == EntryKind::Dir {
            return Err(FsError::IsDir { path });
        }
        let write = flags.acc_mode() != OpenAccMode::O_RDONLY || flags.0 & libc::O_TRUNC != 0;
        let (file, layer) = if write {
            self.require("open-write", &path, d, Level::Write)?;
            self.check_writable_io(ino)?;
            let f = self
                .shared
                .delta
                .open_write(&path, flags.0 & libc::O_TRUNC != 0)?;
            (f, Layer::Upper)
        } else {
            self.require("open-read", &path, d, Level::Read)?;
            self.shared.delta.open_read(&path)?
        };
        Ok(Opened {
            ino,
            file,
            write,
            layer,
            level: d.level,
        })
    }

    /// Refuses a write open before copying anything up when the inode's readers are backed
    /// by the codebase file (see [`IoState`]).
    fn check_writable_io(&self, ino: u64) -> Result<(), FsError> {
        let io = lock(&self.io);
        match io.get(&ino).and_then(|st| st.backing.as_ref()) {
            Some((_, Layer::Lower, w)) if w.strong_count() > 0 => Err(FsError::Busy { ino }),
            _ => Ok(()),
        }
    }

    fn finish_open(&self, o: Opened, reply: OpenReply) {
        let Opened {
            ino,
            file,
            write,
            layer,
            level,
        } = o;
        let mode = match &reply {
            OpenReply::Open(r) => {
                self.io_mode(ino, &file, layer, write, level, |f| r.open_backing(f))
            }
            OpenReply::Create(r, ..) => {
                self.io_mode(ino, &file, layer, write, level, |f| r.open_backing(f))
            }
        };
        let (backing, flags, cached) = match mode {
            Ok(m) => m,
            Err(e) => {
                return match reply {
                    OpenReply::Open(r) => r.error(errno(&e)),
                    OpenReply::Create(r, ..) => r.error(errno(&e)),
                };
            }
        };
        let counter = if backing.is_some() {
            &self.shared.passthrough_opens
        } else {
            &self.shared.daemon_opens
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let fh = self.add_handle(Handle::File {
            ino,
            file: Arc::new(file),
            write,
            _backing: backing.clone(),
            cached,
        });
        match (reply, backing) {
            (OpenReply::Open(r), Some(b)) => r.opened_passthrough(FileHandle(fh), flags, &b),
            (OpenReply::Open(r), None) => r.opened(FileHandle(fh), flags),
            (OpenReply::Create(r, ttl, attr), Some(b)) => {
                r.created_passthrough(&ttl, &attr, Generation(0), FileHandle(fh), flags, &b);
            }
            (OpenReply::Create(r, ttl, attr), None) => {
                r.created(&ttl, &attr, Generation(0), FileHandle(fh), flags);
            }
        }
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
        let file = self
            .shared
            .delta
            .create_file(&path, mode & !umask & 0o7777, Some(owner))?;
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
            .mkdir(&path, mode & !umask & 0o7777, Some(owner))?;
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
        self.shared.delta.symlink(&path, target, Some(owner))?;
        self.entry(&path, true)
    }

    fn do_remove(&self, parent: u64, name: &OsStr, dir: bool) -> Result<(), FsError> {
        check_name(name)?;
        let ppath = self.path_of(parent)?;
        self.visible("lookup", &ppath)?;
        let path = ppath.join(name);
        let op = if dir { "rmdir" } else { "unlink" };
        let (_, d) = self.visible(op, &path)?;
        self.require(op, &path, d, Level::Write)?;
        if dir {
            self.shared.delta.rmdir(&path)?;
        } else {
            self.shared.delta.unlink(&path)?;
        }
        lock(&self.shared.nodes).detach(&path);
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
        match self.shared.delta.lookup(&to)? {
            Some(dst) => {
                let dd = self.decision(&to, dst.kind);
                if dd.level < Level::Write {
                    return Err(self.deny_new("rename", &to, dd));
                }
                if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                    return Err(FsError::Exists { path: to });
                }
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
        lock(&self.shared.nodes).moved(&from, &to);
        // Cursors depend on paths: recompute lazily.
        lock(&self.cursors).1.clear();
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
        if let Some(size) = size {
            let via_handle = fh.and_then(|fh| match lock(&self.shared.handles).get(&fh.0) {
                Some(Handle::File {
                    file, write: true, ..
                }) => Some(file.set_len(size)),
                _ => None,
            });
            match via_handle {
                Some(r) => r.map_err(|e| FsError::io("truncate", &path, e))?,
                None => self.shared.delta.truncate(&path, size)?,
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

    /// The host file behind open handle `fh` (which must be writable if `write`).
    fn file_of(&self, fh: FileHandle, write: bool) -> Result<Arc<File>, FsError> {
        match lock(&self.shared.handles).get(&fh.0) {
            Some(Handle::File { file, write: w, .. }) if *w || !write => Ok(file.clone()),
            _ => Err(FsError::Stale { id: fh.0 }),
        }
    }

    fn do_read(&self, fh: FileHandle, offset: u64, size: u32) -> Result<Vec<u8>, FsError> {
        let file = self.file_of(fh, false)?;
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

    fn do_write(&self, fh: FileHandle, offset: u64, data: &[u8]) -> Result<u32, FsError> {
        let file = self.file_of(fh, true)?;
        file.write_all_at(data, offset)
            .map_err(|e| FsError::io("write", "(open file)", e))?;
        Ok(u32::try_from(data.len()).unwrap_or(u32::MAX))
    }

    fn do_fsync(&self, fh: FileHandle, datasync: bool) -> Result<(), FsError> {
        let file = self.file_of(fh, false)?;
        let res = if datasync {
            file.sync_data()
        } else {
            file.sync_all()
        };
        res.map_err(|e| FsError::io("fsync", "(open file)", e))
    }

    fn do_opendir(&self, ino: u64) -> Result<u64, FsError> {
        let path = self.path_of(ino)?;
        let (attr, _) = self.visible("opendir", &path)?;
        if attr.kind != EntryKind::Dir {
            return Err(FsError::NotDir { path });
        }
        let listing = self.shared.delta.list(&path)?;
        let (policy, gen_) = self.shared.policy();
        let parent_cursor = self.cursor(&policy, gen_, &path);
        let mut entries = Vec::with_capacity(listing.len() + 2);
        entries.push((ino, FileType::Directory, OsString::from(".")));
        entries.push((ino, FileType::Directory, OsString::from("..")));
        let mut nodes = lock(&self.shared.nodes);
        for (name, kind) in listing {
            let c = (self.child)(&policy, &parent_cursor, &name.to_string_lossy());
            if (self.decide)(&policy, &c, kind_of(kind)).level == Level::None {
                continue;
            }
            let child_ino = nodes.get_or_insert(&path.join(&name));
            entries.push((child_ino, file_type(kind), name));
        }
        drop(nodes);
        Ok(self.add_handle(Handle::Dir { entries }))
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

    fn do_statfs(&self) -> Result<(u64, u64, u32), FsError> {
        let st = rustix::fs::statvfs(self.shared.delta.lower_path())
            .map_err(|e| FsError::io("statfs", self.shared.delta.lower_path(), e.into()))?;
        Ok((
            st.f_bavail,
            st.f_favail,
            u32::try_from(st.f_frsize).unwrap_or(4096),
        ))
    }
}

/// How an open file is served: `(passthrough backing, open flags, counts as page-cached)`.
type IoMode = (Option<Arc<BackingId>>, FopenFlags, bool);

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

/// A file opened on the host for a FUSE open or create.
struct Opened {
    ino: u64,
    file: File,
    write: bool,
    layer: Layer,
    level: Level,
}

enum OpenReply {
    Open(ReplyOpen),
    Create(ReplyCreate, Duration, FileAttr),
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

impl<C: Clone + Send + Sync + 'static> Filesystem for PolicyFs<C> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // No READDIRPLUS: with it the kernel re-asks for the attributes of every entry on
        // each listing, which made warm `git status`/`ls` 2-3x slower than plain READDIR plus
        // cached lookups (measured with bench/fs.sh).
        if self.opts.passthrough {
            let ok = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(2).is_ok();
            if !ok {
                warn!("kernel does not offer FUSE passthrough; falling back");
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
            lock(&self.io).remove(&ino.0);
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

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.do_open(ino.0, flags) {
            Ok(o) => self.finish_open(o, OpenReply::Open(reply)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.do_read(fh, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.do_write(fh, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(&e)),
        }
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
        let h = lock(&self.shared.handles).remove(&fh.0);
        if let Some(Handle::File {
            ino, cached: true, ..
        }) = h
            && let Some(st) = lock(&self.io).get_mut(&ino)
        {
            st.cached_opens = st.cached_opens.saturating_sub(1);
        }
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.do_fsync(fh, datasync) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.do_opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let handles = lock(&self.shared.handles);
        let Some(Handle::Dir { entries }) = handles.get(&fh.0) else {
            return reply.error(Errno::EBADF);
        };
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(start) {
            if reply.add(INodeNo(*ino), (i + 1) as u64, *kind, name) {
                break;
            }
        }
        drop(handles);
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        lock(&self.shared.handles).remove(&fh.0);
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
            // Total = free: the used space (which includes hidden files) is not shown.
            Ok((bavail, favail, frsize)) => {
                reply.statfs(bavail, bavail, bavail, favail, favail, frsize, 255, frsize);
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
                let opened = Opened {
                    ino: attr.ino.0,
                    file,
                    write,
                    layer: Layer::Upper,
                    level: Level::Write,
                };
                self.finish_open(opened, OpenReply::Create(reply, self.opts.entry_ttl, attr));
            }
            Err(e) => reply.error(errno(&e)),
        }
    }
}

#[cfg(test)]
mod tests;
