//! A sandbox's network: the label `agentfense.egress`, its check against the server's
//! presets and ceiling, and the per-sandbox egress proxy, listening on a loopback address
//! inside the sandbox's own network namespace (its only way out).

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use agentfense_core::egress::{EgressPolicy, Target, parse_entry};
use agentfense_egress::{ConnEvent, EgressConfig, Proxy};

use super::Service;
use crate::audit::{Actor, AuditEvent};
use crate::error::ServiceError;

/// Label: the sandbox's egress allow-list (`pypi.org, *.pythonhosted.org, preset:registries,
/// 10.0.0.0/8:5432`); absent = no network at all.
pub const LABEL_EGRESS: &str = "agentfense.egress";

/// Where the proxy listens inside a sandbox (`HTTP_PROXY=http://127.0.0.1:3128`).
pub const PROXY_PORT: u16 = 3128;

/// The proxy environment commands get in a sandbox with an egress policy (request values
/// win).
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

/// A running sandbox's proxy; stops serving when dropped.
pub(crate) struct Egress {
    pub(crate) proxy: Arc<Proxy>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Egress {
    fn drop(&mut self) {
        // Stop accepting, and end every open connection of the sandbox.
        self.task.abort();
        self.proxy.shutdown();
    }
}

/// Connection events written per sandbox and second; past it they are counted and one line
/// per second says how many were not written one by one (a flood of refusals cannot flood
/// the trail or push other events out).
const EVENTS_PER_SECOND: u32 = 50;
/// Longest host or detail written to the trail.
const MAX_FIELD: usize = 256;

fn clip(mut s: String) -> String {
    if s.len() > MAX_FIELD {
        let mut end = MAX_FIELD;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

impl Service {
    /// The egress policy `labels` ask for, checked against the server's presets and
    /// ceiling; `None` without the label.
    pub(crate) fn egress_policy(
        &self,
        labels: &BTreeMap<String, String>,
    ) -> Result<Option<EgressPolicy>, ServiceError> {
        let Some(v) = labels.get(LABEL_EGRESS) else {
            return Ok(None);
        };
        let net = &self.settings.config.network;
        let bad = |e: agentfense_core::egress::EgressError| {
            ServiceError::InvalidArgument(format!("label {LABEL_EGRESS}: {e}"))
        };
        let policy = EgressPolicy::parse(v, &net.presets).map_err(bad)?;
        if let Some(c) = &net.ceiling {
            let ceiling = EgressPolicy::parse(&c.join(","), &net.presets).map_err(bad)?;
            policy.check_within(&ceiling).map_err(bad)?;
        }
        Ok(Some(policy))
    }

    fn egress_config(&self) -> EgressConfig {
        let net = &self.settings.config.network;
        let private_allow = net
            .private_allow
            .iter()
            .filter_map(|c| match parse_entry(c).ok()?.target {
                Target::Block(b) => Some(b),
                _ => None,
            })
            .collect();
        let mut refused = vec![self.settings.grpc_addr];
        refused.extend(self.settings.http_addr);
        EgressConfig {
            private_allow,
            hosts: net.hosts.clone(),
            refused,
            connect_timeout: std::time::Duration::from_secs(10),
        }
    }

    /// Replaces a sandbox's egress policy (`PUT /v1/sandboxes/{id}/egress`): checked like the
    /// label, kept in its labels (a restart keeps it), and, while it runs, applied to its
    /// proxy at once; open connections the new policy does not allow are closed. An empty
    /// value allows nothing. A sandbox created without an egress policy has no proxy, so it
    /// cannot be given one this way (FAILED_PRECONDITION).
    pub async fn set_egress(
        self: &Arc<Self>,
        caller: &crate::auth::Caller,
        sandbox_id: &str,
        value: &str,
    ) -> Result<(), ServiceError> {
        let id = Service::sandbox_id(sandbox_id)?;
        self.sandbox_for(caller, &id).await?;
        let lock = self.engine.lock(&id);
        let _g = lock.lock().await;
        let mut rec = self.sandbox_for(caller, &id).await?;
        if !rec.labels.contains_key(LABEL_EGRESS) {
            return Err(ServiceError::FailedPrecondition(format!(
                "sandbox {id} was created without label {LABEL_EGRESS} (no network at all); \
                 create it with one to change it later"
            )));
        }
        let mut labels = rec.labels.clone();
        labels.insert(LABEL_EGRESS.to_owned(), value.to_owned());
        let policy = self.egress_policy(&labels)?.unwrap_or_default();
        let store = self.store.clone();
        let (id2, l2) = (id.clone(), labels.clone());
        super::blocking(move || Ok(store.update_labels(&id2, &l2)?)).await?;
        rec.labels = labels;
        if let Some(live) = self.engine.live(&id)
            && let Some(e) = &live.egress
        {
            e.proxy.set_policy(policy);
        }
        self.audit.record_as(
            caller.actor(),
            AuditEvent::EgressChanged {
                sandbox_id: id.to_string(),
                egress: value.to_owned(),
            },
        );
        Ok(())
    }

    /// Starts the sandbox's proxy inside its network namespace `netns`.
    pub(crate) async fn start_egress(
        self: &Arc<Self>,
        sandbox_id: &str,
        tenant: &str,
        policy: EgressPolicy,
        netns: OwnedFd,
    ) -> Result<Egress, ServiceError> {
        // A socket belongs to the namespace it was made in: make the listener on a thread
        // that enters the sandbox's namespace and then ends (never a pooled thread).
        let listener = std::thread::spawn(move || -> std::io::Result<std::net::TcpListener> {
            rustix::thread::move_into_link_name_space(
                std::os::fd::AsFd::as_fd(&netns),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )?;
            let l = std::net::TcpListener::bind(("127.0.0.1", PROXY_PORT))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .join()
        .map_err(|_| ServiceError::internal("egress proxy", "listener thread panicked"))?
        .map_err(|e| ServiceError::internal("egress proxy listener in the sandbox", e))?;
        let listener = tokio::net::TcpListener::from_std(listener)
            .map_err(|e| ServiceError::internal("egress proxy listener", e))?;
        let audit = self.audit.clone();
        let actor = Actor::tenant(tenant);
        let sid = sandbox_id.to_owned();
        let window = std::sync::Mutex::new((std::time::Instant::now(), 0u32, 0u64));
        let proxy = Proxy::new(policy, self.egress_config(), move |ev: ConnEvent| {
            let suppressed = {
                let mut w = window.lock().unwrap_or_else(|p| p.into_inner());
                let mut dropped = 0;
                if w.0.elapsed() >= std::time::Duration::from_secs(1) {
                    dropped = w.2;
                    *w = (std::time::Instant::now(), 0, 0);
                }
                w.1 += 1;
                if w.1 > EVENTS_PER_SECOND {
                    w.2 += 1;
                    None
                } else {
                    Some(dropped)
                }
            };
            let Some(dropped) = suppressed else { return };
            if dropped > 0 {
                audit.record_as(
                    actor.clone(),
                    AuditEvent::NetworkConnection {
                        sandbox_id: sid.clone(),
                        host: "*".into(),
                        port: 0,
                        decision: "not_recorded".into(),
                        detail: format!(
                            "{dropped} connections in the second before were not recorded one by \
                             one (more than {EVENTS_PER_SECOND} a second)"
                        ),
                        bytes_up: 0,
                        bytes_down: 0,
                        duration_ms: 0,
                    },
                );
            }
            audit.record_as(
                actor.clone(),
                AuditEvent::NetworkConnection {
                    sandbox_id: sid.clone(),
                    host: clip(ev.host),
                    port: ev.port,
                    decision: if ev.allowed { "allowed" } else { "refused" }.to_owned(),
                    detail: clip(ev.detail),
                    bytes_up: ev.bytes_up,
                    bytes_down: ev.bytes_down,
                    duration_ms: ev.duration.as_millis() as u64,
                },
            );
        });
        let task = tokio::spawn(proxy.clone().serve_tcp(listener));
        Ok(Egress { proxy, task })
    }
}
