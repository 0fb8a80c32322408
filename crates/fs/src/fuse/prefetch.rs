//! Pages of a directory's small read-only files, pushed into the kernel's page cache once a
//! command starts reading that directory.
//!
//! In no-open mode a first read of a file costs a READ round trip, and each round trip wakes
//! the daemon and then the reader, often on the other CPU: a first `grep -r` over a source
//! tree paid that for every file. When the first READ of a file arrives (at offset 0, after it
//! is answered), the daemon sends the contents of the other small files of its directory that
//! the sandbox may read, and the kernel already knows, with `FUSE_NOTIFY_STORE`: the reader
//! then finds them in its page cache. A directory is pushed once per cache epoch, and never
//! more than [`DIR_MAX`] bytes of it.
//!
//! What may be pushed: regular files of the codebase (the lower layer) whose level is exactly
//! `read`. Never a `view` or hidden file (its content must not reach the kernel), and never a
//! file this sandbox may write: a write of it could race with the push and leave stale pages.
//! A file is pushed only in the version the rules judged (size, modification and change
//! times checked before and after it is read), so an edit or replacement since, including
//! one that a content condition would refuse, is left to READ. Changes made through the
//! server (publishes, uploads, rule changes) move [`Shared::cache_epoch`] under
//! [`Shared::push_gate`] before the kernel is told to drop pages; a store holds the gate from
//! its epoch check to its end, so it either lands before that invalidation (which drops it)
//! or sees the new epoch and stops.
//!
//! The stores run on a thread of their own: a store waits for the page locks of the inode,
//! which a READ in flight holds until it is answered, so a FUSE worker must never store.

use super::*;
use std::os::fd::AsFd;

/// Largest file pushed, in bytes.
pub(crate) const FILE_MAX: u64 = 64 << 10;
/// Most bytes pushed for one directory.
pub(crate) const DIR_MAX: u64 = 8 << 20;
/// Directories remembered as pushed before the memory is cleared.
const REMEMBERED_MAX: usize = 1 << 16;

/// One directory's files to push, in the epoch they were chosen in.
pub(crate) struct Job {
    epoch: u64,
    dir: PathBuf,
    files: Vec<Chosen>,
}

/// A file chosen for pushing: its node, name, and the version the rules judged.
struct Chosen {
    ino: u64,
    name: OsString,
    version: Version,
}

/// What tells one version of a file from another: size, modification and change times. A
/// file edited or replaced since it was judged differs in its change time at least.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Version(u64, SystemTime, SystemTime);

impl Version {
    fn of(a: &Attr) -> Version {
        Version(a.size, a.mtime, a.ctime)
    }
}

/// Where the FUSE workers send jobs (set by the mount once its session exists).
pub(crate) type Queue = crossbeam_channel::Sender<Job>;

impl PolicyFs {
    /// After the first READ of node `ino`: queues the other small read-only files of its
    /// directory for pushing, unless that directory was pushed in this cache epoch.
    pub(super) fn prefetch_siblings(&self, ino: u64) {
        if self.opts.io_mode != IoMode::NoOpen {
            return;
        }
        let Some(queue) = self.shared.prefetch.get() else {
            return;
        };
        let Ok(path) = self.path_of(ino) else {
            return;
        };
        let Some(dir) = path.parent() else {
            return;
        };
        let epoch = self.shared.cache_epoch.load(Ordering::SeqCst);
        {
            let mut done = lock(&self.prefetched);
            if done.get(dir) == Some(&epoch) {
                return;
            }
            if done.len() >= REMEMBERED_MAX {
                done.clear();
            }
            done.insert(dir.to_path_buf(), epoch);
        }
        let Ok(listed) = self.shared.delta.list_attrs(dir) else {
            return;
        };
        let mut budget = DIR_MAX;
        let candidates: Vec<(PathBuf, OsString, Attr)> = self
            .shown_entries(dir, listed, |a| a.kind)
            .into_iter()
            .filter(|(_, _, a, level)| {
                *level == Level::Read
                    && a.kind == EntryKind::File
                    && a.layer == Layer::Lower
                    && a.size > 0
                    && a.size <= FILE_MAX
            })
            .map(|(child, name, a, _)| (child, name, a))
            .collect();
        let mut files: Vec<Chosen> = {
            let nodes = lock(&self.shared.nodes);
            candidates
                .into_iter()
                .filter_map(|(child, name, a)| {
                    let &node = nodes.by_path.get(&child)?;
                    // Only inodes the kernel holds can take pages.
                    let known = nodes.by_ino.get(&node).is_some_and(|n| n.lookups > 0);
                    (node != ino && known).then_some((node, name, a))
                })
                .take_while(|(_, _, a)| {
                    budget = budget.saturating_sub(a.size);
                    budget > 0
                })
                .map(|(node, name, a)| Chosen {
                    ino: node,
                    name,
                    version: Version::of(&a),
                })
                .collect()
        };
        // Listing order is the order a reader walks the directory in: pushing from its end
        // meets the reader once, instead of racing it for every file.
        files.reverse();
        if !files.is_empty() {
            let _ = queue.try_send(Job {
                epoch,
                dir: dir.to_path_buf(),
                files,
            });
        }
    }
}

/// Starts the thread that pushes the jobs of `shared`'s workers through `notifier`. It ends
/// when the filesystem is dropped (it holds `shared` only weakly).
pub(crate) fn start(shared: &Arc<Shared>, notifier: fuser::Notifier) {
    let (tx, rx) = crossbeam_channel::bounded::<Job>(64);
    let _ = shared.prefetch.set(tx);
    let weak = Arc::downgrade(shared);
    std::thread::Builder::new()
        .name("fuse-prefetch".into())
        .spawn(move || {
            for job in rx {
                let Some(shared) = weak.upgrade() else {
                    return;
                };
                push(&shared, &notifier, job);
            }
        })
        .map(drop)
        .unwrap_or_else(|e| warn!(error = %e, "cannot start the fuse-prefetch thread"));
}

fn push(shared: &Shared, notifier: &fuser::Notifier, job: Job) {
    let Ok(dir) = shared.delta.lower_dir(&job.dir) else {
        return;
    };
    let version = |file: &File| {
        rustix::fs::fstat(file)
            .ok()
            .map(|st| Version::of(&crate::delta::attr_of_stat(&st)))
    };
    let mut buf = Vec::with_capacity(FILE_MAX as usize + 1);
    for f in job.files {
        if shared.cache_epoch.load(Ordering::SeqCst) != job.epoch {
            return;
        }
        // The sandbox cannot write these files (only `read` ones are chosen), so the
        // codebase's copy is the one it sees.
        let Ok(fd) = crate::host::open_file_in(dir.as_fd(), &f.name) else {
            continue;
        };
        let file = File::from(fd);
        // Only the version the rules judged (a content condition is judged per version): a
        // file edited or replaced since is left to READ, which judges it again.
        if version(&file) != Some(f.version) {
            continue;
        }
        buf.clear();
        use std::io::Read;
        if (&file).take(FILE_MAX + 1).read_to_end(&mut buf).is_err()
            || buf.is_empty()
            || buf.len() as u64 > FILE_MAX
            || version(&file) != Some(f.version)
        {
            continue;
        }
        let _gate = shared.push_gate.read().unwrap_or_else(|p| p.into_inner());
        if shared.cache_epoch.load(Ordering::SeqCst) != job.epoch {
            // Something changed since the files were chosen (rules, the codebase).
            return;
        }
        // Best effort: ENOENT when the kernel forgot the inode meanwhile.
        let _ = notifier.store(INodeNo(f.ino), 0, &buf);
    }
}
