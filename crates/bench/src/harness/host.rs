//! Native baselines, generated trees, and what the harness reads off the host (memory, CPU).

use super::*;

pub(super) fn native(cmd: &str, dir: &Path) -> anyhow::Result<f64> {
    let t = Instant::now();
    let out = Command::new("/bin/sh")
        .args(["-c", cmd])
        .current_dir(dir)
        .output()?;
    let dt = t.elapsed().as_secs_f64();
    ensure!(
        out.status.success(),
        "{cmd:?} failed natively: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(dt)
}

pub(super) fn native_out(cmd: &str, dir: &Path) -> anyhow::Result<String> {
    let out = Command::new("/bin/sh")
        .args(["-c", cmd])
        .current_dir(dir)
        .output()?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed natively: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(super) fn spawn_time(program: &str, args: &[&str]) -> anyhow::Result<f64> {
    let t = Instant::now();
    let st = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    ensure!(st.success(), "{program} {args:?} failed");
    Ok(t.elapsed().as_secs_f64())
}

pub(super) const BWRAP_ONESHOT: &[&str] = &[
    "--unshare-all",
    "--ro-bind",
    "/usr",
    "/usr",
    "--symlink",
    "usr/bin",
    "/bin",
    "--symlink",
    "usr/lib",
    "/lib",
    "--symlink",
    "usr/lib64",
    "/lib64",
    "--proc",
    "/proc",
    "--dev",
    "/dev",
    "/bin/true",
];

// ---- data --------------------------------------------------------------------------------

pub(super) fn gen_big(path: &Path, mib: u64) -> anyhow::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for chunk in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        f.write_all(&block)?;
    }
    f.flush()?;
    Ok(())
}

pub(super) fn gen_tree(
    root: &Path,
    files: usize,
    content: impl Fn(usize) -> String,
) -> anyhow::Result<()> {
    for i in 0..files {
        let dir = root.join(format!("d{:03}", i / 100));
        if i % 100 == 0 {
            std::fs::create_dir_all(&dir)?;
        }
        std::fs::write(dir.join(format!("f{i:05}.rs")), content(i))?;
    }
    Ok(())
}

pub(super) fn source(i: usize) -> String {
    let mut s = String::with_capacity(2048);
    for line in 0..40 {
        let _ = writeln!(
            s,
            "fn function_{i}_{line}(x: u64) -> u64 {{ x.wrapping_mul({line}) + {i} }}"
        );
    }
    s
}

pub(super) fn git(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let st = Command::new("git")
        .args(["-c", "user.name=bench", "-c", "user.email=bench@localhost"])
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .status()?;
    ensure!(st.success(), "git {args:?} failed");
    Ok(())
}

// ---- process accounting -----------------------------------------------------------------

/// Proportional set size: private pages plus each shared page divided by its sharers, so
/// that summing over processes counts a shared library once (RSS would count it per process).
pub(super) fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Pss:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// `pid` and all its descendants.
pub(super) fn tree(pid: u32) -> Vec<u32> {
    let mut parent: HashMap<u32, u32> = HashMap::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat"))
                && let Some(after) = stat.rsplit_once(") ")
                && let Some(pp) = after.1.split(' ').nth(1).and_then(|v| v.parse().ok())
            {
                parent.insert(p, pp);
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let cur = out[i];
        out.extend(parent.iter().filter(|(_, pp)| **pp == cur).map(|(p, _)| *p));
        i += 1;
    }
    out
}

pub(super) fn tree_pss_kib(pid: u32) -> u64 {
    tree(pid).into_iter().map(pss_kib).sum()
}

/// CPU seconds (user + system) used so far by `pid` and its reaped children.
pub(super) fn cpu_seconds(pid: u32) -> f64 {
    let ticks = rustix::param::clock_ticks_per_second() as f64;
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let after = s.rsplit_once(") ")?.1.to_owned();
            let f: Vec<f64> = after
                .split(' ')
                .skip(11)
                .take(4)
                .filter_map(|v| v.parse().ok())
                .collect();
            Some(f.iter().sum::<f64>() / ticks)
        })
        .unwrap_or(0.0)
}

/// `bench/sdk_flow.py`: Sandbox.from_local over 1,000 files plus the first run, through the
/// real SDK. Skipped (with a note on stderr) when Python or the SDK is missing.
pub(super) fn sdk_flow(
    grpc: &str,
    server_pid: u32,
    iterations: usize,
) -> anyhow::Result<Option<Row>> {
    let python = std::env::var("AGENTFENSE_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&python)
        .args(["-c", "import agentfense"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("note: the SDK case is skipped: {python} cannot import agentfense");
        return Ok(None);
    }
    eprintln!("case: SDK from_local");
    let cpu0 = cpu_seconds(server_pid);
    let out = Command::new(&python)
        .args(["bench/sdk_flow.py", grpc, "1000", &iterations.to_string()])
        .output()?;
    let server_cpu = (cpu_seconds(server_pid) - cpu0) / iterations as f64;
    ensure!(
        out.status.success(),
        "bench/sdk_flow.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| -> anyhow::Result<f64> {
        let key = format!("\"{name}\": ");
        let start = text.find(&key).context("unexpected sdk_flow output")? + key.len();
        let end = text[start..]
            .find([',', '}'])
            .context("unexpected sdk_flow output")?;
        Ok(text[start..start + end].trim().parse()?)
    };
    let (wall, first, client) = (
        field("wall_s")?,
        field("first_run_s")?,
        field("client_cpu_s")?,
    );
    let one = |v: f64| Stats {
        median: v,
        p95: v,
        p99: v,
        min: v,
        max: v,
        n: iterations,
    };
    Ok(Some(Row {
        case: format!(
            "SDK `Sandbox.from_local` (1,000 files: create, 1,000 uploads, create, start) + first `run` \
             — first run {}, Python client CPU {}, server CPU {}",
            ms(first),
            ms(client),
            ms(server_cpu)
        ),
        ours: one(wall),
        baseline_name: "—".into(),
        baseline: None,
        target: "server share well under the upload time".into(),
        met: Some(server_cpu < wall / 2.0),
    }))
}

pub(super) fn mounts_under(dir: &Path) -> usize {
    let d = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split(' ').nth(4).is_some_and(|m| m.starts_with(&d)))
        .count()
}

// ---- the run ----------------------------------------------------------------------------
