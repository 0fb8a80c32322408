//! Wire compatibility with the published Python SDK `agentfense==0.2.1`.
//!
//! `tests/sdk_compat.py` does the Python side: it compares our `FILE_DESCRIPTOR_SET` with the
//! descriptors embedded in the SDK's generated `*_pb2` modules, and exchanges encoded messages
//! with the SDK's own classes in both directions. The values below mirror the ones in that
//! script; change both together.
//!
//! Without python3 or the SDK the tests print `SKIPPED` and pass, except under CI (`CI` set),
//! where they fail: the compatibility proof must never be skipped silently there.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, UNIX_EPOCH};

use agentfense_core::{Level, PatternType, PermissionRule};
use agentfense_proto::convert::{
    duration_from_wire, duration_to_wire, rules_from_wire, rules_to_wire,
    timestamp_from_system_time,
};
use agentfense_proto::{FILE_DESCRIPTOR_SET, v1};
use pretty_assertions::assert_eq;
use prost::Message;

const INSTALL_HINT: &str =
    "pip install agentfense==0.2.1 'protobuf>=6.31' grpcio googleapis-common-protos";

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk_compat.py")
}

/// The Python interpreter with the SDK: `AGENTFENSE_PYTHON` (set by `./dev` to its venv), else
/// `python3` from `PATH`.
fn python() -> String {
    std::env::var("AGENTFENSE_PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

/// Runs `python3 sdk_compat.py <args>`; `Err` holds a description of how it failed.
fn run_script(args: &[&Path]) -> Result<String, String> {
    let output = Command::new(python())
        .arg(script())
        .args(args)
        .output()
        .map_err(|e| format!("cannot run python3: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        Ok(stdout)
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        Err(format!(
            "sdk_compat.py {:?} failed ({}):\n{stdout}{stderr}",
            args, output.status
        ))
    }
}

/// Why the SDK cannot be used, or `None` if it can.
fn sdk_unavailable_reason() -> Option<String> {
    match Command::new(python()).arg(script()).arg("probe").output() {
        Err(e) => Some(format!("cannot run python3: {e}")),
        Ok(out) if out.status.success() => None,
        Ok(out) => {
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            let reason = stdout
                .lines()
                .chain(stderr.lines())
                .find(|l| !l.trim().is_empty());
            Some(
                reason
                    .unwrap_or("probe failed without output")
                    .trim()
                    .to_owned(),
            )
        }
    }
}

/// Returns true when the SDK is usable. Otherwise fails under CI, or prints `SKIPPED` and
/// returns false.
fn sdk_available(test: &str) -> bool {
    agentfense_testsupport::require(
        test,
        sdk_unavailable_reason()
            .map(|r| format!("the Python SDK ({r}); to run it: {INSTALL_HINT}")),
    )
}

/// Panics with the script's report unless it succeeded.
fn must_succeed(args: &[&Path]) -> String {
    match run_script(args) {
        Ok(stdout) => stdout,
        Err(report) => panic!("{report}"),
    }
}

#[test]
fn descriptors_match_the_published_sdk() {
    if !sdk_available("descriptors_match_the_published_sdk") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fds = dir.path().join("sandbox_v1_descriptor.bin");
    std::fs::write(&fds, FILE_DESCRIPTOR_SET).unwrap();
    let out = must_succeed(&[Path::new("descriptors"), &fds]);
    for file in ["common.proto", "codebase.proto", "sandbox.proto"] {
        assert!(
            out.contains(&format!("{file}: identical")),
            "no verdict for {file}:\n{out}"
        );
    }
}

#[test]
fn sdk_encoded_messages_decode_in_rust() {
    if !sdk_available("sdk_encoded_messages_decode_in_rust") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    must_succeed(&[Path::new("encode"), dir.path()]);

    let bytes = std::fs::read(dir.path().join("create_sandbox_request.bin")).unwrap();
    let req = v1::CreateSandboxRequest::decode(bytes.as_slice()).unwrap();
    let wire_rule =
        |pattern: &str, r#type: v1::PatternType, permission: v1::Permission, priority| {
            v1::PermissionRule {
                pattern: pattern.to_owned(),
                r#type: r#type.into(),
                permission: permission.into(),
                priority,
            }
        };
    let expected = v1::CreateSandboxRequest {
        codebase_id: "cb_123".to_owned(),
        permissions: vec![
            wire_rule("**/.env*", v1::PatternType::Glob, v1::Permission::None, 100),
            wire_rule(
                "/secrets",
                v1::PatternType::Directory,
                v1::Permission::View,
                5,
            ),
            wire_rule(
                "/src/main.py",
                v1::PatternType::File,
                v1::Permission::Write,
                0,
            ),
            wire_rule("**", v1::PatternType::Glob, v1::Permission::Read, 0),
        ],
        expires_in: Some(agentfense_proto::pbjson_types::Duration {
            seconds: 90,
            nanos: 500_000_000,
        }),
        labels: [("team", "ml"), ("env", "dev")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        runtime: v1::RuntimeType::Docker.into(),
        image: "python:3.11-slim".to_owned(),
        resources: Some(v1::ResourceLimits {
            memory_bytes: 512 * 1024 * 1024,
            cpu_quota: 0,
            cpu_shares: 0,
            pids_limit: 64,
        }),
    };
    assert_eq!(req, expected);

    // And through our edge conversions, as the server will read it.
    assert_eq!(
        rules_from_wire(&req.permissions).unwrap(),
        vec![
            PermissionRule::new("**/.env*", PatternType::Glob, Level::None, 100),
            PermissionRule::new("/secrets", PatternType::Directory, Level::View, 5),
            PermissionRule::new("/src/main.py", PatternType::File, Level::Write, 0),
            PermissionRule::new("**", PatternType::Glob, Level::Read, 0),
        ]
    );
    assert_eq!(
        duration_from_wire(req.expires_in.as_ref().unwrap(), "expires_in").unwrap(),
        Duration::from_millis(90_500)
    );

    let bytes = std::fs::read(dir.path().join("exec_output.bin")).unwrap();
    let out = v1::ExecOutput::decode(bytes.as_slice()).unwrap();
    assert_eq!(
        out,
        v1::ExecOutput {
            r#type: v1::exec_output::OutputType::Stderr.into(),
            data: b"\x00\xffnot utf-8\n".to_vec(),
        }
    );
}

#[test]
fn rust_encoded_messages_parse_in_the_sdk() {
    if !sdk_available("rust_encoded_messages_parse_in_the_sdk") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, encoded: Vec<u8>| {
        std::fs::write(dir.path().join(name), encoded).unwrap();
    };

    let rules = vec![
        PermissionRule::new("**/.env*", PatternType::Glob, Level::None, 100),
        PermissionRule::new("/secrets", PatternType::Directory, Level::View, 5),
        PermissionRule::new("/src/main.py", PatternType::File, Level::Write, -1),
        PermissionRule::new("**", PatternType::Glob, Level::Read, 0),
    ];
    let created = UNIX_EPOCH + Duration::new(1_700_000_000, 250_000_000);
    write(
        "sandbox.bin",
        v1::Sandbox {
            id: "sb_abc".to_owned(),
            codebase_id: "cb_123".to_owned(),
            permissions: rules_to_wire(&rules),
            status: v1::SandboxStatus::Running.into(),
            labels: [("team", "ml"), ("env", "dev")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            created_at: Some(timestamp_from_system_time(created)),
            started_at: Some(timestamp_from_system_time(
                created + Duration::from_secs(60) - Duration::from_millis(250),
            )),
            stopped_at: None,
            expires_at: None,
            runtime: v1::RuntimeType::Docker.into(),
            image: "python:3.11-slim".to_owned(),
            resources: Some(v1::ResourceLimits {
                memory_bytes: 536_870_912,
                cpu_quota: 50_000,
                cpu_shares: 0,
                pids_limit: 64,
            }),
        }
        .encode_to_vec(),
    );
    write(
        "exec_result.bin",
        v1::ExecResult {
            stdout: "héllo ✓\n".to_owned(),
            stderr: "warn\n".to_owned(),
            exit_code: -3,
            duration: Some(duration_to_wire(Duration::from_millis(1250), "duration").unwrap()),
        }
        .encode_to_vec(),
    );
    write(
        "exec_output.bin",
        v1::ExecOutput {
            r#type: v1::exec_output::OutputType::Stdout.into(),
            data: vec![0x00, 0x01, 0xfe, 0xff],
        }
        .encode_to_vec(),
    );
    write(
        "session.bin",
        v1::Session {
            id: "sess_1".to_owned(),
            sandbox_id: "sb_abc".to_owned(),
            status: v1::SessionStatus::Active.into(),
            shell: "/bin/sh".to_owned(),
            created_at: Some(timestamp_from_system_time(created)),
            closed_at: None,
        }
        .encode_to_vec(),
    );

    must_succeed(&[Path::new("decode"), dir.path()]);
}

#[test]
fn descriptor_set_is_self_contained() {
    // Reflection needs every import in the set; this holds without Python.
    let set = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).unwrap();
    let mut names: Vec<&str> = set.file.iter().map(|f| f.name()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        vec![
            "agentfense.proto",
            "codebase.proto",
            "common.proto",
            "google/api/annotations.proto",
            "google/api/http.proto",
            "google/protobuf/descriptor.proto",
            "google/protobuf/duration.proto",
            "google/protobuf/timestamp.proto",
            "sandbox.proto",
        ]
    );
    for file in &set.file {
        assert!(
            file.source_code_info.is_none(),
            "{} has source info",
            file.name()
        );
    }
}
