//! A tree with secrets at many depths under agent-safe: no tool prints a hidden name or byte.

use std::path::Path;

use agentfense_core::presets;
use agentfense_fs::IoMode;

use super::util::{mount_with, require_fuse, write};

const HIDDEN: &[&str] = &[
    ".env",
    ".env.LEAKNAME",
    "secrets/LEAKNAME.txt",
    "LEAKNAME.pem",
    "server.key",
    "credentials.json",
    "LEAKNAME_id_rsa.bak",
    "id_rsa",
    ".aws/LEAKNAME",
    ".git/LEAKNAME",
    ".netrc",
];

fn tree(lower: &Path) {
    let dirs = ["", "a", "a/b", "a/b/c", "a/b/c/d/e"];
    for d in dirs {
        let base = lower.join(d);
        write(&base, "visible.txt", "just code\n");
        for h in HIDDEN {
            // Key material is hidden by what it holds (`*.pem`, SSH key copies): a private key.
            write(&base, h, "-----BEGIN PRIVATE KEY-----\nLEAKBYTES\n");
        }
    }
    // A directory whose only content is hidden.
    write(lower, "a/only/secrets/deep/x", "LEAKBYTES\n");
}

#[test]
fn no_tool_prints_a_hidden_name_or_byte() {
    require_fuse!("no_tool_prints_a_hidden_name_or_byte");
    no_leak(IoMode::NoOpen);
}

#[test]
fn no_tool_prints_a_hidden_name_or_byte_in_passthrough_mode() {
    require_fuse!("no_tool_prints_a_hidden_name_or_byte_in_passthrough_mode");
    no_leak(IoMode::Passthrough);
}

fn no_leak(mode: IoMode) {
    let m = mount_with(presets::get("agent-safe").unwrap().rules(), tree, |c| {
        c.io_mode = mode;
    });
    let forbidden = [
        "LEAK",
        ".env",
        "secrets",
        ".pem",
        ".key",
        "credentials",
        "id_rsa",
        ".aws",
        ".git",
        ".netrc",
    ];
    for cmd in [
        "find . -xdev",
        "find . -xdev -type f -exec cat {} +",
        "grep -r . .",
        "grep -ra LEAK . ; true",
        "ls -laR",
        "du -a",
        "tar c . | strings",
        "python3 -c \"import os; [print(r, d, f) for r, d, f in os.walk('.')]\"",
    ] {
        let (_, out, err) = m.sh(cmd);
        for f in forbidden {
            assert!(!out.contains(f), "{cmd} printed {f}:\n{out}");
            assert!(!err.contains(f), "{cmd} printed {f} on stderr:\n{err}");
        }
        assert!(
            out.contains("visible.txt") || out.contains("just code") || cmd.starts_with("grep -ra"),
            "{cmd}: {out}"
        );
    }
    // Every visible file is found, at every depth.
    assert_eq!(
        m.ok("find . -name visible.txt | sort"),
        "./a/b/c/d/e/visible.txt\n./a/b/c/visible.txt\n./a/b/visible.txt\n./a/visible.txt\n./visible.txt\n"
    );
    // Guessing names directly gives nothing either.
    for d in ["", "a/", "a/b/c/d/e/"] {
        for h in HIDDEN {
            assert_eq!(m.py(&format!("os.stat('{d}{h}')")), "ENOENT", "{d}{h}");
        }
    }
    let events: Vec<_> = m.h().events().try_iter().collect();
    assert!(!events.is_empty());
}
