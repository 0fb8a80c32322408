//! A proxy serving one sandbox: its listeners made inside the sandbox's network namespace
//! (the proxy on `127.0.0.1:3128`, the DNS server on `127.0.0.1:53`, UDP and TCP), and the
//! environment that points the sandbox's tools at them.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use crate::Proxy;

/// Where the proxy listens inside a sandbox (`HTTP_PROXY=http://127.0.0.1:3128`).
pub const PROXY_PORT: u16 = 3128;

/// The proxy environment commands get in a sandbox with an egress policy: `HTTP_PROXY`,
/// `HTTPS_PROXY`, `ALL_PROXY` and `NO_PROXY`, upper and lower case.
pub fn proxy_env() -> Vec<(String, String)> {
    let url = format!("http://127.0.0.1:{PROXY_PORT}");
    let mut v = Vec::new();
    for k in ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"] {
        v.push((k.to_owned(), url.clone()));
        v.push((k.to_ascii_lowercase(), url.clone()));
    }
    let no = "localhost,127.0.0.1,::1".to_owned();
    v.push(("NO_PROXY".to_owned(), no.clone()));
    v.push(("no_proxy".to_owned(), no));
    v
}

/// A proxy serving a sandbox; stops (every connection ends) when dropped.
pub struct Serving {
    /// The proxy (to change its policy).
    pub proxy: Arc<Proxy>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Serving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serving").finish_non_exhaustive()
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.proxy.shutdown();
    }
}

impl Proxy {
    /// Serves the sandbox whose network namespace is `netns`, on the current tokio runtime.
    pub fn serve_sandbox(self: &Arc<Self>, netns: OwnedFd) -> std::io::Result<Serving> {
        type Sockets = (
            std::net::TcpListener,
            std::net::UdpSocket,
            std::net::TcpListener,
        );
        // A socket belongs to the namespace it was made in: make them on a thread that enters
        // the sandbox's namespace and then ends (never a pooled thread).
        let sockets = std::thread::spawn(move || -> std::io::Result<Sockets> {
            rustix::thread::move_into_link_name_space(
                std::os::fd::AsFd::as_fd(&netns),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )?;
            let proxy = std::net::TcpListener::bind(("127.0.0.1", PROXY_PORT))?;
            // The sandbox's resolver (`nameserver 127.0.0.1` in its /etc/resolv.conf).
            let dns_udp = std::net::UdpSocket::bind(("127.0.0.1", 53))?;
            let dns_tcp = std::net::TcpListener::bind(("127.0.0.1", 53))?;
            proxy.set_nonblocking(true)?;
            dns_udp.set_nonblocking(true)?;
            dns_tcp.set_nonblocking(true)?;
            Ok((proxy, dns_udp, dns_tcp))
        })
        .join()
        .map_err(|_| std::io::Error::other("the listener thread panicked"))??;
        let listener = tokio::net::TcpListener::from_std(sockets.0)?;
        let dns_udp = tokio::net::UdpSocket::from_std(sockets.1)?;
        let dns_tcp = tokio::net::TcpListener::from_std(sockets.2)?;
        Ok(Serving {
            proxy: self.clone(),
            tasks: vec![
                tokio::spawn(self.clone().serve_tcp(listener)),
                tokio::spawn(self.clone().serve_dns_udp(dns_udp)),
                tokio::spawn(self.clone().serve_dns_tcp(dns_tcp)),
            ],
        })
    }
}
