//! A directory's times as the sandbox is shown them (issue 24, finding 7).
//!
//! A directory's mtime and ctime move whenever an entry is added, removed or renamed in it,
//! hidden ones included: another sandbox publishing `.env.new`, or the host editing a
//! secret, would show as a timestamp change in a directory the agent can list. So the
//! sandbox sees a directory's real times only when what *it* can see in the directory
//! changed; otherwise the times it was last shown stay.
//!
//! What it can see is kept as a fingerprint: the wrapping sum of a hash of each visible name,
//! taken whenever the sandbox lists the directory (the listing is made anyway) and whenever
//! the real times of a directory with a fingerprint move for a reason this mount did not
//! cause. A directory the sandbox has not listed yet has no fingerprint, and its times stay
//! as first shown until it is listed: nothing of its contents is known to the sandbox, and the
//! kernel holds no listing of it that its times would have to invalidate. The mount's own
//! creations, removals and renames update the fingerprint in place and move the times at once
//! (no listing: creating many files in one directory stays linear).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// (mtime, ctime).
pub(crate) type Times = (SystemTime, SystemTime);

#[derive(Debug)]
struct Record {
    /// The policy generation the record was made under.
    generation: u64,
    real: Times,
    shown: Times,
    /// The fingerprint of the visible names, once the sandbox has listed the directory.
    names: Option<u64>,
    /// This mount changed the directory since its times were last shown.
    own: bool,
}

impl Record {
    /// The record of a directory first shown with `real` times.
    fn first(generation: u64, real: Times, names: Option<u64>) -> Record {
        Record {
            generation,
            real,
            shown: real,
            names,
            own: false,
        }
    }
}

/// The records of one mount, by directory path (an inode number does not survive the
/// kernel forgetting the inode).
#[derive(Debug, Default)]
pub(crate) struct DirTimes {
    dirs: HashMap<PathBuf, Record>,
}

/// The fingerprint term of one visible name.
pub(crate) fn term(name: &OsStr) -> u64 {
    let mut h = DefaultHasher::new();
    name.as_bytes().hash(&mut h);
    h.finish()
}

/// The fingerprint of a set of visible names.
pub(crate) fn fingerprint<'a>(names: impl IntoIterator<Item = &'a OsStr>) -> u64 {
    names
        .into_iter()
        .fold(0u64, |acc, n| acc.wrapping_add(term(n)))
}

/// What [`DirTimes::shown`] needs to decide.
pub(crate) enum Shown {
    /// The times to show.
    Times(Times),
    /// A listing is needed: call [`DirTimes::settle`] with the fingerprint of the visible names.
    NeedNames,
}

impl DirTimes {
    /// The times to show for directory `dir` whose real times are `real`, if known without a
    /// listing.
    pub(crate) fn shown(&mut self, dir: &Path, generation: u64, real: Times) -> Shown {
        match self.dirs.get_mut(dir) {
            Some(r) if r.generation == generation => {
                if r.real == real {
                    Shown::Times(r.shown)
                } else if r.own {
                    r.own = false;
                    r.real = real;
                    r.shown = real;
                    Shown::Times(real)
                } else if r.names.is_none() {
                    // Never listed: nothing to compare with, nothing the sandbox saw changed.
                    r.real = real;
                    Shown::Times(r.shown)
                } else {
                    Shown::NeedNames
                }
            }
            _ => {
                self.dirs
                    .insert(dir.to_path_buf(), Record::first(generation, real, None));
                Shown::Times(real)
            }
        }
    }

    /// Records the fingerprint `names` of what the sandbox can see in `dir` now (after
    /// [`Shown::NeedNames`], or from a listing), and returns the times to show.
    pub(crate) fn settle(&mut self, dir: &Path, generation: u64, real: Times, names: u64) -> Times {
        match self.dirs.get_mut(dir) {
            Some(r) if r.generation == generation => {
                if r.real != real {
                    if r.own || r.names.is_some_and(|old| old != names) {
                        r.shown = real;
                    }
                    r.real = real;
                }
                r.names = Some(names);
                r.own = false;
                r.shown
            }
            _ => {
                self.dirs.insert(
                    dir.to_path_buf(),
                    Record::first(generation, real, Some(names)),
                );
                real
            }
        }
    }

    /// This mount added (`added`) or removed the visible entry `child`.
    pub(crate) fn changed(&mut self, child: &Path, added: bool) {
        let (Some(dir), Some(name)) = (child.parent(), child.file_name()) else {
            return;
        };
        if let Some(r) = self.dirs.get_mut(dir) {
            let t = term(name);
            r.names = r.names.map(|n| {
                if added {
                    n.wrapping_add(t)
                } else {
                    n.wrapping_sub(t)
                }
            });
            r.own = true;
        }
    }

    /// Directory `dir` was removed or moved away through this mount: its records go.
    pub(crate) fn dir_gone(&mut self, dir: &Path) {
        self.dirs.retain(|p, _| !p.starts_with(dir));
    }

    /// This mount changed directory `dir` itself (its mode or times), or replaced an entry
    /// in it.
    pub(crate) fn touched(&mut self, dir: &Path) {
        if let Some(r) = self.dirs.get_mut(dir) {
            r.own = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn t(s: u64) -> Times {
        (
            UNIX_EPOCH + Duration::from_secs(s),
            UNIX_EPOCH + Duration::from_secs(s),
        )
    }

    #[test]
    fn times_move_only_with_what_is_visible() {
        let mut d = DirTimes::default();
        let dir = Path::new("d");
        let a = term(OsStr::new("a"));
        let shown = |d: &mut DirTimes, real| match d.shown(dir, 0, real) {
            Shown::Times(t) => Some(t),
            Shown::NeedNames => None,
        };
        assert_eq!(shown(&mut d, t(10)), Some(t(10)));
        // Not listed yet: a change keeps the times first shown, without a listing.
        assert_eq!(shown(&mut d, t(15)), Some(t(10)));
        // Listed: the fingerprint is taken.
        assert_eq!(d.settle(dir, 0, t(15), a), t(10));
        // A hidden entry appeared: a listing finds the same visible names.
        assert_eq!(shown(&mut d, t(20)), None);
        assert_eq!(d.settle(dir, 0, t(20), a), t(10));
        // A visible one appeared from outside.
        let ab = a.wrapping_add(term(OsStr::new("b")));
        assert_eq!(shown(&mut d, t(30)), None);
        assert_eq!(d.settle(dir, 0, t(30), ab), t(30));
        // This mount removed `b`: no listing needed, the times move.
        d.changed(Path::new("d/b"), false);
        assert_eq!(shown(&mut d, t(40)), Some(t(40)));
        // ...and the fingerprint followed: a later hidden change does not move them.
        assert_eq!(shown(&mut d, t(50)), None);
        assert_eq!(d.settle(dir, 0, t(50), a), t(40));
        // A new policy generation starts over.
        assert!(matches!(d.shown(dir, 1, t(50)), Shown::Times(x) if x == t(50)));
    }
}
