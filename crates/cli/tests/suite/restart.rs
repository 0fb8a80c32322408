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
    stops_for(&mut other, 60, "lost its claim");
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
    stops_for(&mut server, 150, "lost its claim");
}

/// Waits (at most `secs`) for `server` to exit on its own, having lost its claim on the
/// database or its node: with an error that `says` why, and no mounts left behind.
fn stops_for(server: &mut Server, secs: u64, says: &str) {
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
    assert!(log.contains(says), "{log}");
    assert_eq!(server.mounts(), Vec::<String>::new(), "{log}");
}

/// A node lost while its server was paused (SIGSTOP: a frozen VM, a partition): another
/// server on the database, finding no heartbeat from it for `nodes.lost_after`, declares it
/// lost. Its sandboxes show ERROR, refuse to run with the reason, and their published work is
/// intact in the codebase. When the paused server resumes, its next renewal is refused and
/// tells it why: it stops what it still runs, without being asked, and exits saying so;
/// started again, it moves the lost sandboxes' deltas aside and serves as a fresh node.
#[test]
fn a_node_lost_while_paused_stops_what_it_ran_when_it_resumes() {
    let test = "a_node_lost_while_paused_stops_what_it_ran_when_it_resumes";
    if !privileged(test) {
        return;
    }
    let Some(pg) = agentfense_testsupport::postgres::Postgres::start(test) else {
        return;
    };
    let url = pg.database();
    let tmp = tempfile::tempdir().unwrap();
    // Both servers keep codebases in one directory (shared storage, as a failover pair
    // has): published work survives the node.
    let config = format!(
        "storage:\n  database_url: \"{url}\"\n  codebase_path: {}\nnodes:\n  lost_after: 2m\n",
        tmp.path().join("codebases").display()
    );
    let (data_a, data_b) = (tmp.path().join("node-a"), tmp.path().join("node-b"));
    let mut a = Server::start_with(&data_a, &config);
    let Some(ids) = script(&["setup", &a.grpc]) else {
        return;
    };
    let parsed: serde_json::Value = serde_json::from_str(&ids).unwrap();
    let private = parsed["private"].as_str().unwrap();
    let private_delta = data_a.join("mounts/delta").join(private);
    assert!(private_delta.is_dir());
    assert!(!a.mounts().is_empty());
    let pid = rustix::process::Pid::from_child(a.child.as_ref().unwrap());
    rustix::process::kill_process(pid, rustix::process::Signal::STOP).unwrap();
    // Time passes while it is frozen: its claim expires and its heartbeat ages past
    // nodes.lost_after (what minutes of waiting would do, done to the rows).
    pg.psql(
        &url,
        "UPDATE leases SET expires_at = 0 WHERE name = 'server'; \
         UPDATE nodes SET heartbeat_at = heartbeat_at - 3600000000000",
    );
    let mut b = Server::start_with(&data_b, &config);
    let checked = script(&["lost", &b.grpc, ids.trim()]);
    assert_eq!(
        checked.as_deref().map(str::trim),
        Some("ok"),
        "{}",
        b.log_text()
    );
    let nodes_cmd = |data: &std::path::Path, args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_agentfense"))
            .arg("nodes")
            .args(args)
            .arg("--data-dir")
            .arg(data)
            .arg("--config")
            .arg(data.with_extension("yaml"))
            .output()
            .unwrap()
    };
    let nodes = |data: &std::path::Path| -> serde_json::Value {
        let out = nodes_cmd(data, &["list", "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let node_a = std::fs::read_to_string(data_a.join("instance-id")).unwrap();
    let state_of = |listed: &serde_json::Value| {
        listed
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["id"] == node_a.trim())
            .map(|n| {
                (
                    n["state"].as_str().unwrap().to_owned(),
                    n["sandboxes"].clone(),
                )
            })
    };
    assert_eq!(
        state_of(&nodes(&data_b)),
        Some(("lost".to_owned(), serde_json::json!(0)))
    );

    // Resumed while B holds the claim: its next renewal is refused, and it is told why.
    rustix::process::kill_process(pid, rustix::process::Signal::CONT).unwrap();
    stops_for(&mut a, 60, "declared lost");
    b.stop();
    let audit = std::fs::read_to_string(data_b.join("audit.jsonl")).unwrap();
    assert!(
        audit.contains(r#""event":"node_lost""#) && audit.contains(r#""event":"sandbox_lost""#),
        "{audit}"
    );

    // A live node cannot be forgotten, a lost one can.
    let node_b = std::fs::read_to_string(data_b.join("instance-id")).unwrap();
    let refused = nodes_cmd(&data_b, &["rm", node_b.trim()]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("is not lost"));
    assert!(nodes_cmd(&data_b, &["rm", node_a.trim()]).status.success());
    assert_eq!(state_of(&nodes(&data_b)), None);

    // Started again: a fresh node; what it held of the lost sandboxes is gone.
    let a = Server::start_with(&data_a, &config);
    // Requests are served only once recovery is done.
    let checked = script(&["lost", &a.grpc, ids.trim()]);
    assert_eq!(
        checked.as_deref().map(str::trim),
        Some("ok"),
        "{}",
        a.log_text()
    );
    assert!(!private_delta.exists(), "{}", a.log_text());
    assert!(
        data_a.join("mounts/lost").join(private).is_dir(),
        "kept aside for salvage"
    );
    assert!(a.mounts().is_empty());
    assert_eq!(
        state_of(&nodes(&data_a)),
        Some(("ready".to_owned(), serde_json::json!(0)))
    );
    let forgotten = script(&["forget", &a.grpc, ids.trim()]);
    assert_eq!(
        forgotten.as_deref().map(str::trim),
        Some("ok"),
        "{}",
        a.log_text()
    );
}

/// A second server started on the data directory of a running one, with its own metadata
/// file (so no database claim stops it), is refused before it touches anything: it would
/// detach the first server's sandbox mounts as "stale" and share its node identity.
#[test]
fn a_second_server_on_the_same_data_directory_is_refused() {
    let test = "a_second_server_on_the_same_data_directory_is_refused";
    if !privileged(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start(&data);
    let Some(ids) = script(&["setup", &server.grpc]) else {
        return;
    };
    let mounted = server.mounts();
    assert!(!mounted.is_empty());
    let config = tmp.path().join("second.yaml");
    std::fs::write(
        &config,
        format!(
            "storage:\n  db_path: {}\n",
            tmp.path().join("second.db").display()
        ),
    )
    .unwrap();
    let mut second = Server::command(&data, &config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Refused at once; one that is still running after a minute was not (and must not hang
    // the test).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while second.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = second.kill();
            let _ = second.wait();
            panic!(
                "a second server runs on the data directory; the first one's mounts: {:?}",
                server.mounts()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = second.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("is in use by another AgentFense server"),
        "{err}"
    );
    assert_eq!(
        server.mounts(),
        mounted,
        "the first server's mounts are intact"
    );
    verify(&server, &ids);
}
