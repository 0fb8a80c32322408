//! The crate's error type and its single errno table.

use std::io;
use std::path::PathBuf;

use agentfense_core::Level;

/// Everything that can go wrong in the policy filesystem. Variants carry the sandbox-relative
/// path (as stored in the delta, no leading `/`) they concern.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The path does not exist in the merged view, or the rules hide it (`none`): both look
    /// the same from inside.
    #[error("{path:?}: no such file or directory")]
    NotFound {
        /// The path.
        path: PathBuf,
    },
    /// The rules do not allow `op` at `path` (level `level`).
    #[error("{path:?}: {op} denied at level {level}")]
    Denied {
        /// The operation.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The path's effective level.
        level: Level,
    },
    /// The target already exists.
    #[error("{path:?}: already exists")]
    Exists {
        /// The path.
        path: PathBuf,
    },
    /// rmdir (or a rename over a directory) of a directory that has entries, visible or not.
    #[error("{path:?}: directory not empty")]
    NotEmpty {
        /// The path.
        path: PathBuf,
    },
    /// A path component that should be a directory is not.
    #[error("{path:?}: not a directory")]
    NotDir {
        /// The path.
        path: PathBuf,
    },
    /// A directory where a non-directory was expected.
    #[error("{path:?}: is a directory")]
    IsDir {
        /// The path.
        path: PathBuf,
    },
    /// The operation cannot be done in place (directory renames that would move protected or
    /// codebase entries); tools then fall back to copy + delete, which is checked per file.
    #[error("{path:?}: cannot be moved in place")]
    CrossDevice {
        /// The path.
        path: PathBuf,
    },
    /// Not supported by this filesystem (hard links, xattr writes, special files).
    #[error("{path:?}: {op} is not supported")]
    NotSupported {
        /// The operation.
        op: &'static str,
        /// The path.
        path: PathBuf,
    },
    /// Not permitted regardless of the rules (e.g. chown to another owner).
    #[error("{path:?}: {op} is not permitted")]
    NotPermitted {
        /// The operation.
        op: &'static str,
        /// The path.
        path: PathBuf,
    },
    /// A name that cannot be a path component (`.`, `..`, contains `/` or NUL).
    #[error("invalid file name {name:?}")]
    InvalidName {
        /// The name, lossily decoded.
        name: String,
    },
    /// An unknown inode or file handle number from the kernel.
    #[error("stale inode or handle {id}")]
    Stale {
        /// The number.
        id: u64,
    },
    /// The kernel cannot open this inode in the needed I/O mode right now: a write open of a
    /// file whose open readers use the codebase file as their passthrough file (possible only
    /// after a rule change made it writable; [`crate::IoMode::Passthrough`]).
    #[error("inode {ino} is busy: open read-only elsewhere in this sandbox")]
    Busy {
        /// Our inode number.
        ino: u64,
    },
    /// I/O on a file that was deleted or replaced while open, whose host file is gone.
    #[error("{} was deleted or replaced", path.display())]
    Vanished {
        /// The path the file had.
        path: PathBuf,
    },
    /// A host system call failed.
    #[error("{op} {path:?} failed")]
    Io {
        /// The step that failed.
        op: &'static str,
        /// The path it concerned (relative to its layer, or absolute for mount steps).
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The delta's metadata file is malformed.
    #[error("corrupt delta metadata {path:?} at line {line}")]
    CorruptMeta {
        /// The metadata file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
    },
    /// The sandbox's disk quota (bytes or entries in its delta) is used up.
    #[error("this sandbox's disk quota is used up ({what})")]
    NoSpace {
        /// `bytes` or `inodes`, with the numbers.
        what: String,
    },
    /// The sandbox already holds as many files open through the filesystem as it may.
    #[error("this sandbox holds {limit} open files through the filesystem, its limit")]
    TooManyOpenFiles {
        /// The limit.
        limit: usize,
    },
    /// Mounting failed.
    #[error("mounting at {mountpoint:?} failed")]
    Mount {
        /// The mount point.
        mountpoint: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl FsError {
    /// Wraps an io error for step `op` at `path`.
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> FsError {
        FsError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// The errno the FUSE adapter replies with: the one table for the whole crate.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound { .. } => libc::ENOENT,
            FsError::Denied { .. } => libc::EACCES,
            FsError::Exists { .. } => libc::EEXIST,
            FsError::NotEmpty { .. } => libc::ENOTEMPTY,
            FsError::NotDir { .. } => libc::ENOTDIR,
            FsError::IsDir { .. } => libc::EISDIR,
            FsError::CrossDevice { .. } => libc::EXDEV,
            FsError::NotSupported { .. } => libc::EOPNOTSUPP,
            FsError::NotPermitted { .. } => libc::EPERM,
            FsError::InvalidName { .. } => libc::EINVAL,
            FsError::Stale { .. } => libc::EBADF,
            FsError::Vanished { .. } => libc::ESTALE,
            FsError::Busy { .. } => libc::ETXTBSY,
            FsError::TooManyOpenFiles { .. } => libc::EMFILE,
            FsError::NoSpace { .. } => libc::ENOSPC,
            FsError::Io { source, .. } => match source.raw_os_error() {
                // Errors that describe the caller's request or the disk, not our internals,
                // are passed through; anything else is an internal failure.
                Some(
                    e @ (libc::ENOSPC
                    | libc::EDQUOT
                    | libc::EFBIG
                    | libc::ENAMETOOLONG
                    | libc::EINVAL
                    | libc::EINTR
                    | libc::EAGAIN
                    | libc::ENOTEMPTY
                    | libc::EROFS
                    | libc::EMFILE
                    | libc::ENFILE
                    | libc::ENOMEM
                    // Extended attributes: missing, buffer too small, too large, exists
                    // (XATTR_CREATE), not supported by the host's file system.
                    | libc::ENODATA
                    | libc::ERANGE
                    | libc::E2BIG
                    | libc::EEXIST
                    | libc::EOPNOTSUPP),
                ) => e,
                _ => libc::EIO,
            },
            FsError::CorruptMeta { .. } | FsError::Mount { .. } => libc::EIO,
        }
    }
}
