//! `agentfense run`: a local one-shot sandbox, for real (root, FUSE, bwrap).

use std::process::Command;

use super::server::privileged;
use super::util::{outcome, project_with_secrets};

fn run(data: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_agentfense"))
        .arg("run")
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .output()
        .unwrap();
    outcome(out)
}

/// A project with secrets and a data directory, when the privileged tests can run here.
fn local(test: &str) -> Option<(tempfile::TempDir, tempfile::TempDir)> {
    privileged(test).then(|| (project_with_secrets(), tempfile::tempdir().unwrap()))
}

#[test]
fn run_under_agent_safe_then_apply() {
    let Some((project, data)) = local("run_under_agent_safe_then_apply") else {
        return;
    };
    let dir = project.path().to_str().unwrap();

    let (code, out, err) = run(data.path(), &[dir, "--", "ls -a; cat .env"]);
    assert_ne!(code, 0);
    assert!(
        !out.contains(".env") && !out.contains("secrets") && !out.contains(".git"),
        "{out}"
    );
    assert!(out.contains("src") && out.contains("README.md"), "{out}");
    assert!(err.contains("No such file"), "{err}");
    assert!(!out.contains("top-secret") && !err.contains("top-secret"));

    let (code, out, err) = run(
        data.path(),
        &[
            dir,
            "--",
            // Truncating fails at open; an append (no-open mode) at its first write.
            "echo report > output/r.txt; echo x > src/main.py; \
             bash -c 'echo x >> src/main.py' || echo append refused; cat output/r.txt",
        ],
    );
    assert_eq!(code, 0, "the last command's status is the exit code: {err}");
    assert_eq!(out, "append refused\nreport\n");
    assert!(
        err.contains("Permission denied"),
        "src/ is read-only: {err}"
    );
    assert!(err.contains("A output/r.txt"), "summary: {err}");
    // Not applied yet: the directory is untouched.
    assert!(!project.path().join("output/r.txt").exists());

    // The delta is kept between runs; --apply lands exactly those changes.
    let (code, _, err) = run(data.path(), &["--apply", dir, "--", "cat output/r.txt"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        std::fs::read_to_string(project.path().join("output/r.txt")).unwrap(),
        "report\n"
    );
    assert_eq!(
        std::fs::read_to_string(project.path().join("src/main.py")).unwrap(),
        "print('hello')\n"
    );
    assert_eq!(
        std::fs::read_to_string(project.path().join(".env")).unwrap(),
        "API_KEY=top-secret-1\n"
    );

    // Exit codes pass through; --discard drops what the run wrote.
    let (code, _, err) = run(
        data.path(),
        &["--discard", dir, "--", "echo y > output/y.txt; exit 7"],
    );
    assert_eq!(code, 7, "{err}");
    assert!(!project.path().join("output/y.txt").exists());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(data.path().to_str().unwrap()),
        "mount left behind"
    );
}

#[test]
fn run_in_passthrough_io_mode_reads_and_writes() {
    let Some((project, data)) = local("run_in_passthrough_io_mode_reads_and_writes") else {
        return;
    };
    let dir = project.path().to_str().unwrap();
    let (code, out, err) = run(
        data.path(),
        &[
            "--io-mode",
            "passthrough",
            "--discard",
            dir,
            "--",
            "cat README.md src/main.py; echo r > output/r.txt; cat output/r.txt; cat .env",
        ],
    );
    assert_ne!(code, 0, "the rules still apply: .env is hidden");
    assert_eq!(out, "# demo\nprint('hello')\nr\n", "{err}");
    assert!(err.contains("No such file"), "{err}");
    assert!(!out.contains("top-secret") && !err.contains("top-secret"));
}

#[test]
fn run_rejects_an_unknown_io_mode() {
    let data = tempfile::tempdir().unwrap();
    let (code, _, err) = run(data.path(), &["--io-mode", "fast", ".", "--", "true"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--io-mode") && err.contains("no-open") && err.contains("passthrough"),
        "{err}"
    );
}

/// Issue 16, finding 1: the words after `--` were joined and re-split by a shell, so
/// `printf '%s|%s\n' "a b" c` printed garbage. Several words are now an argv, run exactly; one
/// word stays a shell command line.
#[test]
fn several_words_are_an_argv_one_is_a_shell_line() {
    let Some((project, data)) = local("several_words_are_an_argv_one_is_a_shell_line") else {
        return;
    };
    let dir = project.path().to_str().unwrap();
    let (code, out, err) = run(
        data.path(),
        &[
            dir,
            "--discard",
            "--",
            "printf",
            "%s|%s|%s\\n",
            "a b",
            "*",
            "$HOME",
        ],
    );
    assert_eq!((code, out.as_str()), (0, "a b|*|$HOME\n"), "{err}");
    let (code, out, err) = run(
        data.path(),
        &[dir, "--discard", "--", "echo one && echo two"],
    );
    assert_eq!((code, out.as_str()), (0, "one\ntwo\n"), "{err}");
}

/// Issue 16: a run killed by a signal left its mount (and, had bwrap outlived it, processes)
/// behind. Now SIGTERM stops the command, destroys the sandbox, keeps the changes (nothing is
/// applied) and unmounts; the exit code is 128 + 15.
#[test]
fn a_killed_run_cleans_up_its_mount_and_processes() {
    use std::io::BufRead;
    let Some((project, data)) = local("a_killed_run_cleans_up_its_mount_and_processes") else {
        return;
    };
    let dir = project.path().to_str().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_agentfense"))
        .args(["run", "--data-dir"])
        .arg(data.path())
        .args([
            dir,
            "--apply",
            "--",
            "echo kept > output/k.txt; echo started; exec sleep 4242",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Handshake: the command has run once it says so.
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "started\n");
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(143), "{err}");
    assert!(err.contains("interrupted by signal 15"), "{err}");
    let data_dir = data.path().to_str().unwrap();
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(!mounts.contains(data_dir), "a mount is left: {mounts}");
    let sleeping = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .any(|c| c == b"sleep\x004242\x00");
    assert!(!sleeping, "the command's process outlived the run");
    // Nothing was applied (the command did not finish); the change is kept.
    assert!(!project.path().join("output/k.txt").exists());
    assert!(err.contains("A output/k.txt"), "{err}");
}

/// SIGKILL cannot be caught: the run dies with its FUSE daemon, and its mounts stay behind,
/// dead (ENOTCONN). The next run on the directory takes the same slot and must detach them
/// before it touches their mountpoints (it failed with "cannot create .../mnt: File exists").
#[test]
fn a_run_after_a_sigkilled_one_takes_its_slot() {
    use std::io::BufRead;
    let Some((project, data)) = local("a_run_after_a_sigkilled_one_takes_its_slot") else {
        return;
    };
    let dir = project.path().to_str().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_agentfense"))
        .args(["run", "--data-dir"])
        .arg(data.path())
        .args([
            dir,
            "--",
            "echo kept > output/k.txt; echo started; exec sleep 4243",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "started\n");
    child.kill().unwrap();
    child.wait().unwrap();
    let data_dir = data.path().to_str().unwrap();
    assert!(
        std::fs::read_to_string("/proc/self/mounts")
            .unwrap()
            .contains(data_dir),
        "the killed run left no mount: the premise of this test does not hold"
    );
    let (code, out, err) = run(data.path(), &[dir, "--", "cat output/k.txt"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "kept\n", "the killed run's change is kept");
    assert!(
        !err.contains("slot 2"),
        "it took the killed run's slot: {err}"
    );
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(!mounts.contains(data_dir), "a mount is left: {mounts}");
}

/// Under `development`, a venv can be made and used in the workspace: pip's vendored CA
/// bundle (`certifi/cacert.pem`) is public, so the preset's key-material rules leave it alone,
/// while a real private key in the project stays absent (issue 15).
#[test]
fn a_venv_works_under_development_and_keys_stay_hidden() {
    let Some((project, data)) = local("a_venv_works_under_development_and_keys_stay_hidden") else {
        return;
    };
    let key = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n";
    std::fs::create_dir_all(project.path().join("deploy")).unwrap();
    std::fs::write(project.path().join("deploy/server.pem"), key).unwrap();
    let dir = project.path().to_str().unwrap();
    let (code, out, err) = run(
        data.path(),
        &[
            dir,
            "--preset",
            "development",
            "--discard",
            "--",
            "python3 -m venv /workspace/.venv && .venv/bin/pip --version \
             && ls .venv/lib/python3*/site-packages/pip/_vendor/certifi/ \
             && { cat deploy/server.pem || echo key hidden; }",
        ],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.starts_with("pip "), "{out}");
    assert!(out.contains("cacert.pem"), "{out}");
    assert!(out.ends_with("key hidden\n"), "{out}");
    assert!(
        !out.contains("OPENSSH") && !err.contains("OPENSSH"),
        "{out}\n{err}"
    );
}

/// A file name with terminal escapes cannot erase or forge lines of the change list a person
/// reviews (issue 24): it is printed escaped.
#[test]
fn names_in_the_change_list_are_escaped() {
    let Some((project, data)) = local("names_in_the_change_list_are_escaped") else {
        return;
    };
    let dir = project.path().to_str().unwrap();
    let (code, _, err) = run(
        data.path(),
        &[
            dir,
            "--discard",
            "--",
            "touch \"output/a$(printf '\\033[2K\\rFAKE line\\033[31m')\"",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains('\x1b') && !err.contains('\r'), "{err:?}");
    assert!(err.contains("A output/a\\e[2K\\rFAKE line\\e[31m"), "{err}");
}

/// `--apply` never turns a project directory into a link to outside it (issue 24): the change
/// list shows the change of type and the target, and the link is not applied.
#[test]
fn apply_never_writes_a_symlink_leaving_the_project() {
    let Some((project, data)) = local("apply_never_writes_a_symlink_leaving_the_project") else {
        return;
    };
    std::fs::create_dir_all(project.path().join("build")).unwrap();
    std::fs::write(project.path().join("build/log.txt"), "log\n").unwrap();
    let dir = project.path().to_str().unwrap();
    let (code, _, err) = run(
        data.path(),
        &[
            dir,
            "--preset",
            "development",
            "--apply",
            "--",
            "rm -r build && ln -s /etc build && ln -s ../../../../root output/up",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("T build (directory → symlink) -> /etc (leaves the project: never applied)"),
        "{err}"
    );
    assert!(err.contains("not applied: build -> /etc"), "{err}");
    assert!(
        err.contains("not applied: output/up -> ../../../../root"),
        "{err}"
    );
    assert!(!project.path().join("build").is_symlink(), "{err}");
    assert!(!project.path().join("output/up").exists());
}

/// Issue 24, finding 7: `/proc/self/mountinfo` inside the sandbox showed the data directory,
/// the project's folder name and the binary's path (a bind mount's root is its source path).
/// The project's own path is a mount point by design (issue 16: the project appears there);
/// no mount's source reveals a host path.
#[test]
fn mount_sources_reveal_no_host_path() {
    let Some((project, data)) = local("mount_sources_reveal_no_host_path") else {
        return;
    };
    let dir = project.path().to_str().unwrap();
    let (code, out, err) = run(
        data.path(),
        &[dir, "--discard", "--", "cat /proc/self/mountinfo"],
    );
    assert_eq!(code, 0, "{err}");
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_agentfense"));
    let folder = project.path().file_name().unwrap().to_str().unwrap();
    for line in out.lines() {
        // mountinfo: id parent dev root mountpoint options ... - fstype source superoptions
        let fields: Vec<&str> = line.split(' ').collect();
        let (root, rest) = (fields[3], fields[5..].join(" "));
        for leak in [
            data.path().to_str().unwrap(),
            folder,
            exe.parent().unwrap().to_str().unwrap(),
        ] {
            assert!(
                !root.contains(leak) && !rest.contains(leak),
                "{leak} in\n{line}"
            );
        }
    }
}

/// Issue 16, finding 2: a second run on the same directory made the first fail ("sandbox
/// sb_local is not running", output lost) and failed to unmount. Now each concurrent run gets
/// a slot of its own (its own delta, mount and sandbox) and both finish.
#[test]
fn runs_on_one_directory_at_the_same_time_are_independent() {
    let Some((project, data)) = local("runs_on_one_directory_at_the_same_time_are_independent")
    else {
        return;
    };
    let dir = project.path().to_str().unwrap();
    // The first run waits inside its sandbox until the test creates `go` in the project.
    let mut first = Command::new(env!("CARGO_BIN_EXE_agentfense"))
        .arg("run")
        .arg("--data-dir")
        .arg(data.path())
        .args([
            dir,
            "--",
            ": > output/first-started; until [ -e go ]; do sleep 0.05; done; \
             echo first > output/first.txt; echo first",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // It holds a slot once its command runs: the file that command writes first shows up in
    // the slot's delta. (Probing the slot's lock instead took a shared lock that could make
    // the first run's own claim fail and move it to slot 2.)
    fn find(dir: &std::path::Path, name: &str) -> bool {
        std::fs::read_dir(dir).is_ok_and(|d| {
            d.flatten().any(|e| {
                e.file_name() == name
                    || (e.file_type().is_ok_and(|t| t.is_dir()) && find(&e.path(), name))
            })
        })
    }
    while !find(&data.path().join("local"), "first-started") {
        if let Some(status) = first.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(first.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("the first run ended before the second started: {status}: {err}");
        }
        std::thread::yield_now();
    }
    let (code, out, err) = run(
        data.path(),
        &[dir, "--", "echo second > output/second.txt; echo second"],
    );
    assert_eq!((code, out.as_str()), (0, "second\n"), "{err}");
    assert!(err.contains("slot 2"), "{err}");
    std::fs::write(project.path().join("go"), "").unwrap();
    let first = first.wait_with_output().unwrap();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&first.stdout), "first\n");
    // Each kept its own changes; the next run takes slot 1 again and builds on it.
    let (code, out, err) = run(data.path(), &[dir, "--", "ls output"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("first.txt") && !out.contains("second.txt"),
        "{out}"
    );
    assert!(find(&data.path().join("local"), "lock"));
}

/// Issue 16, finding 3: the project moved to `/workspace`, so a venv made on the host (its
/// shebangs and `.pth` files name the host path) did not work, and messages named paths that
/// do not exist on the host. The project now appears at its own path (and the command starts
/// there), with `/workspace` kept as an alias.
#[test]
fn the_project_appears_at_its_own_path() {
    let Some((project, data)) = local("the_project_appears_at_its_own_path") else {
        return;
    };
    let dir = project.path().to_str().unwrap().to_owned();
    // A venv made on the host: a console script and an editable install by absolute path.
    // The system's Python: the sandbox sees the host's /usr, not a per-user interpreter.
    let made = Command::new("/usr/bin/python3")
        .args(["-m", "venv", "--without-pip"])
        .arg(project.path().join(".venv"))
        .status()
        .unwrap();
    assert!(made.success());
    let script = project.path().join(".venv/bin/hello");
    std::fs::write(
        &script,
        format!(
            "#!{dir}/.venv/bin/python\nimport sys, mypkg\nprint(sys.prefix == {dir:?} + '/.venv', mypkg.WHERE)\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::create_dir_all(project.path().join("pkgsrc/mypkg")).unwrap();
    std::fs::write(
        project.path().join("pkgsrc/mypkg/__init__.py"),
        "WHERE = __file__\n",
    )
    .unwrap();
    let site = std::fs::read_dir(project.path().join(".venv/lib"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
        .join("site-packages");
    std::fs::write(site.join("mypkg.pth"), format!("{dir}/pkgsrc\n")).unwrap();
    let (code, out, err) = run(
        data.path(),
        &[
            &dir,
            "--preset",
            "development",
            "--discard",
            "--",
            "pwd; .venv/bin/hello; cat /workspace/pkgsrc/mypkg/__init__.py",
        ],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(
        out,
        format!("{dir}\nTrue {dir}/pkgsrc/mypkg/__init__.py\nWHERE = __file__\n")
    );
}

/// Issue 16, finding 8: `$HOME` was empty and thrown away each run (caches rebuilt, no git
/// identity, so `git commit` failed). Now each directory has a home that persists across runs
/// (`--fresh-home` starts clean), the invoking user's git identity is passed in (name and
/// email only), and `/tmp`'s size can be set.
#[test]
fn home_persists_and_git_commit_works() {
    let Some((project, data)) = local("home_persists_and_git_commit_works") else {
        return;
    };
    let dir = project.path().to_str().unwrap();
    let host_home = tempfile::tempdir().unwrap();
    std::fs::write(
        host_home.path().join(".gitconfig"),
        "[user]\n\tname = Ada Host\n\temail = ada@example.com\n[credential]\n\thelper = store\n",
    )
    .unwrap();
    let run_as = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_agentfense"))
            .arg("run")
            .arg("--data-dir")
            .arg(data.path())
            .args(args)
            .env("HOME", host_home.path())
            .env_remove("SUDO_USER")
            .output()
            .unwrap();
        outcome(out)
    };
    let (code, out, err) = run_as(&[
        dir,
        "--preset",
        "development",
        "--discard",
        "--tmp-size",
        "64M",
        "--",
        "echo kept > $HOME/cache && stat -c %a $HOME && df -k /tmp | tail -1 | awk '{print $2}' \
         && git config --get credential.helper; \
         git init -q output/repo && cd output/repo && echo a > a && git add a \
         && git commit -qm first && git log --format='%an <%ae>'",
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(out, "700\n65536\nAda Host <ada@example.com>\n", "{err}");
    let (code, out, err) = run_as(&[dir, "--discard", "--", "cat $HOME/cache"]);
    assert_eq!((code, out.as_str()), (0, "kept\n"), "{err}");
    let (code, out, _) = run_as(&[dir, "--discard", "--fresh-home", "--", "ls -A $HOME"]);
    assert_eq!((code, out.as_str()), (0, ""));
}

/// Issue 16, finding 5: the workspace root showed mode 0555 in every preset, so `cp -r` of it
/// made a tree nobody could write or delete, and a read-only file's `open(O_WRONLY)` succeeded
/// (the first write failed, which shells report as an I/O error). Directories now show the
/// host's mode, and a read-only file refuses the open like any read-only file.
#[test]
fn modes_are_the_ones_the_rules_allow() {
    let Some((project, data)) = local("modes_are_the_ones_the_rules_allow") else {
        return;
    };
    std::fs::set_permissions(
        project.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let dir = project.path().to_str().unwrap();
    let (code, out, err) = run(
        data.path(),
        &[
            dir,
            "--discard",
            "--",
            "stat -c %a . README.md; cp -r . /tmp/copy && rm -rf /tmp/copy && echo copied; \
             echo x >> README.md",
        ],
    );
    assert_ne!(code, 0, "{out}\n{err}");
    assert_eq!(out, "755\n444\ncopied\n", "{err}");
    assert!(err.contains("README.md: Permission denied"), "{err}");
}
