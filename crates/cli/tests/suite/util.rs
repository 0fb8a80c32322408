//! Helpers: run the real `agentfense` executable and build temp projects.

use std::path::Path;
use std::process::{Command, Output};

/// Runs the built `agentfense` binary with `args`.
pub fn agentfense(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_agentfense"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run agentfense")
}

/// Stdout as a string, asserting success.
pub fn ok_stdout(args: &[&str]) -> String {
    let out = agentfense(args);
    assert!(
        out.status.success(),
        "agentfense {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// Creates `files` (path, content) under `root`, making parent directories.
/// A finished command as (exit code, `-1` for a signal; stdout; stderr).
pub fn outcome(out: Output) -> (i32, String, String) {
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn write_tree(root: &Path, files: &[(&str, &str)]) {
    for (rel, content) in files {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }
}

/// A small project with secrets at several depths.
pub fn project_with_secrets() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_tree(
        dir.path(),
        &[
            (".env", "API_KEY=top-secret-1\n"),
            ("src/main.py", "print('hello')\n"),
            ("src/config/.env.prod", "DB_PASSWORD=top-secret-2\n"),
            ("secrets/db.txt", "top-secret-3\n"),
            ("app/secrets/x/y.txt", "top-secret-4\n"),
            (".git/config", "[core]\n"),
            ("output/.keep", ""),
            ("README.md", "# demo\n"),
            ("deploy/id_rsa", "-----BEGIN OPENSSH PRIVATE KEY-----\n"),
        ],
    );
    dir
}
