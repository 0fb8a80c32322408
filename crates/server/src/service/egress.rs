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

/// A sandbox's connection events on their way to the audit trail: identical refusals
/// aggregated, and at most [`EVENTS_PER_SECOND`] lines a second whatever their origin (past
/// it, counts only: one `not_recorded` line says how many were not written one by one).
/// Lines go to the trail's bulk queue, never blocking and never pushing out the server's own
/// events.
struct Trail {
    audit: crate::audit::Audit,
    actor: Actor,
    sandbox_id: String,
    state: std::sync::Mutex<TrailState>,
}

/// A refusal being aggregated: when it was last written, how many since, the last reason.
struct Folded {
    last_written: std::time::Instant,
    count: u64,
    detail: String,
}

type RefusalKey = (&'static str, String, u16);

#[derive(Default)]
struct TrailState {
    /// Start of the current second and lines written in it.
    second: Option<std::time::Instant>,
    written: u32,
    /// Events not written one by one since the last `not_recorded` line.
    unwritten: u64,
    recent: std::collections::HashMap<RefusalKey, Folded>,
}

/// One audit line to write.
struct Pending {
    protocol: &'static str,
    decision: &'static str,
    host: String,
    port: u16,
    detail: String,
    count: u64,
    bytes: (u64, u64, u64),
}

impl TrailState {
    /// Takes `line` out of this second's budget: `Some` to write it, `None` when the budget
    /// is spent (its count goes to `unwritten`). A new second first yields the
    /// `not_recorded` line for the one before, if anything went unwritten.
    fn budget(&mut self, now: std::time::Instant, line: Pending, out: &mut Vec<Pending>) {
        if self
            .second
            .is_none_or(|t| now.duration_since(t) >= std::time::Duration::from_secs(1))
        {
            self.second = Some(now);
            self.written = 0;
            let n = std::mem::take(&mut self.unwritten);
            if n > 0 {
                self.written += 1;
                out.push(not_recorded(n));
            }
        }
        if self.written >= EVENTS_PER_SECOND {
            self.unwritten += line.count;
            return;
        }
        self.written += 1;
        out.push(line);
    }

    /// Makes room in the aggregation table: entries older than the window leave it (their
    /// folded counts become lines, through the budget).
    fn evict_stale(&mut self, now: std::time::Instant, out: &mut Vec<Pending>) {
        let stale: Vec<RefusalKey> = self
            .recent
            .iter()
            .filter(|(_, f)| now.duration_since(f.last_written) >= AGGREGATION_WINDOW)
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            if let Some(f) = self.recent.remove(&k)
                && f.count > 0
            {
                self.budget(now, refusal(k, f), out);
            }
        }
    }
}

fn refusal((protocol, host, port): RefusalKey, f: Folded) -> Pending {
    Pending {
        protocol,
        decision: "refused",
        host,
        port,
        detail: f.detail,
        count: f.count,
        bytes: (0, 0, 0),
    }
}

fn not_recorded(n: u64) -> Pending {
    Pending {
        protocol: "*",
        decision: "not_recorded",
        host: String::new(),
        port: 0,
        detail: format!(
            "{n} connection events were not recorded one by one (more than \
             {EVENTS_PER_SECOND} lines a second)"
        ),
        count: n,
        bytes: (0, 0, 0),
    }
}

impl Trail {
    fn event(&self, ev: ConnEvent) {
        let now = std::time::Instant::now();
        let mut out = Vec::new();
        {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let mut count = 1;
            if !ev.allowed {
                let key = (ev.protocol, ev.host.clone(), ev.port);
                match st.recent.get_mut(&key) {
                    Some(f) if now.duration_since(f.last_written) < AGGREGATION_WINDOW => {
                        f.count += 1;
                        f.detail.clone_from(&ev.detail);
                        return;
                    }
                    Some(f) => {
                        count += std::mem::take(&mut f.count);
                        f.last_written = now;
                    }
                    None => {
                        if st.recent.len() >= MAX_TRACKED {
                            st.evict_stale(now, &mut out);
                        }
                        if st.recent.len() < MAX_TRACKED {
                            st.recent.insert(
                                key,
                                Folded {
                                    last_written: now,
                                    count: 0,
                                    detail: String::new(),
                                },
                            );
                        }
                    }
                }
            }
            let line = Pending {
                protocol: ev.protocol,
                decision: if ev.allowed { "allowed" } else { "refused" },
                host: ev.host,
                port: ev.port,
                detail: ev.detail,
                count,
                bytes: (
                    ev.bytes_up,
                    ev.bytes_down,
                    u64::try_from(ev.duration.as_millis()).unwrap_or(u64::MAX),
                ),
            };
            st.budget(now, line, &mut out);
        }
        for line in out {
            self.write(line);
        }
    }

    /// Writes what aggregation still holds (the sandbox is going away), within the budget,
    /// and the count of what was not written one by one.
    fn flush(&self) {
        let mut out = Vec::new();
        {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let now = std::time::Instant::now();
            let drained: Vec<_> = st.recent.drain().collect();
            for (k, f) in drained {
                if f.count > 0 {
                    st.budget(now, refusal(k, f), &mut out);
                }
            }
            let n = std::mem::take(&mut st.unwritten);
            if n > 0 {
                out.push(not_recorded(n));
            }
        }
        for line in out {
            self.write(line);
        }
    }

    fn write(&self, p: Pending) {
        let (bytes_up, bytes_down, duration_ms) = p.bytes;
        self.audit.record_bulk(
            self.actor.clone(),
            AuditEvent::NetworkConnection {
                sandbox_id: self.sandbox_id.clone(),
                protocol: p.protocol.to_owned(),
                host: clip(p.host),
                port: p.port,
                decision: p.decision.to_owned(),
                detail: clip(p.detail),
                count: p.count,
                bytes_up,
                bytes_down,
                duration_ms,
            },
        );
    }
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
            // Keys as the proxy looks names up (lower case, no trailing dot); invalid keys
            // were refused with the configuration.
            hosts: net
                .hosts
                .iter()
                .filter_map(|(k, v)| Some((agentfense_core::egress::normalize_name(k)?, v.clone())))
                .collect(),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A sandbox sending every random name twice (the second folds into the table, which
    /// fills) gets no more lines than the per-second budget allows, and every event is
    /// accounted for in some line's count.
    #[test]
    fn a_refusal_flood_stays_within_the_budget_and_loses_no_count() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let (audit, writer) = crate::audit::Audit::open(&path).unwrap();
        let trail = Trail {
            audit,
            actor: Actor::tenant("t"),
            sandbox_id: "sb_flood".into(),
            state: std::sync::Mutex::default(),
        };
        let started = std::time::Instant::now();
        let n = 5000u64;
        for i in 0..n {
            for _ in 0..2 {
                trail.event(ConnEvent {
                    protocol: "dns",
                    host: format!("{i:x}.example"),
                    port: 53,
                    allowed: false,
                    detail: "not in the allow-list".into(),
                    bytes_up: 0,
                    bytes_down: 0,
                    duration: std::time::Duration::ZERO,
                });
            }
        }
        trail.flush();
        let seconds = started.elapsed().as_secs() + 1;
        drop(trail);
        writer.close();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .filter(|v: &serde_json::Value| v["event"] == "network_connection")
            .collect();
        // Each second's budget, plus the flush's own budget and its summary line.
        let most = (seconds + 1) * u64::from(EVENTS_PER_SECOND) + 2;
        assert!(
            lines.len() as u64 <= most,
            "{} lines in {seconds} s",
            lines.len()
        );
        let counted: u64 = lines.iter().map(|v| v["count"].as_u64().unwrap()).sum();
        assert_eq!(counted, 2 * n, "every refusal is in some line's count");
    }
}
