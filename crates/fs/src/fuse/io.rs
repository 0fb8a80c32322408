//! Opening, reading, writing and closing files: handles, the I/O cache, passthrough.

use super::*;

impl PolicyFs {
    /// Refuses a new handle (EMFILE inside this sandbox only) once the sandbox holds
    /// `max_open_files` host files through the daemon: the daemon shares its process's
    /// descriptor table with every other sandbox and the API.
    pub(super) fn check_open_files(&self) -> Result<(), FsError> {
        let limit = self.opts.max_open_files;
        // One lock at a time (no lock order to keep).
        let handles = lock(&self.shared.handles).len();
        let held = {
            let mut io = lock(&self.shared.io);
            // Cached files are only a shortcut: give them up before refusing anything.
            io.shrink_to(limit.saturating_sub(handles + 1));
            handles + io.len()
        };
        if held >= limit {
            self.shared.audit.limit_exceeded(
                "open_files",
                format!("{held} host files held for this sandbox; limit {limit}"),
            );
            return Err(FsError::TooManyOpenFiles { limit });
        }
        Ok(())
    }

    pub(super) fn add_handle(&self, h: Handle) -> u64 {
        let fh = self.shared.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.shared.handles).insert(fh, h);
        fh
    }

    /// The path that decides I/O on `ino`, and whether the node still has it (a detached
    /// node answers with the path it had).
    pub(super) fn io_path(&self, ino: u64) -> Result<(PathBuf, bool), FsError> {
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
    pub(super) fn io_file(&self, ino: u64, write: bool) -> Result<Arc<File>, FsError> {
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
    pub(super) fn io_allowed(&self, ino: u64, write: bool) -> Result<(PathBuf, bool), FsError> {
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
    pub(super) fn pin_before_removal(
        &self,
        path: &Path,
        attr: &Attr,
    ) -> Result<Option<(u64, bool)>, FsError> {
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
            Layer::Upper => delta.open_upper(path).ok().map(|f| (f, true)),
            Layer::Lower => delta.open_read(path).ok().map(|(f, _)| (f, false)),
        });
        Ok(Some((ino, attr.layer == Layer::Upper)))
    }

    /// After a removal detached the delta file pinned for `ino`: its data stays on disk while
    /// the kernel holds it, so it stays charged to the quota until FORGET.
    pub(super) fn charge_detached(&self, pinned: Option<(u64, bool)>) {
        let Some((ino, true)) = pinned else { return };
        let Some(file) = lock(&self.shared.io).charge_detached(ino) else {
            return;
        };
        if let Ok(m) = file.metadata() {
            let bytes = allocated(std::os::unix::fs::MetadataExt::blocks(&m));
            self.shared.delta.usage().hold_detached(bytes);
        }
    }

    pub(super) fn finish_create(
        &self,
        reply: ReplyCreate,
        ttl: Duration,
        attr: FileAttr,
        file: File,
        write: bool,
    ) {
        if self.opts.io_mode == IoMode::NoOpen {
            // Once OPEN has been refused, the kernel sends no RELEASE for files made by CREATE
            // either (measured: not one for thousands of `tar x` files), so a handle would hold
            // its host file until unmount, and a sandbox that had created `max_open_files`
            // files could create no more. The file is served by inode like any other, from
            // the I/O cache (bounded, evicting): no handle.
            lock(&self.shared.io).insert(attr.ino.0, Arc::new(file), write);
            reply.created(
                &ttl,
                &attr,
                Generation(0),
                FileHandle(0),
                FopenFlags::FOPEN_DIRECT_IO,
            );
            return;
        }
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
    pub(super) fn do_open(
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
    pub(super) fn check_writable(&self, ino: u64) -> Result<(), FsError> {
        match lock(&self.pt).get(&ino).and_then(|st| st.backing.as_ref()) {
            Some(w) if w.strong_count() > 0 => Err(FsError::Busy { ino }),
            _ => Ok(()),
        }
    }

    /// The passthrough backing for a new open of `ino` on host file `file`, or `None` to serve
    /// it through the page cache (counted as a cached open). A live backing is shared by every
    /// open of the inode: new readers of a codebase file that another sandbox replaced in the
    /// meantime read the version the open readers have, until they all close.
    pub(super) fn pt_backing(
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
    pub(super) fn do_release(&self, fh: u64) {
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

    /// The host file behind `fh` if it is a CREATE handle (writable if `write`).
    pub(super) fn created_file(&self, fh: FileHandle, write: bool) -> Option<Arc<File>> {
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
    pub(super) fn io_target(
        &self,
        ino: u64,
        fh: FileHandle,
        write: bool,
    ) -> Result<Arc<File>, FsError> {
        if fh.0 != 0
            && let Some(file) = self.created_file(fh, write)
        {
            self.io_allowed(ino, write)?;
            Ok(file)
        } else {
            self.io_file(ino, write)
        }
    }

    pub(super) fn do_read(
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

    pub(super) fn do_write(
        &self,
        ino: u64,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
    ) -> Result<u32, FsError> {
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

    /// `fallocate(2)` on a file the sandbox may write (its copy in this sandbox's layer),
    /// charged to the disk quota like a write: refused (ENOSPC) up front when the range it may
    /// allocate does not fit.
    pub(super) fn do_fallocate(
        &self,
        ino: u64,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
    ) -> Result<(), FsError> {
        use rustix::fs::FallocateFlags as F;
        let _gate = self
            .shared
            .write_gate
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let file = self.io_target(ino, fh, true)?;
        let flags = F::from_bits_retain(u32::try_from(mode).unwrap_or(u32::MAX));
        if !flags.intersects(F::PUNCH_HOLE | F::COLLAPSE_RANGE) {
            self.shared.delta.usage().check_room(length, 0)?;
        }
        let before = file.metadata().ok();
        let r = rustix::fs::fallocate(&*file, flags, offset, length);
        self.charge_growth(ino, before.as_ref(), &file);
        r.map_err(|e| FsError::io("fallocate", "(open file)", e.into()))
    }

    /// Charges to the disk quota what host file `file` of `ino` allocates now beyond what it
    /// did `before` (negative when it shrank).
    pub(super) fn charge_growth(&self, ino: u64, before: Option<&std::fs::Metadata>, file: &File) {
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

    pub(super) fn do_fsync(&self, ino: u64, fh: FileHandle, datasync: bool) -> Result<(), FsError> {
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
}
