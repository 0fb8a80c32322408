//! Resource limits with cgroups: memory (OOM → 137 + event), pids (fork bomb contained + event),
//! CPU quota (throttled).

use std::time::Duration;

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
    if skip("memory_limit_oom_kills_with_137_and_reports") {
        return;
    }
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
    assert_eq!(r.stdout, "8388608\n");
    fx.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fork_bomb_is_contained_by_the_pids_limit() {
    if skip("fork_bomb_is_contained_by_the_pids_limit") {
        return;
    }
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
    // Contained: the sandbox answers, with its process table back to normal.
    let r = fx.sh("echo alive; sleep 0.2; ps -e -o pid= | wc -l").await;
    eprintln!("after bomb: {r:?}");
    assert_eq!(r.stdout.lines().next(), Some("alive"), "{r:?}");
    let n: usize = r.stdout.lines().nth(1).unwrap().trim().parse().unwrap();
    assert!(n <= 4, "{n} processes left: {r:?}");
    fx.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_quota_throttles() {
    if skip("cpu_quota_throttles") {
        return;
    }
    let fx = Fixture::with(Opts {
        limits: ResourceLimits {
            cpu_quota_us: Some(20_000),
            cpu_shares: Some(512),
            ..Default::default()
        },
        ..Opts::default()
    })
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
    // The kernel says so too.
    let info = fx.rt.info(&fx.id).await.unwrap();
    let throttled: u64 = info
        .cgroups
        .iter()
        .filter_map(|d| std::fs::read_to_string(d.join("cpu.stat")).ok())
        .flat_map(|s| {
            s.lines()
                .filter_map(|l| l.strip_prefix("nr_throttled "))
                .filter_map(|v| v.trim().parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum();
    assert!(
        throttled > 0,
        "no throttling recorded in {:?}",
        info.cgroups
    );
    fx.destroy().await;
}
