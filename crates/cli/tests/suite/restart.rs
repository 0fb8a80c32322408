//! Nothing is lost across a restart, clean (SIGTERM) or a crash (SIGKILL).

use std::path::PathBuf;
use std::process::Command;

use super::server::{Server, privileged};

fn python() -> String {
    std::env::var("AGENTFENSE_PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

fn script(args: &[&str]) -> Option<String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new(python())
        .arg(root.join("tests/interop/restart_check.py"))
        .args(args)
        .output()
        .expect("run python");
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        if err.contains("No module named 'agentfense'") {
            agentfense_testsupport::require("restart test", Some(format!("the Python SDK: {err}")));
            return None;
        }
        panic!("restart_check.py {args:?} failed:\n{err}");
    }
    Some(String::from_utf8(out.stdout).unwrap())
}

fn restart_keeps_everything(crash: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut server = Server::start(&data);
    let Some(ids) = script(&["setup", &server.grpc]) else {
        return;
    };
    if crash {
        server.kill9();
    } else {
        server.stop();
    }
    let server = Server::start(&data);
    let verified = script(&["verify", &server.grpc, ids.trim()]);
    assert_eq!(
        verified.as_deref().map(str::trim),
        Some("ok"),
        "log:\n{}",
        server.log_text()
    );
}

#[test]
fn restart_after_sigkill_loses_nothing() {
    if privileged("restart_after_sigkill_loses_nothing") {
        restart_keeps_everything(true);
    }
}

#[test]
fn restart_after_sigterm_loses_nothing() {
    if privileged("restart_after_sigterm_loses_nothing") {
        restart_keeps_everything(false);
    }
}
