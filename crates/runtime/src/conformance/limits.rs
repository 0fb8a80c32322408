//! Resource limits: memory (OOM → 137 + event), pids (fork bomb contained + event), CPU quota
//! (throttled).

use std::time::{Duration, Instant};

use pretty_assertions::assert_eq;

use super::{Options, Target, req};
use crate::error::RuntimeError;
use crate::types::{LimitKind, ResourceLimits, RuntimeEvent};

/// Over the memory limit a command is OOM-killed (137) and the event reported; the sandbox
/// stays usable.
pub async fn memory_limit_oom_kills_with_137_and_reports(t: &Target) {
    let mut fx = t
        .start_with(Options::limited(ResourceLimits {
            memory_bytes: Some(64 << 20),
            ..Default::default()
        }))
        .await;
    let cmd = "python3 -c 'b = bytearray(200 * 1024 * 1024); print(len(b))'";
    let r = fx.sh(cmd).await;
    assert_eq!(r.exit_code, 137, "{r:?}");
    assert_eq!(
        fx.next_event().await,
        RuntimeEvent::ResourceLimitExceeded {
            sandbox_id: fx.id.clone(),
            session_id: None,
            limit: LimitKind::Memory,
            command: cmd.to_owned(),
        }
    );
    // The sandbox stays usable, and small allocations still work.
    let r = fx
        .sh("python3 -c 'b = bytearray(8 * 1024 * 1024); print(len(b))'")
        .await;
    assert_eq!((r.exit_code, r.stdout.as_str()), (0, "8388608\n"));
    fx.destroy().await;
}

/// A fork bomb hits the pids limit (event reported) and is contained.
pub async fn fork_bomb_is_contained_by_the_pids_limit(t: &Target) {
    let mut fx = t
        .start_with(Options::limited(ResourceLimits {
            pids_limit: Some(50),
            ..Default::default()
        }))
        .await;
    let cmd = "f() { f | f & }; f; sleep 3";
    let mut r = req(cmd);
    r.timeout = Some(Duration::from_secs(2));
    match fx.rt.exec(&fx.id, r).await {
        Err(RuntimeError::Timeout { .. }) => {}
        Ok(r) => assert_ne!(r.exit_code, 0, "{r:?}"),
        Err(e) => panic!("{e:?}"),
    }
    match fx.next_event().await {
        RuntimeEvent::ResourceLimitExceeded { limit, command, .. } => {
            assert_eq!((limit, command.as_str()), (LimitKind::Pids, cmd));
        }
    }
    // Contained: the sandbox answers, and its process table gets back to normal. A bomb whose
    // command ended (rather than timed out) keeps running in the background like any
    // background job until its forks fail, so the count is polled for a while; killed
    // processes get twice the reap grace.
    let settle = t.settle_times(2);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        // While the bomb churns even this probe may fail to fork: that counts as not settled.
        let cmd = format!("echo alive; {settle}ps -e -o pid= | wc -l");
        let r = fx.rt.exec(&fx.id, req(&cmd)).await;
        let n = r.as_ref().ok().and_then(|r| {
            let mut lines = r.stdout.lines();
            (lines.next() == Some("alive"))
                .then(|| lines.next()?.trim().parse::<usize>().ok())
                .flatten()
        });
        if n.is_some_and(|n| n <= t.processes_at_rest) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not contained 15 s after the bomb: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    fx.destroy().await;
}

/// A CPU quota of 20% throttles a busy loop.
pub async fn cpu_quota_throttles(t: &Target) {
    let fx = t
        .start_with(Options::limited(ResourceLimits {
            cpu_quota_us: Some(20_000),
            cpu_shares: Some(512),
            ..Default::default()
        }))
        .await;
    // CPU seconds obtained by a busy loop during one wall-clock second.
    let cmd = "python3 -c 'import time\nt=time.time(); c=time.process_time()\nwhile time.time()-t < 1: pass\nprint(round(time.process_time()-c, 3))'";
    let r = fx.sh(cmd).await;
    let cpu: f64 = r.stdout.trim().parse().unwrap_or_else(|_| panic!("{r:?}"));
    assert!(
        cpu < 0.45,
        "20% quota but the loop got {cpu} CPU-seconds in 1 s"
    );
    assert!(cpu > 0.01, "{cpu}");
    // 0.4 s of CPU at 20% of one CPU takes about 2 s of wall time.
    let start = Instant::now();
    let r = fx
        .sh("python3 -c 'import time\nt=time.process_time()\nwhile time.process_time()-t < 0.4: pass'")
        .await;
    assert_eq!(r.exit_code, 0, "{r:?}");
    assert!(
        start.elapsed() > Duration::from_millis(1400),
        "{:?}",
        start.elapsed()
    );
    fx.destroy().await;
}
