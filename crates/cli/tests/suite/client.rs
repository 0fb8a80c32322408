//! Client commands (`codebase`, `sandbox`, `exec`, `session`) against a real server.

use std::process::Command;

use super::server::{Server, privileged};
use super::util::{outcome, write_tree};

fn cli(server: &Server, args: &[&str]) -> (i32, String, String) {
    // Options go before a `--`, after which everything is the command.
    let split = args.iter().position(|a| *a == "--").unwrap_or(args.len());
    let out = Command::new(env!("CARGO_BIN_EXE_agentfense"))
        .args(&args[..split])
        .args(["--endpoint", &server.grpc])
        .args(&args[split..])
        .output()
        .unwrap();
    outcome(out)
}

#[test]
fn client_commands_drive_a_server() {
    if !privileged("client_commands_drive_a_server") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let project = tmp.path().join("project");
    write_tree(
        &project,
        &[
            ("src/app.py", "print('app')\n"),
            (".gitignore", "build/\n"),
            ("build/out.bin", "ignored by .gitignore\n"),
            (".sandboxignore", "*.tmp\n"),
            ("scratch.tmp", "ignored by .sandboxignore\n"),
            (".env", "SECRET=1\n"),
        ],
    );
    let mut server = Server::start(&tmp.path().join("data"));

    let (code, cb, err) = cli(&server, &["codebase", "upload", project.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let cb = cb.trim().to_owned();
    assert!(cb.starts_with("cb_"));
    let (_, ls, _) = cli(&server, &["codebase", "ls", "--json"]);
    let list: serde_json::Value = serde_json::from_str(&ls).unwrap();
    assert_eq!(list[0]["id"], cb.as_str());
    assert_eq!(
        list[0]["fileCount"], 4,
        "src/app.py, .gitignore, .sandboxignore, .env: {ls}"
    );

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
    let sb = sb.trim().to_owned();
    let (code, out, err) = cli(&server, &["exec", &sb, "--", "ls -a; python3 src/app.py"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("src") && out.contains("app\n") && !out.contains(".env"),
        "{out}"
    );
    assert!(
        !out.contains("build") && !out.contains("scratch"),
        "ignored files were uploaded: {out}"
    );
    let (code, _, err) = cli(&server, &["exec", &sb, "--", "echo oops >&2; exit 3"]);
    assert_eq!((code, err.as_str()), (3, "oops\n"));

    let (code, sess, _) = cli(&server, &["session", "create", &sb]);
    assert_eq!(code, 0);
    let sess = sess.trim().to_owned();
    cli(&server, &["session", "exec", &sess, "--", "cd src"]);
    let (_, pwd, _) = cli(&server, &["session", "exec", &sess, "--", "pwd"]);
    assert_eq!(pwd, "/workspace/src\n");
    let (_, sessions, _) = cli(&server, &["session", "ls", &sb]);
    assert!(sessions.contains(&sess));

    let (_, get, _) = cli(&server, &["sandbox", "get", &sb]);
    assert!(get.contains("running"), "{get}");
    let (code, stop, _) = cli(&server, &["sandbox", "stop", &sb]);
    assert!(code == 0 && stop.contains("stopped"), "{stop}");
    let (code, _, err) = cli(&server, &["exec", &sb, "--", "true"]);
    assert!(code != 0 && err.contains("not running"), "{err}");
    let (code, _, err) = cli(&server, &["codebase", "rm", &cb]);
    assert!(code != 0 && err.contains("destroy them first"), "{err}");
    assert_eq!(cli(&server, &["sandbox", "rm", &sb]).0, 0);
    assert_eq!(cli(&server, &["codebase", "rm", &cb]).0, 0);
    server.stop();

    // A clear message when nothing listens.
    let (code, _, err) = cli(&server, &["codebase", "ls"]);
    assert!(
        code != 0 && err.contains("is `agentfense serve` running"),
        "{err}"
    );
}

/// `server.request_timeout` answers a request that takes longer with DEADLINE_EXCEEDED, and
/// the sandbox stays usable.
#[test]
fn a_request_longer_than_the_request_timeout_is_cut() {
    if !privileged("a_request_longer_than_the_request_timeout_is_cut") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let project = tmp.path().join("project");
    write_tree(&project, &[("a.txt", "a\n")]);
    let server = Server::start_with(&tmp.path().join("data"), "server:\n  request_timeout: 1s\n");
    let (code, cb, err) = cli(&server, &["codebase", "upload", project.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let (code, sb, err) = cli(&server, &["sandbox", "create", cb.trim(), "--start"]);
    assert_eq!(code, 0, "{err}");
    let sb = sb.trim().to_owned();
    // The command would take 20 s (within the 30 s command timeout); the request gets 1 s.
    // Unary exec over REST: 408.
    let base = if server.http.starts_with("http") {
        server.http.clone()
    } else {
        format!("http://{}", server.http)
    };
    let script = format!(
        "import urllib.request, urllib.error\n\
         req = urllib.request.Request('{base}/v1/sandboxes/{sb}/exec', \
           data=b'{{\"command\": \"sleep 20; echo done\"}}', \
           headers={{'Content-Type': 'application/json'}})\n\
         try:\n    print(urllib.request.urlopen(req).status)\n\
         except urllib.error.HTTPError as e:\n    print(e.code)\n"
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(status, "408", "{}", String::from_utf8_lossy(&out.stderr));
    let (code, out, err) = cli(&server, &["exec", &sb, "--", "cat a.txt"]);
    assert_eq!((code, out.as_str()), (0, "a\n"), "{err}");
    // The command of the dropped request is gone, not left running to its own timeout.
    let (_, out, _) = cli(&server, &["exec", &sb, "--", "ps -eo args"]);
    assert!(
        out.contains("ps -eo args") && !out.contains("sleep 20"),
        "{out}"
    );
}

/// A command's changes that cannot be written into the codebase (automatic publish) make the
/// exec fail, saying so, and are audited; they stay in the sandbox and are written by the next
/// publish that can. (Before, the exec returned OK and the user believed they were in.)
#[test]
fn a_failed_publish_is_reported_not_swallowed() {
    let test = "a_failed_publish_is_reported_not_swallowed";
    if !privileged(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut server = Server::start(&data);
    let (code, cb, err) = cli(&server, &["codebase", "create", "pub"]);
    assert_eq!(code, 0, "{err}");
    let cb = cb.trim().to_owned();
    let (code, sb, err) = cli(
        &server,
        &[
            "sandbox",
            "create",
            &cb,
            "--start",
            "--preset",
            "full-access",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let sb = sb.trim().to_owned();
    // An immutable codebase directory: even root cannot create files in it.
    let dir = data.join("codebases").join(&cb);
    let immutable = Command::new("chattr").arg("+i").arg(&dir).status();
    if !agentfense_testsupport::require(
        test,
        (!immutable.is_ok_and(|s| s.success())).then(|| {
            format!(
                "chattr +i on {} (a filesystem with attributes)",
                dir.display()
            )
        }),
    ) {
        return;
    }
    let (code, _, err) = cli(&server, &["exec", &sb, "--", "echo x > new.txt"]);
    let _ = Command::new("chattr").arg("-i").arg(&dir).status();
    assert_ne!(code, 0, "the exec claimed success: {err}");
    assert!(
        err.contains("writing its changes to the codebase failed") && err.contains("exit code 0"),
        "{err}"
    );
    assert!(!dir.join("new.txt").exists());
    // The change is still in the sandbox, and the next command's publish writes it.
    let (code, out, err) = cli(
        &server,
        &["exec", &sb, "--", "cat new.txt; echo y > other.txt"],
    );
    assert_eq!((code, out.as_str()), (0, "x\n"), "{err}");
    assert_eq!(std::fs::read_to_string(dir.join("new.txt")).unwrap(), "x\n");
    assert_eq!(
        std::fs::read_to_string(dir.join("other.txt")).unwrap(),
        "y\n"
    );
    server.stop();
    let audit = std::fs::read_to_string(data.join("audit.jsonl")).unwrap();
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"publish_failed\"") && l.contains(&sb)),
        "{audit}"
    );
}

/// The gRPC and REST ports answer without Nagle's algorithm. A response goes out in several small
/// writes (headers, message, trailers); with Nagle on, the later ones waited for the client's
/// delayed ACK, about 40 ms: every CreateSandbox took ~43 ms and every StartSandbox ~60 ms
/// instead of ~1 and ~11 through the published SDK. Checked at its cause: the option on the
/// server's end of a connection, read through `pidfd_getfd` (root).
#[test]
fn tcp_connections_are_served_without_nagle() {
    if !privileged("tcp_connections_are_served_without_nagle") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"));
    for port in [&server.grpc, &server.http] {
        assert!(
            nodelay_of_server_end(&server, port),
            "TCP_NODELAY is off on the server's end of a connection to {port}"
        );
    }
}

/// TCP_NODELAY on `server`'s end of a new connection to `addr`.
fn nodelay_of_server_end(server: &Server, addr: &str) -> bool {
    use rustix::process::{Pid, PidfdFlags, PidfdGetfdFlags, pidfd_getfd, pidfd_open};
    let addr = addr.trim_start_matches("http://");
    let client = std::net::TcpStream::connect(addr).unwrap();
    let ours = client.local_addr().unwrap();
    let pid = server.child.as_ref().unwrap().id();
    let pidfd = pidfd_open(Pid::from_raw(pid as i32).unwrap(), PidfdFlags::empty()).unwrap();
    // The server's end appears among its descriptors once its accept loop has taken it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let nodelay = loop {
        let found = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter_map(|fd| pidfd_getfd(&pidfd, fd, PidfdGetfdFlags::empty()).ok())
            .find(|fd| {
                rustix::net::getpeername(fd)
                    .ok()
                    .flatten()
                    .and_then(|a| std::net::SocketAddr::try_from(a).ok())
                    == Some(ours)
            });
        if let Some(fd) = found {
            break rustix::net::sockopt::tcp_nodelay(&fd).unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the server never accepted the connection"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    drop(client);
    nodelay
}
