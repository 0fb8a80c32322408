//! The published Python SDK (`agentfense==0.2.1`) and plain REST against a real server:
//! runs `tests/interop` with pytest.

use std::path::PathBuf;
use std::process::Command;

use super::server::{Server, privileged};

fn python() -> String {
    std::env::var("AGENTFENSE_PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

/// The SDK interop suite needs: pip install agentfense==0.2.1 'protobuf>=6.31' grpcio
/// googleapis-common-protos pytest (`./dev setup` installs them).
fn sdk_available(test: &str) -> bool {
    agentfense_testsupport::require(
        test,
        agentfense_testsupport::python_modules(&python(), &["agentfense", "pytest", "grpc"]),
    )
}

#[test]
fn python_sdk_and_rest_interop() {
    if !privileged("python_sdk_and_rest_interop") {
        return;
    }
    if !sdk_available("python_sdk_and_rest_interop") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // A fast reaper, so that expiry is observable within the suite.
    let mut server = Server::start_with(
        &tmp.path().join("data"),
        "sandbox:\n  cleanup_interval: 1s\n",
    );
    // Something listening on the host's loopback, which sandboxes must not reach.
    let host_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host_port = host_listener.local_addr().unwrap().port();

    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new(python())
        .args([
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/interop",
        ])
        .current_dir(&root)
        .env("AGENTFENSE_GRPC", &server.grpc)
        .env("AGENTFENSE_HTTP", &server.http)
        .env("AGENTFENSE_AUDIT", server.data_dir.join("audit.jsonl"))
        .env("AGENTFENSE_HOST_PORT", host_port.to_string())
        .output()
        .expect("run pytest");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{report}");
    if !out.status.success() {
        panic!(
            "SDK interop suite failed ({}).\nserver log:\n{}",
            out.status,
            server.log_text()
        );
    }
    server.stop();
    drop(host_listener);

    // The scripted scenario above produced every kind of audit event.
    let audit = std::fs::read_to_string(server.data_dir.join("audit.jsonl")).unwrap();
    let events: std::collections::BTreeSet<String> = audit
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("audit lines are JSON");
            assert!(v["timestamp"].is_string(), "{l}");
            v["event"].as_str().unwrap().to_owned()
        })
        .collect();
    for want in [
        "codebase_created",
        "codebase_deleted",
        "file_uploaded",
        "sandbox_created",
        "sandbox_started",
        "sandbox_stopped",
        "sandbox_destroyed",
        "sandbox_expired",
        "command_executed",
        "permission_denied",
        "resource_limit_exceeded",
        "publish_conflict",
    ] {
        assert!(
            events.contains(want),
            "no {want} event in the audit log: {events:?}"
        );
    }
}

/// The local image the Docker suites use (built by scripts/docker-setup.sh).
fn docker_image() -> String {
    std::env::var("AGENTFENSE_DOCKER_IMAGE").unwrap_or_else(|_| "agentfense-test-base".to_owned())
}

/// Whether a Docker daemon answers and has the test image; under CI its absence is a failure.
fn docker_ready(test: &str) -> bool {
    let ok = std::path::Path::new("/var/run/docker.sock").exists()
        && Command::new("docker")
            .args(["image", "inspect", &docker_image()])
            .output()
            .is_ok_and(|o| o.status.success());
    agentfense_testsupport::require(
        test,
        (!ok).then(|| {
            format!(
                "a Docker daemon with image {} (run scripts/docker-setup.sh)",
                docker_image()
            )
        }),
    )
}

#[test]
fn python_sdk_interop_on_docker() {
    if !privileged("python_sdk_interop_on_docker") || !docker_ready("python_sdk_interop_on_docker")
    {
        return;
    }
    if !sdk_available("python_sdk_interop_on_docker") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut server = Server::start_with(&tmp.path().join("data"), "runtime:\n  type: docker\n");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new(python())
        .args([
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/interop/test_docker.py",
        ])
        .current_dir(&root)
        .env("AGENTFENSE_GRPC", &server.grpc)
        .env("AGENTFENSE_HTTP", &server.http)
        .env("AGENTFENSE_AUDIT", server.data_dir.join("audit.jsonl"))
        .env("AGENTFENSE_HOST_PORT", "9")
        .env("AGENTFENSE_DOCKER_IMAGE", docker_image())
        .output()
        .expect("run pytest");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{report}");
    // Every scenario of the file ran and passed (none skipped): as many as it defines.
    let defined = std::fs::read_to_string(root.join("tests/interop/test_docker.py"))
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("def test_"))
        .count();
    assert!(
        out.status.success() && report.contains(&format!("{defined} passed")),
        "Docker SDK suite failed ({}).\nserver log:\n{}",
        out.status,
        server.log_text()
    );
    server.stop();
}
