//! Host file helpers of the operations: staged (unnamed) files, copying contents, ownership,
//! modes and times.

use super::*;

/// Prefix of the names publishing gives files in a codebase directory for the instant between
/// linking a finished copy and renaming it over its target (or, without `O_TMPFILE`, while it is
/// written). Followed by 32 random hex digits; the merged view never shows such a codebase
/// entry (see [`is_stage_name`]), so no sandbox can read a file under it.
pub const STAGE_PREFIX: &str = ".agentfense-stage-";

/// A fresh [`STAGE_PREFIX`] name.
pub(super) fn stage_name() -> io::Result<OsString> {
    let mut b = [0u8; 16];
    let mut filled = 0;
    while filled < b.len() {
        filled += rustix::rand::getrandom(&mut b[filled..], rustix::rand::GetRandomFlags::empty())?;
    }
    Ok(OsString::from(format!(
        "{STAGE_PREFIX}{:032x}",
        u128::from_le_bytes(b)
    )))
}

/// Refuses a new entry named like a staging file: once published it would be in the
/// codebase where no sandbox can see or remove it.
pub(super) fn refuse_stage_name(rel: &Path) -> Result<(), FsError> {
    if rel.file_name().is_some_and(|n| is_stage_name(n.as_bytes())) {
        return Err(FsError::NotPermitted {
            op: "a name reserved for publishing",
            path: rel.into(),
        });
    }
    Ok(())
}

/// Whether `name` is a staging name of `stage_name`'s exact shape.
pub fn is_stage_name(name: &[u8]) -> bool {
    name.strip_prefix(STAGE_PREFIX.as_bytes())
        .is_some_and(|rest| rest.len() == 32 && rest.iter().all(u8::is_ascii_hexdigit))
}

pub(super) enum Staging {
    /// The file system has no `O_TMPFILE`: stage under a name.
    Unsupported,
    Failed(FsError),
}

/// Copies delta file `rel` into an unnamed file (`O_TMPFILE`) in codebase directory `dir`.
pub(super) fn stage_unnamed(
    dir: &OwnedFd,
    upper: BorrowedFd<'_>,
    rel: &Path,
    st: &Stat,
) -> Result<OwnedFd, Staging> {
    let dst = match rustix::fs::openat(
        dir,
        ".",
        OFlags::TMPFILE | OFlags::WRONLY | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    ) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::ISDIR | rustix::io::Errno::INVAL) => {
            return Err(Staging::Unsupported);
        }
        Err(e) => {
            return Err(Staging::Failed(FsError::io(
                "create unnamed file",
                rel,
                e.into(),
            )));
        }
    };
    let keep = dst
        .try_clone()
        .map_err(|e| Staging::Failed(FsError::io("dup", rel, e)))?;
    let src = host::open_file(upper, rel, OFlags::RDONLY)
        .map_err(|e| Staging::Failed(FsError::io("open delta file", rel, e)))?;
    copy_contents(Some(src), dst, st)
        .map_err(|e| Staging::Failed(FsError::io("publish copy", rel, e)))?;
    Ok(keep)
}

/// Gives the finished unnamed file `staged` a staging name in `dir` and renames it over `name`
/// at once; the staging name is removed if the rename fails.
pub(super) fn place_staged(
    staged: &OwnedFd,
    dir: &OwnedFd,
    name: &OsStr,
) -> rustix::io::Result<()> {
    let tmp = stage_name()
        .map_err(|e| rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::IO))?;
    // linkat(AT_EMPTY_PATH) needs CAP_DAC_READ_SEARCH; the /proc link needs nothing.
    let proc_path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(staged));
    rustix::fs::linkat(
        rustix::fs::CWD,
        proc_path.as_str(),
        dir,
        &tmp,
        AtFlags::SYMLINK_FOLLOW,
    )?;
    rustix::fs::renameat(dir, &tmp, dir, name).inspect_err(|_| {
        let _ = rustix::fs::unlinkat(dir, &tmp, AtFlags::empty());
    })
}

/// Mode bits an agent may set: never set-user-ID, and set-group-ID only on directories
/// (where it only affects group inheritance), so that nothing published to the codebase can
/// become a privileged executable.
pub(super) fn agent_mode(mode: u32, kind: EntryKind) -> u32 {
    if kind == EntryKind::Dir {
        mode & 0o3777
    } else {
        mode & 0o1777
    }
}

pub(crate) fn error_chain(e: &FsError) -> String {
    agentfense_core::error_chain(e)
}

pub(super) fn to_timespec(t: SystemTime) -> Timespec {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timespec {
            tv_sec: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: d.subsec_nanos().into(),
        },
        Err(e) => {
            let d = e.duration();
            Timespec {
                tv_sec: -i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                tv_nsec: 0,
            }
        }
    }
}

/// Opens `rel` (of kind `kind`) in `root` so that its metadata can be changed.
pub(super) fn open_any(
    root: BorrowedFd<'_>,
    rel: &Path,
    kind: EntryKind,
) -> Result<OwnedFd, FsError> {
    let flags = if kind == EntryKind::Dir {
        OFlags::RDONLY | OFlags::DIRECTORY
    } else {
        OFlags::RDONLY
    };
    let res = if kind == EntryKind::Dir {
        host::open_dir_read(root, rel)
    } else {
        host::open_file(root, rel, flags)
    };
    res.map_err(|e| FsError::io("open", rel, e))
}

/// Removes copy-up temporaries ([`Delta::tmp_name`]) left in `work` by a process that died
/// mid-copy (a crashed or killed server): they would hold disk space forever. Those of this
/// process (another `Delta` on the same directory) are left alone.
pub(super) fn remove_stale_temps(work: &Path) {
    let Ok(entries) = std::fs::read_dir(work) else {
        return;
    };
    let own = format!(".agentfense-{}-", std::process::id());
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(".agentfense-") && name.ends_with(".tmp") && !name.starts_with(&own) {
            match std::fs::remove_file(e.path()) {
                Ok(()) => {
                    tracing::info!(file = %e.path().display(), "removed a stale copy-up temporary")
                }
                Err(err) => {
                    tracing::warn!(file = %e.path().display(), error = %err, "cannot remove a stale copy-up temporary")
                }
            }
        }
    }
}

/// Codebase files at least this large are copied up outside the delta lock
/// ([`Delta::stage_copy_up`]); smaller ones are quicker to copy than to check twice.
pub(super) const UNLOCKED_COPY_MIN: u64 = 1 << 20;

/// Whether two stats describe the same version of the same file.
pub(super) fn same_version(a: &Stat, b: &Stat) -> bool {
    (
        a.st_dev,
        a.st_ino,
        a.st_size,
        a.st_mtime,
        a.st_mtime_nsec,
        a.st_ctime,
        a.st_ctime_nsec,
    ) == (
        b.st_dev,
        b.st_ino,
        b.st_size,
        b.st_mtime,
        b.st_mtime_nsec,
        b.st_ctime,
        b.st_ctime_nsec,
    )
}

/// Copies the data of `src` into `dst`, then gives `dst` the mode, owner and times of `st`.
pub(super) fn copy_contents(src: Option<OwnedFd>, dst: OwnedFd, st: &Stat) -> io::Result<()> {
    if let Some(src) = &src {
        super::xattr::copy_user(src.as_fd(), dst.as_fd());
    }
    let mut dst = File::from(dst);
    if let Some(src) = src {
        io::copy(&mut File::from(src), &mut dst)?;
    }
    rustix::fs::fchmod(&dst, Mode::from_raw_mode(st.st_mode & 0o7777))?;
    // Ownership is best effort: it fails when the daemon is not root, which is fine.
    let _ = rustix::fs::fchown(
        &dst,
        Some(rustix::fs::Uid::from_raw(st.st_uid)),
        Some(rustix::fs::Gid::from_raw(st.st_gid)),
    );
    let times = Timestamps {
        last_access: Timespec {
            tv_sec: st.st_atime,
            tv_nsec: st.st_atime_nsec as _,
        },
        last_modification: Timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec as _,
        },
    };
    rustix::fs::futimens(&dst, &times)?;
    Ok(())
}

/// What an upper entry with status `st` counts for in the disk quota, see `Delta::footprint`.
pub(super) fn footprint_of(st: &Stat) -> (i64, i64) {
    if st.st_nlink > 1 && Kind::from_mode(st.st_mode) != Kind::Dir {
        (0, 1)
    } else {
        (allocated(u64::try_from(st.st_blocks).unwrap_or(0)), 1)
    }
}

/// [`footprint_of`] the open entry `fd`, (0, 0) if it cannot be read.
pub(super) fn fd_footprint(fd: &OwnedFd) -> (i64, i64) {
    rustix::fs::fstat(fd).map_or((0, 0), |st| footprint_of(&st))
}

/// The directory `rel` is in (`""`, the root, for a top-level name).
pub(super) fn parent_of(rel: &Path) -> &Path {
    rel.parent().unwrap_or(Path::new(""))
}

/// Gives a new entry `name` in `pdir` to `owner`, when one is set. Best effort: the entry
/// exists either way, and only what `stat` shows depends on it.
pub(super) fn chown_new(pdir: &OwnedFd, name: &OsStr, owner: Option<(u32, u32)>) {
    if let Some((u, g)) = owner {
        let _ = rustix::fs::chownat(
            pdir,
            name,
            Some(rustix::fs::Uid::from_raw(u)),
            Some(rustix::fs::Gid::from_raw(g)),
            AtFlags::SYMLINK_NOFOLLOW,
        );
    }
}

/// Whether a symlink at `rel` (delta-relative) with target `target` points outside the
/// project: an absolute target, or a `..` that climbs above the root from where the link is.
/// Publish never writes such a link into a codebase: a host tool following it later would
/// read or write outside the project.
pub fn link_escapes(rel: &Path, target: &[u8]) -> bool {
    if target.first() == Some(&b'/') {
        return true;
    }
    let mut depth = rel.parent().map_or(0, |p| p.components().count());
    for part in target.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => match depth.checked_sub(1) {
                Some(d) => depth = d,
                None => return true,
            },
            _ => depth += 1,
        }
    }
    false
}
