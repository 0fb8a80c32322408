//! Pending changes and publish: what changed since the last publish, applied to the codebase
//! with conflict detection.

use super::*;

impl Delta {
    /// Whether `rel` names an existing codebase entry only through a case-folding directory
    /// (stored as another spelling, or below one).
    pub(super) fn stored_under_another_spelling(&self, rel: &Path) -> bool {
        host::lstat(self.lower.as_fd(), rel).is_ok_and(|st| {
            !self
                .spellings
                .stored_as_typed(self.lower.as_fd(), rel, &st)
                .unwrap_or(false)
        })
    }

    /// Paths changed since the last publish.
    pub fn pending(&self) -> Vec<PathBuf> {
        self.lock().dirty.iter().cloned().collect()
    }

    /// Whether nothing is pending, answered without waiting: `false` also when the delta is
    /// busy (a copy-up or publish in progress), so a caller that must not block can take the
    /// slow path then.
    pub fn surely_clean(&self) -> bool {
        match self.meta.try_lock() {
            Ok(m) => m.dirty.is_empty(),
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner().dirty.is_empty(),
            Err(std::sync::TryLockError::WouldBlock) => false,
        }
    }

    /// What a publish would do now, path by path (for review and diff workflows).
    pub fn changes(&self) -> Vec<Change> {
        let meta = self.lock();
        meta.dirty
            .iter()
            .filter_map(|p| {
                let kind = match host::lstat(self.upper.as_fd(), p) {
                    Ok(st) if EntryKind::from(Kind::from_mode(st.st_mode)).is_local_node() => {
                        return None;
                    }
                    Ok(st) => {
                        let in_lower = host::lstat(self.lower.as_fd(), p).is_ok();
                        let entry = EntryKind::from(Kind::from_mode(st.st_mode));
                        if in_lower {
                            ChangeKind::Modified(entry)
                        } else {
                            ChangeKind::Added(entry)
                        }
                    }
                    Err(_) if meta.whiteouts.contains(p) => ChangeKind::Deleted,
                    Err(_) => return None,
                };
                Some(Change {
                    path: p.clone(),
                    kind,
                })
            })
            .collect()
    }

    /// Applies the changes made since the last publish to the codebase (see the module docs).
    pub fn publish(&self, filter: &PublishFilter<'_>) -> Result<PublishReport, FsError> {
        let mut meta = self.lock();
        self.publish_locked(&mut meta, filter)
    }

    /// [`Delta::publish`] with the delta's lock held by the caller.
    pub(super) fn publish_locked(
        &self,
        meta: &mut Meta,
        filter: &PublishFilter<'_>,
    ) -> Result<PublishReport, FsError> {
        let mut report = PublishReport::default();
        // Most commands change nothing: no tree walk and no journal rewrite for them (this runs
        // after every command, before its result is returned).
        if meta.dirty.is_empty() {
            return Ok(report);
        }
        let dirty: Vec<PathBuf> = meta.dirty.iter().cloned().collect();
        // What this publish adds to the codebase counts against the sandbox's quota.
        let lower_before = self.lower_footprint(&dirty);
        let mut puts = Vec::new();
        let mut dels = Vec::new();
        for p in dirty.iter().cloned() {
            match host::lstat(self.upper.as_fd(), &p) {
                Ok(st) => puts.push((p, st)),
                Err(_) if meta.whiteouts.contains(&p) => dels.push(p),
                Err(_) => {
                    meta.dirty.remove(&p);
                }
            }
        }
        // Deletions, deepest first, so that directories are empty when their turn comes.
        dels.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for p in dels {
            let kind = host::lstat(self.lower.as_fd(), &p)
                .map(|st| EntryKind::from(Kind::from_mode(st.st_mode)))
                .unwrap_or(EntryKind::File);
            if !(filter.allow)(&p, kind) {
                report.skipped.push(p);
                continue;
            }
            match self.publish_delete(meta, &p) {
                Ok(conflict) => {
                    report.conflicts.extend(conflict);
                    report.deleted.push(p.clone());
                    meta.whiteouts.remove(&p);
                    meta.origins.remove(&p);
                    meta.dirty.remove(&p);
                }
                // Left pending: retried by the next publish.
                Err(e) => report.failed.push((p.clone(), error_chain(&e))),
            }
        }
        // Creations, shallowest first, so that parents exist.
        puts.sort_by(|a, b| {
            (a.0.components().count(), &a.0).cmp(&(b.0.components().count(), &b.0))
        });
        // Published entries keep the owner of what they replace; new ones get the owner of
        // the directory they land in (a user's checkout stays theirs, whatever uid the sandbox
        // wrote as). Shallowest first, so a new directory is its owner's before its entries.
        let owner_of = |rel: &Path| {
            host::lstat(self.lower.as_fd(), rel)
                .map(|st| (st.st_uid, st.st_gid))
                .ok()
        };
        let mut links: std::collections::HashMap<(u64, u64), PathBuf> = Default::default();
        for (p, st) in puts {
            let kind = EntryKind::from(Kind::from_mode(st.st_mode));
            if kind.is_local_node() {
                // Fifos and sockets are meeting points of this sandbox's processes: they stay
                // in its layer and never reach the codebase.
                meta.dirty.remove(&p);
                continue;
            }
            if !(filter.allow)(&p, kind) {
                report.skipped.push(p);
                continue;
            }
            if kind == EntryKind::Symlink {
                // Read as publish_put reads it (never through a symlink), under the same
                // lock: the target checked is the target written.
                let target = host::readlink(self.upper.as_fd(), &p).unwrap_or_default();
                if link_escapes(&p, &target) {
                    let target = String::from_utf8_lossy(&target).into_owned();
                    report.refused.push((p, target));
                    continue;
                }
            }
            if self.stored_under_another_spelling(&p) {
                // On a case-folding codebase directory the write would land on the entry
                // stored as `notes.txt`, which the rules judged under its own name.
                report.failed.push((
                    p,
                    "the codebase stores this name under another spelling (a case-insensitive \
                     directory): not applied"
                        .to_owned(),
                ));
                continue;
            }
            let owner = owner_of(&p).or_else(|| p.ancestors().skip(1).find_map(owner_of));
            // Names of one file in this sandbox stay one file in the codebase where its file
            // system allows; else each name gets its own copy.
            let linked = (kind != EntryKind::Dir && st.st_nlink > 1)
                .then(|| links.get(&(st.st_dev, st.st_ino)))
                .flatten();
            let put = match linked {
                Some(first) => self
                    .publish_link(meta, first, &p)
                    .or_else(|_| self.publish_put(meta, &p, &st)),
                None => self.publish_put(meta, &p, &st),
            };
            if put.is_ok() && kind != EntryKind::Dir && st.st_nlink > 1 {
                links
                    .entry((st.st_dev, st.st_ino))
                    .or_insert_with(|| p.clone());
            }
            if put.is_ok()
                && let (Some(owner), Ok((parent, name))) = (owner, host::split(&p))
                && let Ok(pdir) = host::open_dir(self.lower.as_fd(), parent)
            {
                chown_new(&pdir, name, Some(owner));
            }
            match put {
                Ok((conflict, new_lower)) => {
                    report.conflicts.extend(conflict);
                    report.written.push(p.clone());
                    if kind == EntryKind::Dir {
                        meta.dirty.remove(&p);
                        if !meta.whiteouts.iter().any(|w| w.starts_with(&p)) {
                            meta.opaque.remove(&p);
                        }
                    } else if (filter.busy)(&p) {
                        if let Some(o) = new_lower {
                            meta.origins.insert(p.clone(), o);
                        }
                    } else {
                        self.drop_upper(&p);
                        meta.opaque.remove(&p);
                        meta.origins.remove(&p);
                        meta.dirty.remove(&p);
                    }
                }
                Err(e) => report.failed.push((p.clone(), error_chain(&e))),
            }
        }
        self.prune_upper(meta, Path::new(""));
        let lower_after = self.lower_footprint(&dirty);
        self.usage.add_published(
            &self.dir,
            lower_after.0 - lower_before.0,
            lower_after.1 - lower_before.1,
        );
        // Published files left the upper layer (and emptied directories were pruned): measure
        // it afresh rather than following each removal.
        self.usage
            .set_upper(footprint_below(&self.dir.join("upper")));
        self.compact(meta)?;
        Ok(report)
    }

    /// (allocated bytes, entries) that `paths` take in the codebase.
    pub(super) fn lower_footprint(&self, paths: &[PathBuf]) -> (i64, i64) {
        paths
            .iter()
            .filter_map(|p| host::lstat(self.lower.as_fd(), p).ok())
            // A file with other links keeps its blocks when one name goes: each name carries
            // its share.
            .fold((0, 0), |(b, i), st| {
                let links = i64::try_from(st.st_nlink).unwrap_or(1).max(1);
                (
                    b + allocated(u64::try_from(st.st_blocks).unwrap_or(0)) / links,
                    i + 1,
                )
            })
    }

    pub(super) fn drop_upper(&self, rel: &Path) {
        if let Ok((parent, name)) = host::split(rel)
            && let Ok(pdir) = host::open_dir(self.upper.as_fd(), parent)
        {
            let _ = host::remove_at(pdir.as_fd(), name, false);
        }
    }

    /// Removes upper directories left empty by a publish (unless they mask codebase content
    /// or still have pending changes), so the sandbox sees the codebase through them again.
    pub(super) fn prune_upper(&self, meta: &Meta, rel: &Path) -> bool {
        let Ok(entries) = host::list(self.upper.as_fd(), rel) else {
            return false;
        };
        let mut empty = true;
        for (n, k) in entries {
            let child = rel.join(OsStr::from_bytes(&n));
            if k == Kind::Dir && self.prune_upper(meta, &child) {
                continue;
            }
            empty = false;
        }
        if empty
            && !rel.as_os_str().is_empty()
            && !meta.opaque.contains(rel)
            && !meta.dirty.contains(rel)
            && self
                .lower_entry(meta, rel)
                .is_some_and(|st| Kind::from_mode(st.st_mode) == Kind::Dir)
            && let Ok((parent, name)) = host::split(rel)
            && let Ok(pdir) = host::open_dir(self.upper.as_fd(), parent)
        {
            return host::remove_at(pdir.as_fd(), name, true).is_ok();
        }
        false
    }

    pub(super) fn conflict(
        &self,
        meta: &Meta,
        rel: &Path,
        found: Option<&Stat>,
    ) -> Option<Conflict> {
        let expected = meta.origins.get(rel).copied();
        let found = found.map(Origin::of);
        (expected != found).then(|| Conflict {
            path: rel.into(),
            expected,
            found,
        })
    }

    pub(super) fn publish_delete(
        &self,
        meta: &Meta,
        rel: &Path,
    ) -> Result<Option<Conflict>, FsError> {
        let (parent, name) = host::split(rel).map_err(|e| FsError::io("publish delete", rel, e))?;
        let pdir = match host::open_dir(self.lower.as_fd(), parent) {
            Ok(d) => d,
            Err(e) if errno(&e) == libc::ENOENT => return Ok(None),
            Err(e) => return Err(FsError::io("open codebase directory", parent, e)),
        };
        let st = match rustix::fs::statat(&pdir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(rustix::io::Errno::NOENT) => return Ok(None),
            Err(e) => return Err(FsError::io("lstat codebase", rel, e.into())),
        };
        let is_dir = Kind::from_mode(st.st_mode) == Kind::Dir;
        // Directories are removed only when empty: entries added since (by another sandbox or
        // an upload) are never deleted behind the agent's back.
        let conflict = if is_dir {
            None
        } else {
            self.conflict(meta, rel, Some(&st))
        };
        host::remove_at(pdir.as_fd(), name, is_dir)
            .map_err(|e| FsError::io("publish delete", rel, e))?;
        Ok(conflict)
    }

    /// Codebase directory `parent` for a published entry, made (with the modes of this
    /// sandbox's directories) where missing.
    fn codebase_dir(&self, parent: &Path) -> Result<OwnedFd, FsError> {
        let upper = self.upper.as_fd();
        host::mkdir_all(
            self.lower.as_fd(),
            parent,
            |prefix| host::lstat(upper, prefix).map_or(0o755, |st| st.st_mode & 0o7777),
            |_| {},
        )
        .map_err(|e| FsError::io("create codebase directory", parent, e))
    }

    /// Publishes `rel` as another name of the codebase file `first` (just published from the
    /// same file of this sandbox): linked under a staging name, then renamed over `rel`.
    fn publish_link(
        &self,
        meta: &Meta,
        first: &Path,
        rel: &Path,
    ) -> Result<(Option<Conflict>, Option<Origin>), FsError> {
        let io = |op: &'static str| move |e: rustix::io::Errno| FsError::io(op, rel, e.into());
        let (fparent, fname) =
            host::split(first).map_err(|e| FsError::io("publish link", rel, e))?;
        let (parent, name) = host::split(rel).map_err(|e| FsError::io("publish link", rel, e))?;
        let fdir = host::open_dir(self.lower.as_fd(), fparent)
            .map_err(|e| FsError::io("publish link", rel, e))?;
        let pdir = self.codebase_dir(parent)?;
        let current = match rustix::fs::statat(&pdir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(s) => Some(s),
            Err(rustix::io::Errno::NOENT) => None,
            Err(e) => return Err(io("lstat codebase")(e)),
        };
        if current
            .as_ref()
            .is_some_and(|s| Kind::from_mode(s.st_mode) == Kind::Dir)
        {
            return Err(FsError::IsDir { path: rel.into() });
        }
        let conflict = self.conflict(meta, rel, current.as_ref());
        let tmp = stage_name().map_err(|e| FsError::io("publish link", rel, e))?;
        rustix::fs::linkat(&fdir, fname, &pdir, &tmp, AtFlags::empty()).map_err(io("link"))?;
        if let Err(e) = rustix::fs::renameat(&pdir, &tmp, &pdir, name) {
            let _ = rustix::fs::unlinkat(&pdir, &tmp, AtFlags::empty());
            return Err(io("publish rename")(e));
        }
        Ok((conflict, current_origin(&pdir, name)))
    }

    pub(super) fn publish_put(
        &self,
        meta: &Meta,
        rel: &Path,
        st: &Stat,
    ) -> Result<(Option<Conflict>, Option<Origin>), FsError> {
        let kind = Kind::from_mode(st.st_mode);
        let (parent, name) = host::split(rel).map_err(|e| FsError::io("publish", rel, e))?;
        let upper = self.upper.as_fd();
        let pdir = self.codebase_dir(parent)?;
        let io = |op: &'static str| move |e: rustix::io::Errno| FsError::io(op, rel, e.into());
        let current = match rustix::fs::statat(&pdir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(s) => Some(s),
            Err(rustix::io::Errno::NOENT) => None,
            Err(e) => return Err(io("lstat codebase")(e)),
        };
        let cur_kind = current.as_ref().map(|s| Kind::from_mode(s.st_mode));
        if kind == Kind::Dir {
            if cur_kind.is_some_and(|k| k != Kind::Dir) {
                rustix::fs::unlinkat(&pdir, name, AtFlags::empty())
                    .map_err(io("replace with directory"))?;
            }
            match rustix::fs::mkdirat(&pdir, name, Mode::from_raw_mode(st.st_mode & 0o7777)) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(io("publish mkdir")(e)),
            }
            let d = rustix::fs::openat(
                &pdir,
                name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(io("open codebase directory"))?;
            rustix::fs::fchmod(&d, Mode::from_raw_mode(st.st_mode & 0o7777))
                .map_err(io("chmod"))?;
            if let Ok(src) = host::open_dir_read(upper, rel) {
                super::xattr::copy_user(src.as_fd(), d.as_fd());
            }
            return Ok((None, None));
        }
        let conflict = self.conflict(meta, rel, current.as_ref());
        if cur_kind == Some(Kind::Dir) {
            rustix::fs::unlinkat(&pdir, name, AtFlags::REMOVEDIR)
                .map_err(io("replace directory"))?;
        }
        let via_work = self.publish_via_work.load(Ordering::Relaxed);
        if !via_work && kind == Kind::File {
            // The codebase is on another file system than the delta: no name of ours may
            // appear in the codebase while the copy is written (another sandbox would read it
            // under a name its rules do not hide, and a crash would leave it for good).
            match stage_unnamed(&pdir, upper, rel, st) {
                Ok(staged) => {
                    let placed = place_staged(&staged, &pdir, name).map_err(io("publish rename"));
                    return placed.map(|()| (conflict, current_origin(&pdir, name)));
                }
                Err(Staging::Unsupported) => {}
                Err(Staging::Failed(e)) => return Err(e),
            }
        }
        let tmp = if via_work {
            self.tmp_name()
        } else {
            stage_name().map_err(|e| FsError::io("random staging name", rel, e))?
        };
        let tdir = if via_work {
            self.work.as_fd()
        } else {
            pdir.as_fd()
        };
        let mut result = (|| -> Result<(), FsError> {
            match kind {
                Kind::File => {
                    let src = host::open_file(upper, rel, OFlags::RDONLY)
                        .map_err(|e| FsError::io("open delta file", rel, e))?;
                    let dst = rustix::fs::openat(
                        tdir,
                        &tmp,
                        OFlags::CREATE
                            | OFlags::EXCL
                            | OFlags::WRONLY
                            | OFlags::NOFOLLOW
                            | OFlags::CLOEXEC,
                        Mode::from_raw_mode(0o600),
                    )
                    .map_err(io("create temp file"))?;
                    copy_contents(Some(src), dst, st)
                        .map_err(|e| FsError::io("publish copy", rel, e))?;
                }
                Kind::Symlink => {
                    let target = host::readlink(upper, rel)
                        .map_err(|e| FsError::io("readlink delta", rel, e))?;
                    rustix::fs::symlinkat(OsStr::from_bytes(&target), tdir, &tmp)
                        .map_err(io("publish symlink"))?;
                }
                _ => {
                    return Err(FsError::NotSupported {
                        op: "publish of a special file",
                        path: rel.into(),
                    });
                }
            }
            Ok(())
        })();
        if result.is_ok() {
            match rustix::fs::renameat(tdir, &tmp, &pdir, name) {
                Ok(()) => {}
                Err(rustix::io::Errno::XDEV) if via_work => {
                    // The codebase is elsewhere: stage in the target directory from now on.
                    let _ = rustix::fs::unlinkat(tdir, &tmp, AtFlags::empty());
                    self.publish_via_work.store(false, Ordering::Relaxed);
                    return self.publish_put(meta, rel, st);
                }
                Err(e) => result = Err(io("publish rename")(e)),
            }
        }
        if let Err(e) = result {
            let _ = rustix::fs::unlinkat(tdir, &tmp, AtFlags::empty());
            return Err(e);
        }
        Ok((conflict, current_origin(&pdir, name)))
    }
}

/// The origin of what `name` in `dir` is now.
pub(super) fn current_origin(dir: &OwnedFd, name: &OsStr) -> Option<Origin> {
    rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
        .ok()
        .map(|s| Origin::of(&s))
}
