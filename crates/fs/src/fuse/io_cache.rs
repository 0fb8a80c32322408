//! Handles and the cache of host files that I/O is served from (no-open mode), and the
//! per-inode passthrough state.

use super::*;

/// An open file the kernel holds a handle of: one made by CREATE (the only open the kernel
/// sends in no-open mode), or an OPEN in [`IoMode::Passthrough`].
pub(super) struct Handle {
    pub(super) ino: u64,
    /// The host file behind it: I/O goes through it for files made by CREATE; for the others
    /// it answers `fstat` after an unlink.
    pub(super) file: Arc<File>,
    pub(super) write: bool,
    pub(super) kind: HandleKind,
}

pub(super) enum HandleKind {
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
pub(super) struct PtState {
    /// The live backing (gone once every passthrough handle of the inode is released).
    pub(super) backing: Option<Weak<BackingId>>,
    pub(super) cached_opens: usize,
}

/// A host file serving I/O on an inode opened without a FUSE open.
pub(super) struct IoFile {
    pub(super) file: Arc<File>,
    pub(super) write: bool,
    /// Detached (unlinked or replaced) while the kernel still knows the inode: kept until
    /// FORGET and never evicted, since its path no longer leads to it.
    pub(super) pinned: bool,
    /// A detached delta file whose space is charged to the disk quota until FORGET (the
    /// removal that detached it discharged it, but the data stays on disk while held).
    pub(super) charged: bool,
}

/// Host files by inode, for READ and WRITE requests that carry no handle. Unpinned entries
/// are evicted oldest first beyond [`IO_CACHE_MAX`]: a file needs one only while its pages
/// are not yet in the kernel's page cache, so a small cache serves any working set.
#[derive(Default)]
pub(crate) struct IoCache {
    pub(super) files: HashMap<u64, IoFile>,
    pub(super) order: VecDeque<u64>,
    /// Bumped whenever entries are dropped, so that a file opened concurrently with a drop
    /// (an outside change) is not cached afterwards.
    pub(super) epoch: u64,
    /// Most unpinned files kept ([`IO_CACHE_MAX`], or less under a small open-files cap);
    /// 0 means [`IO_CACHE_MAX`].
    pub(super) cap: usize,
}

/// Unpinned host files kept open per mount.
pub(super) const IO_CACHE_MAX: usize = 64;

impl IoCache {
    /// The host file cached for `ino`, if it serves `write`s when asked to.
    pub(super) fn get(&self, ino: u64, write: bool) -> Option<Arc<File>> {
        self.held(ino).filter(|(_, w)| *w || !write).map(|(f, _)| f)
    }

    pub(super) fn insert(&mut self, ino: u64, file: Arc<File>, write: bool) {
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
        let cap = if self.cap == 0 {
            IO_CACHE_MAX
        } else {
            self.cap
        };
        while self.order.len() > cap {
            if let Some(old) = self.order.pop_front() {
                self.files.remove(&old);
            }
        }
    }

    /// Keeps `ino`'s host file (the cached one, else `open()`'s) until FORGET.
    pub(super) fn pin(&mut self, ino: u64, open: impl FnOnce() -> Option<(File, bool)>) {
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

    pub(super) fn forget(&mut self, ino: u64) -> Option<IoFile> {
        let f = self.files.remove(&ino)?;
        self.order.retain(|&i| i != ino);
        Some(f)
    }

    /// Whether `ino` is a detached delta file charged to the quota.
    pub(super) fn is_charged(&self, ino: u64) -> bool {
        self.files.get(&ino).is_some_and(|f| f.charged)
    }

    /// The pinned file of `ino`, marked as charged to the quota, unless it already was. The
    /// caller knows it is a delta file (whether the cached descriptor is writable or not: a
    /// file read before its removal is held through a read-only one).
    pub(super) fn charge_detached(&mut self, ino: u64) -> Option<Arc<File>> {
        let f = self.files.get_mut(&ino)?;
        if !f.pinned || f.charged {
            return None;
        }
        f.charged = true;
        Some(f.file.clone())
    }

    /// Whether `ino`'s host file is kept until FORGET.
    pub(super) fn is_pinned(&self, ino: u64) -> bool {
        self.files.get(&ino).is_some_and(|f| f.pinned)
    }

    /// The host file cached for `ino` and whether it is writable.
    pub(super) fn held(&self, ino: u64) -> Option<(Arc<File>, bool)> {
        self.files.get(&ino).map(|f| (f.file.clone(), f.write))
    }

    pub(crate) fn len(&self) -> usize {
        self.files.len()
    }

    /// Closes unpinned host files, oldest first, until at most `n` are held (pinned ones
    /// stay: their paths no longer lead to them).
    pub(super) fn shrink_to(&mut self, n: usize) {
        while self.files.len() > n {
            let Some(old) = self.order.pop_front() else {
                return;
            };
            self.files.remove(&old);
        }
    }
}
