//! `agentfense-runtime-bench`: exec round trip on a running sandbox vs a bare
//! `bwrap --unshare-all /bin/true` vs a plain fork+exec, sandbox start time, idle RSS.
//! Needs root and bubblewrap; finds `agentfense-init` next to its own executable (as the server
//! does). Usage: `agentfense-runtime-bench [ITERATIONS]`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use agentfense_runtime::cgroup::{CgroupManager, StdCgroupFs};
use agentfense_runtime::userns::{self, IdPool};
use agentfense_runtime::{BwrapConfig, BwrapRuntime, ExecRequest, Runtime, SandboxSpec};

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn report(name: &str, mut v: Vec<Duration>) {
    let (p50, p99) = (pct(&mut v, 0.50), pct(&mut v, 0.99));
    println!(
        "{name:<44} n={:<5} p50={:>8.3} ms  p99={:>8.3} ms",
        v.len(),
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3
    );
}

fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// Proportional set size: shared pages (libc, the binaries) divided among their users.
fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Pss:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(300);
    let exe = std::env::current_exe()?;
    let init = exe
        .parent()
        .map(|d| d.join("agentfense-init"))
        .ok_or_else(|| anyhow::anyhow!("no executable directory"))?;
    let base = std::env::temp_dir().join(format!("agentfense-bench-{}", std::process::id()));
    let ws = base.join("ws");
    std::fs::create_dir_all(&ws)?;
    let mut cfg = BwrapConfig::new(init, base.join("state"));
    let proc_self = std::fs::read_to_string("/proc/self/cgroup")?;
    cfg.cgroups = Some(CgroupManager::detect(
        Arc::new(StdCgroupFs),
        "/sys/fs/cgroup".as_ref(),
        &proc_self,
        "agentfense-bench",
    )?);
    // As the server runs it: each sandbox in a user namespace of its own. The same runtime
    // without is the baseline of the start case.
    let shared_ns = cfg.clone();
    cfg.userns = Some(Arc::new(IdPool::new(
        userns::DEFAULT_BASE,
        userns::DEFAULT_SLOTS,
        userns::DEFAULT_LEASE_DIR.as_ref(),
    )?));
    let (tx, _rx) = tokio::sync::mpsc::channel(16);
    let rt = BwrapRuntime::new(cfg, tx)?;
    let (tx2, _rx2) = tokio::sync::mpsc::channel(16);
    let rt_shared_ns = BwrapRuntime::new(shared_ns, tx2)?;
    let spec = SandboxSpec {
        image: None,
        workspace: ws.clone(),
        limits: Default::default(),
        network: Default::default(),
        tmp_size: None,
        workspace_path: None,
        home: None,
    };
    let truecmd = || ExecRequest {
        command: "true".into(),
        ..Default::default()
    };

    // 1. Exec round trip on a running sandbox.
    rt.create("bench", spec.clone()).await?;
    rt.start("bench").await?;
    for _ in 0..20 {
        rt.exec("bench", truecmd()).await?;
    }
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let r = rt.exec("bench", truecmd()).await?;
        v.push(t.elapsed());
        anyhow::ensure!(r.exit_code == 0, "true failed: {r:?}");
    }
    report("exec `true` in a running sandbox", v);

    // 1b. The same after an idle pause, as an agent's commands arrive (a pause is where a
    // cgroup migration pays an RCU grace period).
    let mut v = Vec::with_capacity(n.min(50));
    for _ in 0..n.min(50) {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let t = Instant::now();
        let r = rt.exec("bench", truecmd()).await?;
        v.push(t.elapsed());
        anyhow::ensure!(r.exit_code == 0, "true failed: {r:?}");
    }
    report("exec `true` after 150 ms idle", v);

    // 2. Idle RSS of the environment (bwrap + init), no session.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let info = rt.info("bench").await?;
    let rss: u64 = info.host_pids.iter().map(|p| rss_kib(*p)).sum();
    let pss: u64 = info.host_pids.iter().map(|p| pss_kib(*p)).sum();
    println!(
        "idle environment: RSS {rss} KiB, PSS {pss} KiB over {} processes {:?}",
        info.host_pids.len(),
        info.host_pids
            .iter()
            .map(|p| format!(
                "pid {p}: rss {} KiB (anon {}, file {}, shmem {})",
                rss_kib(*p),
                status_kib(*p, "RssAnon:"),
                status_kib(*p, "RssFile:"),
                status_kib(*p, "RssShmem:")
            ))
            .collect::<Vec<_>>()
    );
    rt.destroy("bench").await?;

    // 3. A bare bwrap per command (what the original did for every exec).
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let st = std::process::Command::new("/usr/bin/bwrap")
            .args([
                "--unshare-all",
                "--ro-bind",
                "/usr",
                "/usr",
                "--symlink",
                "usr/lib",
                "/lib",
                "--symlink",
                "usr/lib64",
                "/lib64",
                "--symlink",
                "usr/bin",
                "/bin",
                "--proc",
                "/proc",
                "--dev",
                "/dev",
                "/bin/true",
            ])
            .status()?;
        v.push(t.elapsed());
        anyhow::ensure!(st.success(), "bwrap failed: {st}");
    }
    report("bwrap --unshare-all /bin/true", v);

    // 4. Plain fork+exec.
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let st = std::process::Command::new("/bin/true").status()?;
        v.push(t.elapsed());
        anyhow::ensure!(st.success());
    }
    report("plain fork+exec /bin/true", v);

    // 5. Start: environment up and first command done; with and without a user namespace of
    // its own, interleaved.
    let (mut v, mut w) = (Vec::new(), Vec::new());
    for i in 0..30 {
        for (rt, out) in [(&rt, &mut v), (&rt_shared_ns, &mut w)] {
            let id = format!("start{i}");
            rt.create(&id, spec.clone()).await?;
            let t = Instant::now();
            rt.start(&id).await?;
            rt.exec(&id, truecmd()).await?;
            out.push(t.elapsed());
            rt.destroy(&id).await?;
        }
    }
    report("start sandbox + first `true`", v);
    report("the same in the host's user namespace", w);

    std::fs::remove_dir_all(&base)?;
    Ok(())
}
