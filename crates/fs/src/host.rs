//! Symlink-safe access to host directories.
//!
//! Every host path the daemon touches is a path *relative to a layer root* (the codebase, the
//! delta's upper tree, its work area). It is resolved with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`, so neither a symlink in the codebase (say
//! `src -> /etc`) nor `..` can make the root-privileged daemon reach outside the layer; the
//! final component is then used with an `*at` call that does not follow symlinks either
//! (`AT_SYMLINK_NOFOLLOW`, `O_NOFOLLOW`, or calls that never follow: `unlinkat`, `renameat`,
//! `mkdirat`, `readlinkat`).
//!
//! The original followed symlinks on the host (its bug 11); this module is the only place
//! where host paths are opened.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags, Stat};

/// Resolution flags used for every host lookup.
const RESOLVE: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS)
    .union(ResolveFlags::NO_XDEV);

/// `rel` as an `openat2` path: the empty path (the root itself) becomes `.`.
fn arg(rel: &Path) -> &Path {
    if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    }
}

/// Opens the directory at `rel` below `root` as an `O_PATH` handle for `*at` calls.
pub(crate) fn open_dir(root: BorrowedFd<'_>, rel: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat2(
        root,
        arg(rel),
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        RESOLVE,
    )?)
}

/// Opens the directory at `rel` below `root` for reading its entries.
pub(crate) fn open_dir_read(root: BorrowedFd<'_>, rel: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat2(
        root,
        arg(rel),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        RESOLVE,
    )?)
}

/// Opens the regular file at `rel` below `root` with `flags` (never creating it, never
/// following a symlink, not even as the last component). Anything but a regular file is
/// refused: opening a fifo or a device could block the daemon or have side effects.
pub(crate) fn open_file(root: BorrowedFd<'_>, rel: &Path, flags: OFlags) -> io::Result<OwnedFd> {
    let fd = rustix::fs::openat2(
        root,
        arg(rel),
        flags | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK,
        Mode::empty(),
        RESOLVE,
    )?;
    let st = rustix::fs::fstat(&fd)?;
    if Kind::from_mode(st.st_mode) != Kind::File {
        return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
    }
    rustix::fs::fcntl_setfl(&fd, rustix::fs::fcntl_getfl(&fd)? - OFlags::NONBLOCK)?;
    Ok(fd)
}

/// Opens regular file `name` in directory `dir` read-only (one component: nothing followed),
/// refusing anything but a regular file as [`open_file`] does.
pub(crate) fn open_file_in(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<OwnedFd> {
    let fd = rustix::fs::openat2(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK,
        Mode::empty(),
        RESOLVE,
    )?;
    let st = rustix::fs::fstat(&fd)?;
    if Kind::from_mode(st.st_mode) != Kind::File {
        return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
    }
    Ok(fd)
}

/// `lstat` of `rel` below `root`: a symlink as the last component is reported, not followed.
pub(crate) fn lstat(root: BorrowedFd<'_>, rel: &Path) -> io::Result<Stat> {
    if rel.as_os_str().is_empty() {
        return Ok(rustix::fs::fstat(root)?);
    }
    // O_PATH|O_NOFOLLOW with RESOLVE_NO_SYMLINKS returns a handle on a trailing symlink itself
    // (openat2(2)); every earlier component must be a real directory.
    let fd = rustix::fs::openat2(
        root,
        rel,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        RESOLVE,
    )?;
    Ok(rustix::fs::fstat(&fd)?)
}

/// Splits `rel` into (parent, final name). `rel` must not be the root.
pub(crate) fn split(rel: &Path) -> io::Result<(&Path, &OsStr)> {
    match (rel.parent(), rel.file_name()) {
        (Some(p), Some(n)) => Ok((p, n)),
        _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
    }
}

/// Reads the target of the symlink at `rel` below `root`.
pub(crate) fn readlink(root: BorrowedFd<'_>, rel: &Path) -> io::Result<Vec<u8>> {
    let (parent, name) = split(rel)?;
    let dir = open_dir(root, parent)?;
    Ok(rustix::fs::readlinkat(&dir, name, Vec::new())?.into_bytes())
}

/// The kind of a directory entry, from `d_type` or the mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A directory.
    Dir,
    /// A regular file.
    File,
    /// A symbolic link.
    Symlink,
    /// A named pipe.
    Fifo,
    /// A unix socket.
    Socket,
    /// A device node.
    Other,
}

impl Kind {
    pub(crate) fn from_mode(mode: u32) -> Kind {
        match mode & libc::S_IFMT {
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFREG => Kind::File,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            _ => Kind::Other,
        }
    }

    fn from_file_type(t: rustix::fs::FileType) -> Option<Kind> {
        use rustix::fs::FileType as T;
        Some(match t {
            T::Directory => Kind::Dir,
            T::RegularFile => Kind::File,
            T::Symlink => Kind::Symlink,
            T::Fifo => Kind::Fifo,
            T::Socket => Kind::Socket,
            T::Unknown => return None,
            _ => Kind::Other,
        })
    }
}

/// Lists the directory at `rel` below `root`: `(name, kind)` for every entry but `.`/`..`.
pub(crate) fn list(root: BorrowedFd<'_>, rel: &Path) -> io::Result<Vec<(Vec<u8>, Kind)>> {
    each_entry(root, rel, |dir, name, file_type| {
        Ok(Some(match Kind::from_file_type(file_type) {
            Some(k) => k,
            None => {
                let st =
                    rustix::fs::statat(dir, OsStr::from_bytes(name), AtFlags::SYMLINK_NOFOLLOW)?;
                Kind::from_mode(st.st_mode)
            }
        }))
    })
}

/// The entries of directory `rel` below `root` with their `lstat` (taken relative to the open
/// directory, one component each: nothing is followed), `.` and `..` left out. An entry
/// removed between the listing and its `lstat` is left out too.
pub(crate) fn list_stat(root: BorrowedFd<'_>, rel: &Path) -> io::Result<Vec<(Vec<u8>, Stat)>> {
    each_entry(root, rel, |dir, name, _| {
        match rustix::fs::statat(dir, OsStr::from_bytes(name), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(st)),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    })
}

/// Reads directory `rel` below `root` and keeps, for each entry but `.` and `..`, what `f`
/// makes of it (given the open directory, the name and the entry's type); `None` leaves the
/// entry out.
fn each_entry<T>(
    root: BorrowedFd<'_>,
    rel: &Path,
    mut f: impl FnMut(BorrowedFd<'_>, &[u8], rustix::fs::FileType) -> io::Result<Option<T>>,
) -> io::Result<Vec<(Vec<u8>, T)>> {
    let fd = open_dir_read(root, rel)?;
    let dir_fd = fd.try_clone()?;
    let mut dir = rustix::fs::Dir::new(fd)?;
    let mut out = Vec::new();
    while let Some(entry) = dir.read() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        if let Some(t) = f(dir_fd.as_fd(), name, entry.file_type())? {
            out.push((name.to_vec(), t));
        }
    }
    Ok(out)
}

/// Creates every missing directory of `rel` below `root`, one component at a time, giving new
/// directories `mode_of(prefix)` and handing each one made to `made`. Returns the handle of
/// the last one.
pub(crate) fn mkdir_all(
    root: BorrowedFd<'_>,
    rel: &Path,
    mut mode_of: impl FnMut(&Path) -> u32,
    mut made: impl FnMut(BorrowedFd<'_>),
) -> io::Result<OwnedFd> {
    // Usually the whole path exists already (every write after the first in a directory):
    // one resolution instead of a mkdir, an open and a mode lookup per component.
    match open_dir(root, rel) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
        r => return r,
    }
    let mut cur = open_dir(root, Path::new(""))?;
    let mut prefix = std::path::PathBuf::new();
    for comp in rel.components() {
        let name = comp.as_os_str();
        prefix.push(name);
        let new =
            match rustix::fs::mkdirat(&cur, name, Mode::from_raw_mode(mode_of(&prefix) & 0o7777)) {
                Ok(()) => true,
                Err(rustix::io::Errno::EXIST) => false,
                Err(e) => return Err(e.into()),
            };
        let next = rustix::fs::openat2(
            &cur,
            name,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            RESOLVE,
        )?;
        if new {
            made(next.as_fd());
        }
        cur = next;
    }
    Ok(cur)
}

/// Removes the entry `name` in `dir` (a directory if `is_dir`).
pub(crate) fn remove_at(dir: BorrowedFd<'_>, name: &OsStr, is_dir: bool) -> io::Result<()> {
    let flags = if is_dir {
        AtFlags::REMOVEDIR
    } else {
        AtFlags::empty()
    };
    Ok(rustix::fs::unlinkat(dir, name, flags)?)
}

/// Modification time of a stat in nanoseconds since the epoch.
pub(crate) fn mtime_ns(st: &Stat) -> i128 {
    i128::from(st.st_mtime) * 1_000_000_000 + i128::from(st.st_mtime_nsec)
}
