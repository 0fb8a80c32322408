//! A directory's times as the sandbox is shown them (issue 24, finding 7).
//!
//! A directory's mtime and ctime move whenever an entry is added, removed or renamed in it,
//! hidden ones included: another sandbox publishing `.env.new`, or the host editing a
//! secret, would show as a timestamp change in a directory the agent can list. So the
//! sandbox sees a directory's real times only when what *it* can see in the directory
//! changed; otherwise the times it was last shown stay.
//!
//! What it can see is kept as a fingerprint: the wrapping sum of a hash of each visible name,
//! computed from a listing the first time the directory is shown and whenever its real times
//! move for a reason this mount did not cause. The mount's own creations, removals and
//! renames update the fingerprint in place and move the times at once (no listing: creating
//! many files in one directory stays linear).

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
    /// The policy generation the fingerprint was taken under.
    generation: u64,
    real: Times,
    shown: Times,
    names: u64,
    /// This mount changed the directory since its times were last shown.
    own: bool,
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
            Some(r) if r.generation == generation && r.real == real => Shown::Times(r.shown),
            Some(r) if r.generation == generation && r.own => {
                r.own = false;
                r.real = real;
                r.shown = real;
                Shown::Times(real)
            }
            _ => Shown::NeedNames,
        }
    }

    /// Records the fingerprint `names` of what the sandbox can see in `dir` now, and returns
    /// the times to show.
    pub(crate) fn settle(&mut self, dir: &Path, generation: u64, real: Times, names: u64) -> Times {
        match self.dirs.get_mut(dir) {
            Some(r) if r.generation == generation => {
                if r.names != names || r.own {
                    r.shown = real;
                }
                r.real = real;
                r.names = names;
                r.own = false;
                r.shown
            }
            _ => {
                self.dirs.insert(
                    dir.to_path_buf(),
                    Record {
                        generation,
                        real,
                        shown: real,
                        names,
                        own: false,
                    },
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
            r.names = if added {
                r.names.wrapping_add(t)
            } else {
                r.names.wrapping_sub(t)
            };
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
        assert!(matches!(d.shown(dir, 0, t(10)), Shown::NeedNames));
        assert_eq!(d.settle(dir, 0, t(10), a), t(10));
        assert!(matches!(d.shown(dir, 0, t(10)), Shown::Times(x) if x == t(10)));
        // A hidden entry appeared: the visible names are the same.
        assert!(matches!(d.shown(dir, 0, t(20)), Shown::NeedNames));
        assert_eq!(d.settle(dir, 0, t(20), a), t(10));
        // A visible one appeared from outside.
        let ab = a.wrapping_add(term(OsStr::new("b")));
        assert_eq!(d.settle(dir, 0, t(30), ab), t(30));
        // This mount removed `b`: no listing needed, the times move.
        d.changed(Path::new("d/b"), false);
        assert!(matches!(d.shown(dir, 0, t(40)), Shown::Times(x) if x == t(40)));
        // ...and the fingerprint followed: a later hidden change does not move them.
        assert_eq!(d.settle(dir, 0, t(50), a), t(40));
        // A new policy generation starts over.
        assert!(matches!(d.shown(dir, 1, t(50)), Shown::NeedNames));
    }
}
