//! The REST gateway's JSON follows grpc-gateway's protojson conventions (reference 1.5).

use agentfense_proto::pbjson_types::{Duration, Timestamp};
use agentfense_proto::v1;
use pretty_assertions::assert_eq;
use serde_json::json;

#[test]
fn output_is_camel_case_with_every_field_enum_names_and_string_int64() {
    let sb = v1::Sandbox {
        id: "sb_0123456789abcdef".into(),
        codebase_id: "cb_0123456789abcdef".into(),
        status: v1::SandboxStatus::Running as i32,
        created_at: Some(Timestamp {
            seconds: 1_700_000_000,
            nanos: 500_000_000,
        }),
        resources: Some(v1::ResourceLimits {
            memory_bytes: 64 << 20,
            ..Default::default()
        }),
        ..Default::default()
    };
    let v = serde_json::to_value(&sb).unwrap();
    assert_eq!(v["codebaseId"], "cb_0123456789abcdef");
    assert_eq!(v["status"], "SANDBOX_STATUS_RUNNING");
    assert_eq!(
        v["runtime"], "RUNTIME_TYPE_UNSPECIFIED",
        "zero values are emitted"
    );
    assert_eq!(v["permissions"], json!([]));
    assert_eq!(v["image"], "");
    // RFC 3339 (pbjson writes the UTC offset as "+00:00" where grpc-gateway writes "Z"; both
    // are RFC 3339 and both parse with Python's datetime.fromisoformat).
    let created = v["createdAt"].as_str().unwrap();
    assert!(
        ["2023-11-14T22:13:20.500Z", "2023-11-14T22:13:20.500+00:00"].contains(&created),
        "{created}"
    );
    assert_eq!(
        v["resources"]["memoryBytes"], "67108864",
        "int64 as a string"
    );

    let r = v1::ExecResult {
        stdout: "hi\n".into(),
        exit_code: 3,
        duration: Some(Duration {
            seconds: 1,
            nanos: 500_000_000,
        }),
        ..Default::default()
    };
    let v = serde_json::to_value(&r).unwrap();
    assert_eq!(v["exitCode"], 3);
    assert_eq!(v["duration"], "1.500s");
}

#[test]
fn input_accepts_either_case_enum_names_and_ignores_unknown_fields() {
    let req: v1::CreateSandboxRequest = serde_json::from_value(json!({
        "codebase_id": "cb_0123456789abcdef",
        "permissions": [{"pattern": "**/*", "permission": "PERMISSION_READ"}],
        "expiresIn": "90s",
        "labels": {"team": "a"},
        "resources": {"memory_bytes": "1048576", "pidsLimit": 50},
        "somethingNew": true
    }))
    .unwrap();
    assert_eq!(req.codebase_id, "cb_0123456789abcdef");
    assert_eq!(req.permissions[0].permission, v1::Permission::Read as i32);
    assert_eq!(
        req.permissions[0].r#type,
        v1::PatternType::Unspecified as i32
    );
    assert_eq!(
        req.expires_in,
        Some(Duration {
            seconds: 90,
            nanos: 0
        })
    );
    assert_eq!(req.labels["team"], "a");
    assert_eq!(req.resources.unwrap().memory_bytes, 1 << 20);
    assert_eq!(req.resources.unwrap().pids_limit, 50);
}
