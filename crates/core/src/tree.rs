//! The rules applied to a real tree: which traversable directories are shown.
//!
//! [`Policy::decide`] answers from the patterns alone, and rule 3 of the policy module shows
//! a hidden directory as `view` whenever some rule *could* grant a path below it. On a real
//! tree that would show the names of directories that hold nothing the rules grant (under
//! `**/*.py read`, every directory). [`Policy::decide_in`] closes that: a directory that is
//! visible only for traversal is shown only while the tree holds at least one descendant that
//! is visible by its own rule. So the visible paths of a tree are exactly the paths whose own
//! level is at least `view`, plus their ancestors.
//!
//! Content-conditioned rules ([`crate::Content`]) are weighed here too: the tree reads the
//! file ([`Tree::holds`]).
//!
//! The tree is whatever [`Tree`] says: the merged view of a mount, a host directory. Walks stop
//! at the first visible descendant and remember their verdicts through [`Tree::remember`], so a
//! caller with a cache pays for each directory once until it invalidates it.

use crate::{Basis, Content, Cursor, Decision, NodeKind, Policy};

/// A real tree of files for [`Policy::decide_in`].
pub trait Tree {
    /// Names one entry of the tree (a path, an inode).
    type Node;

    /// The entries of directory `dir`: (entry, its name, its kind). A directory that cannot be
    /// listed is empty: it then shows nothing, which fails closed.
    fn children(&self, dir: &Self::Node) -> Vec<(Self::Node, String, NodeKind)>;

    /// A verdict remembered for `dir` (whether it holds a visible descendant), if any.
    fn cached(&self, _dir: &Self::Node) -> Option<bool> {
        None
    }

    /// Remembers `dir`'s verdict; the caller must forget it when the tree below changes.
    fn remember(&self, _dir: &Self::Node, _shown: bool) {}

    /// Whether file `file` satisfies a content condition ([`Content::holds`] on what it
    /// holds). The default, for trees that cannot read files, says yes: fail closed.
    fn holds(&self, _file: &Self::Node, _content: Content) -> bool {
        true
    }
}

impl Policy {
    /// The decision for `node`, the entry `cur` stands for, in a real tree: as
    /// [`Policy::decide`], except that a directory visible only for traversal is hidden
    /// (level `none`, with the basis it would have without traversal) unless something below
    /// it in `tree` is visible by its own rule.
    pub fn decide_in<T: Tree + ?Sized>(
        &self,
        tree: &T,
        node: &T::Node,
        cur: &Cursor,
        kind: NodeKind,
    ) -> Decision {
        let d = self.decide_with(cur, kind, &mut |c| tree.holds(node, c));
        if matches!(d.basis, Basis::Traversal { .. }) && !self.reveals(tree, node, cur) {
            return self.decide_untraversed(cur);
        }
        d
    }

    /// Whether directory `dir` holds, at any depth, an entry visible by its own rule.
    pub fn reveals<T: Tree + ?Sized>(&self, tree: &T, dir: &T::Node, cur: &Cursor) -> bool {
        if let Some(v) = tree.cached(dir) {
            return v;
        }
        let mut found = false;
        for (child, name, kind) in tree.children(dir) {
            let c = self.cursor_child(cur, &name);
            let d = self.decide_with(&c, kind, &mut |ct| tree.holds(&child, ct));
            found = match d.basis {
                Basis::Traversal { .. } => self.reveals(tree, &child, &c),
                _ => d.level.is_visible(),
            };
            if found {
                break;
            }
        }
        tree.remember(dir, found);
        found
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::{BTreeMap, BTreeSet, HashMap};

    use proptest::prelude::*;

    use super::*;
    use crate::{Level, PatternType, PermissionRule, SandboxPath};

    /// An in-memory tree: every path with its kind (parents implied).
    struct Mem {
        entries: BTreeMap<String, NodeKind>,
        memo: RefCell<HashMap<String, bool>>,
        listed: RefCell<usize>,
    }

    impl Mem {
        fn new(files: &[&str], dirs: &[&str]) -> Mem {
            let mut entries = BTreeMap::new();
            for f in files {
                entries.insert((*f).to_owned(), NodeKind::File);
            }
            for d in dirs {
                entries.insert((*d).to_owned(), NodeKind::Dir);
            }
            // A path that is also a parent is a directory.
            let paths: Vec<String> = entries.keys().cloned().collect();
            for p in paths {
                add_parents(&mut entries, &p);
            }
            Mem {
                entries,
                memo: RefCell::default(),
                listed: RefCell::new(0),
            }
        }

        /// Every visible path, walked as a filesystem would (only into shown directories).
        fn visible(&self, p: &Policy) -> BTreeSet<String> {
            let mut out = BTreeSet::new();
            let mut stack = vec![(String::new(), p.cursor_root())];
            while let Some((dir, cur)) = stack.pop() {
                for (child, name, kind) in self.children(&dir) {
                    let c = p.cursor_child(&cur, &name);
                    if p.decide_in(self, &child, &c, kind).level.is_visible() {
                        out.insert(child.clone());
                        if kind == NodeKind::Dir {
                            stack.push((child, c));
                        }
                    }
                }
            }
            out
        }
    }

    fn add_parents(entries: &mut BTreeMap<String, NodeKind>, path: &str) {
        let mut at = 0;
        while let Some(i) = path[at + 1..].find('/') {
            at += i + 1;
            entries.insert(path[..at].to_owned(), NodeKind::Dir);
        }
    }

    impl Tree for Mem {
        type Node = String;

        fn children(&self, dir: &String) -> Vec<(String, String, NodeKind)> {
            *self.listed.borrow_mut() += 1;
            let prefix = format!("{dir}/");
            self.entries
                .iter()
                .filter_map(|(p, k)| {
                    let rest = p.strip_prefix(&prefix)?;
                    (!rest.contains('/')).then(|| (p.clone(), rest.to_owned(), *k))
                })
                .collect()
        }

        fn cached(&self, dir: &String) -> Option<bool> {
            self.memo.borrow().get(dir).copied()
        }

        fn remember(&self, dir: &String, shown: bool) {
            self.memo.borrow_mut().insert(dir.clone(), shown);
        }
    }

    fn set(paths: &[&str]) -> BTreeSet<String> {
        paths.iter().map(|p| (*p).to_owned()).collect()
    }

    #[test]
    fn only_directories_leading_to_granted_files_are_shown() {
        let p = Policy::compile(vec![PermissionRule::glob("**/*.py", Level::Read, 0)]).unwrap();
        let t = Mem::new(
            &[
                "/src/pkg/deep/leaf.py",
                "/docs/guide.md",
                "/secrets/db.txt",
                "/top.py",
            ],
            &["/empty"],
        );
        assert_eq!(
            t.visible(&p),
            set(&[
                "/src",
                "/src/pkg",
                "/src/pkg/deep",
                "/src/pkg/deep/leaf.py",
                "/top.py"
            ])
        );
        // The hidden directory reports the decision it has without traversal.
        let docs = p.cursor(&SandboxPath::parse("/docs").unwrap());
        let d = p.decide_in(&t, &"/docs".to_owned(), &docs, NodeKind::Dir);
        assert_eq!((d.level, d.basis), (Level::None, Basis::NoMatch));
    }

    #[test]
    fn verdicts_are_remembered() {
        let p = Policy::compile(vec![PermissionRule::glob("**/*.py", Level::Read, 0)]).unwrap();
        let t = Mem::new(&["/a/b/c/x.txt", "/a/b/y.txt"], &[]);
        assert!(t.visible(&p).is_empty());
        let first = *t.listed.borrow();
        assert!(t.visible(&p).is_empty());
        // The second walk lists only the root: every directory below has a verdict.
        assert_eq!(*t.listed.borrow() - first, 1);
    }

    fn rule_strategy() -> impl Strategy<Value = PermissionRule> {
        let pattern = prop::sample::select(vec![
            "**/*.py", "**/*", "/a/**", "a", "/a/b", "**/s/**", "/b/*.py", "*.md", "/a/*", "**/b",
            "/s",
        ]);
        let ty = prop::sample::select(vec![
            PatternType::Glob,
            PatternType::Directory,
            PatternType::File,
        ]);
        let level = prop::sample::select(Level::ALL.to_vec());
        (pattern, ty, level, 0..3i32).prop_map(|(p, t, l, pr)| PermissionRule::new(p, t, l, pr))
    }

    fn tree_strategy() -> impl Strategy<Value = Vec<(String, bool)>> {
        let name = prop::sample::select(vec!["a", "b", "s", "x.py", "y.md"]);
        let path =
            prop::collection::vec(name, 1..5).prop_map(|parts| format!("/{}", parts.join("/")));
        prop::collection::vec((path, any::<bool>()), 0..12)
    }

    proptest! {
        /// The visible paths of a tree are exactly the paths whose own level is at least
        /// `view`, plus their ancestors.
        #[test]
        fn visible_paths_are_granted_paths_and_their_ancestors(
            rules in prop::collection::vec(rule_strategy(), 0..6),
            tree in tree_strategy(),
        ) {
            let p = Policy::compile(rules).unwrap();
            let files: Vec<&str> = tree.iter().filter(|(_, d)| !d).map(|(p, _)| p.as_str()).collect();
            let dirs: Vec<&str> = tree.iter().filter(|(_, d)| *d).map(|(p, _)| p.as_str()).collect();
            let t = Mem::new(&files, &dirs);
            let mut expected = BTreeSet::new();
            for (path, kind) in &t.entries {
                let sp = SandboxPath::parse(path).unwrap();
                let d = p.evaluate(&sp, *kind);
                let own = match d.basis {
                    Basis::Traversal { .. } => false,
                    _ => d.level.is_visible(),
                };
                if own {
                    let mut a = Some(sp);
                    while let Some(x) = a {
                        if x.is_root() { break; }
                        expected.insert(x.to_string());
                        a = x.parent();
                    }
                }
            }
            prop_assert_eq!(t.visible(&p), expected);
        }
    }
}
