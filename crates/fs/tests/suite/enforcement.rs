//! The per-operation table of issue 3, with real tools.

use pretty_assertions::assert_eq;

use super::util::{mount_as_user, mount_with, require_fuse, standard, standard_tree, test_rules};

#[test]
fn listing_and_stat() {
    require_fuse!("listing_and_stat");
    let m = standard();
    assert_eq!(
        m.ok("ls -A"),
        ".wh.keep\nREADME.md\noutput\nsrc\nview\n",
        "secrets/, .git/ hidden; .wh.keep is an ordinary file"
    );
    assert_eq!(
        m.ok("ls -A src"),
        "link_to_passwd\nlink_to_secret\nmain.py\n"
    );
    assert_eq!(m.ok("ls -A output"), "existing.txt\nonly_hidden\nproj\n");
    assert_eq!(m.py("os.stat('src/.env')"), "ENOENT");
    assert_eq!(m.py("os.stat('secrets')"), "ENOENT");
    assert_eq!(m.py("os.stat('secrets/key.txt')"), "ENOENT");
    assert_eq!(m.py("os.stat('.git/config')"), "ENOENT");
    assert_eq!(m.py("os.stat('view/plan.txt').st_size"), "ok 10");
    let (code, _, err) = m.sh("stat src/.env");
    assert_eq!(code, 1);
    assert!(err.contains("No such file or directory"), "{err}");
}

#[test]
fn reading() {
    require_fuse!("reading");
    let m = standard();
    assert_eq!(m.ok("cat README.md"), "hello readme\n");
    let (code, _, err) = m.sh("cat view/plan.txt");
    assert_eq!(code, 1);
    assert!(err.contains("Permission denied"), "{err}");
    assert_eq!(m.py("open('view/plan.txt').read()"), "EACCES");
    assert_eq!(m.py("open('src/.env').read()"), "ENOENT");
    assert_eq!(
        m.py("os.readlink('src/link_to_passwd')"),
        "ok '/etc/passwd'"
    );
    // The kernel follows links through our lookup: a link to a hidden file stays ENOENT.
    assert_eq!(m.py("open('src/link_to_secret').read()"), "ENOENT");
    assert_eq!(m.ok("grep -r hello . | sort"), "./README.md:hello readme\n");
}

#[test]
fn writing_and_creating() {
    require_fuse!("writing_and_creating");
    let m = standard();
    // No-open mode: an append open of a read file succeeds, its first write fails.
    assert_eq!(
        m.py("f = open('README.md', 'a', buffering=1); f.write('x\\n')"),
        "EACCES"
    );
    assert_eq!(m.py("open('view/plan.txt', 'w')"), "EACCES");
    assert_eq!(m.py("os.truncate('README.md', 0)"), "EACCES");
    assert_eq!(m.py("open('src/new.py', 'w')"), "EACCES");
    assert_eq!(m.py("os.mkdir('src/d')"), "EACCES");
    assert_eq!(m.py("os.symlink('x', 'src/l')"), "EACCES");
    assert_eq!(m.py("os.mkfifo('src/fifo')"), "EACCES");
    let (code, _, err) = m.sh("touch src/new.py");
    assert_eq!(code, 1);
    assert!(err.contains("Permission denied"), "{err}");
    m.ok("echo new > output/new.txt && mkdir -p output/d/e && echo deep > output/d/e/f.txt");
    assert_eq!(m.ok("cat output/new.txt output/d/e/f.txt"), "new\ndeep\n");
    m.ok("echo more >> output/existing.txt");
    assert_eq!(m.ok("cat output/existing.txt"), "old output\nmore\n");
    // Nothing reached the codebase: the writes are in this sandbox's delta.
    assert!(!m.lower().join("output/new.txt").exists());
    assert!(m.delta().join("upper/output/new.txt").exists());
    assert_eq!(
        std::fs::read_to_string(m.lower().join("output/existing.txt")).unwrap(),
        "old output\n"
    );
    assert_eq!(
        m.ok("cp README.md output/copy.md && cat output/copy.md"),
        "hello readme\n"
    );
    assert_eq!(
        std::fs::read_to_string(m.lower().join("README.md")).unwrap(),
        "hello readme\n"
    );
}

#[test]
fn metadata_changes() {
    require_fuse!("metadata_changes");
    let m = standard();
    assert_eq!(m.py("os.chmod('README.md', 0o777)"), "EACCES");
    assert_eq!(m.py("os.chmod('view/plan.txt', 0o777)"), "EACCES");
    assert_eq!(m.py("os.chmod('src/.env', 0o777)"), "ENOENT");
    assert_eq!(m.py("os.utime('README.md', (0, 0))"), "EACCES");
    assert_eq!(m.py("os.chown('README.md', 1, 1)"), "EACCES");
    m.ok("chmod 600 output/existing.txt && touch -d 2001-01-01 output/existing.txt");
    assert_eq!(
        m.ok("stat -c '%a %Y' output/existing.txt"),
        "600 978307200\n"
    );
    assert_eq!(m.py("os.chown('output/existing.txt', 1234, 1234)"), "EPERM");
    // Mode bits reflect the rules: no write bits below write, nothing for view files.
    assert_eq!(
        m.ok("stat -c %A README.md view/plan.txt"),
        "-r--r--r--\n----------\n"
    );
}

#[test]
fn removing() {
    require_fuse!("removing");
    let m = standard();
    assert_eq!(m.py("os.unlink('README.md')"), "EACCES");
    assert_eq!(m.py("os.unlink('view/plan.txt')"), "EACCES");
    assert_eq!(m.py("os.unlink('src/.env')"), "ENOENT");
    assert_eq!(m.py("os.rmdir('secrets')"), "ENOENT");
    assert_eq!(m.py("os.rmdir('src')"), "EACCES");
    m.ok("rm output/existing.txt");
    assert_eq!(m.py("os.stat('output/existing.txt')"), "ENOENT");
    assert!(m.lower().join("output/existing.txt").exists());
    let (code, _, _) = m.sh("rm -rf src");
    assert_ne!(code, 0);
    assert_eq!(m.ok("ls src"), "link_to_passwd\nlink_to_secret\nmain.py\n");
}

#[test]
fn renaming() {
    require_fuse!("renaming");
    let m = standard();
    m.ok("mv output/existing.txt output/renamed.txt");
    assert_eq!(m.ok("cat output/renamed.txt"), "old output\n");
    assert_eq!(m.py("os.rename('README.md', 'output/README.md')"), "EACCES");
    assert_eq!(m.py("os.rename('output/renamed.txt', 'src/x')"), "EACCES");
    assert_eq!(
        m.py("os.rename('output/renamed.txt', 'README.md')"),
        "EACCES"
    );
    assert_eq!(m.py("os.rename('src/.env', 'output/x')"), "ENOENT");
    // A directory the agent made moves in place.
    m.ok("mkdir output/mine && echo 1 > output/mine/f && mv output/mine output/yours");
    assert_eq!(m.ok("cat output/yours/f"), "1\n");
}

#[test]
fn access_answers_from_the_rules() {
    require_fuse!("access_answers_from_the_rules");
    // As the sandbox user: root's access() ignores mode bits.
    let m = mount_as_user(agentfense_fs::IoMode::NoOpen);
    assert_eq!(m.user_py("os.access('README.md', os.R_OK)"), "ok True");
    assert_eq!(m.user_py("os.access('README.md', os.W_OK)"), "ok False");
    assert_eq!(m.user_py("os.access('view/plan.txt', os.R_OK)"), "ok False");
    assert_eq!(m.user_py("os.access('view', os.R_OK | os.X_OK)"), "ok True");
    assert_eq!(
        m.user_py("os.access('output/existing.txt', os.W_OK)"),
        "ok True"
    );
    assert_eq!(m.user_py("os.access('src/.env', os.F_OK)"), "ok False");
    assert_eq!(m.user_py("os.access('src/main.py', os.X_OK)"), "ok False");
}

#[test]
fn rule_changes_apply_to_a_live_mount() {
    require_fuse!("rule_changes_apply_to_a_live_mount");
    let m = standard();
    assert_eq!(m.py("open('README.md', 'w')"), "EACCES");
    assert_eq!(m.ok("cat README.md"), "hello readme\n");
    let policy = agentfense_core::Policy::compile(
        agentfense_core::presets::get("development")
            .unwrap()
            .rules(),
    )
    .unwrap();
    m.h().set_policy(policy);
    assert_eq!(m.py("open('README.md', 'a').write('x')"), "ok 1");
    assert_eq!(m.ok("cat README.md"), "hello readme\nx");
    assert_eq!(m.py("os.stat('.git/config').st_size"), "ok 7");
    assert_eq!(m.py("os.stat('src/.env')"), "ENOENT");
}

#[test]
fn codebase_changes_reported_by_the_server_show_at_once() {
    require_fuse!("codebase_changes_reported_by_the_server_show_at_once");
    let m = standard();
    assert_eq!(
        m.ok("cat README.md; ls src"),
        "hello readme\nlink_to_passwd\nlink_to_secret\nmain.py\n"
    );
    // Probe the missing name first: the kernel may remember that it is missing.
    assert_eq!(m.py("os.stat('src/added.py')"), "ENOENT");
    std::fs::write(m.lower().join("README.md"), "updated by upload\n").unwrap();
    std::fs::write(m.lower().join("src/added.py"), "x").unwrap();
    m.h()
        .mounts()
        .codebase_changed(&m.lower(), &["README.md".into(), "src/added.py".into()]);
    assert_eq!(
        m.ok("cat README.md; ls src"),
        "updated by upload\nadded.py\nlink_to_passwd\nlink_to_secret\nmain.py\n"
    );
    assert_eq!(m.ok("cat src/added.py"), "x");
}

#[test]
fn unreported_codebase_changes_show_after_the_ttl() {
    require_fuse!("unreported_codebase_changes_show_after_the_ttl");
    let m = mount_with(test_rules(), standard_tree, |c| {
        c.entry_ttl = std::time::Duration::from_millis(500);
        c.attr_ttl = c.entry_ttl;
    });
    assert_eq!(
        m.ok("cat README.md; ls src"),
        "hello readme\nlink_to_passwd\nlink_to_secret\nmain.py\n"
    );
    assert_eq!(m.py("os.stat('src/added.py')"), "ENOENT");
    std::fs::write(m.lower().join("README.md"), "edited on the host\n").unwrap();
    std::fs::write(m.lower().join("src/added.py"), "x").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(600));
    assert_eq!(
        m.ok("cat README.md; ls src"),
        "edited on the host\nadded.py\nlink_to_passwd\nlink_to_secret\nmain.py\n"
    );
}

#[test]
fn everyday_tools_work_in_a_write_area() {
    require_fuse!("everyday_tools_work_in_a_write_area");
    let m = mount_with(test_rules(), standard_tree, |c| {
        c.owner = Some((1234, 4321))
    });
    // cp -a keeps links and modes and skips what is hidden.
    m.ok("cp -a src output/srccopy");
    assert_eq!(
        m.ok("ls -A output/srccopy"),
        "link_to_passwd\nlink_to_secret\nmain.py\n"
    );
    assert_eq!(
        m.ok("readlink output/srccopy/link_to_secret"),
        "../secrets/key.txt\n"
    );
    // Files are presented as the sandbox user's.
    assert_eq!(
        m.ok("stat -c '%u %g' README.md output/srccopy/main.py"),
        "1234 4321\n1234 4321\n"
    );
    // tar round trip, sqlite (locks, fsync, journal files), sed -i (temp file + rename).
    m.ok("tar cf output/src.tar src && mkdir output/x && tar xf output/src.tar -C output/x");
    assert_eq!(m.ok("cat output/x/src/main.py"), "print('hi')\n");
    assert_eq!(
        m.py("import sqlite3; c = sqlite3.connect('output/db.sqlite'); c.execute('create table t(x)'); \
              c.execute('insert into t values (42)'); c.commit(); \
              print(sqlite3.connect('output/db.sqlite').execute('select x from t').fetchone()[0])"),
        "42\nok"
    );
    m.ok("sed -i 's/hi/bye/' output/srccopy/main.py");
    assert_eq!(m.ok("cat output/srccopy/main.py"), "print('bye')\n");
}

/// Issue 16, finding 4: hard links were refused (EPERM) everywhere: `ln a b`, `cp -al`,
/// `tar x` of an archive with hard links, `git clone --local`. Now they work where both names
/// are writable, and are published as hard links.
#[test]
fn hard_links_work_in_write_areas_and_are_published_as_links() {
    use std::os::unix::fs::MetadataExt;
    require_fuse!("hard_links_work_in_write_areas_and_are_published_as_links");
    let m = standard();
    m.ok("ln output/existing.txt output/hl && cat output/hl");
    m.ok("cp -al output/proj output/proj2 && cat output/proj2/a.txt");
    // An archive with a hard link in it (made on the host), extracted in the sandbox.
    let host = m.dir.path().join("archive");
    std::fs::create_dir_all(host.join("src")).unwrap();
    std::fs::write(host.join("src/one"), "x\n").unwrap();
    std::fs::hard_link(host.join("src/one"), host.join("src/two")).unwrap();
    let tar = m.lower().join("output/links.tar");
    let made = std::process::Command::new("tar")
        .arg("cf")
        .arg(&tar)
        .arg("-C")
        .arg(&host)
        .arg("src")
        .status()
        .unwrap();
    assert!(made.success());
    m.ok("mkdir output/u && tar xf output/links.tar -C output/u && cat output/u/src/two");
    // A second name for a file this sandbox may only read, or in a read-only place: refused.
    assert_eq!(m.py("os.link('README.md', 'output/readme')"), "EPERM");
    assert_eq!(m.py("os.link('output/hl', 'src/hl')"), "EACCES");
    // Hidden files stay hidden under a new name.
    assert_eq!(m.py("os.link('output/.env', 'output/visible')"), "ENOENT");
    m.h().publish().unwrap();
    let lower = m.lower();
    let ino = |p: &str| std::fs::metadata(lower.join(p)).unwrap().ino();
    assert_eq!(ino("output/existing.txt"), ino("output/hl"));
    assert_eq!(ino("output/u/src/one"), ino("output/u/src/two"));
    assert_eq!(
        std::fs::read_to_string(lower.join("output/hl")).unwrap(),
        "old output\n"
    );
}

/// Issue 16, finding 6: in write areas `mkfifo`, binding a unix socket, user xattrs and
/// `fallocate` failed with EOPNOTSUPP. Fifos and sockets now work (sandbox-local, never
/// published), `user.*` attributes are kept and published, `fallocate` allocates (charged to
/// the quota); none of it is possible where the rules do not allow writing.
#[test]
fn fifos_sockets_xattrs_and_fallocate_work_in_write_areas() {
    require_fuse!("fifos_sockets_xattrs_and_fallocate_work_in_write_areas");
    let m = standard();
    let out = m.python(
        r#"
import os, socket, threading
os.mkfifo("output/fifo")
def writer():
    with open("output/fifo", "w") as f:
        f.write("through the fifo\n")
t = threading.Thread(target=writer); t.start()
with open("output/fifo") as f:
    print(f.read(), end="")
t.join()
srv = socket.socket(socket.AF_UNIX); srv.bind("output/sock"); srv.listen(1)
cli = socket.socket(socket.AF_UNIX); cli.connect("output/sock")
conn, _ = srv.accept(); cli.sendall(b"through the socket\n"); print(conn.recv(100).decode(), end="")
os.setxattr("output/existing.txt", "user.origin", b"agent")
print(os.getxattr("output/existing.txt", "user.origin").decode(), sorted(os.listxattr("output/existing.txt")))
fd = os.open("output/big", os.O_CREAT | os.O_WRONLY, 0o644)
os.posix_fallocate(fd, 0, 1 << 20)
print(os.fstat(fd).st_size, os.fstat(fd).st_blocks * 512 >= 1 << 20)
os.close(fd)
"#,
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "through the fifo\nthrough the socket\nagent ['user.origin']\n1048576 True\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(m.ok("stat -c %F output/fifo output/sock"), "fifo\nsocket\n");
    // Not where the rules keep things read-only, and never outside `user.*`.
    assert_eq!(m.py("os.mkfifo('src/fifo')"), "EACCES");
    assert_eq!(m.py("os.setxattr('README.md', 'user.x', b'1')"), "EACCES");
    assert_eq!(
        m.py("os.setxattr('output/existing.txt', 'trusted.x', b'1')"),
        "ENOTSUP"
    );
    assert_eq!(
        m.py("os.getxattr('output/existing.txt', 'user.none')"),
        "ENODATA"
    );
    m.h().publish().unwrap();
    let lower = m.lower();
    assert!(!lower.join("output/fifo").exists() && !lower.join("output/sock").exists());
    let published = std::process::Command::new("/usr/bin/python3")
        .arg("-c")
        .arg("import os, sys; print(os.getxattr(sys.argv[1], 'user.origin').decode())")
        .arg(lower.join("output/existing.txt"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&published.stdout),
        "agent\n",
        "{}",
        String::from_utf8_lossy(&published.stderr)
    );
    assert_eq!(
        std::fs::metadata(lower.join("output/big")).unwrap().len(),
        1 << 20
    );
}

/// Found with the benchmark's `tar x` row: in no-open mode the kernel sends no RELEASE for
/// files made by CREATE, so each created file kept a host file open in the daemon until
/// unmount, and after `max_open_files` creations a sandbox could create nothing more (EMFILE).
/// Creating many more files than the limit, as `tar x` and Python do, must work.
#[test]
fn creating_more_files_than_the_open_files_limit_works() {
    require_fuse!("creating_more_files_than_the_open_files_limit_works");
    let m = mount_with(test_rules(), standard_tree, |c| {
        c.owner = Some((1234, 4321));
        c.allow_other = true;
        c.max_open_files = 100;
    });
    let flat = m.dir.path().join("flat");
    std::fs::create_dir_all(&flat).unwrap();
    for i in 0..300 {
        std::fs::write(flat.join(format!("f{i}")), format!("{i}\n")).unwrap();
    }
    let made = std::process::Command::new("tar")
        .arg("cf")
        .arg(m.lower().join("output/flat.tar"))
        .arg("-C")
        .arg(m.dir.path())
        .arg("flat")
        .status()
        .unwrap();
    assert!(made.success());
    let out = m.user_python(
        "import subprocess, os\n\
         os.mkdir('output/x')\n\
         subprocess.run(['tar', 'xf', 'output/flat.tar', '-C', 'output/x'], check=True)\n\
         for i in range(300):\n    \
             with open(f'output/p{i}', 'w') as f: f.write(str(i))\n\
         print(len(os.listdir('output/x/flat')), open('output/x/flat/f299').read(), end='')\n",
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "300 299\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(m.h().stats().open_files <= 100, "{:?}", m.h().stats());
    // A created file unlinked while open can still be truncated through its descriptor.
    assert_eq!(
        m.user_py(
            "fd = os.open('output/tmpf', os.O_CREAT | os.O_RDWR, 0o644)\nos.write(fd, b'abc')\n\
             os.unlink('output/tmpf')\nos.ftruncate(fd, 1)\nprint(os.fstat(fd).st_size)"
        ),
        "1\nok"
    );
}
