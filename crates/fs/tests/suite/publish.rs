//! Publishing, audit events, git.

use agentfense_core::{Policy, presets};
use agentfense_fs::{AuditEvent, PublishMode};
use pretty_assertions::assert_eq;

use super::util::{mount_with, require_fuse, standard, standard_tree, test_rules};

#[test]
fn publish_applies_changes_since_the_last_publish() {
    require_fuse!("publish_applies_changes_since_the_last_publish");
    let m = standard();
    m.ok(
        "mkdir -p output/report && echo done > output/report/report.txt && rm output/existing.txt",
    );
    assert_eq!(
        m.h().command_finished().unwrap(),
        None,
        "explicit mode keeps writes private"
    );
    assert!(!m.lower().join("output/report/report.txt").exists());
    let r = m.h().publish().unwrap();
    assert_eq!(r.failed, vec![]);
    assert_eq!(
        std::fs::read_to_string(m.lower().join("output/report/report.txt")).unwrap(),
        "done\n"
    );
    assert!(!m.lower().join("output/existing.txt").exists());
    // Another writer changes the file; with nothing new here, a publish leaves it alone.
    std::fs::write(m.lower().join("output/report/report.txt"), "theirs\n").unwrap();
    let r = m.h().publish().unwrap();
    assert_eq!(r.written, Vec::<std::path::PathBuf>::new());
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(m.ok("cat output/report/report.txt"), "theirs\n");
}

#[test]
fn another_sandboxs_publish_shows_at_once() {
    require_fuse!("another_sandboxs_publish_shows_at_once");
    let a = standard();
    // A second sandbox over the same codebase, with its own delta and mount point.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("mnt")).unwrap();
    let mut cfg = agentfense_fs::FsConfig::new(
        "sb-b",
        a.lower(),
        dir.path().join("delta"),
        dir.path().join("mnt"),
        Policy::compile(test_rules()).unwrap(),
    );
    cfg.publish_mode = PublishMode::Explicit;
    // In the same registry as the first: that is how a publish reaches it.
    cfg.mounts = a.h().mounts().clone();
    let b = agentfense_fs::mount(cfg).unwrap();
    let bmnt = dir.path().join("mnt");
    let cat = |p: &str| std::fs::read_to_string(bmnt.join(p)).unwrap_or_else(|e| e.to_string());
    assert_eq!(cat("output/existing.txt"), "old output\n");
    assert!(!bmnt.join("output/new.txt").exists());
    a.ok("echo A > output/existing.txt && echo A > output/new.txt");
    assert_eq!(
        cat("output/existing.txt"),
        "old output\n",
        "private until published"
    );
    a.h().publish().unwrap();
    assert_eq!(cat("output/existing.txt"), "A\n");
    assert_eq!(cat("output/new.txt"), "A\n");
    b.unmount().unwrap();
}

#[test]
fn publish_after_each_command_and_conflicts_are_audited() {
    require_fuse!("publish_after_each_command_and_conflicts_are_audited");
    let m = mount_with(test_rules(), standard_tree, |c| {
        c.publish_mode = PublishMode::AfterEachCommand
    });
    m.ok("echo mine >> output/existing.txt");
    std::fs::write(m.lower().join("output/existing.txt"), "changed meanwhile\n").unwrap();
    let r = m.h().command_finished().unwrap().unwrap();
    assert_eq!(r.conflicts.len(), 1);
    assert_eq!(
        std::fs::read_to_string(m.lower().join("output/existing.txt")).unwrap(),
        "old output\nmine\n"
    );
    let events: Vec<_> = m.h().events().try_iter().collect();
    assert!(
        events
            .iter()
            .any(|e| matches!(e, AuditEvent::PublishConflict { conflict, .. }
            if conflict.path == std::path::Path::new("output/existing.txt"))),
        "{events:?}"
    );
}

#[test]
fn denials_are_audited_and_aggregated() {
    require_fuse!("denials_are_audited_and_aggregated");
    let m = standard();
    for _ in 0..20 {
        assert_eq!(m.py("open('view/plan.txt').read()"), "EACCES");
    }
    let rx = m.h().events();
    let first: Vec<_> = rx
        .try_iter()
        .filter(|e| matches!(e, AuditEvent::Denied { op: "read", .. }))
        .collect();
    // Twenty denials within a few seconds: a few events, not twenty.
    assert!(!first.is_empty() && first.len() < 10, "{first:?}");
    let AuditEvent::Denied {
        path,
        level,
        rule,
        count,
        sandbox_id,
        ..
    } = &first[0]
    else {
        unreachable!()
    };
    assert_eq!(
        (sandbox_id.as_str(), path.as_str(), *level, *count),
        ("sb-test", "/view/plan.txt", agentfense_core::Level::View, 1)
    );
    assert_eq!(rule.as_ref().map(|r| r.1.as_str()), Some("/view/**"));
    m.h().publish().unwrap(); // flushes the aggregated counts
    let count = |e: &AuditEvent| match e {
        AuditEvent::Denied {
            op: "read", count, ..
        } => *count,
        _ => 0,
    };
    let total: u64 =
        first.iter().map(count).sum::<u64>() + rx.try_iter().map(|e| count(&e)).sum::<u64>();
    // Each refused read is one denial, or two when the kernel's readahead asked first.
    assert!(
        (20..=40).contains(&total),
        "{total} denials counted for 20 refused reads"
    );
}

#[test]
fn git_status_works_through_the_mount() {
    require_fuse!("git_status_works_through_the_mount");
    let m = mount_with(
        presets::get("development").unwrap().rules(),
        |lower| {
            super::util::write(lower, "src/lib.rs", "fn main() {}\n");
            super::util::write(lower, "README", "r\n");
            let git = |args: &[&str]| {
                let s = std::process::Command::new("git")
                    .args(args)
                    .current_dir(lower)
                    .env("GIT_AUTHOR_NAME", "t")
                    .env("GIT_AUTHOR_EMAIL", "t@t")
                    .env("GIT_COMMITTER_NAME", "t")
                    .env("GIT_COMMITTER_EMAIL", "t@t")
                    .output()
                    .unwrap();
                assert!(s.status.success(), "{s:?}");
            };
            git(&["init", "-q"]);
            git(&["add", "."]);
            git(&["commit", "-qm", "init"]);
        },
        |_| {},
    );
    assert_eq!(m.ok("git status --porcelain"), "");
    m.ok("echo change >> README && echo new > new.txt");
    assert_eq!(m.ok("git status --porcelain"), " M README\n?? new.txt\n");
    let _ = Policy::compile(vec![]).unwrap();
}

#[test]
fn a_stopped_sandbox_publishes_only_what_its_rules_allow() {
    require_fuse!("a_stopped_sandbox_publishes_only_what_its_rules_allow");
    let mut m = standard();
    m.ok("echo later > output/later.txt");
    let (lower, delta) = (m.lower(), m.delta());
    drop(m.handle.take());
    // With rules that no longer grant write on output/, nothing is applied.
    let ro = Policy::compile(presets::get("read-only").unwrap().rules()).unwrap();
    let r = agentfense_fs::publish_unmounted(&lower, &delta, &ro, &agentfense_fs::Mounts::new())
        .unwrap();
    assert_eq!(r.skipped, [std::path::PathBuf::from("output/later.txt")]);
    assert!(!lower.join("output/later.txt").exists());
    let rw = Policy::compile(test_rules()).unwrap();
    let r = agentfense_fs::publish_unmounted(&lower, &delta, &rw, &agentfense_fs::Mounts::new())
        .unwrap();
    assert_eq!(r.written, [std::path::PathBuf::from("output/later.txt")]);
    assert_eq!(
        std::fs::read_to_string(lower.join("output/later.txt")).unwrap(),
        "later\n"
    );
}

#[test]
fn stale_mounts_are_detached_at_startup() {
    require_fuse!("stale_mounts_are_detached_at_startup");
    let mut m = standard();
    // A server that died without unmounting: the mount stays in the mount table.
    std::mem::forget(m.handle.take());
    let root = m.dir.path().to_path_buf();
    let found = agentfense_fs::cleanup_stale_mounts(&root).unwrap();
    assert_eq!(found, [m.mnt()]);
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(m.mnt().to_str().unwrap()), "{mounts}");
    assert_eq!(
        agentfense_fs::cleanup_stale_mounts(&root).unwrap(),
        Vec::<std::path::PathBuf>::new()
    );
}
