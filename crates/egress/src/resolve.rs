//! Name resolution: static names (`network.hosts`) first, then the system's resolver or the
//! configured upstream servers (`network.upstream_dns`). Only names the policy allows ever get
//! here; the proxy and the sandbox's DNS server both come through [`Proxy::resolve`].

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfig, NameServerConfigGroup, ResolveHosts, ResolverConfig,
    ResolverOpts,
};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;

use crate::Proxy;

/// DNS lookups in progress at once, all sandboxes together (asynchronous: a slow one holds
/// a slot, no thread).
static LOOKUPS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(128);
/// Longest a lookup may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Where names are resolved: the system's configuration (`/etc/resolv.conf`, `/etc/hosts`)
/// or these DNS servers, by an asynchronous resolver with a cache (positive and negative
/// answers, for their TTLs). `Default` falls back to `getaddrinfo` (a blocking thread per
/// lookup) and is what a system without a readable `resolv.conf` gets.
#[derive(Clone, Default)]
pub struct Upstream(Option<Arc<hickory_resolver::TokioResolver>>);

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Upstream(async resolver)"
        } else {
            "Upstream(getaddrinfo)"
        })
    }
}

impl Upstream {
    /// The system's resolver configuration.
    pub fn system() -> Upstream {
        match hickory_resolver::Resolver::builder_tokio() {
            Ok(mut b) => {
                let o = b.options_mut();
                o.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
                o.cache_size = 1024;
                o.timeout = o.timeout.min(Duration::from_secs(4));
                Upstream(Some(Arc::new(b.build())))
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the system's resolver configuration; egress names resolve with getaddrinfo");
                Upstream(None)
            }
        }
    }

    /// These DNS servers (UDP, then TCP for truncated answers), nothing else: no hosts file,
    /// no search domains.
    pub fn servers(addrs: &[SocketAddr]) -> Upstream {
        if addrs.is_empty() {
            return Upstream::system();
        }
        let group: Vec<NameServerConfig> = addrs
            .iter()
            .flat_map(|a| {
                [
                    NameServerConfig::new(*a, Protocol::Udp),
                    NameServerConfig::new(*a, Protocol::Tcp),
                ]
            })
            .collect();
        let cfg = ResolverConfig::from_parts(None, vec![], NameServerConfigGroup::from(group));
        let mut opts = ResolverOpts::default();
        opts.ndots = 0;
        opts.timeout = Duration::from_secs(4);
        opts.attempts = 2;
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        opts.use_hosts_file = ResolveHosts::Never;
        opts.cache_size = 1024;
        let r = hickory_resolver::Resolver::builder_with_config(
            cfg,
            TokioConnectionProvider::default(),
        )
        .with_options(opts)
        .build();
        Upstream(Some(Arc::new(r)))
    }

    /// The addresses of `name` (normalized, no trailing dot).
    async fn lookup(&self, name: &str) -> Result<Vec<IpAddr>, String> {
        let Ok(_permit) = LOOKUPS.acquire().await else {
            return Err("resolver unavailable".into());
        };
        // Fully qualified: no search domain applies.
        let fqdn = format!("{name}.");
        let found = async {
            match &self.0 {
                None => tokio::net::lookup_host((fqdn.as_str(), 0))
                    .await
                    .map(|it| it.map(|a| a.ip()).collect::<Vec<_>>())
                    .map_err(|e| e.to_string()),
                Some(r) => r
                    .lookup_ip(fqdn.as_str())
                    .await
                    .map(|l| l.iter().collect())
                    .map_err(|e| e.to_string()),
            }
        };
        match tokio::time::timeout(LOOKUP_TIMEOUT, found).await {
            Ok(Ok(v)) if !v.is_empty() => Ok(v),
            Ok(Ok(_)) => Err(format!("{name} has no address")),
            Ok(Err(e)) => Err(format!("{name} does not resolve: {e}")),
            Err(_) => Err(format!("resolving {name} timed out")),
        }
    }
}

impl Proxy {
    /// The addresses of an allowed `name` (normalized): `network.hosts` first, then DNS.
    pub(crate) async fn resolve(&self, name: &str) -> Result<Vec<IpAddr>, String> {
        match self.cfg.hosts.get(name) {
            Some(ips) => Ok(ips.clone()),
            None => {
                {
                    let mut r = self.lookup_rate.lock().unwrap_or_else(|p| p.into_inner());
                    if r.0.elapsed() >= Duration::from_secs(1) {
                        *r = (std::time::Instant::now(), 0);
                    }
                    r.1 += 1;
                    if r.1 > crate::LOOKUPS_PER_SECOND {
                        return Err(format!(
                            "more than {} DNS lookups a second in this sandbox",
                            crate::LOOKUPS_PER_SECOND
                        ));
                    }
                }
                let Ok(_mine) = self.lookups.acquire().await else {
                    return Err("resolver unavailable".into());
                };
                self.cfg.upstream.lookup(name).await
            }
        }
    }
}
