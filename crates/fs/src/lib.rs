//! The policy filesystem: FUSE enforcement over a copy-on-write delta.
//!
//! One mount per running sandbox shows a codebase directory (the read-only *lower* layer,
//! shared by every sandbox of that codebase) through the sandbox's rules; every write goes to
//! the sandbox's own *delta* directory and reaches the codebase only through
//! [`MountHandle::publish`].
//!
//! * [`delta`]: the copy-on-write layer as plain logic over (codebase, delta) directories:
//!   whiteouts kept outside the agent's namespace, an append-only change journal, publish of
//!   only what changed since the last publish with conflict detection. Tested without FUSE.
//! * `host` (private): the only place that opens host paths, always beneath a layer root with
//!   `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, never through a symlink.
//! * `fuse` (private): the thin `fuser::Filesystem` adapter that enforces the rules (table in
//!   its module docs). By default ([`IoMode::NoOpen`]) opens cost no round trip: the rules
//!   apply to every read, write and metadata change instead, and warm reads come from the
//!   page cache; best for source trees. [`IoMode::Passthrough`] decides at open and hands
//!   read-only files to the kernel as passthrough files: native speed on large files, one
//!   round trip per open.
//! * [`mount()`] / [`MountHandle`]: what the server uses. Denials and publish conflicts come
//!   out of [`MountHandle::events`] as [`AuditEvent`]s.
//! * [`FsError`]: the crate's error, with the one `FsError -> errno` table
//!   ([`FsError::errno`]).
//!
//! ## Contract for the server
//! * [`mount()`], [`MountHandle::publish`] and [`MountHandle::unmount`] block (file I/O): call
//!   them from `spawn_blocking`.
//! * After every command call [`MountHandle::command_finished`] (publishes unless the sandbox
//!   uses [`PublishMode::Explicit`]).
//! * Give every mount the same [`Mounts`] registry ([`FsConfig::mounts`]). After writing to a
//!   codebase directory yourself (uploads), call [`Mounts::codebase_changed`] so that live
//!   mounts drop their cached entries at once; otherwise they see the change after
//!   [`FsConfig::entry_ttl`]. Publishes notify the other mounts of the registry themselves.
//! * Call [`tune_allocator_for_fuse`] once at startup in a program that runs many mounts.
//! * At startup, [`cleanup_stale_mounts`] detaches mounts left by a crashed server.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use agentfense_core::{Policy, presets};
//! use agentfense_fs::{FsConfig, mount};
//!
//! let policy = Policy::compile(presets::get("agent-safe").ok_or("preset")?.rules())?;
//! let handle = mount(FsConfig::new("sb-1", "/srv/codebases/c1", "/srv/deltas/sb-1",
//!     "/srv/mounts/sb-1", policy))?;
//! // ... run a command in the sandbox with /srv/mounts/sb-1 bound at /workspace ...
//! let report = handle.command_finished()?;
//! for event in handle.events().try_iter() {
//!     println!("{event:?}");
//! }
//! handle.unmount()?;
//! # let _ = report;
//! # Ok(())
//! # }
//! ```

mod audit;
pub mod counters;
pub mod delta;
mod error;
mod fuse;
mod host;
mod modes;
mod mount;
pub mod quota;
pub mod review;

pub use audit::{AGGREGATION_WINDOW, AuditEvent, CHANNEL_CAPACITY};
pub use delta::{
    ApplyConflict, ApplyRefusal, Attr, Change, ChangeKind, ChangeSet, ChangeStatus, CheckpointInfo,
    Conflict, DIFF_FILE_MAX, Delta, EntryKind, Layer, Origin, PathChange, PublishFilter,
    PublishReport, Reveal, Selection, View, compare, diff, diff_of, hex_digest, link_escapes,
    parse_digest, parse_expectation, valid_checkpoint_id,
};
pub use error::FsError;
pub use mount::{
    DEFAULT_MAX_OPEN_FILES, DEFAULT_TTL, FS_NAME, FsConfig, IoMode, MountHandle, MountStats,
    Mounts, PublishMode, apply_unmounted, cleanup_stale_mounts, codebase_reader, detach, mount,
    publish_unmounted, tune_allocator_for_fuse,
};
