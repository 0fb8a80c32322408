//! Audit events for denials and publish conflicts.
//!
//! Events go into a bounded channel. Identical denials (same operation, path and level) within
//! [`AGGREGATION_WINDOW`] are folded into one event whose `count` says how many there were, so
//! a scanning agent cannot flood the log. When the channel is full and a consumer is attached
//! ([`Auditor::receiver`] was called), the filesystem thread waits up to [`BACKPRESSURE`] for
//! room: a denial storm is slowed to the consumer's pace instead of losing events. Only a
//! consumer stalled that long loses events; they are counted, and the next event delivered is
//! preceded by an [`AuditEvent::Dropped`] with the count, so no loss goes unrecorded. While
//! stalled, sends do not wait again until one gets through.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use agentfense_core::{Level, RuleRef};
use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::delta::Conflict;

/// Identical denials closer together than this are aggregated.
pub const AGGREGATION_WINDOW: Duration = Duration::from_secs(1);

/// Capacity of the event channel.
pub const CHANNEL_CAPACITY: usize = 1024;

/// How long a filesystem operation waits for room in a full channel (with a consumer attached).
pub const BACKPRESSURE: Duration = Duration::from_secs(1);

/// Most distinct denials tracked for aggregation at once.
const MAX_TRACKED: usize = 4096;

/// Something the server should record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuditEvent {
    /// An operation the rules refused.
    Denied {
        /// The sandbox.
        sandbox_id: String,
        /// The operation (`read`, `write`, `create`, `unlink`, `rename`, `truncate`, ...).
        op: &'static str,
        /// Sandbox path, with a leading `/`.
        path: String,
        /// The effective level of the path.
        level: Level,
        /// The rule that decided the level, and its pattern.
        rule: Option<(RuleRef, String)>,
        /// How many identical denials this event stands for (>= 1).
        count: u64,
    },
    /// A publish overwrote a codebase path that changed after this sandbox took it over.
    PublishConflict {
        /// The sandbox.
        sandbox_id: String,
        /// The codebase path.
        conflict: Conflict,
    },
    /// A symlink whose target leaves the project was not published.
    PublishRefused {
        /// The sandbox.
        sandbox_id: String,
        /// Sandbox path of the link (`/tmp`).
        path: String,
        /// Its target (`/etc`).
        target: String,
    },
    /// A per-sandbox limit of the filesystem was hit (at most one event per
    /// [`AGGREGATION_WINDOW`] and limit).
    LimitExceeded {
        /// The sandbox.
        sandbox_id: String,
        /// Which limit (`open_files`).
        limit: &'static str,
        /// The numbers.
        detail: String,
    },
    /// Events of this sandbox were lost because the consumer stalled: sent before the next
    /// event that gets through (or at unmount).
    Dropped {
        /// The sandbox.
        sandbox_id: String,
        /// How many events were lost since the last report.
        count: u64,
    },
}

#[derive(Hash, PartialEq, Eq)]
struct Key {
    op: &'static str,
    path: String,
    level: Level,
}

struct Seen {
    last_sent: Instant,
    suppressed: u64,
    rule: Option<(RuleRef, String)>,
}

/// The sending side, shared by the filesystem threads.
pub(crate) struct Auditor {
    sandbox_id: String,
    tx: Sender<AuditEvent>,
    rx: Receiver<AuditEvent>,
    recent: Mutex<HashMap<Key, Seen>>,
    /// Events lost in total.
    dropped: AtomicU64,
    /// Events lost and not yet reported with [`AuditEvent::Dropped`].
    unreported: AtomicU64,
    /// A consumer took the receiver: a full channel is worth waiting for.
    consumer: AtomicBool,
    /// The last wait for room timed out; do not wait again until a send succeeds.
    stalled: AtomicBool,
    /// When each limit last produced an event.
    limits: Mutex<HashMap<&'static str, Instant>>,
}

impl Auditor {
    pub(crate) fn new(sandbox_id: String) -> Auditor {
        let (tx, rx) = crossbeam_channel::bounded(CHANNEL_CAPACITY);
        Auditor {
            sandbox_id,
            tx,
            rx,
            recent: Mutex::new(HashMap::new()),
            dropped: AtomicU64::new(0),
            unreported: AtomicU64::new(0),
            consumer: AtomicBool::new(false),
            stalled: AtomicBool::new(false),
            limits: Mutex::new(HashMap::new()),
        }
    }

    /// Records that `limit` was hit, at most once per [`AGGREGATION_WINDOW`].
    pub(crate) fn limit_exceeded(&self, limit: &'static str, detail: String) {
        let now = Instant::now();
        {
            let mut last = self.limits.lock().unwrap_or_else(|p| p.into_inner());
            match last.get(limit) {
                Some(t) if now.duration_since(*t) < AGGREGATION_WINDOW => return,
                _ => {
                    last.insert(limit, now);
                }
            }
        }
        self.send(AuditEvent::LimitExceeded {
            sandbox_id: self.sandbox_id.clone(),
            limit,
            detail,
        });
    }

    pub(crate) fn receiver(&self) -> Receiver<AuditEvent> {
        self.consumer.store(true, Ordering::Relaxed);
        self.rx.clone()
    }

    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Delivers `ev`, after the report of earlier losses if there are any.
    fn send(&self, ev: AuditEvent) {
        if !self.report_losses() || !self.deliver(ev) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            self.unreported.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Sends an [`AuditEvent::Dropped`] for the unreported losses; false if it did not get
    /// through (the losses stay unreported).
    fn report_losses(&self) -> bool {
        let count = self.unreported.load(Ordering::Relaxed);
        if count == 0 {
            return true;
        }
        let report = AuditEvent::Dropped {
            sandbox_id: self.sandbox_id.clone(),
            count,
        };
        if self.deliver(report) {
            self.unreported.fetch_sub(count, Ordering::Relaxed);
            true
        } else {
            false
        }
    }

    /// Puts `ev` in the channel, waiting for room (see the module docs); false if it was lost.
    fn deliver(&self, ev: AuditEvent) -> bool {
        match self.tx.try_send(ev) {
            Ok(()) => {
                self.stalled.store(false, Ordering::Relaxed);
                true
            }
            Err(TrySendError::Full(ev))
                if self.consumer.load(Ordering::Relaxed)
                    && !self.stalled.load(Ordering::Relaxed) =>
            {
                let sent = self.tx.send_timeout(ev, BACKPRESSURE).is_ok();
                self.stalled.store(!sent, Ordering::Relaxed);
                sent
            }
            Err(_) => false,
        }
    }

    /// Records a denial; `rule` is computed only when an event is actually emitted.
    pub(crate) fn denied(
        &self,
        op: &'static str,
        path: &str,
        level: Level,
        rule: impl FnOnce() -> Option<(RuleRef, String)>,
    ) {
        let now = Instant::now();
        let key = Key {
            op,
            path: path.to_owned(),
            level,
        };
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let count = match recent.get_mut(&key) {
            Some(seen) if now.duration_since(seen.last_sent) < AGGREGATION_WINDOW => {
                seen.suppressed += 1;
                return;
            }
            Some(seen) => {
                let n = seen.suppressed + 1;
                seen.suppressed = 0;
                seen.last_sent = now;
                n
            }
            None => {
                if recent.len() >= MAX_TRACKED {
                    self.flush_locked(&mut recent);
                }
                recent.insert(
                    key,
                    Seen {
                        last_sent: now,
                        suppressed: 0,
                        rule: None,
                    },
                );
                1
            }
        };
        let rule = rule();
        if let Some(seen) = recent.get_mut(&Key {
            op,
            path: path.to_owned(),
            level,
        }) {
            seen.rule.clone_from(&rule);
        }
        drop(recent);
        self.send(AuditEvent::Denied {
            sandbox_id: self.sandbox_id.clone(),
            op,
            path: path.to_owned(),
            level,
            rule,
            count,
        });
    }

    fn flush_locked(&self, recent: &mut HashMap<Key, Seen>) {
        for (key, seen) in recent.drain() {
            if seen.suppressed > 0 {
                self.send(AuditEvent::Denied {
                    sandbox_id: self.sandbox_id.clone(),
                    op: key.op,
                    path: key.path,
                    level: key.level,
                    rule: seen.rule,
                    count: seen.suppressed,
                });
            }
        }
    }

    /// Emits the counts of denials still folded into the aggregation table, and the report of
    /// losses not reported yet.
    pub(crate) fn flush(&self) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        self.flush_locked(&mut recent);
        drop(recent);
        self.report_losses();
    }

    pub(crate) fn conflict(&self, conflict: Conflict) {
        self.send(AuditEvent::PublishConflict {
            sandbox_id: self.sandbox_id.clone(),
            conflict,
        });
    }

    pub(crate) fn refused(&self, rel: &std::path::Path, target: &str) {
        self.send(AuditEvent::PublishRefused {
            sandbox_id: self.sandbox_id.clone(),
            path: display_path(rel),
            target: target.to_owned(),
        });
    }
}

/// Sandbox path (`/a/b`) of a delta-relative path.
pub(crate) fn display_path(rel: &std::path::Path) -> String {
    let mut s = String::with_capacity(rel.as_os_str().len() + 1);
    s.push('/');
    s.push_str(&rel.to_string_lossy());
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    #[test]
    fn repeated_denials_are_aggregated_and_never_block() {
        let a = Auditor::new("sb".into());
        let rx = a.receiver();
        for _ in 0..100 {
            a.denied("open-read", "/x", Level::View, || None);
        }
        a.denied("open-read", "/y", Level::View, || None);
        let evs: Vec<_> = rx.try_iter().collect();
        assert_eq!(evs.len(), 2);
        a.flush();
        let evs: Vec<_> = rx.try_iter().collect();
        assert_eq!(
            evs,
            [AuditEvent::Denied {
                sandbox_id: "sb".into(),
                op: "open-read",
                path: "/x".into(),
                level: Level::View,
                rule: None,
                count: 99,
            }]
        );
    }

    #[test]
    fn without_a_consumer_a_full_channel_drops_and_counts_without_waiting() {
        let a = Auditor::new("sb".into());
        for i in 0..(CHANNEL_CAPACITY + 10) {
            a.denied("stat", &format!("/f{i}"), Level::None, || None);
        }
        assert_eq!(a.dropped(), 10);
    }

    #[test]
    fn a_stalled_consumer_loses_events_and_the_loss_is_reported_in_band() {
        let a = Auditor::new("sb".into());
        let rx = a.receiver();
        // Nobody drains: the first event past capacity waits once, then the rest are lost
        // without waiting.
        for i in 0..(CHANNEL_CAPACITY + 10) {
            a.denied("stat", &format!("/f{i}"), Level::None, || None);
        }
        assert_eq!(a.dropped(), 10);
        let first: Vec<_> = rx.try_iter().collect();
        assert_eq!(first.len(), CHANNEL_CAPACITY);
        // The next event is preceded by the report.
        a.denied("stat", "/after", Level::None, || None);
        let evs: Vec<_> = rx.try_iter().collect();
        assert_eq!(
            evs[0],
            AuditEvent::Dropped {
                sandbox_id: "sb".into(),
                count: 10
            }
        );
        assert!(matches!(&evs[1], AuditEvent::Denied { path, .. } if path == "/after"));
        assert_eq!(evs.len(), 2);
    }

    #[test]
    fn a_consumer_that_keeps_up_loses_nothing_in_a_storm() {
        let a = std::sync::Arc::new(Auditor::new("sb".into()));
        let rx = a.receiver();
        let n = 20 * CHANNEL_CAPACITY;
        let consumer = std::thread::spawn(move || {
            let mut denied = 0;
            for ev in rx.iter() {
                match ev {
                    AuditEvent::Denied { count, .. } => denied += count,
                    other => panic!("{other:?}"),
                }
                if denied == n as u64 {
                    break;
                }
            }
            denied
        });
        for i in 0..n {
            a.denied("lookup", &format!("/k{i}.key"), Level::None, || None);
        }
        assert_eq!(consumer.join().unwrap(), n as u64);
        assert_eq!(a.dropped(), 0);
    }
}
