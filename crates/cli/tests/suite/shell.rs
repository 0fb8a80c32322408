//! `agentfense shell`, for real: the test opens a pty, makes it the controlling terminal of
//! `agentfense shell` and types into it like a user.

use std::io::{Read, Write};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::pty::{OpenptFlags, grantpt, ioctl_tiocgptpeer, openpt, unlockpt};
use rustix::termios::{LocalModes, Winsize, tcgetattr, tcsetwinsize};

use super::server::privileged;
use super::util::project_with_secrets;

/// A terminal with `agentfense shell` running on it.
struct Term {
    master: std::fs::File,
    transcript: Arc<Mutex<Vec<u8>>>,
    seen: usize,
    child: Option<Child>,
    reader: Option<std::thread::JoinHandle<()>>,
    data: PathBuf,
}

/// Waits until a process whose command line is `argv` runs as the foreground job of its
/// terminal (its process group is the terminal's foreground group, from `/proc/<pid>/stat`):
/// the moment a key like Ctrl-C reaches it and not the shell. Polls, for at most 10 s.
fn wait_foreground(argv: &[&str]) {
    let want: Vec<u8> = argv.iter().flat_map(|a| a.bytes().chain([0])).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
            let dir = e.path();
            if std::fs::read(dir.join("cmdline")).ok().as_deref() != Some(&want[..]) {
                return false;
            }
            // Fields after the `(comm)`: state ppid pgrp session tty_nr tpgid ...
            let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
            let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let f: Vec<&str> = after.split_whitespace().collect();
            f.len() > 5 && f[2] == f[5]
        });
        if found {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{argv:?} never became the foreground job"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn winsize(rows: u16, cols: u16) -> Winsize {
    Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

impl Term {
    fn spawn(data: &Path, dir: &Path, rows: u16, cols: u16) -> Term {
        let flags = OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC;
        let master: OwnedFd = openpt(flags).unwrap();
        grantpt(&master).unwrap();
        unlockpt(&master).unwrap();
        let slave = ioctl_tiocgptpeer(&master, flags).unwrap();
        tcsetwinsize(&master, winsize(rows, cols)).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_agentfense"));
        cmd.arg("shell")
            .arg("--data-dir")
            .arg(data)
            .arg(dir)
            .env("TERM", "dumb")
            .env_remove("RUST_LOG")
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave));
        // SAFETY: between fork and exec only two raw syscalls (setsid, ioctl) run; nothing
        // allocates. They make the pty the controlling terminal, as a terminal emulator does.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                rustix::process::setsid()?;
                rustix::process::ioctl_tiocsctty(BorrowedFd::borrow_raw(0))?;
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        drop(cmd);
        let transcript = Arc::new(Mutex::new(Vec::new()));
        let mut reader_end = std::fs::File::from(master.try_clone().unwrap());
        let sink = transcript.clone();
        // Reads until every slave is closed (EIO): agentfense and the sandbox are gone.
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader_end.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Term {
            master: std::fs::File::from(master),
            transcript,
            seen: 0,
            child: Some(child),
            reader: Some(reader),
            data: data.to_owned(),
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.transcript.lock().unwrap()).into_owned()
    }

    /// Waits until `needle` appears after what earlier calls matched; moves past it.
    fn expect(&mut self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            {
                let t = self.transcript.lock().unwrap();
                let hay = String::from_utf8_lossy(&t[self.seen..]).into_owned();
                if let Some(i) = hay.find(needle) {
                    self.seen += hay[..i + needle.len()].len();
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {needle:?}; transcript:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn send(&mut self, keys: &str) {
        self.master.write_all(keys.as_bytes()).unwrap();
    }

    /// Waits for agentfense to exit and for its terminal output to end.
    fn wait(&mut self) -> i32 {
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "agentfense shell did not exit; transcript:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        if let Some(r) = self.reader.take() {
            r.join().unwrap();
        }
        status.code().unwrap_or(-1)
    }
}

impl Drop for Term {
    fn drop(&mut self) {
        // A failed test: SIGTERM lets agentfense clean up (sandbox, mount); then SIGKILL.
        if let Some(mut child) = self.child.take() {
            let pid = rustix::process::Pid::from_child(&child);
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        for m in mounts_under(&self.data) {
            let _ = Command::new("umount").args(["-l", &m]).status();
        }
    }
}

fn mounts_under(dir: &Path) -> Vec<String> {
    let dir = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .filter(|m| m.starts_with(&dir))
        .collect()
}

#[test]
fn shell_is_interactive_with_job_control_and_resize() {
    if !privileged("shell_is_interactive_with_job_control_and_resize") {
        return;
    }
    let project = project_with_secrets();
    let data = tempfile::tempdir().unwrap();
    let mut t = Term::spawn(data.path(), project.path(), 30, 90);
    // The shell starts at the project's own path (issue 16).
    t.expect(&format!("(sandbox) {} $ ", project.path().display()));

    // The initial size is the user's terminal's.
    t.send("stty size\r");
    t.expect("30 90\r\n");

    // agent-safe hides .env: not listed, not readable.
    t.send("ls -a | grep -c '^\\.env$'; echo n=$((40+2))\r");
    t.expect("0\r\nn=42");
    t.send("cat .env\r");
    t.expect("No such file");

    // Job control: background jobs, fg, Ctrl-C reaches the foreground job only.
    t.send("sleep 100 &\r");
    t.expect("(sandbox)");
    t.send("jobs\r");
    t.expect("Running");
    t.send("fg\r");
    t.expect("sleep 100\r\n");
    wait_foreground(&["sleep", "100"]);
    t.send("\x03");
    t.send("echo st=$?\r");
    t.expect("st=130");
    // Ctrl-Z stops the foreground job; the shell gets its prompt back.
    t.send("sleep 200\r");
    t.expect("sleep 200\r\n");
    wait_foreground(&["sleep", "200"]);
    t.send("\x1a");
    t.expect("Stopped");
    t.send("echo st=$?; jobs | grep -c Stopped\r");
    t.expect("st=148\r\n1\r\n");
    t.send("kill -KILL %1; sleep 0.2; jobs; echo killed=$((1+1))\r");
    t.expect("Killed");
    t.expect("killed=2");

    // A resize of the user's terminal reaches the shell.
    tcsetwinsize(&t.master, winsize(40, 120)).unwrap();
    let mut resized = false;
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(200));
        t.send("echo size=$(stty size | tr ' ' x)\r");
        t.expect("size=");
        t.expect("\r\n");
        let text = t.text();
        if text.ends_with("size=40x120\r\n") || text.contains("size=40x120") {
            resized = true;
            break;
        }
    }
    assert!(resized, "resize not seen; transcript:\n{}", t.text());

    // Writes go to the delta; the exit code is the shell's; the summary follows.
    t.send("echo hi > output/x.txt; exit 7\r");
    assert_eq!(t.wait(), 7, "transcript:\n{}", t.text());
    let text = t.text();
    assert!(text.contains("A output/x.txt"), "{text}");
    assert!(!text.contains("top-secret"), "{text}");
    // The terminal is back in its normal (cooked) mode.
    let modes = tcgetattr(&t.master).unwrap().local_modes;
    assert!(
        modes.contains(LocalModes::ICANON | LocalModes::ECHO),
        "{modes:?}"
    );
    assert!(!project.path().join("output/x.txt").exists());
    assert_eq!(mounts_under(data.path()), Vec::<String>::new());
}

#[test]
fn shell_stopped_by_a_signal_cleans_up() {
    if !privileged("shell_stopped_by_a_signal_cleans_up") {
        return;
    }
    let project = project_with_secrets();
    let data = tempfile::tempdir().unwrap();
    let mut t = Term::spawn(data.path(), project.path(), 24, 80);
    // The shell starts at the project's own path (issue 16).
    t.expect(&format!("(sandbox) {} $ ", project.path().display()));
    t.send("echo x > output/y.txt; sleep 104\r");
    t.expect("sleep 104\r\n");
    wait_foreground(&["sleep", "104"]);
    let pid = rustix::process::Pid::from_child(t.child.as_ref().unwrap());
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    assert_eq!(t.wait(), 128 + 15, "transcript:\n{}", t.text());
    let text = t.text();
    assert!(text.contains("stopped by signal 15"), "{text}");
    assert!(
        text.contains("A output/y.txt"),
        "the summary still comes: {text}"
    );
    let modes = tcgetattr(&t.master).unwrap().local_modes;
    assert!(
        modes.contains(LocalModes::ICANON | LocalModes::ECHO),
        "terminal restored: {modes:?}"
    );
    assert_eq!(mounts_under(data.path()), Vec::<String>::new());
}

#[test]
fn shell_without_a_terminal_points_to_run() {
    let project = project_with_secrets();
    let data = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_agentfense"))
        .arg("shell")
        .arg("--data-dir")
        .arg(data.path())
        .arg(project.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("not") && err.contains("agentfense run"),
        "{err}"
    );
    // Nothing was mounted or created.
    assert!(!data.path().join("local").exists());
}
