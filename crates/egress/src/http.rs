//! The proxy's protocol side: HTTP `CONNECT`, absolute-form plain HTTP and SOCKS5, and the
//! relay they share.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{ConnEvent, Decision, Proxy, socks};

/// Largest request head accepted.
const MAX_HEAD: usize = 16 * 1024;
/// How long a client may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// Buffer of each direction of a tunnel.
const COPY_BUF: usize = 64 << 10;

/// A connection with no traffic either way for this long is closed.
const IDLE: Duration = Duration::from_secs(300);

/// The client side of a connection, noting the time of its last traffic (ms after `origin`).
struct Touch<S> {
    inner: S,
    last: std::sync::Arc<std::sync::atomic::AtomicU64>,
    origin: Instant,
}

impl<S> Touch<S> {
    fn touch(&self) {
        let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, std::sync::atomic::Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Touch<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Touch<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = std::pin::Pin::new(&mut this.inner).poll_write(cx, data);
        if let std::task::Poll::Ready(Ok(n)) = &r
            && *n > 0
        {
            this.touch();
        }
        r
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// What a tunnel's first client bytes are.
#[derive(Debug, PartialEq, Eq)]
enum Hello {
    /// Neither TLS nor HTTP (SSH, a server-first protocol): nothing to check.
    NotTls,
    /// A plain HTTP request line: its `Host` header picks the site behind the address, and
    /// later requests on the connection could pick others, so it must come as an
    /// absolute-form request (checked), not through a tunnel.
    Http,
    /// TLS, not all of the ClientHello yet.
    Incomplete,
    /// A ClientHello, with its server name if it has one.
    Name(Option<String>),
    /// TLS that does not parse as a ClientHello.
    Bad,
}

/// Whether `buf` (from the tunnel's first byte) starts with an HTTP request line
/// (`METHOD target HTTP/x`); `None` while it cannot tell yet.
fn http_request_line(buf: &[u8]) -> Option<bool> {
    // Servers skip empty lines before a request, and some take methods in any case.
    let start = buf
        .iter()
        .take_while(|b| matches!(b, b'\r' | b'\n'))
        .count();
    if start == buf.len() {
        return if buf.len() < MAX_HEAD {
            None
        } else {
            Some(false)
        };
    }
    let buf = &buf[start..];
    // A method is any token (RFC 9110 `tchar`s), whatever its length: a server may take
    // methods it does not know.
    let tchar = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b);
    let token = buf.iter().take_while(|b| tchar(b)).count();
    match buf.get(token) {
        None if start + buf.len() < MAX_HEAD => return None,
        Some(b' ') if token > 0 => {}
        _ => return Some(false),
    }
    match buf.iter().position(|b| *b == b'\n') {
        Some(end) => {
            let line = buf[..end].strip_suffix(b"\r").unwrap_or(&buf[..end]);
            Some(line.len() > 9 && line[line.len() - 9..].starts_with(b" HTTP/"))
        }
        None if buf.len() < MAX_HEAD => None,
        None => Some(false),
    }
}

/// Whether `buf` holds whole TLS records only (a ClientHello is worth parsing only then:
/// re-parsing at every byte of a slow sender would cost quadratic time).
fn whole_records(buf: &[u8]) -> bool {
    let mut i = 0;
    while i + 5 <= buf.len() {
        i += 5 + usize::from(u16::from_be_bytes([buf[i + 3], buf[i + 4]]));
    }
    i == buf.len()
}

/// Inspects the start of a tunnel (`buf` from its first byte).
fn inspect(buf: &[u8]) -> Hello {
    match buf.first() {
        None => return Hello::Incomplete,
        Some(0x16) => {}
        Some(_) => {
            return match http_request_line(buf) {
                None => Hello::Incomplete,
                Some(true) => Hello::Http,
                Some(false) => Hello::NotTls,
            };
        }
    }
    if !whole_records(buf) {
        return Hello::Incomplete;
    }
    let mut acceptor = tokio_rustls::rustls::server::Acceptor::default();
    let mut rd: &[u8] = buf;
    while !rd.is_empty() {
        match acceptor.read_tls(&mut rd) {
            Ok(0) => break,
            Ok(_) => {}
            Err(_) => return Hello::Bad,
        }
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => Hello::Name(accepted.client_hello().server_name().map(str::to_owned)),
        Ok(None) => Hello::Incomplete,
        Err(_) => Hello::Bad,
    }
}

/// The client's first bytes in a tunnel: `already` (sent with the CONNECT) plus what follows,
/// until they are known not to be TLS or hold a whole ClientHello (at most [`MAX_HEAD`] bytes,
/// within [`HEAD_TIMEOUT`]); and what they are. Whatever they are, they are forwarded if
/// allowed.
async fn first_client_bytes<R: AsyncRead + Unpin>(r: &mut R, already: Vec<u8>) -> (Vec<u8>, Hello) {
    let mut buf = already;
    let mut chunk = [0u8; 4096];
    let read = async {
        loop {
            let seen = inspect(&buf);
            if seen != Hello::Incomplete || buf.len() >= MAX_HEAD {
                return seen;
            }
            match r.read(&mut chunk).await {
                Ok(0) | Err(_) => return inspect(&buf),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let seen = tokio::time::timeout(HEAD_TIMEOUT, read)
        .await
        .unwrap_or(Hello::Incomplete);
    (buf, seen)
}

/// Hop-by-hop and proxy headers never forwarded to a destination.
const DROPPED: [&str; 5] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
];

/// Reads until the end of the request head; returns its length (the buffer may hold more).
async fn read_head<S: AsyncRead + Unpin>(
    conn: &mut S,
    buf: &mut Vec<u8>,
) -> std::io::Result<usize> {
    let mut chunk = [0u8; 4096];
    let mut scanned: usize = 0;
    loop {
        // Only the new bytes (and the three before them) can complete the terminator.
        let from = scanned.saturating_sub(3);
        if let Some(i) = buf[from..].windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(from + i + 4);
        }
        scanned = buf.len();
        if buf.len() >= MAX_HEAD {
            return Err(std::io::Error::other("request head too large"));
        }
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// `host:port` (or `[v6]:port`); `default` when the port is absent.
fn split_authority(auth: &str, default: Option<u16>) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = auth.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        (h, after.strip_prefix(':'))
    } else {
        match auth.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h, Some(p)),
            Some(_) => return None,
            None => (auth, None),
        }
    };
    let port = match port {
        Some(p) => p.parse::<u16>().ok().filter(|p| *p > 0)?,
        None => default?,
    };
    (!host.is_empty()).then(|| (host.to_owned(), port))
}

fn response(status: &str, reason: &str) -> Vec<u8> {
    let clean: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let body = format!("agentfense: egress refused: {clean}\n");
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nX-AgentFense-Deny: {clean}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

async fn connect(addrs: &[SocketAddr], timeout: Duration) -> std::io::Result<TcpStream> {
    let mut last = std::io::Error::other("no address");
    for a in addrs {
        match tokio::time::timeout(timeout, TcpStream::connect(a)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Ok(Err(e)) => last = e,
            Err(_) => last = std::io::ErrorKind::TimedOut.into(),
        }
    }
    Err(last)
}

/// How the client asked: the protocol decides how success and refusal are said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Front {
    /// `CONNECT host:port`.
    Connect,
    /// A plain HTTP request in absolute form.
    Http,
    /// SOCKS5 `CONNECT`.
    Socks,
}

impl Front {
    fn protocol(self) -> &'static str {
        match self {
            Front::Connect => "connect",
            Front::Http => "http",
            Front::Socks => "socks5",
        }
    }
}

/// Why a connection fails, in the client protocol's terms.
#[derive(Debug, Clone, Copy)]
enum Failure {
    /// The client's request is malformed (400; SOCKS general failure).
    BadRequest,
    /// The policy refuses it (403; SOCKS "not allowed by ruleset").
    Forbidden,
    /// The destination could not be reached (502; SOCKS "connection refused").
    Unreachable,
}

/// Says `reason` to the client in its protocol's terms.
async fn fail<S: AsyncWrite + Unpin>(conn: &mut S, front: Front, why: Failure, reason: &str) {
    let msg = match front {
        Front::Socks => {
            let code = match why {
                Failure::BadRequest => 1,
                Failure::Forbidden => 2,
                Failure::Unreachable => 5,
            };
            socks::reply(code)
        }
        Front::Connect | Front::Http => response(
            match why {
                Failure::BadRequest => "400 Bad Request",
                Failure::Forbidden => "403 Forbidden",
                Failure::Unreachable => "502 Bad Gateway",
            },
            reason,
        ),
    };
    let _ = conn.write_all(&msg).await;
    let _ = conn.flush().await;
}

/// What the client asked for.
struct Request {
    front: Front,
    host: String,
    port: u16,
    /// For plain HTTP: the rewritten request head to send first.
    forward_head: Option<Vec<u8>>,
    /// Client bytes already read past the request.
    rest: Vec<u8>,
}

impl Proxy {
    /// Serves one client connection: HTTP (`CONNECT` or absolute form) or SOCKS5, told apart
    /// by the first byte.
    pub(crate) async fn handle<S: AsyncRead + AsyncWrite + Unpin>(&self, conn: S) {
        let started = Instant::now();
        // Subscribed before anything is decided: a policy change from here on is seen.
        let generation = self.generation.subscribe();
        let activity = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut conn = Touch {
            inner: conn,
            last: activity.clone(),
            origin: started,
        };
        let mut first = [0u8; 1];
        match tokio::time::timeout(HEAD_TIMEOUT, conn.read(&mut first)).await {
            Ok(Ok(1)) => {}
            _ => return,
        }
        let req = if first[0] == socks::VERSION {
            match tokio::time::timeout(HEAD_TIMEOUT, socks::handshake(&mut conn)).await {
                Ok(Ok((host, port))) => Request {
                    front: Front::Socks,
                    host,
                    port,
                    forward_head: None,
                    rest: Vec::new(),
                },
                Ok(Err(socks::Refusal { code, reason })) => {
                    if let Some(code) = code {
                        let _ = conn.write_all(&socks::reply(code)).await;
                    }
                    tracing::debug!(%reason, "SOCKS5 request refused");
                    return;
                }
                Err(_) => return,
            }
        } else {
            match self.http_request(&mut conn, first[0], started).await {
                Some(r) => r,
                None => return,
            }
        };
        self.relay(conn, req, started, generation, activity).await;
    }

    /// Reads and checks an HTTP request whose first byte is `first`; `None` when it was
    /// answered (refused) already.
    async fn http_request<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        conn: &mut S,
        first: u8,
        started: Instant,
    ) -> Option<Request> {
        let mut buf = Vec::with_capacity(4096);
        buf.push(first);
        let head_len = match tokio::time::timeout(HEAD_TIMEOUT, read_head(conn, &mut buf)).await {
            Ok(Ok(n)) => n,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return None,
            _ => {
                fail(
                    conn,
                    Front::Http,
                    Failure::BadRequest,
                    "no complete request head",
                )
                .await;
                return None;
            }
        };
        let mut headers = [httparse::EMPTY_HEADER; 96];
        let mut req = httparse::Request::new(&mut headers);
        let parsed = matches!(
            req.parse(&buf[..head_len]),
            Ok(httparse::Status::Complete(_))
        );
        let (Some(method), Some(target), true) = (req.method, req.path, parsed) else {
            fail(conn, Front::Http, Failure::BadRequest, "malformed request").await;
            return None;
        };
        let method = method.to_owned();
        let target = target.to_owned();
        let rest = buf[head_len..].to_vec();
        if method.eq_ignore_ascii_case("CONNECT") {
            let Some((host, port)) = split_authority(&target, None) else {
                fail(
                    conn,
                    Front::Connect,
                    Failure::BadRequest,
                    "CONNECT needs host:port",
                )
                .await;
                return None;
            };
            return Some(Request {
                front: Front::Connect,
                host,
                port,
                forward_head: None,
                rest,
            });
        }
        let lower = target.to_ascii_lowercase();
        let Some(after) = lower.strip_prefix("http://").map(|_| &target[7..]) else {
            let why = if lower.starts_with("https://") {
                "https:// goes through CONNECT (set HTTPS_PROXY)"
            } else {
                "this is a proxy: send CONNECT host:port or an absolute http:// URL"
            };
            fail(conn, Front::Http, Failure::BadRequest, why).await;
            return None;
        };
        let end = after.find(['/', '?', '#']).unwrap_or(after.len());
        let (auth, path) = after.split_at(end);
        let path = if path.is_empty() || path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_owned()
        };
        let Some((host, port)) = split_authority(auth.rsplit('@').next().unwrap_or(auth), Some(80))
        else {
            fail(
                conn,
                Front::Http,
                Failure::BadRequest,
                "bad host in the URL",
            )
            .await;
            return None;
        };
        // The Host header must name the same destination: a server behind one allowed
        // address must not be asked for another of its sites.
        let mut hosts = req
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("host"));
        let host_header = hosts.next().and_then(|h| std::str::from_utf8(h.value).ok());
        if hosts.next().is_some() {
            let reason = "more than one Host header";
            self.refused(Front::Http, &host, port, reason, started);
            fail(conn, Front::Http, Failure::BadRequest, reason).await;
            return None;
        }
        if let Some(h) = host_header {
            let same = split_authority(h.trim(), Some(80))
                .is_some_and(|(hh, hp)| hh.eq_ignore_ascii_case(&host) && hp == port);
            if !same {
                let reason = format!("Host {h:?} does not match the URL's {host}:{port}");
                self.refused(Front::Http, &host, port, &reason, started);
                fail(conn, Front::Http, Failure::Forbidden, &reason).await;
                return None;
            }
        }
        let mut head = format!("{method} {path} HTTP/1.1\r\n").into_bytes();
        for h in req.headers.iter() {
            if DROPPED.iter().any(|d| h.name.eq_ignore_ascii_case(d)) {
                continue;
            }
            head.extend_from_slice(h.name.as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(h.value);
            head.extend_from_slice(b"\r\n");
        }
        if host_header.is_none() {
            head.extend_from_slice(format!("Host: {auth}\r\n").as_bytes());
        }
        // One request per connection: the next one is decided afresh.
        head.extend_from_slice(b"Connection: close\r\n\r\n");
        Some(Request {
            front: Front::Http,
            host,
            port,
            forward_head: Some(head),
            rest,
        })
    }

    /// Decides, connects and relays one request until either side ends, the policy stops
    /// allowing it or it idles out.
    async fn relay<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut conn: Touch<S>,
        req: Request,
        started: Instant,
        mut generation: tokio::sync::watch::Receiver<u64>,
        activity: std::sync::Arc<std::sync::atomic::AtomicU64>,
    ) {
        let Request {
            front,
            host,
            port,
            forward_head,
            rest,
        } = req;
        let (addrs, rule) = match self.decide(&host, port).await {
            Decision::Allow { addrs, rule } => (addrs, rule),
            Decision::Deny(reason) => {
                self.refused(front, &host, port, &reason, started);
                fail(&mut conn, front, Failure::Forbidden, &reason).await;
                return;
            }
        };
        let mut upstream = match connect(&addrs, self.cfg.connect_timeout).await {
            Ok(s) => s,
            Err(e) => {
                let reason = format!("cannot connect to {host}:{port}: {e}");
                self.refused(front, &host, port, &reason, started);
                fail(&mut conn, front, Failure::Unreachable, &reason).await;
                return;
            }
        };
        // An address of this host (a public or global one, which no class catches) reaches
        // whatever listens on all interfaces: refused, unless `private_allow` names it.
        if let (Ok(local), Ok(peer)) = (upstream.local_addr(), upstream.peer_addr())
            && local.ip() == peer.ip()
            && !self.cfg.private_allow.iter().any(|c| c.contains(peer.ip()))
        {
            let reason = format!("{} is an address of the proxy's own host", peer.ip());
            self.refused(front, &host, port, &reason, started);
            fail(&mut conn, front, Failure::Forbidden, &reason).await;
            return;
        }
        if !self.still_allowed(&host, port) {
            let reason = "the policy changed while connecting";
            self.refused(front, &host, port, reason, started);
            fail(&mut conn, front, Failure::Forbidden, reason).await;
            return;
        }
        // A tunnel to a name: the TLS server name its client asks for must be that name.
        let sni_for = (front != Front::Http && host.parse::<std::net::IpAddr>().is_err())
            .then(|| agentfense_core::egress::normalize_name(&host))
            .flatten();
        let setup = async {
            match (&forward_head, front) {
                (Some(head), _) => upstream.write_all(head).await?,
                (None, Front::Socks) => conn.write_all(&socks::reply(0)).await?,
                (None, _) => {
                    conn.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                        .await?
                }
            }
            if sni_for.is_none() {
                upstream.write_all(&rest).await?;
            }
            Ok::<(), std::io::Error>(())
        };
        if setup.await.is_err() {
            return;
        }
        let (mut cr, mut cw) = tokio::io::split(conn);
        let (mut ur, mut uw) = upstream.into_split();
        let down = async {
            // Large reads: a download moves in few syscalls (copy's own buffer is 8 KiB).
            let mut ur = tokio::io::BufReader::with_capacity(COPY_BUF, &mut ur);
            let n = tokio::io::copy_buf(&mut ur, &mut cw).await.unwrap_or(0);
            let _ = cw.shutdown().await;
            n
        };
        let up = async {
            let mut sent = 0u64;
            if let Some(name) = &sni_for {
                let (first, seen) = first_client_bytes(&mut cr, rest).await;
                match seen {
                    Hello::NotTls => {}
                    Hello::Http => {
                        return Err(format!(
                            "plain HTTP through a tunnel to {name} (its Host header is not \
                             checked there): send it as an absolute-form request \
                             (HTTP_PROXY), or use HTTPS"
                        ));
                    }
                    Hello::Name(Some(sni)) if sni.eq_ignore_ascii_case(name) => {}
                    Hello::Name(Some(sni)) => {
                        return Err(format!(
                            "the TLS server name {sni:?} does not match the tunnel's host {name}"
                        ));
                    }
                    Hello::Name(None) => {
                        return Err(format!(
                            "a TLS tunnel to {name} must name it (no server name sent)"
                        ));
                    }
                    Hello::Incomplete | Hello::Bad => {
                        return Err("not a complete TLS ClientHello".to_owned());
                    }
                }
                if uw.write_all(&first).await.is_err() {
                    return Ok(0);
                }
                sent = first.len() as u64;
            }
            let mut cr = tokio::io::BufReader::with_capacity(COPY_BUF, &mut cr);
            let n = tokio::io::copy_buf(&mut cr, &mut uw).await.unwrap_or(0);
            let _ = uw.shutdown().await;
            Ok(sent + n)
        };
        tokio::pin!(up, down);
        let (mut up_n, mut down_n) = (None, None);
        let mut detail = rule.clone();
        let mut tick = tokio::time::interval(IDLE / 4);
        let (up, down) = loop {
            if let (Some(u), Some(d)) = (up_n, down_n) {
                break (u, d);
            }
            tokio::select! {
                r = &mut up, if up_n.is_none() => match r {
                    Ok(n) => up_n = Some(n),
                    Err(reason) => {
                        self.refused(front, &host, port, &reason, started);
                        return;
                    }
                },
                n = &mut down, if down_n.is_none() => down_n = Some(n),
                changed = generation.changed() => {
                    if changed.is_err() || !self.still_allowed(&host, port) {
                        detail = format!("{rule}; closed: the policy no longer allows it");
                        break (up_n.unwrap_or(0), down_n.unwrap_or(0));
                    }
                }
                _ = tick.tick() => {
                    let last = Duration::from_millis(activity.load(std::sync::atomic::Ordering::Relaxed));
                    if started.elapsed().saturating_sub(last) >= IDLE {
                        detail = format!("{rule}; closed: idle for {} s", IDLE.as_secs());
                        break (up_n.unwrap_or(0), down_n.unwrap_or(0));
                    }
                }
            }
        };
        self.report(ConnEvent {
            protocol: front.protocol(),
            host,
            port,
            allowed: true,
            detail,
            bytes_up: up,
            bytes_down: down,
            duration: started.elapsed(),
        });
    }

    fn still_allowed(&self, host: &str, port: u16) -> bool {
        if self.is_closed() {
            return false;
        }
        let policy = self.policy();
        match host.parse::<std::net::IpAddr>() {
            Ok(ip) => policy.allows_ip(ip, port).is_some(),
            Err(_) => policy.allows_name(host, port).is_some(),
        }
    }

    fn refused(&self, front: Front, host: &str, port: u16, reason: &str, started: Instant) {
        self.report(ConnEvent {
            protocol: front.protocol(),
            host: host.to_owned(),
            port,
            allowed: false,
            detail: reason.to_owned(),
            bytes_up: 0,
            bytes_down: 0,
            duration: started.elapsed(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities() {
        assert_eq!(
            split_authority("pypi.org:443", None),
            Some(("pypi.org".into(), 443))
        );
        assert_eq!(
            split_authority("pypi.org", Some(80)),
            Some(("pypi.org".into(), 80))
        );
        assert_eq!(split_authority("pypi.org", None), None);
        assert_eq!(
            split_authority("[::1]:8080", None),
            Some(("::1".into(), 8080))
        );
        assert_eq!(
            split_authority("::1:80", None),
            None,
            "bare v6 is ambiguous"
        );
        assert_eq!(split_authority("h:0", None), None);
        assert_eq!(split_authority(":80", None), None);
    }

    #[test]
    fn http_inside_a_tunnel_is_recognised() {
        assert_eq!(
            http_request_line(b"GET / HTTP/1.1\r\nHost: x\r\n"),
            Some(true)
        );
        assert_eq!(http_request_line(b"\r\n\r\nget /x HTTP/1.0\n"), Some(true));
        assert_eq!(
            http_request_line(b"PRI * HTTP/2.0\r\n"),
            Some(true),
            "h2c preface"
        );
        assert_eq!(http_request_line(b"GE"), None);
        assert_eq!(http_request_line(b"GET /long/path"), None);
        assert_eq!(http_request_line(b"\r\n"), None);
        assert_eq!(http_request_line(b"SSH-2.0-OpenSSH\r\n"), Some(false));
        assert_eq!(
            http_request_line(b"EHLO mail.example\r\n"),
            Some(false),
            "SMTP"
        );
        assert_eq!(http_request_line(b"\x00\x01"), Some(false));
        assert_eq!(
            http_request_line(b"VERYLONGCUSTOMMETHODNAME / HTTP/1.1\r\n"),
            Some(true),
            "an unknown method is still HTTP"
        );
        assert_eq!(http_request_line(b"M-SEARCH * HTTP/1.1\r\n"), Some(true));
        assert_eq!(inspect(b"GET / HTTP/1.1\r\n"), Hello::Http);
        assert_eq!(inspect(b"SSH-2.0-x\r\n"), Hello::NotTls);
    }

    #[test]
    fn tls_records_are_parsed_only_when_whole() {
        assert!(!whole_records(&[0x16, 3, 1, 0, 10, 1, 2]));
        assert!(whole_records(&[0x16, 3, 1, 0, 2, 1, 2]));
        assert!(!whole_records(&[0x16, 3, 1]));
        assert_eq!(inspect(&[0x16, 3, 1, 0x40, 0]), Hello::Incomplete);
    }

    #[test]
    fn refusals_cannot_inject_headers() {
        let r = String::from_utf8(response("403 Forbidden", "a\r\nSet-Cookie: x")).unwrap();
        assert!(!r.contains("\r\nSet-Cookie"), "{r}");
        assert!(r.contains("X-AgentFense-Deny: a  Set-Cookie: x"), "{r}");
    }
}
