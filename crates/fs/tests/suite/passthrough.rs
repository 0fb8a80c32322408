//! `IoMode::Passthrough`: one OPEN per open(2), decided by the rules there; files the sandbox
//! may only read are handed to the kernel as passthrough files, the others are served by the
//! daemon.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use pretty_assertions::assert_eq;

use agentfense_fs::{AuditEvent, IoMode, MountStats};

use super::util::{Mnt, mount_with, require_fuse, standard_tree, test_rules, write};

fn passthrough_mount() -> Mnt {
    mount_with(
        test_rules(),
        |lower| {
            standard_tree(lower);
            // 3 MiB of pseudo-random bytes: many pages, not one.
            let mut x: u32 = 0x1234_5678;
            let data: String = (0..3 << 20)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    char::from(b'a' + (x % 26) as u8)
                })
                .collect();
            write(lower, "data/big.txt", &data);
        },
        |c| c.io_mode = IoMode::Passthrough,
    )
}

fn stats(m: &Mnt) -> MountStats {
    m.h().stats()
}

#[test]
fn read_only_files_are_passthrough_and_rules_decide_at_open() {
    require_fuse!("read_only_files_are_passthrough_and_rules_decide_at_open");
    let m = passthrough_mount();
    let before = stats(&m);
    assert_eq!(m.ok("cat README.md"), "hello readme\n");
    m.ok(&format!(
        "cmp data/big.txt {}",
        m.lower().join("data/big.txt").display()
    ));
    let after = stats(&m);
    assert!(
        after.passthrough_opens >= before.passthrough_opens + 2,
        "read-only files must be opened as passthrough files: {before:?} -> {after:?}"
    );
    // The daemon holds no host file for them: reads never reached it.
    assert_eq!(after.open_files, 0, "{after:?}");
    // mmap of a passthrough file maps the codebase file: the bytes at its end match.
    let big = std::fs::read(m.lower().join("data/big.txt")).unwrap();
    assert_eq!(
        m.py("import mmap; f = open('data/big.txt', 'rb'); print(mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)[-16:].decode())"),
        format!("{}\nok", std::str::from_utf8(&big[big.len() - 16..]).unwrap())
    );

    // Open-time decisions, as in the table (no-open mode defers them to the I/O).
    assert_eq!(m.py("open('view/plan.txt', 'rb')"), "EACCES");
    assert_eq!(m.py("open('README.md', 'a')"), "EACCES");
    assert_eq!(m.py("open('README.md', 'r+')"), "EACCES");
    assert_eq!(m.py("open('src/.env')"), "ENOENT");
    assert_eq!(m.py("open('src/link_to_secret')"), "ENOENT");
    let (code, _, err) = m.sh("cat view/plan.txt");
    assert_eq!(code, 1);
    assert!(err.contains("Permission denied"), "{err}");
    let denied: Vec<_> = m
        .h()
        .events()
        .try_iter()
        .filter_map(|e| match e {
            AuditEvent::Denied { op, path, .. } => Some((op, path)),
            _ => None,
        })
        .collect();
    assert!(
        denied.contains(&("open-read", "/view/plan.txt".to_owned()))
            && denied.contains(&("open-write", "/README.md".to_owned())),
        "{denied:?}"
    );
}

#[test]
fn writable_files_are_served_by_the_daemon() {
    require_fuse!("writable_files_are_served_by_the_daemon");
    let m = passthrough_mount();
    let before = stats(&m);
    m.ok("printf abc > output/f && printf def >> output/f");
    assert_eq!(m.ok("cat output/f"), "abcdef");
    m.ok("echo more >> output/existing.txt");
    assert_eq!(m.ok("cat output/existing.txt"), "old output\nmore\n");
    assert_eq!(
        m.py("f = open('output/existing.txt', 'r+b'); f.seek(1); f.write(b'L'); f.close(); print(open('output/existing.txt').read())"),
        "oLd output\nmore\n\nok"
    );
    // Shared writable mmap of a daemon-served file writes back.
    assert_eq!(
        m.py("import mmap; f = open('output/f', 'r+b'); mm = mmap.mmap(f.fileno(), 0); mm[0:1] = b'Z'; mm.flush(); mm.close(); f.close()"),
        "ok"
    );
    assert_eq!(m.ok("cat output/f"), "Zbcdef");
    let after = stats(&m);
    assert!(
        after.daemon_opens > before.daemon_opens,
        "{before:?} -> {after:?}"
    );
    assert_eq!(
        std::fs::read_to_string(m.lower().join("output/existing.txt")).unwrap(),
        "old output\n",
        "the codebase is untouched until publish"
    );
    let report = m.h().publish().unwrap();
    assert!(report.failed.is_empty(), "{report:?}");
    assert_eq!(
        std::fs::read_to_string(m.lower().join("output/existing.txt")).unwrap(),
        "oLd output\nmore\n"
    );
    assert_eq!(
        std::fs::read_to_string(m.lower().join("output/f")).unwrap(),
        "Zbcdef"
    );
}

/// Runs `script` until it prints `want` (the kernel sends RELEASE after close returns).
fn eventually(m: &Mnt, script: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = m.ok(script);
        if out == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{script}: {out:?}, want {want:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn codebase_replaced_under_an_open_reader() {
    require_fuse!("codebase_replaced_under_an_open_reader");
    let m = passthrough_mount();
    // A reader holds README.md open (a passthrough file) while the codebase file is
    // replaced, as another sandbox's publish does (write a temp file, rename over).
    let mut holder = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys; f = open('README.md'); print(f.read(5), flush=True); sys.stdin.read(); print(f.read(), flush=True)",
        ])
        .current_dir(m.mnt())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = holder.stdout.take().unwrap();
    let mut first = [0u8; 6];
    std::io::Read::read_exact(&mut out, &mut first).unwrap();
    assert_eq!(&first, b"hello\n");
    write(&m.lower(), "README.md.tmp", "replaced\n");
    std::fs::rename(m.lower().join("README.md.tmp"), m.lower().join("README.md")).unwrap();
    m.h()
        .mounts()
        .codebase_changed(&m.lower(), &[PathBuf::from("README.md")]);
    // New opens work while the old reader is open (they share its version, never an error).
    let (code, now, err) = m.sh("cat README.md");
    assert_eq!(code, 0, "{err}");
    assert!(now == "hello readme\n" || now == "replaced\n", "{now:?}");
    drop(holder.stdin.take());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert_eq!(
        rest, " readme\n\n",
        "the open reader keeps the version it opened"
    );
    assert!(holder.wait().unwrap().success());
    eventually(&m, "cat README.md", "replaced\n");
}

#[test]
fn rule_change_under_an_open_reader() {
    require_fuse!("rule_change_under_an_open_reader");
    let m = passthrough_mount();
    let mut holder = std::process::Command::new("sleep")
        .arg("30")
        .stdin(std::fs::File::open(m.mnt().join("README.md")).unwrap())
        .spawn()
        .unwrap();
    let policy = agentfense_core::Policy::compile(
        agentfense_core::presets::get("development")
            .unwrap()
            .rules(),
    )
    .unwrap();
    m.h().set_policy(policy);
    // Writable now, but its open reader reads the codebase file directly: a writer must wait
    // (ETXTBSY) rather than write into the codebase or fail the reader.
    assert_eq!(m.py("open('README.md', 'a')"), "ETXTBSY");
    assert_eq!(m.ok("cat README.md"), "hello readme\n");
    holder.kill().unwrap();
    holder.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while m.py("open('README.md', 'a').write('x')") != "ok 1" {
        assert!(
            Instant::now() < deadline,
            "still busy after the reader closed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eventually(&m, "cat README.md", "hello readme\nx");
    assert_eq!(
        std::fs::read_to_string(m.lower().join("README.md")).unwrap(),
        "hello readme\n",
        "the codebase file was never written"
    );
}
