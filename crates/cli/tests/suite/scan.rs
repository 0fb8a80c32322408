//! `agentfense scan` through the real binary.

use super::util::{agentfense, write_tree};

fn planted_project() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    // Built at run time so that this source file itself does not look like a secret.
    let key_body = "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW";
    let key = format!(
        "-----BEGIN OPENSSH PRIVATE KEY-----\n{key_body}\n-----END OPENSSH PRIVATE KEY-----\n"
    );
    let aws = format!(
        "[default]\naws_access_key_id = {}{}\n",
        "AKIA", "Z7Q2M4XK8PLR5TNW"
    );
    write_tree(
        dir.path(),
        &[
            ("src/main.py", "print('hi')\n"),
            ("src/notes/deploy_key.txt", &key),
            ("config/settings.ini", &aws),
            (".env", "API_KEY=x\n"),
            ("README.md", "# project\npassword = \"changeme\"\n"),
        ],
    );
    dir
}

/// The report line about `path`.
fn line_of<'a>(text: &'a str, path: &str) -> &'a str {
    text.lines()
        .find(|l| l.contains(path))
        .unwrap_or_else(|| panic!("{path} missing:\n{text}"))
}

#[test]
fn scan_flags_exposed_secrets_and_exits_nonzero() {
    let dir = planted_project();
    let out = agentfense(&["scan", dir.path().to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let line = |p: &str| line_of(&text, p);
    assert!(line("/src/notes/deploy_key.txt").starts_with("EXPOSED"));
    assert!(line("/src/notes/deploy_key.txt").contains("private key"));
    assert!(line("/config/settings.ini").starts_with("EXPOSED"));
    assert!(line("/config/settings.ini").contains("AWS"));
    // .env is a secret by name, and agent-safe hides it.
    assert!(line("/.env").starts_with("hidden"));
    assert!(
        !text.contains("README.md") && !text.contains("main.py"),
        "{text}"
    );

    // Hiding them with rules makes the scan pass.
    let out = agentfense(&[
        "scan",
        dir.path().to_str().unwrap(),
        "--rule",
        "/src/notes/**=none@200",
        "--rule",
        "/config/settings.ini=none@200",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 3);
    assert!(v.as_array().unwrap().iter().all(|f| f["exposed"] == false));
}

#[test]
fn scan_is_quiet_on_this_repository() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    for sub in ["crates", "tests", "docs", "proto", "fuzz", "config"] {
        let out = agentfense(&["scan", repo.join(sub).to_str().unwrap()]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{sub}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// A hard link to a hidden secret is the secret under another name (issue 24): scan flags
/// the readable name; and secrets in other cases count (`.ENV`).
#[test]
fn scan_flags_other_names_and_spellings_of_secrets() {
    let dir = tempfile::tempdir().unwrap();
    write_tree(
        dir.path(),
        &[
            (".env", "API_KEY=x\n"),
            (".ENV", "API_KEY=y\n"),
            ("README.md", "hi\n"),
        ],
    );
    std::fs::hard_link(dir.path().join(".env"), dir.path().join("notes.txt")).unwrap();
    let out = agentfense(&["scan", dir.path().to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let line = |p: &str| line_of(&text, p);
    let link = line("/notes.txt");
    assert!(
        link.starts_with("EXPOSED") && link.contains("hard link to hidden /.env"),
        "{link}"
    );
    assert!(line("/.ENV").starts_with("hidden"), "{text}");
}
