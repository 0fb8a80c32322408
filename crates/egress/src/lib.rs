//! The egress proxy: a sandbox's only way out of its network namespace.
//!
//! A sandbox has no route anywhere; its tools reach the network through this proxy (HTTP
//! `CONNECT`, plain HTTP in absolute form, SOCKS5 with the name resolved here), which allows
//! exactly the destinations of the sandbox's [`EgressPolicy`], and resolve names through its
//! DNS server, which answers only allowed names and sends nothing else upstream:
//!
//! * a name must be allowed by a name entry, an IP literal by an address block;
//! * the proxy resolves names itself, and refuses any destination address that is loopback,
//!   private, link-local, multicast, unspecified, shared (CGNAT), a cloud metadata address or
//!   one of the server's own listening addresses, unless `private_allow` covers it (the
//!   server's own addresses never);
//! * plain HTTP must name the same host in its `Host` header as in its request line;
//! * every decision (and, for allowed connections, bytes each way and duration) is reported
//!   as a [`ConnEvent`].
//!
//! A refused request gets `403` with the reason in the body and in `X-AgentFense-Deny`, at
//! once. The policy can be replaced while connections are open ([`Proxy::set_policy`]);
//! connections it no longer allows are closed.

mod decide;
mod dns;
mod http;
mod resolve;
mod sandbox;
mod socks;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

pub use agentfense_core::egress::{Cidr, EgressPolicy};
pub use decide::{AddressClass, Decision, METADATA, classify, wholly_private};
pub use resolve::Upstream;
pub use sandbox::{PROXY_PORT, Serving, proxy_env};

/// What the proxy knows besides the policy.
#[derive(Debug, Clone, Default)]
pub struct EgressConfig {
    /// Address blocks that may be reached although they are private or local
    /// (`network.private_allow`).
    pub private_allow: Vec<Cidr>,
    /// Static names (`network.hosts`): resolved to these addresses, never through DNS.
    pub hosts: std::collections::BTreeMap<String, Vec<std::net::IpAddr>>,
    /// Addresses never reachable, whatever the policy (the server's own listeners).
    pub refused: Vec<SocketAddr>,
    /// How long connecting to a destination may take.
    pub connect_timeout: Duration,
    /// Where names not in `hosts` are resolved (`network.upstream_dns`; default: the
    /// system's resolver).
    pub upstream: Upstream,
}

/// One connection's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnEvent {
    /// How the sandbox asked: `connect`, `http`, `socks5` or `dns`.
    pub protocol: &'static str,
    /// The host as the client asked for it (a name or an address).
    pub host: String,
    /// The port.
    pub port: u16,
    /// Allowed (and connected), or not.
    pub allowed: bool,
    /// The entry that allowed it, or why it was refused.
    pub detail: String,
    /// Bytes from the sandbox to the destination.
    pub bytes_up: u64,
    /// Bytes from the destination to the sandbox.
    pub bytes_down: u64,
    /// How long the connection lasted.
    pub duration: Duration,
}

type Sink = Arc<dyn Fn(ConnEvent) + Send + Sync>;

/// One sandbox's proxy.
pub struct Proxy {
    policy: RwLock<Arc<EgressPolicy>>,
    cfg: EgressConfig,
    events: Sink,
    /// Bumped by each policy change: open connections re-check themselves.
    generation: tokio::sync::watch::Sender<u64>,
    /// Connections served at once; more are closed at accept.
    slots: Arc<tokio::sync::Semaphore>,
    /// Set by [`Proxy::shutdown`]: every connection ends.
    closed: std::sync::atomic::AtomicBool,
    /// This sandbox's lookups in progress: one sandbox cannot take every slot of the
    /// server-wide limit (slow names would stall everyone's resolution).
    lookups: tokio::sync::Semaphore,
    /// Lookups started in the current second (start, count): at most
    /// [`LOOKUPS_PER_SECOND`], so that random names under an allowed wildcard cannot load
    /// the upstream resolver on the whole server's behalf.
    lookup_rate: std::sync::Mutex<(std::time::Instant, u32)>,
}

/// DNS lookups one sandbox may start per second (cached answers included).
pub const LOOKUPS_PER_SECOND: u32 = 100;

/// DNS lookups one sandbox may have in progress at once (all sandboxes together: 128).
pub const LOOKUPS_PER_SANDBOX: usize = 8;

/// Connections one sandbox's proxy serves at once.
pub const MAX_CONNECTIONS: usize = 256;

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy").finish_non_exhaustive()
    }
}

impl Proxy {
    /// A proxy allowing `policy`, reporting each connection to `events`.
    pub fn new(
        policy: EgressPolicy,
        cfg: EgressConfig,
        events: impl Fn(ConnEvent) + Send + Sync + 'static,
    ) -> Arc<Proxy> {
        let mut cfg = cfg;
        if cfg.connect_timeout.is_zero() {
            cfg.connect_timeout = Duration::from_secs(10);
        }
        Arc::new(Proxy {
            policy: RwLock::new(Arc::new(policy)),
            cfg,
            events: Arc::new(events),
            generation: tokio::sync::watch::Sender::new(0),
            slots: Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)),
            closed: std::sync::atomic::AtomicBool::new(false),
            lookups: tokio::sync::Semaphore::new(LOOKUPS_PER_SANDBOX),
            lookup_rate: std::sync::Mutex::new((std::time::Instant::now(), 0)),
        })
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<EgressPolicy> {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Ends every connection (the sandbox is going away).
    pub fn shutdown(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Whether [`Proxy::shutdown`] was called.
    fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Replaces the policy; open connections it no longer allows are closed.
    pub fn set_policy(&self, policy: EgressPolicy) {
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policy);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Serves connections from `listener` until it fails (it is dropped with the sandbox).
    pub async fn serve(self: Arc<Self>, listener: tokio::net::UnixListener) {
        loop {
            match listener.accept().await {
                Ok((conn, _)) => {
                    let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                        continue; // over the limit: dropped (closed) at once
                    };
                    let this = self.clone();
                    tokio::spawn(async move {
                        this.handle(conn).await;
                        drop(slot);
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "egress proxy accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Serves connections from a TCP listener (one made inside the sandbox's network
    /// namespace, where its tools find the proxy at a loopback address).
    pub async fn serve_tcp(self: Arc<Self>, listener: tokio::net::TcpListener) {
        loop {
            match listener.accept().await {
                Ok((conn, _)) => {
                    let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                        continue; // over the limit: dropped (closed) at once
                    };
                    let _ = conn.set_nodelay(true);
                    let this = self.clone();
                    tokio::spawn(async move {
                        this.handle(conn).await;
                        drop(slot);
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "egress proxy accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn report(&self, ev: ConnEvent) {
        (self.events)(ev);
    }
}
