//! Mounting: the public entry point used by the server.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use agentfense_core::{Level, NodeKind, Policy};
use crossbeam_channel::Receiver;
use fuser::{BackgroundSession, Config, INodeNo, MountOption, Notifier, SessionACL};
use tracing::{debug, info, warn};

use crate::audit::{AuditEvent, Auditor};
use crate::delta::{
    ApplyRefusal, CheckpointInfo, Delta, EntryKind, PublishFilter, PublishReport, Selection,
};
use crate::error::FsError;
use crate::fuse::content::ContentVerdicts;
use crate::fuse::{FsOptions, PolicyFs, Shared};
pub use crate::modes::{IoMode, PublishMode};

/// Our FUSE filesystem name: the mount's source in `/proc/self/mountinfo` (type `fuse`, or
/// `fuse.agentfense` where the subtype is applied).
pub const FS_NAME: &str = "agentfense";

/// Default kernel cache lifetime of names and attributes (see [`FsConfig::entry_ttl`]).
pub const DEFAULT_TTL: Duration = Duration::from_secs(60);

/// One live mount in a [`Mounts`] registry.
struct Registered {
    id: u64,
    lower: PathBuf,
    shared: Weak<Shared>,
    notifier: Notifier,
}

/// A registry of live mounts, by codebase, so that a change to a codebase (another
/// sandbox's publish, an upload) can drop the stale entries from every kernel cache at once.
/// The owner (the server) makes one and gives a clone to every mount ([`FsConfig::mounts`]);
/// mounts in different registries never hear of each other. Cheap to clone.
#[derive(Clone, Default)]
pub struct Mounts {
    inner: Arc<MountsInner>,
}

#[derive(Default)]
struct MountsInner {
    live: Mutex<Vec<Registered>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Mounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mounts")
            .field("live", &self.live().len())
            .finish()
    }
}

impl Mounts {
    /// An empty registry.
    pub fn new() -> Mounts {
        Mounts::default()
    }

    fn live(&self) -> std::sync::MutexGuard<'_, Vec<Registered>> {
        self.inner.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells every mount of codebase `lower` in this registry that `paths` (relative to the
    /// codebase root) changed outside the mounts, e.g. after an upload, so that they show the
    /// change at once instead of after their cache TTL. Publishing calls this for the other
    /// mounts itself.
    pub fn codebase_changed(&self, lower: &Path, paths: &[PathBuf]) {
        self.notify(&lower_key(lower), paths, None);
    }

    fn notify(&self, lower: &Path, paths: &[PathBuf], except: Option<u64>) {
        let targets: Vec<(Arc<Shared>, Notifier)> = self
            .live()
            .iter()
            .filter(|r| r.lower == lower && Some(r.id) != except)
            .filter_map(|r| Some((r.shared.upgrade()?, r.notifier.clone())))
            .collect();
        for (shared, notifier) in targets {
            invalidate(&shared, &notifier, paths, true);
        }
    }

    fn register(&self, lower: PathBuf, shared: &Arc<Shared>, notifier: Notifier) -> u64 {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        self.live().push(Registered {
            id,
            lower,
            shared: Arc::downgrade(shared),
            notifier,
        });
        id
    }

    fn unregister(&self, id: u64) {
        self.live()
            .retain(|r| r.id != id && r.shared.strong_count() > 0);
    }
}

fn lower_key(lower: &Path) -> PathBuf {
    std::fs::canonicalize(lower).unwrap_or_else(|_| lower.to_path_buf())
}

/// Drops the kernel's cached names, attributes and pages for `paths` (relative to the
/// codebase root) in one mount. With `changed` (the codebase changed there), host files
/// cached for I/O on them are dropped too, and a path that no longer exists loses its node,
/// keeping its host file if the kernel may still have it open.
fn invalidate(shared: &Shared, notifier: &Notifier, paths: &[PathBuf], changed: bool) {
    // Before the kernel drops anything: a push of pages that raced with this change undoes
    // itself (see `prefetch`).
    {
        let _gate = shared.push_gate.write().unwrap_or_else(|p| p.into_inner());
        shared.cache_epoch.fetch_add(1, Ordering::SeqCst);
    }
    let (gone, present): (Vec<PathBuf>, Vec<PathBuf>) = if changed {
        paths
            .iter()
            .cloned()
            .partition(|p| matches!(shared.delta.lookup(p), Ok(None)))
    } else {
        (Vec::new(), Vec::new())
    };
    // A deleted file keeps the host file already open for it (a reader may be mid-file); a
    // changed one is re-opened on the next read.
    shared.pin_io(&gone);
    shared.invalidate_io(&present);
    // Directories shown only for traversal may appear or vanish with what changed below them.
    let mut ancestors: Vec<PathBuf> = Vec::new();
    if changed {
        let mut shown = shared.shown.lock().unwrap_or_else(|p| p.into_inner());
        for p in paths {
            ancestors.extend(shown.forget(p, true).into_iter().map(|(a, _)| a));
        }
    }
    ancestors.sort();
    ancestors.dedup();
    for a in &ancestors {
        let parent = a.parent().unwrap_or(Path::new(""));
        let ino = {
            let nodes = shared.nodes.lock().unwrap_or_else(|p| p.into_inner());
            nodes.by_path.get(parent).copied()
        };
        if let (Some(ino), Some(name)) = (ino, a.file_name()) {
            let _ = notifier.inval_entry(INodeNo(ino), name);
        }
    }
    let targets: Vec<(Option<u64>, Option<u64>, PathBuf)> = {
        let mut nodes = shared.nodes.lock().unwrap_or_else(|p| p.into_inner());
        let targets = paths
            .iter()
            .map(|p| {
                let parent = p.parent().and_then(|pp| nodes.by_path.get(pp).copied());
                (parent, nodes.by_path.get(p).copied(), p.clone())
            })
            .collect();
        for p in &gone {
            nodes.detach(p);
        }
        targets
    };
    for (parent, ino, path) in targets {
        // Best effort: the kernel answers ENOENT for entries it no longer caches.
        if let (Some(parent), Some(name)) = (parent, path.file_name()) {
            let _ = notifier.inval_entry(INodeNo(parent), name);
            let _ = notifier.inval_inode(INodeNo(parent), 0, 0);
        }
        if let Some(ino) = ino {
            let _ = notifier.inval_inode(INodeNo(ino), 0, 0);
        }
    }
}

/// Starts the thread that tells the kernel to forget directories that vanished from the view
/// after a removal through the mount (never from inside a request: the kernel may hold locks
/// that request is waiting for). It ends when the filesystem is dropped. Without it, the
/// kernel forgets them when their entry TTL ends.
fn forget_vanished(shared: &Shared, notifier: Notifier) {
    let (tx, rx) = std::sync::mpsc::channel::<(u64, std::ffi::OsString)>();
    let _ = shared.vanished.set(tx);
    std::thread::Builder::new()
        .name("fuse-vanished".into())
        .spawn(move || {
            for (parent, name) in rx {
                // Best effort: ENOENT when the kernel did not cache the name.
                let _ = notifier.inval_entry(INodeNo(parent), &name);
            }
        })
        .map(drop)
        .unwrap_or_else(|e| warn!(error = %e, "cannot start the fuse-vanished thread"));
}

/// Everything needed to mount one sandbox's view.
#[derive(Debug, Clone)]
pub struct FsConfig {
    /// Sandbox id, carried in audit events.
    pub sandbox_id: String,
    /// The codebase directory (never written except by publish).
    pub lower: PathBuf,
    /// The sandbox's delta directory (created if missing).
    pub delta: PathBuf,
    /// Where to mount (an existing empty directory).
    pub mountpoint: PathBuf,
    /// The sandbox's rules.
    pub policy: Policy,
    /// When writes are published.
    pub publish_mode: PublishMode,
    /// Let users other than the daemon's use the mount (`allow_other`): needed when the
    /// sandboxed process runs as another uid. Keep the mountpoint's parent private (0700).
    pub allow_other: bool,
    /// Present every file as owned by this (uid, gid), e.g. the sandbox user, so that tools
    /// like git do not see a foreign owner. `None` shows the host owner.
    pub owner: Option<(u32, u32)>,
    /// Kernel cache lifetime of names. Changes to the codebase made through [`FsConfig::mounts`]
    /// (another sandbox's publish, or an upload reported with [`Mounts::codebase_changed`])
    /// are invalidated at once; other changes become visible after at most this long.
    pub entry_ttl: Duration,
    /// Kernel cache lifetime of attributes.
    pub attr_ttl: Duration,
    /// FUSE worker threads.
    pub threads: usize,
    /// How opened files are served.
    pub io_mode: IoMode,
    /// Most host files the daemon holds open for this sandbox (files created and still open,
    /// opens in passthrough mode, files open after an unlink); past it, opening or creating
    /// fails with EMFILE inside this sandbox and a `LimitExceeded` event is sent. The daemon
    /// runs in the server's process: without this one sandbox could exhaust the descriptors
    /// every other sandbox and the API need.
    pub max_open_files: usize,
    /// Disk quota of the delta: allocated bytes and entries (0 = none). Past it, writes and
    /// creations fail with ENOSPC inside the sandbox, `df` on the mount shows the quota, and a
    /// `LimitExceeded` event with limit `disk` is sent; removing files makes room again.
    pub disk_bytes: u64,
    /// See [`FsConfig::disk_bytes`].
    pub disk_inodes: u64,
    /// The registry this mount joins: mounts of the same codebase in one registry see each
    /// other's publishes at once. [`FsConfig::new`] gives a registry of its own.
    pub mounts: Mounts,
}

/// Default of [`FsConfig::max_open_files`].
pub const DEFAULT_MAX_OPEN_FILES: usize = 8192;

impl FsConfig {
    /// A configuration with the defaults: publish after each command, `allow_other`, host
    /// owners, 60 s TTLs (with explicit invalidation), 2 threads.
    pub fn new(
        sandbox_id: impl Into<String>,
        lower: impl Into<PathBuf>,
        delta: impl Into<PathBuf>,
        mountpoint: impl Into<PathBuf>,
        policy: Policy,
    ) -> FsConfig {
        FsConfig {
            sandbox_id: sandbox_id.into(),
            lower: lower.into(),
            delta: delta.into(),
            mountpoint: mountpoint.into(),
            policy,
            publish_mode: PublishMode::default(),
            allow_other: true,
            owner: None,
            entry_ttl: DEFAULT_TTL,
            attr_ttl: DEFAULT_TTL,
            threads: 2,
            io_mode: IoMode::default(),
            max_open_files: DEFAULT_MAX_OPEN_FILES,
            disk_bytes: 0,
            disk_inodes: 0,
            mounts: Mounts::new(),
        }
    }
}

/// Counters of a live mount.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MountStats {
    /// Host files the daemon holds open for I/O (bounded cache plus files still open in the
    /// sandbox after an unlink).
    pub open_files: usize,
    /// Audit events dropped because the channel was full.
    pub dropped_events: u64,
    /// Opens handed to the kernel as passthrough files ([`IoMode::Passthrough`]).
    pub passthrough_opens: u64,
    /// Opens served by the daemon ([`IoMode::Passthrough`]: files this sandbox may write,
    /// or every open where the kernel offers no passthrough).
    pub daemon_opens: u64,
}

/// A mounted sandbox filesystem. Dropping it unmounts (lazily if busy).
pub struct MountHandle {
    session: Option<BackgroundSession>,
    id: u64,
    mounts: Mounts,
    lower: PathBuf,
    shared: Arc<Shared>,
    mountpoint: PathBuf,
    publish_mode: PublishMode,
}

impl std::fmt::Debug for MountHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MountHandle")
            .field("mountpoint", &self.mountpoint)
            .field("publish_mode", &self.publish_mode)
            .finish_non_exhaustive()
    }
}

/// Allocations at least this large get their own anonymous mapping (see [`tune_allocator_for_fuse`]).
const MMAP_THRESHOLD: usize = 4 << 20;

/// fuser gives the INIT handshake and every FUSE thread a zeroed ~16 MiB request buffer. With
/// glibc's dynamic mmap threshold, once one such buffer has been freed (the handshake's) the
/// threshold rises above its size, later buffers come from a malloc heap and `calloc` clears
/// them: 16 MiB resident per FUSE thread and milliseconds of `memset` per mount. A fixed
/// threshold keeps them fresh anonymous mappings, whose pages the kernel only populates where
/// a request is written (a few KiB for metadata requests). Process-wide, set once.
///
/// A library must not change a process-wide allocator setting behind its user's back: a
/// program that runs many mounts (the server, `agentfense run`) calls this once at startup.
pub fn tune_allocator_for_fuse() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // The trim threshold follows glibc's own dynamic rule (twice the mmap threshold),
            // so smaller allocations behave as before.
            // SAFETY: mallopt only changes allocator parameters and is thread-safe.
            let ok = unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as i32) == 1
                    && libc::mallopt(libc::M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD as i32) == 1
            };
            if !ok {
                warn!("mallopt failed: FUSE request buffers may stay resident");
            }
        });
    }
}

/// Mounts the sandbox view described by `config`; the FUSE session runs on background threads.
pub fn mount(config: FsConfig) -> Result<MountHandle, FsError> {
    let lower = lower_key(&config.lower);
    let delta = Delta::open(&config.lower, &config.delta)?;
    let shared = Arc::new(Shared::new(
        delta,
        Auditor::new(config.sandbox_id.clone()),
        config.policy,
    ));
    let weak = Arc::downgrade(&shared);
    shared.delta.usage().set_limits(
        config.disk_bytes,
        config.disk_inodes,
        Box::new(move |what| {
            if let Some(s) = weak.upgrade() {
                s.audit.limit_exceeded("disk", what);
            }
        }),
    );
    let opts = FsOptions {
        entry_ttl: config.entry_ttl,
        attr_ttl: config.attr_ttl,
        owner: config.owner,
        io_mode: config.io_mode,
        max_open_files: config.max_open_files,
    };
    let fs = PolicyFs::new(shared.clone(), opts);
    let mut fuse_config = Config::default();
    fuse_config.mount_options = vec![
        MountOption::FSName(FS_NAME.into()),
        MountOption::Subtype(FS_NAME.into()),
        MountOption::NoSuid,
        MountOption::NoDev,
        MountOption::NoAtime,
        // The kernel checks opens against the modes the rules shape (`file_attr`): in no-open
        // mode no OPEN reaches the daemon, and without this an O_RDWR open of a `read` file
        // would succeed and a shared mapping could change its cached pages for later commands.
        // Everything else is still decided by the rules, in the daemon.
        MountOption::DefaultPermissions,
    ];
    fuse_config.acl = if config.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    fuse_config.n_threads = Some(config.threads.max(1));
    let session = fuser::spawn_mount(fs, &config.mountpoint, &fuse_config).map_err(|source| {
        FsError::Mount {
            mountpoint: config.mountpoint.clone(),
            source,
        }
    })?;
    info!(mountpoint = %config.mountpoint.display(), sandbox_id = %config.sandbox_id, "mounted");
    read_ahead(&config.mountpoint);
    forget_vanished(&shared, session.notifier());
    crate::fuse::prefetch::start(&shared, session.notifier());
    let mounts = config.mounts;
    let id = mounts.register(lower.clone(), &shared, session.notifier());
    Ok(MountHandle {
        session: Some(session),
        id,
        mounts,
        lower,
        shared,
        mountpoint: config.mountpoint,
        publish_mode: config.publish_mode,
    })
}

/// Readahead of a mount, in KiB. The kernel gives a FUSE mount 128 KiB, so a first sequential
/// read of a large file costs a round trip (and a wake-up of the daemon) per 128 KiB; with
/// more, each READ carries as much as the connection allows (`max_pages`, 1 MiB) and several
/// are in flight while the reader copies.
const READ_AHEAD_KB: u32 = 4096;

/// Raises the readahead of the mount at `mountpoint` (its backing device's, in sysfs) to
/// [`READ_AHEAD_KB`]. Best effort: without it reads are only smaller.
fn read_ahead(mountpoint: &Path) {
    // The device number only: from the kernel's cached attributes, without a round trip to
    // the daemon (a plain stat would wait for the connection's INIT and a GETATTR).
    let Ok(st) = rustix::fs::statx(
        rustix::fs::CWD,
        mountpoint,
        rustix::fs::AtFlags::STATX_DONT_SYNC,
        rustix::fs::StatxFlags::empty(),
    ) else {
        return;
    };
    let knob = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        st.stx_dev_major, st.stx_dev_minor
    );
    if let Err(e) = std::fs::write(&knob, READ_AHEAD_KB.to_string()) {
        debug!(knob, error = %e, "cannot raise the mount's readahead");
    }
}

/// Whether the rules grant write on delta-relative `rel` (content conditions judged on the
/// file itself; called by publish, under the delta's lock).
fn writable(
    delta: &Delta,
    contents: &Mutex<ContentVerdicts>,
    policy: &Policy,
    rel: &Path,
    kind: EntryKind,
) -> bool {
    let mut cur = policy.cursor_root();
    for c in rel.components() {
        cur = policy.cursor_child(&cur, &c.as_os_str().to_string_lossy());
    }
    let kind = if kind == EntryKind::Dir {
        NodeKind::Dir
    } else {
        NodeKind::File
    };
    let mut holds = |c| crate::fuse::content::holds(delta, contents, rel, c);
    policy.decide_with(&cur, kind, &mut holds).level == Level::Write
}

impl MountHandle {
    /// The mount point.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The registry this mount is in ([`FsConfig::mounts`]).
    pub fn mounts(&self) -> &Mounts {
        &self.mounts
    }

    /// Publishes the changes made since the last publish to the codebase, whatever the
    /// publish mode. Paths the current rules do not let this sandbox write stay pending;
    /// conflicts are also sent as [`AuditEvent::PublishConflict`].
    pub fn publish(&self) -> Result<PublishReport, FsError> {
        let (policy, _) = self.shared.policy();
        let shared = &self.shared;
        let report = {
            // No write into a cached delta file while publish may drop it; afterwards the
            // next write re-resolves (and copies up again) instead of writing into a copy that
            // is gone.
            let _gate = shared.write_gate.write().unwrap_or_else(|p| p.into_inner());
            let report = shared.delta.publish(&PublishFilter {
                allow: &|p, k| writable(&shared.delta, &shared.contents, &policy, p, k),
                busy: &|p| shared.busy(p),
            })?;
            shared.invalidate_io(&report.written);
            report
        };
        self.after_publish(&report);
        Ok(report)
    }

    /// To be called after each command (exec or session command, whatever its outcome):
    /// publishes in [`PublishMode::AfterEachCommand`], does nothing in `Explicit` mode.
    pub fn command_finished(&self) -> Result<Option<PublishReport>, FsError> {
        match self.publish_mode {
            PublishMode::AfterEachCommand => self.publish().map(Some),
            PublishMode::Explicit => Ok(None),
        }
    }

    /// When this mount's writes are published.
    pub fn publish_mode(&self) -> PublishMode {
        self.publish_mode
    }

    /// Paths changed since the last publish.
    pub fn pending(&self) -> Vec<PathBuf> {
        self.shared.delta.pending()
    }

    /// Whether nothing is pending, without blocking (see [`Delta::surely_clean`]): lets an
    /// async caller skip handing an empty publish to a blocking thread after each command.
    pub fn surely_clean(&self) -> bool {
        self.shared.delta.surely_clean()
    }

    /// The pending changes with their kind (added / modified / deleted), for review.
    pub fn changes(&self) -> Vec<crate::Change> {
        self.shared.delta.changes()
    }

    /// The delta under this mount, for reading what changed ([`Delta::review`], checkpoints,
    /// comparisons). Changes go through the methods below, which keep the kernel's caches
    /// right.
    pub fn delta(&self) -> &Delta {
        &self.shared.delta
    }

    /// Applies the selected pending changes to the codebase, all or nothing: every path is
    /// checked first (writable under the current rules, the codebase unchanged under it, the
    /// `expected` bases), and nothing is written when one fails ([`Delta::apply`]).
    pub fn apply(
        &self,
        select: &Selection,
        expected: &BTreeMap<PathBuf, Option<[u8; 32]>>,
        content: &BTreeMap<PathBuf, Option<[u8; 32]>>,
    ) -> Result<PublishReport, ApplyRefusal> {
        let (policy, _) = self.shared.policy();
        let shared = &self.shared;
        let report = {
            let _gate = shared.write_gate.write().unwrap_or_else(|p| p.into_inner());
            let report = shared.delta.apply_pinned(
                select,
                expected,
                content,
                &|p, k| writable(&shared.delta, &shared.contents, &policy, p, k),
                &|p| shared.busy(p),
            )?;
            shared.invalidate_io(&report.written);
            report
        };
        self.after_publish(&report);
        Ok(report)
    }

    /// Drops the selected changes from the delta; the mount shows the codebase there at once.
    pub fn discard(&self, select: &Selection) -> Result<Vec<PathBuf>, FsError> {
        let paths = self.exclusive(|d| d.discard(select))?;
        self.refresh(&paths);
        Ok(paths)
    }

    /// Saves the delta as a checkpoint ([`Delta::checkpoint_as`]); writes wait meanwhile.
    pub fn checkpoint(&self, label: &str, by_agent: bool) -> Result<CheckpointInfo, FsError> {
        self.exclusive(|d| d.checkpoint_as(label, by_agent))
    }

    /// Brings the delta back to checkpoint `id`; the mount shows it at once.
    pub fn restore_checkpoint(&self, id: &str) -> Result<Vec<PathBuf>, FsError> {
        let paths = self.exclusive(|d| d.restore_checkpoint(id))?;
        self.refresh(&paths);
        Ok(paths)
    }

    /// Runs `f` on the delta with writes through cached files held off (the write gate).
    fn exclusive<T>(&self, f: impl FnOnce(&Delta) -> T) -> T {
        let _gate = self
            .shared
            .write_gate
            .write()
            .unwrap_or_else(|p| p.into_inner());
        f(&self.shared.delta)
    }

    /// After the delta changed under the mount at `paths`: drops what the kernel and the
    /// daemon cached of them.
    fn refresh(&self, paths: &[PathBuf]) {
        if let Some(session) = &self.session {
            invalidate(&self.shared, &session.notifier(), paths, true);
        }
    }

    /// Reports a publish's conflicts and refusals and tells the codebase's other mounts.
    fn after_publish(&self, report: &PublishReport) {
        let shared = &self.shared;
        for c in &report.conflicts {
            warn!(path = %c.path.display(), "publish conflict: codebase changed since copy-up");
            shared.audit.conflict(c.clone());
        }
        for (p, why) in &report.failed {
            warn!(path = %p.display(), reason = %why, "publish failed for path");
        }
        for (p, target) in &report.refused {
            warn!(path = %p.display(), target = %target, "symlink leaving the project not published");
            shared.audit.refused(p, target);
        }
        let changed: Vec<PathBuf> = report
            .written
            .iter()
            .chain(&report.deleted)
            .cloned()
            .collect();
        if !changed.is_empty() {
            self.mounts.notify(&self.lower, &changed, Some(self.id));
        }
        shared.audit.flush();
    }

    /// Replaces the rules on the live mount and drops the kernel's cached names so that the
    /// new rules apply at once.
    pub fn set_policy(&self, policy: Policy) {
        self.shared.set_policy(policy);
        let Some(session) = &self.session else { return };
        let paths: Vec<PathBuf> = {
            let nodes = self.shared.nodes.lock().unwrap_or_else(|p| p.into_inner());
            nodes.by_path.keys().cloned().collect()
        };
        invalidate(&self.shared, &session.notifier(), &paths, false);
    }

    /// Audit events (denials, publish conflicts). The channel is bounded; events that do not
    /// fit are dropped and counted ([`MountHandle::dropped_events`]).
    pub fn events(&self) -> Receiver<AuditEvent> {
        self.shared.audit.receiver()
    }

    /// How many audit events were dropped because the channel was full.
    pub fn dropped_events(&self) -> u64 {
        self.shared.audit.dropped()
    }

    /// Counts the file system `fd` is on (the sandbox's `/tmp`, see
    /// `agentfense_runtime::Runtime::scratch`) against the disk quota, with the delta; its size
    /// follows the room the quota leaves, at most `cap` bytes when that is not 0.
    pub fn count_scratch(&self, fd: std::os::fd::OwnedFd, cap: u64) {
        self.shared.delta.usage().set_scratch(fd, cap);
    }

    /// Counters (host files held, dropped events, opens by kind).
    pub fn stats(&self) -> MountStats {
        MountStats {
            open_files: self
                .shared
                .io
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .len(),
            dropped_events: self.shared.audit.dropped(),
            passthrough_opens: self.shared.passthrough_opens.load(Ordering::Relaxed),
            daemon_opens: self.shared.daemon_opens.load(Ordering::Relaxed),
        }
    }

    /// Unmounts and waits for the session to end; falls back to a lazy unmount when the
    /// mount is busy.
    pub fn unmount(mut self) -> Result<(), FsError> {
        self.unmount_inner()
    }

    fn unmount_inner(&mut self) -> Result<(), FsError> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        self.mounts.unregister(self.id);
        self.shared.audit.flush();
        if let Err(e) = session.umount_and_join() {
            warn!(mountpoint = %self.mountpoint.display(), error = %e, "unmount failed; detaching");
            detach(&self.mountpoint)?;
        }
        info!(mountpoint = %self.mountpoint.display(), "unmounted");
        Ok(())
    }
}

impl Drop for MountHandle {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_inner() {
            warn!(error = %e, "unmount on drop failed");
        }
    }
}

/// Publishes a delta that is not mounted (a stopped sandbox), like [`MountHandle::publish`]:
/// only paths `policy` lets the sandbox write are applied, and live mounts of the codebase
/// are told.
pub fn publish_unmounted(
    lower: &Path,
    delta: &Path,
    policy: &Policy,
    mounts: &Mounts,
) -> Result<PublishReport, FsError> {
    let delta = Delta::open(lower, delta)?;
    let contents = Mutex::new(ContentVerdicts::default());
    let report = delta.publish(&PublishFilter {
        allow: &|p, k| writable(&delta, &contents, policy, p, k),
        busy: &|_| false,
    })?;
    let changed: Vec<PathBuf> = report
        .written
        .iter()
        .chain(&report.deleted)
        .cloned()
        .collect();
    if !changed.is_empty() {
        mounts.notify(&lower_key(lower), &changed, None);
    }
    Ok(report)
}

/// Whether the rules let the sandbox read the codebase's own entry at `rel` (every directory on
/// the way visible, the entry at least `read`, content conditions judged on the codebase's
/// file): what a caller acting for the sandbox (its token) may be shown of the codebase in a
/// review ([`Selection::revealing`]). Fails closed: a file that cannot be judged is hidden.
pub fn codebase_reader(lower: &Path, policy: Policy) -> Result<crate::Reveal, FsError> {
    let root = rustix::fs::open(
        lower,
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| FsError::io("open codebase", lower, e.into()))?;
    Ok(Arc::new(move |rel: &Path| {
        let mut cur = policy.cursor_root();
        let names: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        for (i, name) in names.iter().enumerate() {
            cur = policy.cursor_child(&cur, name);
            if i + 1 < names.len()
                && policy.decide_with(&cur, NodeKind::Dir, &mut |_| true).level == Level::None
            {
                return false;
            }
        }
        let mut holds = |c: agentfense_core::Content| lower_holds(&root, rel, c);
        policy.decide_with(&cur, NodeKind::File, &mut holds).level >= Level::Read
    }))
}

/// Whether the codebase's file `rel` holds `content` (a missing or special file holds
/// nothing; one that cannot be read, or is too large to scan, holds it: fail closed).
fn lower_holds(root: &std::os::fd::OwnedFd, rel: &Path, content: agentfense_core::Content) -> bool {
    use std::io::Read;
    use std::os::fd::AsFd;
    let file = match crate::host::open_file(root.as_fd(), rel, rustix::fs::OFlags::RDONLY) {
        Ok(f) => std::fs::File::from(f),
        Err(e) => {
            return !(e.kind() == std::io::ErrorKind::NotFound
                || matches!(e.raw_os_error(), Some(libc::ELOOP | libc::EOPNOTSUPP)));
        }
    };
    let mut data = Vec::new();
    if file
        .take(agentfense_core::MAX_SCANNED + 1)
        .read_to_end(&mut data)
        .is_err()
        || data.len() as u64 > agentfense_core::MAX_SCANNED
    {
        return true;
    }
    content.holds(&data)
}

/// Applies a delta that is not mounted (a stopped sandbox), like [`MountHandle::apply`]:
/// all or nothing, only paths `policy` lets the sandbox write; live mounts of the codebase are
/// told.
pub fn apply_unmounted(
    delta: &Delta,
    policy: &Policy,
    mounts: &Mounts,
    select: &Selection,
    expected: &BTreeMap<PathBuf, Option<[u8; 32]>>,
    content: &BTreeMap<PathBuf, Option<[u8; 32]>>,
) -> Result<PublishReport, ApplyRefusal> {
    let contents = Mutex::new(ContentVerdicts::default());
    let report = delta.apply_pinned(
        select,
        expected,
        content,
        &|p, k| writable(delta, &contents, policy, p, k),
        &|_| false,
    )?;
    let changed: Vec<PathBuf> = report
        .written
        .iter()
        .chain(&report.deleted)
        .cloned()
        .collect();
    if !changed.is_empty() {
        mounts.notify(&lower_key(delta.lower_path()), &changed, None);
    }
    Ok(report)
}

/// Lazily unmounts `mountpoint` (`umount2(MNT_DETACH)`).
pub fn detach(mountpoint: &Path) -> Result<(), FsError> {
    rustix::mount::unmount(mountpoint, rustix::mount::UnmountFlags::DETACH)
        .map_err(|e| FsError::io("lazy unmount", mountpoint, e.into()))
}

/// Undoes the escaping of `/proc/self/mountinfo` fields (`\040` for a space, ...).
fn unescape(field: &str) -> PathBuf {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && let Some(Ok(v)) = field.get(i + 1..i + 4).map(|s| u8::from_str_radix(s, 8))
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(std::ffi::OsString::from(
        <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&out),
    ))
}

/// Our FUSE mounts at or below `under` listed in a mountinfo text.
fn stale_in(mountinfo: &str, under: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mp) = left.split(' ').nth(4) else {
            continue;
        };
        let mut fields = right.split(' ');
        let fstype = fields.next().unwrap_or("");
        let source = fields.next().unwrap_or("");
        // The kernel shows `fuse.agentfense` when the subtype is applied, else plain `fuse`
        // with our fsname as the source.
        let ours = fstype == format!("fuse.{FS_NAME}") || (fstype == "fuse" && source == FS_NAME);
        if !ours {
            continue;
        }
        let mp = unescape(mp);
        if mp.starts_with(under) {
            out.push(mp);
        }
    }
    // Deepest first.
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out
}

/// Lazily unmounts every AgentFense FUSE mount at or below `under` (left behind by a crashed
/// server); call at startup. Returns the mount points it detached.
pub fn cleanup_stale_mounts(under: &Path) -> Result<Vec<PathBuf>, FsError> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| FsError::io("read mountinfo", "/proc/self/mountinfo", e))?;
    let stale = stale_in(&info, under);
    for mp in &stale {
        detach(mp)?;
        info!(mountpoint = %mp.display(), "detached stale mount");
    }
    Ok(stale)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    #[test]
    fn stale_mounts_are_found_in_mountinfo() {
        let info = "\
22 1 254:0 / / rw,relatime - ext4 /dev/vda rw
90 22 0:50 / /srv/mounts/sb\\0401 rw,nosuid - fuse.agentfense agentfense rw,user_id=0
91 22 0:51 / /srv/mounts/sb2/inner rw - fuse.agentfense agentfense rw
92 22 0:52 / /srv/other rw - fuse.agentfense agentfense rw
93 22 0:53 / /srv/mounts/x rw - fuse.sshfs host rw
94 22 0:54 / /srv/mounts/plain rw,nosuid - fuse agentfense rw,user_id=0
95 22 0:55 / /srv/mounts/other rw - fuse bindfs rw
";
        assert_eq!(
            stale_in(info, Path::new("/srv/mounts")),
            [
                PathBuf::from("/srv/mounts/sb2/inner"),
                PathBuf::from("/srv/mounts/sb 1"),
                PathBuf::from("/srv/mounts/plain"),
            ]
        );
    }
}

#[cfg(test)]
mod send_sync {
    /// The server keeps handles in shared async state.
    #[test]
    fn handles_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<super::MountHandle>();
        check::<super::FsConfig>();
        check::<crate::Delta>();
    }
}
