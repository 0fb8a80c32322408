//! The cases, their baselines, and the report.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use agentfense_proto::v1::{
    self, codebase_service_client::CodebaseServiceClient,
    sandbox_service_client::SandboxServiceClient, upload_chunk::Content,
};
use anyhow::{Context, bail, ensure};
use tonic::transport::Channel;

use crate::Opts;

/// What the figures mean; appended to every report.
const NOTES: &str = r#"
## Reading the figures

* **Opening a file costs no FUSE round trip** (no-open mode): the rules are checked on every
  read and write instead, so warm `find`, `grep -r` and `git status` are served from the
  kernel's caches (names, attributes and pages for 60 s, invalidated at once on changes made
  through the server). The price: no FUSE passthrough, which needs an open (next point). A
  warm sequential read then comes from this mount's page cache, which the kernel fills with
  single 4 KiB pages (FUSE in this kernel has no large folios; upstream adds them later),
  while ext4 caches the native file in large folios. Copying out of single pages is what
  makes the read slower, as the "against single-page caching" row shows: the same file read
  natively from a tmpfs without huge pages costs about the same. Files a command creates are written with direct
  I/O (one copy into the delta, no second page cache).
* **Passthrough I/O mode** (label `agentfense.io=passthrough`, the rows marked so; same rules
  as the read-rule rows): one FUSE open per open(2), checked against the rules, after which
  files the sandbox may only read are read by the kernel straight from the host file (FUSE
  passthrough, Linux >= 6.9; older kernels fall back to reads served by the daemon). The
  sequential read row shows what that buys on a large file, the `grep -r` row what a round
  trip per open costs over many small files: no-open stays the default for source trees.
* **git status** re-reads every file when git cannot refresh its index, which is why it runs
  under a write rule here; under the agent-safe preset `.git` is hidden anyway.
* **Exec round trip**: the init starts each command directly in its own cgroup
  (`clone3(CLONE_INTO_CGROUP)`); moving it there after the fact would wait for an RCU grace
  period whenever the sandbox had been idle (7-25 ms per command), hence the "after 150 ms
  idle" row.
* **Sandbox start** through the API: mounting the policy filesystem takes under 1 ms; the rest
  is the environment. On a cgroup-v1 host, the first move of a process into a cgroup after a
  pause waits for an RCU grace period in the kernel (~5-15 ms here, paid by the bwrap child as
  it joins the sandbox's cgroups), then bubblewrap and the init take ~8 ms and the first
  command ~1.5 ms. The bare runtime (`agentfense-runtime-bench`) shows the same without the API.
* **Idle memory** is PSS, so shared pages count once. Per sandbox: ~0.8 MiB for the init (mostly
  the relocated read-only data of the `agentfense` executable it runs as), ~0.2 MiB for bwrap
  and ~0.3 MiB in the server (FUSE threads, whose 16 MiB request buffers stay unpopulated but
  for a few pages, and the mount's own state).
"#;

/// Data sizes and iteration counts of one mode.
struct Scale {
    big_mib: u64,
    meta_files: usize,
    src_files: usize,
    repo_files: usize,
    fs_iters: usize,
    rtt_iters: usize,
    first_iters: usize,
    density: usize,
    concurrency: usize,
    exec_per_task: usize,
}

const QUICK: Scale = Scale {
    big_mib: 256,
    meta_files: 10_000,
    src_files: 2_000,
    repo_files: 2_000,
    fs_iters: 3,
    rtt_iters: 100,
    first_iters: 5,
    density: 10,
    concurrency: 20,
    exec_per_task: 5,
};

const FULL: Scale = Scale {
    big_mib: 1024,
    meta_files: 50_000,
    src_files: 10_000,
    repo_files: 10_000,
    fs_iters: 7,
    rtt_iters: 500,
    first_iters: 15,
    density: 50,
    concurrency: 100,
    exec_per_task: 20,
};

/// The case names `--only` accepts.
pub const CASES: [&str; 7] = [
    "fs",
    "sdk",
    "exec",
    "session",
    "start",
    "density",
    "concurrency",
];

/// Which cases run.
struct Selection(Vec<String>);

impl Selection {
    fn new(only: &[String]) -> anyhow::Result<Selection> {
        for c in only {
            ensure!(
                CASES.contains(&c.as_str()),
                "unknown case {c:?} for --only; known: {}",
                CASES.join(", ")
            );
        }
        Ok(Selection(only.to_vec()))
    }

    fn has(&self, case: &str) -> bool {
        self.0.is_empty() || self.0.iter().any(|c| c == case)
    }
}

/// Summary statistics of a sample, in seconds.
#[derive(Debug, Clone, Copy)]
struct Stats {
    median: f64,
    p95: f64,
    p99: f64,
    min: f64,
    max: f64,
    n: usize,
}

fn stats(v: &[f64]) -> Stats {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let pick = |q: f64| s[((s.len() as f64 - 1.0) * q).round() as usize];
    Stats {
        median: pick(0.5),
        p95: pick(0.95),
        p99: pick(0.99),
        min: s[0],
        max: s[s.len() - 1],
        n: s.len(),
    }
}

fn ms(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.3} s")
    } else {
        format!("{:.2} ms", s * 1e3)
    }
}

/// One row of the report.
struct Row {
    case: String,
    ours: Stats,
    baseline_name: String,
    baseline: Option<Stats>,
    target: String,
    met: Option<bool>,
}

struct Server {
    child: Child,
    grpc: String,
    data: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let pid = rustix::process::Pid::from_child(&self.child);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pinned(cpu: &Option<usize>, program: &str) -> Command {
    match cpu {
        Some(c) => {
            let mut cmd = Command::new("taskset");
            cmd.args(["-c", &c.to_string(), program]);
            cmd
        }
        None => Command::new(program),
    }
}

fn start_server(exe: &Path, data: &Path, cpu: &Option<usize>) -> anyhow::Result<Server> {
    std::fs::create_dir_all(data)?;
    let config = data.with_extension("yaml");
    // No per-owner quota: the density and concurrency cases start many sandboxes.
    std::fs::write(
        &config,
        "sandbox:\n  max_per_user: 0\nlogging:\n  level: warn\n",
    )?;
    let mut cmd = pinned(cpu, &exe.to_string_lossy());
    // The server (and its mounts) must not outlive a bench that is killed.
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no shared state.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM))
                .map_err(Into::into)
        });
    }
    cmd.args(["serve", "--grpc-addr", "127.0.0.1:0", "--http-addr", ""])
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(data)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", exe.display()))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .context("the server did not start")?;
        if let Some(a) = line.strip_prefix("agentfense: gRPC listening on ") {
            return Ok(Server {
                child,
                grpc: a.to_owned(),
                data: data.to_owned(),
            });
        }
    }
}

struct Api {
    cb: CodebaseServiceClient<Channel>,
    sb: SandboxServiceClient<Channel>,
}

impl Api {
    async fn connect(addr: &str) -> anyhow::Result<Api> {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await?;
        Ok(Api {
            cb: CodebaseServiceClient::new(ch.clone()),
            sb: SandboxServiceClient::new(ch).max_decoding_message_size(4 << 20),
        })
    }

    async fn codebase(&mut self, name: &str) -> anyhow::Result<String> {
        Ok(self
            .cb
            .create_codebase(v1::CreateCodebaseRequest {
                name: name.into(),
                owner_id: "bench".into(),
            })
            .await?
            .into_inner()
            .id)
    }

    async fn upload(&mut self, cb: &str, path: &str, data: &[u8]) -> anyhow::Result<()> {
        let mut msgs = vec![v1::UploadChunk {
            content: Some(Content::Metadata(v1::upload_chunk::Metadata {
                codebase_id: cb.into(),
                file_path: path.into(),
                total_size: data.len() as i64,
            })),
        }];
        msgs.extend(data.chunks(64 << 10).map(|c| v1::UploadChunk {
            content: Some(Content::Data(c.to_vec())),
        }));
        self.cb
            .upload_files(tonic::codegen::tokio_stream::iter(msgs))
            .await?;
        Ok(())
    }

    async fn sandbox(&mut self, cb: &str) -> anyhow::Result<String> {
        self.sandbox_with(cb, &[("**", v1::Permission::Write, 0)], &[])
            .await
    }

    async fn sandbox_with(
        &mut self,
        cb: &str,
        rules: &[(&str, v1::Permission, i32)],
        labels: &[(&str, &str)],
    ) -> anyhow::Result<String> {
        Ok(self
            .sb
            .create_sandbox(v1::CreateSandboxRequest {
                codebase_id: cb.into(),
                permissions: rules
                    .iter()
                    .map(|(p, l, pr)| v1::PermissionRule {
                        pattern: (*p).into(),
                        r#type: v1::PatternType::Glob as i32,
                        permission: *l as i32,
                        priority: *pr,
                    })
                    .collect(),
                labels: labels
                    .iter()
                    .map(|(k, v)| ((*k).into(), (*v).into()))
                    .collect(),
                runtime: v1::RuntimeType::Bwrap as i32,
                ..Default::default()
            })
            .await?
            .into_inner()
            .id)
    }

    async fn start(&mut self, sb: &str) -> anyhow::Result<()> {
        self.sb
            .start_sandbox(v1::StartSandboxRequest {
                sandbox_id: sb.into(),
            })
            .await?;
        Ok(())
    }

    async fn exec(&mut self, sb: &str, command: &str) -> anyhow::Result<v1::ExecResult> {
        let r = self
            .sb
            .exec(v1::ExecRequest {
                sandbox_id: sb.into(),
                command: command.into(),
                timeout: Some(Duration::from_secs(300).into()),
                ..Default::default()
            })
            .await?
            .into_inner();
        ensure!(
            r.exit_code == 0,
            "{command:?} exited {} in the sandbox: {}",
            r.exit_code,
            r.stderr
        );
        Ok(r)
    }

    async fn destroy(&mut self, sb: &str) -> anyhow::Result<()> {
        self.sb
            .destroy_sandbox(v1::DestroySandboxRequest {
                sandbox_id: sb.into(),
            })
            .await?;
        Ok(())
    }
}

fn native(cmd: &str, dir: &Path) -> anyhow::Result<f64> {
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

fn native_out(cmd: &str, dir: &Path) -> anyhow::Result<String> {
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

fn spawn_time(program: &str, args: &[&str]) -> anyhow::Result<f64> {
    let t = Instant::now();
    let st = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    ensure!(st.success(), "{program} {args:?} failed");
    Ok(t.elapsed().as_secs_f64())
}

const BWRAP_ONESHOT: &[&str] = &[
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

fn gen_big(path: &Path, mib: u64) -> anyhow::Result<()> {
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

fn gen_tree(root: &Path, files: usize, content: impl Fn(usize) -> String) -> anyhow::Result<()> {
    for i in 0..files {
        let dir = root.join(format!("d{:03}", i / 100));
        if i % 100 == 0 {
            std::fs::create_dir_all(&dir)?;
        }
        std::fs::write(dir.join(format!("f{i:05}.rs")), content(i))?;
    }
    Ok(())
}

fn source(i: usize) -> String {
    let mut s = String::with_capacity(2048);
    for line in 0..40 {
        let _ = writeln!(
            s,
            "fn function_{i}_{line}(x: u64) -> u64 {{ x.wrapping_mul({line}) + {i} }}"
        );
    }
    s
}

fn git(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
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
fn pss_kib(pid: u32) -> u64 {
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
fn tree(pid: u32) -> Vec<u32> {
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

fn tree_pss_kib(pid: u32) -> u64 {
    tree(pid).into_iter().map(pss_kib).sum()
}

/// CPU seconds (user + system) used so far by `pid` and its reaped children.
fn cpu_seconds(pid: u32) -> f64 {
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
fn sdk_flow(grpc: &str, server_pid: u32, iterations: usize) -> anyhow::Result<Option<Row>> {
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

fn mounts_under(dir: &Path) -> usize {
    let d = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split(' ').nth(4).is_some_and(|m| m.starts_with(&d)))
        .count()
}

// ---- the run ----------------------------------------------------------------------------

/// Runs every case and returns the markdown report (also written to `--out`).
pub fn run(opts: &Opts) -> anyhow::Result<String> {
    ensure!(
        rustix::process::geteuid().is_root(),
        "run as root: sandboxes need FUSE, namespaces and cgroups"
    );
    let scale = if opts.quick { &QUICK } else { &FULL };
    let only = Selection::new(&opts.only)?;
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu: Option<usize> = match opts.cpu.as_str() {
        "none" => None,
        c => Some(c.parse().context("--cpu takes a CPU number or `none`")?),
    };
    if let Some(c) = cpu {
        let mut set = rustix::thread::CpuSet::new();
        set.set(c);
        rustix::thread::sched_setaffinity(None, &set).context("cannot pin the bench process")?;
    }
    let exe = match &opts.agentfense {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("agentfense"),
    };
    ensure!(
        exe.is_file(),
        "{} not found: build it with cargo build --release -p agentfense-cli",
        exe.display()
    );
    let work = opts
        .work
        .clone()
        .unwrap_or_else(|| PathBuf::from("target/bench-data"));
    if work.exists() {
        std::fs::remove_dir_all(&work).with_context(|| {
            format!(
                "cannot clear {} (is a server of an earlier run still mounted there?)",
                work.display()
            )
        })?;
    }
    std::fs::create_dir_all(&work)?;
    let work = work.canonicalize()?;

    let server = start_server(&exe, &work.join("data"), &cpu)?;
    let server_pid = server.child.id();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let rows = rt.block_on(cases(scale, &only, &server, server_pid))?;
    drop(server);
    ensure!(
        mounts_under(&work) == 0,
        "FUSE mounts left behind under {}",
        work.display()
    );

    let mut md = String::new();
    let _ = writeln!(md, "# AgentFense performance\n");
    let _ = writeln!(
        md,
        "Produced by `sudo target/release/agentfense-bench{}{}` on {} ({} CPUs, kernel {}). \
         Each case ran ours and its baseline interleaved on a warm cache. Filesystem cases time \
         the command from inside its own shell, in a running sandbox and natively, so they \
         measure the filesystem alone; the other cases are wall clock as a client of the gRPC \
         API sees them. Sandboxes run with the \
         server's default limits (2 GiB memory, 1024 processes).\n",
        if opts.quick { " --quick" } else { "" },
        if opts.only.is_empty() {
            String::new()
        } else {
            format!(" --only {}", opts.only.join(","))
        },
        now_utc(),
        cpus,
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    let _ = writeln!(
        md,
        "CPU placement: {}.\n",
        match cpu {
            Some(c) => format!(
                "the server (FUSE daemon threads included), every sandbox, the native baselines and \
                 the bench client pinned to CPU {c}"
            ),
            None => "unpinned (scheduler's choice)".into(),
        }
    );
    let _ = writeln!(
        md,
        "| case | ours (median) | baseline | baseline (median) | ratio | ours p95 | ours min-max | N | target | met |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let (bname, bmed, ratio) = match r.baseline {
            Some(b) => (
                r.baseline_name.clone(),
                ms(b.median),
                format!("{:.2}x", r.ours.median / b.median),
            ),
            None => (r.baseline_name.clone(), "—".into(), "—".into()),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} – {} | {} | {} | {} |",
            r.case,
            ms(r.ours.median),
            bname,
            bmed,
            ratio,
            ms(r.ours.p95),
            ms(r.ours.min),
            ms(r.ours.max),
            r.ours.n,
            r.target,
            match r.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "—",
            }
        );
    }
    md.push_str(NOTES);
    if let Some(out) = &opts.out {
        std::fs::write(out, &md).with_context(|| format!("cannot write {}", out.display()))?;
    }
    Ok(md)
}

fn now_utc() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn ratio_row(
    case: &str,
    ours: &[f64],
    base_name: &str,
    base: &[f64],
    max_ratio: Option<f64>,
    target: &str,
) -> Row {
    let (o, b) = (stats(ours), stats(base));
    Row {
        case: case.into(),
        ours: o,
        baseline_name: base_name.into(),
        baseline: Some(b),
        target: target.into(),
        met: max_ratio.map(|m| o.median / b.median <= m),
    }
}

async fn cases(
    scale: &Scale,
    only: &Selection,
    server: &Server,
    server_pid: u32,
) -> anyhow::Result<Vec<Row>> {
    let mut api = Api::connect(&server.grpc).await?;
    let mut rows = Vec::new();
    if only.has("fs") || only.has("exec") || only.has("session") {
        running_cases(scale, only, &mut api, server, &mut rows).await?;
    }
    if only.has("sdk")
        && let Some(row) = sdk_flow(
            &server.grpc,
            server_pid,
            if scale.fs_iters > 3 { 3 } else { 1 },
        )?
    {
        rows.push(row);
    }
    if only.has("start") {
        start_cases(scale, &mut api, &mut rows).await?;
    }
    if only.has("density") || only.has("concurrency") {
        density_cases(scale, only, &mut api, server, server_pid, &mut rows).await?;
    }
    ensure!(
        mounts_under(&server.data) == 0,
        "mounts left behind after destroying every sandbox"
    );
    let leftover = tree(server_pid).len() - 1;
    ensure!(
        leftover == 0,
        "{leftover} processes left behind after destroying every sandbox"
    );
    Ok(rows)
}

/// The server's label that picks a sandbox's I/O mode (`no-open` or `passthrough`).
const LABEL_IO: &str = "agentfense.io";

/// One filesystem case: a command timed in a running sandbox and natively, interleaved.
struct FsCase<'a> {
    label: String,
    cmd: String,
    sandbox: &'a str,
    /// Where the baseline runs the command natively (`None`: in the codebase itself), and
    /// what the report calls it.
    native_dir: Option<&'a Path>,
    baseline: &'static str,
    /// Largest ours/native ratio of the medians that meets the target; `None` for a row
    /// reported without a target.
    max_ratio: Option<f64>,
    target: &'static str,
}

impl<'a> FsCase<'a> {
    /// A case whose baseline is the same command natively in the codebase.
    fn new(
        label: String,
        cmd: &str,
        sandbox: &'a str,
        max_ratio: Option<f64>,
        target: &'static str,
    ) -> FsCase<'a> {
        FsCase {
            label,
            cmd: cmd.to_owned(),
            sandbox,
            native_dir: None,
            baseline: "native",
            max_ratio,
            target,
        }
    }
}

/// A copy of a file on a tmpfs mounted with `huge=never`, whose page cache holds single pages
/// only; unmounted on drop.
struct SmallPageCopy {
    dir: PathBuf,
}

impl SmallPageCopy {
    fn new(work: &Path, file: &Path) -> anyhow::Result<SmallPageCopy> {
        let dir = work.join("tmpfs-small-pages");
        std::fs::create_dir_all(&dir)?;
        let size = std::fs::metadata(file)?.len() + (64 << 20);
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size},huge=never,mode=0755"))
            .arg("agentfense-bench")
            .arg(&dir)
            .status()?;
        ensure!(st.success(), "mounting a tmpfs at {} failed", dir.display());
        let copy = SmallPageCopy { dir };
        std::fs::copy(file, copy.dir.join(file.file_name().context("file name")?))?;
        Ok(copy)
    }
}

impl Drop for SmallPageCopy {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The filesystem cases and the exec and session round trips, on running sandboxes.
async fn running_cases(
    scale: &Scale,
    only: &Selection,
    api: &mut Api,
    server: &Server,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    // Filesystem cases: one codebase with generated data, one full-access sandbox.
    let cb = api.codebase("bench-fs").await?;
    let dir = server.data.join("codebases").join(&cb);
    if only.has("fs") {
        eprintln!("generating data ...");
        gen_big(&dir.join("big.bin"), scale.big_mib)?;
        gen_tree(&dir.join("meta"), scale.meta_files, |i| format!("{i}\n"))?;
        gen_tree(&dir.join("src"), scale.src_files, source)?;
        let repo = dir.join("repo");
        gen_tree(&repo, scale.repo_files, source)?;
        git(&repo, &["init", "-q"])?;
        git(&repo, &["add", "-A"])?;
        git(&repo, &["commit", "-q", "-m", "bench"])?;
    }
    std::fs::create_dir_all(dir.join("out"))?;
    // The agent-safe shape: the codebase readable, one output directory writable. git status
    // runs in a sandbox that may write (git refreshes its index), like the development preset.
    let read_rules = [
        ("**", v1::Permission::Read, 0),
        ("/out/**", v1::Permission::Write, 10),
    ];
    let sb = api.sandbox_with(&cb, &read_rules, &[]).await?;
    api.start(&sb).await?;
    let sb_write = api.sandbox(&cb).await?;
    api.start(&sb_write).await?;
    // The same rules in the other I/O mode, for its trade-off: native reads of large files
    // against a round trip per open.
    let sb_passthrough = if only.has("fs") {
        let id = api
            .sandbox_with(&cb, &read_rules, &[(LABEL_IO, "passthrough")])
            .await?;
        api.start(&id).await?;
        Some(id)
    } else {
        None
    };

    // The kernel's own cost of a page cache made of single pages (what this FUSE mount's page
    // cache is on Linux 6.18), next to ext4's large folios: the same file natively on a
    // tmpfs without huge pages.
    let small_pages = if only.has("fs") {
        Some(SmallPageCopy::new(&server.data, &dir.join("big.bin"))?)
    } else {
        None
    };
    let read = "cat big.bin > /dev/null";
    let grep = "grep -r needle_not_there src > /dev/null; true";
    let fs_cases = match &sb_passthrough {
        None => Vec::new(),
        Some(sb_passthrough) => {
            let mib = scale.big_mib;
            vec![
                FsCase::new(
                    format!("sequential read ({mib} MiB), read rule"),
                    read,
                    &sb,
                    Some(1.0 / 0.9),
                    ">= 0.9x native throughput",
                ),
                FsCase {
                    native_dir: small_pages.as_ref().map(|t| t.dir.as_path()),
                    baseline: "native, tmpfs without huge pages",
                    ..FsCase::new(
                        format!(
                            "sequential read ({mib} MiB), read rule, against single-page caching"
                        ),
                        read,
                        &sb,
                        None,
                        "reference: the kernel's cost of single-page caching",
                    )
                },
                FsCase::new(
                    format!("sequential read ({mib} MiB), read rule, passthrough I/O mode"),
                    read,
                    sb_passthrough,
                    Some(1.0 / 0.9),
                    ">= 0.9x native throughput",
                ),
                FsCase::new(
                    format!("sequential write ({mib} MiB, fdatasync), write rule"),
                    &format!(
                        "dd if=/dev/zero of=out/w.bin bs=1M count={mib} conv=fdatasync 2>/dev/null && rm out/w.bin"
                    ),
                    &sb,
                    Some(1.0 / 0.8),
                    ">= 0.8x native throughput",
                ),
                FsCase::new(
                    format!("find + stat ({} files), read rule", scale.meta_files),
                    "find meta -type f -printf '%s\\n' | wc -l > /dev/null",
                    &sb,
                    Some(1.5),
                    "<= 1.5x native",
                ),
                FsCase::new(
                    format!("grep -r ({} files), read rule", scale.src_files),
                    grep,
                    &sb,
                    Some(2.0),
                    "<= 2x native",
                ),
                // Reported for the trade-off: a round trip per open is what this mode costs.
                FsCase::new(
                    format!(
                        "grep -r ({} files), read rule, passthrough I/O mode",
                        scale.src_files
                    ),
                    grep,
                    sb_passthrough,
                    None,
                    "reference (no-open mode is the default for source trees)",
                ),
                FsCase::new(
                    format!("git status ({} files), write rule", scale.repo_files),
                    "git -C repo status --porcelain > /dev/null",
                    &sb_write,
                    Some(2.0),
                    "<= 2x native",
                ),
            ]
        }
    };
    for FsCase {
        label,
        cmd,
        sandbox,
        native_dir,
        baseline,
        max_ratio,
        target,
    } in fs_cases
    {
        let native_dir = native_dir.unwrap_or(&dir);
        eprintln!("case: {label}");
        // Warm both caches first.
        native(&cmd, native_dir)?;
        api.exec(sandbox, &cmd).await?;
        let (mut ours, mut base) = (vec![], vec![]);
        // Both sides time the command itself from inside the same shell, so process start-up
        // and the API's own cost (the exec round trip case below) are not counted here.
        let timed =
            format!("s=$(date +%s%N); {cmd}; e=$(date +%s%N); echo \"elapsed_ns=$((e - s))\"");
        let parse = |out: &str| -> anyhow::Result<f64> {
            let ns: f64 = out
                .lines()
                .find_map(|l| l.strip_prefix("elapsed_ns="))
                .context("no elapsed_ns in the output")?
                .trim()
                .parse()?;
            Ok(ns / 1e9)
        };
        for _ in 0..scale.fs_iters {
            base.push(parse(&native_out(&timed, native_dir)?)?);
            let r = api.exec(sandbox, &timed).await?;
            ours.push(parse(&r.stdout)?);
        }
        rows.push(ratio_row(&label, &ours, baseline, &base, max_ratio, target));
    }

    if only.has("exec") {
        exec_case(scale, api, &sb, rows).await?;
    }
    if only.has("session") {
        session_case(scale, api, &sb, rows).await?;
    }
    drop(small_pages);
    api.destroy(&sb).await?;
    api.destroy(&sb_write).await?;
    if let Some(sb_passthrough) = &sb_passthrough {
        api.destroy(sb_passthrough).await?;
    }
    Ok(())
}

/// Exec round trip on a running sandbox.
async fn exec_case(
    scale: &Scale,
    api: &mut Api,
    sb: &str,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    eprintln!("case: exec round trip");
    let (mut ours, mut bw, mut fe) = (vec![], vec![], vec![]);
    for _ in 0..scale.rtt_iters {
        bw.push(spawn_time("bwrap", BWRAP_ONESHOT)?);
        fe.push(spawn_time("/bin/true", &[])?);
        let t = Instant::now();
        api.exec(sb, "true").await?;
        ours.push(t.elapsed().as_secs_f64());
    }
    let (o, b, f) = (stats(&ours), stats(&bw), stats(&fe));
    rows.push(Row {
        case: format!("exec round trip `true` (p99 {})", ms(o.p99)),
        ours: o,
        baseline_name: "`bwrap --unshare-all /bin/true`".into(),
        baseline: Some(b),
        target: "p50 <= 2 ms and < bwrap one-shot".into(),
        met: Some(o.median <= 0.002 && o.median < b.median),
    });
    rows.push(Row {
        case: "plain fork+exec `/bin/true` (reference)".into(),
        ours: f,
        baseline_name: "—".into(),
        baseline: None,
        target: "—".into(),
        met: None,
    });
    // An agent's commands arrive after pauses, when the kernel's cgroup machinery is cold:
    // the same round trip with an idle pause before each, against a bwrap one-shot after the
    // same pause.
    eprintln!("case: exec round trip after an idle pause");
    let (mut ours, mut bw) = (vec![], vec![]);
    for _ in 0..scale.rtt_iters.min(60) {
        tokio::time::sleep(Duration::from_millis(150)).await;
        bw.push(spawn_time("bwrap", BWRAP_ONESHOT)?);
        tokio::time::sleep(Duration::from_millis(150)).await;
        let t = Instant::now();
        api.exec(sb, "true").await?;
        ours.push(t.elapsed().as_secs_f64());
    }
    let (o, b) = (stats(&ours), stats(&bw));
    rows.push(Row {
        case: format!(
            "exec round trip `true` after 150 ms idle (p99 {})",
            ms(o.p99)
        ),
        ours: o,
        baseline_name: "`bwrap --unshare-all /bin/true` after 150 ms idle".into(),
        baseline: Some(b),
        target: "< bwrap one-shot after the same pause".into(),
        met: Some(o.median < b.median),
    });
    Ok(())
}

/// Session command round trip, against the plain exec API.
async fn session_case(
    scale: &Scale,
    api: &mut Api,
    sb: &str,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    eprintln!("case: session round trip");
    let sess = api
        .sb
        .create_session(v1::CreateSessionRequest {
            sandbox_id: sb.to_owned(),
            shell: "/bin/sh".into(),
            env: Default::default(),
        })
        .await?
        .into_inner()
        .id;
    let (mut so, mut se) = (vec![], vec![]);
    for _ in 0..scale.rtt_iters {
        let t = Instant::now();
        let r = api
            .sb
            .session_exec(v1::SessionExecRequest {
                session_id: sess.clone(),
                command: "true".into(),
                timeout: None,
            })
            .await?
            .into_inner();
        ensure!(r.exit_code == 0, "session exec failed: {}", r.stderr);
        so.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        api.exec(sb, "true").await?;
        se.push(t.elapsed().as_secs_f64());
    }
    let so_s = stats(&so);
    rows.push(Row {
        case: format!("session command round trip `true` (p99 {})", ms(so_s.p99)),
        ours: so_s,
        baseline_name: "plain exec API".into(),
        baseline: Some(stats(&se)),
        target: "—".into(),
        met: None,
    });
    Ok(())
}

/// Time to first command, and sandbox start alone.
async fn start_cases(scale: &Scale, api: &mut Api, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    eprintln!("case: time to first command");
    let (mut first, mut start_only, mut oneshot) = (vec![], vec![], vec![]);
    for i in 0..scale.first_iters {
        oneshot.push(spawn_time("bwrap", BWRAP_ONESHOT)?);
        let t = Instant::now();
        let cb = api.codebase(&format!("first-{i}")).await?;
        for f in 0..10 {
            api.upload(&cb, &format!("src/f{f}.py"), b"print('hello')\n")
                .await?;
        }
        let sb = api.sandbox(&cb).await?;
        let t_start = Instant::now();
        api.start(&sb).await?;
        api.exec(&sb, "true").await?;
        start_only.push(t_start.elapsed().as_secs_f64());
        first.push(t.elapsed().as_secs_f64());
        api.destroy(&sb).await?;
        api.cb
            .delete_codebase(v1::DeleteCodebaseRequest { codebase_id: cb })
            .await?;
    }
    let st = stats(&start_only);
    rows.push(Row {
        case: "sandbox start + first command (mount, environment, exec)".into(),
        ours: st,
        baseline_name: "bwrap one-shot".into(),
        baseline: Some(stats(&oneshot)),
        target: "p50 <= 30 ms".into(),
        met: Some(st.median <= 0.030),
    });
    rows.push(Row {
        case: "time to first command: create codebase + upload 10 files + create + start + exec"
            .into(),
        ours: stats(&first),
        baseline_name: "bwrap one-shot".into(),
        baseline: Some(stats(&oneshot)),
        target: "—".into(),
        met: None,
    });
    Ok(())
}

/// Density (idle running sandboxes) and concurrency (many sandboxes doing exec loops).
async fn density_cases(
    scale: &Scale,
    only: &Selection,
    api: &mut Api,
    server: &Server,
    server_pid: u32,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let cb = api.codebase("density").await?;
    api.upload(&cb, "a.txt", b"a\n").await?;
    if only.has("density") {
        density_case(scale, api, &cb, server_pid, rows).await?;
    }
    if only.has("concurrency") {
        concurrency_case(scale, api, &cb, server, rows).await?;
    }
    Ok(())
}

/// Idle running sandboxes: memory per sandbox, and whether starts slow down.
async fn density_case(
    scale: &Scale,
    api: &mut Api,
    cb: &str,
    server_pid: u32,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    eprintln!("case: density ({} idle sandboxes)", scale.density);
    let before = tree_pss_kib(server_pid);
    let mut ids = vec![];
    let mut starts = vec![];
    for _ in 0..scale.density {
        let sb = api.sandbox(cb).await?;
        let t = Instant::now();
        api.start(&sb).await?;
        starts.push(t.elapsed().as_secs_f64());
        ids.push(sb);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = tree_pss_kib(server_pid);
    let per = (after.saturating_sub(before)) as f64 / ids.len() as f64 / 1024.0;
    let head = stats(&starts[..starts.len().min(5)]).median;
    let tail = stats(&starts[starts.len().saturating_sub(5)..]).median;
    let slowed = starts.iter().position(|s| *s > 2.0 * head);
    rows.push(Row {
        case: format!(
            "idle sandbox memory (PSS of server + sandbox processes): {per:.2} MiB each ({} running; start {} first vs {} last{})",
            ids.len(),
            ms(head),
            ms(tail),
            match slowed {
                Some(i) => format!("; a start first took 2x at sandbox #{}", i + 1),
                None => "; start never slowed 2x".into(),
            }
        ),
        ours: stats(&starts),
        baseline_name: "—".into(),
        baseline: None,
        target: "<= 5 MiB per idle sandbox".into(),
        met: Some(per <= 5.0),
    });
    for sb in &ids {
        api.destroy(sb).await?;
    }
    Ok(())
}

/// Many sandboxes doing exec loops at once.
async fn concurrency_case(
    scale: &Scale,
    api: &mut Api,
    cb: &str,
    server: &Server,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    eprintln!("case: concurrency ({} sandboxes)", scale.concurrency);
    let mut ids = vec![];
    for _ in 0..scale.concurrency {
        let sb = api.sandbox(cb).await?;
        api.start(&sb).await?;
        ids.push(sb);
    }
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for sb in ids.clone() {
        let addr = server.grpc.clone();
        let n = scale.exec_per_task;
        tasks.spawn(async move {
            let mut api = Api::connect(&addr).await?;
            let mut lat = vec![];
            for _ in 0..n {
                let t = Instant::now();
                api.exec(&sb, "true").await?;
                lat.push(t.elapsed().as_secs_f64());
            }
            Ok::<_, anyhow::Error>(lat)
        });
    }
    let mut lat = vec![];
    let mut errors = 0;
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(v)) => lat.extend(v),
            _ => errors += 1,
        }
    }
    let wall = t.elapsed().as_secs_f64();
    if errors > 0 {
        bail!("{errors} of {} concurrent exec loops failed", ids.len());
    }
    let l = stats(&lat);
    rows.push(Row {
        case: format!(
            "{} sandboxes x {} execs concurrently: {:.0} exec/s, p99 {}, 0 errors",
            ids.len(),
            scale.exec_per_task,
            lat.len() as f64 / wall,
            ms(l.p99)
        ),
        ours: l,
        baseline_name: "—".into(),
        baseline: None,
        target: "no errors".into(),
        met: Some(true),
    });
    for sb in &ids {
        api.destroy(sb).await?;
    }
    Ok(())
}
