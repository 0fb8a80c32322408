//! State shared between the FUSE threads and the mount handle.

use super::*;

/// State shared between the FUSE threads and the [`crate::MountHandle`].
pub(crate) struct Shared {
    pub(crate) delta: Delta,
    pub(crate) audit: Auditor,
    pub(crate) policy: RwLock<(Arc<Policy>, u64)>,
    pub(crate) nodes: Mutex<Nodes>,
    pub(super) handles: Mutex<HashMap<u64, Handle>>,
    pub(super) next_fh: AtomicU64,
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
    /// Moves whenever the kernel is told to drop cached pages for a change (a publish, an
    /// upload, new rules), before it is told: see [`prefetch`].
    pub(crate) cache_epoch: AtomicU64,
    /// Held (shared) by the pusher from its epoch check to the end of its store, and
    /// (exclusive) to move [`Shared::cache_epoch`]: no store lands after a change's
    /// invalidation began unless it saw the new epoch.
    pub(crate) push_gate: RwLock<()>,
    /// Where READs queue a directory's files for pushing (set by the mount, see [`prefetch`]).
    pub(crate) prefetch: OnceLock<prefetch::Queue>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
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
            cache_epoch: AtomicU64::new(0),
            push_gate: RwLock::new(()),
            prefetch: OnceLock::new(),
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
