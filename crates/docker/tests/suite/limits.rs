//! Resource limits: memory (OOM → 137 + event), pids (fork bomb contained + event), CPU quota.

use std::time::{Duration, Instant};

use agentfense_runtime::{LimitKind, ResourceLimits, Runtime, RuntimeError, RuntimeEvent};
use pretty_assertions::assert_eq;

use super::common::*;

async fn next_event(fx: &mut Fixture) -> RuntimeEvent {
    tokio::time::timeout(Duration::from_secs(5), fx.events.recv())
        .await
        .expect("no runtime event within 5 s")
        .expect("event channel closed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_limit_oom_kills_with_137_and_reports() {
    let Some(_g) = guard("memory_limit_oom_kills_with_137_and_reports").await else {
        return;
    };
    let mut fx = Fixture::with(Opts {
        limits: ResourceLimits {
            memory_bytes: Some(64 << 20),
            ..Default::default()
        },
        ..Opts::default()
    })
    .await;
    let cmd = "python3 -c 'b = bytearray(200 * 1024 * 1024); print(len(b))'";
    let r = fx.sh(cmd).await;
    assert_eq!(r.exit_code, 137, "{r:?}");
    assert_eq!(
        next_event(&mut fx).await,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fork_bomb_is_contained_by_the_pids_limit() {
    let Some(_g) = guard("fork_bomb_is_contained_by_the_pids_limit").await else {
        return;
    };
    let mut fx = Fixture::with(Opts {
        limits: ResourceLimits {
            pids_limit: Some(50),
            ..Default::default()
        },
        ..Opts::default()
    })
    .await;
    let cmd = "f() { f | f & }; f; sleep 3";
    let mut r = req(cmd);
    r.timeout = Some(Duration::from_secs(2));
    match fx.rt.exec(&fx.id, r).await {
        Err(RuntimeError::Timeout { .. }) => {}
        Ok(r) => assert_ne!(r.exit_code, 0, "{r:?}"),
        Err(e) => panic!("{e:?}"),
    }
    match next_event(&mut fx).await {
        RuntimeEvent::ResourceLimitExceeded { limit, command, .. } => {
            assert_eq!((limit, command.as_str()), (LimitKind::Pids, cmd));
        }
    }
    // Contained: the sandbox answers, with its process table back to normal (docker-init,
    // `sleep infinity`, sh, ps, wc).
    let r = fx.sh("echo alive; ps -e -o pid= | wc -l").await;
    assert_eq!(r.stdout.lines().next(), Some("alive"), "{r:?}");
    let n: usize = r.stdout.lines().nth(1).unwrap().trim().parse().unwrap();
    assert!(n <= 5, "{n} processes left: {r:?}");
    fx.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_quota_throttles() {
    let Some(_g) = guard("cpu_quota_throttles").await else {
        return;
    };
    let fx = Fixture::with(Opts {
        limits: ResourceLimits {
            cpu_quota_us: Some(20_000),
            ..Default::default()
        },
        ..Opts::default()
    })
    .await;
    // 0.4 s of CPU at 20% of one CPU takes about 2 s of wall time.
    let t = Instant::now();
    let r = fx
        .sh("python3 -c 'import time\nt=time.process_time()\nwhile time.process_time()-t < 0.4: pass'")
        .await;
    assert_eq!(r.exit_code, 0, "{r:?}");
    assert!(
        t.elapsed() > Duration::from_millis(1400),
        "{:?}",
        t.elapsed()
    );
    fx.destroy().await;
}
