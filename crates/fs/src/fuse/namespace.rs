//! Creating, removing, renaming and listing entries; metadata changes, access, statfs.

use super::*;

impl PolicyFs {
    /// The entry of `path`, just made through this mount with attributes `attr` at the
    /// `level` [`PolicyFs::check_new`] found (its directory's times move), counted as a
    /// kernel lookup.
    fn made(&self, path: &Path, attr: &Attr, level: Level) -> Result<FileAttr, FsError> {
        lock(&self.dir_times).changed(path, true);
        self.counted_entry(path, attr, level)
    }

    /// Who a new host file should belong to: the creating process, unless every file is
    /// shown with one owner anyway. Then the host files stay the service's: the creator's uid
    /// may be a sandbox's user-namespace id that a later sandbox reuses, and nothing but the
    /// shown owner depends on it.
    pub(super) fn host_owner(&self, creator: (u32, u32)) -> Option<(u32, u32)> {
        self.opts.owner.is_none().then_some(creator)
    }

    pub(super) fn do_create(
        &self,
        owner: (u32, u32),
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
    ) -> Result<(FileAttr, File, bool), FsError> {
        if mode & libc::S_IFMT != 0 && mode & libc::S_IFMT != libc::S_IFREG {
            let (path, _) = self.check_new("mknod", parent, name, EntryKind::Other)?;
            return Err(FsError::NotSupported {
                op: "special files",
                path,
            });
        }
        let (path, level) = self.check_new("create", parent, name, EntryKind::File)?;
        self.check_open_files()?;
        let r =
            self.shared
                .delta
                .create_file(&path, mode & !umask & 0o7777, self.host_owner(owner));
        let (file, attr) = self.made_or_hidden("create", &path, r)?;
        let attr = self.made(&path, &attr, level)?;
        let write = flags & libc::O_ACCMODE != libc::O_RDONLY;
        Ok((attr, file, write))
    }

    /// A fifo or a unix socket (`bind`): made in this sandbox's layer where the rules allow
    /// writing, served by the kernel (no data passes through here), never published.
    pub(super) fn do_mknod(
        &self,
        owner: (u32, u32),
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
    ) -> Result<FileAttr, FsError> {
        let kind = if mode & libc::S_IFMT == libc::S_IFIFO {
            EntryKind::Fifo
        } else {
            EntryKind::Socket
        };
        let (path, level) = self.check_new("mknod", parent, name, kind)?;
        let r =
            self.shared
                .delta
                .mknod(&path, kind, mode & !umask & 0o7777, self.host_owner(owner));
        let attr = self.made_or_hidden("mknod", &path, r)?;
        self.made(&path, &attr, level)
    }

    pub(super) fn do_mkdir(
        &self,
        owner: (u32, u32),
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
    ) -> Result<FileAttr, FsError> {
        let (path, level) = self.check_new("mkdir", parent, name, EntryKind::Dir)?;
        let r = self
            .shared
            .delta
            .mkdir(&path, mode & !umask & 0o7777, self.host_owner(owner));
        let attr = self.made_or_hidden("mkdir", &path, r)?;
        self.made(&path, &attr, level)
    }

    pub(super) fn do_symlink(
        &self,
        owner: (u32, u32),
        parent: u64,
        name: &OsStr,
        target: &Path,
    ) -> Result<FileAttr, FsError> {
        let (path, level) = self.check_new("symlink", parent, name, EntryKind::Symlink)?;
        let r = self
            .shared
            .delta
            .symlink(&path, target, self.host_owner(owner));
        let attr = self.made_or_hidden("symlink", &path, r)?;
        self.made(&path, &attr, level)
    }

    pub(super) fn do_remove(&self, parent: u64, name: &OsStr, dir: bool) -> Result<(), FsError> {
        check_name(name)?;
        let ppath = self.path_of(parent)?;
        self.dir_shown("lookup", &ppath)?;
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
        {
            let mut times = lock(&self.dir_times);
            times.changed(&path, false);
            if dir {
                times.dir_gone(&path);
            }
        }
        lock(&self.shared.nodes).detach(&path);
        self.removed(&path, dir);
        Ok(())
    }

    pub(super) fn do_rename(
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
        let replaces = self.shared.delta.lookup(&to)?;
        match replaces {
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
        {
            let mut times = lock(&self.dir_times);
            times.changed(&from, false);
            if src.kind == EntryKind::Dir {
                times.dir_gone(&from);
            }
            if replaces.is_some() {
                times.touched(&tparent);
            } else {
                times.changed(&to, true);
            }
        }
        // A codebase file moves by copy-up: a host file cached for reading it is the old one.
        self.shared.invalidate_io(std::slice::from_ref(&from));
        lock(&self.shared.nodes).moved(&from, &to);
        // Cursors depend on paths: recompute lazily.
        lock(&self.cursors).1.clear();
        lock(&self.shared.shown).forget(&to, true);
        self.removed(&from, src.kind == EntryKind::Dir);
        Ok(())
    }

    pub(super) fn do_link(
        &self,
        ino: u64,
        newparent: u64,
        newname: &OsStr,
    ) -> Result<FileAttr, FsError> {
        let src = self.path_of(ino)?;
        let (_, d) = self.visible("link", &src)?;
        // Both names must be writable: a link must not make a second, writable name for a
        // file the rules keep read-only (or a readable one for a file they hide by name).
        if d.level < Level::Write {
            // Audited like any denial; EPERM, as link(2) answers for a file one may not write.
            self.deny("link", &src, d);
            return Err(FsError::NotPermitted {
                op: "hard link to a file this sandbox may not write",
                path: src,
            });
        }
        let (path, _) = self.check_new("link", newparent, newname, EntryKind::File)?;
        let r = self.shared.delta.link(&src, &path);
        self.made_or_hidden("link", &path, r)?;
        lock(&self.dir_times).changed(&path, true);
        self.entry(&path, true)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn do_setattr(
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
        let path = match self.path_of(ino) {
            Ok(p) => p,
            // A file unlinked while open: `ftruncate` through the descriptor still works, on
            // the host file kept for it (only when it was written through this mount).
            Err(e) => {
                let held = lock(&self.shared.io).held(ino).filter(|(_, w)| *w);
                let (Some(size), Some((file, _))) = (size, held) else {
                    return Err(e);
                };
                let before = file.metadata().ok();
                let r = file.set_len(size);
                self.charge_growth(ino, before.as_ref(), &file);
                r.map_err(|e| FsError::io("truncate", "(open file)", e))?;
                let st = rustix::fs::fstat(&*file)
                    .map_err(|e| FsError::io("fstat", "(open file)", e.into()))?;
                return Ok(self.file_attr(ino, &crate::delta::attr_of_stat(&st), Level::Write));
            }
        };
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
        lock(&self.dir_times).touched(&path);
        self.entry(&path, false)
    }

    pub(super) fn do_readlink(&self, ino: u64) -> Result<Vec<u8>, FsError> {
        let path = self.path_of(ino)?;
        let (_, d) = self.visible("readlink", &path)?;
        self.require("readlink", &path, d, Level::Read)?;
        self.shared.delta.readlink(&path)
    }

    /// [`Self::listing`] and the index of its first entry at `offset`; reaching the end of
    /// it forgets it (the next listing at offset 0 starts a new one).
    pub(super) fn listing_at(
        &self,
        ino: u64,
        offset: u64,
    ) -> Result<(Arc<Listing>, usize), FsError> {
        let entries = self.listing(ino, offset)?;
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        if start >= entries.len() {
            lock(&self.listings).remove(&ino);
        }
        Ok((entries, start))
    }

    /// The listing of directory `ino` for a READDIR at `offset`: built afresh at offset 0
    /// (a new listing), else the one being read.
    pub(super) fn listing(&self, ino: u64, offset: u64) -> Result<Arc<Listing>, FsError> {
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
        let (_, gen_) = self.shared.policy();
        let listed = self.shared.delta.list_attrs(&path)?;
        let shown = self.shown_entries(&path, listed, |a| a.kind);
        // The names the sandbox now knows: what the directory's times are judged against.
        let names = dirtimes::fingerprint(shown.iter().map(|(_, n, _, _)| n.as_os_str()));
        lock(&self.dir_times).settle(&path, gen_, (attr.mtime, attr.ctime), names);
        let mut entries = Vec::with_capacity(shown.len() + 2);
        for name in [".", ".."] {
            entries.push(Listed {
                ino,
                kind: FileType::Directory,
                name: OsString::from(name),
                shown: None,
            });
        }
        let mut nodes = lock(&self.shared.nodes);
        for (child, name, attr, level) in shown {
            entries.push(Listed {
                ino: nodes.get_or_insert(&child),
                kind: file_type(attr.kind),
                name,
                shown: Some((attr, level)),
            });
        }
        drop(nodes);
        let entries = Arc::new(entries);
        lock(&self.listings).insert(ino, entries.clone());
        Ok(entries)
    }

    pub(super) fn do_access(&self, ino: u64, mask: AccessFlags) -> Result<(), FsError> {
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

    /// Sets or removes a `user.*` attribute (write level; other namespaces are refused).
    pub(super) fn do_setxattr(
        &self,
        ino: u64,
        name: &OsStr,
        what: XattrWrite<'_>,
    ) -> Result<(), FsError> {
        let path = self.path_of(ino)?;
        let (_, d) = self.visible("setxattr", &path)?;
        self.require("setxattr", &path, d, Level::Write)?;
        // A changed file is copied up: a host file cached for reading it is the old one.
        self.shared.invalidate_io(std::slice::from_ref(&path));
        self.shared.delta.xattr_write(&path, name, what)
    }

    /// A `user.*` attribute's value (read level).
    pub(super) fn do_getxattr(&self, ino: u64, name: &OsStr) -> Result<Vec<u8>, FsError> {
        let path = self.path_of(ino)?;
        let (_, d) = self.visible("getxattr", &path)?;
        self.require("getxattr", &path, d, Level::Read)?;
        self.shared.delta.xattr_get(&path, name)
    }

    /// The `user.*` attribute names, each followed by a NUL (read level).
    pub(super) fn do_listxattr(&self, ino: u64) -> Result<Vec<u8>, FsError> {
        let path = self.path_of(ino)?;
        let (_, d) = self.visible("listxattr", &path)?;
        self.require("listxattr", &path, d, Level::Read)?;
        let mut out = Vec::new();
        for n in self.shared.delta.xattr_list(&path)? {
            out.extend_from_slice(&n);
            out.push(0);
        }
        Ok(out)
    }

    /// (total blocks, free blocks, total files, free files, block size): the host file
    /// system's free space, or the disk quota where one is set (never more than the host has).
    pub(super) fn do_statfs(&self) -> Result<(u64, u64, u64, u64, u32), FsError> {
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
