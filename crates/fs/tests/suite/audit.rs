//! The audit trail under pressure: a denial storm loses no event.

use std::collections::HashSet;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use agentfense_fs::AuditEvent;

use super::util::{mount_with, require_fuse, test_rules};

/// Finding 10 of issue 13: an agent probing 100k hidden names (each an existing `.env*` file,
/// so each lookup is a denial of its own) overflowed the 1024-event channel whenever the
/// consumer fell behind, and the excess was dropped without a trace. The consumer here falls
/// behind on purpose: it only drains once the channel is full. Now the storm is slowed to the
/// consumer's pace: every denial arrives, none is dropped.
#[test]
fn a_denial_storm_loses_no_event() {
    require_fuse!("a_denial_storm_loses_no_event");
    const N: usize = 100_000;
    let m = mount_with(
        test_rules(),
        |lower| {
            for i in 0..N {
                std::fs::write(lower.join(format!(".env{i}")), "").unwrap();
            }
        },
        |_| {},
    );
    let rx = m.h().events();
    let storm_over = Arc::new(AtomicBool::new(false));
    let over = storm_over.clone();
    let consumer = std::thread::spawn(move || {
        let mut paths = HashSet::new();
        let mut dropped = 0;
        loop {
            // A consumer that lags: it waits for a full channel (or the end), then drains.
            while !rx.is_full() && !over.load(Ordering::Acquire) {
                std::thread::yield_now();
            }
            let finished = over.load(Ordering::Acquire);
            for ev in rx.try_iter() {
                match ev {
                    AuditEvent::Denied { path, .. } => {
                        paths.insert(path);
                    }
                    AuditEvent::Dropped { count, .. } => dropped += count,
                    AuditEvent::PublishConflict { .. } => {}
                }
            }
            if finished {
                return (paths, dropped);
            }
        }
    });
    // The attacker: a plain shell loop stat-ing every hidden name.
    let out = Command::new("timeout")
        .args([
            "-k",
            "2",
            "600",
            "sh",
            "-c",
            &format!("i=0; while [ $i -lt {N} ]; do [ -e .env$i ] && echo seen; i=$((i+1)); done"),
        ])
        .current_dir(m.mnt())
        .output()
        .unwrap();
    storm_over.store(true, Ordering::Release);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(out.stdout.is_empty(), "hidden files were visible");
    let (paths, dropped) = consumer.join().unwrap();
    assert_eq!((paths.len(), dropped), (N, 0));
    assert_eq!(m.h().dropped_events(), 0);
}
