//! Names are checked as the host stores them (issue 24, finding 1).
//!
//! The rules judge the name the agent typed. On a case-insensitive codebase directory (APFS
//! or vfat through a bind mount, WSL's `/mnt/c`, CIFS, ext4/f2fs casefold) the host would
//! open `notes.txt` for a typed `NOTES.TXT`, so a rule on one spelling would not hold for the
//! other. A lower entry therefore resolves only under the spelling it is stored with.
//!
//! Each lower directory is probed once, the first time a name with a case variant is looked
//! up in it: does the name with its letters' case swapped (ASCII letters, and separately the
//! other cased letters, since some filesystems fold only ASCII) reach the same inode? If not,
//! the directory is case-sensitive for that class and lookups cost nothing more. If so, a name
//! resolves only when the directory lists it byte for byte. Normalization-insensitive
//! filesystems need nothing here: rules and names already meet in NFC.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rustix::fs::Stat;

use crate::host;

/// Whether a directory folds names of one class of letters onto one entry.
#[derive(Clone, Copy, Debug, Default)]
struct Folds {
    ascii: Option<bool>,
    other: Option<bool>,
}

/// The per-lower-directory verdicts, keyed by the directory's codebase-relative path.
#[derive(Debug, Default)]
pub(crate) struct Spellings {
    dirs: Mutex<HashMap<PathBuf, Folds>>,
}

/// `name` with the case of its letters of one class swapped, if that changes it.
fn swapped(name: &str, ascii: bool) -> Option<String> {
    let mut out = String::with_capacity(name.len());
    let mut changed = false;
    for c in name.chars() {
        if c.is_ascii() != ascii {
            out.push(c);
        } else if c.is_lowercase() {
            out.extend(c.to_uppercase());
            changed = true;
        } else if c.is_uppercase() {
            out.extend(c.to_lowercase());
            changed = true;
        } else {
            out.push(c);
        }
    }
    changed.then_some(out)
}

fn same(a: &Stat, b: &Stat) -> bool {
    a.st_dev == b.st_dev && a.st_ino == b.st_ino
}

impl Spellings {
    /// Whether lower path `rel` (which resolved to `st`) is stored with exactly the spelling
    /// of every one of its components.
    pub(crate) fn stored_as_typed(
        &self,
        lower: BorrowedFd<'_>,
        rel: &Path,
        st: &Stat,
    ) -> io::Result<bool> {
        let bytes = rel.as_os_str().as_bytes();
        let mut start = 0;
        while start < bytes.len() {
            let end = bytes[start..]
                .iter()
                .position(|&b| b == b'/')
                .map_or(bytes.len(), |i| start + i);
            let parent = Path::new(OsStr::from_bytes(&bytes[..start.saturating_sub(1)]));
            let name = &bytes[start..end];
            let entry = Path::new(OsStr::from_bytes(&bytes[..end]));
            let last = end == bytes.len();
            if !self.component_as_typed(lower, parent, name, entry, last.then_some(st))? {
                return Ok(false);
            }
            start = end + 1;
        }
        Ok(true)
    }

    fn component_as_typed(
        &self,
        lower: BorrowedFd<'_>,
        parent: &Path,
        name: &[u8],
        entry: &Path,
        st: Option<&Stat>,
    ) -> io::Result<bool> {
        // A name that is not UTF-8, or whose swapped case does not swap back (`ı` → `I` →
        // `i`), makes no faithful probe: a filesystem could fold it differently, and a verdict
        // from it would stand for the whole directory. Such a name is checked against the
        // listing, and nothing is cached from it.
        let Ok(text) = std::str::from_utf8(name) else {
            return listed(lower, parent, name);
        };
        let mut folds = false;
        for ascii in [true, false] {
            // Nothing allocated on the common path: a name without letters of the class, or
            // a directory whose verdict is known.
            let cased = |c: char| c.is_ascii() == ascii && (c.is_lowercase() || c.is_uppercase());
            if !text.chars().any(cased) {
                continue;
            }
            let known = {
                let dirs = self.dirs.lock().unwrap_or_else(|e| e.into_inner());
                dirs.get(parent)
                    .and_then(|f| if ascii { f.ascii } else { f.other })
            };
            let verdict = match known {
                Some(v) => v,
                None => {
                    let Some(variant) = swapped(text, ascii) else {
                        continue;
                    };
                    if swapped(&variant, ascii).as_deref() != Some(text) {
                        return listed(lower, parent, name);
                    }
                    let own;
                    let st = match st {
                        Some(st) => st,
                        None => {
                            own = host::lstat(lower, entry)?;
                            &own
                        }
                    };
                    let probe = parent.join(&variant);
                    let v = match host::lstat(lower, &probe) {
                        Ok(other) => same(st, &other),
                        Err(e)
                            if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) =>
                        {
                            // "Not folding" only if the entry is still the one probed for (it
                            // may have gone between the two calls).
                            if !host::lstat(lower, entry).is_ok_and(|now| same(st, &now)) {
                                return listed(lower, parent, name);
                            }
                            false
                        }
                        // A variant too long or otherwise unnameable says nothing: assume folding.
                        Err(e) if e.raw_os_error() == Some(libc::ENAMETOOLONG) => true,
                        Err(e) => return Err(e),
                    };
                    let mut dirs = self.dirs.lock().unwrap_or_else(|e| e.into_inner());
                    let f = dirs.entry(parent.to_path_buf()).or_default();
                    if ascii {
                        f.ascii = Some(v);
                    } else {
                        f.other = Some(v);
                    }
                    v
                }
            };
            folds |= verdict;
        }
        if !folds {
            return Ok(true);
        }
        listed(lower, parent, name)
    }
}

/// Whether directory `parent` lists `name` byte for byte.
fn listed(lower: BorrowedFd<'_>, parent: &Path, name: &[u8]) -> io::Result<bool> {
    Ok(host::list(lower, parent)?
        .iter()
        .any(|(n, _)| n.as_slice() == name))
}

#[cfg(test)]
mod tests {
    use super::swapped;

    #[test]
    fn swaps_one_class_of_letters() {
        assert_eq!(swapped("Notes.txt", true).as_deref(), Some("nOTES.TXT"));
        assert_eq!(swapped("Notes.txt", false), None);
        assert_eq!(swapped("été-A", false).as_deref(), Some("ÉtÉ-A"));
        assert_eq!(swapped("été-A", true).as_deref(), Some("éTé-a"));
        assert_eq!(swapped("123_-.", true), None);
        assert_eq!(swapped("straße", false).as_deref(), Some("straSSe"));
    }
}
