//! The audit trail: an append-only file of JSON lines, one event per line.
//!
//! Every line has `timestamp` (RFC 3339, UTC, milliseconds) and `event` (e.g.
//! `sandbox_created`, `command_executed`, `permission_denied`), then the event's fields.
//! Recording never blocks the caller: events go through a bounded queue to a writer thread;
//! if the queue is ever full the event is counted and an `audit_events_dropped` line says how
//! many were lost. The file is opened in append mode with mode 0600.

mod trail;

use trail::Trail;
pub use trail::{GENESIS, TrailOptions, Verification, files, rotated_files, verify};

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::SystemTime;

use agentfense_core::{PermissionRule, ResourceLimits};
use serde::Serialize;

/// Capacity of the queue between recorders and the writer thread.
const QUEUE: usize = 16 * 1024;

/// One audit event. Serialized with `event` = the variant name in snake_case.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AuditEvent {
    /// A codebase was created.
    CodebaseCreated {
        /// Its id.
        codebase_id: String,
        /// Its name.
        name: String,
        /// Its owner.
        owner_id: String,
    },
    /// A codebase and its files were deleted.
    CodebaseDeleted {
        /// Its id.
        codebase_id: String,
    },
    /// A file was uploaded into a codebase.
    FileUploaded {
        /// The codebase.
        codebase_id: String,
        /// Path inside it.
        path: String,
        /// Bytes.
        size: u64,
        /// Lowercase hex MD5.
        checksum: String,
    },
    /// A sandbox was created.
    SandboxCreated {
        /// Its id.
        sandbox_id: String,
        /// Its codebase.
        codebase_id: String,
        /// The codebase's owner.
        owner_id: String,
        /// The user it was created for (the codebase's owner: the security guide's name).
        user_id: String,
        /// Its rules, in request order (`permissions`, as on the wire).
        #[serde(rename = "permissions")]
        rules: Vec<PermissionRule>,
        /// `bwrap` or `docker`.
        runtime: String,
        /// Container image, empty for bwrap.
        image: String,
        /// Effective limits.
        resources: ResourceLimits,
        /// Labels.
        labels: BTreeMap<String, String>,
    },
    /// A sandbox started.
    SandboxStarted {
        /// Its id.
        sandbox_id: String,
    },
    /// A sandbox could not start (it is in ERROR with the reason).
    SandboxStartFailed {
        /// Its id.
        sandbox_id: String,
        /// Why.
        error: String,
    },
    /// A sandbox stopped.
    SandboxStopped {
        /// Its id.
        sandbox_id: String,
        /// Why, when the server stopped it (shutdown, failure).
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// A node sent no heartbeat for `nodes.lost_after` and was declared lost, with what ran
    /// there (the server's own event; each sandbox also gets a `sandbox_lost`).
    NodeLost {
        /// The node.
        node: String,
        /// Its host name.
        host: String,
        /// Its last heartbeat (RFC 3339).
        last_heartbeat: String,
        /// Sandboxes lost with it.
        sandboxes: usize,
        /// Sandboxes that had never started there, moved to this server's node.
        moved: usize,
    },
    /// A sandbox was lost with its node: it is in ERROR, its unpublished changes are gone.
    SandboxLost {
        /// Its id.
        sandbox_id: String,
        /// The node.
        node: String,
    },
    /// A sandbox was destroyed on request.
    SandboxDestroyed {
        /// Its id.
        sandbox_id: String,
    },
    /// A sandbox outlived its expiry and was destroyed by the reaper.
    SandboxExpired {
        /// Its id.
        sandbox_id: String,
    },
    /// A command finished (or timed out).
    CommandExecuted {
        /// The sandbox.
        sandbox_id: String,
        /// The session, for session commands.
        #[serde(skip_serializing_if = "Option::is_none")]
        session_id: Option<String>,
        /// The command line.
        command: String,
        /// Its exit code (-1 when it was killed by a timeout).
        exit_code: i32,
        /// Wall time, ms.
        duration_ms: u64,
        /// Whether the timeout killed it.
        timed_out: bool,
    },
    /// Access was denied inside a sandbox (aggregated: `count` identical denials).
    PermissionDenied {
        /// The sandbox.
        sandbox_id: String,
        /// The filesystem operation (`open`, `unlink`, ...).
        operation: String,
        /// Path inside the sandbox.
        path: String,
        /// The path's level.
        level: String,
        /// The deciding rule's pattern, if a rule decided.
        #[serde(skip_serializing_if = "Option::is_none")]
        rule: Option<String>,
        /// Identical denials folded into this line.
        count: u64,
    },
    /// A command hit a resource limit.
    ResourceLimitExceeded {
        /// The sandbox.
        sandbox_id: String,
        /// `memory`, `pids`, `cpu` or `open_files`.
        limit: String,
        /// The command that hit it (empty when the filesystem cannot know: `open_files`).
        command: String,
        /// Details (the configured value, the counter that moved).
        detail: String,
    },
    /// Two sandboxes changed the same file; the later publish won.
    PublishConflict {
        /// The sandbox that published last.
        sandbox_id: String,
        /// Path in the codebase.
        path: String,
        /// What the other side had done.
        detail: String,
    },
    /// A symlink whose target leaves the project was not published (it stays in the sandbox).
    PublishRefused {
        /// The sandbox.
        sandbox_id: String,
        /// Path of the link in the codebase.
        path: String,
        /// Its target.
        target: String,
    },
    /// A call presented no usable credential (counted per source; past
    /// `auth.max_failures_per_minute` the source is refused without further lines).
    AuthenticationFailed {
        /// Client address (`ip`) or unix peer (`unix:<uid>`).
        source: String,
        /// The method called (`Service/Method`).
        method: String,
        /// Why it failed (never the secret).
        reason: String,
        /// The key id the credential claimed, if it had a key's shape.
        #[serde(skip_serializing_if = "Option::is_none")]
        claimed_key_id: Option<String>,
        /// This failure reached the limit: the source is refused for the rest of the minute.
        rate_limited: bool,
    },
    /// A tenant was blocked (`agentfense tenants block`): its keys stopped working and the
    /// server stopped its sandboxes.
    TenantBlocked {
        /// The tenant (also the line's `tenant`).
        blocked_tenant: String,
        /// The reason given.
        reason: String,
        /// The sandboxes that were running and were stopped.
        sandboxes_stopped: Vec<String>,
    },
    /// A sandbox's connection through its egress proxy, allowed (when it ends: bytes and
    /// duration) or refused (at once: why).
    NetworkConnection {
        /// The sandbox.
        sandbox_id: String,
        /// How it asked: `connect`, `http`, `socks5` or `dns` (a query to its resolver).
        protocol: String,
        /// The host it asked for (name or address).
        host: String,
        /// The port.
        port: u16,
        /// `allowed` or `refused`.
        decision: String,
        /// The entry that allowed it, or why it was refused.
        detail: String,
        /// Identical refusals folded into this line (1 for an allowed connection).
        count: u64,
        /// Bytes sent.
        bytes_up: u64,
        /// Bytes received.
        bytes_down: u64,
        /// How long it lasted, ms.
        duration_ms: u64,
    },
    /// Writing a command's changes into the codebase (automatic publish) failed: they stay
    /// in the sandbox, and the command's caller got an error saying so.
    PublishFailed {
        /// The sandbox.
        sandbox_id: String,
        /// What failed.
        error: String,
    },
    /// A sandbox's egress policy was replaced.
    EgressChanged {
        /// The sandbox.
        sandbox_id: String,
        /// The new `agentfense.egress` value.
        egress: String,
    },
    /// Selected pending changes of a sandbox were written into its codebase.
    ChangesApplied {
        /// The sandbox.
        sandbox_id: String,
        /// The paths written or deleted in the codebase (at most 100 listed).
        paths: Vec<String>,
        /// How many were written.
        written: usize,
        /// How many were deleted.
        deleted: usize,
        /// How many could not be written (they stay pending).
        failed: usize,
    },
    /// Selected pending changes were dropped from a sandbox.
    ChangesDiscarded {
        /// The sandbox.
        sandbox_id: String,
        /// The paths dropped (at most 100 listed).
        paths: Vec<String>,
        /// How many.
        count: usize,
    },
    /// A checkpoint of a sandbox's changes was taken.
    CheckpointCreated {
        /// The sandbox.
        sandbox_id: String,
        /// Its id.
        checkpoint_id: String,
        /// Its label.
        label: String,
        /// How many changed paths it holds.
        count: usize,
    },
    /// A sandbox was brought back to a checkpoint.
    CheckpointRestored {
        /// The sandbox.
        sandbox_id: String,
        /// The checkpoint.
        checkpoint_id: String,
        /// The paths whose state it may have changed (at most 100 listed).
        paths: Vec<String>,
        /// How many.
        count: usize,
    },
    /// A token bound to one sandbox was minted.
    SandboxTokenCreated {
        /// The sandbox.
        sandbox_id: String,
        /// The token's id (never the token).
        token_id: String,
    },
    /// An alert rule fired (see `alerts.*`); the record's tenant is the one it concerns.
    Alert {
        /// The rule (`permission_denials`, `resource_limits`, `sandbox_creations`,
        /// `long_sessions`, `failed_starts`, `egress_refusals`).
        rule: String,
        /// `low`, `medium` or `high`.
        severity: String,
        /// The sandbox it concerns, if one.
        #[serde(skip_serializing_if = "Option::is_none")]
        sandbox_id: Option<String>,
        /// The count that passed the threshold.
        count: u64,
        /// The counting window, seconds (rate rules).
        #[serde(skip_serializing_if = "Option::is_none")]
        window_secs: Option<u64>,
        /// What happened, in words.
        detail: String,
    },
    /// Events lost: a sandbox's filesystem events when their consumer stalled (with the
    /// sandbox), or any events when the writer's queue was full (without).
    AuditEventsDropped {
        /// The sandbox whose events were lost, when they were one sandbox's.
        #[serde(skip_serializing_if = "Option::is_none")]
        sandbox_id: Option<String>,
        /// How many.
        count: u64,
    },
}

/// Who caused an event: the tenant it concerns and the credential used (`key_...`,
/// `tok_...`, `unix:<uid>`, `cert:<name>`); both `null` for the server's own events that no
/// tenant owns, and `key_id` `null` for events no request caused (expiry, filesystem denials).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Actor {
    /// The tenant.
    pub tenant: Option<String>,
    /// The credential's id.
    pub key_id: Option<String>,
}

impl Actor {
    /// Events of a tenant's resource that no request caused.
    pub fn tenant(tenant: &str) -> Actor {
        Actor {
            tenant: Some(tenant.to_owned()),
            key_id: None,
        }
    }
}

#[derive(Serialize)]
struct Line<'a> {
    #[serde(flatten)]
    actor: &'a Actor,
    #[serde(flatten)]
    event: &'a AuditEvent,
}

/// The audit log could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot open audit log {path}")]
pub struct AuditError {
    /// The file.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

type Queued = (SystemTime, Actor, AuditEvent);

/// A cheap, cloneable handle for recording events.
///
/// Two queues: the server's own events (lifecycle, commands, limits) and the bulk of the
/// filesystems' (denials), which the writer takes only when the first is empty. A sandbox
/// storming denials therefore fills only the bulk queue and waits there
/// ([`Audit::record_wait`]): it can neither push another sandbox's events out, nor get its
/// own commands dropped from the trail.
#[derive(Clone, Debug)]
pub struct Audit {
    tx: Option<Sender<Queued>>,
    bulk_tx: Option<Sender<Queued>>,
    dropped: Arc<AtomicU64>,
}

/// Owns the writer thread; dropping or [`AuditWriter::close`] flushes and joins it.
#[derive(Debug)]
pub struct AuditWriter {
    thread: Option<JoinHandle<()>>,
}

impl Audit {
    /// Opens (appending) `path` and starts the writer thread.
    pub fn open(path: &Path) -> Result<(Audit, AuditWriter), AuditError> {
        Audit::open_with(path, TrailOptions::default())
    }

    /// Like [`Audit::open`], with the trail's rotation and retention (and no alerts).
    pub fn open_with(path: &Path, opts: TrailOptions) -> Result<(Audit, AuditWriter), AuditError> {
        Audit::open_alerting(path, opts, None)
    }

    /// Like [`Audit::open_with`], with alert rules evaluated on every event written.
    pub fn open_alerting(
        path: &Path,
        opts: TrailOptions,
        alerts: Option<crate::alerts::AlertsConfig>,
    ) -> Result<(Audit, AuditWriter), AuditError> {
        let observer = Observer {
            webhook: alerts
                .as_ref()
                .and_then(|a| crate::alerts::Webhook::start(&a.webhook_url)),
            rules: alerts.map(crate::alerts::Rules::new),
        };
        let trail = Trail::open(path, opts).map_err(|source| AuditError {
            path: path.to_owned(),
            source,
        })?;
        let (tx, rx) = bounded(QUEUE);
        let (bulk_tx, bulk_rx) = bounded(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let d = dropped.clone();
        let p = path.to_owned();
        let thread = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || write_loop(rx, bulk_rx, trail, observer, d, p))
            .map_err(|source| AuditError {
                path: path.to_owned(),
                source,
            })?;
        Ok((
            Audit {
                tx: Some(tx),
                bulk_tx: Some(bulk_tx),
                dropped,
            },
            AuditWriter {
                thread: Some(thread),
            },
        ))
    }

    /// A handle that records nothing (tools and tests that do not audit).
    pub fn disabled() -> Audit {
        Audit {
            tx: None,
            bulk_tx: None,
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Queues an event; never blocks.
    /// Records `event`, waiting for room in the queue instead of dropping it: for a thread
    /// whose only job is forwarding events (the filesystem bridge), so that a slow writer
    /// slows the source down rather than losing its events.
    pub fn record_wait(&self, actor: Actor, event: AuditEvent) {
        let Some(tx) = &self.bulk_tx else { return };
        if tx.send((SystemTime::now(), actor, event)).is_err() {
            tracing::warn!("audit writer has stopped; event lost");
        }
    }

    /// Records `event` on the bulk queue without ever blocking (for events a sandbox can
    /// cause in numbers from async code, like its network connections): if that queue is
    /// full it is counted and reported like any loss, and the server's own events are
    /// never pushed out.
    pub fn record_bulk(&self, actor: Actor, event: AuditEvent) {
        self.try_record(self.bulk_tx.as_ref(), actor, event);
    }

    /// Records `event` without ever blocking: if the queue is full it is counted, and an
    /// `audit_events_dropped` line reports the count.
    pub fn record(&self, event: AuditEvent) {
        self.record_as(Actor::default(), event);
    }

    /// [`Audit::record`] with the actor that caused the event.
    pub fn record_as(&self, actor: Actor, event: AuditEvent) {
        self.try_record(self.tx.as_ref(), actor, event);
    }

    /// Queues on `tx` without blocking; a full queue counts the event as dropped.
    fn try_record(&self, tx: Option<&Sender<Queued>>, actor: Actor, event: AuditEvent) {
        let Some(tx) = tx else { return };
        match tx.try_send((SystemTime::now(), actor, event)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => {
                tracing::warn!("audit writer has stopped; event lost");
            }
        }
    }
}

impl AuditWriter {
    /// Flushes everything queued so far and stops the writer. All [`Audit`] handles must be
    /// dropped first, or this waits for them.
    pub fn close(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn write_loop(
    rx: Receiver<Queued>,
    bulk_rx: Receiver<Queued>,
    mut out: Trail,
    mut observer: Observer,
    dropped: Arc<AtomicU64>,
    path: PathBuf,
) {
    let mut write = |out: &mut Trail, at: SystemTime, actor: &Actor, ev: &AuditEvent| {
        let mut pending = vec![ev.clone()];
        while let Some(ev) = pending.pop() {
            if let Err(e) = out.append(at, &Line { actor, event: &ev }) {
                tracing::error!(path = %path.display(), error = %e, "cannot write audit log");
            }
            pending.extend(observer.observe(at, actor, &ev));
        }
    };
    let never = crossbeam_channel::never::<Queued>();
    let (mut prio_open, mut bulk_open) = (true, true);
    while prio_open || bulk_open {
        let prio = if prio_open { &rx } else { &never };
        let bulk = if bulk_open { &bulk_rx } else { &never };
        crossbeam_channel::select_biased! {
            recv(prio) -> m => match m {
                Ok((at, actor, ev)) => write(&mut out, at, &actor, &ev),
                Err(_) => prio_open = false,
            },
            recv(bulk) -> m => match m {
                Ok((at, actor, ev)) => write(&mut out, at, &actor, &ev),
                Err(_) => bulk_open = false,
            },
            // Idle: what was written a second ago gets its fdatasync now.
            default(std::time::Duration::from_secs(1)) => {}
        }
        // Drain what is queued (the server's own events first, the bulk in slices between
        // them), then flush once: lines reach the kernel (and survive a kill -9 of the
        // server) without a syscall per event under load.
        for _ in 0..64 {
            let mut wrote = false;
            while let Ok((at, actor, ev)) = rx.try_recv() {
                write(&mut out, at, &actor, &ev);
                wrote = true;
            }
            for _ in 0..256 {
                let Ok((at, actor, ev)) = bulk_rx.try_recv() else {
                    break;
                };
                write(&mut out, at, &actor, &ev);
                wrote = true;
            }
            if !wrote {
                break;
            }
        }
        let lost = dropped.swap(0, Ordering::Relaxed);
        if lost > 0 {
            write(
                &mut out,
                SystemTime::now(),
                &Actor::default(),
                &AuditEvent::AuditEventsDropped {
                    sandbox_id: None,
                    count: lost,
                },
            );
        }
        if let Err(e) = out.flush(false) {
            tracing::error!(path = %path.display(), error = %e, "cannot flush audit log");
        }
    }
    let _ = out.flush(true);
}

/// What the writer does with each event besides writing it: metrics, alert rules, the webhook.
struct Observer {
    rules: Option<crate::alerts::Rules>,
    webhook: Option<crate::alerts::Webhook>,
}

impl Observer {
    /// Counts `ev` and returns the alerts it raises.
    fn observe(&mut self, at: SystemTime, actor: &Actor, ev: &AuditEvent) -> Vec<AuditEvent> {
        use crate::metrics::{AlertLabels, DecisionLabel, DenialLabels, KindLabel, metrics};
        let m = metrics();
        m.audit_events_total.inc();
        match ev {
            AuditEvent::PermissionDenied {
                operation,
                level,
                count,
                ..
            } => {
                m.fs_denials_total
                    .get_or_create(&DenialLabels {
                        operation: operation.clone(),
                        level: level.clone(),
                    })
                    .inc_by((*count).max(1));
            }
            AuditEvent::ResourceLimitExceeded { limit, .. } => {
                m.limit_hits_total
                    .get_or_create(&KindLabel {
                        kind: limit.clone(),
                    })
                    .inc();
            }
            AuditEvent::NetworkConnection {
                decision, count, ..
            } => {
                m.egress_total
                    .get_or_create(&DecisionLabel {
                        decision: decision.clone(),
                    })
                    .inc_by((*count).max(1));
            }
            AuditEvent::AuditEventsDropped { count, .. } => {
                m.audit_events_dropped_total.inc_by(*count);
            }
            AuditEvent::Alert { rule, severity, .. } => {
                m.alerts_total
                    .get_or_create(&AlertLabels {
                        rule: rule.clone(),
                        severity: severity.clone(),
                    })
                    .inc();
                if let Some(hook) = &self.webhook
                    && let Ok(mut v) = serde_json::to_value(Line { actor, event: ev })
                {
                    v["timestamp"] = humantime::format_rfc3339_millis(at).to_string().into();
                    hook.send(v);
                }
                return Vec::new();
            }
            _ => {}
        }
        match &mut self.rules {
            Some(r) => r.observe(at, actor, ev),
            None => Vec::new(),
        }
    }
}

impl Drop for AuditWriter {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_json_lines_with_timestamp_and_event() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/audit.jsonl");
        let (audit, writer) = Audit::open(&path).unwrap();
        audit.record(AuditEvent::SandboxStarted {
            sandbox_id: "sb_1".into(),
        });
        audit.record(AuditEvent::PermissionDenied {
            sandbox_id: "sb_1".into(),
            operation: "open".into(),
            path: "/.env".into(),
            level: "none".into(),
            rule: Some("**/.env*".into()),
            count: 3,
        });
        drop(audit);
        writer.close();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["event"], "sandbox_started");
        assert_eq!(lines[0]["sandbox_id"], "sb_1");
        let ts = lines[0]["timestamp"].as_str().unwrap();
        assert!(ts.ends_with('Z') && ts.len() == 24, "{ts}");
        assert_eq!(lines[1]["event"], "permission_denied");
        assert_eq!(lines[1]["count"], 3);
        assert_eq!(lines[1]["rule"], "**/.env*");
        // Every line names its tenant and credential, null when none applies.
        assert!(
            lines[0]["tenant"].is_null() && lines[0]["key_id"].is_null(),
            "{}",
            lines[0]
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    /// A storm of one sandbox's denials (waiting for room) never pushes out the server's own
    /// events (commands, lifecycle), and loses nothing itself.
    #[test]
    fn a_denial_storm_cannot_push_out_the_servers_own_events() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let (audit, writer) = Audit::open(&path).unwrap();
        let storm = {
            let audit = audit.clone();
            std::thread::spawn(move || {
                for i in 0..(4 * QUEUE) {
                    audit.record_wait(
                        Actor::tenant("t"),
                        AuditEvent::PermissionDenied {
                            sandbox_id: "sb_storm".into(),
                            operation: "lookup".into(),
                            path: format!("/k{i}.key"),
                            level: "none".into(),
                            rule: None,
                            count: 1,
                        },
                    );
                }
            })
        };
        for i in 0..1000 {
            audit.record(AuditEvent::SandboxStarted {
                sandbox_id: format!("sb_{i}"),
            });
        }
        storm.join().unwrap();
        drop(audit);
        writer.close();
        let text = std::fs::read_to_string(&path).unwrap();
        let count = |event: &str| text.lines().filter(|l| l.contains(event)).count();
        assert_eq!(count("\"sandbox_started\""), 1000);
        assert_eq!(count("\"permission_denied\""), 4 * QUEUE);
        assert_eq!(count("audit_events_dropped"), 0);
    }

    #[test]
    fn appends_across_reopen_and_disabled_is_silent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        for i in 0..2 {
            let (audit, writer) = Audit::open(&path).unwrap();
            audit.record(AuditEvent::SandboxDestroyed {
                sandbox_id: format!("sb_{i}"),
            });
            drop(audit);
            writer.close();
        }
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 2);
        Audit::disabled().record(AuditEvent::CodebaseDeleted {
            codebase_id: "cb".into(),
        });
    }
}
