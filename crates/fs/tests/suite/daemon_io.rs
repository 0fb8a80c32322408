//! File I/O served by the daemon (passthrough off), and passthrough's fallback cases.

use pretty_assertions::assert_eq;

use agentfense_core::{Level, PermissionRule};

use super::util::{mount_with, require_fuse, standard, standard_tree, test_rules};

#[test]
fn reads_and_writes_without_passthrough() {
    require_fuse!("reads_and_writes_without_passthrough");
    let m = mount_with(test_rules(), standard_tree, |c| c.passthrough = false);
    assert_eq!(m.ok("cat README.md"), "hello readme\n");
    m.ok("printf 'abc' > output/f && printf 'def' >> output/f");
    assert_eq!(m.ok("cat output/f"), "abcdef");
    assert_eq!(
        m.py("f = open('output/f', 'r+b'); f.seek(1); f.write(b'X'); f.close(); print(open('output/f').read())"),
        "aXcdef\nok"
    );
    assert_eq!(m.py("os.truncate('output/f', 2)"), "ok");
    assert_eq!(m.ok("cat output/f"), "aX");
    assert_eq!(
        m.py("import mmap; f = open('README.md', 'rb'); print(mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)[:5])"),
        "b'hello'\nok"
    );
    m.ok("head -c 3000000 /dev/urandom > output/big && cmp output/big output/big");
    assert_eq!(m.ok("stat -c %s output/big"), "3000000\n");
    let stats = m.h().stats();
    assert_eq!(stats.passthrough_opens, 0, "{stats:?}");
    assert!(stats.daemon_opens > 5, "{stats:?}");
}

#[test]
fn a_reader_and_a_writer_of_one_file_see_one_content() {
    require_fuse!("a_reader_and_a_writer_of_one_file_see_one_content");
    let m = standard();
    // The reader's passthrough backing is the codebase file; the writer's open copies the
    // file up, so it cannot share that backing and is served by the daemon instead.
    let out = m.py(
        "r = open('output/existing.txt'); w = open('output/existing.txt', 'a'); \
         w.write('more\\n'); w.flush(); print(repr(open('output/existing.txt').read())); \
         w.close(); r.close()",
    );
    assert_eq!(out, "'old output\\nmore\\n'\nok");
    assert_eq!(m.ok("cat output/existing.txt"), "old output\nmore\n");
}

#[test]
fn an_open_reader_keeps_its_version_while_new_opens_see_a_publish() {
    require_fuse!("an_open_reader_keeps_its_version_while_new_opens_see_a_publish");
    let a = standard();
    // Sandbox `b` only reads output/: its readers are passthrough-backed by the codebase file.
    let mut rules = test_rules();
    rules.push(PermissionRule::glob("/output/**", Level::Read, 20));
    let lower = a.lower();
    let b = mount_with(rules, |_| {}, move |c| c.lower = lower);
    let sync = b.dir.path().join("sync");
    let script = format!(
        "import os, time\n\
         r = open('output/existing.txt')\n\
         open('{s}1', 'w').close()\n\
         while not os.path.exists('{s}2'): time.sleep(0.01)\n\
         print(repr(r.read()), repr(open('output/existing.txt').read()))\n",
        s = sync.display()
    );
    let child = std::process::Command::new("timeout")
        .args(["20", "python3", "-c", &script])
        .current_dir(b.mnt())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let ready = sync.with_file_name("sync1");
    for _ in 0..1000 {
        if ready.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    a.ok("echo A > output/existing.txt");
    a.h().publish().unwrap();
    std::fs::write(sync.with_file_name("sync2"), "").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "'old output\\n' 'A\\n'\n"
    );
    assert_eq!(b.ok("cat output/existing.txt"), "A\n");
}
