//! The invariant as a property, without mounting: random operation sequences driven through
//! the adapter's inner functions never change (or create) anything below `write`, and
//! publishing carries nothing below `write` to the codebase.

use std::collections::BTreeMap;
use std::io::Read;

use agentfense_core::PermissionRule;
use proptest::prelude::*;

use super::*;
use crate::audit::Auditor;
use crate::delta::PublishFilter;

fn rules() -> Vec<PermissionRule> {
    vec![
        PermissionRule::glob("**/*", Level::Read, 0),
        PermissionRule::glob("/o/**", Level::Write, 10),
        PermissionRule::glob("/v/**", Level::View, 10),
        PermissionRule::glob("/o/ro/**", Level::Read, 20),
        PermissionRule::glob("**/s*", Level::None, 100),
    ]
}

/// What a path holds: kind and content (file data or link target).
type Tree = BTreeMap<PathBuf, (EntryKind, Vec<u8>)>;

fn build_lower(root: &Path) {
    for top in ["a", "o", "v", "o/ro", "o/d"] {
        for (rel, data) in [
            ("f", "f"),
            ("s", "secret"),
            ("sd/f", "secret"),
            ("d/f", "df"),
        ] {
            let p = root.join(top).join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, data).unwrap();
        }
    }
    std::os::unix::fs::symlink("f", root.join("o/l")).unwrap();
}

fn snapshot_disk(root: &Path, rel: &Path, out: &mut Tree) {
    for e in std::fs::read_dir(root.join(rel)).unwrap() {
        let e = e.unwrap();
        let p = rel.join(e.file_name());
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            out.insert(p.clone(), (EntryKind::Dir, vec![]));
            snapshot_disk(root, &p, out);
        } else if ft.is_symlink() {
            let t = std::fs::read_link(e.path()).unwrap();
            out.insert(
                p,
                (EntryKind::Symlink, t.into_os_string().into_encoded_bytes()),
            );
        } else {
            out.insert(p, (EntryKind::File, std::fs::read(e.path()).unwrap()));
        }
    }
}

fn snapshot_view(d: &Delta, rel: &Path, out: &mut Tree) {
    for (name, kind) in d.list(rel).unwrap() {
        let p = rel.join(name);
        let data = match kind {
            EntryKind::Dir => {
                snapshot_view(d, &p, out);
                vec![]
            }
            EntryKind::File => {
                let mut v = vec![];
                d.open_read(&p).unwrap().0.read_to_end(&mut v).unwrap();
                v
            }
            EntryKind::Symlink => d.readlink(&p).unwrap(),
            EntryKind::Other | EntryKind::Fifo | EntryKind::Socket => vec![],
        };
        out.insert(p, (kind, data));
    }
}

#[derive(Clone, Debug)]
enum Op {
    Create(String),
    Mkdir(String),
    Unlink(String),
    Rmdir(String),
    Rename(String, String),
    Write(String),
    Truncate(String),
    Chmod(String),
    Utimes(String),
    Symlink(String),
    Link(String, String),
}

fn path_strategy() -> impl Strategy<Value = String> {
    // Mostly below the write area /o, where operations can succeed.
    let first = prop_oneof![6 => Just("o"), 1 => Just("a"), 1 => Just("v"), 1 => Just("g")];
    let rest = proptest::collection::vec(
        prop_oneof![
            Just("d"),
            Just("f"),
            Just("s"),
            Just("sd"),
            Just("ro"),
            Just("g"),
            Just("h"),
            Just("l"),
        ],
        0..3,
    );
    (first, rest).prop_map(|(f, r)| std::iter::once(f).chain(r).collect::<Vec<_>>().join("/"))
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let p = path_strategy;
    prop_oneof![
        p().prop_map(Op::Create),
        p().prop_map(Op::Mkdir),
        p().prop_map(Op::Unlink),
        p().prop_map(Op::Rmdir),
        (p(), p()).prop_map(|(a, b)| Op::Rename(a, b)),
        p().prop_map(Op::Write),
        p().prop_map(Op::Truncate),
        p().prop_map(Op::Chmod),
        p().prop_map(Op::Utimes),
        p().prop_map(Op::Symlink),
        (p(), p()).prop_map(|(a, b)| Op::Link(a, b)),
    ]
}

fn resolve(fs: &PolicyFs, path: &Path) -> Option<u64> {
    let mut ino = 1;
    for c in path.components() {
        ino = fs.do_lookup(ino, c.as_os_str()).ok()?.ino.0;
    }
    Some(ino)
}

fn split(p: &str) -> (PathBuf, OsString) {
    let p = Path::new(p);
    (
        p.parent().map(Path::to_path_buf).unwrap_or_default(),
        p.file_name().map(OsStr::to_os_string).unwrap_or_default(),
    )
}

/// Applies `op`; whether it succeeded (it may be refused, or name nothing).
fn apply(fs: &PolicyFs, op: &Op) -> bool {
    let owner = (0, 0);
    let parent_of = |p: &str| {
        let (parent, name) = split(p);
        resolve(fs, &parent).map(|i| (i, name))
    };
    let ino_of = |p: &str| resolve(fs, Path::new(p));
    match op {
        Op::Create(p) => {
            if let Some((i, n)) = parent_of(p) {
                return fs
                    .do_create(owner, i, &n, libc::S_IFREG | 0o644, 0, libc::O_WRONLY)
                    .is_ok();
            }
        }
        Op::Mkdir(p) => {
            if let Some((i, n)) = parent_of(p) {
                return fs.do_mkdir(owner, i, &n, 0o755, 0).is_ok();
            }
        }
        Op::Unlink(p) | Op::Rmdir(p) => {
            if let Some((i, n)) = parent_of(p) {
                return fs.do_remove(i, &n, matches!(op, Op::Rmdir(_))).is_ok();
            }
        }
        Op::Rename(a, b) => {
            if let (Some((ia, na)), Some((ib, nb))) = (parent_of(a), parent_of(b)) {
                return fs.do_rename(ia, &na, ib, &nb, RenameFlags::empty()).is_ok();
            }
        }
        Op::Write(p) => {
            if let Some(i) = ino_of(p) {
                // No-open mode: a WRITE by inode, without a handle.
                return fs.do_write(i, FileHandle(0), 0, b"CHANGED").is_ok();
            }
        }
        Op::Truncate(p) | Op::Chmod(p) | Op::Utimes(p) => {
            if let Some(i) = ino_of(p) {
                let (size, mode, time) = match op {
                    Op::Truncate(_) => (Some(0), None, None),
                    Op::Chmod(_) => (None, Some(0o600), None),
                    _ => (None, None, Some(TimeOrNow::Now)),
                };
                return fs
                    .do_setattr(i, mode, None, None, size, time, time, None)
                    .is_ok();
            }
        }
        Op::Symlink(p) => {
            if let Some((i, n)) = parent_of(p) {
                return fs.do_symlink(owner, i, &n, Path::new("f")).is_ok();
            }
        }
        Op::Link(a, b) => {
            if let (Some(i), Some((ib, nb))) = (ino_of(a), parent_of(b)) {
                return fs.do_link(i, ib, &nb).is_ok();
            }
        }
    }
    false
}

fn level(policy: &Policy, p: &Path, kind: EntryKind) -> Level {
    let mut cur = policy.cursor_root();
    for c in p.components() {
        cur = policy.cursor_child(&cur, &c.as_os_str().to_string_lossy());
    }
    policy.decide(&cur, kind_of(kind)).level
}

/// Every path below `write` in `before` is unchanged in `after`, and every path new in
/// `after` is at `write`.
fn check_protected(
    policy: &Policy,
    before: &Tree,
    after: &Tree,
    what: &str,
) -> Result<(), TestCaseError> {
    for (p, (kind, data)) in before {
        if level(policy, p, *kind) < Level::Write {
            prop_assert_eq!(
                after.get(p),
                Some(&(*kind, data.clone())),
                "{}: {:?} changed",
                what,
                p
            );
        }
    }
    for (p, (kind, _)) in after {
        if !before.contains_key(p) {
            prop_assert_eq!(
                level(policy, p, *kind),
                Level::Write,
                "{}: {:?} appeared",
                what,
                p
            );
        }
    }
    Ok(())
}

/// Runs `ops` under `rules`, checks the invariant, and returns how many operations succeeded
/// (a filesystem that refused everything would keep the invariant too).
fn run_case(rules: Vec<PermissionRule>, ops: &[Op]) -> Result<usize, TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let lower = dir.path().join("lower");
    build_lower(&lower);
    let mut before = Tree::new();
    snapshot_disk(&lower, Path::new(""), &mut before);
    let policy = Policy::compile(rules).unwrap();
    let (shared, fs) = adapter(&lower, &dir.path().join("delta"), policy.clone());
    // Hidden paths are unreachable from the start.
    for (p, (kind, _)) in &before {
        if level(&policy, p, *kind) == Level::None {
            prop_assert!(resolve(&fs, p).is_none(), "{:?} reachable", p);
        }
    }
    let succeeded = ops.iter().filter(|op| apply(&fs, op)).count();
    // The sandbox's view.
    let mut view = Tree::new();
    snapshot_view(&shared.delta, Path::new(""), &mut view);
    check_protected(&policy, &before, &view, "view")?;
    // The codebase, untouched until published...
    let mut disk = Tree::new();
    snapshot_disk(&lower, Path::new(""), &mut disk);
    prop_assert_eq!(&disk, &before);
    // ...and after publishing, changed only at write paths.
    let report = shared
        .delta
        .publish(&PublishFilter {
            allow: &|p, k| level(&policy, p, k) == Level::Write,
            busy: &|_| false,
        })
        .unwrap();
    prop_assert_eq!(report.skipped, Vec::<PathBuf>::new());
    let mut disk = Tree::new();
    snapshot_disk(&lower, Path::new(""), &mut disk);
    check_protected(&policy, &before, &disk, "codebase")?;
    prop_assert_eq!(&disk, &view, "the codebase matches the view after publish");
    Ok(succeeded)
}

/// The property's operations do succeed where the rules allow: every one of these, below the
/// write area, goes through (and the invariant holds around them).
#[test]
fn allowed_operations_succeed_under_the_property() {
    let ops = vec![
        Op::Create("o/new".into()),
        Op::Write("o/new".into()),
        Op::Mkdir("o/nd".into()),
        Op::Rename("o/new".into(), "o/nd/moved".into()),
        Op::Symlink("o/ln".into()),
        Op::Truncate("o/f".into()),
        Op::Chmod("o/d/f".into()),
        Op::Utimes("o/d/f".into()),
        Op::Link("o/nd/moved".into(), "o/hard".into()),
        Op::Unlink("o/f".into()),
    ];
    let n = run_case(rules(), &ops).unwrap();
    assert_eq!(n, ops.len(), "{ops:?}");
    // And refused ones are refused: nothing of these succeeds.
    let refused = vec![
        Op::Create("a/new".into()),
        Op::Write("a/f".into()),
        Op::Unlink("o/ro/f".into()),
        Op::Create("o/s".into()),
        Op::Mkdir("v/x".into()),
    ];
    assert_eq!(run_case(rules(), &refused).unwrap(), 0);
}

fn rule_strategy() -> impl Strategy<Value = PermissionRule> {
    let pat = proptest::collection::vec(
        prop_oneof![
            Just("**"),
            Just("*"),
            Just("o"),
            Just("d"),
            Just("s*"),
            Just("f"),
            Just("ro")
        ],
        1..4,
    )
    .prop_map(|v| format!("/{}", v.join("/")));
    (
        pat,
        prop_oneof![
            Just(Level::None),
            Just(Level::View),
            Just(Level::Read),
            Just(Level::Write)
        ],
        0i32..3,
    )
        .prop_map(|(p, l, pr)| PermissionRule::glob(p, l, pr))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]
    #[test]
    fn nothing_below_write_ever_changes(ops in proptest::collection::vec(op_strategy(), 1..40)) {
        run_case(rules(), &ops)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn nothing_below_write_ever_changes_under_random_rules(
        rules in proptest::collection::vec(rule_strategy(), 1..6),
        ops in proptest::collection::vec(op_strategy(), 1..40),
    ) {
        run_case(rules, &ops)?;
    }
}

/// A file made through CREATE keeps its handle, but every transfer through it is checked
/// against the rules of the moment: after a rule change that demotes the path, the open
/// handle can neither write nor read.
#[test]
fn create_handles_follow_rule_changes() {
    let dir = tempfile::tempdir().unwrap();
    let lower = dir.path().join("lower");
    build_lower(&lower);
    let (shared, fs) = adapter(
        &lower,
        &dir.path().join("delta"),
        Policy::compile(rules()).unwrap(),
    );
    let parent = resolve(&fs, Path::new("o")).unwrap();
    let (attr, file, write) = fs
        .do_create(
            (0, 0),
            parent,
            OsStr::new("new.txt"),
            0o644,
            0,
            libc::O_RDWR,
        )
        .unwrap();
    assert!(write);
    let ino = attr.ino.0;
    let fh = FileHandle(fs.add_handle(Handle {
        ino,
        file: Arc::new(file),
        write,
        kind: HandleKind::Created,
    }));
    assert_eq!(fs.do_write(ino, fh, 0, b"abc").unwrap(), 3);
    assert_eq!(fs.do_read(ino, fh, 0, 10).unwrap(), b"abc");
    shared.set_policy(Policy::compile(vec![PermissionRule::glob("/**", Level::View, 0)]).unwrap());
    assert!(matches!(
        fs.do_write(ino, fh, 3, b"def"),
        Err(FsError::Denied {
            level: Level::View,
            ..
        })
    ));
    assert!(matches!(
        fs.do_read(ino, fh, 0, 10),
        Err(FsError::Denied {
            level: Level::View,
            ..
        })
    ));
}

/// The adapter over a fresh delta, without kernel caching, as the mount builds it.
fn adapter(lower: &Path, delta: &Path, policy: Policy) -> (Arc<Shared>, PolicyFs) {
    let shared = Arc::new(Shared::new(
        Delta::open(lower, delta).unwrap(),
        Auditor::new("t".into()),
        policy,
    ));
    let opts = FsOptions {
        entry_ttl: Duration::ZERO,
        attr_ttl: Duration::ZERO,
        owner: None,
        io_mode: IoMode::NoOpen,
        max_open_files: crate::mount::DEFAULT_MAX_OPEN_FILES,
    };
    let fs = PolicyFs::new(shared.clone(), opts);
    (shared, fs)
}
