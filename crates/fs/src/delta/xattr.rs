//! `user.*` extended attributes of the merged view: read from whichever layer holds the entry,
//! written to this sandbox's copy, carried along by copy-up and publish (where the host's file
//! systems allow). Other namespaces (`security.*`, `trusted.*`, `system.*`) are not the
//! sandbox's: they are neither listed nor settable.

use super::*;

/// The only namespace a sandbox sees and sets.
pub const USER_XATTR_PREFIX: &str = "user.";

/// The `user.*` names of the entry open as `fd`.
pub(super) fn user_names(fd: BorrowedFd<'_>) -> io::Result<Vec<Vec<u8>>> {
    let n = rustix::fs::flistxattr_query(fd)?;
    let mut buf = vec![0u8; n];
    let n = rustix::fs::flistxattr(fd, &mut buf[..])?;
    buf.truncate(n);
    Ok(buf
        .split(|b| *b == 0)
        .filter(|n| n.starts_with(USER_XATTR_PREFIX.as_bytes()))
        .map(<[u8]>::to_vec)
        .collect())
}

/// The value of attribute `name` of the entry open as `fd`.
pub(super) fn value(fd: BorrowedFd<'_>, name: &OsStr) -> io::Result<Vec<u8>> {
    let n = rustix::fs::fgetxattr_query(fd, name)?;
    let mut v = vec![0u8; n];
    let n = rustix::fs::fgetxattr(fd, name, &mut v[..])?;
    v.truncate(n);
    Ok(v)
}

/// Copies the `user.*` attributes of `src` onto `dst`, best effort (a file system without
/// user attributes, or one that refuses a value, keeps the file without them).
pub(super) fn copy_user(src: BorrowedFd<'_>, dst: BorrowedFd<'_>) {
    let Ok(names) = user_names(src) else {
        return;
    };
    for n in names {
        let name = OsStr::from_bytes(&n);
        if let Ok(v) = value(src, name) {
            let _ = rustix::fs::fsetxattr(dst, name, &v, rustix::fs::XattrFlags::empty());
        }
    }
}

/// How an attribute is written.
#[derive(Clone, Copy, Debug)]
pub enum XattrWrite<'a> {
    /// Set to this value (`XATTR_CREATE`/`XATTR_REPLACE` in the flags).
    Set(&'a [u8], i32),
    /// Removed.
    Remove,
}

impl Delta {
    /// Opens `rel` (a file or directory) in `layer` for attribute calls.
    fn xattr_fd(&self, layer: Layer, rel: &Path, kind: EntryKind) -> Result<OwnedFd, FsError> {
        let root = self.root(layer);
        match kind {
            EntryKind::File => host::open_file(root, rel, OFlags::RDONLY),
            EntryKind::Dir => host::open_dir_read(root, rel),
            // Linux keeps user attributes off symlinks and special files.
            _ => {
                return Err(FsError::NotPermitted {
                    op: "user attributes on this kind of entry",
                    path: rel.into(),
                });
            }
        }
        .map_err(|e| FsError::io("open for attributes", rel, e))
    }

    /// The `user.*` attribute names of `rel`.
    pub fn xattr_list(&self, rel: &Path) -> Result<Vec<Vec<u8>>, FsError> {
        check_rel(rel)?;
        let meta = self.lock();
        let attr = self
            .lookup_locked(&meta, rel)?
            .ok_or_else(|| FsError::NotFound { path: rel.into() })?;
        if !matches!(attr.kind, EntryKind::File | EntryKind::Dir) {
            return Ok(Vec::new());
        }
        let fd = self.xattr_fd(attr.layer, rel, attr.kind)?;
        user_names(fd.as_fd()).map_err(|e| FsError::io("listxattr", rel, e))
    }

    /// The value of `user.*` attribute `name` of `rel`.
    pub fn xattr_get(&self, rel: &Path, name: &OsStr) -> Result<Vec<u8>, FsError> {
        check_rel(rel)?;
        if !name.as_bytes().starts_with(USER_XATTR_PREFIX.as_bytes()) {
            return Err(FsError::Io {
                op: "getxattr",
                path: rel.into(),
                source: io::Error::from_raw_os_error(libc::ENODATA),
            });
        }
        let meta = self.lock();
        let attr = self
            .lookup_locked(&meta, rel)?
            .ok_or_else(|| FsError::NotFound { path: rel.into() })?;
        let fd = self.xattr_fd(attr.layer, rel, attr.kind)?;
        value(fd.as_fd(), name).map_err(|e| FsError::io("getxattr", rel, e))
    }

    /// Sets or removes `user.*` attribute `name` of `rel`, in this sandbox's copy of it,
    /// charged to the disk quota (file systems that store attributes in blocks of their own
    /// count them in the file's allocation).
    pub fn xattr_write(
        &self,
        rel: &Path,
        name: &OsStr,
        what: XattrWrite<'_>,
    ) -> Result<(), FsError> {
        check_rel(rel)?;
        if let XattrWrite::Set(v, _) = what {
            self.usage
                .check_room(u64::try_from(v.len() + name.len()).unwrap_or(u64::MAX), 0)?;
        }
        self.accounted(&[rel], &[], || self.xattr_write_raw(rel, name, what))
    }

    fn xattr_write_raw(
        &self,
        rel: &Path,
        name: &OsStr,
        what: XattrWrite<'_>,
    ) -> Result<(), FsError> {
        if !name.as_bytes().starts_with(USER_XATTR_PREFIX.as_bytes()) {
            return Err(FsError::NotSupported {
                op: "attributes outside user.*",
                path: rel.into(),
            });
        }
        let mut meta = self.lock();
        let kind = self.copy_up_locked(&mut meta, rel)?;
        let fd = self.xattr_fd(Layer::Upper, rel, kind)?;
        let r = match what {
            XattrWrite::Set(v, flags) => rustix::fs::fsetxattr(
                &fd,
                name,
                v,
                rustix::fs::XattrFlags::from_bits_retain(u32::try_from(flags).unwrap_or(0)),
            ),
            XattrWrite::Remove => rustix::fs::fremovexattr(&fd, name),
        };
        r.map_err(|e| FsError::io("setxattr", rel, e.into()))?;
        self.mark_dirty(&mut meta, rel)
    }
}
