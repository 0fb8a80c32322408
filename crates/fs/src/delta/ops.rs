//! The operations on the merged view: copy-up, create, remove, rename, metadata changes.

use super::*;

impl Delta {
    /// Makes sure `rel` exists in the upper layer (copying it up from the codebase with its
    /// mode, owner and times if needed). Returns its kind.
    pub(super) fn copy_up_locked(&self, meta: &mut Meta, rel: &Path) -> Result<EntryKind, FsError> {
        self.copy_up_with(meta, rel, true)
    }

    /// [`Self::copy_up_locked`], skipping the data when the caller truncates anyway.
    pub(super) fn copy_up_with(
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
            EntryKind::Dir => {
                match rustix::fs::mkdirat(&pdir, name, mode) {
                    Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                    Err(e) => return Err(io(e)),
                }
                if let (Ok(src), Ok(dst)) = (
                    host::open_dir_read(self.lower.as_fd(), rel),
                    host::open_dir_read(self.upper.as_fd(), rel),
                ) {
                    super::xattr::copy_user(src.as_fd(), dst.as_fd());
                }
            }
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
                if !with_data {
                    super::xattr::copy_user(src.as_fd(), dst.as_fd());
                }
                let res = copy_contents(with_data.then_some(src), dst, &lower_st);
                if let Err(e) = res.and_then(|()| {
                    rustix::fs::renameat(&self.work, &tmp, &pdir, name).map_err(Into::into)
                }) {
                    let _ = rustix::fs::unlinkat(&self.work, &tmp, AtFlags::empty());
                    return Err(FsError::io("copy-up", rel, e));
                }
            }
            EntryKind::Other | EntryKind::Fifo | EntryKind::Socket => {
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
    pub(super) fn stage_copy_up(&self, rel: &Path) {
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
    pub(super) fn copy_up_raw(&self, rel: &Path) -> Result<EntryKind, FsError> {
        check_rel(rel)?;
        self.stage_copy_up(rel);
        let mut meta = self.lock();
        let kind = self.copy_up_locked(&mut meta, rel)?;
        self.mark_dirty(&mut meta, rel)?;
        Ok(kind)
    }

    /// Opens regular file `rel` for writing (read-write), copying it up first.
    pub(super) fn open_write_raw(&self, rel: &Path, truncate: bool) -> Result<File, FsError> {
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
    pub(super) fn note_created(&self, meta: &mut Meta, rel: &Path) -> Result<(), FsError> {
        if meta.whiteouts.remove(rel) {
            meta.opaque.insert(rel.to_path_buf());
        }
        meta.dirty.insert(rel.to_path_buf());
        self.save(meta)
    }

    /// The directory a new entry `rel` goes into, in this sandbox's layer (made and charged
    /// if needed), once `rel` is known not to exist and its parent to be a directory in the
    /// merged view.
    pub(super) fn prepare_new(&self, meta: &Meta, rel: &Path) -> Result<OwnedFd, FsError> {
        refuse_stage_name(rel)?;
        if self.lookup_locked(meta, rel)?.is_some() {
            return Err(FsError::Exists { path: rel.into() });
        }
        let (parent, _) = host::split(rel).map_err(|e| FsError::io("create", rel, e))?;
        // Usually the directory is in this layer already, which makes it the merged view's
        // directory (this layer wins): one resolution instead of a lookup in each layer.
        if let Ok(pdir) = host::open_dir(self.upper.as_fd(), parent) {
            return Ok(pdir);
        }
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
        self.upper_dir(parent)
    }

    /// Makes new entry `rel` (which must not exist) with `make(its directory, its name)` in
    /// this sandbox's layer, gives it to `owner` when one is set, records it, and charges it
    /// and its directory's growth to the disk quota. Returns what `make` gave and the new
    /// entry's attributes.
    fn new_entry<T>(
        &self,
        op: &'static str,
        rel: &Path,
        owner: Option<(u32, u32)>,
        make: impl FnOnce(&OwnedFd, &OsStr) -> rustix::io::Result<T>,
    ) -> Result<(T, Attr), FsError> {
        check_rel(rel)?;
        self.usage.check_room(0, 1)?;
        let (_, name) = host::split(rel).map_err(|e| FsError::io(op, rel, e))?;
        let mut meta = self.lock();
        let pdir = self.prepare_new(&meta, rel)?;
        let dir_before = fd_footprint(&pdir);
        let made = make(&pdir, name).map_err(|e| FsError::io(op, rel, e.into()))?;
        chown_new(&pdir, name, owner);
        // Made: from here on it is charged and recorded whatever else fails.
        let st = rustix::fs::statat(&pdir, name, AtFlags::SYMLINK_NOFOLLOW);
        let entry = st.as_ref().map_or((0, 1), footprint_of);
        let dir_after = fd_footprint(&pdir);
        self.usage.charge(
            dir_after.0 - dir_before.0 + entry.0,
            dir_after.1 - dir_before.1 + entry.1,
        );
        self.note_created(&mut meta, rel)?;
        let st = st.map_err(|e| FsError::io(op, rel, e.into()))?;
        Ok((made, Attr::from_stat(Layer::Upper, &st)))
    }

    /// Creates regular file `rel` (which must not exist) with `mode`, owned by `owner` when
    /// given, and opens it read-write.
    pub fn create_file(
        &self,
        rel: &Path,
        mode: u32,
        owner: Option<(u32, u32)>,
    ) -> Result<(File, Attr), FsError> {
        let mode = Mode::from_raw_mode(agent_mode(mode, EntryKind::File));
        let (fd, attr) = self.new_entry("create file", rel, owner, |pdir, name| {
            let fd = rustix::fs::openat(
                pdir,
                name,
                OFlags::CREATE | OFlags::EXCL | OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                mode,
            )?;
            // The umask already applied; set the exact bits the kernel asked for.
            let _ = rustix::fs::fchmod(&fd, mode);
            Ok(fd)
        })?;
        Ok((File::from(fd), attr))
    }

    /// Creates directory `rel`.
    pub fn mkdir(&self, rel: &Path, mode: u32, owner: Option<(u32, u32)>) -> Result<Attr, FsError> {
        let mode = Mode::from_raw_mode(agent_mode(mode, EntryKind::Dir));
        let ((), attr) = self.new_entry("mkdir", rel, owner, |pdir, name| {
            rustix::fs::mkdirat(pdir, name, mode)
        })?;
        Ok(attr)
    }

    /// Creates symlink `rel` pointing at `target` (stored verbatim, never resolved here).
    pub fn symlink(
        &self,
        rel: &Path,
        target: &Path,
        owner: Option<(u32, u32)>,
    ) -> Result<Attr, FsError> {
        let ((), attr) = self.new_entry("symlink", rel, owner, |pdir, name| {
            rustix::fs::symlinkat(target, pdir, name)
        })?;
        Ok(attr)
    }

    /// Makes fifo or socket node `rel` (which must not exist).
    pub fn mknod(
        &self,
        rel: &Path,
        kind: EntryKind,
        mode: u32,
        owner: Option<(u32, u32)>,
    ) -> Result<Attr, FsError> {
        let file_type = match kind {
            EntryKind::Fifo => rustix::fs::FileType::Fifo,
            EntryKind::Socket => rustix::fs::FileType::Socket,
            _ => {
                return Err(FsError::NotSupported {
                    op: "special files",
                    path: rel.into(),
                });
            }
        };
        let mode = Mode::from_raw_mode(mode & 0o777);
        let ((), attr) = self.new_entry("mknod", rel, owner, |pdir, name| {
            rustix::fs::mknodat(pdir, name, file_type, mode, 0)
        })?;
        Ok(attr)
    }

    /// Makes `to` (which must not exist) a hard link to the file or symlink `from`, both in
    /// this sandbox's layer: a codebase file is copied up first, so the codebase's own links
    /// are never touched.
    pub(super) fn link_raw(&self, from: &Path, to: &Path) -> Result<(), FsError> {
        check_rel(from)?;
        check_rel(to)?;
        let mut meta = self.lock();
        let kind = self.copy_up_locked(&mut meta, from)?;
        if kind == EntryKind::Dir {
            return Err(FsError::NotPermitted {
                op: "hard link to a directory",
                path: from.into(),
            });
        }
        let pdir = self.prepare_new(&meta, to)?;
        let (fparent, fname) = host::split(from).map_err(|e| FsError::io("link", from, e))?;
        let (_, tname) = host::split(to).map_err(|e| FsError::io("link", to, e))?;
        let fdir = self.upper_dir(fparent)?;
        rustix::fs::linkat(&fdir, fname, &pdir, tname, AtFlags::empty())
            .map_err(|e| FsError::io("link", to, e.into()))?;
        // Both names are published together, so that they stay one file in the codebase.
        meta.dirty.insert(from.to_path_buf());
        self.note_created(&mut meta, to)
    }

    pub(super) fn lower_entry(&self, meta: &Meta, rel: &Path) -> Option<Stat> {
        if !meta.lower_visible(rel) {
            return None;
        }
        host::lstat(self.lower.as_fd(), rel).ok()
    }

    /// Removes `rel` (already checked to exist and to be of the right type, and to be empty
    /// when a directory). Returns the change of the upper layer's footprint (bytes, entries):
    /// the entry's and its directory's, read around the removal.
    pub(super) fn remove_locked(
        &self,
        meta: &mut Meta,
        rel: &Path,
        attr: &Attr,
    ) -> Result<(i64, i64), FsError> {
        let lower = self.lower_entry(meta, rel);
        let mut freed = (0, 0);
        if attr.layer == Layer::Upper {
            let (parent, name) = host::split(rel).map_err(|e| FsError::io("remove", rel, e))?;
            let pdir = host::open_dir(self.upper.as_fd(), parent)
                .map_err(|e| FsError::io("open upper directory", parent, e))?;
            let dir_before = fd_footprint(&pdir);
            let entry = rustix::fs::statat(&pdir, name, AtFlags::SYMLINK_NOFOLLOW)
                .map_or((0, 0), |st| footprint_of(&st));
            host::remove_at(pdir.as_fd(), name, attr.kind == EntryKind::Dir)
                .map_err(|e| FsError::io("remove", rel, e))?;
            let dir_after = fd_footprint(&pdir);
            freed = (
                dir_after.0 - dir_before.0 - entry.0,
                dir_after.1 - dir_before.1 - entry.1,
            );
        }
        meta.opaque.remove(rel);
        if let Some(st) = lower {
            meta.origins.insert_if_absent(rel, || Origin::of(&st));
            meta.whiteouts.insert(rel.to_path_buf());
        } else {
            meta.origins.remove(rel);
        }
        meta.dirty.insert(rel.to_path_buf());
        self.save(meta)?;
        Ok(freed)
    }

    /// Deletes non-directory `rel`.
    pub(super) fn unlink_raw(&self, rel: &Path) -> Result<(i64, i64), FsError> {
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
    pub(super) fn rmdir_raw(&self, rel: &Path) -> Result<(i64, i64), FsError> {
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
    pub(super) fn has_lower_part(&self, meta: &Meta, rel: &Path) -> bool {
        self.lower_entry(meta, rel).is_some() && !meta.opaque.contains(rel)
    }

    /// Every upper path at or below `rel`.
    pub(super) fn upper_subtree(&self, rel: &Path, out: &mut Vec<PathBuf>) {
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
    pub(super) fn rename_raw(&self, from: &Path, to: &Path) -> Result<(), FsError> {
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
            // The caller's accounting reads the footprint around the whole rename.
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
    pub(super) fn set_mode_raw(&self, rel: &Path, mode: u32) -> Result<(), FsError> {
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

    /// Sets the times of `rel` in this sandbox's layer if it is there already (which makes
    /// it the merged view's entry), under the lock. `Ok(false)`: not there, nothing done.
    fn set_times_in_upper(&self, rel: &Path, times: &Timestamps) -> Result<bool, FsError> {
        let (parent, name) = if rel.as_os_str().is_empty() {
            (Path::new(""), OsStr::new("."))
        } else {
            host::split(rel).map_err(|e| FsError::io("utimes", rel, e))?
        };
        let mut meta = self.lock();
        let pdir = match host::open_dir(self.upper.as_fd(), parent) {
            Ok(d) => d,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(false),
            Err(e) => return Err(FsError::io("open upper directory", parent, e)),
        };
        match rustix::fs::utimensat(&pdir, name, times, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(()) => {}
            Err(rustix::io::Errno::NOENT) => return Ok(false),
            Err(e) => return Err(FsError::io("utimes", rel, e.into())),
        }
        self.mark_dirty(&mut meta, rel)?;
        Ok(true)
    }

    /// Sets the times of `rel`, copying it up first if it is the codebase's.
    pub(super) fn set_times_raw(&self, rel: &Path, times: &Timestamps) -> Result<(), FsError> {
        self.stage_copy_up(rel);
        {
            let mut meta = self.lock();
            self.copy_up_locked(&mut meta, rel)?;
        }
        // In this layer now, unless removed meanwhile.
        if self.set_times_in_upper(rel, times)? {
            Ok(())
        } else {
            Err(FsError::NotFound { path: rel.into() })
        }
    }

    /// truncate: copies up and sets the size.
    pub(super) fn truncate_raw(&self, rel: &Path, size: u64) -> Result<(), FsError> {
        let f = self.open_write_raw(rel, size == 0)?;
        f.set_len(size).map_err(|e| FsError::io("truncate", rel, e))
    }

    /// `copy_up_raw`, charged to the disk quota.
    pub fn copy_up(&self, rel: &Path) -> Result<EntryKind, FsError> {
        self.accounted(&[rel], &[], || self.copy_up_raw(rel))
    }

    /// `open_write_raw`, charged to the disk quota.
    pub fn open_write(&self, rel: &Path, truncate: bool) -> Result<File, FsError> {
        self.accounted(&[rel], &[], || self.open_write_raw(rel, truncate))
    }

    /// `unlink_raw`, charged to the disk quota.
    pub fn unlink(&self, rel: &Path) -> Result<(), FsError> {
        let (bytes, entries) = self.removing(|| self.unlink_raw(rel))?;
        self.usage.charge(bytes, entries);
        Ok(())
    }

    /// `rmdir_raw`, charged to the disk quota.
    pub fn rmdir(&self, rel: &Path) -> Result<(), FsError> {
        let (bytes, entries) = self.removing(|| self.rmdir_raw(rel))?;
        self.usage.charge(bytes, entries);
        Ok(())
    }

    /// `rename_raw`, charged to the disk quota.
    pub fn rename(&self, from: &Path, to: &Path) -> Result<(), FsError> {
        self.removing(|| {
            self.measured(&[from, to], &[parent_of(from), parent_of(to)], || {
                self.rename_raw(from, to)
            })
        })
    }

    /// `set_mode_raw`, charged to the disk quota.
    pub fn set_mode(&self, rel: &Path, mode: u32) -> Result<(), FsError> {
        self.accounted(&[rel], &[], || self.set_mode_raw(rel, mode))
    }

    /// `truncate_raw`, charged to the disk quota.
    pub fn truncate(&self, rel: &Path, size: u64) -> Result<(), FsError> {
        self.accounted(&[rel], &[], || self.truncate_raw(rel, size))
    }

    /// `link_raw`, charged to the disk quota: the copy-up of a codebase file, the new entry
    /// and its directory (the file's blocks stay charged once, see `Delta::footprint`).
    pub fn link(&self, from: &Path, to: &Path) -> Result<(), FsError> {
        self.usage.check_room(0, 1)?;
        // A name in the way is found before the copy-up, which would otherwise be left behind
        // (charged, and shown as a change) by a link that fails.
        check_rel(to)?;
        if self.lookup_locked(&self.lock(), to)?.is_some() {
            return Err(FsError::Exists { path: to.into() });
        }
        self.accounted(&[from], &[], || self.copy_up_raw(from))?;
        self.accounted(&[], &[parent_of(to)], || self.link_raw(from, to))?;
        self.usage.charge(0, 1);
        Ok(())
    }

    /// Sets the access and modification times of `rel` (`None`: left as they are). Times
    /// take no room: only a copy-up is charged to the disk quota.
    pub fn set_times(
        &self,
        rel: &Path,
        atime: Option<SystemTime>,
        mtime: Option<SystemTime>,
    ) -> Result<(), FsError> {
        check_rel(rel)?;
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
        if self.set_times_in_upper(rel, &times)? {
            return Ok(());
        }
        self.accounted(&[rel], &[], || self.set_times_raw(rel, &times))
    }
}
