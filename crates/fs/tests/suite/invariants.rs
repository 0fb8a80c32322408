//! The invariant cases listed in issue 3.

use pretty_assertions::assert_eq;

use agentfense_core::{Content, Level, PermissionRule};

use super::util::{mount_with, require_fuse, standard, write};

#[test]
fn directory_rename_with_hidden_entries_is_exdev_and_mv_cannot_move_them() {
    require_fuse!("directory_rename_with_hidden_entries_is_exdev_and_mv_cannot_move_them");
    let m = standard();
    assert_eq!(m.py("os.rename('output/proj', 'output/proj2')"), "EXDEV");
    // mv falls back to copy + delete: the visible file moves, the hidden one cannot.
    let (code, _, _) = m.sh("mv output/proj output/proj2");
    assert_ne!(code, 0);
    assert_eq!(m.ok("ls -A output/proj2"), "a.txt\n");
    assert_eq!(m.ok("ls -A output/proj"), "");
    let r = m.h().publish().unwrap();
    assert_eq!(r.failed, vec![]);
    assert_eq!(
        std::fs::read_to_string(m.lower().join("output/proj/.env")).unwrap(),
        "PROJ_SECRET=1\n"
    );
}

#[test]
fn rmdir_of_a_directory_with_only_hidden_entries_fails() {
    require_fuse!("rmdir_of_a_directory_with_only_hidden_entries_fails");
    let m = standard();
    assert_eq!(m.ok("ls -A output/only_hidden"), "");
    assert_eq!(m.py("os.rmdir('output/only_hidden')"), "ENOTEMPTY");
    let (code, _, _) = m.sh("rm -rf output/only_hidden");
    assert_ne!(code, 0);
    m.h().publish().unwrap();
    assert!(m.lower().join("output/only_hidden/.env").exists());
}

/// A hard link is a second name for a file: it must never give a hidden file a visible name,
/// a read-only file a writable one, or land where the rules forbid creating.
#[test]
fn hard_links_never_expose_what_the_rules_protect() {
    require_fuse!("hard_links_never_expose_what_the_rules_protect");
    let m = standard();
    assert_eq!(m.py("os.link('src/.env', 'output/hl')"), "ENOENT");
    assert_eq!(m.py("os.link('README.md', 'output/hl')"), "EPERM");
    assert_eq!(m.py("os.link('README.md', 'src/hl')"), "EPERM");
    assert_eq!(m.py("os.link('output/existing.txt', 'src/hl')"), "EACCES");
    assert_eq!(
        m.py("os.link('output/existing.txt', 'output/.env.hl')"),
        "EACCES"
    );
    let (code, _, _) = m.sh("ln src/main.py output/hl2");
    assert_ne!(code, 0);
}

#[test]
fn symlinks_to_hidden_paths_stay_hidden() {
    require_fuse!("symlinks_to_hidden_paths_stay_hidden");
    let m = standard();
    m.ok("ln -s ../src/.env output/l1 && ln -s ../secrets/key.txt output/l2");
    assert_eq!(m.py("open('output/l1').read()"), "ENOENT");
    assert_eq!(m.py("open('output/l2').read()"), "ENOENT");
    assert_eq!(m.py("os.readlink('output/l1')"), "ok '../src/.env'");
    let (code, out, _) = m.sh("cat output/l1 output/l2 src/link_to_secret");
    assert_ne!(code, 0);
    assert_eq!(out, "");
}

#[test]
fn creating_over_a_hidden_path_looks_like_a_denied_missing_path() {
    require_fuse!("creating_over_a_hidden_path_looks_like_a_denied_missing_path");
    let m = standard();
    let excl = "os.open('{}', os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)";
    // output/.env exists (hidden); output/.env.new does not (hidden by the same rule);
    // src/zz does not exist (read-only place). All three answer the same.
    for p in ["output/.env", "output/.env.new", "src/zz"] {
        assert_eq!(m.py(&excl.replace("{}", p)), "EACCES", "{p}");
        assert_eq!(m.py(&format!("open('{p}', 'w')")), "EACCES", "{p}");
        assert_eq!(m.py(&format!("os.mkdir('{p}')")), "EACCES", "{p}");
        assert_eq!(m.py(&format!("os.symlink('x', '{p}')")), "EACCES", "{p}");
        assert_eq!(
            m.py(&format!("os.rename('output/existing.txt', '{p}')")),
            "EACCES",
            "{p}"
        );
    }
    // A visible existing path gives EEXIST, as usual.
    assert_eq!(m.py(&excl.replace("{}", "output/existing.txt")), "EEXIST");
    m.h().publish().unwrap();
    assert_eq!(
        std::fs::read_to_string(m.lower().join("output/.env")).unwrap(),
        "OUTPUT_SECRET=1\n"
    );
}

/// A file hidden by its content (a private key) is hidden as a file only: the rules let a
/// directory, symlink or fifo of that name be made. The file in the way must still not show
/// (no EEXIST), whichever kind of entry is made over it.
#[test]
fn a_file_hidden_by_content_stays_hidden_under_names_of_other_kinds() {
    require_fuse!("a_file_hidden_by_content_stays_hidden_under_names_of_other_kinds");
    let key = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END PRIVATE KEY-----\n";
    let m = mount_with(
        vec![
            PermissionRule::glob("**", Level::Write, 0),
            PermissionRule::glob("**/*.pem", Level::None, 50).when_content(Content::PrivateKey),
        ],
        |lower| write(lower, "out/server.pem", key),
        |_| {},
    );
    assert_eq!(m.ok("ls -A out"), "");
    for made in [
        "os.mkdir('out/server.pem')",
        "os.symlink('x', 'out/server.pem')",
        "os.mkfifo('out/server.pem')",
        "os.open('out/server.pem', os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)",
        "open('out/server.pem', 'w')",
    ] {
        assert_eq!(m.py(made), "EACCES", "{made}");
    }
    // The same calls on a free name succeed.
    assert_eq!(m.py("os.mkdir('out/free.pem')"), "ok");
    assert_eq!(m.ok("ls -A out").trim(), "free.pem");
    assert_eq!(
        std::fs::read_to_string(m.lower().join("out/server.pem")).unwrap(),
        key
    );
}

#[test]
fn open_handles_survive_a_rename() {
    require_fuse!("open_handles_survive_a_rename");
    let m = standard();
    let out = m.py(
        "f = open('output/h.txt', 'w'); f.write('one '); f.flush(); \
         os.rename('output/h.txt', 'output/h2.txt'); f.write('two'); f.close(); \
         print(open('output/h2.txt').read())",
    );
    assert_eq!(out, "one two\nok");
}

#[test]
fn proc_self_fd_cannot_upgrade_a_read_only_descriptor() {
    require_fuse!("proc_self_fd_cannot_upgrade_a_read_only_descriptor");
    let m = standard();
    assert_eq!(
        m.py("os.write(os.open('/proc/self/fd/%d' % os.open('README.md', os.O_RDONLY), os.O_WRONLY), b'x')"),
        "EACCES"
    );
    assert_eq!(m.ok("cat README.md"), "hello readme\n");
    assert_eq!(
        m.py("os.open('/proc/self/fd/%d' % os.open('view', os.O_RDONLY), os.O_RDONLY) > 0"),
        "ok True"
    );
}

/// Extended attributes: nothing of a hidden file, nothing outside `user.*`, no change below
/// `write` (issue 16 made `user.*` work in write areas).
#[test]
fn xattrs_neither_leak_nor_change() {
    require_fuse!("xattrs_neither_leak_nor_change");
    let m = standard();
    assert_eq!(m.py("os.listxattr('README.md')"), "ok []");
    assert_eq!(m.py("os.getxattr('README.md', 'user.x')"), "ENODATA");
    assert_eq!(m.py("os.getxattr('src/.env', 'user.x')"), "ENOENT");
    assert_eq!(m.py("os.listxattr('src/.env')"), "ENOENT");
    assert_eq!(m.py("os.setxattr('README.md', 'user.x', b'1')"), "EACCES");
    assert_eq!(m.py("os.getxattr('view/plan.txt', 'user.x')"), "EACCES");
    assert_eq!(
        m.py("os.setxattr('output/existing.txt', 'security.x', b'1')"),
        "ENOTSUP"
    );
    assert_eq!(
        m.py("os.setxattr('output/existing.txt', 'user.x', b'1')"),
        "ok"
    );
    assert_eq!(m.py("os.listxattr('output/existing.txt')"), "ok ['user.x']");
}

#[test]
fn sizes_do_not_reveal_hidden_content() {
    require_fuse!("sizes_do_not_reveal_hidden_content");
    let m = standard();
    assert_eq!(
        m.py("(lambda s: s.f_blocks == s.f_bfree)(os.statvfs('.'))"),
        "ok True"
    );
    assert_eq!(
        m.ok("stat -c '%s %h' output/only_hidden src"),
        "4096 1\n4096 1\n"
    );
    let du = m.ok("du -a output");
    assert!(!du.contains(".env"), "{du}");
}

#[test]
fn non_utf8_names_are_judged_by_their_lossy_form() {
    require_fuse!("non_utf8_names_are_judged_by_their_lossy_form");
    let m = standard();
    assert_eq!(
        m.py("os.close(os.open(b'output/caf\\xe9', os.O_CREAT | os.O_WRONLY))"),
        "ok"
    );
    assert_eq!(m.py("b'caf\\xe9' in os.listdir(b'output')"), "ok True");
    // `**/.env*` hides `.env<invalid byte>` too.
    assert_eq!(
        m.py("os.open(b'output/.env\\xff', os.O_CREAT | os.O_WRONLY)"),
        "EACCES"
    );
}
