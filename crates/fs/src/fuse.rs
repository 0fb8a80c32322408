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
//! ## First pass
//! A fresh mount has nothing cached. Listings are READDIRPLUS, so the kernel gets each
//! directory's names with their attributes in one round trip (no LOOKUP per name), and the
//! first READ in a directory has its small `read` files pushed into the page cache beside the
//! reader ([`prefetch`]), so a first `grep -r` does not pay a round trip per file either.
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
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use tracing::{debug, warn};

use crate::audit::{Auditor, display_path};
use crate::delta::{Attr, Delta, EntryKind, Layer, XattrWrite};
use crate::error::FsError;
use crate::modes::IoMode;
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
    /// Directory times as shown to the sandbox (moved only by changes it can see).
    dir_times: Mutex<dirtimes::DirTimes>,
    /// Directories whose files were pushed, with the cache epoch of the push ([`prefetch`]).
    prefetched: Mutex<HashMap<PathBuf, u64>>,
}

/// The visible entries of a directory, `.` and `..` first.
type Listing = Vec<Listed>;

/// One entry of a [`Listing`].
struct Listed {
    ino: u64,
    kind: FileType,
    name: OsString,
    /// The attributes and level the entry had when listed (`None` for `.` and `..`), which a
    /// READDIRPLUS reply carries.
    shown: Option<(Attr, Level)>,
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
        EntryKind::Fifo => FileType::NamedPipe,
        EntryKind::Socket => FileType::Socket,
        EntryKind::Other => FileType::CharDevice,
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
        // The cache of host files is a shortcut within the sandbox's open-files cap.
        lock(&shared.io).cap =
            io_cache::IO_CACHE_MAX.min(opts.max_open_files.saturating_sub(1).max(1));
        PolicyFs {
            shared,
            opts,
            cursors: Mutex::new((0, HashMap::new())),
            listings: Mutex::new(HashMap::new()),
            pt: Mutex::new(HashMap::new()),
            passthrough: AtomicBool::new(false),
            dir_times: Mutex::new(dirtimes::DirTimes::default()),
            prefetched: Mutex::new(HashMap::new()),
        }
    }
}

mod adapter;
pub(crate) mod content;
mod dirtimes;
mod inodes;
mod io;
mod io_cache;
mod lookup;
mod namespace;
pub(crate) mod prefetch;
mod shared;
mod shown;
#[cfg(test)]
mod tests;

pub(crate) use inodes::{Node, Nodes};
pub(crate) use io_cache::IoCache;
use io_cache::{Handle, HandleKind, PtState};
pub(crate) use shared::{Shared, lock};
