//! The inode table: stable inode numbers per path for the life of the mount.

use super::*;

/// One known path.
#[derive(Debug)]
pub(crate) struct Node {
    /// Delta-relative path; `None` once the entry was deleted or replaced.
    pub(crate) path: Option<PathBuf>,
    /// The path a detached node had: I/O on a file still open after an unlink or a
    /// replacement is checked against the rules of the path it had.
    pub(crate) former: Option<PathBuf>,
    pub(crate) lookups: u64,
}

/// Inode table: our inode numbers are stable per path for the mount's lifetime.
#[derive(Debug, Default)]
pub(crate) struct Nodes {
    pub(crate) by_ino: HashMap<u64, Node>,
    pub(crate) by_path: HashMap<PathBuf, u64>,
    pub(super) next: u64,
}

impl Nodes {
    pub(super) fn new() -> Nodes {
        let mut n = Nodes {
            next: 2,
            ..Nodes::default()
        };
        n.by_ino.insert(
            1,
            Node {
                path: Some(PathBuf::new()),
                former: None,
                lookups: 1,
            },
        );
        n.by_path.insert(PathBuf::new(), 1);
        n
    }

    pub(super) fn get_or_insert(&mut self, path: &Path) -> u64 {
        if let Some(&ino) = self.by_path.get(path) {
            return ino;
        }
        let ino = self.next;
        self.next += 1;
        self.by_ino.insert(
            ino,
            Node {
                path: Some(path.to_path_buf()),
                former: None,
                lookups: 0,
            },
        );
        self.by_path.insert(path.to_path_buf(), ino);
        ino
    }

    /// Forgets the path of the node at `path` (deleted, replaced, or renumbered): it keeps
    /// serving open handles, and the next lookup of `path` gets a new inode.
    pub(crate) fn detach(&mut self, path: &Path) {
        if let Some(ino) = self.by_path.remove(path)
            && let Some(n) = self.by_ino.get_mut(&ino)
        {
            n.former = n.path.take();
        }
    }

    pub(super) fn moved(&mut self, from: &Path, to: &Path) {
        self.detach(to);
        let moved: Vec<(PathBuf, u64)> = self
            .by_path
            .iter()
            .filter(|(p, _)| p.starts_with(from))
            .map(|(p, i)| (p.clone(), *i))
            .collect();
        for (p, ino) in moved {
            self.by_path.remove(&p);
            // Anything already at a destination path below `to` is gone now.
            let Ok(suffix) = p.strip_prefix(from) else {
                continue;
            };
            let np = if suffix.as_os_str().is_empty() {
                to.to_path_buf()
            } else {
                to.join(suffix)
            };
            self.detach(&np);
            self.by_path.insert(np.clone(), ino);
            if let Some(n) = self.by_ino.get_mut(&ino) {
                n.path = Some(np);
            }
        }
    }
}
