//! The tools over a fake workspace that runs their scripts with the host's `sh` in a
//! temporary directory: what the scripts do and how their answers are read. The policy
//! filesystem's own refusals are covered by the CLI's tests, which drive `agentfense mcp`
//! with the official Python MCP SDK.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use agentfense_core::{Level, PermissionRule, Policy};
use pretty_assertions::assert_eq;
use serde_json::{Value, json};

use super::*;
use crate::workspace::WsFuture;

/// Runs commands with `/bin/sh` in `root`; answers canned stderr for paths named in
/// `refuse` (as the policy filesystem would refuse them).
struct Fake {
    root: tempfile::TempDir,
    refuse: Vec<(&'static str, &'static str)>,
    calls: Mutex<Vec<ExecCall>>,
}

impl Fake {
    fn new() -> Fake {
        Fake {
            root: tempfile::tempdir().unwrap(),
            refuse: Vec::new(),
            calls: Mutex::new(Vec::new()),
        }
    }

    fn file(&self, rel: &str, content: &str) {
        let p = self.root.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }

    fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.root.path().join(rel)).unwrap()
    }
}

impl Workspace for Fake {
    fn exec(&self, call: ExecCall) -> WsFuture<'_, ExecReply> {
        self.calls.lock().unwrap().push(call.clone());
        if let Some((_, err)) = self
            .refuse
            .iter()
            .find(|(p, _)| call.env.get("AF_P").map(String::as_str) == Some(*p))
        {
            let err = (*err).to_owned();
            return Box::pin(async move {
                Ok(ExecReply {
                    exit_code: 1,
                    stderr: err,
                    ..ExecReply::default()
                })
            });
        }
        let mut child = Command::new("/bin/sh")
            .arg("-c")
            .arg(&call.command)
            .current_dir(self.root.path().join(&call.workdir))
            .envs(&call.env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(call.stdin.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        Box::pin(async move {
            Ok(ExecReply {
                exit_code: out.status.code().unwrap_or(-1),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                truncated: false,
            })
        })
    }

    fn policy(&self) -> WsFuture<'_, PolicyView> {
        Box::pin(async move {
            Ok(PolicyView {
                sandbox_id: "sb_test".to_owned(),
                roots: vec!["/workspace".to_owned()],
                policy: Arc::new(
                    Policy::compile(vec![
                        PermissionRule::glob("**", Level::Read, 0),
                        PermissionRule::glob("/output/**", Level::Write, 10),
                        PermissionRule::glob("**/*.pem", Level::View, 50),
                    ])
                    .unwrap(),
                ),
                network: json!({"mode": "none"}),
            })
        })
    }

    fn changes(&self) -> WsFuture<'_, Value> {
        Box::pin(async { Ok(json!({"changes": [], "total": 0})) })
    }

    fn diff(&self, _: Vec<String>) -> WsFuture<'_, (String, bool)> {
        Box::pin(async { Ok((String::new(), false)) })
    }

    fn checkpoint(&self, label: String) -> WsFuture<'_, Value> {
        Box::pin(async move { Ok(json!({"id": "cp-1", "label": label})) })
    }

    fn restore(&self, _: String, _: bool) -> WsFuture<'_, Value> {
        Box::pin(async { Err(WsError::NotFound("checkpoint cp-9".to_owned())) })
    }
}

fn call(ws: &Fake, name: &str, args: Value) -> Outcome {
    let Value::Object(map) = args else {
        panic!("arguments are an object")
    };
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(Toolbox::default().call(ws, name, Some(map)))
        .unwrap()
}

fn ok(o: Outcome) -> String {
    assert!(!o.is_error, "{}", o.text);
    o.text
}

fn err(o: Outcome) -> String {
    assert!(o.is_error, "expected an error, got {}", o.text);
    o.text
}

#[test]
fn tool_names_and_lists() {
    assert_eq!(
        Toolbox::default()
            .specs()
            .iter()
            .map(|s| s.name)
            .collect::<Vec<_>>(),
        [
            "exec",
            "read_file",
            "write_file",
            "edit_file",
            "list_files",
            "search",
            "changes",
            "diff",
            "checkpoint",
            "restore"
        ]
    );
    assert_eq!(
        ToolName::parse_list("read_file, exec,read_file").unwrap(),
        [ToolName::Exec, ToolName::ReadFile]
    );
    assert!(
        ToolName::parse_list("exec,rm")
            .unwrap_err()
            .contains("unknown tool \"rm\"")
    );
    assert!(ToolName::parse_list(" , ").is_err());
    for spec in Toolbox::default().specs() {
        assert_eq!(spec.input_schema["type"], "object", "{}", spec.name);
        assert_eq!(spec.input_schema["additionalProperties"], false);
        assert!(!(spec.read_only && spec.destructive), "{}", spec.name);
    }
}

#[test]
fn only_enabled_tools_are_called() {
    let ws = Fake::new();
    let tb = Toolbox::new(vec![ToolName::ReadFile]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    assert_eq!(
        rt.block_on(tb.call(&ws, "exec", None)),
        Err(CallError::UnknownTool("exec".to_owned()))
    );
    assert!(tb.spec("exec").is_none() && tb.spec("read_file").is_some());
    assert!(ws.calls.lock().unwrap().is_empty());
}

#[test]
fn read_file_whole_and_by_lines() {
    let ws = Fake::new();
    ws.file("src/a.txt", "one\ntwo\nthree\n");
    assert_eq!(
        ok(call(&ws, "read_file", json!({"path": "src/a.txt"}))),
        "one\ntwo\nthree\n"
    );
    assert_eq!(
        ok(call(
            &ws,
            "read_file",
            json!({"path": "src/a.txt", "start_line": 2, "end_line": 3, "line_numbers": true})
        )),
        "2\ttwo\n3\tthree\n"
    );
    assert!(err(call(&ws, "read_file", json!({"path": "src/nope"}))).starts_with("not found"));
    assert!(err(call(&ws, "read_file", json!({"path": "src"}))).contains("is a directory"));
    assert!(
        err(call(
            &ws,
            "read_file",
            json!({"path": "src/a.txt", "start_line": 3, "end_line": 1})
        ))
        .contains("before start_line")
    );
    // The path goes through the environment: no quoting games.
    let tricky = "src/$(touch pwned) 'q\".txt";
    ws.file(tricky, "ok\n");
    assert_eq!(ok(call(&ws, "read_file", json!({"path": tricky}))), "ok\n");
    assert!(!ws.root.path().join("src/pwned").exists());
    // A path that begins with a dash is a path, not an option.
    ws.file("-n", "dash\n");
    assert_eq!(ok(call(&ws, "read_file", json!({"path": "-n"}))), "dash\n");
    std::fs::write(ws.root.path().join("bin.dat"), b"\0\x01\xff").unwrap();
    assert!(err(call(&ws, "read_file", json!({"path": "bin.dat"}))).contains("not UTF-8 text"));
}

#[test]
fn bad_arguments_say_what_was_wrong() {
    let ws = Fake::new();
    let e = err(call(&ws, "read_file", json!({"path": "a", "bogus": 1})));
    assert!(
        e.contains("invalid arguments for read_file") && e.contains("bogus"),
        "{e}"
    );
    let e = err(call(&ws, "read_file", json!({})));
    assert!(e.contains("missing field `path`"), "{e}");
    let e = err(call(&ws, "exec", json!({"command": "true", "timeout": -1})));
    assert!(e.contains("timeout"), "{e}");
    let e = err(call(&ws, "write_file", json!({"path": "", "content": ""})));
    assert!(e.contains("path is empty"), "{e}");
    let e = err(call(&ws, "list_files", json!({"pattern": "[a"})));
    assert!(e.contains("bad glob"), "{e}");
    assert!(ws.calls.lock().unwrap().is_empty(), "nothing ran");
}

#[test]
fn write_then_edit() {
    let ws = Fake::new();
    assert_eq!(
        ok(call(
            &ws,
            "write_file",
            json!({"path": "output/new/x.py", "content": "a = 1\nb = 1\n"})
        )),
        "created output/new/x.py (12 bytes)"
    );
    assert_eq!(ws.read("output/new/x.py"), "a = 1\nb = 1\n");
    let e = err(call(
        &ws,
        "edit_file",
        json!({"path": "output/new/x.py", "old_string": "= 1", "new_string": "= 2"}),
    ));
    assert!(e.contains("occurs 2 times"), "{e}");
    assert_eq!(ws.read("output/new/x.py"), "a = 1\nb = 1\n", "unchanged");
    let e = err(call(
        &ws,
        "edit_file",
        json!({"path": "output/new/x.py", "old_string": "c = 1", "new_string": "c = 2"}),
    ));
    assert!(e.contains("was not found"), "{e}");
    assert_eq!(
        ok(call(
            &ws,
            "edit_file",
            json!({"path": "output/new/x.py", "old_string": "b = 1", "new_string": "b = 3"})
        )),
        "replaced 1 occurrence in output/new/x.py"
    );
    assert_eq!(
        ok(call(
            &ws,
            "edit_file",
            json!({"path": "output/new/x.py", "old_string": " = ", "new_string": "=", "replace_all": true})
        )),
        "replaced 2 occurrences in output/new/x.py"
    );
    assert_eq!(ws.read("output/new/x.py"), "a=1\nb=3\n");
    assert_eq!(
        ok(call(
            &ws,
            "write_file",
            json!({"path": "output/new/x.py", "content": ""})
        )),
        "wrote output/new/x.py (0 bytes)"
    );
}

#[test]
fn refusals_name_the_rule_and_missing_names_do_not() {
    let mut ws = Fake::new();
    ws.refuse = vec![
        ("src/main.py", "tee: src/main.py: Permission denied\n"),
        (
            "/workspace/cert.pem",
            "sed: can't read /workspace/cert.pem: Permission denied\n",
        ),
        ("/etc/passwd", "tee: /etc/passwd: Read-only file system\n"),
        ("output/x", "tee: output/x: Permission denied\n"),
        (".env", "sed: can't read .env: No such file or directory\n"),
        ("output/big", "tee: output/big: No space left on device\n"),
    ];
    let e = err(call(
        &ws,
        "write_file",
        json!({"path": "src/main.py", "content": "x"}),
    ));
    assert_eq!(
        e,
        "permission denied: cannot write src/main.py: the sandbox's policy gives it `read` \
         (rule #0 \"**\" (glob read, priority 0))"
    );
    let e = err(call(
        &ws,
        "read_file",
        json!({"path": "/workspace/cert.pem"}),
    ));
    assert!(
        e.contains("gives it `view`") && e.contains("\"**/*.pem\""),
        "{e}"
    );
    let e = err(call(
        &ws,
        "write_file",
        json!({"path": "/etc/passwd", "content": "x"}),
    ));
    assert!(e.contains("outside the project"), "{e}");
    // Writable by the rules: the raw reason, no rule blamed.
    let e = err(call(
        &ws,
        "write_file",
        json!({"path": "output/x", "content": "x"}),
    ));
    assert_eq!(
        e,
        "permission denied: cannot write output/x: tee: output/x: Permission denied"
    );
    assert_eq!(
        err(call(&ws, "read_file", json!({"path": ".env"}))),
        "not found: .env"
    );
    let e = err(call(
        &ws,
        "write_file",
        json!({"path": "output/big", "content": "x"}),
    ));
    assert!(e.contains("disk quota"), "{e}");
}

#[test]
fn list_and_search() {
    let ws = Fake::new();
    ws.file("src/a.py", "def main():\n    return 42\n");
    ws.file("src/deep/b.py", "x = 'main'\n");
    ws.file("README.md", "# main project\n");
    ws.file(".git/config", "main\n");
    assert_eq!(
        ok(call(&ws, "list_files", json!({}))),
        "README.md\nsrc/\nsrc/a.py\nsrc/deep/\nsrc/deep/b.py"
    );
    assert_eq!(
        ok(call(&ws, "list_files", json!({"pattern": "*.py"}))),
        "src/a.py\nsrc/deep/b.py"
    );
    assert_eq!(
        ok(call(
            &ws,
            "list_files",
            json!({"path": "src", "pattern": "*.py", "limit": 1})
        )),
        "a.py\n[1 more not shown: narrow the path or pattern]"
    );
    assert!(err(call(&ws, "list_files", json!({"path": "nope"}))).starts_with("not found"));
    assert_eq!(
        ok(call(
            &ws,
            "search",
            json!({"pattern": "ma[i]n", "glob": "*.py"})
        )),
        "./src/a.py:1: def main():\n./src/deep/b.py:1: x = 'main'"
    );
    assert_eq!(
        ok(call(
            &ws,
            "search",
            json!({"pattern": "MAIN PROJECT", "ignore_case": true})
        )),
        "./README.md:1: # main project"
    );
    assert_eq!(
        ok(call(&ws, "search", json!({"pattern": "absent"}))),
        "no matches"
    );
    let e = err(call(&ws, "search", json!({"pattern": "("})));
    assert!(e.contains("search failed"), "{e}");
    assert!(
        err(call(&ws, "search", json!({"pattern": "x", "path": "nope"}))).starts_with("not found")
    );
}

#[test]
fn exec_reports_exit_code_and_streams() {
    let ws = Fake::new();
    let o = call(
        &ws,
        "exec",
        json!({"command": "echo out; echo err >&2; exit 3"}),
    );
    assert!(!o.is_error);
    assert_eq!(o.text, "out\n[stderr]\nerr\n[exit code 3]");
    assert_eq!(o.structured.unwrap()["exit_code"], 3);
    let calls = ws.calls.lock().unwrap();
    assert!(calls[0].env.is_empty() && calls[0].timeout.is_none());
}

#[test]
fn review_tools_pass_through() {
    let ws = Fake::new();
    let o = ok(call(&ws, "checkpoint", json!({"label": "before"})));
    assert!(o.contains("cp-1") && o.contains("before"), "{o}");
    assert_eq!(
        err(call(&ws, "restore", json!({"checkpoint": "cp-9"}))),
        "not found: checkpoint cp-9"
    );
    assert_eq!(ok(call(&ws, "diff", json!({}))), "no changes");
    assert!(err(call(&ws, "changes", json!({"x": 1}))).contains("invalid arguments for changes"));
}

#[test]
fn paths_map_into_the_project() {
    let view = PolicyView {
        sandbox_id: String::new(),
        roots: vec!["/home/me/proj".to_owned(), "/workspace".to_owned()],
        policy: Arc::new(Policy::compile(Vec::new()).unwrap()),
        network: Value::Null,
    };
    let rel = |p: &str| in_project(&view, p).map(|s| s.as_str().to_owned());
    assert_eq!(rel("src/a").as_deref(), Some("/src/a"));
    assert_eq!(rel("/workspace/src/a").as_deref(), Some("/src/a"));
    assert_eq!(rel("/home/me/proj").as_deref(), Some("/"));
    assert_eq!(rel("/home/me/proj/./x/../y").as_deref(), Some("/y"));
    assert_eq!(rel("/home/me/project2/x"), None);
    assert_eq!(rel("/etc/passwd"), None);
    assert_eq!(rel("../outside"), None);
}

#[test]
fn errno_texts() {
    assert_eq!(
        errno_of("sh: 1: cannot create x: Directory nonexistent"),
        Errno::NotFound
    );
    assert_eq!(
        errno_of("mkdir: cannot create directory 'a': Permission denied"),
        Errno::Denied
    );
    assert_eq!(errno_of("tee: x: Operation not permitted"), Errno::Denied);
    assert_eq!(
        errno_of("sed: couldn't edit x: Not a directory"),
        Errno::NotDir
    );
    assert_eq!(errno_of("weird"), Errno::Other);
}

#[test]
fn the_audited_command_names_the_tool_and_its_arguments() {
    let ws = Fake::new();
    ws.file("a b'c", "x\n");
    assert_eq!(ok(call(&ws, "read_file", json!({"path": "a b'c"}))), "x\n");
    let calls = ws.calls.lock().unwrap();
    assert!(
        calls[0]
            .command
            .starts_with(": agentfense-mcp read_file AF_P='a b'\\''c' AF_FROM='1' AF_TO='$'\n"),
        "{}",
        calls[0].command
    );
}

#[test]
fn a_path_cannot_spell_its_own_refusal() {
    // The agent's path comes before the reason: only the reason counts.
    assert_eq!(
        errno_of("tee: ro/Permission denied/xxxx: File name too long\n"),
        Errno::Other
    );
    assert_eq!(
        errno_of("sed: can't read x: Permission denied: No such file or directory"),
        Errno::NotFound
    );
}
