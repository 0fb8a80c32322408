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
