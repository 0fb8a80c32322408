//! Built-in alert rules over the audit trail's events, and their delivery.
//!
//! The rules run in the audit writer's thread, on every event as it is written (so they cost a
//! request nothing and see exactly what the trail records). An alert is an `alert` audit
//! record written right after the event that raised it, a metric (`agentfense_alerts_total`)
//! and, when `alerts.webhook_url` is set, a JSON POST from a thread of its own, retried with
//! backoff while the receiver is down, never blocking anything: past [`QUEUE`] waiting alerts,
//! the oldest are given up (and counted).
//!
//! Rate rules count per key (a sandbox, or a tenant) in windows that start at the key's first
//! event: one alert per key and window, when the count first passes the threshold.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::audit::{Actor, AuditEvent};

/// How urgent an alert is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Worth a look.
    Low,
    /// Investigate.
    Medium,
    /// Act now.
    High,
}

impl Severity {
    /// `low`, `medium`, `high`.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
        }
    }
}

/// A rule that fires when more than `threshold` events happen within `window`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateRule {
    /// Off: never fires.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Fires when the count passes this (0: at the first event).
    pub threshold: u64,
    /// The counting window.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// The alert's severity.
    pub severity: Severity,
}

/// A rule that fires when more than `threshold` failures come in a row.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreakRule {
    /// Off: never fires.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Fires when the streak passes this.
    pub threshold: u64,
    /// The alert's severity.
    pub severity: Severity,
}

/// A rule that fires when something lasts longer than `after`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgeRule {
    /// Off: never fires.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Fires past this age.
    #[serde(with = "humantime_serde")]
    pub after: Duration,
    /// The alert's severity.
    pub severity: Severity,
}

fn yes() -> bool {
    true
}

/// `alerts.*`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// Where alerts are POSTed as JSON (`http://` or `https://`); empty: nowhere.
    pub webhook_url: String,
    /// Permission denials per sandbox (default more than 10 a minute, medium).
    pub permission_denials: RateRule,
    /// Resource limits hit per sandbox (default any, high).
    pub resource_limits: RateRule,
    /// Sandboxes created per tenant (default more than 100 an hour, medium).
    pub sandbox_creations: RateRule,
    /// Sessions open longer than this (default 1 hour, low).
    pub long_sessions: AgeRule,
    /// Failed sandbox starts in a row per tenant (default more than 3, high).
    pub failed_starts: StreakRule,
    /// Egress refusals per sandbox (default more than 20 a minute, medium).
    pub egress_refusals: RateRule,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        let min = Duration::from_secs(60);
        AlertsConfig {
            webhook_url: String::new(),
            permission_denials: RateRule {
                enabled: true,
                threshold: 10,
                window: min,
                severity: Severity::Medium,
            },
            resource_limits: RateRule {
                enabled: true,
                threshold: 0,
                window: min,
                severity: Severity::High,
            },
            sandbox_creations: RateRule {
                enabled: true,
                threshold: 100,
                window: Duration::from_secs(3600),
                severity: Severity::Medium,
            },
            long_sessions: AgeRule {
                enabled: true,
                after: Duration::from_secs(3600),
                severity: Severity::Low,
            },
            failed_starts: StreakRule {
                enabled: true,
                threshold: 3,
                severity: Severity::High,
            },
            egress_refusals: RateRule {
                enabled: true,
                threshold: 20,
                window: min,
                severity: Severity::Medium,
            },
        }
    }
}

/// Rule names, as in `alert` records, metrics and webhook bodies.
pub mod rule {
    /// More than the threshold of denials in a window, per sandbox.
    pub const PERMISSION_DENIALS: &str = "permission_denials";
    /// A resource limit hit, per sandbox.
    pub const RESOURCE_LIMITS: &str = "resource_limits";
    /// Too many sandboxes created in a window, per tenant.
    pub const SANDBOX_CREATIONS: &str = "sandbox_creations";
    /// A session open too long.
    pub const LONG_SESSIONS: &str = "long_sessions";
    /// Too many failed starts in a row, per tenant.
    pub const FAILED_STARTS: &str = "failed_starts";
    /// Too many egress refusals in a window, per sandbox.
    pub const EGRESS_REFUSALS: &str = "egress_refusals";
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start: SystemTime,
    count: u64,
    fired: bool,
}

/// The rules' state (owned by the audit writer's thread).
#[derive(Debug)]
pub struct Rules {
    config: AlertsConfig,
    rates: HashMap<(&'static str, String), Window>,
    streaks: HashMap<String, (u64, bool)>,
}

impl Rules {
    /// Rules with `config`.
    pub fn new(config: AlertsConfig) -> Rules {
        Rules {
            config,
            rates: HashMap::new(),
            streaks: HashMap::new(),
        }
    }

    fn rate(
        &mut self,
        name: &'static str,
        rule: &RateRule,
        key: &str,
        n: u64,
        at: SystemTime,
    ) -> Option<(u64, Duration)> {
        if !rule.enabled {
            return None;
        }
        // Bounded state: windows long over are forgotten.
        if self.rates.len() > 100_000 {
            self.rates.retain(|_, w| {
                at.duration_since(w.start)
                    .is_ok_and(|age| age < Duration::from_secs(24 * 3600))
            });
        }
        let w = self.rates.entry((name, key.to_owned())).or_insert(Window {
            start: at,
            count: 0,
            fired: false,
        });
        if at
            .duration_since(w.start)
            .is_ok_and(|age| age >= rule.window)
        {
            *w = Window {
                start: at,
                count: 0,
                fired: false,
            };
        }
        w.count += n;
        if w.count > rule.threshold && !w.fired {
            w.fired = true;
            return Some((w.count, rule.window));
        }
        None
    }

    /// The alerts `event` raises (at most one per rule).
    pub fn observe(
        &mut self,
        at: SystemTime,
        actor: &Actor,
        event: &AuditEvent,
    ) -> Vec<AuditEvent> {
        let alert = |rule: &'static str,
                     severity: Severity,
                     sandbox_id: Option<String>,
                     count: u64,
                     window: Option<Duration>,
                     detail: String| AuditEvent::Alert {
            rule: rule.to_owned(),
            severity: severity.as_str().to_owned(),
            sandbox_id,
            count,
            window_secs: window.map(|w| w.as_secs()),
            detail,
        };
        let cfg = self.config.clone();
        match event {
            AuditEvent::PermissionDenied {
                sandbox_id, count, ..
            } => self
                .rate(
                    rule::PERMISSION_DENIALS,
                    &cfg.permission_denials,
                    sandbox_id,
                    (*count).max(1),
                    at,
                )
                .map(|(n, w)| {
                    alert(
                        rule::PERMISSION_DENIALS,
                        cfg.permission_denials.severity,
                        Some(sandbox_id.clone()),
                        n,
                        Some(w),
                        format!(
                            "more than {} permission denials within {}",
                            cfg.permission_denials.threshold,
                            humantime::format_duration(w)
                        ),
                    )
                })
                .into_iter()
                .collect(),
            AuditEvent::ResourceLimitExceeded {
                sandbox_id, limit, ..
            } => self
                .rate(
                    rule::RESOURCE_LIMITS,
                    &cfg.resource_limits,
                    sandbox_id,
                    1,
                    at,
                )
                .map(|(n, w)| {
                    alert(
                        rule::RESOURCE_LIMITS,
                        cfg.resource_limits.severity,
                        Some(sandbox_id.clone()),
                        n,
                        Some(w),
                        format!("resource limit hit: {limit}"),
                    )
                })
                .into_iter()
                .collect(),
            AuditEvent::NetworkConnection {
                sandbox_id,
                decision,
                count,
                ..
            } if decision == "refused" => self
                .rate(
                    rule::EGRESS_REFUSALS,
                    &cfg.egress_refusals,
                    sandbox_id,
                    (*count).max(1),
                    at,
                )
                .map(|(n, w)| {
                    alert(
                        rule::EGRESS_REFUSALS,
                        cfg.egress_refusals.severity,
                        Some(sandbox_id.clone()),
                        n,
                        Some(w),
                        format!(
                            "more than {} egress refusals within {}",
                            cfg.egress_refusals.threshold,
                            humantime::format_duration(w)
                        ),
                    )
                })
                .into_iter()
                .collect(),
            AuditEvent::SandboxCreated { .. } => {
                let key = actor.tenant.clone().unwrap_or_default();
                self.rate(rule::SANDBOX_CREATIONS, &cfg.sandbox_creations, &key, 1, at)
                    .map(|(n, w)| {
                        alert(
                            rule::SANDBOX_CREATIONS,
                            cfg.sandbox_creations.severity,
                            None,
                            n,
                            Some(w),
                            format!(
                                "more than {} sandboxes created within {}",
                                cfg.sandbox_creations.threshold,
                                humantime::format_duration(w)
                            ),
                        )
                    })
                    .into_iter()
                    .collect()
            }
            AuditEvent::SandboxStartFailed { sandbox_id, error } if cfg.failed_starts.enabled => {
                let key = actor.tenant.clone().unwrap_or_default();
                let s = self.streaks.entry(key).or_insert((0, false));
                s.0 += 1;
                if s.0 > cfg.failed_starts.threshold && !s.1 {
                    s.1 = true;
                    let n = s.0;
                    vec![alert(
                        rule::FAILED_STARTS,
                        cfg.failed_starts.severity,
                        Some(sandbox_id.clone()),
                        n,
                        None,
                        format!("{n} sandbox starts failed in a row; the last: {error}"),
                    )]
                } else {
                    Vec::new()
                }
            }
            AuditEvent::SandboxStarted { .. } => {
                self.streaks
                    .remove(&actor.tenant.clone().unwrap_or_default());
                Vec::new()
            }
            _ => Vec::new(),
        }
    }
}

/// Sessions already alerted on (the long-session rule fires once per session).
#[derive(Debug, Default)]
pub struct SessionAges {
    seen: Mutex<HashSet<String>>,
}

impl SessionAges {
    /// Whether `session` has not been alerted on yet (and is from now on).
    pub fn first_time(&self, session: &str) -> bool {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(session.to_owned())
    }
}

/// Most alerts waiting for the webhook; past it the oldest are given up.
pub const QUEUE: usize = 1024;

/// Delivers alerts to `alerts.webhook_url` from a thread of its own.
#[derive(Clone, Debug)]
pub struct Webhook {
    queue: Arc<(Mutex<VecDeque<serde_json::Value>>, Condvar)>,
}

impl Webhook {
    /// Starts the delivery thread for `url` (`None` for an empty url).
    pub fn start(url: &str) -> Option<Webhook> {
        if url.trim().is_empty() {
            return None;
        }
        let hook = Webhook {
            queue: Arc::new((Mutex::new(VecDeque::new()), Condvar::new())),
        };
        let q = hook.queue.clone();
        let url = url.trim().to_owned();
        std::thread::Builder::new()
            .name("alert-webhook".into())
            .spawn(move || deliver(&url, &q))
            .ok()?;
        Some(hook)
    }

    /// Queues one alert (never blocks).
    pub fn send(&self, alert: serde_json::Value) {
        let (lock, cv) = &*self.queue;
        let mut q = lock.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() >= QUEUE {
            q.pop_front();
            crate::metrics::metrics().alert_webhook_failures_total.inc();
        }
        q.push_back(alert);
        cv.notify_one();
    }
}

/// The delivery loop: in order, each alert until the receiver takes it (a 2xx answer), with
/// backoff from 1 s up to a minute between tries.
fn deliver(url: &str, q: &(Mutex<VecDeque<serde_json::Value>>, Condvar)) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(true)
        .build()
        .into();
    let (lock, cv) = q;
    loop {
        let next = {
            let mut g = lock.lock().unwrap_or_else(|p| p.into_inner());
            while g.is_empty() {
                g = cv.wait(g).unwrap_or_else(|p| p.into_inner());
            }
            g.front().cloned()
        };
        let Some(alert) = next else { continue };
        let mut backoff = Duration::from_secs(1);
        loop {
            match agent.post(url).send_json(&alert) {
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(url, error = %e, retry_in = ?backoff, "alert webhook failed");
                    // Waits, but wakes for nothing: the alert in hand goes first.
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                }
            }
        }
        let mut g = lock.lock().unwrap_or_else(|p| p.into_inner());
        // Unless the queue overflowed and dropped it meanwhile, it is still at the front.
        if g.front() == Some(&alert) {
            g.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denied(sb: &str, count: u64) -> AuditEvent {
        AuditEvent::PermissionDenied {
            sandbox_id: sb.into(),
            operation: "lookup".into(),
            path: "/.env".into(),
            level: "none".into(),
            rule: None,
            count,
        }
    }

    fn actor(t: &str) -> Actor {
        Actor::tenant(t)
    }

    fn rules_of(alerts: &[AuditEvent]) -> Vec<(String, Option<String>, u64)> {
        alerts
            .iter()
            .map(|a| match a {
                AuditEvent::Alert {
                    rule,
                    sandbox_id,
                    count,
                    ..
                } => (rule.clone(), sandbox_id.clone(), *count),
                other => panic!("not an alert: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_denial_storm_raises_one_alert_per_window_and_a_quiet_sandbox_none() {
        let mut r = Rules::new(AlertsConfig::default());
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut fired = Vec::new();
        // 50 denials within the minute in sb_a (some folded), 3 in sb_b.
        for i in 0..40 {
            fired.extend(r.observe(
                t0 + Duration::from_millis(i * 100),
                &actor("t"),
                &denied("sb_a", 1),
            ));
        }
        fired.extend(r.observe(
            t0 + Duration::from_secs(5),
            &actor("t"),
            &denied("sb_a", 10),
        ));
        for i in 0..3 {
            fired.extend(r.observe(t0 + Duration::from_secs(i), &actor("t"), &denied("sb_b", 1)));
        }
        assert_eq!(
            rules_of(&fired),
            [("permission_denials".into(), Some("sb_a".into()), 11)]
        );
        // The next window may fire again.
        let again = r.observe(
            t0 + Duration::from_secs(61),
            &actor("t"),
            &denied("sb_a", 11),
        );
        assert_eq!(
            rules_of(&again),
            [("permission_denials".into(), Some("sb_a".into()), 11)]
        );
        // Exactly ten in a window is not more than ten.
        let mut r = Rules::new(AlertsConfig::default());
        assert!(r.observe(t0, &actor("t"), &denied("sb_c", 10)).is_empty());
    }

    #[test]
    fn every_other_rule_fires_on_its_condition() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000);
        let mut r = Rules::new(AlertsConfig::default());
        // Any resource limit (once per window per sandbox).
        let limit = AuditEvent::ResourceLimitExceeded {
            sandbox_id: "sb_1".into(),
            limit: "pids".into(),
            command: "bomb".into(),
            detail: String::new(),
        };
        assert_eq!(rules_of(&r.observe(t0, &actor("t"), &limit)).len(), 1);
        assert!(
            r.observe(t0 + Duration::from_secs(1), &actor("t"), &limit)
                .is_empty()
        );
        // More than 100 creations an hour per tenant.
        let created = AuditEvent::SandboxCreated {
            sandbox_id: "sb_x".into(),
            codebase_id: "cb".into(),
            owner_id: "o".into(),
            user_id: "o".into(),
            rules: Vec::new(),
            runtime: "bwrap".into(),
            image: String::new(),
            resources: Default::default(),
            labels: Default::default(),
        };
        let mut fired = Vec::new();
        for i in 0..101 {
            fired.extend(r.observe(t0 + Duration::from_secs(i), &actor("busy"), &created));
            fired.extend(r.observe(
                t0 + Duration::from_secs(i),
                &actor(&format!("t{i}")),
                &created,
            ));
        }
        assert_eq!(rules_of(&fired), [("sandbox_creations".into(), None, 101)]);
        // More than 3 failed starts in a row; a success resets the streak.
        let failed = AuditEvent::SandboxStartFailed {
            sandbox_id: "sb_f".into(),
            error: "image not found".into(),
        };
        let started = AuditEvent::SandboxStarted {
            sandbox_id: "sb_f".into(),
        };
        let mut fired = Vec::new();
        for _ in 0..3 {
            fired.extend(r.observe(t0, &actor("t"), &failed));
        }
        fired.extend(r.observe(t0, &actor("t"), &started));
        for _ in 0..3 {
            fired.extend(r.observe(t0, &actor("t"), &failed));
        }
        assert!(fired.is_empty(), "{fired:?}");
        fired.extend(r.observe(t0, &actor("t"), &failed));
        fired.extend(r.observe(t0, &actor("t"), &failed));
        assert_eq!(
            rules_of(&fired),
            [("failed_starts".into(), Some("sb_f".into()), 4)]
        );
        // Egress refusals (folded counts add up); allowed connections never count.
        let conn = |decision: &str, count| AuditEvent::NetworkConnection {
            sandbox_id: "sb_n".into(),
            protocol: "connect".into(),
            host: "evil.example".into(),
            port: 443,
            decision: decision.into(),
            detail: String::new(),
            count,
            bytes_up: 0,
            bytes_down: 0,
            duration_ms: 0,
        };
        assert!(r.observe(t0, &actor("t"), &conn("allowed", 500)).is_empty());
        assert!(r.observe(t0, &actor("t"), &conn("refused", 20)).is_empty());
        assert_eq!(
            rules_of(&r.observe(t0, &actor("t"), &conn("refused", 1))).len(),
            1
        );
    }

    #[test]
    fn a_rule_turned_off_never_fires() {
        let mut cfg = AlertsConfig::default();
        cfg.permission_denials.enabled = false;
        cfg.resource_limits.severity = Severity::Low;
        let mut r = Rules::new(cfg);
        let t0 = SystemTime::UNIX_EPOCH;
        assert!(r.observe(t0, &actor("t"), &denied("sb", 1000)).is_empty());
        let limit = AuditEvent::ResourceLimitExceeded {
            sandbox_id: "sb".into(),
            limit: "memory".into(),
            command: String::new(),
            detail: String::new(),
        };
        match &r.observe(t0, &actor("t"), &limit)[..] {
            [AuditEvent::Alert { severity, .. }] => assert_eq!(severity, "low"),
            other => panic!("{other:?}"),
        }
    }
}
