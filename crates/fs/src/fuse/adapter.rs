//! The `fuser::Filesystem` adapter: each method calls an inner `do_*` and replies once.

use super::*;

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
        // READDIRPLUS for every listing the kernel does not have cached (no-opendir mode
        // caches listings): a first pass over a tree gets each directory's names and
        // attributes in one round trip instead of a LOOKUP per name.
        if config
            .add_capabilities(InitFlags::FUSE_DO_READDIRPLUS)
            .is_err()
        {
            debug!("kernel without READDIRPLUS");
        }
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
        crate::counters::count("lookup");
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
        crate::counters::count("getattr");
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
        crate::counters::count("setattr");
        match self.do_setattr(ino.0, mode, uid, gid, size, atime, mtime, fh) {
            Ok(a) => reply.attr(&self.opts.attr_ttl, &a),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        crate::counters::count("readlink");
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
        crate::counters::count("mknod");
        let made = match mode & libc::S_IFMT {
            libc::S_IFIFO | libc::S_IFSOCK => {
                self.do_mknod((req.uid(), req.gid()), parent.0, name, mode, umask)
            }
            _ => self
                .do_create(
                    (req.uid(), req.gid()),
                    parent.0,
                    name,
                    mode,
                    umask,
                    libc::O_RDONLY,
                )
                .map(|(a, _, _)| a),
        };
        match made {
            Ok(a) => reply.entry(&self.opts.entry_ttl, &a, Generation(0)),
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
        crate::counters::count("mkdir");
        match self.do_mkdir((req.uid(), req.gid()), parent.0, name, mode, umask) {
            Ok(a) => reply.entry(&self.opts.entry_ttl, &a, Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        crate::counters::count("unlink");
        match self.do_remove(parent.0, name, false) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        crate::counters::count("rmdir");
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
        crate::counters::count("symlink");
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
        crate::counters::count("rename");
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
        crate::counters::count("link");
        match self.do_link(ino.0, newparent.0, newname) {
            Ok(a) => reply.entry(&self.opts.entry_ttl, &a, Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        crate::counters::count("fallocate");
        match self.do_fallocate(ino.0, fh, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// No-open mode: ENOSYS, and the kernel stops sending OPEN for good (module docs).
    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        crate::counters::count("open");
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
        crate::counters::count("read");
        match self.do_read(ino.0, fh, offset, size) {
            Ok(data) => {
                reply.data(&data);
                // A command began reading a codebase file: its neighbours are likely next.
                if offset == 0 && fh.0 == 0 {
                    self.prefetch_siblings(ino.0);
                }
            }
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
        crate::counters::count("write");
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
        crate::counters::count("flush");
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
        crate::counters::count("release");
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
        crate::counters::count("fsync");
        match self.do_fsync(ino.0, fh, datasync) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// ENOSYS: no-opendir mode; listings are served by READDIR alone and the kernel caches
    /// them (invalidated on changes).
    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        crate::counters::count("opendir");
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
        crate::counters::count("readdir");
        let (entries, start) = match self.listing_at(ino.0, offset) {
            Ok(l) => l,
            Err(e) => return reply.error(errno(&e)),
        };
        for (i, e) in entries.iter().enumerate().skip(start) {
            if reply.add(INodeNo(e.ino), (i + 1) as u64, e.kind, &e.name) {
                break;
            }
        }
        reply.ok();
    }

    /// READDIR with each entry's attributes, so that a first pass over a tree (`find`,
    /// `grep -r`, `git status` in a fresh sandbox) costs one round trip per directory instead
    /// of one LOOKUP per name. Every entry sent but `.` and `..` counts as a lookup of its
    /// node, as the kernel counts it (it forgets any it fails to link).
    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        crate::counters::count("readdir");
        let (entries, start) = match self.listing_at(ino.0, offset) {
            Ok(l) => l,
            Err(e) => return reply.error(errno(&e)),
        };
        let parent = match self.path_of(ino.0) {
            Ok(p) => p,
            Err(e) => return reply.error(errno(&e)),
        };
        for (i, e) in entries.iter().enumerate().skip(start) {
            let next = (i + 1) as u64;
            let Some((attr, level)) = &e.shown else {
                // `.` and `..`: the kernel links neither (nor counts them), it only lists them.
                let attr = FileAttr {
                    ino: INodeNo(e.ino),
                    kind: e.kind,
                    ..negative_attr()
                };
                if reply.add(
                    INodeNo(e.ino),
                    next,
                    &e.name,
                    &Duration::ZERO,
                    &attr,
                    Generation(0),
                ) {
                    break;
                }
                continue;
            };
            let path = parent.join(&e.name);
            // A listing read on from an earlier request may be out of date (the caller
            // chooses when to go on): its entries are judged and read again, and one the
            // rules now hide is left out.
            let shown = if offset == 0 {
                Some((*attr, *level))
            } else {
                self.current(&path)
            };
            let Some((attr, level)) = shown else {
                continue;
            };
            let Ok(fa) = self.shown_attr(e.ino, &path, &attr, level) else {
                continue;
            };
            // Counted before the entry goes in (a FORGET could otherwise drop the node in
            // between), and only while the path still has this node (removed or replaced
            // entries are left out, as a READDIR begun a moment later would have).
            {
                let mut nodes = lock(&self.shared.nodes);
                if nodes.by_path.get(&path) != Some(&e.ino) {
                    continue;
                }
                if let Some(n) = nodes.by_ino.get_mut(&e.ino) {
                    n.lookups += 1;
                }
            }
            if reply.add(
                INodeNo(e.ino),
                next,
                &e.name,
                &self.opts.entry_ttl,
                &fa,
                Generation(0),
            ) {
                // Not sent after all.
                if let Some(n) = lock(&self.shared.nodes).by_ino.get_mut(&e.ino) {
                    n.lookups = n.lookups.saturating_sub(1);
                }
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
        crate::counters::count("fsync");
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        crate::counters::count("statfs");
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
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        crate::counters::count("xattr");
        match self.do_setxattr(ino.0, name, XattrWrite::Set(value, flags)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        crate::counters::count("xattr");
        match self.do_getxattr(ino.0, name) {
            Ok(v) if size == 0 => reply.size(u32::try_from(v.len()).unwrap_or(u32::MAX)),
            Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        crate::counters::count("xattr");
        match self.do_listxattr(ino.0) {
            Ok(v) if size == 0 => reply.size(u32::try_from(v.len()).unwrap_or(u32::MAX)),
            Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        crate::counters::count("xattr");
        match self.do_setxattr(ino.0, name, XattrWrite::Remove) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        crate::counters::count("access");
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
        crate::counters::count("create");
        match self.do_create((req.uid(), req.gid()), parent.0, name, mode, umask, flags) {
            Ok((attr, file, write)) => {
                self.finish_create(reply, self.opts.entry_ttl, attr, file, write);
            }
            Err(e) => reply.error(errno(&e)),
        }
    }
}
