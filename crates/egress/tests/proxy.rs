//! The proxy over a real unix socket, against destinations on loopback (allowed through
//! `private_allow` here, as a test subnet would be).

// Helpers may unwrap: a panic there is a test failure with a backtrace.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use agentfense_core::egress::{Cidr, EgressPolicy};
use agentfense_egress::{ConnEvent, EgressConfig, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener, UnixStream};

/// A destination that records what it receives and answers `hello` (then echoes).
async fn destination() -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            let s = s.clone();
            tokio::spawn(async move {
                let _ = c.write_all(b"hello").await;
                let mut buf = [0u8; 4096];
                while let Ok(n) = c.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    s.lock().unwrap().extend_from_slice(&buf[..n]);
                    if c.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, seen)
}

struct Setup {
    sock: std::path::PathBuf,
    proxy: Arc<Proxy>,
    events: Arc<Mutex<Vec<ConnEvent>>>,
    _dir: tempfile::TempDir,
}

fn loopback() -> Cidr {
    Cidr::new("127.0.0.0".parse().unwrap(), 8).unwrap()
}

async fn setup(policy: &str, cfg: EgressConfig) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("egress.sock");
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev = events.clone();
    let proxy = Proxy::new(
        EgressPolicy::parse(policy, &BTreeMap::new()).unwrap(),
        cfg,
        move |e| ev.lock().unwrap().push(e),
    );
    tokio::spawn(proxy.clone().serve(UnixListener::bind(&sock).unwrap()));
    Setup {
        sock,
        proxy,
        events,
        _dir: dir,
    }
}

/// Sends `request`, returns the client connection and what came back first.
async fn send(s: &Setup, request: &str) -> (UnixStream, String) {
    let mut c = UnixStream::connect(&s.sock).await.unwrap();
    c.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = c.read(&mut buf).await.unwrap();
    (c, String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[tokio::test]
async fn connect_to_an_allowed_block_tunnels_bytes() {
    let (dest, seen) = destination().await;
    let s = setup(
        &format!("127.0.0.1:{}", dest.port()),
        EgressConfig {
            private_allow: vec![loopback()],
            ..Default::default()
        },
    )
    .await;
    let (mut c, head) = send(
        &s,
        &format!("CONNECT 127.0.0.1:{} HTTP/1.1\r\n\r\n", dest.port()),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut hello = [0u8; 5];
    c.read_exact(&mut hello).await.unwrap();
    assert_eq!(&hello, b"hello");
    c.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    c.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"ping");
    assert_eq!(seen.lock().unwrap().as_slice(), b"ping");
}

#[tokio::test]
async fn refusals_are_immediate_explained_and_reported() {
    let (dest, seen) = destination().await;
    let mut hosts = BTreeMap::new();
    let lo: IpAddr = "127.0.0.1".parse().unwrap();
    hosts.insert("mirror.test".to_owned(), vec![lo]);
    hosts.insert("other.test".to_owned(), vec![lo]);
    let s = setup(
        &format!("mirror.test:{}", dest.port()),
        EgressConfig {
            hosts,
            ..Default::default()
        },
    )
    .await;
    let p = dest.port();
    for (req, says) in [
        // Allowed by name, but the name leads to loopback, which nothing allows here.
        (
            format!("CONNECT mirror.test:{p} HTTP/1.1\r\n\r\n"),
            "loopback",
        ),
        (
            format!("CONNECT other.test:{p} HTTP/1.1\r\n\r\n"),
            "not in the allow-list",
        ),
        (
            format!("CONNECT 127.0.0.1:{p} HTTP/1.1\r\n\r\n"),
            "address block",
        ),
        (
            "CONNECT 169.254.169.254:80 HTTP/1.1\r\n\r\n".to_owned(),
            "address block",
        ),
        (
            "GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_owned(),
            "this is a proxy",
        ),
    ] {
        let (_, head) = send(&s, &req).await;
        assert!(
            head.starts_with("HTTP/1.1 403") || head.starts_with("HTTP/1.1 400"),
            "{req}: {head}"
        );
        assert!(head.contains(says), "{req}: {head}");
    }
    let (_, head) = send(&s, &format!("CONNECT other.test:{p} HTTP/1.1\r\n\r\n")).await;
    assert!(head.contains("X-AgentFense-Deny: other.test"), "{head}");
    assert!(
        seen.lock().unwrap().is_empty(),
        "nothing reached the destination"
    );
    let ev = s.events.lock().unwrap();
    assert!(ev.iter().all(|e| !e.allowed));
    assert!(ev.iter().any(|e| e.host == "other.test" && e.port == p));
}

#[tokio::test]
async fn plain_http_is_forwarded_in_origin_form_one_request_per_connection() {
    let (dest, seen) = destination().await;
    let mut hosts = BTreeMap::new();
    hosts.insert("mirror.test".to_owned(), vec!["127.0.0.1".parse().unwrap()]);
    let s = setup(
        &format!("mirror.test:{}", dest.port()),
        EgressConfig {
            hosts,
            private_allow: vec![loopback()],
            ..Default::default()
        },
    )
    .await;
    let p = dest.port();
    let (_c, first) = send(
        &s,
        &format!(
            "GET http://mirror.test:{p}/simple/?q=1 HTTP/1.1\r\nHost: mirror.test:{p}\r\n\
             Proxy-Connection: keep-alive\r\nProxy-Authorization: Basic eA==\r\nUser-Agent: t\r\n\r\n"
        ),
    )
    .await;
    assert!(first.starts_with("hello"), "{first}");
    // The destination saw an origin-form request, without proxy headers, closing after it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !String::from_utf8_lossy(&seen.lock().unwrap()).ends_with("\r\n\r\n") {
        assert!(
            std::time::Instant::now() < deadline,
            "request never arrived"
        );
        tokio::task::yield_now().await;
    }
    let got = String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
    assert!(got.starts_with("GET /simple/?q=1 HTTP/1.1\r\n"), "{got}");
    assert!(
        got.contains("Connection: close\r\n") && got.contains("User-Agent: t"),
        "{got}"
    );
    assert!(!got.to_ascii_lowercase().contains("proxy-"), "{got}");
    // A Host header naming another site is refused.
    let (_, head) = send(
        &s,
        &format!("GET http://mirror.test:{p}/ HTTP/1.1\r\nHost: secret.internal\r\n\r\n"),
    )
    .await;
    assert!(
        head.starts_with("HTTP/1.1 403") && head.contains("does not match"),
        "{head}"
    );
    // So is a second Host header (servers that take the last one would serve another site).
    let (_, head) = send(
        &s,
        &format!(
            "GET http://mirror.test:{p}/ HTTP/1.1\r\nHost: mirror.test:{p}\r\nHost: secret.internal\r\n\r\n"
        ),
    )
    .await;
    assert!(head.contains("more than one Host"), "{head}");
}

#[tokio::test]
async fn the_servers_own_address_is_refused_always() {
    let (dest, _) = destination().await;
    let s = setup(
        &format!("127.0.0.1:{}", dest.port()),
        EgressConfig {
            private_allow: vec![loopback()],
            refused: vec![dest],
            ..Default::default()
        },
    )
    .await;
    let (_, head) = send(
        &s,
        &format!("CONNECT 127.0.0.1:{} HTTP/1.1\r\n\r\n", dest.port()),
    )
    .await;
    assert!(head.contains("own address"), "{head}");
}

#[tokio::test]
async fn a_policy_change_closes_what_it_no_longer_allows() {
    let (dest, _) = destination().await;
    let s = setup(
        &format!("127.0.0.1:{}", dest.port()),
        EgressConfig {
            private_allow: vec![loopback()],
            ..Default::default()
        },
    )
    .await;
    let (mut c, head) = send(
        &s,
        &format!("CONNECT 127.0.0.1:{} HTTP/1.1\r\n\r\n", dest.port()),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut hello = [0u8; 5];
    c.read_exact(&mut hello).await.unwrap();
    s.proxy
        .set_policy(EgressPolicy::parse("", &BTreeMap::new()).unwrap());
    // The tunnel ends: reads reach EOF (or fail), whatever the client sends.
    let _ = c.write_all(b"more").await;
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest).await;
    assert!(!String::from_utf8_lossy(&rest).contains("more"), "{rest:?}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if s.events
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.detail.contains("no longer allows"))
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no closing event");
        tokio::task::yield_now().await;
    }
}

/// A TLS ClientHello naming `sni`, as a real client sends it.
fn client_hello(sni: &str) -> Vec<u8> {
    use tokio_rustls::rustls;
    #[allow(deprecated)]
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(sni.to_owned()).unwrap();
    let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

/// In a tunnel to a name, a TLS client must ask for that name: another SNI (a different site
/// behind the same address, or domain fronting) is cut off at once.
#[tokio::test]
async fn a_tunnel_carries_only_tls_for_its_own_name() {
    let (dest, seen) = destination().await;
    let mut hosts = BTreeMap::new();
    hosts.insert("mirror.test".to_owned(), vec!["127.0.0.1".parse().unwrap()]);
    let s = setup(
        &format!("mirror.test:{}", dest.port()),
        EgressConfig {
            hosts,
            private_allow: vec![loopback()],
            ..Default::default()
        },
    )
    .await;
    let p = dest.port();
    // Another name: the tunnel opens (the proxy cannot know before), then closes without a
    // byte of the ClientHello reaching the destination.
    let (mut c, head) = send(&s, &format!("CONNECT mirror.test:{p} HTTP/1.1\r\n\r\n")).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    c.write_all(&client_hello("secret.example")).await.unwrap();
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest).await;
    assert!(
        !seen.lock().unwrap().contains(&0x16),
        "the ClientHello reached the destination"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if s.events
            .lock()
            .unwrap()
            .iter()
            .any(|e| !e.allowed && e.detail.contains("does not match"))
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no refusal event");
        tokio::task::yield_now().await;
    }
    // The right name passes through, ClientHello and all (sent with the CONNECT here).
    let mut req = format!("CONNECT mirror.test:{p} HTTP/1.1\r\n\r\n").into_bytes();
    req.extend(client_hello("mirror.test"));
    let mut c = UnixStream::connect(&s.sock).await.unwrap();
    c.write_all(&req).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !seen.lock().unwrap().starts_with(&[0x16]) {
        assert!(
            std::time::Instant::now() < deadline,
            "the ClientHello never arrived"
        );
        tokio::task::yield_now().await;
    }
    // Not TLS at all (here: plain bytes) passes unchecked.
    let (mut c, _) = send(&s, &format!("CONNECT mirror.test:{p} HTTP/1.1\r\n\r\n")).await;
    c.write_all(b"SSH-2.0-test\r\n").await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !String::from_utf8_lossy(&seen.lock().unwrap()).contains("SSH-2.0-test") {
        assert!(
            std::time::Instant::now() < deadline,
            "plain bytes never arrived"
        );
        tokio::task::yield_now().await;
    }
}
