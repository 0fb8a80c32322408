//! `agentfense mcp` (stdio, local and server sandboxes) and the server's `/mcp` (streamable
//! HTTP), driven by the official Python MCP SDK: runs `tests/mcp/test_mcp.py` with pytest.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::review::{cli, create_key};
use super::server::{Server, privileged};
use super::util::write_tree;

fn python() -> String {
    std::env::var("AGENTFENSE_PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

/// Root, FUSE and bwrap, and `pip install mcp pytest` (`./dev setup` installs them).
fn ready(test: &str) -> bool {
    privileged(test)
        && agentfense_testsupport::require(
            test,
            agentfense_testsupport::python_modules(&python(), &["mcp", "pytest", "httpx2"]),
        )
}

/// The project every mode serves: a secret, read-only source, a writable `output/`.
const PROJECT: &[(&str, &str)] = &[
    ("src/main.py", "print(\"hello\")\n"),
    (".env", "SECRET=hunter2\n"),
    ("output/.keep", ""),
];

/// Runs the suite for `modes` with `env`; panics with pytest's report on a failure.
fn pytest(modes: &str, env: &[(&str, &str)], log: impl Fn() -> String) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut c = Command::new(python());
    c.args([
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "tests/mcp/test_mcp.py",
    ])
    .current_dir(&root)
    .env("MCP_MODES", modes)
    .env("AGENTFENSE_BIN", env!("CARGO_BIN_EXE_agentfense"))
    .env_remove("AGENTFENSE_API_KEY");
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().expect("run pytest");
    assert!(
        out.status.success(),
        "MCP suite ({modes}) failed:\n{}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        log()
    );
}

#[test]
fn mcp_over_stdio_with_a_local_sandbox() {
    let test = "mcp_over_stdio_with_a_local_sandbox";
    if !ready(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let project = tmp.path().join("project");
    write_tree(&project, PROJECT);
    let data = tmp.path().join("data");
    pytest(
        "local",
        &[
            ("MCP_PROJECT", project.to_str().unwrap()),
            ("MCP_DATA", data.to_str().unwrap()),
        ],
        String::new,
    );
    // The agent's writes stayed in the kept delta: the project is untouched.
    assert!(!project.join("output/local").exists());
    assert_eq!(
        std::fs::read_to_string(project.join("src/main.py")).unwrap(),
        "print(\"hello\")\n"
    );
}

/// A started agent-safe sandbox whose changes wait for review, on a codebase holding
/// [`PROJECT`].
fn sandbox(server: &Server, key: &str) -> String {
    let (code, cb, err) = cli(server, Some(key), &["codebase", "create", "mcp"]);
    assert_eq!(code, 0, "{err}");
    let dir: &Path = &server.data_dir.join("codebases").join(cb.trim());
    write_tree(dir, PROJECT);
    let (code, sb, err) = cli(
        server,
        Some(key),
        &[
            "sandbox",
            "create",
            cb.trim(),
            "--start",
            "--preset",
            "agent-safe",
            "--label",
            "agentfense.publish=manual",
        ],
    );
    assert_eq!(code, 0, "{err}");
    sb.trim().to_owned()
}

#[test]
fn mcp_bound_to_a_server_sandbox_over_stdio_and_http() {
    let test = "mcp_bound_to_a_server_sandbox_over_stdio_and_http";
    if !ready(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start_with(&data, "auth:\n  enabled: true\n");
    let key = create_key(&data, "team");
    let sb = sandbox(&server, &key);
    let other = sandbox(&server, &key);
    let (code, token, err) = cli(&server, Some(&key), &["sandbox", "token", &sb]);
    assert_eq!(code, 0, "{err}");
    pytest(
        "remote,http",
        &[
            ("AGENTFENSE_GRPC", &server.grpc),
            ("AGENTFENSE_HTTP", &server.http),
            ("MCP_SANDBOX", &sb),
            ("MCP_OTHER_SANDBOX", &other),
            ("MCP_TOKEN", token.trim()),
            ("MCP_DATA", data.to_str().unwrap()),
        ],
        || server.log_text(),
    );
    // Every command the tools ran is in the audit trail, as the sandbox token's.
    let audit = std::fs::read_to_string(data.join("audit.jsonl")).unwrap();
    let commands = audit
        .lines()
        .filter(|l| l.contains("\"command_executed\"") && l.contains(&sb))
        .count();
    assert!(commands > 200, "{commands} commands audited");
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"permission_denied\"") && l.contains("src/main.py")),
        "the refused write is audited"
    );
}
