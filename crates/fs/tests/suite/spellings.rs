//! Hidden means hidden under every spelling the agent can type (issue 24): secret names in
//! other cases, and names stored in another Unicode normalization form than the rule's.

use agentfense_core::{Level, PermissionRule, presets};
use agentfense_fs::IoMode;

use super::util::{mount_as_user, mount_with, require_fuse, write};

const KEY: &str = "-----BEGIN PRIVATE KEY-----\nLEAK\n-----END PRIVATE KEY-----\n";

#[test]
fn secrets_in_other_cases_are_hidden() {
    require_fuse!("secrets_in_other_cases_are_hidden");
    let m = mount_with(
        presets::get("agent-safe").unwrap().rules(),
        |lower| {
            for p in [
                ".ENV",
                "config/.Env.local",
                "PRIVATE.KEY",
                "deploy/ID_RSA",
                "Secrets/db.txt",
                "Credentials.json",
                "home/.SSH/config",
            ] {
                write(lower, p, "LEAK\n");
            }
            write(lower, "cert.PEM", KEY);
            write(lower, "README.md", "readme\n");
        },
        |_| {},
    );
    let (_, out, err) = m.sh("find . -type f | sort; cat .ENV PRIVATE.KEY deploy/ID_RSA cert.PEM");
    assert!(!out.contains("LEAK") && !err.contains("LEAK"), "{out}{err}");
    assert_eq!(
        m.ok("find . -type f | sort"),
        "./README.md\n",
        "only the readme is a file the agent can see"
    );
    for p in [
        ".ENV",
        "config/.Env.local",
        "Secrets/db.txt",
        "cert.PEM",
        "home/.SSH",
    ] {
        assert_eq!(m.py(&format!("os.stat({p:?})")), "ENOENT", "{p}");
    }
}

#[test]
fn rules_match_names_in_either_normalization_form() {
    require_fuse!("rules_match_names_in_either_normalization_form");
    // The directory is stored decomposed (e + U+0301); the rule is written composed.
    let m = mount_with(
        vec![
            PermissionRule::glob("**/*", Level::Read, 0),
            PermissionRule::glob("/nfd/s\u{e9}crets/**", Level::None, 10),
        ],
        |lower| write(lower, "nfd/se\u{301}crets/pw.txt", "LEAK\n"),
        |_| {},
    );
    let (_, out, err) = m.sh("cat nfd/*/pw.txt; ls -R");
    assert!(!out.contains("LEAK") && !err.contains("LEAK"), "{out}{err}");
    assert_eq!(m.ok("ls nfd"), "");
}

/// The attack of finding 4, as the sandbox user (not root): open a `read` file for writing
/// and change its cached pages through a shared mapping, so that later commands read the
/// change. Every write access must be refused at open, in both I/O modes.
#[test]
fn read_files_refuse_every_write_access_at_open() {
    require_fuse!("read_files_refuse_every_write_access_at_open");
    for mode in [IoMode::NoOpen, IoMode::Passthrough] {
        let m = mount_as_user(mode);
        let attack = r#"
import mmap, os, errno
for flags in (os.O_RDWR, os.O_WRONLY, os.O_WRONLY | os.O_APPEND):
    try:
        fd = os.open("src/main.py", flags)
    except OSError as e:
        print(errno.errorcode[e.errno])
        continue
    try:
        if flags == os.O_RDWR:
            mm = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            mm[0:5] = b"PWNED"
            try:
                mm.flush()
            except OSError:
                pass
            mm.close()
        else:
            os.write(fd, b"PWNED")
        print("opened")
    except OSError as e:
        print("late " + errno.errorcode[e.errno])
    finally:
        os.close(fd)
"#;
        let out = m.user_python(attack);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "EACCES\nEACCES\nEACCES\n",
            "{mode:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Whatever happened, later commands read the file as it is.
        assert_eq!(m.ok("cat src/main.py"), "print('hi')\n", "{mode:?}");
        // The owner the file is presented as cannot make it writable either.
        assert_eq!(
            m.user_py("os.chmod('src/main.py', 0o666)"),
            "EACCES",
            "{mode:?}"
        );
        // A view file cannot be opened at all.
        assert_eq!(
            m.user_py("open('view/plan.txt').read()"),
            "EACCES",
            "{mode:?}"
        );
        // Write areas stay writable for the same user, through a shared mapping too.
        assert_eq!(
            m.user_py(
                "import mmap\nfd = os.open('output/existing.txt', os.O_RDWR)\n\
                 mm = mmap.mmap(fd, 0, mmap.MAP_SHARED)\nmm[0:3] = b'NEW'\nmm.flush()"
            ),
            "ok",
            "{mode:?}"
        );
        assert_eq!(m.ok("cat output/existing.txt"), "NEW output\n", "{mode:?}");
        // A new file in a directory the rules leave read-only is the daemon's refusal.
        assert_eq!(m.user_py("open('src/new.py', 'w')"), "EACCES", "{mode:?}");
        assert_eq!(m.user_py("os.unlink('src/main.py')"), "EACCES", "{mode:?}");
    }
}

/// Finding 7: a directory's times moved when only hidden entries in it changed, so another
/// sandbox (or the host) creating `.env.new` showed as a timestamp change.
#[test]
fn directory_times_move_only_for_changes_the_sandbox_can_see() {
    require_fuse!("directory_times_move_only_for_changes_the_sandbox_can_see");
    let m = mount_with(
        presets::get("agent-safe").unwrap().rules(),
        |lower| {
            write(lower, "src/main.py", "x\n");
            write(lower, "output/a.txt", "a\n");
            // An old time, so that any change is a different one (no clock ticks involved).
            for d in ["src", "output"] {
                let t = std::fs::FileTimes::new().set_modified(
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(1e9 as u64),
                );
                std::fs::File::open(lower.join(d))
                    .unwrap()
                    .set_times(t)
                    .unwrap();
            }
        },
        |c| {
            // Every stat reaches the daemon: nothing is answered from the kernel's cache.
            c.attr_ttl = std::time::Duration::ZERO;
            c.entry_ttl = std::time::Duration::ZERO;
        },
    );
    let times = |d: &str| m.ok(&format!("stat -c '%Y %Z' {d}"));
    let src = times("src");
    assert!(src.starts_with("1000000000 "), "{src}");
    // Not listed yet: even a visible change keeps the times first shown (the sandbox knows
    // nothing of the contents); listing it makes them the real ones from then on.
    write(&m.lower(), "src/early.py", "y\n");
    assert_eq!(times("src"), src);
    assert_eq!(m.ok("ls src"), "early.py\nmain.py\n");
    // Hidden changes from outside: a secret created, then removed.
    write(&m.lower(), "src/.env.new", "K=1\n");
    assert_eq!(times("src"), src);
    std::fs::remove_file(m.lower().join("src/.env.new")).unwrap();
    assert_eq!(times("src"), src);
    // A visible change from outside moves them.
    write(&m.lower(), "src/new.py", "y\n");
    let moved = times("src");
    assert_ne!(moved, src);
    assert_eq!(m.ok("ls src"), "early.py\nmain.py\nnew.py\n");
    // The sandbox's own changes move them (set to a known time first: no clock involved).
    m.ok("ls output && touch output/b.txt && touch -d @1000000001 output");
    let own = times("output");
    assert!(own.starts_with("1000000001 "), "{own}");
    write(&m.lower(), "output/.env", "K=2\n");
    assert_eq!(times("output"), own);
    m.ok("rm output/b.txt");
    assert!(!times("output").starts_with("1000000001 "));
}
