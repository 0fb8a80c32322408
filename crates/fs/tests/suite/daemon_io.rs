//! File I/O in no-open mode: served by inode from the daemon's cache of host files, with the
//! rules checked on every READ and WRITE; the page cache serves repeated reads.

use std::time::Duration;

use pretty_assertions::assert_eq;

use agentfense_core::{Level, PermissionRule};

use super::util::{mount_with, require_fuse, standard, test_rules};

#[test]
fn reads_and_writes_by_inode() {
    require_fuse!("reads_and_writes_by_inode");
    let m = standard();
    assert_eq!(m.ok("cat README.md"), "hello readme\n");
    m.ok("printf 'abc' > output/f && printf 'def' >> output/f");
    assert_eq!(m.ok("cat output/f"), "abcdef");
    assert_eq!(
        m.py("f = open('output/f', 'r+b'); f.seek(1); f.write(b'X'); f.close(); print(open('output/f').read())"),
        "aXcdef\nok"
    );
    assert_eq!(m.py("os.truncate('output/f', 2)"), "ok");
    assert_eq!(m.ok("cat output/f"), "aX");
    // A codebase file opened for writing without O_TRUNC is copied up at its first write.
    assert_eq!(
        m.py("f = open('output/existing.txt', 'r+'); f.seek(4); f.write('0'); f.close(); print(repr(open('output/existing.txt').read()))"),
        "'old 0utput\\n'\nok"
    );
    assert_eq!(
        std::fs::read_to_string(m.lower().join("output/existing.txt")).unwrap(),
        "old output\n",
        "the codebase is untouched until publish"
    );
    assert_eq!(
        m.py("import mmap; f = open('README.md', 'rb'); print(mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)[:5])"),
        "b'hello'\nok"
    );
    // Shared writable mmap writes back through WRITE requests without a handle.
    assert_eq!(
        m.py("import mmap; f = open('output/f', 'r+b'); mm = mmap.mmap(f.fileno(), 0); mm[0:1] = b'Z'; mm.flush(); mm.close(); f.close()"),
        "ok"
    );
    assert_eq!(m.ok("cat output/f"), "ZX");
    // A file made by CREATE uses direct I/O: mmap of that very descriptor works too.
    assert_eq!(
        m.py("import mmap; f = open('output/m', 'w+b'); f.write(b'abc'); f.flush(); mm = mmap.mmap(f.fileno(), 0); mm[0:1] = b'X'; mm.flush(); print(mm[:3], open('output/m', 'rb').read())"),
        "b'Xbc' b'Xbc'\nok"
    );
    m.ok("head -c 3000000 /dev/urandom > output/big && cmp output/big output/big");
    assert_eq!(m.ok("stat -c %s output/big"), "3000000\n");
    // A view file opens (no round trip) but its content never comes back, mmap included.
    assert_eq!(m.py("open('view/plan.txt', 'rb').read(1)"), "EACCES");
    let (code, _, _) = m.sh("python3 -c \"import mmap; f = open('view/plan.txt', 'rb'); print(mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)[:4])\"");
    assert_ne!(code, 0, "mmap of a view file must fault");
}

#[test]
fn host_files_held_stay_bounded() {
    require_fuse!("host_files_held_stay_bounded");
    let m = mount_with(
        test_rules(),
        |lower| {
            for i in 0..300 {
                super::util::write(lower, &format!("src/many/f{i}.txt"), &format!("{i}\n"));
            }
        },
        |_| {},
    );
    assert_eq!(m.ok("cat src/many/* | wc -l"), "300\n");
    let held = m.h().stats().open_files;
    assert!(held <= 64, "{held} host files held after reading 300 files");
    // Warm: served from the page cache, the same bytes.
    assert_eq!(m.ok("cat src/many/* | wc -l"), "300\n");
}

#[test]
fn files_open_across_unlink_and_replace_keep_their_content() {
    require_fuse!("files_open_across_unlink_and_replace_keep_their_content");
    let m = standard();
    m.ok("printf 'first' > output/a && printf 'second' > output/b");
    let out = m.py("import os\n\
         r = open('output/existing.txt', 'rb', buffering=0)\n\
         a = open('output/a', 'r+b', buffering=0)\n\
         os.unlink('output/existing.txt')\n\
         os.rename('output/b', 'output/a')\n\
         a.seek(0); a.write(b'FIRST')\n\
         a.seek(0)\n\
         print(r.read(), a.read(), open('output/a', 'rb').read())");
    assert_eq!(out, "b'old output\\n' b'FIRST' b'second'\nok");
    assert_eq!(m.py("os.stat('output/existing.txt')"), "ENOENT");
}

#[test]
fn a_reader_and_a_writer_of_one_file_see_one_content() {
    require_fuse!("a_reader_and_a_writer_of_one_file_see_one_content");
    let m = standard();
    // The reader starts on the codebase file; the writer's first write copies it up, and
    // both see the delta copy from then on.
    let out = m.py(
        "r = open('output/existing.txt'); print(repr(r.read())); w = open('output/existing.txt', 'a'); \
         w.write('more\\n'); w.flush(); r.seek(0); print(repr(r.read())); \
         print(repr(open('output/existing.txt').read())); w.close(); r.close()",
    );
    assert_eq!(
        out,
        "'old output\\n'\n'old output\\nmore\\n'\n'old output\\nmore\\n'\nok"
    );
    assert_eq!(m.ok("cat output/existing.txt"), "old output\nmore\n");
    // A reader that cached a file being written through its CREATE handle (direct I/O)
    // sees the later writes, not stale pages.
    let out = m.py(
        "w = open('output/c', 'wb', buffering=0); w.write(b'abc'); r = open('output/c', 'rb');          a = r.read(); w.write(b'def'); r.seek(0); print(a, r.read()); w.close(); r.close()",
    );
    assert_eq!(out, "b'abc' b'abcdef'\nok");
}

#[test]
fn another_sandboxs_publish_shows_on_the_next_read() {
    require_fuse!("another_sandboxs_publish_shows_on_the_next_read");
    let a = standard();
    // Sandbox `b` only reads output/.
    let mut rules = test_rules();
    rules.push(PermissionRule::glob("/output/**", Level::Read, 20));
    let lower = a.lower();
    let mounts = a.h().mounts().clone();
    let b = mount_with(
        rules,
        |_| {},
        move |c| {
            c.lower = lower;
            c.mounts = mounts;
        },
    );
    assert_eq!(b.ok("cat output/existing.txt"), "old output\n");
    assert_eq!(b.ok("ls output/proj"), "a.txt\n");
    a.ok("echo A > output/existing.txt && echo gone > output/proj/a.txt && rm output/proj/a.txt");
    a.ok("echo N > output/proj/n.txt");
    a.h().publish().unwrap();
    // The kernel's cached listing was dropped too.
    assert_eq!(b.ok("ls output/proj"), "n.txt\n");
    // Cached pages and names were dropped at once: no TTL wait.
    assert_eq!(b.ok("cat output/existing.txt"), "A\n");
    assert_eq!(b.py("os.stat('output/proj/a.txt')"), "ENOENT");
    // A writer in `a` that keeps writing after the publish lands in a fresh delta copy.
    a.ok("echo B >> output/existing.txt");
    assert_eq!(a.ok("cat output/existing.txt"), "A\nB\n");
    a.h().publish().unwrap();
    assert_eq!(b.ok("cat output/existing.txt"), "A\nB\n");
}

/// Bytes of `rel` in the mount's page cache (`fincore`: mmap and mincore, no FUSE round trip).
fn resident(m: &super::util::Mnt, rel: &str) -> u64 {
    m.ok(&format!("fincore --bytes --noheadings --output RES {rel}"))
        .trim()
        .parse()
        .unwrap()
}

/// The first READ in a directory pushes its small `read` files into the page cache (so a first
/// `grep -r` does not pay a round trip per file), and nothing else: a `view`, hidden, writable
/// or large file never gets pages it was not asked for, so the rules still decide every read
/// of them (root bypasses the mode bits that would refuse the open).
#[test]
fn first_read_pushes_only_the_directorys_small_read_files() {
    require_fuse!("first_read_pushes_only_the_directorys_small_read_files");
    let mut rules = vec![PermissionRule::glob("**", Level::Read, 0)];
    rules.push(PermissionRule::glob("/mixed/plan.txt", Level::View, 10));
    rules.push(PermissionRule::glob("/mixed/w.txt", Level::Write, 10));
    rules.push(PermissionRule::glob("/mixed/s.txt", Level::None, 10));
    let m = mount_with(
        rules,
        |lower| {
            for (name, content) in [
                ("a.txt", "first\n"),
                ("b.txt", "second\n"),
                ("c.txt", "third\n"),
                ("plan.txt", "view only\n"),
                ("w.txt", "old\n"),
                ("s.txt", "hidden\n"),
            ] {
                super::util::write(lower, &format!("mixed/{name}"), content);
            }
            super::util::write(lower, "mixed/big.txt", &"x".repeat(200 << 10));
        },
        |_| {},
    );
    // The kernel learns the names (READDIRPLUS), then one file is read.
    assert_eq!(
        m.ok("ls mixed"),
        "a.txt\nb.txt\nbig.txt\nc.txt\nplan.txt\nw.txt\n"
    );
    assert_eq!(m.ok("cat mixed/a.txt"), "first\n");
    // The push runs beside the reader: wait for its effect (bounded), not for a time.
    let pushed = (0..500).any(|_| {
        let done = resident(&m, "mixed/b.txt") > 0 && resident(&m, "mixed/c.txt") > 0;
        if !done {
            std::thread::sleep(Duration::from_millis(10));
        }
        done
    });
    assert!(pushed, "the directory's read files were never pushed");
    for rel in ["mixed/plan.txt", "mixed/w.txt", "mixed/big.txt"] {
        assert_eq!(resident(&m, rel), 0, "{rel} must not be pushed");
    }
    assert_eq!(m.ok("cat mixed/b.txt mixed/c.txt"), "second\nthird\n");
    assert_eq!(m.py("open('mixed/plan.txt', 'rb').read(1)"), "EACCES");
    assert_eq!(m.py("open('mixed/s.txt', 'rb').read(1)"), "ENOENT");
    m.ok("printf 'new\\n' > mixed/w.txt");
    assert_eq!(m.ok("cat mixed/w.txt"), "new\n");
}

/// A codebase file that changes through the server after its directory was pushed is read
/// afresh: the change's invalidation drops pushed pages like any others.
#[test]
fn pushed_pages_follow_codebase_changes() {
    require_fuse!("pushed_pages_follow_codebase_changes");
    let m = mount_with(
        vec![PermissionRule::glob("**", Level::Read, 0)],
        |lower| {
            super::util::write(lower, "d/a.txt", "a\n");
            super::util::write(lower, "d/b.txt", "before\n");
        },
        |_| {},
    );
    m.ok("ls d > /dev/null");
    assert_eq!(m.ok("cat d/a.txt"), "a\n");
    let pushed = (0..500).any(|_| {
        let done = resident(&m, "d/b.txt") > 0;
        if !done {
            std::thread::sleep(Duration::from_millis(10));
        }
        done
    });
    assert!(pushed, "d/b.txt was never pushed");
    super::util::write(&m.lower(), "d/b.txt", "after, longer\n");
    m.h()
        .mounts()
        .codebase_changed(&m.lower(), &[std::path::PathBuf::from("d/b.txt")]);
    assert_eq!(m.ok("cat d/b.txt"), "after, longer\n");
}
