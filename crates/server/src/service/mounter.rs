//! The seam between the sandbox lifecycle and the policy filesystem.
//!
//! The lifecycle only needs what [`Mounted`] offers of a mount; [`Mounter`] makes them.
//! [`FuseMounter`] is the real one (FUSE, root); tests use a fake, so that create, start,
//! stop, destroy, recovery, reaping and quotas are tested in milliseconds without root.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use agentfense_fs::{
    ApplyRefusal, AuditEvent, CheckpointInfo, Delta, FsConfig, FsError, MountHandle, PublishMode,
    PublishReport, Selection,
};

/// Makes sandbox filesystems.
pub trait Mounter: Send + Sync {
    /// Mounts the view `cfg` describes (blocking: call it from `spawn_blocking`).
    fn mount(&self, cfg: FsConfig) -> Result<Box<dyn Mounted>, FsError>;

    /// Detaches mounts a crashed earlier process left under `dir`; returns them.
    fn cleanup_stale(&self, dir: &Path) -> Result<Vec<PathBuf>, FsError>;
}

/// One mounted sandbox filesystem, as the lifecycle uses it (see [`MountHandle`]).
pub trait Mounted: Send + Sync + std::fmt::Debug {
    /// Publishes what changed since the last publish.
    fn publish(&self) -> Result<PublishReport, FsError>;
    /// After each command: publishes unless the sandbox publishes explicitly.
    fn command_finished(&self) -> Result<Option<PublishReport>, FsError>;
    /// When writes are published.
    fn publish_mode(&self) -> PublishMode;
    /// Paths changed since the last publish.
    fn pending(&self) -> Vec<PathBuf>;
    /// Whether nothing is pending, without blocking.
    fn surely_clean(&self) -> bool;
    /// The filesystem's audit events (denials, conflicts, limits).
    fn events(&self) -> crossbeam_channel::Receiver<AuditEvent>;
    /// Counts the sandbox's `/tmp` against its disk quota.
    fn count_scratch(&self, tmp: OwnedFd, cap: u64);
    /// Unmounts (blocking).
    fn unmount(self: Box<Self>) -> Result<(), FsError>;

    /// The delta under the mount, for review; `None` when the mount has none of its own to
    /// show (a test's fake), and then review opens the delta directory.
    fn delta(&self) -> Option<&Delta> {
        None
    }
    /// Applies selected pending changes, all or nothing ([`MountHandle::apply`]).
    fn apply(
        &self,
        _select: &Selection,
        _expected: &BTreeMap<PathBuf, Option<[u8; 32]>>,
        _content: &BTreeMap<PathBuf, Option<[u8; 32]>>,
    ) -> Result<PublishReport, ApplyRefusal> {
        Err(ApplyRefusal::Fs(unsupported("apply")))
    }
    /// Drops selected changes ([`MountHandle::discard`]).
    fn discard(&self, _select: &Selection) -> Result<Vec<PathBuf>, FsError> {
        Err(unsupported("discard"))
    }
    /// Takes a checkpoint ([`MountHandle::checkpoint`]).
    fn checkpoint(&self, _label: &str, _by_agent: bool) -> Result<CheckpointInfo, FsError> {
        Err(unsupported("checkpoint"))
    }
    /// Restores a checkpoint ([`MountHandle::restore_checkpoint`]).
    fn restore_checkpoint(&self, _id: &str) -> Result<Vec<PathBuf>, FsError> {
        Err(unsupported("restore"))
    }
}

fn unsupported(op: &'static str) -> FsError {
    FsError::NotSupported {
        op,
        path: PathBuf::new(),
    }
}

/// The real filesystem: [`agentfense_fs::mount`].
#[derive(Debug, Default, Clone, Copy)]
pub struct FuseMounter;

impl Mounter for FuseMounter {
    fn mount(&self, cfg: FsConfig) -> Result<Box<dyn Mounted>, FsError> {
        Ok(Box::new(agentfense_fs::mount(cfg)?))
    }

    fn cleanup_stale(&self, dir: &Path) -> Result<Vec<PathBuf>, FsError> {
        agentfense_fs::cleanup_stale_mounts(dir)
    }
}

impl Mounted for MountHandle {
    fn publish(&self) -> Result<PublishReport, FsError> {
        MountHandle::publish(self)
    }
    fn command_finished(&self) -> Result<Option<PublishReport>, FsError> {
        MountHandle::command_finished(self)
    }
    fn publish_mode(&self) -> PublishMode {
        MountHandle::publish_mode(self)
    }
    fn pending(&self) -> Vec<PathBuf> {
        MountHandle::pending(self)
    }
    fn surely_clean(&self) -> bool {
        MountHandle::surely_clean(self)
    }
    fn events(&self) -> crossbeam_channel::Receiver<AuditEvent> {
        MountHandle::events(self)
    }
    fn count_scratch(&self, tmp: OwnedFd, cap: u64) {
        MountHandle::count_scratch(self, tmp, cap)
    }
    fn unmount(self: Box<Self>) -> Result<(), FsError> {
        MountHandle::unmount(*self)
    }
    fn delta(&self) -> Option<&Delta> {
        Some(MountHandle::delta(self))
    }
    fn apply(
        &self,
        select: &Selection,
        expected: &BTreeMap<PathBuf, Option<[u8; 32]>>,
        content: &BTreeMap<PathBuf, Option<[u8; 32]>>,
    ) -> Result<PublishReport, ApplyRefusal> {
        MountHandle::apply(self, select, expected, content)
    }
    fn discard(&self, select: &Selection) -> Result<Vec<PathBuf>, FsError> {
        MountHandle::discard(self, select)
    }
    fn checkpoint(&self, label: &str, by_agent: bool) -> Result<CheckpointInfo, FsError> {
        MountHandle::checkpoint(self, label, by_agent)
    }
    fn restore_checkpoint(&self, id: &str) -> Result<Vec<PathBuf>, FsError> {
        MountHandle::restore_checkpoint(self, id)
    }
}
