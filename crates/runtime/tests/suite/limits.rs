//! Limits specific to bwrap: the kernel's own record of CPU throttling in the sandbox's
//! cgroups. (The shared behaviour is in the conformance suite.)

use agentfense_runtime::ResourceLimits;
use agentfense_runtime::conformance::Options;

use super::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_throttling_is_recorded_in_the_cgroup() {
    if skip("cpu_throttling_is_recorded_in_the_cgroup") {
        return;
    }
    let limits = ResourceLimits {
        cpu_quota_us: Some(20_000),
        cpu_shares: Some(512),
        ..Default::default()
    };
    let fx = start_with(Options::limited(limits), true).await;
    // A busy loop for one wall-clock second.
    let r = fx
        .sh("python3 -c 'import time\nt=time.time()\nwhile time.time()-t < 1: pass'")
        .await;
    assert_eq!(r.exit_code, 0, "{r:?}");
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
