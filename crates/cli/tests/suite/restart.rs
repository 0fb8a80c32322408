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

/// The second step of restart_check.py passes against `server`.
fn verify(server: &Server, ids: &str) {
    let verified = script(&["verify", &server.grpc, ids.trim()]);
    assert_eq!(
        verified.as_deref().map(str::trim),
        Some("ok"),
        "log:\n{}",
        server.log_text()
    );
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
    verify(&server, &ids);
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

/// The same flow with the metadata in PostgreSQL (`storage.database_url`): a crash and a
/// restart of the same server lose nothing, and it takes its claim on the database back at
/// once; a second server on the same database is refused with a message saying why.
#[test]
fn postgres_metadata_survives_a_crash_and_a_second_server_is_refused() {
    let test = "postgres_metadata_survives_a_crash_and_a_second_server_is_refused";
    if !privileged(test) {
        return;
    }
    let Some(pg) = agentfense_testsupport::postgres::Postgres::start(test) else {
        return;
    };
    let url = pg.database();
    let config = format!("storage:\n  database_url: \"{url}\"\n");
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut server = Server::start_with(&data, &config);
    let Some(ids) = script(&["setup", &server.grpc]) else {
        return;
    };
    // Nothing went to the SQLite file: the metadata is in PostgreSQL.
    assert!(!data.join("agentfense.db").exists());
    // The server registered itself as a node holding the setup's three sandboxes; drain and
    // undrain show in the listing.
    let cfg = data.with_extension("yaml");
    let nodes = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_agentfense"))
            .arg("nodes")
            .args(args)
            .arg("--data-dir")
            .arg(&data)
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let listed: serde_json::Value = serde_json::from_str(&nodes(&["list", "--json"])).unwrap();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let instance = std::fs::read_to_string(data.join("instance-id")).unwrap();
    assert_eq!(listed[0]["id"], instance.trim(), "{listed}");
    assert_eq!(listed[0]["host"], host.trim(), "{listed}");
    assert_eq!(listed[0]["sandboxes"], 3, "{listed}");
    assert_eq!(listed[0]["draining"], false, "{listed}");
    nodes(&["drain", instance.trim()]);
    assert!(nodes(&["list"]).contains("draining"));
    nodes(&["undrain", instance.trim()]);

    // Another server (another data directory) on the same database.
    let other = tmp.path().join("other");
    let config_file = other.with_extension("yaml");
    std::fs::write(&config_file, &config).unwrap();
    let out = Server::command(&other, &config_file).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "second server started: {err}");
    assert!(err.contains("another AgentFense server"), "{err}");

    server.kill9();
    let mut server = Server::start_with(&data, &config);
    verify(&server, &ids);
    // A clean stop (which closes the pool) exits cleanly and frees the claim at once.
    server.stop();
    let mut other = Server::start_with(&other, &config);

    // Its claim taken from under it (a server elsewhere that found it expired), with
    // sandboxes running: it stops at its next renewal, cleanly (no mounts left) but with an
    // error, and says why.
    let Some(_ids) = script(&["setup", &other.grpc]) else {
        return;
    };
    assert!(!other.mounts().is_empty());
    pg.psql(
        &url,
        "UPDATE leases SET holder = 'elsewhere/0', expires_at = 9223372036854775807 \
         WHERE name = 'server'",
    );
    // It renews every 10 s; a server that never notices fails here, not by hanging.
    stops_for_its_claim(&mut other, 60);
}

/// The database becomes unreachable under a PostgreSQL-backed server with sandboxes running:
/// it cannot renew its claim, so it must stop before another server could take the claim
/// (half the claim's lifetime), tearing its sandboxes down without the database, and exit
/// with an error (a supervisor restarts it, to wait for the claim like any other server).
#[test]
fn an_unreachable_database_stops_the_server_cleanly() {
    let test = "an_unreachable_database_stops_the_server_cleanly";
    if !privileged(test) {
        return;
    }
    let Some(pg) = agentfense_testsupport::postgres::Postgres::start(test) else {
        return;
    };
    let config = format!("storage:\n  database_url: \"{}\"\n", pg.database());
    let tmp = tempfile::tempdir().unwrap();
    let mut server = Server::start_with(&tmp.path().join("data"), &config);
    let Some(_ids) = script(&["setup", &server.grpc]) else {
        return;
    };
    assert!(!server.mounts().is_empty());
    pg.stop();
    // Renewals fail from now on; the server gives up 30 s after the last one that worked.
    stops_for_its_claim(&mut server, 150);
}

/// Waits (at most `secs`) for `server` to exit on its own, having lost its claim on the
/// database: with an error saying so, and no mounts left behind.
fn stops_for_its_claim(server: &mut Server, secs: u64) {
    let mut child = server.child.take().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "server kept running without its claim; log:\n{}",
                server.log_text()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let log = server.log_text();
    assert!(!status.success(), "{status}; log:\n{log}");
    assert!(log.contains("lost its claim"), "{log}");
    assert_eq!(server.mounts(), Vec::<String>::new(), "{log}");
}
