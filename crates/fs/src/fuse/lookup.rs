//! Paths, the rules' decisions, denials, attributes and lookups.

use super::*;

impl PolicyFs {
    pub(super) fn path_of(&self, ino: u64) -> Result<PathBuf, FsError> {
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
    pub(super) fn cursor(&self, policy: &Policy, gen_: u64, path: &Path) -> Cursor {
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
    pub(super) fn decision(&self, path: &Path, kind: EntryKind) -> Decision {
        let (policy, gen_) = self.shared.policy();
        let c = self.cursor(&policy, gen_, path);
        self.decide(&policy, &c, path, kind)
    }

    /// The decision for `path` (cursor `c`) in this mount's merged view: a directory shown
    /// only for traversal must hold something visible (see [`shown`]), and a content
    /// condition is judged on the file (see [`content`]).
    pub(super) fn decide(
        &self,
        policy: &Policy,
        c: &Cursor,
        path: &Path,
        kind: EntryKind,
    ) -> Decision {
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
    pub(super) fn removed(&self, path: &Path, dir: bool) {
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
    pub(super) fn deny(&self, op: &'static str, path: &Path, d: Decision) -> FsError {
        self.deny_at(op, path, d, false)
    }

    /// [`Self::deny`] for a path about to be created (create, mkdir, symlink, link, rename
    /// target): a hidden entry there must look like a missing one in a place where writing
    /// is denied, so always EACCES, never ENOENT.
    pub(super) fn deny_new(&self, op: &'static str, path: &Path, d: Decision) -> FsError {
        self.deny_at(op, path, d, true)
    }

    pub(super) fn deny_at(
        &self,
        op: &'static str,
        path: &Path,
        d: Decision,
        new_path: bool,
    ) -> FsError {
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
    pub(super) fn visible(
        &self,
        op: &'static str,
        path: &Path,
    ) -> Result<(Attr, Decision), FsError> {
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

    pub(super) fn require(
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

    /// Refuses `op` in directory `path` (one the kernel knows) if the rules hide it. Whether
    /// it still exists is left to the delta, which finds out under its lock anyway.
    pub(super) fn dir_shown(&self, op: &'static str, path: &Path) -> Result<(), FsError> {
        let d = self.decision(path, EntryKind::Dir);
        if d.level == Level::None {
            return Err(self.deny(op, path, d));
        }
        Ok(())
    }

    /// For a new entry: the parent must be a visible directory and the new path writable.
    /// An existing hidden entry is reported exactly like a missing one in a denied place.
    /// Returns the path and the level the rules give it.
    pub(super) fn check_new(
        &self,
        op: &'static str,
        parent: u64,
        name: &OsStr,
        kind: EntryKind,
    ) -> Result<(PathBuf, Level), FsError> {
        check_name(name)?;
        let ppath = self.path_of(parent)?;
        self.dir_shown(op, &ppath)?;
        let path = ppath.join(name);
        let d = self.decision(&path, kind);
        if d.level >= Level::Write {
            // Whether something is there already is the delta's to find out when it makes
            // the entry; `made_or_hidden` keeps a hidden one hidden.
            return Ok((path, d.level));
        }
        match self.shared.delta.lookup(&path)? {
            Some(a) => Err(self.exists_or_hidden(op, path, a.kind)),
            None => Err(self.deny_new(op, &path, d)),
        }
    }

    /// The error for new entry `path` when an entry of `kind` is there already: it exists,
    /// unless the rules hide it, which makes this a denial like any other in a place the
    /// rules hide.
    fn exists_or_hidden(&self, op: &'static str, path: PathBuf, kind: EntryKind) -> FsError {
        let d = self.decision(&path, kind);
        if d.level == Level::None {
            return self.deny_new(op, &path, d);
        }
        FsError::Exists { path }
    }

    /// `r`, the result of making new entry `path` (passed by [`PolicyFs::check_new`]), with
    /// an entry found there already judged by [`PolicyFs::exists_or_hidden`].
    pub(super) fn made_or_hidden<T>(
        &self,
        op: &'static str,
        path: &Path,
        r: Result<T, FsError>,
    ) -> Result<T, FsError> {
        match r {
            Err(FsError::Exists { .. }) => match self.shared.delta.lookup(path)? {
                Some(a) => Err(self.exists_or_hidden(op, path.to_path_buf(), a.kind)),
                // Gone again meanwhile: it was there, and nothing new was made.
                None => Err(FsError::Exists { path: path.into() }),
            },
            r => r,
        }
    }

    pub(super) fn file_attr(&self, ino: u64, a: &Attr, level: Level) -> FileAttr {
        let mut perm = a.perm;
        // The mount uses `default_permissions`: the kernel refuses an open for writing (or
        // any open of a `view` file) from these bits, before a shared mapping can change a
        // cached page. Directories keep the host's bits: what may be created or removed in
        // them is decided by the rules per name (and audited), so `cp -r` of the workspace
        // gives an ordinary tree.
        if level < Level::Write && a.kind != EntryKind::Dir {
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

    pub(super) fn entry(&self, path: &Path, count_lookup: bool) -> Result<FileAttr, FsError> {
        let (attr, d) = self.visible("lookup", path)?;
        if count_lookup {
            return self.counted_entry(path, &attr, d.level);
        }
        let ino = lock(&self.shared.nodes).get_or_insert(path);
        self.shown_attr(ino, path, &attr, d.level)
    }

    /// The entry of visible `path` (attributes `attr`, level `level`) handed to the kernel,
    /// which counts it as one more lookup of its node.
    pub(super) fn counted_entry(
        &self,
        path: &Path,
        attr: &Attr,
        level: Level,
    ) -> Result<FileAttr, FsError> {
        let ino = {
            let mut nodes = lock(&self.shared.nodes);
            let ino = nodes.get_or_insert(path);
            if let Some(n) = nodes.by_ino.get_mut(&ino) {
                n.lookups += 1;
            }
            ino
        };
        self.shown_attr(ino, path, attr, level)
    }

    /// The attributes and level of `path` now, `None` if it is gone or hidden (nothing
    /// audited: this is a listing, not an access).
    pub(super) fn current(&self, path: &Path) -> Option<(Attr, Level)> {
        let attr = self.shared.delta.lookup(path).ok()??;
        let level = self.decision(path, attr.kind).level;
        (level != Level::None).then_some((attr, level))
    }

    /// The attributes node `ino` at `path` is shown with.
    pub(super) fn shown_attr(
        &self,
        ino: u64,
        path: &Path,
        attr: &Attr,
        level: Level,
    ) -> Result<FileAttr, FsError> {
        let mut fa = self.file_attr(ino, attr, level);
        if attr.kind == EntryKind::Dir {
            (fa.mtime, fa.ctime) = self.dir_times_shown(path, (attr.mtime, attr.ctime))?;
        }
        Ok(fa)
    }

    /// The times directory `path` is shown with: its real ones only once something the
    /// sandbox can see in it changed (`dirtimes`).
    fn dir_times_shown(
        &self,
        path: &Path,
        real: dirtimes::Times,
    ) -> Result<dirtimes::Times, FsError> {
        let (_, gen_) = self.shared.policy();
        if let dirtimes::Shown::Times(t) = lock(&self.dir_times).shown(path, gen_, real) {
            return Ok(t);
        }
        let children = self.visible_children(path)?;
        let names = dirtimes::fingerprint(children.iter().map(|(_, _, n)| n.as_os_str()));
        Ok(lock(&self.dir_times).settle(path, gen_, real, names))
    }

    /// The entries of directory `path` the sandbox can see: (path, kind, name).
    pub(super) fn visible_children(
        &self,
        path: &Path,
    ) -> Result<Vec<(PathBuf, EntryKind, OsString)>, FsError> {
        let listing = self.shared.delta.list(path)?;
        Ok(self
            .shown_entries(path, listing, |k| *k)
            .into_iter()
            .map(|(child, name, kind, _)| (child, kind, name))
            .collect())
    }

    /// Of the entries of directory `path` (each with its kind by `kind`), those the sandbox
    /// can see: (path, name, entry, level).
    pub(super) fn shown_entries<T>(
        &self,
        path: &Path,
        entries: Vec<(OsString, T)>,
        kind: impl Fn(&T) -> EntryKind,
    ) -> Vec<(PathBuf, OsString, T, Level)> {
        let (policy, gen_) = self.shared.policy();
        let parent_cursor = self.cursor(&policy, gen_, path);
        let mut shown = Vec::with_capacity(entries.len());
        for (name, entry) in entries {
            let c = policy.cursor_child(&parent_cursor, &name.to_string_lossy());
            let child = path.join(&name);
            let level = self.decide(&policy, &c, &child, kind(&entry)).level;
            if level != Level::None {
                shown.push((child, name, entry, level));
            }
        }
        shown
    }

    pub(super) fn do_lookup(&self, parent: u64, name: &OsStr) -> Result<FileAttr, FsError> {
        check_name(name).map_err(|_| FsError::NotFound { path: name.into() })?;
        let ppath = self.path_of(parent)?;
        // The parent is a directory the kernel holds: only whether the rules still let the
        // sandbox see it is asked (a parent gone or replaced since fails the child's own
        // lookup), which spares two host lookups per name.
        let d = self.decision(&ppath, EntryKind::Dir);
        if d.level == Level::None {
            return Err(self.deny("lookup", &ppath, d));
        }
        self.entry(&ppath.join(name), true)
    }

    pub(super) fn do_getattr(&self, ino: u64, fh: Option<FileHandle>) -> Result<FileAttr, FsError> {
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
}
