use super::*;
use pretty_assertions::assert_eq;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};

struct Fx {
    _dir: tempfile::TempDir,
    lower: PathBuf,
    delta_dir: PathBuf,
    d: Delta,
}

fn fx() -> Fx {
    let dir = tempfile::tempdir().unwrap();
    let lower = dir.path().join("lower");
    let delta_dir = dir.path().join("delta");
    std::fs::create_dir_all(lower.join("src/deep")).unwrap();
    std::fs::write(lower.join("README"), "readme\n").unwrap();
    std::fs::write(lower.join("src/a.rs"), "fn a() {}\n").unwrap();
    std::fs::write(lower.join("src/deep/b.rs"), "fn b() {}\n").unwrap();
    std::fs::write(lower.join(".wh.keep"), "lower file named like a whiteout\n").unwrap();
    let d = Delta::open(&lower, &delta_dir).unwrap();
    Fx {
        _dir: dir,
        lower,
        delta_dir,
        d,
    }
}

fn p(s: &str) -> &Path {
    Path::new(s)
}

fn names(d: &Delta, rel: &str) -> Vec<String> {
    d.list(p(rel))
        .unwrap()
        .into_iter()
        .map(|(n, _)| n.to_string_lossy().into_owned())
        .collect()
}

fn read(d: &Delta, rel: &str) -> String {
    let (mut f, _) = d.open_read(p(rel)).unwrap();
    let mut s = String::new();
    io::Read::read_to_string(&mut f, &mut s).unwrap();
    s
}

fn write(d: &Delta, rel: &str, text: &str) {
    let mut f = match d.lookup(p(rel)).unwrap() {
        Some(_) => d.open_write(p(rel), true).unwrap(),
        None => d.create_file(p(rel), 0o644, None).unwrap().0,
    };
    f.write_all(text.as_bytes()).unwrap();
}

#[test]
fn resolution_prefers_the_delta_and_never_touches_the_codebase() {
    let f = fx();
    assert_eq!(names(&f.d, ""), [".wh.keep", "README", "src"]);
    assert_eq!(
        f.d.lookup(p("src/a.rs")).unwrap().unwrap().layer,
        Layer::Lower
    );
    write(&f.d, "src/a.rs", "changed\n");
    assert_eq!(read(&f.d, "src/a.rs"), "changed\n");
    assert_eq!(
        f.d.lookup(p("src/a.rs")).unwrap().unwrap().layer,
        Layer::Upper
    );
    assert_eq!(
        std::fs::read_to_string(f.lower.join("src/a.rs")).unwrap(),
        "fn a() {}\n"
    );
    assert_eq!(f.d.lookup(p("missing")).unwrap(), None);
    assert_eq!(f.d.pending(), [PathBuf::from("src/a.rs")]);
    f.d.unlink(p("README")).unwrap();
    f.d.mkdir(p("new"), 0o755, None).unwrap();
    assert_eq!(
        f.d.changes(),
        [
            Change {
                path: "README".into(),
                kind: ChangeKind::Deleted
            },
            Change {
                path: "new".into(),
                kind: ChangeKind::Added(EntryKind::Dir)
            },
            Change {
                path: "src/a.rs".into(),
                kind: ChangeKind::Modified(EntryKind::File)
            },
        ]
    );
}

#[test]
fn copy_up_preserves_mode_and_times() {
    let f = fx();
    let file = f.lower.join("src/a.rs");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o751)).unwrap();
    let old = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_modified(old)
        .unwrap();
    f.d.copy_up(p("src/a.rs")).unwrap();
    let up = f.delta_dir.join("upper/src/a.rs");
    let md = std::fs::metadata(&up).unwrap();
    assert_eq!(md.permissions().mode() & 0o7777, 0o751);
    assert_eq!(md.modified().unwrap(), old);
    assert_eq!(std::fs::read_to_string(&up).unwrap(), "fn a() {}\n");
}

#[test]
fn truncating_open_skips_the_copy_but_keeps_the_mode() {
    let f = fx();
    std::fs::set_permissions(
        f.lower.join("README"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    let mut w = f.d.open_write(p("README"), true).unwrap();
    w.write_all(b"new").unwrap();
    assert_eq!(read(&f.d, "README"), "new");
    let md = std::fs::metadata(f.delta_dir.join("upper/README")).unwrap();
    assert_eq!(md.permissions().mode() & 0o7777, 0o640);
    assert_eq!(
        std::fs::read_to_string(f.lower.join("README")).unwrap(),
        "readme\n"
    );
}

#[test]
fn whiteouts_cannot_be_forged_and_wh_names_are_ordinary() {
    let f = fx();
    // An agent file called `.wh.README` is just a file.
    write(&f.d, ".wh.README", "x");
    assert!(f.d.lookup(p("README")).unwrap().is_some());
    assert_eq!(names(&f.d, ""), [".wh.README", ".wh.keep", "README", "src"]);
    let report = f.d.publish(&PublishFilter::default()).unwrap();
    assert_eq!(report.written, [PathBuf::from(".wh.README")]);
    assert!(f.lower.join("README").exists());
    assert!(f.lower.join(".wh.keep").exists());
    // A real delete is recorded outside the upper tree.
    f.d.unlink(p("README")).unwrap();
    assert_eq!(f.d.lookup(p("README")).unwrap(), None);
    assert_eq!(
        std::fs::read_dir(f.delta_dir.join("upper"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect::<Vec<_>>(),
        Vec::<String>::new()
    );
}

#[test]
fn rmdir_needs_an_empty_merged_directory() {
    let f = fx();
    assert!(matches!(f.d.rmdir(p("src")), Err(FsError::NotEmpty { .. })));
    assert!(matches!(
        f.d.rmdir(p("src/deep")),
        Err(FsError::NotEmpty { .. })
    ));
    f.d.unlink(p("src/deep/b.rs")).unwrap();
    f.d.rmdir(p("src/deep")).unwrap();
    assert_eq!(names(&f.d, "src"), ["a.rs"]);
    assert!(matches!(
        f.d.rmdir(p("src/a.rs")),
        Err(FsError::NotDir { .. })
    ));
    // Recreating the directory does not resurrect its old content.
    f.d.mkdir(p("src/deep"), 0o755, None).unwrap();
    assert_eq!(names(&f.d, "src/deep"), Vec::<String>::new());
    assert_eq!(f.d.lookup(p("src/deep/b.rs")).unwrap(), None);
    // Nothing reached the codebase yet.
    assert!(f.lower.join("src/deep/b.rs").exists());
}

#[test]
fn file_created_over_a_deleted_directory_hides_its_old_subtree() {
    let f = fx();
    f.d.unlink(p("src/deep/b.rs")).unwrap();
    f.d.rmdir(p("src/deep")).unwrap();
    write(&f.d, "src/deep", "now a file");
    assert_eq!(f.d.lookup(p("src/deep/b.rs")).unwrap(), None);
    let report = f.d.publish(&PublishFilter::default()).unwrap();
    assert_eq!(report.failed, vec![]);
    assert_eq!(
        std::fs::read_to_string(f.lower.join("src/deep")).unwrap(),
        "now a file"
    );
}

#[test]
fn rename_of_files_and_directories() {
    let f = fx();
    // A codebase file: copied to the new name, the old one whited out.
    f.d.rename(p("src/a.rs"), p("src/c.rs")).unwrap();
    assert_eq!(names(&f.d, "src"), ["c.rs", "deep"]);
    assert_eq!(read(&f.d, "src/c.rs"), "fn a() {}\n");
    // A directory with codebase content cannot move in place.
    assert!(matches!(
        f.d.rename(p("src/deep"), p("moved")),
        Err(FsError::CrossDevice { .. })
    ));
    // A directory that lives in the delta can.
    f.d.mkdir(p("new"), 0o755, None).unwrap();
    write(&f.d, "new/x", "x");
    assert_eq!(
        f.d.dir_rename_paths(p("new")).unwrap(),
        [PathBuf::from("new"), PathBuf::from("new/x")]
    );
    f.d.rename(p("new"), p("src/new2")).unwrap();
    assert_eq!(read(&f.d, "src/new2/x"), "x");
    assert_eq!(f.d.lookup(p("new")).unwrap(), None);
    // Over an existing file: replaced. Over a non-empty directory: refused.
    write(&f.d, "tmp1", "new readme");
    f.d.rename(p("tmp1"), p("README")).unwrap();
    assert_eq!(read(&f.d, "README"), "new readme");
    assert!(matches!(
        f.d.rename(p("src/new2"), p("src")),
        Err(FsError::InvalidName { .. }) | Err(FsError::NotEmpty { .. })
    ));
    let report = f.d.publish(&PublishFilter::default()).unwrap();
    assert_eq!(report.failed, vec![]);
    assert_eq!(report.conflicts, vec![]);
    assert!(!f.lower.join("src/a.rs").exists());
    assert_eq!(
        std::fs::read_to_string(f.lower.join("src/c.rs")).unwrap(),
        "fn a() {}\n"
    );
    assert_eq!(
        std::fs::read_to_string(f.lower.join("README")).unwrap(),
        "new readme"
    );
    assert_eq!(
        std::fs::read_to_string(f.lower.join("src/new2/x")).unwrap(),
        "x"
    );
    assert!(!f.lower.join("new").exists());
}

#[test]
fn publish_applies_only_changes_since_the_last_publish() {
    let f = fx();
    write(&f.d, "out.txt", "1");
    let r = f.d.publish(&PublishFilter::default()).unwrap();
    assert_eq!(r.written, [PathBuf::from("out.txt")]);
    assert_eq!(f.d.pending(), Vec::<PathBuf>::new());
    // The published copy left the delta: the sandbox now reads the codebase version.
    assert_eq!(
        f.d.lookup(p("out.txt")).unwrap().unwrap().layer,
        Layer::Lower
    );
    // Someone else changes it; a publish without new changes does not re-apply ours.
    std::fs::write(f.lower.join("out.txt"), "other sandbox").unwrap();
    let r = f.d.publish(&PublishFilter::default()).unwrap();
    assert_eq!(r, PublishReport::default());
    assert_eq!(
        std::fs::read_to_string(f.lower.join("out.txt")).unwrap(),
        "other sandbox"
    );
    assert_eq!(read(&f.d, "out.txt"), "other sandbox");
}

#[test]
fn publish_detects_conflicts_and_the_later_publish_wins() {
    let f = fx();
    write(&f.d, "README", "mine");
    std::fs::write(f.lower.join("README"), "theirs, longer").unwrap();
    write(&f.d, "fresh", "mine");
    std::fs::write(f.lower.join("fresh"), "theirs").unwrap();
    let r = f.d.publish(&PublishFilter::default()).unwrap();
    let paths: Vec<_> = r.conflicts.iter().map(|c| c.path.clone()).collect();
    assert_eq!(paths, [PathBuf::from("README"), PathBuf::from("fresh")]);
    assert_eq!(r.conflicts[1].expected, None);
    assert_eq!(
        std::fs::read_to_string(f.lower.join("README")).unwrap(),
        "mine"
    );
    assert_eq!(
        std::fs::read_to_string(f.lower.join("fresh")).unwrap(),
        "mine"
    );
}

#[test]
fn publish_deletes_and_never_removes_entries_added_since() {
    let f = fx();
    f.d.unlink(p("src/deep/b.rs")).unwrap();
    f.d.rmdir(p("src/deep")).unwrap();
    // Another sandbox adds a file to the directory this one deleted.
    std::fs::write(f.lower.join("src/deep/other.rs"), "keep").unwrap();
    let r = f.d.publish(&PublishFilter::default()).unwrap();
    assert_eq!(r.deleted, [PathBuf::from("src/deep/b.rs")]);
    assert_eq!(r.failed.len(), 1, "{r:?}");
    assert!(f.lower.join("src/deep/other.rs").exists());
    // Still pending, and still failing for the same reason.
    assert_eq!(f.d.pending(), [PathBuf::from("src/deep")]);
    let r = f.d.publish(&PublishFilter::default()).unwrap();
    assert_eq!(r.failed.len(), 1, "{r:?}");
    assert!(f.lower.join("src/deep/other.rs").exists());
}

#[test]
fn publish_filter_keeps_refused_and_busy_paths_pending() {
    let f = fx();
    write(&f.d, "a", "a");
    write(&f.d, "b", "b");
    let r =
        f.d.publish(&PublishFilter {
            allow: &|p, _| p != Path::new("a"),
            busy: &|p| p == Path::new("b"),
        })
        .unwrap();
    assert_eq!(r.skipped, [PathBuf::from("a")]);
    assert_eq!(r.written, [PathBuf::from("b")]);
    assert!(!f.lower.join("a").exists());
    assert_eq!(f.d.pending(), [PathBuf::from("a"), PathBuf::from("b")]);
    assert_eq!(f.d.lookup(p("b")).unwrap().unwrap().layer, Layer::Upper);
}

#[test]
fn host_symlinks_are_never_followed() {
    let f = fx();
    let outside = f._dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("passwd"), "secret").unwrap();
    std::os::unix::fs::symlink(&outside, f.lower.join("link")).unwrap();
    std::os::unix::fs::symlink(outside.join("passwd"), f.lower.join("pw")).unwrap();
    // The links are shown as links; nothing below or behind them is reachable.
    assert_eq!(
        f.d.lookup(p("link")).unwrap().unwrap().kind,
        EntryKind::Symlink
    );
    assert_eq!(f.d.lookup(p("link/passwd")).unwrap(), None);
    assert!(f.d.list(p("link")).map_or(true, |v| v.is_empty()));
    assert!(f.d.open_read(p("pw")).is_err());
    assert!(f.d.open_write(p("pw"), false).is_err());
    assert_eq!(
        f.d.readlink(p("pw")).unwrap(),
        outside.join("passwd").as_os_str().as_bytes()
    );
    // Publishing into a codebase directory that became a symlink writes nothing outside.
    f.d.mkdir(p("out"), 0o755, None).unwrap();
    write(&f.d, "out/file", "x");
    std::os::unix::fs::symlink(&outside, f.lower.join("out")).unwrap();
    let r = f.d.publish(&PublishFilter::default()).unwrap();
    assert_eq!(r.conflicts, vec![]);
    assert!(!outside.join("file").exists());
    assert!(
        std::fs::symlink_metadata(f.lower.join("out"))
            .unwrap()
            .is_dir()
    );
    assert_eq!(
        std::fs::read_to_string(f.lower.join("out/file")).unwrap(),
        "x"
    );
    assert_eq!(
        std::fs::read_to_string(outside.join("passwd")).unwrap(),
        "secret"
    );
    // Copy-up of a symlink copies the link, not its target.
    f.d.set_times(p("pw"), None, Some(std::time::UNIX_EPOCH))
        .unwrap();
    assert!(
        std::fs::symlink_metadata(f.delta_dir.join("upper/pw"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(
        std::fs::metadata(outside.join("passwd")).unwrap().mtime() > 0,
        true
    );
}

#[test]
fn agents_cannot_create_setuid_files() {
    let f = fx();
    f.d.create_file(p("s"), 0o4755, None).unwrap();
    f.d.set_mode(p("src/a.rs"), 0o6755).unwrap();
    let mode = |rel: &str| {
        std::fs::metadata(f.delta_dir.join("upper").join(rel))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!((mode("s"), mode("src/a.rs")), (0o755, 0o755));
}

#[test]
fn special_files_are_never_opened() {
    let f = fx();
    let fifo = f.lower.join("fifo");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    assert_eq!(
        f.d.lookup(p("fifo")).unwrap().unwrap().kind,
        EntryKind::Fifo
    );
    // Would block forever without a writer if it were opened.
    assert!(f.d.open_read(p("fifo")).is_err());
    assert!(f.d.open_write(p("fifo"), false).is_err());
}

#[test]
fn bad_paths_are_rejected() {
    let f = fx();
    for bad in ["../x", "/etc/passwd", "a/../../x", "./a"] {
        assert!(
            matches!(f.d.lookup(p(bad)), Err(FsError::InvalidName { .. })),
            "{bad}"
        );
    }
}

#[test]
fn metadata_survives_reopen() {
    let f = fx();
    f.d.unlink(p("README")).unwrap();
    write(&f.d, "new", "n");
    let d2 = Delta::open(&f.lower, &f.delta_dir).unwrap();
    assert_eq!(d2.lookup(p("README")).unwrap(), None);
    assert_eq!(
        d2.pending(),
        [PathBuf::from("README"), PathBuf::from("new")]
    );
    let r = d2.publish(&PublishFilter::default()).unwrap();
    assert_eq!(r.deleted, [PathBuf::from("README")]);
    assert!(!f.lower.join("README").exists());
}

#[test]
fn a_torn_journal_line_is_ignored_and_garbage_is_an_error() {
    let f = fx();
    f.d.unlink(p("README")).unwrap();
    let Fx {
        _dir,
        lower,
        delta_dir,
        d,
    } = f;
    drop(d);
    let meta = delta_dir.join("meta");
    let mut text = std::fs::read_to_string(&meta).unwrap();
    text.push_str("D+ 61");
    std::fs::write(&meta, &text).unwrap();
    let d = Delta::open(&lower, &delta_dir).unwrap();
    assert_eq!(d.pending(), [PathBuf::from("README")]);
    drop(d);
    std::fs::write(&meta, "X+ zz\n").unwrap();
    assert!(matches!(
        Delta::open(&lower, &delta_dir),
        Err(FsError::CorruptMeta { line: 1, .. })
    ));
}

#[test]
fn non_utf8_names_round_trip() {
    let f = fx();
    let name = OsStr::from_bytes(b"caf\xe9\n.txt");
    let rel = Path::new("src").join(name);
    f.d.create_file(&rel, 0o600, None).unwrap();
    let d2 = Delta::open(&f.lower, &f.delta_dir).unwrap();
    assert_eq!(d2.pending(), std::slice::from_ref(&rel));
    d2.publish(&PublishFilter::default()).unwrap();
    assert!(f.lower.join(&rel).exists());
}

// ---- Property: the delta behaves like one plain directory tree -----------------------------

mod model {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[derive(Clone, Debug, PartialEq, Eq)]
    enum Node {
        Dir,
        File(String),
    }

    #[derive(Clone, Debug)]
    enum Op {
        Write(String, String),
        Mkdir(String),
        Unlink(String),
        Rmdir(String),
        Rename(String, String),
        Publish,
    }

    fn path_strategy() -> impl Strategy<Value = String> {
        // Names of the fixture's codebase, so that ops mix codebase and delta entries.
        proptest::collection::vec(
            prop_oneof![
                Just("src"),
                Just("deep"),
                Just("a.rs"),
                Just("b.rs"),
                Just(".wh.x"),
                Just("x")
            ],
            1..4,
        )
        .prop_map(|v| v.join("/"))
    }

    fn op_strategy() -> impl Strategy<Value = Op> {
        prop_oneof![
            (path_strategy(), "[xyz]{1,3}").prop_map(|(p, c)| Op::Write(p, c)),
            path_strategy().prop_map(Op::Mkdir),
            path_strategy().prop_map(Op::Unlink),
            path_strategy().prop_map(Op::Rmdir),
            (path_strategy(), path_strategy()).prop_map(|(a, b)| Op::Rename(a, b)),
            Just(Op::Publish),
        ]
    }

    type Model = BTreeMap<PathBuf, Node>;

    fn parent_ok(m: &Model, p: &Path) -> bool {
        match p.parent() {
            Some(pp) if pp.as_os_str().is_empty() => true,
            Some(pp) => m.get(pp) == Some(&Node::Dir),
            None => false,
        }
    }

    fn children<'a>(m: &'a Model, p: &'a Path) -> impl Iterator<Item = &'a PathBuf> + 'a {
        m.keys().filter(move |k| k.parent() == Some(p))
    }

    /// Applies `op` to the model; returns whether it should succeed.
    fn apply(m: &mut Model, op: &Op) -> bool {
        match op {
            Op::Write(p, c) => {
                let p = PathBuf::from(p);
                match m.get(&p) {
                    Some(Node::Dir) => false,
                    Some(Node::File(_)) => {
                        m.insert(p, Node::File(c.clone()));
                        true
                    }
                    None if parent_ok(m, &p) => {
                        m.insert(p, Node::File(c.clone()));
                        true
                    }
                    None => false,
                }
            }
            Op::Mkdir(p) => {
                let p = PathBuf::from(p);
                if m.contains_key(&p) || !parent_ok(m, &p) {
                    return false;
                }
                m.insert(p, Node::Dir);
                true
            }
            Op::Unlink(p) => {
                let p = PathBuf::from(p);
                if matches!(m.get(&p), Some(Node::File(_))) {
                    m.remove(&p);
                    true
                } else {
                    false
                }
            }
            Op::Rmdir(p) => {
                let p = PathBuf::from(p);
                if m.get(&p) == Some(&Node::Dir) && children(m, &p).next().is_none() {
                    m.remove(&p);
                    true
                } else {
                    false
                }
            }
            Op::Rename(..) | Op::Publish => true,
        }
    }

    fn tree(d: &Delta, rel: &Path, out: &mut Model) {
        for (name, kind) in d.list(rel).unwrap() {
            let p = rel.join(&name);
            if kind == EntryKind::Dir {
                out.insert(p.clone(), Node::Dir);
                tree(d, &p, out);
            } else {
                let (mut f, _) = d.open_read(&p).unwrap();
                let mut s = String::new();
                io::Read::read_to_string(&mut f, &mut s).unwrap();
                out.insert(p, Node::File(s));
            }
        }
    }

    fn disk(root: &Path, rel: &Path, out: &mut Model) {
        for e in std::fs::read_dir(root.join(rel)).unwrap() {
            let e = e.unwrap();
            let p = rel.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                out.insert(p.clone(), Node::Dir);
                disk(root, &p, out);
            } else {
                out.insert(p, Node::File(std::fs::read_to_string(e.path()).unwrap()));
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn delta_matches_a_plain_tree(ops in proptest::collection::vec(op_strategy(), 1..25)) {
            let f = fx();
            let mut m = Model::new();
            disk(&f.lower, Path::new(""), &mut m);
            for op in &ops {
                let src_exists = match op {
                    Op::Rename(a, _) => m.contains_key(Path::new(a)),
                    _ => true,
                };
                let res = match op {
                    Op::Write(p, c) => {
                        let r = match f.d.lookup(Path::new(p)) {
                            Ok(Some(_)) => f.d.open_write(Path::new(p), true),
                            Ok(None) => f.d.create_file(Path::new(p), 0o644, None).map(|(f, _)| f),
                            Err(e) => Err(e),
                        };
                        r.and_then(|mut file| {
                            file.write_all(c.as_bytes()).map_err(|e| FsError::io("w", p, e))
                        })
                        .is_ok()
                    }
                    Op::Mkdir(p) => f.d.mkdir(Path::new(p), 0o755, None).is_ok(),
                    Op::Unlink(p) => f.d.unlink(Path::new(p)).is_ok(),
                    Op::Rmdir(p) => f.d.rmdir(Path::new(p)).is_ok(),
                    Op::Rename(a, b) => {
                        // The model follows whatever the delta did (it may refuse with
                        // EXDEV), then checks the views agree.
                        let ok = f.d.rename(Path::new(a), Path::new(b)).is_ok();
                        if ok && a != b {
                            let (a, b) = (PathBuf::from(a), PathBuf::from(b));
                            let moved: Vec<_> = m.keys().filter(|k| k.starts_with(&a)).cloned().collect();
                            let old_dst: Vec<_> = m.keys().filter(|k| k.starts_with(&b)).cloned().collect();
                            for k in old_dst { m.remove(&k); }
                            for k in moved {
                                let v = m.remove(&k).unwrap();
                                let suffix = k.strip_prefix(&a).unwrap();
                                let nk = if suffix.as_os_str().is_empty() { b.clone() } else { b.join(suffix) };
                                m.insert(nk, v);
                            }
                        }
                        ok
                    }
                    Op::Publish => {
                        let r = f.d.publish(&PublishFilter::default()).unwrap();
                        prop_assert_eq!(r.failed, vec![]);
                        let mut on_disk = Model::new();
                        disk(&f.lower, Path::new(""), &mut on_disk);
                        prop_assert_eq!(&on_disk, &m, "codebase after publish");
                        true
                    }
                };
                let expected = {
                    let mut m2 = m.clone();
                    let ok = apply(&mut m2, op);
                    if !matches!(op, Op::Rename(..) | Op::Publish) { m = m2; }
                    if matches!(op, Op::Rename(..)) { res && src_exists } else { ok }
                };
                prop_assert_eq!(res, expected, "{:?}", op);
                let mut seen = Model::new();
                tree(&f.d, Path::new(""), &mut seen);
                prop_assert_eq!(&seen, &m, "after {:?}", op);
            }
            // Reopening the delta gives the same view.
            let d2 = Delta::open(&f.lower, &f.delta_dir).unwrap();
            let mut seen = Model::new();
            tree(&d2, Path::new(""), &mut seen);
            prop_assert_eq!(&seen, &m);
        }
    }
}

#[test]
fn large_copy_ups_run_outside_the_lock_and_stay_exact() {
    let f = fx();
    // Above UNLOCKED_COPY_MIN: copied by stage_copy_up, outside the delta lock.
    let big: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8).collect();
    let file = f.lower.join("src/big.bin");
    std::fs::write(&file, &big).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
    let old = std::time::UNIX_EPOCH + Duration::from_secs(1_100_000_000);
    File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_modified(old)
        .unwrap();
    // Writers race to copy the same file up while readers look around; each writes its own
    // line past the end, at its own offset (a seek to the end and a write are two steps, so
    // racing appenders could overwrite each other's line: a test race, not lost data).
    std::thread::scope(|s| {
        for i in 0..4u64 {
            let d = &f.d;
            let at = big.len() as u64 + i * 9;
            s.spawn(move || {
                let w = d.open_write(p("src/big.bin"), false).unwrap();
                w.write_all_at(format!("writer {i}\n").as_bytes(), at)
                    .unwrap();
            });
        }
        for _ in 0..4 {
            let d = &f.d;
            s.spawn(move || {
                for _ in 0..50 {
                    assert!(d.lookup(p("src/a.rs")).unwrap().is_some());
                    assert!(d.lookup(p("src/big.bin")).unwrap().is_some());
                }
            });
        }
    });
    let up = f.delta_dir.join("upper/src/big.bin");
    let data = std::fs::read(&up).unwrap();
    assert_eq!(
        &data[..big.len()],
        &big[..],
        "the codebase bytes, copied once"
    );
    let tail: Vec<&str> = std::str::from_utf8(&data[big.len()..])
        .unwrap()
        .lines()
        .collect();
    assert_eq!(tail, ["writer 0", "writer 1", "writer 2", "writer 3"]);
    assert_eq!(
        std::fs::metadata(&up).unwrap().permissions().mode() & 0o7777,
        0o640
    );
    assert_eq!(
        std::fs::read(&file).unwrap(),
        big,
        "the codebase is untouched"
    );
    assert_eq!(
        std::fs::read_dir(f.delta_dir.join("work")).unwrap().count(),
        0,
        "copies that lost the race are removed"
    );
    assert_eq!(f.d.pending(), [PathBuf::from("src/big.bin")]);
    // The origin was recorded: a codebase change since the copy-up is a conflict.
    std::fs::write(&file, b"theirs").unwrap();
    let r = f.d.publish(&PublishFilter::default()).unwrap();
    assert_eq!(r.conflicts.len(), 1, "{r:?}");
    assert_eq!(std::fs::read(&file).unwrap(), data);
}

#[test]
fn staged_copy_ups_take_only_large_codebase_files() {
    let f = fx();
    let file = f.lower.join("big.bin");
    std::fs::write(&file, vec![b'a'; 2 << 20]).unwrap();
    f.d.stage_copy_up(p("big.bin"));
    assert_eq!(
        f.d.lookup(p("big.bin")).unwrap().unwrap().layer,
        Layer::Upper
    );
    // Small files and files already in the delta are left to the locked path.
    f.d.stage_copy_up(p("README"));
    assert_eq!(
        f.d.lookup(p("README")).unwrap().unwrap().layer,
        Layer::Lower
    );
    f.d.stage_copy_up(p("big.bin"));
    f.d.stage_copy_up(p("missing"));
    assert_eq!(
        std::fs::read_dir(f.delta_dir.join("work")).unwrap().count(),
        0
    );
}

#[test]
fn copy_up_temporaries_of_dead_processes_are_removed_at_open() {
    let f = fx();
    let work = f.delta_dir.join("work");
    std::fs::write(work.join(".agentfense-999999999-3.tmp"), "half a copy").unwrap();
    let own = format!(".agentfense-{}-77.tmp", std::process::id());
    std::fs::write(work.join(&own), "in progress").unwrap();
    std::fs::write(work.join("unrelated"), "kept").unwrap();
    let _again = Delta::open(&f.lower, &f.delta_dir).unwrap();
    let mut left: Vec<String> = std::fs::read_dir(&work)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, [own, "unrelated".to_owned()]);
}

#[test]
fn publish_works_across_filesystems_and_leaves_no_temporaries() {
    use std::os::unix::fs::MetadataExt;
    // The usual layout: delta and codebase on one filesystem, staged in `work`.
    let f = fx();
    write(&f.d, "src/new.rs", "new");
    f.d.publish(&PublishFilter::default()).unwrap();
    assert_eq!(
        std::fs::read_to_string(f.lower.join("src/new.rs")).unwrap(),
        "new"
    );
    // A delta on another filesystem than its codebase: the rename from `work` fails with
    // EXDEV and publish stages next to the target instead.
    let shm = Path::new("/dev/shm");
    let other = tempfile::tempdir_in(shm).unwrap();
    assert_ne!(
        std::fs::metadata(shm).unwrap().dev(),
        std::fs::metadata(&f.lower).unwrap().dev(),
        "this test needs /dev/shm and the temp dir on different filesystems"
    );
    let d = Delta::open(&f.lower, &other.path().join("delta")).unwrap();
    write(&d, "README", "mine");
    // Watch the codebase directory: no name of ours may ever hold data being written there
    // (finding 9 of issue 13: another sandbox could read it under a name no rule hides).
    let watch = Watch::new(&f.lower);
    d.symlink(p("src/link"), Path::new("../README"), None)
        .unwrap();
    let r = d.publish(&PublishFilter::default()).unwrap();
    assert!(r.failed.is_empty(), "{r:?}");
    assert_eq!(
        std::fs::read_to_string(f.lower.join("README")).unwrap(),
        "mine"
    );
    let written: Vec<String> = watch
        .modified()
        .into_iter()
        .filter(|n| !n.starts_with('#'))
        .collect();
    assert!(written.is_empty(), "data written under a name: {written:?}");
    assert_eq!(
        std::fs::read_link(f.lower.join("src/link")).unwrap(),
        Path::new("../README")
    );
    for dir in [
        f.lower.clone(),
        f.lower.join("src"),
        other.path().join("delta/work"),
    ] {
        let temps: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".agentfense-"))
            .collect();
        assert!(temps.is_empty(), "{}: {temps:?}", dir.display());
    }
}

/// An inotify watch on one directory, for the names files were written under.
struct Watch(OwnedFd);

impl Watch {
    fn new(dir: &Path) -> Watch {
        // SAFETY: plain syscalls; the fd is checked and owned right away.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` was just returned by inotify_init1 and nothing else owns it.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
        // SAFETY: valid fd and NUL-terminated path.
        let wd = unsafe {
            libc::inotify_add_watch(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                c.as_ptr(),
                libc::IN_MODIFY,
            )
        };
        assert!(wd >= 0);
        Watch(fd)
    }

    /// Names of the files modified since the watch began (an `O_TMPFILE` file shows as `#<ino>`).
    fn modified(&self) -> Vec<String> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut names = Vec::new();
        let mut f = File::from(self.0.try_clone().unwrap());
        while let Ok(n) = io::Read::read(&mut f, &mut buf) {
            let mut off = 0;
            while off + 16 <= n {
                let len = u32::from_ne_bytes(buf[off + 12..off + 16].try_into().unwrap()) as usize;
                let name = &buf[off + 16..off + 16 + len];
                let end = name.iter().position(|b| *b == 0).unwrap_or(len);
                names.push(String::from_utf8_lossy(&name[..end]).into_owned());
                off += 16 + len;
            }
        }
        names
    }
}

#[test]
fn staging_names_in_the_codebase_are_never_in_the_merged_view() {
    let f = fx();
    let stage = format!("{STAGE_PREFIX}{}", "0123456789abcdef".repeat(2));
    std::fs::write(f.lower.join(&stage), "API_KEY=hunter2\n").unwrap();
    std::fs::write(f.lower.join("src").join(&stage), "x").unwrap();
    // Not the exact shape: an ordinary file.
    std::fs::write(f.lower.join(".agentfense-stage-notes"), "ordinary\n").unwrap();
    assert!(f.d.lookup(p(&stage)).unwrap().is_none());
    assert!(
        f.d.lookup(&Path::new("src").join(&stage))
            .unwrap()
            .is_none()
    );
    assert!(!names(&f.d, "").contains(&stage));
    assert!(!names(&f.d, "src").contains(&stage));
    assert_eq!(read(&f.d, ".agentfense-stage-notes"), "ordinary\n");
    assert!(is_stage_name(stage.as_bytes()));
    // Nor can a sandbox make one (it would be published where no sandbox can remove it).
    assert!(matches!(
        f.d.create_file(p(&stage), 0o644, None),
        Err(FsError::NotPermitted { .. })
    ));
    assert!(matches!(
        f.d.rename(p("README"), p(&stage)),
        Err(FsError::NotPermitted { .. })
    ));
    assert!(!is_stage_name(b".agentfense-stage-notes"));
}

/// Published new entries belong to their directory's owner (a user's checkout stays theirs
/// whatever uid the sandbox wrote as); replaced ones keep the owner they had. (Needs root to
/// chown; skipped loudly otherwise.)
#[test]
fn published_entries_keep_the_codebase_owners() {
    if !agentfense_testsupport::require(
        "published_entries_keep_the_codebase_owners",
        agentfense_testsupport::root(),
    ) {
        return;
    }
    let f = fx();
    std::os::unix::fs::chown(&f.lower, Some(4321), Some(4322)).unwrap();
    std::os::unix::fs::chown(f.lower.join("README"), Some(555), Some(556)).unwrap();
    write(&f.d, "new.txt", "new\n");
    write(&f.d, "README", "changed\n");
    f.d.mkdir(p("newdir"), 0o755, None).unwrap();
    f.d.mkdir(p("newdir/sub"), 0o755, None).unwrap();
    write(&f.d, "newdir/sub/deep.txt", "deep\n");
    std::os::unix::fs::chown(f.lower.join("src"), Some(777), Some(778)).unwrap();
    write(&f.d, "src/added.rs", "fn added() {}\n");
    f.d.publish(&PublishFilter::default()).unwrap();
    let owner = |rel: &str| {
        let m = std::fs::symlink_metadata(f.lower.join(rel)).unwrap();
        (m.uid(), m.gid())
    };
    assert_eq!(owner("new.txt"), (4321, 4322));
    assert_eq!(owner("newdir"), (4321, 4322));
    assert_eq!(owner("newdir/sub/deep.txt"), (4321, 4322));
    // A new file takes its directory's owner.
    assert_eq!(owner("src/added.rs"), (777, 778));
    assert_eq!(owner("README"), (555, 556));
}

/// The quota's publish accounting: what a publish adds to the codebase counts (and is kept in
/// the delta directory across a reopen), and a published deletion gives it back.
#[test]
fn publishes_count_against_the_quota() {
    let f = fx();
    // (Written straight to the file, as FUSE writes are charged by the FUSE layer: only the
    // publish measures it here.)
    write(&f.d, "big", &"x".repeat(64 << 10));
    f.d.publish(&PublishFilter::default()).unwrap();
    // The file left the delta for the codebase: still this sandbox's.
    let (after, _) = f.d.usage().used();
    assert!(after >= 64 << 10, "{after}");
    let again = Delta::open(&f.lower, &f.delta_dir).unwrap();
    assert_eq!(again.usage().used().0, after);
    again.unlink(p("big")).unwrap();
    again.publish(&PublishFilter::default()).unwrap();
    assert!(
        again.usage().used().0 < 64 << 10,
        "{:?}",
        again.usage().used()
    );
}

/// Publish never turns a project path into a symlink that leaves the project (issue 24): an
/// absolute target or a `..` past the root is refused and reported, the codebase untouched;
/// links inside the project publish as before.
#[test]
fn symlinks_leaving_the_project_are_never_published() {
    let f = fx();
    let d = &f.d;
    // `src/deep` (a directory) becomes a link to /etc; others climb out with `..`.
    d.unlink(p("src/deep/b.rs")).unwrap();
    d.rmdir(p("src/deep")).unwrap();
    d.symlink(p("src/deep"), Path::new("/etc"), None).unwrap();
    d.symlink(p("up"), Path::new("../../root"), None).unwrap();
    d.symlink(p("src/sneaky"), Path::new("a/../../../x"), None)
        .unwrap();
    d.symlink(p("src/fine"), Path::new("../README"), None)
        .unwrap();
    let report = d.publish(&PublishFilter::default()).unwrap();
    let mut refused: Vec<(String, String)> = report
        .refused
        .iter()
        .map(|(p, t)| (p.display().to_string(), t.clone()))
        .collect();
    refused.sort();
    assert_eq!(
        refused,
        [
            ("src/deep".to_owned(), "/etc".to_owned()),
            ("src/sneaky".to_owned(), "a/../../../x".to_owned()),
            ("up".to_owned(), "../../root".to_owned()),
        ]
    );
    assert!(f.lower.join("src/deep").is_dir() || !f.lower.join("src/deep").exists());
    assert!(!f.lower.join("src/deep").is_symlink());
    assert!(!f.lower.join("up").exists() && !f.lower.join("src/sneaky").exists());
    assert_eq!(
        std::fs::read_link(f.lower.join("src/fine")).unwrap(),
        Path::new("../README")
    );
}

#[test]
fn link_targets_are_judged_from_where_the_link_is() {
    use super::link_escapes;
    for (at, target, out) in [
        ("a", "/etc", true),
        ("a", "b", false),
        ("a", "../b", true),
        ("d/a", "../b", false),
        ("d/a", "../../b", true),
        ("d/a", "./x/../../y", false),
        ("d/a", "x/../../../y", true),
        ("d/e/a", "../..", false),
        ("d/e/a", "../../..", true),
        ("a", "", false),
    ] {
        assert_eq!(
            link_escapes(Path::new(at), target.as_bytes()),
            out,
            "{at} -> {target}"
        );
    }
}

#[test]
fn times_copy_up_a_codebase_file_once_and_are_charged_only_for_that() {
    let f = fx();
    let t = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    let upper_entries = |f: &Fx| f.d.usage().used().1;
    let before = upper_entries(&f);
    f.d.set_times(p("src/deep/b.rs"), None, Some(t)).unwrap();
    let up = f.delta_dir.join("upper/src/deep/b.rs");
    assert_eq!(std::fs::metadata(&up).unwrap().modified().unwrap(), t);
    assert_eq!(std::fs::read_to_string(&up).unwrap(), "fn b() {}\n");
    assert_ne!(
        std::fs::metadata(f.lower.join("src/deep/b.rs"))
            .unwrap()
            .modified()
            .unwrap(),
        t,
        "the codebase is untouched"
    );
    // The copy and the two directories made above it.
    let copied = upper_entries(&f);
    assert_eq!(copied, before + 3);
    assert_eq!(f.d.pending(), [PathBuf::from("src/deep/b.rs")]);
    // Once in this layer, times change in place and take no room.
    let t2 = t + Duration::from_secs(5);
    f.d.set_times(p("src/deep/b.rs"), Some(t2), Some(t2))
        .unwrap();
    assert_eq!(std::fs::metadata(&up).unwrap().modified().unwrap(), t2);
    assert_eq!(upper_entries(&f), copied);
    // A directory of this layer, and the root.
    f.d.set_times(p("src"), None, Some(t)).unwrap();
    assert_eq!(
        std::fs::metadata(f.delta_dir.join("upper/src"))
            .unwrap()
            .modified()
            .unwrap(),
        t
    );
    f.d.set_times(p(""), None, Some(t)).unwrap();
    assert!(matches!(
        f.d.set_times(p("src/missing"), None, Some(t)),
        Err(FsError::NotFound { .. })
    ));
}

#[test]
fn directories_made_for_a_copy_up_are_charged_and_given_back_once() {
    let f = fx();
    let entries = |f: &Fx| f.d.usage().used().1;
    let start = entries(&f);
    // Copies src/deep/b.rs up, which makes src and src/deep in this layer.
    f.d.copy_up(p("src/deep/b.rs")).unwrap();
    assert_eq!(entries(&f), start + 3);
    f.d.unlink(p("src/deep/b.rs")).unwrap();
    f.d.rmdir(p("src/deep")).unwrap();
    // Only src is left in this layer (it still shows the codebase's a.rs).
    assert_eq!(entries(&f), start + 1);
    // A name made in a directory that is only in the codebase makes that directory too.
    f.d.create_file(p("src/deep2/new.rs"), 0o644, None)
        .unwrap_err();
    std::fs::create_dir(f.lower.join("lowdir")).unwrap();
    f.d.create_file(p("lowdir/new.rs"), 0o644, None).unwrap();
    assert_eq!(entries(&f), start + 3);
    f.d.unlink(p("lowdir/new.rs")).unwrap();
    assert_eq!(entries(&f), start + 2);
}

/// An agent that removes a file the moment its copy-up lands (a second thread watching for
/// it) must not win back space it was never charged for: the copy-up's charge is measured
/// after the copy, the removal's refund under the lock.
#[test]
fn racing_a_removal_against_a_copy_up_never_drives_the_quota_below_the_disk() {
    let f = fx();
    let n = 200;
    let body = vec![7u8; 64 << 10];
    for i in 0..n {
        std::fs::write(f.lower.join(format!("src/f{i}")), &body).unwrap();
    }
    let upper_src = f.delta_dir.join("upper/src");
    // Set when the copying side stops, also by a panic, so that the watcher never waits
    // for a copy that will not come.
    struct Done<'a>(&'a std::sync::atomic::AtomicBool);
    impl Drop for Done<'_> {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let d = &f.d;
        let (upper_src, done) = (&upper_src, &done);
        s.spawn(move || {
            for i in 0..n {
                let up = upper_src.join(format!("f{i}"));
                while !up.exists() {
                    if done.load(std::sync::atomic::Ordering::SeqCst) {
                        return;
                    }
                    std::hint::spin_loop();
                }
                d.unlink(&PathBuf::from(format!("src/f{i}"))).unwrap();
            }
        });
        let _done = Done(done);
        for i in 0..n {
            drop(
                d.open_write(&PathBuf::from(format!("src/f{i}")), false)
                    .unwrap(),
            );
        }
    });
    let on_disk = crate::quota::footprint_below(&f.delta_dir.join("upper"));
    let (bytes, _) = f.d.usage().used();
    let journal = f.d.usage().journal().0;
    assert!(
        bytes as i64 - journal >= on_disk.0,
        "charged {} B (journal {journal} B aside) for {} B on disk",
        bytes as i64 - journal,
        on_disk.0
    );
}
