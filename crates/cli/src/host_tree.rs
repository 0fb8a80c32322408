//! A project directory on the host as the policy engine sees it through a mount, so that
//! `policy show`, `policy explain --root` and `scan` give the mount's answers: directories
//! shown only for traversal need something visible below them, content conditions are judged
//! on the files.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;

use agentfense_core::{Content, MAX_SCANNED, NodeKind, Tree};

/// Host paths, with the verdicts on directories remembered for one command.
#[derive(Default)]
pub(crate) struct HostTree {
    verdicts: RefCell<HashMap<PathBuf, bool>>,
}

impl Tree for HostTree {
    type Node = PathBuf;

    fn children(&self, dir: &PathBuf) -> Vec<(PathBuf, String, NodeKind)> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .map(|e| {
                // `file_type` does not follow symlinks, like the mount.
                let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
                let kind = if is_dir {
                    NodeKind::Dir
                } else {
                    NodeKind::File
                };
                (e.path(), e.file_name().to_string_lossy().into_owned(), kind)
            })
            .collect()
    }

    fn cached(&self, dir: &PathBuf) -> Option<bool> {
        self.verdicts.borrow().get(dir).copied()
    }

    fn remember(&self, dir: &PathBuf, shown: bool) {
        self.verdicts.borrow_mut().insert(dir.clone(), shown);
    }

    /// As the mount judges it: a missing path, a symlink or a special file holds nothing; an
    /// unreadable or too large file holds it (fail closed).
    fn holds(&self, file: &PathBuf, content: Content) -> bool {
        match std::fs::symlink_metadata(file) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return false,
            Err(_) => return true,
            Ok(m) if !m.is_file() => return false,
            Ok(m) if m.len() > MAX_SCANNED => return true,
            Ok(_) => {}
        }
        let mut data = Vec::new();
        let read =
            std::fs::File::open(file).and_then(|f| f.take(MAX_SCANNED + 1).read_to_end(&mut data));
        read.is_err() || data.len() as u64 > MAX_SCANNED || content.holds(&data)
    }
}
