//! Fixture: a codebase tree, a delta dir and a mount point in one temp dir, mounted on
//! creation and unmounted on drop (even when the test fails).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use agentfense_core::{Level, PermissionRule, Policy, presets};
use agentfense_fs::{FsConfig, MountHandle, PublishMode, mount};

/// Why mount tests cannot run here, if they cannot.
pub fn fuse_unavailable() -> Option<String> {
    use agentfense_testsupport as ts;
    ts::all(&[ts::root(), ts::fuse()])
}

/// Skips (or, under CI, fails) the calling test when FUSE mounts are impossible.
macro_rules! require_fuse {
    ($name:expr) => {
        if !agentfense_testsupport::require($name, $crate::suite::util::fuse_unavailable()) {
            return;
        }
    };
}
pub(crate) use require_fuse;

/// agent-safe plus a view-only `/view` tree.
pub fn test_rules() -> Vec<PermissionRule> {
    let mut r = presets::get("agent-safe").unwrap().rules();
    r.push(PermissionRule::glob("/view/**", Level::View, 10));
    r
}

pub struct Mnt {
    pub dir: tempfile::TempDir,
    pub handle: Option<MountHandle>,
}

impl Mnt {
    pub fn lower(&self) -> PathBuf {
        self.dir.path().join("lower")
    }
    pub fn delta(&self) -> PathBuf {
        self.dir.path().join("delta")
    }
    pub fn mnt(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }
    pub fn h(&self) -> &MountHandle {
        self.handle.as_ref().unwrap()
    }

    /// Runs `script` with `sh -c` in the mount, with a timeout so that a hung FUSE operation
    /// cannot hang the suite. Returns (exit code, stdout, stderr).
    pub fn sh(&self, script: &str) -> (i32, String, String) {
        let out = Command::new("timeout")
            .args(["-k", "2", "30", "sh", "-c", script])
            .current_dir(self.mnt())
            .env("LC_ALL", "C")
            .output()
            .unwrap();
        let code = out.status.code().unwrap_or(-1);
        assert_ne!(code, 124, "timed out: {script}");
        (
            code,
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs `script` and asserts success; returns stdout.
    pub fn ok(&self, script: &str) -> String {
        let (code, out, err) = self.sh(script);
        assert_eq!(code, 0, "{script}: stdout={out} stderr={err}");
        out
    }

    /// Runs the Python program `script` in the mount (killed after 30 s).
    pub fn python(&self, script: &str) -> std::process::Output {
        Command::new("timeout")
            .args(["-k", "2", "30", "python3", "-c", script])
            .current_dir(self.mnt())
            .output()
            .unwrap()
    }

    /// Runs the Python program `script` in the mount as the sandbox user of
    /// [`mount_as_user`] (uid 1234, no capabilities), where the kernel's own checks apply.
    pub fn user_python(&self, script: &str) -> std::process::Output {
        Command::new("timeout")
            .args(["-k", "2", "30", "setpriv", "--reuid=1234", "--regid=4321"])
            .args(["--clear-groups", "/usr/bin/python3", "-c", script])
            .current_dir(self.mnt())
            .output()
            .unwrap()
    }

    /// [`Mnt::py`] as the sandbox user of [`mount_as_user`].
    pub fn user_py(&self, stmt: &str) -> String {
        self.py_with(stmt, |p| self.user_python(p))
    }

    /// Runs a Python statement in the mount and returns `ok` or the errno name it raised
    /// (plus the printed value, if the statement is an expression).
    pub fn py(&self, stmt: &str) -> String {
        self.py_with(stmt, |p| self.python(p))
    }

    fn py_with(&self, stmt: &str, run: impl Fn(&str) -> std::process::Output) -> String {
        let prog = format!(
            "import os, errno, stat\nS = {stmt:?}\ntry:\n    code, mode = compile(S, 'x', 'eval'), 'eval'\nexcept SyntaxError:\n    code, mode = compile(S, 'x', 'exec'), 'exec'\ntry:\n    r = eval(code) if mode == 'eval' else exec(code)\n    print('ok' if r is None else 'ok ' + repr(r))\nexcept OSError as e:\n    print(errno.errorcode[e.errno])\n"
        );
        let out = run(&prog);
        assert_ne!(out.status.code(), Some(124), "timed out: {stmt}");
        let s = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if s.is_empty() {
            panic!("{stmt}: {}", String::from_utf8_lossy(&out.stderr));
        }
        s
    }
}

impl Drop for Mnt {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            // If a command left a process inside, the unmount falls back to a lazy detach.
            let _ = h.unmount();
        }
        let _ = agentfense_fs::detach(&self.mnt());
    }
}

pub fn write(base: &Path, rel: &str, content: &str) {
    // Never let a fixture path escape the temp dir (`Path::join` of an absolute path
    // replaces the base).
    let rel = rel.trim_start_matches('/');
    assert!(!rel.split('/').any(|c| c == ".."), "{rel}");
    let p = base.join(rel);
    assert!(p.starts_with(base), "{}", p.display());
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, content).unwrap();
}

/// The standard codebase.
pub fn standard_tree(lower: &Path) {
    for (p, c) in [
        ("README.md", "hello readme\n"),
        ("src/main.py", "print('hi')\n"),
        ("src/.env", "API_KEY=hunter2\n"),
        ("secrets/key.txt", "TOPSECRET\n"),
        ("view/plan.txt", "view only\n"),
        ("output/existing.txt", "old output\n"),
        ("output/.env", "OUTPUT_SECRET=1\n"),
        ("output/proj/a.txt", "a\n"),
        ("output/proj/.env", "PROJ_SECRET=1\n"),
        ("output/only_hidden/.env", "ONLY=1\n"),
        (".git/config", "[core]\n"),
        (".wh.keep", "ordinary file\n"),
    ] {
        write(lower, p, c);
    }
    std::os::unix::fs::symlink("../secrets/key.txt", lower.join("src/link_to_secret")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", lower.join("src/link_to_passwd")).unwrap();
}

pub fn mount_with(
    rules: Vec<PermissionRule>,
    tree: impl FnOnce(&Path),
    tweak: impl FnOnce(&mut FsConfig),
) -> Mnt {
    let dir = tempfile::tempdir().unwrap();
    let lower = dir.path().join("lower");
    std::fs::create_dir_all(&lower).unwrap();
    std::fs::create_dir_all(dir.path().join("mnt")).unwrap();
    tree(&lower);
    let mut cfg = FsConfig::new(
        "sb-test",
        &lower,
        dir.path().join("delta"),
        dir.path().join("mnt"),
        Policy::compile(rules).unwrap(),
    );
    cfg.publish_mode = PublishMode::Explicit;
    tweak(&mut cfg);
    let handle = mount(cfg).unwrap();
    let m = Mnt {
        dir,
        handle: Some(handle),
    };
    // The mount is ready when the root answers.
    for _ in 0..100 {
        if std::fs::read_dir(m.mnt()).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    m
}

/// The standard tree mounted for a sandbox user (uid 1234, gid 4321) as in production:
/// files are presented as that user's, and the user may use the mount.
pub fn mount_as_user(io_mode: agentfense_fs::IoMode) -> Mnt {
    mount_with(test_rules(), standard_tree, |c| {
        c.owner = Some((1234, 4321));
        c.allow_other = true;
        c.io_mode = io_mode;
    })
}

pub fn standard() -> Mnt {
    mount_with(test_rules(), standard_tree, |_| {})
}
