//! How many filesystem operations of each kind every mount of this process served (for the
//! server's metrics): one relaxed atomic add per request, a few nanoseconds against a FUSE
//! round trip of tens of microseconds.

use std::sync::atomic::{AtomicU64, Ordering};

/// The operations counted, as the metrics name them.
pub const OPERATIONS: [&str; 24] = [
    "lookup",
    "getattr",
    "setattr",
    "readlink",
    "mknod",
    "mkdir",
    "unlink",
    "rmdir",
    "symlink",
    "rename",
    "link",
    "fallocate",
    "open",
    "read",
    "write",
    "flush",
    "release",
    "fsync",
    "opendir",
    "readdir",
    "statfs",
    "xattr",
    "access",
    "create",
];

static COUNTS: [AtomicU64; OPERATIONS.len()] = [const { AtomicU64::new(0) }; OPERATIONS.len()];

/// Counts one operation (`op` is one of [`OPERATIONS`]; the lookup folds away for a literal).
#[inline(always)]
pub(crate) fn count(op: &'static str) {
    if let Some(i) = OPERATIONS.iter().position(|o| *o == op) {
        COUNTS[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// Every operation with how many were served since the process started.
pub fn operation_counts() -> Vec<(&'static str, u64)> {
    OPERATIONS
        .iter()
        .zip(COUNTS.iter())
        .map(|(o, c)| (*o, c.load(Ordering::Relaxed)))
        .collect()
}
