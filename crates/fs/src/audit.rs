//! Audit events for denials and publish conflicts.
//!
//! The filesystem never blocks on the consumer: events go into a bounded channel with
//! `try_send`, and what does not fit is dropped and counted. Identical denials (same
//! operation, path and level) within [`AGGREGATION_WINDOW`] are folded into one event whose
//! `count` says how many there were, so a scanning agent cannot flood the log.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use agentfense_core::{Level, RuleRef};
use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::delta::Conflict;

/// Identical denials closer together than this are aggregated.
pub const AGGREGATION_WINDOW: Duration = Duration::from_secs(1);

/// Capacity of the event channel.
pub const CHANNEL_CAPACITY: usize = 1024;

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
    dropped: AtomicU64,
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
        }
    }

    pub(crate) fn receiver(&self) -> Receiver<AuditEvent> {
        self.rx.clone()
    }

    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn send(&self, ev: AuditEvent) {
        match self.tx.try_send(ev) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
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

    /// Emits the counts of denials still folded into the aggregation table.
    pub(crate) fn flush(&self) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        self.flush_locked(&mut recent);
    }

    pub(crate) fn conflict(&self, conflict: Conflict) {
        self.send(AuditEvent::PublishConflict {
            sandbox_id: self.sandbox_id.clone(),
            conflict,
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
        // A full channel drops and counts instead of blocking.
        for i in 0..(CHANNEL_CAPACITY + 10) {
            a.denied("stat", &format!("/f{i}"), Level::None, || None);
        }
        assert_eq!(a.dropped(), 10);
    }
}
