//! The published Python SDK (`agentfense==0.2.1`) and plain REST against a real server:
//! runs `tests/interop` with pytest.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

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

/// What one run of `tests/interop/test_sdk.py` against a real server found.
struct SuiteRun {
    /// Scenario → (outcome, failure text): "passed", "failed" or "skipped".
    outcomes: HashMap<String, (String, String)>,
    /// Every kind of audit event the run produced.
    audit_events: BTreeSet<String>,
    /// pytest's output and the server's log, for failures.
    report: String,
}

/// Runs the SDK suite once for every scenario test (the first caller runs it, the others
/// wait); `None` when the prerequisites are missing (said loudly by the caller).
fn sdk_suite() -> Option<&'static SuiteRun> {
    static RUN: OnceLock<Option<SuiteRun>> = OnceLock::new();
    RUN.get_or_init(|| {
        if agentfense_testsupport::privileged().is_some()
            || agentfense_testsupport::python_modules(&python(), &["agentfense", "pytest", "grpc"])
                .is_some()
        {
            return None;
        }
        Some(run_sdk_suite())
    })
    .as_ref()
}

fn run_sdk_suite() -> SuiteRun {
    let tmp = tempfile::tempdir().unwrap();
    // A fast reaper, so that expiry is observable within the suite.
    let mut server = Server::start_with(
        &tmp.path().join("data"),
        "sandbox:\n  cleanup_interval: 1s\n",
    );
    // Something listening on the host's loopback, which sandboxes must not reach.
    let host_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host_port = host_listener.local_addr().unwrap().port();
    let results = tmp.path().join("results.jsonl");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new(python())
        .args([
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/interop/test_sdk.py",
        ])
        .current_dir(&root)
        .env("AGENTFENSE_GRPC", &server.grpc)
        .env("AGENTFENSE_HTTP", &server.http)
        .env("AGENTFENSE_AUDIT", server.data_dir.join("audit.jsonl"))
        .env("AGENTFENSE_HOST_PORT", host_port.to_string())
        .env("AGENTFENSE_RESULTS", &results)
        .output()
        .expect("run pytest");
    let report = format!(
        "{}{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        server.log_text()
    );
    server.stop();
    drop(host_listener);
    let mut outcomes = HashMap::new();
    for line in std::fs::read_to_string(&results)
        .unwrap_or_default()
        .lines()
    {
        let v: serde_json::Value = serde_json::from_str(line).expect("result lines are JSON");
        let test = v["test"].as_str().unwrap_or_default().to_owned();
        let outcome = v["outcome"].as_str().unwrap_or_default().to_owned();
        let detail = format!(
            "({}) {}",
            v["when"].as_str().unwrap_or_default(),
            v["detail"].as_str().unwrap_or_default()
        );
        // A failure in any phase (setup, call, teardown) is the scenario's outcome.
        let keep = outcomes
            .get(&test)
            .is_none_or(|(o, _): &(String, String)| o == "passed");
        if keep {
            outcomes.insert(test, (outcome, detail));
        }
    }
    let audit = std::fs::read_to_string(server.data_dir.join("audit.jsonl")).unwrap_or_default();
    let audit_events = audit
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("audit lines are JSON");
            assert!(v["timestamp"].is_string(), "{l}");
            v["event"].as_str().unwrap_or_default().to_owned()
        })
        .collect();
    SuiteRun {
        outcomes,
        audit_events,
        report,
    }
}

/// Asserts that scenario `name` of the SDK suite passed.
fn scenario(name: &str) {
    if !privileged(name) || !sdk_available(name) {
        return;
    }
    let run = sdk_suite().expect("prerequisites checked above");
    match run.outcomes.get(name) {
        Some((outcome, _)) if outcome == "passed" => {}
        Some((outcome, detail)) => panic!("{name} {outcome}: {detail}\n{}", run.report),
        None => panic!("{name} did not run:\n{}", run.report),
    }
}

/// One test per scenario of `tests/interop/test_sdk.py` (one suite run serves them all).
macro_rules! sdk_scenarios {
    ($($name:ident),* $(,)?) => {
        /// Every scenario with a test of its own.
        const SDK_SCENARIOS: &[&str] = &[$(stringify!($name)),*];
        mod sdk {
            $(
                #[test]
                fn $name() {
                    super::scenario(stringify!($name));
                }
            )*
        }
    };
}

sdk_scenarios!(
    test_agent_safe_hides_secrets_and_protects_source,
    test_read_only_and_view_only,
    test_full_access_and_development,
    test_custom_rules_and_invalid_rules,
    test_exec_semantics,
    test_exec_stream,
    test_exec_stream_low_level_types_and_trailer,
    test_sessions,
    test_files_api_and_sandboxignore,
    test_low_level_lifecycle_and_error_codes,
    test_async_api,
    test_network_is_absent,
    test_memory_and_fork_bomb_are_contained,
    test_rest_flow,
    test_expired_sandboxes_are_reaped,
    test_manual_publish_and_conflicts,
    test_io_mode_label,
    test_resources_above_the_server_ceiling_are_refused,
    test_open_files_of_one_sandbox_do_not_starve_others,
    test_disk_quota_holds_for_the_delta_publishes_and_tmp,
    test_per_owner_quota,
    test_server_floor_hides_secrets_the_sdk_preset_misses,
);

/// A scenario added to the Python file gets a test here too (and a removed one goes).
#[test]
fn every_sdk_scenario_has_a_test() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let defined: BTreeSet<String> = std::fs::read_to_string(root.join("tests/interop/test_sdk.py"))
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("def test_"))
        .map(|rest| format!("test_{}", rest.split('(').next().unwrap_or_default()))
        .collect();
    let listed: BTreeSet<String> = SDK_SCENARIOS.iter().map(|s| (*s).to_owned()).collect();
    assert_eq!(defined, listed);
}

/// The scenarios together produced every kind of audit event.
#[test]
fn the_sdk_scenarios_produce_every_kind_of_audit_event() {
    let name = "the_sdk_scenarios_produce_every_kind_of_audit_event";
    if !privileged(name) || !sdk_available(name) {
        return;
    }
    let run = sdk_suite().expect("prerequisites checked above");
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
            run.audit_events.contains(want),
            "no {want} event in the audit log: {:?}",
            run.audit_events
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
