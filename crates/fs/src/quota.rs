//! A sandbox's disk quota: what its writes take, against a limit of bytes and of entries.
//!
//! What counts, together:
//! - the delta's metadata **journal** (rewritten as a snapshot when churn doubles it);
//! - the **upper layer** of the delta: allocated bytes (`st_blocks * 512`) and entries,
//!   measured around every change the daemon makes to it (see `Delta::accounted`), and measured
//!   afresh when the delta is opened and after every publish;
//! - **detached files**: files removed (or replaced) while a process still had them open keep
//!   their blocks on the host until the kernel lets go of them (FORGET), and stay charged
//!   until then;
//! - what this sandbox's **publishes added to the codebase** (net: a publish that deletes
//!   codebase files makes room), kept in `<delta>/usage` so that a restart does not forget it.
//!   Without it, a sandbox in the automatic publish mode could grow the codebase by its quota
//!   after every command;
//! - the sandbox's **scratch** file system (`/tmp`, which holds `$HOME`), when the runtime
//!   hands one over ([`DiskUsage::set_scratch`]): its used blocks, read with `fstatfs`.
//!
//! Past the limit an operation fails with ENOSPC, and the owner is told (at most once a
//! second, see [`DiskUsage::set_limits`]).

use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::error::FsError;

/// How long an operation that does not fit waits for detached files the kernel is about to
/// let go of (their FORGET is queued by the removal itself, but a second daemon thread may
/// still be handling it) before it fails with ENOSPC. Only ever waited while such files are
/// charged and the quota is full.
const DETACHED_GRACE: Duration = Duration::from_millis(250);

/// File name of the published-growth record in the delta directory.
pub(crate) const USAGE_FILE: &str = "usage";

/// The quota of one sandbox and what counts against it (see the module docs).
pub struct DiskUsage {
    upper_bytes: AtomicI64,
    upper_inodes: AtomicI64,
    detached_bytes: AtomicI64,
    /// The delta's metadata journal (whiteouts, changed paths), which grows with churn.
    journal_bytes: AtomicI64,
    snapshot_bytes: AtomicI64,
    /// The checkpoints' copies of the delta.
    checkpoint_bytes: AtomicI64,
    checkpoint_inodes: AtomicI64,
    /// Detached files still charged, and a condition signalled when one is let go of.
    detached: (Mutex<usize>, Condvar),
    published: Mutex<(i64, i64)>,
    max_bytes: AtomicU64,
    max_inodes: AtomicU64,
    scratch: OnceLock<OwnedFd>,
    /// The most the scratch file system may take even when the quota leaves more (0: none).
    scratch_cap: AtomicU64,
    /// What the rest (delta, detached, published) took when the scratch file system was last
    /// resized to the room it leaves (see [`DiskUsage::fit_scratch`]); `i64::MIN`: never.
    scratch_fitted_at: AtomicI64,
    /// Called with what did not fit, at most once a second.
    on_full: OnceLock<Box<dyn Fn(String) + Send + Sync>>,
    last_report: Mutex<Option<Instant>>,
}

impl Default for DiskUsage {
    fn default() -> Self {
        DiskUsage {
            upper_bytes: AtomicI64::new(0),
            upper_inodes: AtomicI64::new(0),
            detached_bytes: AtomicI64::new(0),
            journal_bytes: AtomicI64::new(0),
            snapshot_bytes: AtomicI64::new(0),
            checkpoint_bytes: AtomicI64::new(0),
            checkpoint_inodes: AtomicI64::new(0),
            detached: (Mutex::new(0), Condvar::new()),
            published: Mutex::new((0, 0)),
            max_bytes: AtomicU64::new(0),
            max_inodes: AtomicU64::new(0),
            scratch: OnceLock::new(),
            scratch_cap: AtomicU64::new(0),
            scratch_fitted_at: AtomicI64::new(i64::MIN),
            on_full: OnceLock::new(),
            last_report: Mutex::new(None),
        }
    }
}

/// How far what the delta takes may move before the scratch file system is resized to the room
/// left (the most the two together may exceed the quota by, between resizes): 1/64 of the
/// quota, between 64 KiB and 1 MiB.
fn scratch_step(max: u64) -> i64 {
    i64::try_from((max / 64).clamp(64 << 10, 1 << 20)).unwrap_or(1 << 20)
}

impl std::fmt::Debug for DiskUsage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskUsage")
            .field("used", &self.used())
            .field("limits", &self.limits())
            .finish_non_exhaustive()
    }
}

fn clamp(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl DiskUsage {
    /// (bytes, entries) counted against the quota now.
    pub fn used(&self) -> (u64, u64) {
        let published = *self.published.lock().unwrap_or_else(|p| p.into_inner());
        let (scratch_b, scratch_i) = self.scratch_used();
        let bytes = self.upper_bytes.load(Ordering::Relaxed)
            + self.detached_bytes.load(Ordering::Relaxed)
            + self.journal_bytes.load(Ordering::Relaxed)
            + self.checkpoint_bytes.load(Ordering::Relaxed)
            + published.0
            + scratch_b;
        let inodes = self.upper_inodes.load(Ordering::Relaxed)
            + self.checkpoint_inodes.load(Ordering::Relaxed)
            + published.1
            + scratch_i;
        (clamp(bytes), clamp(inodes))
    }

    /// Bytes and entries the scratch file system holds.
    fn scratch_used(&self) -> (i64, i64) {
        let Some(fd) = self.scratch.get() else {
            return (0, 0);
        };
        match rustix::fs::fstatfs(fd) {
            Ok(st) => {
                #[allow(clippy::useless_conversion)] // f_bsize is not i64 everywhere
                let bsize = i64::try_from(st.f_bsize).unwrap_or(4096);
                let blocks = i64::try_from(st.f_blocks.saturating_sub(st.f_bfree)).unwrap_or(0);
                let files = i64::try_from(st.f_files.saturating_sub(st.f_ffree)).unwrap_or(0);
                (blocks.saturating_mul(bsize), files)
            }
            Err(_) => (0, 0),
        }
    }

    /// (bytes, entries) allowed; 0 = no limit.
    pub fn limits(&self) -> (u64, u64) {
        (
            self.max_bytes.load(Ordering::Relaxed),
            self.max_inodes.load(Ordering::Relaxed),
        )
    }

    /// Sets the quota (0 = none) and what to tell when it refuses an operation.
    pub fn set_limits(&self, bytes: u64, inodes: u64, on_full: Box<dyn Fn(String) + Send + Sync>) {
        self.max_bytes.store(bytes, Ordering::Relaxed);
        self.max_inodes.store(inodes, Ordering::Relaxed);
        let _ = self.on_full.set(on_full);
    }

    /// Counts the file system whose root `fd` is (the sandbox's `/tmp`, a tmpfs) against the
    /// quota too, and keeps its size at the room the rest leaves, so that neither side can
    /// take the other's share; at most `cap` bytes when it is not 0. Set once.
    pub fn set_scratch(&self, fd: OwnedFd, cap: u64) {
        self.scratch_cap.store(cap, Ordering::Relaxed);
        if self.scratch.set(fd).is_ok() {
            self.fit_scratch(true);
        }
    }

    /// What counts against the bytes quota besides the scratch file system.
    fn rest_bytes(&self) -> i64 {
        let published = self.published.lock().unwrap_or_else(|p| p.into_inner()).0;
        self.upper_bytes.load(Ordering::Relaxed)
            + self.detached_bytes.load(Ordering::Relaxed)
            + self.journal_bytes.load(Ordering::Relaxed)
            + self.checkpoint_bytes.load(Ordering::Relaxed)
            + published
    }

    /// Resizes the scratch tmpfs to the room the rest leaves (never below what it holds), when
    /// the rest moved by [`scratch_step`] since the last resize (or always, with `force`).
    /// `fspick` + `fsconfig` reconfigure the tmpfs where it is mounted, in the sandbox's own
    /// mount namespace, without entering it.
    fn fit_scratch(&self, force: bool) {
        let (Some(fd), max) = (self.scratch.get(), self.max_bytes.load(Ordering::Relaxed)) else {
            return;
        };
        if max == 0 {
            return;
        }
        let rest = self.rest_bytes();
        let last = self.scratch_fitted_at.load(Ordering::Relaxed);
        if !force && last != i64::MIN && (rest - last).abs() < scratch_step(max) {
            return;
        }
        if self
            .scratch_fitted_at
            .compare_exchange(last, rest, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return; // another thread is resizing for the same change
        }
        let held = u64::try_from(self.scratch_used().0).unwrap_or(0);
        let room = max.saturating_sub(clamp(rest));
        let room = match self.scratch_cap.load(Ordering::Relaxed) {
            0 => room,
            cap => room.min(cap),
        };
        // tmpfs sizes are in pages; a size below what it holds is refused.
        let size = room.max(held).max(4096).div_ceil(4096) * 4096;
        use rustix::mount::{FsPickFlags, fsconfig_reconfigure, fsconfig_set_string, fspick};
        let resized = fspick(fd, "", FsPickFlags::FSPICK_EMPTY_PATH).and_then(|ctx| {
            fsconfig_set_string(&ctx, "size", size.to_string())?;
            fsconfig_reconfigure(&ctx)
        });
        if let Err(e) = resized {
            tracing::warn!(error = %e, size, "resizing the sandbox's /tmp to its disk quota failed");
        }
    }

    /// What does not fit, if an operation that needs `bytes` more bytes and `inodes` more
    /// entries exceeds the quota.
    fn overflow(&self, bytes: u64, inodes: u64) -> Option<String> {
        let (max_b, max_i) = self.limits();
        if (max_b == 0 || bytes == 0) && (max_i == 0 || inodes == 0) {
            return None;
        }
        let (used_b, used_i) = self.used();
        if max_b > 0 && bytes > 0 && used_b.saturating_add(bytes) > max_b {
            Some(format!("bytes: {used_b} used + {bytes} needed > {max_b}"))
        } else if max_i > 0 && inodes > 0 && used_i.saturating_add(inodes) > max_i {
            Some(format!(
                "entries: {used_i} used + {inodes} needed > {max_i}"
            ))
        } else {
            None
        }
    }

    /// Whether `bytes` (and `inodes`) more would fit, without waiting or telling anyone.
    pub(crate) fn fits(&self, bytes: i64, inodes: u64) -> Result<(), String> {
        self.overflow(clamp(bytes), inodes).map_or(Ok(()), Err)
    }

    /// Refuses (ENOSPC) an operation that needs `bytes` more bytes and `inodes` more entries
    /// than the quota leaves.
    pub fn check_room(&self, bytes: u64, inodes: u64) -> Result<(), FsError> {
        let Some(mut what) = self.overflow(bytes, inodes) else {
            return Ok(());
        };
        // Files removed a moment ago may still be charged because their FORGET is being
        // handled on another thread: wait for those (and only while there are some).
        let deadline = Instant::now() + DETACHED_GRACE;
        let (count, cv) = &self.detached;
        let mut n = count.lock().unwrap_or_else(|p| p.into_inner());
        while *n > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            n = cv
                .wait_timeout(n, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            match self.overflow(bytes, inodes) {
                None => return Ok(()),
                Some(w) => what = w,
            }
        }
        drop(n);
        self.report(&what);
        Err(FsError::NoSpace { what })
    }

    fn report(&self, what: &str) {
        let mut last = self.last_report.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            return;
        }
        *last = Some(Instant::now());
        drop(last);
        if let Some(f) = self.on_full.get() {
            f(what.to_owned());
        }
    }

    /// (bytes of the delta's journal now, bytes of its last snapshot).
    pub(crate) fn journal(&self) -> (i64, i64) {
        (
            self.journal_bytes.load(Ordering::Relaxed),
            self.snapshot_bytes.load(Ordering::Relaxed),
        )
    }

    /// Records the journal's size (it counts against the bytes quota) and its last snapshot's.
    pub(crate) fn set_journal(&self, bytes: i64, snapshot: i64) {
        self.journal_bytes.store(bytes, Ordering::Relaxed);
        self.snapshot_bytes.store(snapshot, Ordering::Relaxed);
    }

    /// Adds a measured change of the upper layer.
    pub(crate) fn charge(&self, bytes: i64, inodes: i64) {
        self.upper_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.upper_inodes.fetch_add(inodes, Ordering::Relaxed);
        self.fit_scratch(false);
    }

    /// Sets the upper layer's footprint to a fresh measurement.
    /// Sets what the checkpoints take (measured).
    pub(crate) fn set_checkpoints(&self, (bytes, inodes): (i64, i64)) {
        self.checkpoint_bytes.store(bytes, Ordering::Relaxed);
        self.checkpoint_inodes.store(inodes, Ordering::Relaxed);
    }

    pub(crate) fn set_upper(&self, (bytes, inodes): (i64, i64)) {
        self.upper_bytes.store(bytes, Ordering::Relaxed);
        self.upper_inodes.store(inodes, Ordering::Relaxed);
        self.fit_scratch(false);
    }

    /// A file with `bytes` allocated left the upper layer's names while the kernel still holds
    /// it: it stays charged until [`DiskUsage::release_detached`].
    pub(crate) fn hold_detached(&self, bytes: i64) {
        self.detached_bytes.fetch_add(bytes, Ordering::Relaxed);
        *self.detached.0.lock().unwrap_or_else(|p| p.into_inner()) += 1;
    }

    /// The kernel let go of a detached file that has `bytes` allocated.
    pub(crate) fn release_detached(&self, bytes: i64) {
        self.detached_bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.fit_scratch(false);
        let (count, cv) = &self.detached;
        let mut n = count.lock().unwrap_or_else(|p| p.into_inner());
        *n = n.saturating_sub(1);
        cv.notify_all();
    }

    /// Growth a detached file took after it was detached (writes through a descriptor still
    /// open on it).
    pub(crate) fn grow_detached(&self, bytes: i64) {
        self.detached_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.fit_scratch(false);
    }

    /// Adds what a publish added to the codebase (negative when it removed more) and records
    /// the total in `delta_dir`.
    pub(crate) fn add_published(&self, delta_dir: &Path, bytes: i64, inodes: i64) {
        let mut p = self.published.lock().unwrap_or_else(|p| p.into_inner());
        p.0 += bytes;
        p.1 += inodes;
        let text = format!("{} {}\n", p.0, p.1);
        drop(p);
        self.fit_scratch(false);
        // Best effort: losing the record after a crash forgets one publish's growth at most.
        let tmp = delta_dir.join(format!("{USAGE_FILE}.tmp"));
        if std::fs::write(&tmp, text).is_ok() {
            let _ = std::fs::rename(&tmp, delta_dir.join(USAGE_FILE));
        }
    }

    /// Reads the published-growth record of `delta_dir`.
    pub(crate) fn load_published(&self, delta_dir: &Path) {
        let Ok(text) = std::fs::read_to_string(delta_dir.join(USAGE_FILE)) else {
            return;
        };
        let mut it = text.split_whitespace().map(|v| v.parse::<i64>().ok());
        if let (Some(Some(b)), Some(Some(i))) = (it.next(), it.next()) {
            *self.published.lock().unwrap_or_else(|p| p.into_inner()) = (b, i);
        }
    }
}

/// Allocated bytes of a file from its `st_blocks`.
pub fn allocated(st_blocks: u64) -> i64 {
    i64::try_from(st_blocks.saturating_mul(512)).unwrap_or(i64::MAX)
}

/// (allocated bytes, entries) below `dir`, not following links and not counting `dir` itself.
pub(crate) fn footprint_below(dir: &Path) -> (i64, i64) {
    use std::os::unix::fs::MetadataExt;
    let (mut bytes, mut inodes) = (0i64, 0i64);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            bytes += allocated(m.blocks());
            inodes += 1;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    (bytes, inodes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn everything_counts_together_and_zero_is_no_limit() {
        let u = DiskUsage::default();
        assert!(u.check_room(u64::MAX, u64::MAX).is_ok(), "no limit set");
        let told = std::sync::Arc::new(Mutex::new(Vec::new()));
        let t = told.clone();
        u.set_limits(1000, 10, Box::new(move |w| t.lock().unwrap().push(w)));
        u.charge(400, 2);
        u.hold_detached(300);
        let dir = tempfile::tempdir().unwrap();
        u.add_published(dir.path(), 200, 3);
        assert_eq!(u.used(), (900, 5));
        assert!(u.check_room(100, 5).is_ok());
        assert!(matches!(u.check_room(101, 0), Err(FsError::NoSpace { .. })));
        assert!(matches!(u.check_room(0, 6), Err(FsError::NoSpace { .. })));
        // Reported once for both refusals (at most once a second).
        assert_eq!(told.lock().unwrap().len(), 1);
        // Letting go of the detached file makes room; a publish that deletes does too.
        u.release_detached(300);
        assert!(u.check_room(400, 0).is_ok());
        u.add_published(dir.path(), -200, -3);
        assert_eq!(u.used(), (400, 2));
        // The published growth survives a reopen.
        let again = DiskUsage::default();
        again.load_published(dir.path());
        assert_eq!(again.used(), (0, 0));
        u.add_published(dir.path(), 50, 1);
        again.load_published(dir.path());
        assert_eq!(again.used(), (50, 1));
    }
}
