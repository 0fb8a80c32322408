//! The egress proxy end to end: a sandbox with `agentfense.egress` reaches exactly its
//! allow-list, through the proxy in its own network namespace, with curl and Python; a test
//! host lives in a network namespace this test makes (a veth pair on a private test subnet,
//! allowed through `network.private_allow`).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::server::{Server, privileged};
use super::util::outcome;

/// A test host: a network namespace with an HTTP server on `addr:8000`, reached from the
/// host over a veth pair. Removed on drop.
struct TestHost {
    ns: String,
    veth: String,
    addr: String,
    subnet: String,
    http: Child,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TestHost {
    fn start(root: &Path) -> TestHost {
        let id = std::process::id();
        let net = 16 + (id % 200);
        let (ns, veth, peer) = (format!("aft{id}"), format!("afh{id}"), format!("afn{id}"));
        let (host_addr, addr) = (format!("10.231.{net}.1"), format!("10.231.{net}.2"));
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        let _ = Command::new("ip").args(["link", "del", &veth]).output();
        ip(&["netns", "add", &ns]);
        ip(&["link", "add", &veth, "type", "veth", "peer", "name", &peer]);
        ip(&["link", "set", &peer, "netns", &ns]);
        ip(&["addr", "add", &format!("{host_addr}/24"), "dev", &veth]);
        ip(&["link", "set", &veth, "up"]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            &peer,
        ]);
        ip(&["-n", &ns, "link", "set", &peer, "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        let site = root.join("site");
        std::fs::create_dir_all(&site).unwrap();
        std::fs::write(site.join("ok.txt"), "reached the mirror\n").unwrap();
        let http = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                "python3",
                "-m",
                "http.server",
                "8000",
                "--bind",
            ])
            .arg(&addr)
            .arg("--directory")
            .arg(&site)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let host = TestHost {
            ns,
            veth,
            subnet: format!("10.231.{net}.0/24"),
            addr,
            http,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect((host.addr.as_str(), 8000)).is_err() {
            assert!(Instant::now() < deadline, "the test host never listened");
            std::thread::sleep(Duration::from_millis(50));
        }
        host
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        let _ = self.http.kill();
        let _ = self.http.wait();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .output();
    }
}

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

#[test]
fn a_sandbox_reaches_its_allow_list_and_nothing_else() {
    if !privileged("a_sandbox_reaches_its_allow_list_and_nothing_else") {
        return;
    }
    let missing = agentfense_testsupport::all(&[
        agentfense_testsupport::which("ip")
            .is_none()
            .then(|| "iproute2 (ip) is not installed".to_owned()),
        agentfense_testsupport::which("curl")
            .is_none()
            .then(|| "curl is not installed".to_owned()),
    ]);
    if !agentfense_testsupport::require(
        "a_sandbox_reaches_its_allow_list_and_nothing_else",
        missing,
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let host = TestHost::start(tmp.path());
    let data = tmp.path().join("data");
    let mut server = Server::start_with(
        &data,
        &format!(
            "network:\n  private_allow: ['{}']\n  hosts:\n    mirror.test: ['{}']\n    other.test: ['{}']\n",
            host.subnet, host.addr, host.addr
        ),
    );
    let (code, cb, err) = cli(&server, &["codebase", "create", "net"]);
    assert_eq!(code, 0, "{err}");
    let cb = cb.trim().to_owned();
    let (code, sb, err) = cli(
        &server,
        &[
            "sandbox",
            "create",
            &cb,
            "--label",
            "agentfense.egress=mirror.test:8000",
            "--start",
        ],
    );
    assert_eq!(code, 0, "{err}\n{}", server.log_text());
    let sb = sb.trim().to_owned();
    let run = |cmd: &str| cli(&server, &["exec", &sb, "--", cmd]);
    let status = |url: &str| {
        let (_, out, _) = run(&format!(
            "curl -s -o /dev/null -w '%{{http_code}}' --max-time 10 {url}"
        ));
        out
    };

    // Allowed: by name, through the proxy the environment names, with curl and Python.
    let (code, out, err) = run("curl -sS --max-time 10 http://mirror.test:8000/ok.txt");
    assert_eq!((code, out.as_str()), (0, "reached the mirror\n"), "{err}");
    let (code, out, err) = run(
        "python3 -c \"import urllib.request as u; print(u.urlopen('http://mirror.test:8000/ok.txt', timeout=10).read().decode().strip())\"",
    );
    assert_eq!((code, out.trim()), (0, "reached the mirror"), "{err}");
    // CONNECT to the allowed host:port works too.
    let (code, out, err) = run("curl -sS -p --max-time 10 http://mirror.test:8000/ok.txt");
    assert_eq!((code, out.as_str()), (0, "reached the mirror\n"), "{err}");

    // Refused at once, with the reason: another name (same address), the IP literal, the
    // metadata address, the host's loopback and the server's own API port.
    let grpc_port = server.grpc.rsplit(':').next().unwrap().to_owned();
    for url in [
        "http://other.test:8000/ok.txt".to_owned(),
        format!("http://{}:8000/ok.txt", host.addr),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        format!("http://127.0.0.1:{grpc_port}/"),
        "http://mirror.test:8001/".to_owned(),
    ] {
        let (_, out, _) = run(&format!(
            "curl -s -D - -o /dev/null --noproxy '' --max-time 10 {url}"
        ));
        assert!(out.starts_with("HTTP/1.1 403"), "{url}: {out}");
        assert!(out.contains("X-AgentFense-Deny"), "{url}: {out}");
    }
    assert_eq!(status("http://mirror.test:8000/ok.txt"), "200");
    // Around the proxy there is no way out: no route, no resolver.
    let (code, _, _) = run(&format!(
        "curl -s --noproxy '*' --max-time 5 http://{}:8000/ok.txt",
        host.addr
    ));
    assert_ne!(code, 0, "a direct connection got through");
    let (code, _, _) = run("getent hosts mirror.test || getent hosts pypi.org");
    assert_ne!(code, 0, "names resolve inside the sandbox");

    // The policy can be replaced at run time (REST): allow nothing, then the mirror again.
    let put = |egress: &str| {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT"])
            .args(["-H", "Content-Type: application/json", "-d"])
            .arg(format!("{{\"egress\": \"{egress}\"}}"))
            .arg(format!("{}/v1/sandboxes/{sb}/egress", server.http))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(put(""), "200");
    assert_eq!(status("http://mirror.test:8000/ok.txt"), "403");
    assert_eq!(put("*.com"), "400", "checked like the label");
    assert_eq!(put("mirror.test:8000"), "200");
    assert_eq!(status("http://mirror.test:8000/ok.txt"), "200");

    // A sandbox without the label has no network at all.
    let (_, plain, _) = cli(&server, &["sandbox", "create", &cb, "--start"]);
    let (code, _, _) = cli(
        &server,
        &[
            "exec",
            plain.trim(),
            "--",
            "curl -s --max-time 5 http://mirror.test:8000/ok.txt",
        ],
    );
    assert_ne!(code, 0);
    // Bad policies are refused at create, naming the problem.
    let (code, _, err) = cli(
        &server,
        &[
            "sandbox",
            "create",
            &cb,
            "--label",
            "agentfense.egress=*.com",
        ],
    );
    assert!(code != 0 && err.contains("public suffix"), "{err}");

    for s in [sb.as_str(), plain.trim()] {
        assert_eq!(cli(&server, &["sandbox", "rm", s]).0, 0);
    }
    server.stop();
    let audit = std::fs::read_to_string(data.join("audit.jsonl")).unwrap();
    let net: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == "network_connection")
        .collect();
    assert!(
        net.iter().any(|e| e["host"] == "mirror.test"
            && e["decision"] == "allowed"
            && e["bytes_down"].as_u64() > Some(0)),
        "{net:?}"
    );
    assert!(
        net.iter()
            .any(|e| e["host"] == "other.test" && e["decision"] == "refused"),
        "{net:?}"
    );
    drop(host);
}
