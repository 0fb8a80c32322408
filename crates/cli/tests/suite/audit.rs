//! The audit trail on a real server: rotation with one hash chain across files and across a
//! `kill -9`, `agentfense audit` queries and `--follow`, and `agentfense audit verify` finding
//! an edited record.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use super::server::{Server, privileged};
use super::util::outcome;

/// Small files: a rotation every few records.
const ROTATING: &str = "logging:\n  audit_rotate_bytes: 2000\n";

fn cli(server: &Server, args: &[&str]) -> (i32, String, String) {
    let split = args.iter().position(|a| *a == "--").unwrap_or(args.len());
    outcome(
        Command::new(env!("CARGO_BIN_EXE_agentfense"))
            .args(&args[..split])
            .args(["--endpoint", &server.grpc])
            .args(&args[split..])
            .output()
            .unwrap(),
    )
}

fn audit(data: &Path, args: &[&str]) -> (i32, String, String) {
    outcome(
        Command::new(env!("CARGO_BIN_EXE_agentfense"))
            .arg("audit")
            .args(args)
            .arg("--data-dir")
            .arg(data)
            .output()
            .unwrap(),
    )
}

fn exec(server: &Server, sb: &str, command: &str) {
    let (code, _, err) = cli(server, &["exec", sb, "--", command]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn audit_trail_rotates_chains_and_answers_queries() {
    if !privileged("audit_trail_rotates_chains_and_answers_queries") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut server = Server::start_with(&data, ROTATING);
    let (code, cb, err) = cli(&server, &["codebase", "create", "audited"]);
    assert_eq!(code, 0, "{err}");
    let (code, sb, err) = cli(
        &server,
        &[
            "sandbox",
            "create",
            cb.trim(),
            "--start",
            "--preset",
            "agent-safe",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let sb = sb.trim().to_owned();
    for i in 0..12 {
        exec(&server, &sb, &format!("echo {i}"));
    }
    // Only this sandbox's commands, in order, from every file of the trail.
    let (code, out, err) = audit(&data, &["--sandbox", &sb, "--event", "command_executed"]);
    assert_eq!(code, 0, "{err}");
    let cmds: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(cmds.len(), 12, "{out}");
    assert_eq!(cmds[11]["command"], "echo 11");
    assert!(cmds.iter().all(|c| c["sandbox_id"] == sb.as_str()));
    let files = agentfense_server::audit::files(&data.join("audit.jsonl"));
    assert!(files.len() > 2, "no rotation: {files:?}");
    // The same as OCSF events, for a SIEM.
    let (code, out, err) = audit(
        &data,
        &[
            "--sandbox",
            &sb,
            "--event",
            "command_executed",
            "--format",
            "ocsf",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let ocsf: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(ocsf.len(), 12, "{out}");
    assert_eq!(ocsf[0]["class_uid"], 1007);
    assert_eq!(ocsf[0]["metadata"]["product"]["name"], "AgentFense");
    assert!(ocsf[0]["time"].as_u64().unwrap() > 0);
    assert_eq!(ocsf[11]["unmapped"]["command"], "echo 11");
    // By tenant: every record of this server is the default tenant's (authentication off).
    let (code, out, err) = audit(
        &data,
        &["--tenant", "default", "--event", "command_executed"],
    );
    assert_eq!((code, out.lines().count()), (0, 12), "{err}");
    let (code, out, err) = audit(&data, &["--tenant", "someone-else"]);
    assert_eq!((code, out.as_str()), (0, ""), "{err}");
    // --since in the future: nothing.
    let (code, out, err) = audit(&data, &["--since", "2999-01-01T00:00:00Z"]);
    assert_eq!((code, out.as_str()), (0, ""), "{err}");
    // --follow prints what exists, then what comes.
    let mut follow = Command::new(env!("CARGO_BIN_EXE_agentfense"))
        .args([
            "audit",
            "--follow",
            "--event",
            "command_executed",
            "--sandbox",
            &sb,
        ])
        .arg("--data-dir")
        .arg(&data)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(follow.stdout.take().unwrap()).lines();
    for _ in 0..12 {
        lines.next().unwrap().unwrap();
    }
    // Enough records to rotate under the follower at least once.
    for i in 0..8 {
        exec(&server, &sb, &format!("echo followed {i}"));
    }
    for i in 0..8 {
        let l = lines.next().unwrap().unwrap();
        assert!(l.contains(&format!("echo followed {i}")), "{l}");
    }
    let _ = follow.kill();
    let _ = follow.wait();
    // A crash, then a restart: the chain goes on.
    server.kill9();
    let mut server = Server::start_with(&data, ROTATING);
    exec(&server, &sb, "echo after the crash");
    server.stop();
    let (code, out, err) = audit(&data, &["verify"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("audit trail intact"), "{out}");
    // An edited record (a command's exit code) breaks the chain at the next record.
    let files = agentfense_server::audit::files(&data.join("audit.jsonl"));
    let victim = files
        .iter()
        .find(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .filter(|l| l.contains("\"command_executed\""))
                .count()
                >= 2
        })
        .expect("a file with two commands");
    let text = std::fs::read_to_string(victim).unwrap();
    let edited = text.replacen("\"exit_code\":0", "\"exit_code\":1", 1);
    assert_ne!(text, edited);
    std::fs::write(victim, edited).unwrap();
    let (code, out, _) = audit(&data, &["verify", "--json"]);
    assert_eq!(code, 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["problems"].as_array().unwrap().len(), 1, "{out}");
}

/// `logging.format: json`: every line the server logs is one JSON object.
#[test]
fn json_logs_are_one_object_per_line() {
    if !privileged("json_logs_are_one_object_per_line") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut server = Server::start_with(&data, "logging:\n  format: json\n");
    let (code, _, err) = cli(&server, &["codebase", "create", "logged"]);
    assert_eq!(code, 0, "{err}");
    server.stop();
    let log = server.log_text();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 2, "{log}");
    for l in lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: not JSON: {l}"));
        assert!(
            v.get("level").is_some() && v.get("timestamp").is_some(),
            "{l}"
        );
    }
}

/// A free loopback port (bound, then released for the server or a late receiver to take).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn records(data: &Path, event: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(data.join("audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == event)
        .collect()
}

/// Waits for `what` to hold (a cause, not a clock: the deadline only bounds a broken run).
fn wait_for(what: &str, mut probe: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !probe() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} never happened"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Reads one HTTP request from `s` and answers 200; returns its body.
fn take_request(mut s: std::net::TcpStream) -> String {
    use std::io::{Read, Write};
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let (head_end, len) = loop {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "connection closed before a whole request");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            break (i + 4, len);
        }
    };
    while buf.len() < head_end + len {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0);
        buf.extend_from_slice(&chunk[..n]);
    }
    s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        .unwrap();
    String::from_utf8_lossy(&buf[head_end..head_end + len]).into_owned()
}

/// A denial storm in one sandbox raises exactly one alert (none for a quiet one), recorded in
/// the trail, counted in `/metrics` (which promtool accepts) and delivered to a webhook that
/// was down when it fired; a long session raises its own.
#[test]
fn alerts_reach_the_trail_the_metrics_and_a_late_webhook() {
    let test = "alerts_reach_the_trail_the_metrics_and_a_late_webhook";
    if !privileged(test) {
        return;
    }
    let promtool = agentfense_testsupport::which("promtool");
    if !agentfense_testsupport::require(
        test,
        promtool
            .is_none()
            .then(|| "promtool (Debian's prometheus package)".to_owned()),
    ) {
        return;
    }
    let (hook_port, metrics_port) = (free_port(), free_port());
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let config = format!(
        "server:\n  metrics_addr: 127.0.0.1:{metrics_port}\n\
         alerts:\n  webhook_url: http://127.0.0.1:{hook_port}/hook\n  \
         long_sessions:\n    after: 1s\n    severity: low\n"
    );
    let mut server = Server::start_with(&data, &config);
    let (code, cb, err) = cli(&server, &["codebase", "create", "watched"]);
    assert_eq!(code, 0, "{err}");
    let cb = cb.trim().to_owned();
    // Distinct hidden files: each first lookup is a denial (the kernel then caches the
    // answer, so repeating one name would not storm).
    for i in 1..=20 {
        std::fs::write(
            data.join("codebases").join(&cb).join(format!(".env.{i}")),
            "SECRET=1\n",
        )
        .unwrap();
    }
    let sandbox = || {
        let (code, sb, err) = cli(
            &server,
            &[
                "sandbox",
                "create",
                &cb,
                "--start",
                "--preset",
                "agent-safe",
            ],
        );
        assert_eq!(code, 0, "{err}");
        sb.trim().to_owned()
    };
    let (loud, quiet) = (sandbox(), sandbox());
    exec(
        &server,
        &loud,
        "for i in $(seq 20); do cat .env.$i 2>/dev/null; done; true",
    );
    exec(&server, &quiet, "cat .env.1 2>/dev/null; true");
    wait_for("a permission_denials alert", || {
        !records(&data, "alert").is_empty()
    });
    // Nothing more comes for the storm: the last command's events are all in.
    exec(&server, &loud, "true");
    let alerts: Vec<_> = records(&data, "alert")
        .into_iter()
        .filter(|a| a["rule"] == "permission_denials")
        .collect();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0]["sandbox_id"], loud.as_str());
    assert_eq!(alerts[0]["severity"], "medium");
    // The webhook receiver comes up only now; the alert is retried until it is taken.
    let listener = std::net::TcpListener::bind(("127.0.0.1", hook_port)).unwrap();
    let (conn, _) = listener.accept().unwrap();
    let body: serde_json::Value = serde_json::from_str(&take_request(conn)).unwrap();
    assert_eq!(body["event"], "alert");
    assert_eq!(body["rule"], "permission_denials");
    assert_eq!(body["sandbox_id"], loud.as_str());
    // A session open past `after`.
    let (code, sess, err) = cli(&server, &["session", "create", &quiet]);
    assert_eq!(code, 0, "{err}");
    let sess = sess.trim().to_owned();
    wait_for("a long_sessions alert", || {
        records(&data, "alert").iter().any(|a| {
            a["rule"] == "long_sessions" && a["detail"].as_str().is_some_and(|d| d.contains(&sess))
        })
    });
    // The loud sandbox's own view.
    let (code, out, err) = cli(&server, &["sandbox", "metrics", &loud, "--json"]);
    assert_eq!(code, 0, "{err}");
    let m: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(m["denials"].as_u64().unwrap() >= 20, "{m}");
    assert!(m["pids"].as_u64().unwrap() >= 1, "{m}");
    assert!(m["memory_bytes"].as_u64().unwrap() > 0, "{m}");
    assert!(m["cpu_usec"].as_u64().unwrap() > 0, "{m}");
    // Metrics: the alert, the commands, the denials; promtool accepts the page.
    let page = Command::new("curl")
        .args(["-sf", &format!("http://127.0.0.1:{metrics_port}/metrics")])
        .output()
        .unwrap();
    assert!(page.status.success());
    let text = String::from_utf8(page.stdout).unwrap();
    assert!(
        text.contains("agentfense_alerts_total{rule=\"permission_denials\",severity=\"medium\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("agentfense_exec_total{runtime=\"bwrap\",result=\"ok\"}"),
        "{text}"
    );
    assert!(text.contains("agentfense_fs_denials_total{"), "{text}");
    assert!(
        text.contains("agentfense_fs_operations_total{operation=\"lookup\"}"),
        "{text}"
    );
    assert!(
        text.contains("agentfense_sandboxes{state=\"running\"} 2"),
        "{text}"
    );
    assert!(!text.contains(&loud), "a sandbox id in a label: {text}");
    let mut check = Command::new(promtool.unwrap())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        check
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    server.stop();
}

/// The shipped Prometheus rules pass `promtool check rules`, and they and the Grafana
/// dashboard use only metrics the server exports.
#[test]
fn shipped_monitoring_artifacts_are_valid() {
    let test = "shipped_monitoring_artifacts_are_valid";
    let promtool = agentfense_testsupport::which("promtool");
    if !agentfense_testsupport::require(
        test,
        promtool
            .is_none()
            .then(|| "promtool (Debian's prometheus package)".to_owned()),
    ) {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let rules = root.join("deploy/prometheus/agentfense-rules.yml");
    let out = Command::new(promtool.unwrap())
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let known: Vec<&str> = agentfense_server::metrics::metrics()
        .names()
        .iter()
        .map(String::as_str)
        .collect();
    let dashboard =
        std::fs::read_to_string(root.join("deploy/grafana/agentfense-dashboard.json")).unwrap();
    let _: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let text = std::fs::read_to_string(&rules).unwrap() + &dashboard;
    let mut used: Vec<String> = Vec::new();
    let mut rest = text.as_str();
    while let Some(i) = rest.find("agentfense_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        used.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    assert!(used.len() > 10, "{used:?}");
    for name in used {
        let base = ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name);
        assert!(
            known.contains(&base) || known.contains(&name.as_str()),
            "{name} is not a metric the server exports ({known:?})"
        );
    }
}
