//! The journal kept in `<delta>/meta`: whiteouts, opaque markers, dirty paths and copy-up
//! origins, replayed at open and compacted when it grows.

use super::*;

/// A set of paths whose changes are journaled: every insert/remove that changes the set
/// appends a line (`<tag>+ <hex path>` / `<tag>- <hex path>`) to `pending`.
#[derive(Debug, Default)]
pub(super) struct LogSet {
    tag: char,
    pub(super) set: BTreeSet<PathBuf>,
    pub(super) pending: Vec<u8>,
}

pub(super) fn log_line(out: &mut Vec<u8>, tag: char, op: char, p: &Path, extra: &str) {
    out.push(tag as u8);
    out.push(op as u8);
    out.push(b' ');
    out.extend_from_slice(hex(p.as_os_str().as_bytes()).as_bytes());
    out.extend_from_slice(extra.as_bytes());
    out.push(b'\n');
}

impl LogSet {
    pub(super) fn new(tag: char) -> LogSet {
        LogSet {
            tag,
            ..LogSet::default()
        }
    }

    pub(super) fn insert(&mut self, p: PathBuf) -> bool {
        if self.set.contains(&p) {
            return false;
        }
        log_line(&mut self.pending, self.tag, '+', &p, "");
        self.set.insert(p)
    }

    pub(super) fn remove(&mut self, p: &Path) -> bool {
        let removed = self.set.remove(p);
        if removed {
            log_line(&mut self.pending, self.tag, '-', p, "");
        }
        removed
    }

    pub(super) fn extend(&mut self, paths: impl IntoIterator<Item = PathBuf>) {
        for p in paths {
            self.insert(p);
        }
    }

    pub(super) fn contains(&self, p: &Path) -> bool {
        self.set.contains(p)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &PathBuf> {
        self.set.iter()
    }
}

/// Copy-up origins, journaled like [`LogSet`] with tag `G`.
#[derive(Debug, Default)]
pub(super) struct LogMap {
    pub(super) map: BTreeMap<PathBuf, Origin>,
    pub(super) pending: Vec<u8>,
}

impl LogMap {
    pub(super) fn insert(&mut self, p: PathBuf, o: Origin) {
        let extra = format!(" {} {} {}", o.size, o.mtime_ns, o.ino);
        log_line(&mut self.pending, 'G', '+', &p, &extra);
        self.map.insert(p, o);
    }

    pub(super) fn insert_if_absent(&mut self, p: &Path, o: impl FnOnce() -> Origin) {
        if !self.map.contains_key(p) {
            self.insert(p.to_path_buf(), o());
        }
    }

    pub(super) fn remove(&mut self, p: &Path) {
        if self.map.remove(p).is_some() {
            log_line(&mut self.pending, 'G', '-', p, "");
        }
    }

    pub(super) fn get(&self, p: &Path) -> Option<&Origin> {
        self.map.get(p)
    }
}

/// The delta's metadata. Persisted as an append-only journal (`<delta>/meta`), replayed and
/// compacted when the delta is opened and after each publish, so that a change costs one
/// small append, not a rewrite.
#[derive(Debug)]
pub(super) struct Meta {
    /// Lower paths deleted in this sandbox.
    pub(super) whiteouts: LogSet,
    /// Upper entries created over a whiteout: the lower subtree below them stays dead.
    pub(super) opaque: LogSet,
    /// Paths changed since the last publish.
    pub(super) dirty: LogSet,
    /// Lower identity at copy-up or delete time.
    pub(super) origins: LogMap,
    /// The journal, open for appending.
    pub(super) log: Option<File>,
}

impl Default for Meta {
    fn default() -> Self {
        Meta {
            whiteouts: LogSet::new('W'),
            opaque: LogSet::new('O'),
            dirty: LogSet::new('D'),
            origins: LogMap::default(),
            log: None,
        }
    }
}

impl Meta {
    pub(super) fn lower_visible(&self, rel: &Path) -> bool {
        if self.whiteouts.is_empty() && self.opaque.is_empty() {
            return true;
        }
        for (i, anc) in rel.ancestors().enumerate() {
            if anc.as_os_str().is_empty() {
                break;
            }
            if self.whiteouts.contains(anc) || (i > 0 && self.opaque.contains(anc)) {
                return false;
            }
        }
        true
    }

    /// Takes the journal lines of the changes made since the last call.
    pub(super) fn take_pending(&mut self) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.whiteouts.pending);
        out.append(&mut self.opaque.pending);
        out.append(&mut self.dirty.pending);
        out.append(&mut self.origins.pending);
        out
    }

    /// The whole state as journal lines.
    pub(super) fn snapshot(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for set in [&self.whiteouts, &self.opaque, &self.dirty] {
            for p in set.iter() {
                log_line(&mut out, set.tag, '+', p, "");
            }
        }
        for (p, o) in &self.origins.map {
            log_line(
                &mut out,
                'G',
                '+',
                p,
                &format!(" {} {} {}", o.size, o.mtime_ns, o.ino),
            );
        }
        out
    }

    /// Replays a journal.
    pub(super) fn replay(text: &str, file: &Path) -> Result<Meta, FsError> {
        let mut m = Meta::default();
        // A line cut short by a crash is the tail of an append that never completed.
        let complete = match text.rfind('\n') {
            Some(end) => &text[..=end],
            None => "",
        };
        for (i, l) in complete.lines().enumerate() {
            let bad = || FsError::CorruptMeta {
                path: file.to_path_buf(),
                line: i + 1,
            };
            let mut parts = l.split(' ');
            let tag = parts.next().ok_or_else(bad)?;
            let path = parts
                .next()
                .and_then(unhex)
                .map(|b| PathBuf::from(OsString::from_vec(b)))
                .ok_or_else(bad)?;
            check_rel(&path).map_err(|_| bad())?;
            let set = match tag.get(..1) {
                Some("W") => Some(&mut m.whiteouts),
                Some("O") => Some(&mut m.opaque),
                Some("D") => Some(&mut m.dirty),
                Some("G") => None,
                _ => return Err(bad()),
            };
            match (set, tag.get(1..)) {
                (Some(set), Some("+")) => {
                    set.insert(path);
                }
                (Some(set), Some("-")) => {
                    set.remove(&path);
                }
                (None, Some("+")) => {
                    let mut num = || parts.next().ok_or_else(bad);
                    let size = num()?.parse().map_err(|_| bad())?;
                    let mtime_ns = num()?.parse().map_err(|_| bad())?;
                    let ino = num()?.parse().map_err(|_| bad())?;
                    m.origins.insert(
                        path,
                        Origin {
                            size,
                            mtime_ns,
                            ino,
                        },
                    );
                }
                (None, Some("-")) => m.origins.remove(&path),
                _ => return Err(bad()),
            }
        }
        m.take_pending();
        Ok(m)
    }
}

pub(super) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub(super) fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}
