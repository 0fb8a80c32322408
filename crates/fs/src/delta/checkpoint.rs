//! Checkpoints: saved states of the delta that the sandbox can be brought back to.
//!
//! A checkpoint is `<delta>/checkpoints/<id>/` holding a copy of `upper/` and a snapshot of
//! the journal (`meta`), plus its description (`info`). Only the delta is copied, never the
//! codebase, and files are cloned (`FICLONE`: shared extents on btrfs and XFS) where the file
//! system can, so a checkpoint costs what the agent changed at most. Checkpoints count against
//! the sandbox's disk quota.
//!
//! A checkpoint is built under a dot name and renamed into place, so a crash leaves either
//! none or a whole one. A restore first records which checkpoint it brings back
//! (`<delta>/restoring`); opening the delta finishes a restore a crash interrupted.

use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};

use super::*;

/// Directory of the checkpoints inside a delta directory.
pub(crate) const CHECKPOINTS: &str = "checkpoints";
/// Marker of a restore in progress.
const RESTORING: &str = "restoring";

/// A checkpoint's description.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointInfo {
    /// Its id (`cp-<n>`, increasing within a sandbox).
    pub id: String,
    /// What the caller called it (`auto` checkpoints name the command that followed).
    pub label: String,
    /// When it was taken.
    pub created: SystemTime,
    /// How many changed paths it holds.
    pub paths: usize,
    /// What its copy takes on disk.
    pub bytes: u64,
    /// Taken for the agent (its sandbox token, or automatically before a command) rather
    /// than by a reviewer: retention counts the two apart, so the agent's checkpoints never
    /// push a reviewer's out.
    pub by_agent: bool,
}

fn lock_cp(m: &Mutex<()>) -> MutexGuard<'_, ()> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether `id` has the shape of a checkpoint id (never a path).
pub fn valid_checkpoint_id(id: &str) -> bool {
    id.strip_prefix("cp-")
        .is_some_and(|n| !n.is_empty() && n.len() <= 19 && n.bytes().all(|b| b.is_ascii_digit()))
}

fn ns(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

impl CheckpointInfo {
    fn encode(&self) -> String {
        format!(
            "label {}\ncreated {}\npaths {}\nbytes {}\nagent {}\n",
            hex(self.label.as_bytes()),
            ns(self.created),
            self.paths,
            self.bytes,
            u8::from(self.by_agent)
        )
    }

    fn decode(id: &str, text: &str) -> Option<CheckpointInfo> {
        let mut info = CheckpointInfo {
            id: id.to_owned(),
            label: String::new(),
            created: UNIX_EPOCH,
            paths: 0,
            bytes: 0,
            by_agent: false,
        };
        for l in text.lines() {
            let (k, v) = l.split_once(' ')?;
            match k {
                "label" => info.label = String::from_utf8(unhex(v)?).ok()?,
                "created" => {
                    let n: u128 = v.parse().ok()?;
                    info.created = UNIX_EPOCH
                        + Duration::new(
                            u64::try_from(n / 1_000_000_000).ok()?,
                            u32::try_from(n % 1_000_000_000).ok()?,
                        );
                }
                "paths" => info.paths = v.parse().ok()?,
                "bytes" => info.bytes = v.parse().ok()?,
                "agent" => info.by_agent = v == "1",
                _ => {}
            }
        }
        Some(info)
    }
}

/// Copies the tree below `src` into the empty directory `dst`: modes, times, owners, user
/// extended attributes, symlinks as links (never followed), hard links kept as links. Regular
/// files are cloned where the file system can. Fifos and sockets are left out.
fn copy_tree(src: &Path, dst: &Path) -> io::Result<()> {
    let mut links: std::collections::HashMap<(u64, u64), PathBuf> = Default::default();
    copy_dir(src, dst, &mut links)
}

fn copy_dir(
    src: &Path,
    dst: &Path,
    links: &mut std::collections::HashMap<(u64, u64), PathBuf>,
) -> io::Result<()> {
    for e in std::fs::read_dir(src)? {
        let e = e?;
        let (from, to) = (e.path(), dst.join(e.file_name()));
        let m = from.symlink_metadata()?;
        let ft = m.file_type();
        if ft.is_dir() {
            std::fs::create_dir(&to)?;
            copy_dir(&from, &to, links)?;
            let d = File::open(&to)?;
            if let Ok(s) = File::open(&from) {
                super::xattr::copy_user(s.as_fd(), d.as_fd());
            }
            finish(&d, &m)?;
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&from)?, &to)?;
            let _ = std::os::unix::fs::lchown(&to, Some(m.uid()), Some(m.gid()));
        } else if ft.is_file() {
            if m.nlink() > 1
                && let Some(first) = links.get(&(m.dev(), m.ino()))
            {
                std::fs::hard_link(first, &to)?;
                continue;
            }
            let s = File::options()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&from)?;
            let mut d = File::options()
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_NOFOLLOW)
                .mode(0o600)
                .open(&to)?;
            if rustix::fs::ioctl_ficlone(&d, &s).is_err() {
                copy_sparse(&s, &mut d, m.len())?;
            }
            super::xattr::copy_user(s.as_fd(), d.as_fd());
            finish(&d, &m)?;
            if m.nlink() > 1 {
                links.insert((m.dev(), m.ino()), to);
            }
        }
    }
    Ok(())
}

/// Copies `len` bytes of `s` into the empty `d`, holes as holes: a sparse file the agent made
/// takes no more room in a checkpoint (or a restored delta) than in the sandbox, where the
/// quota measured it.
fn copy_sparse(s: &File, d: &mut File, len: u64) -> io::Result<()> {
    use rustix::fs::SeekFrom;
    let mut off = 0u64;
    while off < len {
        let data = match rustix::fs::seek(s, SeekFrom::Data(off)) {
            Ok(p) => p,
            // No data past `off`: the rest is a hole.
            Err(rustix::io::Errno::NXIO) => break,
            // No SEEK_DATA here: everything is data.
            Err(rustix::io::Errno::INVAL) if off == 0 => 0,
            Err(e) => return Err(e.into()),
        };
        let hole = match rustix::fs::seek(s, SeekFrom::Hole(data)) {
            Ok(p) => p.min(len),
            Err(_) => len,
        };
        copy_range(s, d, data, hole)?;
        off = hole.max(data + 1);
    }
    d.set_len(len)
}

/// Copies bytes `[from, to)` of `s` to the same offsets of `d`.
fn copy_range(s: &File, d: &File, from: u64, to: u64) -> io::Result<()> {
    let (mut i, mut o) = (from, from);
    while i < to {
        let want = usize::try_from(to - i).unwrap_or(usize::MAX).min(1 << 30);
        match rustix::fs::copy_file_range(s, Some(&mut i), d, Some(&mut o), want) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            // Across file systems on older kernels: by hand.
            Err(_) => {
                let mut buf = vec![0u8; 256 << 10];
                while i < to {
                    let n = usize::try_from(to - i).unwrap_or(buf.len()).min(buf.len());
                    let got = rustix::io::pread(s, &mut buf[..n], i)?;
                    if got == 0 {
                        return Ok(());
                    }
                    let mut done = 0;
                    while done < got {
                        done += rustix::io::pwrite(d, &buf[done..got], o + done as u64)?;
                    }
                    i += got as u64;
                    o += got as u64;
                }
            }
        }
    }
    Ok(())
}

/// Gives `f` the mode, owner and times of `m`.
fn finish(f: &File, m: &std::fs::Metadata) -> io::Result<()> {
    f.set_permissions(std::fs::Permissions::from_mode(m.mode() & 0o7777))?;
    // Ownership is best effort (the daemon may not be root).
    let _ = rustix::fs::fchown(
        f,
        Some(rustix::fs::Uid::from_raw(m.uid())),
        Some(rustix::fs::Gid::from_raw(m.gid())),
    );
    let times = std::fs::FileTimes::new()
        .set_accessed(m.accessed()?)
        .set_modified(m.modified()?);
    f.set_times(times)
}

/// Empties directory `dir` (not following links).
fn clear_dir(dir: &Path) -> io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            std::fs::remove_dir_all(e.path())?;
        } else {
            std::fs::remove_file(e.path())?;
        }
    }
    Ok(())
}

/// Brings the delta at `delta_dir` back to checkpoint `id`'s files (upper and journal), with
/// the restore marker set while it runs. The caller holds the delta's lock (or it is not
/// open yet).
fn restore_files(delta_dir: &Path, id: &str) -> io::Result<Vec<u8>> {
    let cp = delta_dir.join(CHECKPOINTS).join(id);
    let meta = std::fs::read(cp.join("meta"))?;
    let marker = delta_dir.join(RESTORING);
    let tmp_marker = delta_dir.join("restoring.tmp");
    std::fs::write(&tmp_marker, id)?;
    File::open(&tmp_marker)?.sync_all()?;
    std::fs::rename(&tmp_marker, &marker)?;
    File::open(delta_dir)?.sync_all()?;
    let upper = delta_dir.join("upper");
    clear_dir(&upper)?;
    copy_tree(&cp.join("upper"), &upper)?;
    let tmp = delta_dir.join("meta.restore");
    std::fs::write(&tmp, &meta)?;
    File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, delta_dir.join("meta"))?;
    Ok(meta)
}

/// Finishes a restore that a crash interrupted (called when a delta is opened).
pub(super) fn finish_interrupted_restore(delta_dir: &Path) -> Result<(), FsError> {
    let marker = delta_dir.join(RESTORING);
    let id = match std::fs::read_to_string(&marker) {
        Ok(id) => id.trim().to_owned(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(FsError::io("read restore marker", &marker, e)),
    };
    // A half-restored delta must not be used as if it were whole.
    if !valid_checkpoint_id(&id) || !delta_dir.join(CHECKPOINTS).join(&id).is_dir() {
        return Err(FsError::io(
            "finish an interrupted restore",
            &marker,
            io::Error::other(format!(
                "checkpoint {id:?} is gone: the delta is half restored; discard it"
            )),
        ));
    }
    tracing::warn!(delta = %delta_dir.display(), checkpoint = %id, "finishing an interrupted restore");
    restore_files(delta_dir, &id)
        .map_err(|e| FsError::io("finish interrupted restore", delta_dir, e))?;
    std::fs::remove_file(&marker).map_err(|e| FsError::io("remove restore marker", &marker, e))
}

impl Delta {
    fn checkpoints_dir(&self) -> PathBuf {
        self.dir.join(CHECKPOINTS)
    }

    fn checkpoint_dir(&self, id: &str) -> Result<PathBuf, FsError> {
        let dir = self.checkpoints_dir().join(id);
        if !valid_checkpoint_id(id) || !dir.is_dir() {
            return Err(FsError::NotFound {
                path: PathBuf::from(format!("checkpoint {id}")),
            });
        }
        Ok(dir)
    }

    /// Removes what a crash left of checkpoints being built or deleted (dot names).
    pub(super) fn remove_stale_checkpoints(&self) {
        let Ok(entries) = std::fs::read_dir(self.checkpoints_dir()) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            if name.to_string_lossy().starts_with('.') && e.path().is_dir() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }

    /// Counts the checkpoints' copies against the disk quota.
    pub(super) fn measure_checkpoints(&self) {
        self.usage
            .set_checkpoints(footprint_below(&self.checkpoints_dir()));
    }

    /// Saves the delta's present state as a checkpoint (a reviewer's). Fails with `NoSpace`
    /// when its copy would not fit in the disk quota.
    pub fn checkpoint(&self, label: &str) -> Result<CheckpointInfo, FsError> {
        self.checkpoint_as(label, false)
    }

    /// Like [`Delta::checkpoint`], saying whether it is taken for the agent.
    pub fn checkpoint_as(&self, label: &str, by_agent: bool) -> Result<CheckpointInfo, FsError> {
        let _cp = lock_cp(&self.checkpoints_lock);
        let root = self.checkpoints_dir();
        std::fs::create_dir_all(&root).map_err(|e| FsError::io("create checkpoints", &root, e))?;
        let meta = self.lock();
        let upper = self.dir.join("upper");
        let (bytes, inodes) = footprint_below(&upper);
        self.usage.check_room(
            u64::try_from(bytes).unwrap_or(0),
            u64::try_from(inodes).unwrap_or(0),
        )?;
        let counter = root.join("next");
        let n: u64 = std::fs::read_to_string(&counter)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1);
        let id = format!("cp-{n}");
        std::fs::write(&counter, format!("{}\n", n + 1))
            .map_err(|e| FsError::io("write checkpoint counter", &counter, e))?;
        let tmp = root.join(format!(".{id}"));
        let _ = std::fs::remove_dir_all(&tmp);
        let build = || -> io::Result<CheckpointInfo> {
            std::fs::create_dir(&tmp)?;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o700))?;
            std::fs::create_dir(tmp.join("upper"))?;
            copy_tree(&upper, &tmp.join("upper"))?;
            std::fs::write(tmp.join("meta"), meta.snapshot())?;
            let info = CheckpointInfo {
                id: id.clone(),
                label: label.to_owned(),
                created: SystemTime::now(),
                paths: meta.dirty.iter().count(),
                bytes: u64::try_from(footprint_below(&tmp).0).unwrap_or(0),
                by_agent,
            };
            std::fs::write(tmp.join("info"), info.encode())?;
            std::fs::rename(&tmp, root.join(&id))?;
            Ok(info)
        };
        let r = build();
        drop(meta);
        if r.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        self.measure_checkpoints();
        r.map_err(|e| FsError::io("create checkpoint", &root, e))
    }

    /// The checkpoints, oldest first.
    pub fn checkpoints(&self) -> Result<Vec<CheckpointInfo>, FsError> {
        let _cp = lock_cp(&self.checkpoints_lock);
        self.list_checkpoints()
    }

    fn list_checkpoints(&self) -> Result<Vec<CheckpointInfo>, FsError> {
        let root = self.checkpoints_dir();
        let entries = match std::fs::read_dir(&root) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(FsError::io("list checkpoints", &root, e)),
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !valid_checkpoint_id(&name) {
                continue;
            }
            if let Some(info) = std::fs::read_to_string(e.path().join("info"))
                .ok()
                .and_then(|t| CheckpointInfo::decode(&name, &t))
            {
                out.push(info);
            }
        }
        out.sort_by_key(|i| {
            (
                i.created,
                i.id.trim_start_matches("cp-").parse::<u64>().unwrap_or(0),
            )
        });
        Ok(out)
    }

    /// Deletes checkpoint `id`.
    pub fn delete_checkpoint(&self, id: &str) -> Result<(), FsError> {
        let _cp = lock_cp(&self.checkpoints_lock);
        self.remove_checkpoint(id)
    }

    fn remove_checkpoint(&self, id: &str) -> Result<(), FsError> {
        let dir = self.checkpoint_dir(id)?;
        // Renamed away first: a crash mid-removal never leaves half a checkpoint listed.
        let gone = self.checkpoints_dir().join(format!(".{id}"));
        std::fs::rename(&dir, &gone).map_err(|e| FsError::io("delete checkpoint", &dir, e))?;
        let r = std::fs::remove_dir_all(&gone);
        self.measure_checkpoints();
        r.map_err(|e| FsError::io("delete checkpoint", &gone, e))
    }

    /// Keeps at most `keep` reviewer checkpoints and `keep` agent ones (0: no limit; the two
    /// are counted apart) and none older than `ttl` (if set); returns the ids deleted.
    pub fn prune_checkpoints(
        &self,
        keep: usize,
        ttl: Option<Duration>,
    ) -> Result<Vec<String>, FsError> {
        let _cp = lock_cp(&self.checkpoints_lock);
        let all = self.list_checkpoints()?;
        let now = SystemTime::now();
        let mut gone = Vec::new();
        for agent in [false, true] {
            let class: Vec<&CheckpointInfo> = all.iter().filter(|c| c.by_agent == agent).collect();
            let excess = if keep == 0 {
                0
            } else {
                class.len().saturating_sub(keep)
            };
            for (i, cp) in class.iter().enumerate() {
                let expired =
                    ttl.is_some_and(|t| now.duration_since(cp.created).is_ok_and(|age| age > t));
                if i < excess || expired {
                    self.remove_checkpoint(&cp.id)?;
                    gone.push(cp.id.clone());
                }
            }
        }
        Ok(gone)
    }

    /// Opens checkpoint `id` as a delta of its own (to compare it; never mounted or written).
    pub fn open_checkpoint(&self, id: &str) -> Result<Delta, FsError> {
        let dir = self.checkpoint_dir(id)?;
        Delta::open(&self.lower_path, &dir)
    }

    /// Brings the delta back to checkpoint `id`: changes made since are gone, changes the
    /// checkpoint held are back. Returns the paths whose view may have changed.
    pub fn restore_checkpoint(&self, id: &str) -> Result<Vec<PathBuf>, FsError> {
        let _cp = lock_cp(&self.checkpoints_lock);
        self.checkpoint_dir(id)?;
        let cp = self.open_checkpoint(id)?;
        let theirs = View::Merged(&cp).changed_paths();
        drop(cp);
        let mut meta = self.lock();
        let mut touched: BTreeSet<PathBuf> = meta
            .dirty
            .iter()
            .chain(meta.whiteouts.iter())
            .chain(meta.opaque.iter())
            .cloned()
            .collect();
        touched.extend(theirs);
        let text = restore_files(&self.dir, id)
            .map_err(|e| FsError::io("restore checkpoint", &self.dir, e))?;
        let mut restored = Meta::replay(&String::from_utf8_lossy(&text), &self.meta_path)?;
        restored.log = None;
        *meta = restored;
        // Changes the checkpoint holds that were applied since are the codebase's now.
        self.settle_applied(&mut meta);
        self.prune_upper(&meta, Path::new(""));
        self.compact(&mut meta)?;
        let marker = self.dir.join(RESTORING);
        std::fs::remove_file(&marker)
            .map_err(|e| FsError::io("remove restore marker", &marker, e))?;
        self.usage
            .set_upper(footprint_below(&self.dir.join("upper")));
        Ok(touched.into_iter().collect())
    }
}

impl View<'_> {
    /// Every path this view's delta records (changed, deleted or recreated).
    fn changed_paths(&self) -> BTreeSet<PathBuf> {
        match *self {
            View::Base(_) => BTreeSet::new(),
            View::Merged(d) => {
                let meta = d.lock();
                meta.dirty
                    .iter()
                    .chain(meta.whiteouts.iter())
                    .chain(meta.opaque.iter())
                    .cloned()
                    .collect()
            }
        }
    }
}
