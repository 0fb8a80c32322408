//! `none` means absent for directories too: a directory the rules show only for traversal is
//! shown while, and only while, the merged view holds something visible below it.

use std::path::{Path, PathBuf};

use agentfense_core::{Level, PermissionRule};

use super::util::{Mnt, mount_with, require_fuse, write};

fn tree(lower: &Path) {
    for p in [
        "src/pkg/deep/leaf.py",
        "src/pkg/README.md",
        "docs/guide.md",
        "secrets/db.txt",
        "acquisition-target/plan.md",
        "top.py",
    ] {
        write(lower, p, "x\n");
    }
    std::fs::create_dir_all(lower.join("empty/inner")).unwrap();
}

fn python_files(level: Level) -> Mnt {
    mount_with(
        vec![PermissionRule::glob("**/*.py", level, 0)],
        tree,
        |_| {},
    )
}

/// Polls `probe` until it returns `want` (the kernel drops a vanished name from its cache on
/// a thread of the daemon, shortly after the removal that emptied it answered).
fn eventually(m: &Mnt, stmt: &str, want: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let got = m.py(stmt);
        if got == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{stmt}: still {got}, want {want}"
        );
        std::thread::yield_now();
    }
}

#[test]
fn find_prints_exactly_the_granted_files_and_their_ancestors() {
    require_fuse!("find_prints_exactly_the_granted_files_and_their_ancestors");
    let m = python_files(Level::Read);
    assert_eq!(
        m.ok("find . | sort"),
        ".\n./src\n./src/pkg\n./src/pkg/deep\n./src/pkg/deep/leaf.py\n./top.py\n"
    );
    assert_eq!(m.ok("ls -a"), ".\n..\nsrc\ntop.py\n");
    for hidden in [
        "docs",
        "secrets",
        "acquisition-target",
        "empty",
        "empty/inner",
    ] {
        assert_eq!(m.py(&format!("os.stat({hidden:?})")), "ENOENT", "{hidden}");
        assert_eq!(
            m.py(&format!("os.listdir({hidden:?})")),
            "ENOENT",
            "{hidden}"
        );
    }
    // Creating inside a hidden directory is refused like anywhere else nothing is granted.
    assert_eq!(m.py("open('docs/x.py', 'w')"), "ENOENT");
}

#[test]
fn directories_appear_and_vanish_with_codebase_changes() {
    require_fuse!("directories_appear_and_vanish_with_codebase_changes");
    let m = python_files(Level::Read);
    assert_eq!(m.py("os.stat('docs')"), "ENOENT");
    // An upload puts a granted file below the hidden directory: its ancestors appear.
    write(&m.lower(), "docs/api/new.py", "y\n");
    m.h()
        .mounts()
        .codebase_changed(&m.lower(), &[PathBuf::from("docs/api/new.py")]);
    assert_eq!(
        m.ok("find docs | sort"),
        "docs\ndocs/api\ndocs/api/new.py\n"
    );
    // Removing the last one makes them vanish again, cached names included.
    std::fs::remove_file(m.lower().join("docs/api/new.py")).unwrap();
    m.h()
        .mounts()
        .codebase_changed(&m.lower(), &[PathBuf::from("docs/api/new.py")]);
    assert_eq!(m.py("os.stat('docs')"), "ENOENT");
    assert_eq!(m.py("os.stat('docs/api')"), "ENOENT");
    assert_eq!(m.ok("ls"), "src\ntop.py\n");
}

#[test]
fn removing_the_last_visible_file_hides_its_ancestors() {
    require_fuse!("removing_the_last_visible_file_hides_its_ancestors");
    let m = python_files(Level::Write);
    assert_eq!(m.ok("ls src/pkg"), "deep\n");
    m.ok("rm src/pkg/deep/leaf.py");
    assert_eq!(m.ok("ls"), "top.py\n");
    eventually(&m, "os.stat('src/pkg/deep')", "ENOENT");
    eventually(&m, "os.stat('src')", "ENOENT");
    // A rename away does the same for the directory it leaves.
    let m = python_files(Level::Write);
    m.ok("mv src/pkg/deep/leaf.py moved.py");
    assert_eq!(m.ok("ls"), "moved.py\ntop.py\n");
    eventually(&m, "os.stat('src')", "ENOENT");
}

#[test]
fn a_writable_empty_directory_is_its_own_reason_to_show() {
    require_fuse!("a_writable_empty_directory_is_its_own_reason_to_show");
    let m = mount_with(
        vec![
            PermissionRule::glob("**/*.py", Level::Read, 0),
            PermissionRule::glob("/empty/**", Level::Write, 0),
        ],
        tree,
        |_| {},
    );
    assert_eq!(m.ok("ls"), "empty\nsrc\ntop.py\n");
    assert_eq!(m.ok("find empty | sort"), "empty\nempty/inner\n");
}
