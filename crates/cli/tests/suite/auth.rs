//! Authentication and tenants against a real server: `agentfense keys`/`tenants` on its data
//! directory while it runs, the CLI client with a key, revocation and blocking taking effect
//! on the running server, the REST probes over a real socket, the audit trail, and the
//! published Python SDK over the unix socket (uid → tenant) and with the documented key
//! recipe.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::server::{Server, privileged};
use super::util::outcome;

const AUTH: &str = "auth:\n  enabled: true\n";

fn bin(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_agentfense"));
    c.args(args).env_remove("AGENTFENSE_API_KEY");
    for (k, v) in env {
        c.env(k, v);
    }
    outcome(c.output().unwrap())
}

/// `agentfense keys create` on the server's data directory; returns the key.
fn create_key(data: &Path, tenant: &str, extra: &[&str]) -> String {
    let d = data.to_str().unwrap();
    let mut args = vec!["keys", "create", "--tenant", tenant, "--data-dir", d];
    args.extend_from_slice(extra);
    let (code, out, err) = bin(&args, &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.lines().count(),
        1,
        "the key is the only line on stdout: {out}"
    );
    let key = out.trim().to_owned();
    assert!(key.starts_with("afk_") && key.len() >= 64, "{key}");
    key
}

/// A client command against `server` with `key` (from the environment, like a user would).
fn client(server: &Server, key: Option<&str>, args: &[&str]) -> (i32, String, String) {
    let mut all = args.to_vec();
    all.extend_from_slice(&["--endpoint", &server.grpc]);
    match key {
        Some(k) => bin(&all, &[("AGENTFENSE_API_KEY", k)]),
        None => bin(&all, &[]),
    }
}

/// Repeats `probe` until it returns true (bounded: the change must reach the server).
fn eventually(what: &str, mut probe: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !probe() {
        assert!(Instant::now() < deadline, "{what} never happened");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One raw HTTP/1.1 request; returns the status code.
fn http(addr: &str, request: &str) -> u16 {
    let addr = addr.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    resp.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[test]
fn keys_revocation_and_blocking_on_a_running_server() {
    if !privileged("keys_revocation_and_blocking_on_a_running_server") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut server = Server::start_with(&data, AUTH);
    let a = create_key(&data, "team-a", &[]);
    let a2 = create_key(
        &data,
        "team-a",
        &["--scope", "codebases:read", "--expires", "1h"],
    );
    let b = create_key(&data, "team-b", &[]);

    // Listing shows ids, tenants and scopes, never a secret.
    let d = data.to_str().unwrap();
    let (code, list, _) = bin(&["keys", "list", "--data-dir", d], &[]);
    assert_eq!(code, 0);
    assert!(
        list.contains("team-a") && list.contains("team-b") && list.contains("key_"),
        "{list}"
    );
    assert!(list.contains("codebases:read"), "{list}");
    for k in [&a, &a2, &b] {
        assert!(!list.contains(&k[4..]), "a secret is listed: {list}");
    }

    // Without a key: refused, saying what to send.
    let (code, _, err) = client(&server, None, &["codebase", "ls"]);
    assert!(
        code != 0 && err.contains("Unauthenticated") && err.contains("Bearer"),
        "{err}"
    );
    // A's codebase is A's.
    let (code, cb, err) = client(&server, Some(&a), &["codebase", "create", "proj"]);
    assert_eq!(code, 0, "{err}");
    let cb = cb.trim().to_owned();
    let (code, _, err) = client(
        &server,
        Some(&b),
        &["sandbox", "create", &cb, "--preset", "agent-safe"],
    );
    assert!(code != 0 && err.contains("NotFound"), "{err}");
    let (code, ls, _) = client(&server, Some(&b), &["codebase", "ls"]);
    assert!(code == 0 && !ls.contains(&cb), "{ls}");
    // A read-only key cannot write.
    let (code, _, err) = client(&server, Some(&a2), &["codebase", "create", "x"]);
    assert!(
        code != 0 && err.contains("PermissionDenied") && err.contains("codebases:write"),
        "{err}"
    );

    // REST over a real socket: the rebinding probe is refused before authentication, a key
    // works, a missing one is 401.
    let rebind = "POST /v1/sandboxes/sb_0000000000000000/exec HTTP/1.1\r\nHost: rebind.evil.example\r\n\
                  Origin: http://evil.example\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\
                  Connection: close\r\n\r\n{}";
    assert_eq!(http(&server.http, rebind), 421);
    let get = |key: Option<&str>| {
        let auth = key
            .map(|k| format!("Authorization: Bearer {k}\r\n"))
            .unwrap_or_default();
        format!("GET /v1/codebases HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n")
    };
    assert_eq!(http(&server.http, &get(None)), 401);
    assert_eq!(http(&server.http, &get(Some(&b))), 200);

    // Revocation reaches the running server.
    let id_of = |key: &str| {
        let (_, list, _) = bin(&["keys", "list", "--json", "--data-dir", d], &[]);
        let v: serde_json::Value = serde_json::from_str(&list).unwrap();
        let prefix = format!("key_{}", &key[4..16]);
        v.as_array()
            .unwrap()
            .iter()
            .find(|k| k["id"] == prefix.as_str())
            .map(|k| k["id"].as_str().unwrap().to_owned())
            .unwrap()
    };
    let (code, _, err) = bin(&["keys", "revoke", &id_of(&a), "--data-dir", d], &[]);
    assert_eq!(code, 0, "{err}");
    eventually("revocation", || {
        let (code, _, err) = client(&server, Some(&a), &["codebase", "ls"]);
        code != 0 && err.contains("revoked")
    });

    // Blocking a tenant: its keys stop working; the other tenant's keep working.
    let (code, _, err) = bin(
        &[
            "tenants",
            "block",
            "team-b",
            "--reason",
            "incident 42",
            "--data-dir",
            d,
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    eventually("the block", || {
        let (code, _, err) = client(&server, Some(&b), &["codebase", "ls"]);
        code != 0 && err.contains("blocked")
    });
    assert_eq!(client(&server, Some(&a2), &["codebase", "ls"]).0, 0);
    let (_, tenants, _) = bin(&["tenants", "list", "--data-dir", d], &[]);
    assert!(
        tenants.contains("team-b") && tenants.contains("incident 42"),
        "{tenants}"
    );
    eventually("the tenant_blocked event", || {
        std::fs::read_to_string(data.join("audit.jsonl"))
            .unwrap_or_default()
            .contains("\"tenant_blocked\"")
    });
    server.stop();

    // The trail: who did what, failures with their source, no secret anywhere.
    let audit = std::fs::read_to_string(data.join("audit.jsonl")).unwrap();
    for k in [&a, &a2, &b] {
        assert!(
            !audit.contains(&k[17..]),
            "a secret reached the audit trail"
        );
    }
    let events: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let created = events
        .iter()
        .find(|e| e["event"] == "codebase_created")
        .unwrap();
    assert_eq!(created["tenant"], "team-a");
    assert!(
        created["key_id"].as_str().unwrap().starts_with("key_"),
        "{created}"
    );
    let failed = events
        .iter()
        .find(|e| e["event"] == "authentication_failed")
        .unwrap();
    assert_eq!(failed["source"], "127.0.0.1", "{failed}");
    let blocked = events
        .iter()
        .find(|e| e["event"] == "tenant_blocked")
        .unwrap();
    assert_eq!(
        (&blocked["blocked_tenant"], &blocked["reason"]),
        (&"team-b".into(), &"incident 42".into())
    );
    assert!(
        events
            .iter()
            .all(|e| e.get("tenant").is_some() && e.get("key_id").is_some())
    );
}

fn python() -> String {
    std::env::var("AGENTFENSE_PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

fn sdk(test: &str) -> bool {
    privileged(test)
        && agentfense_testsupport::require(
            test,
            agentfense_testsupport::python_modules(&python(), &["agentfense", "grpc"]),
        )
}

/// Runs a Python script (the SDK's); returns (code, stdout, stderr).
fn py(script: &str, env: &[(&str, &str)], as_uid: Option<u32>) -> (i32, String, String) {
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/python");
    let mut c = match as_uid {
        None => Command::new(python()),
        Some(uid) => {
            let mut c = Command::new("setpriv");
            c.args([
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
                "--",
                &python(),
            ]);
            c
        }
    };
    c.args(["-c", script])
        .env("PYTHONPATH", examples)
        .env("HOME", "/tmp");
    for (k, v) in env {
        c.env(k, v);
    }
    outcome(c.output().unwrap())
}

/// The published SDK, unchanged, over the unix socket: root is an admin, a mapped uid is its
/// tenant (and sees only its own), an unmapped uid is refused; and with the documented key
/// recipe over TCP.
#[test]
fn the_published_sdk_over_the_unix_socket_and_with_a_key() {
    if !sdk("the_published_sdk_over_the_unix_socket_and_with_a_key") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    // The socket outside the (0700) data directory, group 4321, so another uid can connect.
    let run = tmp.path().join("run");
    std::fs::create_dir(&run).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let sock = run.join("agentfense.sock");
    let project = tmp.path().join("project");
    super::util::write_tree(
        &project,
        &[("src/main.py", "print(1)\n"), (".env", "KEY=secret\n")],
    );
    {
        use std::os::unix::fs::PermissionsExt;
        for p in [&project, &project.join("src")] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        for f in ["src/main.py", ".env"] {
            std::fs::set_permissions(project.join(f), std::fs::Permissions::from_mode(0o644))
                .unwrap();
        }
    }
    let mut server = Server::start_with(
        &data,
        &format!(
            "auth:\n  enabled: true\n  unix_users:\n    '4321': alice\nserver:\n  unix_socket: {}\n  unix_socket_group: '4321'\n",
            sock.display()
        ),
    );
    assert_eq!(server.unix.as_deref(), Some(sock.as_path()));
    let endpoint = format!("unix://{}", sock.display());
    let from_local = r#"
import os, sys
from agentfense import Sandbox
with Sandbox.from_local(sys.argv[1] if len(sys.argv) > 1 else os.environ["PROJECT"], preset="agent-safe", endpoint=os.environ["EP"]) as sb:
    r = sb.run("ls -a; cat .env 2>&1; id -u")
    print(r.stdout)
"#;
    let env = [
        ("EP", endpoint.as_str()),
        ("PROJECT", project.to_str().unwrap()),
    ];
    let (code, out, err) = py(from_local, &env, None);
    assert_eq!(code, 0, "{out}{err}\n{}", server.log_text());
    assert!(out.contains("src") && !out.contains("secret"), "{out}");
    // A mapped user works as its tenant; what it creates is alice's.
    let (code, out, err) = py(
        r#"
import os
from agentfense import SandboxClient
c = SandboxClient(endpoint=os.environ["EP"])
cb = c.create_codebase(name="mine", owner_id="somebody-else")
print(cb.owner_id)
print(len(c.list_codebases()))
"#,
        &env,
        Some(4321),
    );
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.lines().collect::<Vec<_>>(), ["alice", "1"], "{out}");
    // An unmapped uid that can reach the socket is refused.
    std::fs::set_permissions(&sock, {
        use std::os::unix::fs::PermissionsExt;
        std::fs::Permissions::from_mode(0o666)
    })
    .unwrap();
    let (code, out, err) = py(
        "import os\nfrom agentfense import SandboxClient\nSandboxClient(endpoint=os.environ['EP']).list_codebases()\n",
        &env,
        Some(4322),
    );
    assert!(
        code != 0 && (out + &err).contains("not in auth.unix_users"),
        "{err}"
    );

    // Over TCP, the documented recipe adds the key; without it the SDK is refused.
    let key = create_key(&data, "bob", &[]);
    let tcp = [
        ("EP", server.grpc.as_str()),
        ("PROJECT", project.to_str().unwrap()),
        ("AGENTFENSE_API_KEY", key.as_str()),
    ];
    let with_recipe = format!(
        "import os, agentfense_auth\nagentfense_auth.use_api_key(os.environ['AGENTFENSE_API_KEY'])\n{from_local}"
    );
    let (code, out, err) = py(&with_recipe, &tcp, None);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("src") && !out.contains("secret"), "{out}");
    let (code, out, err) = py(
        "import os, agentfense_auth\nc = agentfense_auth.authed_client(os.environ['EP'], os.environ['AGENTFENSE_API_KEY'])\nprint([cb.name for cb in c.list_codebases()])\n",
        &tcp,
        None,
    );
    assert_eq!(
        (code, out.trim()),
        (0, "[]"),
        "{err}: bob sees none of the others'"
    );
    let (code, out, err) = py(from_local, &tcp, None);
    assert!(code != 0, "{out}{err}");
    server.stop();
}

/// TLS on both listeners: the published SDK with `secure=True` and a private CA
/// (GRPC_DEFAULT_SSL_ROOTS_FILE_PATH) plus the key recipe; a client certificate (mTLS) is its
/// subject's tenant over gRPC and REST; plaintext is refused.
#[test]
fn tls_and_client_certificates() {
    if !sdk("tls_and_client_certificates") {
        return;
    }
    if !agentfense_testsupport::require(
        "tls_and_client_certificates",
        agentfense_testsupport::openssl(),
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let pki_dir = tmp.path().join("pki");
    std::fs::create_dir(&pki_dir).unwrap();
    agentfense_testsupport::pki(&pki_dir, "team-cert");
    let p = |f: &str| pki_dir.join(f).display().to_string();
    let data = tmp.path().join("data");
    let mut server = Server::start_with(
        &data,
        &format!(
            "auth:\n  enabled: true\nserver:\n  tls:\n    cert: {}\n    key: {}\n    client_ca: {}\n",
            p("srv.pem"),
            p("srv.key"),
            p("ca.pem")
        ),
    );
    assert!(server.http.starts_with("https://"), "{}", server.http);
    let port = server.grpc.rsplit(':').next().unwrap().to_owned();
    let key = create_key(&data, "team-key", &[]);
    let project = tmp.path().join("project");
    super::util::write_tree(&project, &[("a.txt", "hello\n")]);
    let env = [
        ("EP", format!("localhost:{port}")),
        ("PROJECT", project.display().to_string()),
        ("AGENTFENSE_API_KEY", key.clone()),
        ("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH", p("ca.pem")),
        ("HTTPS", server.http.clone()),
        ("CA", p("ca.pem")),
        ("CLI_CERT", p("cli.pem")),
        ("CLI_KEY", p("cli.key")),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    // The published SDK, secure=True, with the key recipe.
    let (code, out, err) = py(
        r#"
import os, agentfense_auth
from agentfense import Sandbox
agentfense_auth.use_api_key(os.environ["AGENTFENSE_API_KEY"])
with Sandbox.from_local(os.environ["PROJECT"], preset="development", endpoint=os.environ["EP"], secure=True) as sb:
    print(sb.run("cat a.txt").stdout.strip())
"#,
        &env,
        None,
    );
    assert_eq!(
        (code, out.trim()),
        (0, "hello"),
        "{err}\n{}",
        server.log_text()
    );
    // A client certificate is its tenant, over gRPC and REST; without one or a key, refused.
    let (code, out, err) = py(
        r#"
import os, json, ssl, urllib.request, grpc
from agentfense._gen import codebase_pb2, codebase_pb2_grpc
read = lambda k: open(os.environ[k], "rb").read()
creds = grpc.ssl_channel_credentials(read("CA"), read("CLI_KEY"), read("CLI_CERT"))
stub = codebase_pb2_grpc.CodebaseServiceStub(grpc.secure_channel(os.environ["EP"], creds))
cb = stub.CreateCodebase(codebase_pb2.CreateCodebaseRequest(name="viacert", owner_id="x"))
print(cb.owner_id)
ctx = ssl.create_default_context(cafile=os.environ["CA"])
ctx.load_cert_chain(os.environ["CLI_CERT"], os.environ["CLI_KEY"])
body = json.load(urllib.request.urlopen(os.environ["HTTPS"] + "/v1/codebases", context=ctx))
print([c["name"] for c in body["codebases"]])
bare = ssl.create_default_context(cafile=os.environ["CA"])
try:
    urllib.request.urlopen(os.environ["HTTPS"] + "/v1/codebases", context=bare)
except urllib.error.HTTPError as e:
    print(e.code)
"#,
        &env,
        None,
    );
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["team-cert", "['viacert']", "401"],
        "{out}"
    );
    // Plaintext gRPC to a TLS listener gets nowhere.
    let (code, _, _) = client(&server, Some(&key), &["codebase", "ls"]);
    assert_ne!(code, 0);
    server.stop();
}
