//! The review API (`agentfense.v1.Review`) over REST against a real server: a manual-publish
//! sandbox's changes listed path by path, its diff applied with `git apply` to a copy of the
//! codebase, partial all-or-nothing apply with conflicts and expected bases, discard,
//! checkpoints (manual, automatic, on a stopped sandbox), the audit trail, and what a sandbox
//! token may and may not do.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use super::server::{Server, privileged};
use super::util::{outcome, write_tree};

/// The labels of a sandbox whose changes stay pending until applied.
const MANUAL: &str = "agentfense.publish=manual";
const AUTO_CHECKPOINT: &str = "agentfense.checkpoint=auto";
const AUTH: &str = "auth:\n  enabled: true\n";

/// The tools these tests drive besides the server (None: all there).
fn tools() -> Option<String> {
    let missing: Vec<&str> = ["curl", "git", "sha256sum"]
        .into_iter()
        .filter(|t| {
            !Command::new(t)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    (!missing.is_empty()).then(|| format!("needs {}", missing.join(", ")))
}

fn ready(test: &str) -> bool {
    privileged(test) && agentfense_testsupport::require(test, tools())
}

/// A client command against `server`, with `key` as `AGENTFENSE_API_KEY` when given.
pub(super) fn cli(server: &Server, key: Option<&str>, args: &[&str]) -> (i32, String, String) {
    // Options go before a `--`, after which everything is the command.
    let split = args.iter().position(|a| *a == "--").unwrap_or(args.len());
    let mut c = Command::new(env!("CARGO_BIN_EXE_agentfense"));
    c.args(&args[..split])
        .args(["--endpoint", &server.grpc])
        .args(&args[split..])
        .env_remove("AGENTFENSE_API_KEY")
        .env_remove("RUST_LOG");
    if let Some(k) = key {
        c.env("AGENTFENSE_API_KEY", k);
    }
    outcome(c.output().unwrap())
}

/// Runs `command` in the sandbox; asserts success and returns stdout.
fn exec(server: &Server, key: Option<&str>, sb: &str, command: &str) -> String {
    let (code, out, err) = cli(server, key, &["exec", sb, "--", command]);
    assert_eq!(code, 0, "exec {command:?}: {out}{err}");
    out
}

/// An HTTP answer.
struct Resp {
    status: u16,
    headers: String,
    body: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }

    /// The JSON body, asserting `status`.
    fn expect(&self, status: u16, what: &str) -> Value {
        assert_eq!(self.status, status, "{what}: {}", self.body);
        self.json()
    }

    /// Asserts an error with this HTTP status and gRPC code; returns its message.
    fn error(&self, status: u16, code: i64, what: &str) -> String {
        let v = self.expect(status, what);
        assert_eq!(v["code"], code, "{what}: {v}");
        assert!(v["details"].is_array(), "{what}: {v}");
        v["message"].as_str().unwrap().to_owned()
    }

    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }
}

/// One REST request with curl (`body` as JSON, `token` as a bearer credential).
fn http(
    server: &Server,
    method: &str,
    path: &str,
    body: Option<&Value>,
    token: Option<&str>,
) -> Resp {
    let base = if server.http.starts_with("http") {
        server.http.clone()
    } else {
        format!("http://{}", server.http)
    };
    let mut c = Command::new("curl");
    c.args(["-s", "-S", "-g", "-D", "-", "-X", method]);
    if let Some(t) = token {
        c.args(["-H", &format!("authorization: Bearer {t}")]);
    }
    if body.is_some() {
        c.args([
            "-H",
            "content-type: application/json",
            "--data-binary",
            "@-",
        ]);
    }
    c.arg(format!("{base}{path}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("run curl");
    {
        let mut stdin = child.stdin.take().unwrap();
        if let Some(b) = body {
            stdin.write_all(b.to_string().as_bytes()).unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "curl {method} {path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let raw = String::from_utf8(out.stdout).expect("a UTF-8 answer");
    let (headers, body) = raw.split_once("\r\n\r\n").expect("headers and a body");
    let status = headers
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {headers}"));
    Resp {
        status,
        headers: headers.to_owned(),
        body: body.to_owned(),
    }
}

fn get(server: &Server, path: &str) -> Resp {
    http(server, "GET", path, None, None)
}

fn post(server: &Server, path: &str, body: Value) -> Resp {
    http(server, "POST", path, Some(&body), None)
}

/// Lower-case hex SHA-256 of `bytes` (by `sha256sum`).
fn sha256(bytes: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// A codebase holding `files` (written into its directory on the host before any sandbox
/// takes it) and a started full-access sandbox on it with `labels`. Returns (codebase id,
/// sandbox id, the codebase's directory on the host).
fn sandbox_on(
    server: &Server,
    key: Option<&str>,
    files: &[(&str, &str)],
    labels: &[&str],
) -> (String, String, PathBuf) {
    let (code, cb, err) = cli(server, key, &["codebase", "create", "review"]);
    assert_eq!(code, 0, "{err}");
    let cb = cb.trim().to_owned();
    let dir = server.data_dir.join("codebases").join(&cb);
    assert!(dir.is_dir(), "{}", dir.display());
    write_tree(&dir, files);
    let mut args = vec![
        "sandbox",
        "create",
        &cb,
        "--start",
        "--preset",
        "full-access",
    ];
    for l in labels {
        args.extend(["--label", l]);
    }
    let (code, sb, err) = cli(server, key, &args);
    assert_eq!(code, 0, "{err}");
    (cb, sb.trim().to_owned(), dir)
}

/// Every entry under the current directory but `.git`, sorted: a directory by name, a
/// symlink with its target, a file with its permission bits and SHA-256.
const TREE: &str = r#"find . -path ./.git -prune -o -print | LC_ALL=C sort | while IFS= read -r p; do
  if [ -L "$p" ]; then echo "$p -> $(readlink "$p")"
  elif [ -d "$p" ]; then echo "$p/"
  else echo "$p $(stat -c %a "$p") $(sha256sum < "$p" | cut -d' ' -f1)"; fi
done"#;

/// [`TREE`] of a directory on the host.
fn host_tree(dir: &Path) -> String {
    let out = Command::new("sh")
        .args(["-c", TREE])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The changes listing as `path -> change`.
fn changes(server: &Server, sb: &str, query: &str) -> (Vec<Value>, Value) {
    let v = get(server, &format!("/v1/sandboxes/{sb}/changes{query}"))
        .expect(200, &format!("changes{query}"));
    (v["changes"].as_array().unwrap().clone(), v)
}

fn change<'a>(list: &'a [Value], path: &str) -> &'a Value {
    list.iter()
        .find(|c| c["path"] == path)
        .unwrap_or_else(|| panic!("{path} is not listed: {list:#?}"))
}

fn paths_of(list: &[Value]) -> Vec<String> {
    let mut v: Vec<String> = list
        .iter()
        .map(|c| c["path"].as_str().unwrap().to_owned())
        .collect();
    v.sort();
    v
}

fn strings(v: &Value) -> Vec<String> {
    let mut s: Vec<String> = v
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_str().unwrap().to_owned())
        .collect();
    s.sort();
    s
}

/// Audit events of `sb` named `event` (the server must have stopped, so that all are written).
fn audited(data: &Path, event: &str, sb: &str) -> Vec<Value> {
    let audit = std::fs::read_to_string(data.join("audit.jsonl")).unwrap();
    let found: Vec<Value> = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event"] == event && v.to_string().contains(sb))
        .collect();
    assert!(!found.is_empty(), "no {event} event of {sb} in:\n{audit}");
    found
}

#[test]
fn review_over_rest_round_trip() {
    let test = "review_over_rest_round_trip";
    if !ready(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut server = Server::start(&data);
    let main_py = "print('hello')\nprint('two')\n";
    let (_, sb, dir) = sandbox_on(
        &server,
        None,
        &[
            ("README.md", "# demo\n"),
            ("src/main.py", main_py),
            ("src/old.txt", "obsolete\n"),
            ("run.sh", "#!/bin/sh\necho run\n"),
            ("keep.txt", "unchanged\n"),
        ],
        &[MANUAL],
    );
    let base_tree = host_tree(&dir);
    // Nothing changed yet.
    let (list, v) = changes(&server, &sb, "");
    assert!(list.is_empty(), "{v}");
    assert_eq!(
        (v["total"].as_i64(), v["truncated"].as_bool()),
        (Some(0), Some(false))
    );
    let d = get(&server, &format!("/v1/sandboxes/{sb}/diff"));
    assert_eq!((d.status, d.body.as_str()), (200, ""), "{}", d.body);

    exec(&server, None, &sb, "echo \"print('three')\" >> src/main.py");
    exec(
        &server,
        None,
        &sb,
        "mkdir -p docs/guide && printf 'new\\n' > docs/guide/intro.md",
    );
    exec(&server, None, &sb, "rm src/old.txt");
    exec(&server, None, &sb, "chmod +x run.sh");
    exec(
        &server,
        None,
        &sb,
        "(printf '\\000'; head -c 3000 /dev/urandom) > bin.dat",
    );
    exec(&server, None, &sb, "ln -s src/main.py link");

    let (list, v) = changes(&server, &sb, "");
    let files: Vec<String> = paths_of(&list)
        .into_iter()
        .filter(|p| !p.starts_with("docs") || p.ends_with(".md"))
        .collect();
    assert_eq!(
        files,
        [
            "bin.dat",
            "docs/guide/intro.md",
            "link",
            "run.sh",
            "src/main.py",
            "src/old.txt"
        ],
        "{v:#}"
    );
    assert_eq!(v["total"].as_u64(), Some(list.len() as u64), "{v:#}");
    assert_eq!(v["truncated"], false);
    // New directories, if listed, are added directories.
    for c in list.iter().filter(|c| {
        c["path"]
            .as_str()
            .is_some_and(|p| p == "docs" || p == "docs/guide")
    }) {
        assert_eq!(
            (&c["status"], &c["kind"]),
            (&json!("added"), &json!("directory")),
            "{c}"
        );
    }

    let modified = change(&list, "src/main.py");
    let new_main = format!("{main_py}print('three')\n");
    assert_eq!(modified["status"], "modified", "{modified}");
    assert_eq!(modified["kind"], "file");
    assert_eq!(modified["oldKind"], "file");
    assert_eq!(modified["baseSha256"], sha256(main_py.as_bytes()));
    assert_eq!(modified["sha256"], sha256(new_main.as_bytes()));
    assert_eq!(modified["size"], new_main.len());
    assert_eq!(
        (&modified["binary"], &modified["baseMoved"]),
        (&json!(false), &json!(false))
    );

    let added = change(&list, "docs/guide/intro.md");
    assert_eq!(added["status"], "added", "{added}");
    assert_eq!(added["oldKind"], "", "{added}");
    assert_eq!(added["baseSha256"], "", "{added}");
    assert_eq!(added["sha256"], sha256(b"new\n"));

    let deleted = change(&list, "src/old.txt");
    assert_eq!(deleted["status"], "deleted", "{deleted}");
    assert_eq!(deleted["kind"], "file");
    assert_eq!(deleted["size"], 0);
    assert_eq!(deleted["sha256"], "");
    assert_eq!(deleted["baseSha256"], sha256(b"obsolete\n"));

    let chmod = change(&list, "run.sh");
    assert_eq!(chmod["status"], "mode_changed", "{chmod}");
    assert_eq!(
        (chmod["mode"].as_u64(), chmod["oldMode"].as_u64()),
        (Some(0o755), Some(0o644))
    );
    assert_eq!(chmod["sha256"], chmod["baseSha256"]);

    let bin = change(&list, "bin.dat");
    assert_eq!(
        (&bin["status"], &bin["binary"]),
        (&json!("added"), &json!(true)),
        "{bin}"
    );
    assert_eq!(bin["size"], 3001);

    let link = change(&list, "link");
    assert_eq!(
        (&link["status"], &link["kind"]),
        (&json!("added"), &json!("symlink")),
        "{link}"
    );
    assert_eq!(
        link["sha256"],
        sha256(b"src/main.py"),
        "a symlink's digest is its target's"
    );

    // Path globs select (and everything below a match); a limit truncates all but deletions.
    let (src, _) = changes(&server, &sb, "?path=src/**");
    assert_eq!(paths_of(&src), ["src/main.py", "src/old.txt"]);
    let (two, _) = changes(&server, &sb, "?path=link&path=docs");
    assert!(
        paths_of(&two).contains(&"link".to_owned())
            && paths_of(&two).contains(&"docs/guide/intro.md".to_owned())
            && !paths_of(&two).contains(&"run.sh".to_owned()),
        "{two:#?}"
    );
    let (few, v) = changes(&server, &sb, "?limit=1");
    assert_eq!(v["truncated"], true, "{v:#}");
    assert_eq!(v["total"].as_u64(), Some(list.len() as u64), "{v:#}");
    assert!(
        few.iter().filter(|c| c["status"] != "deleted").count() <= 1
            && few.iter().any(|c| c["path"] == "src/old.txt"),
        "{few:#?}"
    );
    let bad = get(&server, &format!("/v1/sandboxes/{sb}/changes?path=[oops"));
    bad.error(400, 3, "a broken glob");

    // The diff applies with git to a copy of the codebase and gives the sandbox's tree.
    let d = get(&server, &format!("/v1/sandboxes/{sb}/diff"));
    assert_eq!(d.status, 200, "{}", d.body);
    assert!(
        d.header("content-type")
            .is_some_and(|t| t.starts_with("text/x-diff")),
        "{}",
        d.headers
    );
    assert_eq!(d.header("x-agentfense-truncated"), None, "{}", d.headers);
    assert!(d.body.contains("GIT binary patch"), "{}", d.body);
    let copy = tmp.path().join("copy");
    let st = Command::new("cp")
        .arg("-a")
        .arg(&dir)
        .arg(&copy)
        .status()
        .unwrap();
    assert!(st.success());
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .args(args)
            .current_dir(&copy)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}\ndiff:\n{}",
            String::from_utf8_lossy(&out.stderr),
            d.body
        );
    };
    let patch = tmp.path().join("changes.diff");
    std::fs::write(&patch, &d.body).unwrap();
    let patch = patch.to_str().unwrap();
    git(&["init", "-q"]);
    git(&["apply", "--check", "--binary", patch]);
    git(&["apply", "--binary", patch]);
    let seen = exec(&server, None, &sb, TREE);
    assert_eq!(
        host_tree(&copy),
        seen,
        "the patched copy differs from the sandbox"
    );
    // A narrower diff covers only what it selects.
    let d = get(&server, &format!("/v1/sandboxes/{sb}/diff?path=src/**"));
    assert_eq!(d.status, 200, "{}", d.body);
    assert!(
        d.body.contains("src/main.py")
            && d.body.contains("src/old.txt")
            && !d.body.contains("bin.dat"),
        "{}",
        d.body
    );
    // A cap leaves whole files out and says so.
    let d = get(&server, &format!("/v1/sandboxes/{sb}/diff?max_bytes=64"));
    assert_eq!(d.status, 200, "{}", d.body);
    assert_eq!(
        d.header("x-agentfense-truncated").as_deref(),
        Some("true"),
        "{}",
        d.headers
    );

    // Nothing reached the codebase.
    assert_eq!(host_tree(&dir), base_tree);
    let missing = get(&server, "/v1/sandboxes/sb_0000000000000000/changes");
    missing.error(404, 5, "an unknown sandbox");
    server.stop();
}

#[test]
fn partial_apply_conflict_and_discard() {
    let test = "partial_apply_conflict_and_discard";
    if !ready(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut server = Server::start(&data);
    let (_, sb, dir) = sandbox_on(
        &server,
        None,
        &[
            ("src/a.py", "a = 1\n"),
            ("src/lib/b.py", "b = 1\n"),
            ("notes.txt", "notes v1\n"),
            ("conf.toml", "x = 1\n"),
        ],
        &[MANUAL],
    );
    let read = |rel: &str| std::fs::read_to_string(dir.join(rel)).ok();
    exec(
        &server,
        None,
        &sb,
        "echo 'a = 2' > src/a.py; echo 'c = 3' > src/lib/c.py; echo 'notes v2' > notes.txt; \
         echo top > top.txt; echo 'x = 2' > conf.toml",
    );
    let (list, _) = changes(&server, &sb, "");
    assert_eq!(
        paths_of(&list),
        [
            "conf.toml",
            "notes.txt",
            "src/a.py",
            "src/lib/c.py",
            "top.txt"
        ]
    );

    // Only src/ is written.
    let url = format!("/v1/sandboxes/{sb}/changes:apply");
    let r = post(&server, &url, json!({"paths": ["src/**"]})).expect(200, "apply src/**");
    assert_eq!(strings(&r["written"]), ["src/a.py", "src/lib/c.py"], "{r}");
    assert_eq!(
        (strings(&r["deleted"]).len(), strings(&r["failed"]).len()),
        (0, 0),
        "{r}"
    );
    assert_eq!(read("src/a.py").as_deref(), Some("a = 2\n"));
    assert_eq!(read("src/lib/c.py").as_deref(), Some("c = 3\n"));
    assert_eq!(read("src/lib/b.py").as_deref(), Some("b = 1\n"));
    assert_eq!(read("notes.txt").as_deref(), Some("notes v1\n"));
    assert_eq!(read("top.txt"), None);
    let (list, _) = changes(&server, &sb, "");
    assert_eq!(
        paths_of(&list),
        ["conf.toml", "notes.txt", "top.txt"],
        "applied changes are no longer pending"
    );

    // The codebase moves under a pending change: that path cannot be applied, and nothing
    // selected with it is written.
    std::fs::write(dir.join("notes.txt"), "notes v1, edited on the host\n").unwrap();
    let (list, _) = changes(&server, &sb, "");
    assert_eq!(change(&list, "notes.txt")["baseMoved"], true, "{list:#?}");
    assert_eq!(change(&list, "top.txt")["baseMoved"], false, "{list:#?}");
    let r = post(&server, &url, json!({"paths": ["notes.txt", "top.txt"]}));
    let msg = r.error(400, 9, "apply over a moved base");
    assert!(
        msg.contains("notes.txt") && !msg.contains("top.txt"),
        "{msg}"
    );
    assert_eq!(read("top.txt"), None, "a refused apply wrote a file");
    assert_eq!(
        read("notes.txt").as_deref(),
        Some("notes v1, edited on the host\n")
    );
    // Applying everything is refused the same way.
    post(&server, &url, json!({})).error(400, 9, "apply all over a moved base");
    assert_eq!(read("top.txt"), None);
    assert_eq!(read("conf.toml").as_deref(), Some("x = 1\n"));

    // Expected bases: a wrong one is a conflict, the reviewed one applies.
    let base = change(&list, "conf.toml")["baseSha256"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(base, sha256(b"x = 1\n"));
    let wrong = sha256(b"something else\n");
    let r = post(
        &server,
        &url,
        json!({"paths": ["conf.toml", "top.txt"], "expected": {"conf.toml": wrong, "top.txt": "absent"}}),
    );
    let msg = r.error(400, 9, "a wrong expected base");
    assert!(msg.contains("conf.toml") && msg.contains(&wrong), "{msg}");
    assert_eq!(
        (read("conf.toml").as_deref(), read("top.txt")),
        (Some("x = 1\n"), None)
    );
    // `expected` must name selected pending paths.
    let r = post(
        &server,
        &url,
        json!({"paths": ["top.txt"], "expected": {"conf.toml": base}}),
    );
    r.error(400, 3, "expected names an unselected path");
    let r = post(
        &server,
        &url,
        json!({"paths": ["conf.toml", "top.txt"], "expected": {"conf.toml": base, "top.txt": "absent"}}),
    )
    .expect(200, "apply with the reviewed bases");
    assert_eq!(strings(&r["written"]), ["conf.toml", "top.txt"], "{r}");
    assert_eq!(read("conf.toml").as_deref(), Some("x = 2\n"));
    assert_eq!(read("top.txt").as_deref(), Some("top\n"));

    // Discarding the conflicting change shows the codebase's content at once.
    assert_eq!(exec(&server, None, &sb, "cat notes.txt"), "notes v2\n");
    let r = post(
        &server,
        &format!("/v1/sandboxes/{sb}/changes:discard"),
        json!({"paths": ["notes.txt"]}),
    )
    .expect(200, "discard");
    assert_eq!(strings(&r["discarded"]), ["notes.txt"], "{r}");
    assert_eq!(
        exec(&server, None, &sb, "cat notes.txt"),
        "notes v1, edited on the host\n"
    );
    let (list, v) = changes(&server, &sb, "");
    assert!(list.is_empty(), "{v:#}");
    // Nothing left to apply: an empty report.
    let r = post(&server, &url, json!({})).expect(200, "apply nothing");
    assert_eq!(
        strings(&r["written"]).len() + strings(&r["deleted"]).len(),
        0,
        "{r}"
    );
    // A malformed body is a 400, not a silent apply-all.
    let r = post(&server, &url, json!({"path": ["conf.toml"]}));
    r.error(400, 3, "an unknown field");
    let r = post(&server, &url, json!({"expected": {"conf.toml": "not-hex"}}));
    r.error(400, 3, "a malformed sha256");

    server.stop();
    audited(&data, "changes_applied", &sb);
    audited(&data, "changes_discarded", &sb);
}

/// Checkpoint `id`'s URL.
fn cp_url(sb: &str, id: &str) -> String {
    format!("/v1/sandboxes/{sb}/checkpoints/{id}")
}

fn checkpoints(server: &Server, sb: &str) -> Vec<Value> {
    get(server, &format!("/v1/sandboxes/{sb}/checkpoints")).expect(200, "list checkpoints")
        ["checkpoints"]
        .as_array()
        .unwrap()
        .clone()
}

fn checkpoint(server: &Server, sb: &str, label: &str) -> String {
    let v = post(
        server,
        &format!("/v1/sandboxes/{sb}/checkpoints"),
        json!({ "label": label }),
    )
    .expect(200, "create a checkpoint");
    assert_eq!(v["label"], label, "{v}");
    assert!(v["createdAt"].is_string(), "{v}");
    assert!(v["paths"].is_number() && v["bytes"].is_number(), "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("cp-"), "{v}");
    id
}

#[test]
fn checkpoints_over_rest() {
    let test = "checkpoints_over_rest";
    if !ready(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut server = Server::start(&data);
    let (_, sb, dir) = sandbox_on(&server, None, &[("state.txt", "base\n")], &[MANUAL]);

    exec(&server, None, &sb, "echo one > state.txt");
    let cp1 = checkpoint(&server, &sb, "first");
    exec(
        &server,
        None,
        &sb,
        "echo two > state.txt; echo extra > extra.txt",
    );
    let cp2 = checkpoint(&server, &sb, "second");
    assert_ne!(cp1, cp2);
    exec(&server, None, &sb, "echo three > state.txt");
    let list = checkpoints(&server, &sb);
    let ids: Vec<&str> = list.iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [cp1.as_str(), cp2.as_str()], "oldest first: {list:#?}");
    assert_eq!(
        (&list[0]["label"], &list[1]["label"]),
        (&json!("first"), &json!("second"))
    );

    // A dry run says what a restore would change, and changes nothing.
    let restore = format!("{}:restore", cp_url(&sb, &cp1));
    let v = post(&server, &restore, json!({"dryRun": true})).expect(200, "dry run");
    assert_eq!(v["restored"], false, "{v}");
    let would = v["changes"].as_array().unwrap();
    assert_eq!(change(would, "state.txt")["status"], "modified", "{v:#}");
    assert_eq!(
        change(would, "state.txt")["sha256"],
        sha256(b"one\n"),
        "{v:#}"
    );
    assert_eq!(change(would, "extra.txt")["status"], "deleted", "{v:#}");
    assert_eq!(
        exec(&server, None, &sb, "cat state.txt extra.txt"),
        "three\nextra\n"
    );

    // The restore brings back the first checkpoint's state.
    let v = post(&server, &restore, json!({})).expect(200, "restore");
    assert_eq!(v["restored"], true, "{v}");
    assert_eq!(
        exec(&server, None, &sb, "cat state.txt; ls"),
        "one\nstate.txt\n"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("state.txt")).unwrap(),
        "base\n"
    );

    // Diffs between states.
    let d = get(&server, &format!("{}/diff?to={cp2}", cp_url(&sb, &cp1)));
    assert_eq!(d.status, 200, "{}", d.body);
    assert!(
        d.body.contains("-one") && d.body.contains("+two") && d.body.contains("extra.txt"),
        "{}",
        d.body
    );
    let v = get(
        &server,
        &format!("{}/diff?to={cp2}&format=json", cp_url(&sb, &cp1)),
    )
    .expect(200, "diff as json");
    assert_eq!(
        paths_of(v["changes"].as_array().unwrap()),
        ["extra.txt", "state.txt"],
        "{v:#}"
    );
    assert!(v["diff"].as_str().unwrap().contains("+two"), "{v:#}");
    let d = get(&server, &format!("{}/diff?to=current", cp_url(&sb, &cp1)));
    assert_eq!(
        (d.status, d.body.as_str()),
        (200, ""),
        "restored: the same as now"
    );
    let d = get(&server, &format!("{}/diff?to=base", cp_url(&sb, &cp1)));
    assert_eq!(d.status, 200, "{}", d.body);
    assert!(
        d.body.contains("-one") && d.body.contains("+base"),
        "{}",
        d.body
    );

    // Deleting the second leaves the first.
    let r = http(&server, "DELETE", &cp_url(&sb, &cp2), None, None);
    assert_eq!(r.status, 200, "{}", r.body);
    let list = checkpoints(&server, &sb);
    assert_eq!(list.len(), 1, "{list:#?}");
    assert_eq!(list[0]["id"], cp1.as_str());

    // Unknown checkpoints are 404; what is no checkpoint id at all is 400.
    post(
        &server,
        &format!("{}:restore", cp_url(&sb, &cp2)),
        json!({}),
    )
    .error(404, 5, "restoring a deleted checkpoint");
    post(
        &server,
        &format!("{}:restore", cp_url(&sb, "cp-999999")),
        json!({"dryRun": true}),
    )
    .error(404, 5, "restoring an unknown checkpoint");
    get(
        &server,
        &format!("{}/diff?to=current", cp_url(&sb, "cp-999999")),
    )
    .error(404, 5, "diff of an unknown checkpoint");
    get(&server, &format!("{}/diff?to=cp-999999", cp_url(&sb, &cp1))).error(
        404,
        5,
        "diff to an unknown checkpoint",
    );
    let r = http(&server, "DELETE", &cp_url(&sb, "cp-999999"), None, None);
    r.error(404, 5, "deleting an unknown checkpoint");
    post(
        &server,
        &format!("{}:restore", cp_url(&sb, "latest")),
        json!({}),
    )
    .error(400, 3, "no checkpoint id");

    // A stopped sandbox answers too, and a restore there is what it starts with.
    exec(&server, None, &sb, "echo four > state.txt");
    let (code, _, err) = cli(&server, None, &["sandbox", "stop", &sb]);
    assert_eq!(code, 0, "{err}");
    let (list, v) = changes(&server, &sb, "");
    assert_eq!(paths_of(&list), ["state.txt"], "{v:#}");
    assert_eq!(change(&list, "state.txt")["sha256"], sha256(b"four\n"));
    let cps = checkpoints(&server, &sb);
    assert_eq!(cps.len(), 1, "{cps:#?}");
    let stopped_cp = checkpoint(&server, &sb, "while stopped");
    let v = post(&server, &restore, json!({})).expect(200, "restore while stopped");
    assert_eq!(v["restored"], true, "{v}");
    let (code, _, err) = cli(&server, None, &["sandbox", "start", &sb]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(exec(&server, None, &sb, "cat state.txt"), "one\n");
    // The checkpoint taken while stopped holds what was there then.
    let d = get(
        &server,
        &format!("{}/diff?to=current", cp_url(&sb, &stopped_cp)),
    );
    assert_eq!(d.status, 200, "{}", d.body);
    assert!(
        d.body.contains("-four") && d.body.contains("+one"),
        "{}",
        d.body
    );

    // Automatic checkpoints: one before each command, labelled with it.
    let (_, auto, _) = sandbox_on(
        &server,
        None,
        &[("a.txt", "a0\n")],
        &[MANUAL, AUTO_CHECKPOINT],
    );
    assert!(checkpoints(&server, &auto).is_empty());
    exec(&server, None, &auto, "echo a1 > a.txt");
    exec(&server, None, &auto, "echo b > b.txt");
    let list = checkpoints(&server, &auto);
    let labels: Vec<&str> = list.iter().map(|c| c["label"].as_str().unwrap()).collect();
    assert_eq!(
        labels,
        ["auto: echo a1 > a.txt", "auto: echo b > b.txt"],
        "{list:#?}"
    );
    // Back to before the last command.
    let last = list[1]["id"].as_str().unwrap();
    post(
        &server,
        &format!("{}:restore", cp_url(&auto, last)),
        json!({}),
    )
    .expect(200, "restore auto");
    assert_eq!(exec(&server, None, &auto, "cat a.txt; ls"), "a1\na.txt\n");
    // That command got its own checkpoint too.
    assert_eq!(checkpoints(&server, &auto).len(), 3);

    server.stop();
    let created = audited(&data, "checkpoint_created", &sb);
    assert!(created.len() >= 3, "{created:#?}");
    audited(&data, "checkpoint_restored", &sb);
    audited(&data, "checkpoint_created", &auto);
}

/// `agentfense keys create` on the server's data directory; returns the key.
pub(super) fn create_key(data: &Path, tenant: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_agentfense"))
        .args(["keys", "create", "--tenant", tenant, "--data-dir"])
        .arg(data)
        .env_remove("AGENTFENSE_API_KEY")
        .output()
        .unwrap();
    let (code, out, err) = outcome(out);
    assert_eq!(code, 0, "{err}");
    out.trim().to_owned()
}

/// A sandbox token (the agent) may look at its changes, checkpoint, restore and discard, but
/// never apply its work to the codebase nor delete a checkpoint.
#[test]
fn a_sandbox_token_reviews_but_cannot_apply() {
    let test = "a_sandbox_token_reviews_but_cannot_apply";
    if !ready(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut server = Server::start_with(&data, AUTH);
    let key = create_key(&data, "team");
    let (_, sb, dir) = sandbox_on(&server, Some(&key), &[("f.txt", "f0\n")], &[MANUAL]);
    let (code, token, err) = cli(&server, Some(&key), &["sandbox", "token", &sb]);
    assert_eq!(code, 0, "{err}");
    let token = token.trim().to_owned();
    assert!(token.starts_with("aft_"), "{token}");
    exec(
        &server,
        Some(&token),
        &sb,
        "echo f1 > f.txt; echo g > g.txt",
    );

    let as_token = |method: &str, path: &str, body: Option<Value>| {
        http(
            &server,
            method,
            &format!("/v1/sandboxes/{sb}{path}"),
            body.as_ref(),
            Some(&token),
        )
    };
    // Without a credential: 401.
    get(&server, &format!("/v1/sandboxes/{sb}/changes")).error(401, 16, "no credential");

    let v = as_token("GET", "/changes", None).expect(200, "token lists changes");
    assert_eq!(
        paths_of(v["changes"].as_array().unwrap()),
        ["f.txt", "g.txt"],
        "{v:#}"
    );
    let d = as_token("GET", "/diff", None);
    assert!(
        d.status == 200 && d.body.contains("+f1"),
        "{} {}",
        d.status,
        d.body
    );
    let v = as_token("POST", "/checkpoints", Some(json!({"label": "agent"})))
        .expect(200, "token checkpoints");
    let cp = v["id"].as_str().unwrap().to_owned();
    as_token("GET", "/checkpoints", None).expect(200, "token lists checkpoints");
    let d = as_token("GET", &format!("/checkpoints/{cp}/diff?to=base"), None);
    assert!(
        d.status == 200 && d.body.contains("-f1"),
        "{} {}",
        d.status,
        d.body
    );
    as_token(
        "POST",
        &format!("/checkpoints/{cp}:restore"),
        Some(json!({"dryRun": true})),
    )
    .expect(200, "token restores (dry run)");
    as_token(
        "POST",
        &format!("/checkpoints/{cp}:restore"),
        Some(json!({})),
    )
    .expect(200, "token restores");
    let v = as_token(
        "POST",
        "/changes:discard",
        Some(json!({"paths": ["g.txt"]})),
    )
    .expect(200, "token discards");
    assert_eq!(strings(&v["discarded"]), ["g.txt"], "{v}");

    // Applying and deleting checkpoints are the reviewer's.
    as_token("POST", "/changes:apply", Some(json!({}))).error(403, 7, "token applies");
    assert_eq!(std::fs::read_to_string(dir.join("f.txt")).unwrap(), "f0\n");
    as_token("DELETE", &format!("/checkpoints/{cp}"), None).error(
        403,
        7,
        "token deletes a checkpoint",
    );

    // The key may.
    let v = http(
        &server,
        "POST",
        &format!("/v1/sandboxes/{sb}/changes:apply"),
        Some(&json!({})),
        Some(&key),
    )
    .expect(200, "the key applies");
    assert_eq!(strings(&v["written"]), ["f.txt"], "{v}");
    assert_eq!(std::fs::read_to_string(dir.join("f.txt")).unwrap(), "f1\n");
    let r = http(&server, "DELETE", &cp_url(&sb, &cp), None, Some(&key));
    assert_eq!(r.status, 200, "{}", r.body);
    server.stop();
}

/// The review commands against a server sandbox: `changes`, `diff` (which `git apply`
/// takes), `checkpoint`, `discard` and `apply`, in text and `--json`.
#[test]
fn review_commands_on_a_server_sandbox() {
    let test = "review_commands_on_a_server_sandbox";
    if !ready(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut server = Server::start(&tmp.path().join("data"));
    let (_, sb, dir) = sandbox_on(
        &server,
        None,
        &[("src/a.txt", "one\n"), ("notes.md", "keep\n")],
        &[MANUAL],
    );
    exec(
        &server,
        None,
        &sb,
        "echo two >> src/a.txt; echo new > src/b.txt; rm notes.md",
    );
    let (code, out, err) = cli(&server, None, &["changes", &sb]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines[0].starts_with("deleted") && lines[0].ends_with("notes.md"),
        "{out}"
    );
    assert!(
        lines[1].starts_with("modified") && lines[1].ends_with("src/a.txt"),
        "{out}"
    );
    assert!(
        lines[2].starts_with("added") && lines[2].ends_with("src/b.txt"),
        "{out}"
    );
    let (code, out, err) = cli(
        &server,
        None,
        &["changes", &sb, "--json", "--path", "src/**"],
    );
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["total"], 2, "{out}");
    // The diff applies to a copy of the codebase.
    let (code, patch, err) = cli(&server, None, &["diff", &sb]);
    assert_eq!(code, 0, "{err}");
    let copy = tmp.path().join("copy");
    write_tree(&copy, &[("src/a.txt", "one\n"), ("notes.md", "keep\n")]);
    let mut git = Command::new("git")
        .args(["apply", "--binary", "-"])
        .current_dir(&copy)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    git.stdin
        .take()
        .unwrap()
        .write_all(patch.as_bytes())
        .unwrap();
    assert!(git.wait().unwrap().success(), "{patch}");
    assert_eq!(
        std::fs::read_to_string(copy.join("src/a.txt")).unwrap(),
        "one\ntwo\n"
    );
    assert!(!copy.join("notes.md").exists());
    // Checkpoint, a change, restore.
    let (code, cp, err) = cli(
        &server,
        None,
        &["checkpoint", "create", &sb, "--label", "before"],
    );
    assert_eq!((code, cp.trim()), (0, "cp-1"), "{err}");
    exec(&server, None, &sb, "echo oops > src/a.txt");
    let (code, out, err) = cli(
        &server,
        None,
        &["checkpoint", "restore", &sb, "cp-1", "--dry-run"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("src/a.txt"), "{out}");
    assert_eq!(exec(&server, None, &sb, "cat src/a.txt"), "oops\n");
    let (code, _, err) = cli(&server, None, &["checkpoint", "restore", &sb, "cp-1"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(exec(&server, None, &sb, "cat src/a.txt"), "one\ntwo\n");
    let (code, out, err) = cli(&server, None, &["checkpoint", "ls", &sb, "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["checkpoints"][0]["label"], "before", "{out}");
    // Discard the deletion, apply the rest.
    let (code, out, err) = cli(&server, None, &["discard", &sb, "--path", "notes.md"]);
    assert_eq!((code, out.trim()), (0, "discarded  notes.md"), "{err}");
    assert_eq!(exec(&server, None, &sb, "cat notes.md"), "keep\n");
    let (code, out, err) = cli(&server, None, &["apply", &sb, "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(strings(&v["written"]), ["src/a.txt", "src/b.txt"], "{out}");
    assert_eq!(
        std::fs::read_to_string(dir.join("src/a.txt")).unwrap(),
        "one\ntwo\n"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("notes.md")).unwrap(),
        "keep\n"
    );
    let (code, out, err) = cli(&server, None, &["changes", &sb]);
    assert_eq!((code, out.as_str()), (0, ""), "{err}");
    server.stop();
}

/// The same commands on the changes `agentfense run` kept for a directory, without a
/// server; a conflict (the project edited meanwhile) applies nothing.
#[test]
fn review_commands_on_a_local_directory() {
    let test = "review_commands_on_a_local_directory";
    if !ready(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let project = tmp.path().join("project");
    write_tree(&project, &[("a.txt", "one\n"), ("b.txt", "bee\n")]);
    let data = tmp.path().join("data");
    let data_s = data.to_str().unwrap();
    let project_s = project.to_str().unwrap();
    let run = |args: &[&str]| {
        outcome(
            Command::new(env!("CARGO_BIN_EXE_agentfense"))
                .args(args)
                .env_remove("RUST_LOG")
                .output()
                .unwrap(),
        )
    };
    let (code, out, err) = run(&["changes", project_s, "--data-dir", data_s]);
    assert_ne!(code, 0, "no run kept anything yet: {out}");
    assert!(err.contains("no changes are kept"), "{err}");
    let (code, _, err) = run(&[
        "run",
        "--preset",
        "full-access",
        "--data-dir",
        data_s,
        project_s,
        "--",
        "echo two >> a.txt; echo bee2 > b.txt; echo new > c.txt",
    ]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = run(&["changes", project_s, "--data-dir", data_s, "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let list = v["changes"].as_array().unwrap();
    assert_eq!(paths_of(list), ["a.txt", "b.txt", "c.txt"], "{out}");
    let base_b = change(list, "b.txt")["baseSha256"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(base_b, sha256(b"bee\n"));
    let (code, cp, err) = run(&["checkpoint", "create", project_s, "--data-dir", data_s]);
    assert_eq!((code, cp.trim()), (0, "cp-1"), "{err}");
    // The project moves under a.txt: applying it (or everything) writes nothing.
    std::fs::write(project.join("a.txt"), "edited by the user\n").unwrap();
    let (code, _, err) = run(&["apply", project_s, "--data-dir", data_s]);
    assert_ne!(code, 0);
    assert!(
        err.contains("nothing applied") && err.contains("a.txt"),
        "{err}"
    );
    assert!(!project.join("c.txt").exists());
    // b.txt alone, with the base the review saw, applies.
    let expect = format!("b.txt={base_b}");
    let (code, out, err) = run(&[
        "apply",
        project_s,
        "--data-dir",
        data_s,
        "--path",
        "b.txt",
        "--expect",
        &expect,
    ]);
    assert_eq!((code, out.trim()), (0, "written  b.txt"), "{err}");
    assert_eq!(
        std::fs::read_to_string(project.join("b.txt")).unwrap(),
        "bee2\n"
    );
    // The diff of what is left, then discard it all.
    let (code, patch, err) = run(&["diff", project_s, "--data-dir", data_s]);
    assert_eq!(code, 0, "{err}");
    assert!(patch.contains("diff --git a/c.txt b/c.txt"), "{patch}");
    assert!(!patch.contains("b.txt"), "{patch}");
    let (code, _, err) = run(&["discard", project_s, "--data-dir", data_s]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = run(&["changes", project_s, "--data-dir", data_s]);
    assert_eq!((code, out.as_str()), (0, ""), "{err}");
    // The checkpoint still brings the run's work back.
    let (code, _, err) = run(&[
        "checkpoint",
        "restore",
        project_s,
        "cp-1",
        "--data-dir",
        data_s,
    ]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = run(&["changes", project_s, "--data-dir", data_s, "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    // b.txt's change is in the project already: only a.txt and c.txt are pending again.
    assert_eq!(
        paths_of(v["changes"].as_array().unwrap()),
        ["a.txt", "c.txt"],
        "{out}"
    );
}

/// The attack: the agent writes a placeholder where the operator later puts a private key in
/// the codebase. Its token may list and diff its changes, but never see the key the rules
/// hide (no digest, no diff); the operator's key sees the change whole.
#[test]
fn a_sandbox_token_is_never_shown_codebase_secrets() {
    let test = "a_sandbox_token_is_never_shown_codebase_secrets";
    if !ready(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut server = Server::start_with(&data, AUTH);
    let key = create_key(&data, "team");
    let (_, sb, dir) = sandbox_on(&server, Some(&key), &[("README", "hi\n")], &[MANUAL]);
    let (code, token, err) = cli(&server, Some(&key), &["sandbox", "token", &sb]);
    assert_eq!(code, 0, "{err}");
    let token = token.trim().to_owned();
    exec(
        &server,
        Some(&token),
        &sb,
        "mkdir tls && echo placeholder > tls/site.pem",
    );
    let secret = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCTOPSECRET\n-----END PRIVATE KEY-----\n";
    std::fs::create_dir_all(dir.join("tls")).unwrap();
    std::fs::write(dir.join("tls/site.pem"), secret).unwrap();
    let secret_sha = sha256(secret.as_bytes());
    let r = http(
        &server,
        "GET",
        &format!("/v1/sandboxes/{sb}/changes"),
        None,
        Some(&token),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(!r.body.contains(&secret_sha), "{}", r.body);
    let v: Value = serde_json::from_str(&r.body).unwrap();
    let pem = change(v["changes"].as_array().unwrap(), "tls/site.pem");
    assert_eq!(
        (pem["hidden"].as_bool(), pem["baseSha256"].as_str()),
        (Some(true), Some(""))
    );
    for route in ["diff", "checkpoints"] {
        if route == "checkpoints" {
            let r = http(
                &server,
                "POST",
                &format!("/v1/sandboxes/{sb}/checkpoints"),
                Some(&json!({"label": "t"})),
                Some(&token),
            );
            assert_eq!(r.status, 200, "{}", r.body);
            let r = http(
                &server,
                "GET",
                &format!("/v1/sandboxes/{sb}/checkpoints/cp-1/diff?to=base&format=json"),
                None,
                Some(&token),
            );
            assert_eq!(r.status, 200, "{}", r.body);
            assert!(
                !r.body.contains("TOPSECRET") && !r.body.contains(&secret_sha),
                "{}",
                r.body
            );
            continue;
        }
        let r = http(
            &server,
            "GET",
            &format!("/v1/sandboxes/{sb}/{route}"),
            None,
            Some(&token),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(!r.body.contains("TOPSECRET"), "{}", r.body);
    }
    // The operator (an API key) reviews the whole change.
    let r = http(
        &server,
        "GET",
        &format!("/v1/sandboxes/{sb}/diff"),
        None,
        Some(&key),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("TOPSECRET"), "{}", r.body);
    server.stop();
}

/// `agentfense apply` of a local directory judges each path by the run's rules, as
/// `run --apply` does: a private key the agent wrote (the floor never lets a sandbox write
/// key material) is refused, and nothing else is written with it.
#[test]
fn local_apply_keeps_the_runs_rules() {
    let test = "local_apply_keeps_the_runs_rules";
    if !ready(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let project = tmp.path().join("project");
    write_tree(&project, &[("a.txt", "one\n")]);
    let data = tmp.path().join("data");
    let (data_s, project_s) = (data.to_str().unwrap(), project.to_str().unwrap());
    let run = |args: &[&str]| {
        outcome(
            Command::new(env!("CARGO_BIN_EXE_agentfense"))
                .args(args)
                .env_remove("RUST_LOG")
                .output()
                .unwrap(),
        )
    };
    let (code, _, err) = run(&[
        "run",
        "--preset",
        "full-access",
        "--data-dir",
        data_s,
        project_s,
        "--",
        "printf -- '-----BEGIN PRIVATE KEY-----\\nMIIE\\n-----END PRIVATE KEY-----\\n' > k.pem; echo ok > ok.txt",
    ]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run(&["apply", project_s, "--data-dir", data_s]);
    assert_ne!(code, 0);
    assert!(
        err.contains("nothing applied") && err.contains("k.pem"),
        "{err}"
    );
    assert!(!project.join("k.pem").exists() && !project.join("ok.txt").exists());
    let (code, out, err) = run(&["apply", project_s, "--data-dir", data_s, "--path", "ok.txt"]);
    assert_eq!((code, out.trim()), (0, "written  ok.txt"), "{err}");
    assert!(!project.join("k.pem").exists());
}
