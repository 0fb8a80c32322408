//! A sandbox's network: the label `agentfense.egress`, its check against the server's
//! presets and ceiling, and the per-sandbox egress proxy, listening on a loopback address
//! inside the sandbox's own network namespace (its only way out).

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use agentfense_core::egress::{EgressPolicy, Target, parse_entry};
use agentfense_egress::{ConnEvent, EgressConfig, Proxy, Upstream};

use super::Service;
use crate::audit::{Actor, AuditEvent};
use crate::error::ServiceError;

/// Label: the sandbox's egress allow-list (`pypi.org, *.pythonhosted.org, preset:registries,
/// 10.0.0.0/8:5432`); absent = no network at all.
pub const LABEL_EGRESS: &str = "agentfense.egress";

pub use agentfense_egress::{PROXY_PORT, proxy_env};

/// A running sandbox's proxy and DNS server; stop serving when dropped.
pub(crate) struct Egress {
    pub(crate) serving: agentfense_egress::Serving,
    trail: Arc<Trail>,
}

impl Drop for Egress {
    fn drop(&mut self) {
        // Stopping (the proxy ends every open connection of the sandbox) comes with
        // `serving`; what aggregation still holds is written now.
        self.trail.flush();
    }
}

/// Identical refusals (same protocol, host and port) closer together than this are folded
/// into one `network_connection` line with a `count`, like filesystem denials.
const AGGREGATION_WINDOW: std::time::Duration = std::time::Duration::from_secs(1);
/// Most distinct refusals tracked for aggregation at once.
const MAX_TRACKED: usize = 1024;

/// A sandbox's connection events on their way to the audit trail: refusals aggregated, and
/// at most [`EVENTS_PER_SECOND`] lines a second (past it, one line per second says how many
/// were not written one by one).
struct Trail {
    audit: crate::audit::Audit,
    actor: Actor,
    sandbox_id: String,
    state: std::sync::Mutex<TrailState>,
}

#[derive(Default)]
struct TrailState {
    /// Start of the current second, lines written in it, events not written.
    second: Option<std::time::Instant>,
    written: u32,
    unwritten: u64,
    /// Refusals seen: when one was last written, how many since, the last reason.
    recent:
        std::collections::HashMap<(&'static str, String, u16), (std::time::Instant, u64, String)>,
}

impl Trail {
    fn event(&self, ev: ConnEvent) {
        let now = std::time::Instant::now();
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut count = 1;
        if !ev.allowed {
            let key = (ev.protocol, ev.host.clone(), ev.port);
            match st.recent.get_mut(&key) {
                Some(seen) if now.duration_since(seen.0) < AGGREGATION_WINDOW => {
                    seen.1 += 1;
                    seen.2 = ev.detail;
                    return;
                }
                Some(seen) => {
                    count += std::mem::take(&mut seen.1);
                    seen.0 = now;
                }
                None => {
                    if st.recent.len() >= MAX_TRACKED {
                        let drained: Vec<_> = st.recent.drain().collect();
                        drop(st);
                        for ((protocol, host, port), (_, n, detail)) in drained {
                            self.refusals(protocol, host, port, detail, n);
                        }
                        st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                    }
                    st.recent.insert(key, (now, 0, String::new()));
                }
            }
        }
        let unwritten = match st.second {
            Some(t) if now.duration_since(t) < std::time::Duration::from_secs(1) => 0,
            _ => {
                st.second = Some(now);
                st.written = 0;
                std::mem::take(&mut st.unwritten)
            }
        };
        st.written += 1;
        if st.written > EVENTS_PER_SECOND {
            st.unwritten += count;
            return;
        }
        drop(st);
        if unwritten > 0 {
            self.write(
                "*",
                "not_recorded",
                String::new(),
                0,
                format!(
                    "{unwritten} connections in the second before were not recorded one by one \
                     (more than {EVENTS_PER_SECOND} lines a second)"
                ),
                unwritten,
                (0, 0, 0),
            );
        }
        let bytes = (
            ev.bytes_up,
            ev.bytes_down,
            u64::try_from(ev.duration.as_millis()).unwrap_or(u64::MAX),
        );
        let decision = if ev.allowed { "allowed" } else { "refused" };
        self.write(
            ev.protocol,
            decision,
            ev.host,
            ev.port,
            ev.detail,
            count,
            bytes,
        );
    }

    /// Writes the refusals still folded into the table (the sandbox is going away).
    fn flush(&self) {
        let drained: Vec<_> = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            st.recent.drain().collect()
        };
        for ((protocol, host, port), (_, n, detail)) in drained {
            self.refusals(protocol, host, port, detail, n);
        }
    }

    fn refusals(&self, protocol: &str, host: String, port: u16, detail: String, n: u64) {
        if n > 0 {
            self.write(protocol, "refused", host, port, detail, n, (0, 0, 0));
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        protocol: &str,
        decision: &str,
        host: String,
        port: u16,
        detail: String,
        count: u64,
        (bytes_up, bytes_down, duration_ms): (u64, u64, u64),
    ) {
        self.audit.record_as(
            self.actor.clone(),
            AuditEvent::NetworkConnection {
                sandbox_id: self.sandbox_id.clone(),
                protocol: protocol.to_owned(),
                host: clip(host),
                port,
                decision: decision.to_owned(),
                detail: clip(detail),
                count,
                bytes_up,
                bytes_down,
                duration_ms,
            },
        );
    }
}

/// Connection lines written per sandbox and second; past it events are counted and one line
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

    fn egress_config(&self) -> Result<EgressConfig, ServiceError> {
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
        let upstream = net
            .upstream_dns_addrs()
            .map_err(|e| ServiceError::internal("network.upstream_dns", e))?;
        Ok(EgressConfig {
            private_allow,
            hosts: net.hosts.clone(),
            refused,
            connect_timeout: std::time::Duration::from_secs(10),
            // One resolver per sandbox: no sandbox learns from another's cache.
            upstream: Upstream::servers(&upstream),
        })
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
            e.serving.proxy.set_policy(policy);
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
        let trail = Arc::new(Trail {
            audit: self.audit.clone(),
            actor: Actor::tenant(tenant),
            sandbox_id: sandbox_id.to_owned(),
            state: std::sync::Mutex::default(),
        });
        let sink = trail.clone();
        let proxy = Proxy::new(policy, self.egress_config()?, move |ev: ConnEvent| {
            sink.event(ev)
        });
        let serving = proxy
            .serve_sandbox(netns)
            .map_err(|e| ServiceError::internal("egress proxy listeners in the sandbox", e))?;
        Ok(Egress { serving, trail })
    }
}
