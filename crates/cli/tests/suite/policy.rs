//! `agentfense policy explain|show` and `agentfense presets` through the real binary.

use agentfense_core::{NodeKind, Policy, SandboxPath, presets};
use pretty_assertions::assert_eq;

use super::util::{agentfense, ok_stdout, project_with_secrets};

#[test]
fn explain_matches_the_engine_for_every_path() {
    let paths = [
        "/.env",
        "/src/main.py",
        "/output/r.txt",
        "/secrets/db.txt",
        "/.git/config",
        "/a/b/.env.local",
        "/tmp/x",
        "/deploy/id_rsa",
    ];
    let mut args = vec!["policy", "explain", "--json", "--preset", "agent-safe"];
    args.extend(paths);
    let out = ok_stdout(&args);
    // The CLI applies the default mandatory floor above the preset, as the server does.
    let policy = Policy::compile_with_floor(
        presets::get("agent-safe").unwrap().rules(),
        presets::default_floor(),
    )
    .unwrap();
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), paths.len());
    for (line, path) in lines.iter().zip(paths) {
        let d = policy.evaluate(&SandboxPath::parse(path).unwrap(), NodeKind::File);
        assert_eq!(line["path"], path);
        assert_eq!(line["level"], d.level.as_str(), "{path}");
        assert_eq!(
            line["rule_index"].as_u64(),
            d.rule().map(|r| r.index as u64),
            "{path}"
        );
    }
}

#[test]
fn explain_text_names_the_rule() {
    let out = ok_stdout(&["policy", "explain", "/.env", "/src/"]);
    let mut lines = out.lines();
    let env = lines.next().unwrap();
    assert!(env.starts_with("/.env "), "{env}");
    assert!(
        env.contains(" none ") && env.contains("mandatory floor rule \"(?i)**/.env\""),
        "{env}"
    );
    let src = lines.next().unwrap();
    assert!(src.contains(" read ") && src.contains("\"**/*\""), "{src}");
    // Without the floor (said loudly), the preset's own rule decides.
    let out = super::util::agentfense(&["policy", "explain", "--no-floor", "/.env"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("\"(?i)**/.env*\""),
        "{out:?}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--no-floor"),
        "{out:?}"
    );
}

/// A client rule can never lift the floor, and `--server-config` takes the floor from a server
/// config (here one that turns it off).
#[test]
fn the_floor_outranks_rules_and_follows_the_server_config() {
    let out = ok_stdout(&[
        "policy",
        "explain",
        "--rule",
        "file:/deploy/id_rsa=write@2147483647",
        "/deploy/id_rsa",
    ]);
    assert!(
        out.contains(" none ") && out.contains("policy.mandatory"),
        "{out}"
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("server.yaml");
    std::fs::write(&cfg, "policy:\n  mandatory: []\n").unwrap();
    let out = ok_stdout(&[
        "policy",
        "explain",
        "--server-config",
        cfg.to_str().unwrap(),
        "--rule",
        "file:/deploy/id_rsa=write@2147483647",
        "/deploy/id_rsa",
    ]);
    assert!(out.contains(" write "), "{out}");
}

#[test]
fn explain_uses_rules_and_traversal() {
    let out = ok_stdout(&[
        "policy",
        "explain",
        "--preset",
        "none",
        "--rule",
        "**/*.py=read",
        "/src/",
        "/src/a.py",
        "/README",
    ]);
    let levels: Vec<&str> = out
        .lines()
        .map(|l| l.split_whitespace().nth(1).unwrap())
        .collect();
    assert_eq!(levels, ["view", "read", "none"]);
    assert!(out.contains("traversable directory"), "{out}");
}

#[test]
fn explain_with_root_reads_kinds_from_disk() {
    let dir = project_with_secrets();
    let root = dir.path().to_str().unwrap();
    let out = ok_stdout(&[
        "policy",
        "explain",
        "--json",
        "--preset",
        "none",
        "--rule",
        "**/*.py=read",
        "--root",
        root,
        "/src",
    ]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["kind"], "dir");
    assert_eq!(v["level"], "view");
}

#[test]
fn show_hides_secrets_and_counts_levels() {
    let dir = project_with_secrets();
    let out = ok_stdout(&["policy", "show", dir.path().to_str().unwrap()]);
    for secret in ["top-secret", ".env", "secrets", ".git", "id_rsa"] {
        assert!(!out.contains(secret), "{secret} leaked:\n{out}");
    }
    let entries = parse_show(&out);
    assert!(
        entries.contains(&("read".into(), "/src/main.py".into())),
        "{out}"
    );
    assert!(
        entries.contains(&("write".into(), "/output/".into())),
        "{out}"
    );
    // Every entry is counted, hidden ones without being named.
    let summary = out.lines().last().unwrap();
    assert_eq!(
        summary, "18 entries: 2 write, 6 read, 0 view, 10 hidden",
        "{out}"
    );

    let revealed = ok_stdout(&["policy", "show", "--reveal", dir.path().to_str().unwrap()]);
    let entries = parse_show(&revealed);
    assert!(
        entries.contains(&("none".into(), "/.env".into())),
        "{revealed}"
    );
    assert!(
        entries.contains(&("none".into(), "/app/secrets/x/y.txt".into())),
        "{revealed}"
    );
    assert_eq!(entries.len(), 19, "root plus 18 entries:\n{revealed}");
}

/// (level, path) of each tree line of `policy show`.
fn parse_show(out: &str) -> Vec<(String, String)> {
    out.lines()
        .take_while(|l| !l.is_empty())
        .map(|l| {
            let mut it = l.split_whitespace();
            (it.next().unwrap().to_owned(), it.next().unwrap().to_owned())
        })
        .collect()
}

#[test]
fn errors_are_clear_and_exit_nonzero() {
    let out = agentfense(&["policy", "explain", "--preset", "nope", "/x"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown preset \"nope\"") && err.contains("agent-safe"),
        "{err}"
    );

    let out = agentfense(&["policy", "explain", "--rule", "**.md=read", "/x"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"**.md\"") && err.contains("whole path segment"),
        "{err}"
    );

    let out = agentfense(&["policy", "explain", "../etc/passwd"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("climbs above the root"));

    let out = agentfense(&["policy", "show", "/nonexistent/dir"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/dir"));
}

#[test]
fn presets_lists_every_preset() {
    let out = ok_stdout(&["presets"]);
    for name in presets::names() {
        assert!(out.contains(&format!("{name}: ")), "{name} missing:\n{out}");
    }
    let json: serde_json::Value = serde_json::from_str(&ok_stdout(&["presets", "--json"])).unwrap();
    assert_eq!(json["read-only"][0]["permission"], "read");
}

#[test]
fn show_and_explain_hide_directories_with_nothing_visible_below() {
    let dir = tempfile::tempdir().unwrap();
    for p in [
        "src/pkg/deep/leaf.py",
        "docs/guide.md",
        "secrets/db.txt",
        "top.py",
    ] {
        let path = dir.path().join(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, "x").unwrap();
    }
    let root = dir.path().to_str().unwrap();
    let rules = ["--preset", "none", "--rule", "**/*.py=read"];
    let mut args = vec!["policy", "show"];
    args.extend(rules);
    args.push(root);
    let out = ok_stdout(&args);
    let shown: Vec<String> = parse_show(&out).into_iter().map(|(_, p)| p).collect();
    assert_eq!(
        shown,
        [
            "/",
            "/src/",
            "/src/pkg/",
            "/src/pkg/deep/",
            "/src/pkg/deep/leaf.py",
            "/top.py"
        ],
        "{out}"
    );
    // The same answer per path, as the mount gives it.
    let mut args = vec!["policy", "explain", "--root", root];
    args.extend(rules);
    args.extend(["/docs", "/src/pkg"]);
    let levels: Vec<String> = ok_stdout(&args)
        .lines()
        .map(|l| l.split_whitespace().nth(1).unwrap().to_owned())
        .collect();
    assert_eq!(levels, ["none", "view"]);
}
