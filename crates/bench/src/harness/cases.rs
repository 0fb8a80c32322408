//! The benchmark cases, each run interleaved with its native baseline.

use super::*;

pub(super) async fn cases(
    scale: &Scale,
    only: &Selection,
    server: &Server,
    server_pid: u32,
) -> anyhow::Result<Vec<Row>> {
    let mut api = Api::connect(&server.grpc).await?;
    let mut rows = Vec::new();
    if only.has("fs")
        || only.has("pause")
        || only.has("cold")
        || only.has("exec")
        || only.has("session")
    {
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
    if only.has("review") {
        review_case(scale, &mut api, server, &mut rows).await?;
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

/// Files the metadata-heavy write cases create and remove.
const CREATE_FILES: usize = 1000;

/// The server's label that picks a sandbox's I/O mode (`no-open` or `passthrough`).
pub(super) const LABEL_IO: &str = "agentfense.io";

/// One filesystem case: a command timed in a running sandbox and natively, interleaved.
pub(super) struct FsCase<'a> {
    pub(super) label: String,
    pub(super) cmd: String,
    pub(super) sandbox: &'a str,
    /// Where the baseline runs the command natively (`None`: in the codebase itself), and
    /// what the report calls it.
    pub(super) native_dir: Option<&'a Path>,
    pub(super) baseline: &'static str,
    /// Largest ours/native ratio of the medians that meets the target; `None` for a row
    /// reported without a target.
    pub(super) max_ratio: Option<f64>,
    pub(super) target: &'static str,
    /// Run before each timed run on both sides, not timed (shell variables it sets are seen
    /// by `cmd`).
    pub(super) setup: String,
    /// Idle time before each timed pair (what an agent thinking between commands does to
    /// the caches), and how many pairs then (each costs the pause).
    pub(super) pause: Option<(std::time::Duration, usize)>,
    /// Run each timed command as the first one in a sandbox of its own, created and started
    /// with these rules just before (not timed) and destroyed after: the first pass of an
    /// agent on a fresh sandbox, every kernel cache of the mount cold (the host's own caches
    /// are warm on both sides).
    pub(super) fresh: Option<&'a [(&'a str, v1::Permission, i32)]>,
}

impl<'a> FsCase<'a> {
    /// A case whose baseline is the same command natively in the codebase.
    pub(super) fn new(
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
            setup: ":".to_owned(),
            pause: None,
            fresh: None,
        }
    }
}

/// A copy of a file on a tmpfs mounted with `huge=never`, whose page cache holds single pages
/// only; unmounted on drop.
pub(super) struct SmallPageCopy {
    pub(super) dir: PathBuf,
}

impl SmallPageCopy {
    pub(super) fn new(work: &Path, file: &Path) -> anyhow::Result<SmallPageCopy> {
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
pub(super) async fn running_cases(
    scale: &Scale,
    only: &Selection,
    api: &mut Api,
    server: &Server,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    // Filesystem cases: one codebase with generated data, one full-access sandbox.
    let cb = api.codebase("bench-fs").await?;
    let dir = server.data.join("codebases").join(&cb);
    let fs_data = only.has("fs") || only.has("pause") || only.has("cold");
    if fs_data {
        eprintln!("generating data ...");
        gen_big(&dir.join("big.bin"), scale.big_mib)?;
        gen_tree(&dir.join("meta"), scale.meta_files, |i| format!("{i}\n"))?;
        let tar = Command::new("tar")
            .args(["cf", "meta.tar", "meta"])
            .current_dir(&dir)
            .status()?;
        anyhow::ensure!(tar.success(), "tar cf meta.tar failed");
        gen_tree(&dir.join("src"), scale.src_files, source)?;
        let repo = dir.join("repo");
        gen_tree(&repo, scale.repo_files, source)?;
        // Files older than the index: neither side sees them racily clean (git would re-hash
        // every file it cannot tell apart from the index's own second, on every status).
        let aged = Command::new("find")
            .arg(&repo)
            .args([
                "-type",
                "f",
                "-exec",
                "touch",
                "-d",
                "1 hour ago",
                "{}",
                "+",
            ])
            .status()?;
        anyhow::ensure!(aged.success(), "aging the git fixture failed");
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
    let write_rules = [("**", v1::Permission::Write, 0)];
    let sb = api.sandbox_with(&cb, &read_rules, &[]).await?;
    api.start(&sb).await?;
    let sb_write = api.sandbox(&cb).await?;
    api.start(&sb_write).await?;
    // The same rules in the other I/O mode, for its trade-off: native reads of large files
    // against a round trip per open.
    let sb_passthrough = if fs_data {
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
    let find = "find meta -type f -printf '%s\\n' | wc -l > /dev/null";
    let git_status = "git -C repo status --porcelain > /dev/null";
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
                    find,
                    &sb,
                    Some(1.5),
                    "<= 1.5x native",
                ),
                FsCase {
                    pause: Some((scale.pause, 3)),
                    ..FsCase::new(
                        format!(
                            "find + stat ({} files) after {} s idle, read rule",
                            scale.meta_files,
                            scale.pause.as_secs()
                        ),
                        find,
                        &sb,
                        Some(1.2),
                        "<= 1.2x native",
                    )
                },
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
                // Metadata-heavy writes (installs, builds, unpacking): each run in a fresh
                // directory of its own (the setup is not timed). The rows that delete come
                // after the rows that create: ext4 without a journal (this VM's disk) skips
                // inodes deleted in the last 5 s when it allocates, scanning past each, which
                // made a create right after a mass deletion up to 10x slower on whichever
                // side came next.
                FsCase {
                    setup: "d=out/create$$; mkdir $d".to_owned(),
                    ..FsCase::new(
                        format!("create {CREATE_FILES} empty files, write rule"),
                        &format!("for i in $(seq {CREATE_FILES}); do : > $d/f$i; done"),
                        &sb,
                        Some(2.0),
                        "<= 2x native",
                    )
                },
                FsCase {
                    setup: "d=out/tar$$; mkdir $d".to_owned(),
                    ..FsCase::new(
                        format!("tar x of {} files, write rule", scale.meta_files),
                        "tar xf meta.tar -C $d",
                        &sb,
                        Some(2.0),
                        "<= 2x native",
                    )
                },
                FsCase {
                    setup: format!(
                        "d=out/rm$$; mkdir $d; for i in $(seq {CREATE_FILES}); do : > $d/f$i; done"
                    ),
                    ..FsCase::new(
                        format!("rm -rf of {CREATE_FILES} files, write rule"),
                        "rm -rf $d",
                        &sb,
                        Some(2.0),
                        "<= 2x native",
                    )
                },
                FsCase::new(
                    format!("git status ({} files), write rule", scale.repo_files),
                    git_status,
                    &sb_write,
                    Some(2.0),
                    "<= 2x native",
                ),
            ]
            .into_iter()
            // The first pass in a fresh sandbox: the same commands, the mount's caches cold.
            .chain(
                [
                    (format!("find + stat ({} files)", scale.meta_files), find, &read_rules[..], "<= 2x native"),
                    (format!("grep -r ({} files)", scale.src_files), grep, &read_rules[..], "<= 2x native"),
                    (format!("git status ({} files)", scale.repo_files), git_status, &write_rules[..], "<= 2x native"),
                    (format!("sequential read ({mib} MiB)"), read, &read_rules[..], ">= 0.5x native throughput"),
                ]
                .into_iter()
                .map(|(what, cmd, rules, target)| FsCase {
                    fresh: Some(rules),
                    ..FsCase::new(format!("{what}, fresh sandbox"), cmd, &sb, Some(2.0), target)
                }),
            )
            .collect()
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
        setup,
        pause,
        fresh,
    } in fs_cases
    {
        if pause.is_some_and(|(p, _)| p.is_zero()) {
            // --quick: no time for pauses.
            continue;
        }
        let kind = match (pause, fresh) {
            (Some(_), _) => "pause",
            (None, Some(_)) => "cold",
            (None, None) => "fs",
        };
        if !only.has(kind) {
            continue;
        }
        let native_dir = native_dir.unwrap_or(&dir);
        eprintln!("case: {label}");
        // Warm both caches first.
        let once = format!("{setup}; {cmd}");
        native(&once, native_dir)?;
        api.exec(sandbox, &once).await?;
        let (mut ours, mut base) = (vec![], vec![]);
        // Both sides time the command itself from inside the same shell, so process start-up
        // and the API's own cost (the exec round trip case below) are not counted here.
        let timed = format!(
            "{setup}; s=$(date +%s%N); {cmd}; e=$(date +%s%N); echo \"elapsed_ns=$((e - s))\""
        );
        let parse = |out: &str| -> anyhow::Result<f64> {
            let ns: f64 = out
                .lines()
                .find_map(|l| l.strip_prefix("elapsed_ns="))
                .context("no elapsed_ns in the output")?
                .trim()
                .parse()?;
            Ok(ns / 1e9)
        };
        for _ in 0..pause.map_or(scale.fs_iters, |(_, n)| n) {
            if let Some((idle, _)) = pause {
                // The scenario itself (an agent thinking), not a synchronisation.
                tokio::time::sleep(idle).await;
            }
            base.push(parse(&native_out(&timed, native_dir)?)?);
            match fresh {
                Some(rules) => {
                    let id = api.sandbox_with(&cb, rules, &[]).await?;
                    api.start(&id).await?;
                    let r = api.exec(&id, &timed).await?;
                    api.destroy(&id).await?;
                    ours.push(parse(&r.stdout)?);
                }
                None => {
                    let r = api.exec(sandbox, &timed).await?;
                    ours.push(parse(&r.stdout)?);
                }
            }
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
pub(super) async fn exec_case(
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
pub(super) async fn session_case(
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
pub(super) async fn start_cases(
    scale: &Scale,
    api: &mut Api,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
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

/// The whole CLI for one command on a local directory (`agentfense run DIR -- true`: mount,
/// environment, command, unmount), against a bubblewrap one-shot.
pub(super) fn run_case(
    scale: &Scale,
    exe: &Path,
    work: &Path,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    eprintln!("case: agentfense run -- true");
    let project = work.join("run-project");
    std::fs::create_dir_all(project.join("src"))?;
    std::fs::write(project.join("src/main.py"), "print('hello')\n")?;
    let data = work.join("run-data");
    let (exe, project, data) = (
        exe.to_string_lossy(),
        project.to_string_lossy(),
        data.to_string_lossy(),
    );
    let args = [
        "run",
        "--data-dir",
        &data,
        "--discard",
        &project,
        "--",
        "true",
    ];
    // The first run makes the directory's state (slot, home); not timed.
    spawn_time(&exe, &args)?;
    let (mut ours, mut oneshot) = (vec![], vec![]);
    for _ in 0..scale.first_iters {
        oneshot.push(spawn_time("bwrap", BWRAP_ONESHOT)?);
        ours.push(spawn_time(&exe, &args)?);
    }
    rows.push(ratio_row(
        "`agentfense run DIR -- true` (whole CLI: mount, environment, command, unmount)",
        &ours,
        "bwrap one-shot",
        &oneshot,
        None,
        "p50 <= 10 ms",
    ));
    if let Some(r) = rows.last_mut() {
        r.met = Some(r.ours.median <= 0.010);
    }
    Ok(())
}

/// Density (idle running sandboxes) and concurrency (many sandboxes doing exec loops).
pub(super) async fn density_cases(
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
pub(super) async fn density_case(
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
pub(super) async fn concurrency_case(
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

/// What authentication costs a command: exec round trips with an API key against a server
/// with `auth.enabled`, interleaved with the same on the main server (auth off).
pub(super) async fn auth_case(
    scale: &Scale,
    exe: &Path,
    work: &Path,
    cpu: &Option<usize>,
    plain: &Server,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    eprintln!("case: exec round trip with an API key");
    let data = work.join("data-auth");
    let authed = start_server_with(exe, &data, cpu, "auth:\n  enabled: true\n")?;
    let out = Command::new(exe)
        .args(["keys", "create", "--tenant", "bench", "--data-dir"])
        .arg(&data)
        .output()?;
    ensure!(
        out.status.success(),
        "keys create failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8(out.stdout)?.trim().to_owned();
    let mut a = Api::connect_with_key(&authed.grpc, Some(&key)).await?;
    let mut p = Api::connect(&plain.grpc).await?;
    let mut sandboxes = Vec::new();
    for api in [&mut a, &mut p] {
        let cb = api.codebase("auth").await?;
        let sb = api.sandbox(&cb).await?;
        api.start(&sb).await?;
        api.exec(&sb, "true").await?;
        sandboxes.push(sb);
    }
    let (mut ours, mut base) = (vec![], vec![]);
    for _ in 0..scale.rtt_iters {
        let t = Instant::now();
        p.exec(&sandboxes[1], "true").await?;
        base.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        a.exec(&sandboxes[0], "true").await?;
        ours.push(t.elapsed().as_secs_f64());
    }
    let (o, b) = (stats(&ours), stats(&base));
    rows.push(Row {
        case: format!("exec round trip `true` with an API key (p99 {})", ms(o.p99)),
        ours: o,
        baseline_name: "the same, authentication off".into(),
        baseline: Some(b),
        target: "<= 1.1x".into(),
        met: Some(o.median <= b.median * 1.1),
    });
    a.destroy(&sandboxes[0]).await?;
    p.destroy(&sandboxes[1]).await?;
    drop(authed);
    ensure!(
        mounts_under(&data) == 0,
        "mounts left behind by the authenticated server"
    );
    Ok(())
}

/// A static HTTP server on loopback for the egress case: `GET /<n>` answers `n` zero bytes.
/// Plain threads, so it serves while the bench blocks on a native command.
fn byte_server() -> anyhow::Result<u16> {
    serve_bytes(std::net::TcpListener::bind("127.0.0.1:0")?)
}

/// A host behind a 1 Gbit/s link: a network namespace reached over a veth pair whose far
/// end is shaped (`tc tbf`), serving [`byte_server`]'s bytes on `addr:port`. What a download
/// from a registry looks like from a fast datacenter (loopback has no link to wait for, so
/// there the proxy's second TCP hop is all the difference). Removed on drop.
struct ShapedHost {
    ns: String,
    veth: String,
    addr: String,
    subnet: String,
    port: u16,
}

impl ShapedHost {
    fn start() -> anyhow::Result<ShapedHost> {
        let id = std::process::id();
        let net = 16 + id % 200;
        let (ns, veth, peer) = (
            format!("afbench{id}"),
            format!("afbh{id}"),
            format!("afbn{id}"),
        );
        let ip = |args: &[&str]| -> anyhow::Result<()> {
            let out = std::process::Command::new(args[0])
                .args(&args[1..])
                .output()?;
            ensure!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(())
        };
        let (host_addr, addr) = (format!("10.232.{net}.1"), format!("10.232.{net}.2"));
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &ns])
            .output();
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &veth])
            .output();
        let mut host = ShapedHost {
            ns: ns.clone(),
            veth: veth.clone(),
            addr: addr.clone(),
            subnet: format!("10.232.{net}.0/24"),
            port: 0,
        };
        ip(&["ip", "netns", "add", &ns])?;
        ip(&[
            "ip", "link", "add", &veth, "type", "veth", "peer", "name", &peer,
        ])?;
        ip(&["ip", "link", "set", &peer, "netns", &ns])?;
        ip(&[
            "ip",
            "addr",
            "add",
            &format!("{host_addr}/24"),
            "dev",
            &veth,
        ])?;
        ip(&["ip", "link", "set", &veth, "up"])?;
        ip(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            &peer,
        ])?;
        ip(&["ip", "-n", &ns, "link", "set", &peer, "up"])?;
        ip(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        ip(&[
            "tc", "-n", &ns, "qdisc", "add", "dev", &peer, "root", "tbf", "rate", "1gbit", "burst",
            "1mbit", "latency", "50ms",
        ])?;
        let ns_path = format!("/run/netns/{ns}");
        let bind = addr.clone();
        // A socket belongs to the namespace it is made in: bind on a thread that enters it.
        let listener = std::thread::spawn(move || -> anyhow::Result<std::net::TcpListener> {
            let f = std::fs::File::open(&ns_path)?;
            rustix::thread::move_into_link_name_space(
                std::os::fd::AsFd::as_fd(&f),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )?;
            Ok(std::net::TcpListener::bind((bind.as_str(), 0))?)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the bind thread panicked"))??;
        host.port = serve_bytes(listener)?;
        Ok(host)
    }
}

impl Drop for ShapedHost {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.ns])
            .output();
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.veth])
            .output();
    }
}

/// Serves `GET /<n>` (`n` zero bytes) on `listener`, on plain threads; returns its port.
fn serve_bytes(listener: std::net::TcpListener) -> anyhow::Result<u16> {
    use std::io::{Read, Write};
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || {
        for conn in listener.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut conn = conn;
                let mut head = Vec::new();
                let mut b = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut b) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&b[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&head);
                let n: usize = text
                    .split_whitespace()
                    .nth(1)
                    .and_then(|p| p.trim_start_matches('/').parse().ok())
                    .unwrap_or(0);
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n"
                );
                let zeros = vec![0u8; 1 << 20];
                let mut left = n;
                while left > 0 {
                    let k = left.min(zeros.len());
                    if conn.write_all(&zeros[..k]).is_err() {
                        return;
                    }
                    left -= k;
                }
            });
        }
    });
    Ok(port)
}

/// The egress proxy's cost: a large download and a one-byte request (connection setup
/// included) with curl from a sandbox whose only way out is its proxy, against curl on the
/// host fetching the same from the same server directly, interleaved.
pub(super) async fn egress_case(
    scale: &Scale,
    exe: &Path,
    work: &Path,
    cpu: &Option<usize>,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    eprintln!("case: egress proxy");
    let port = byte_server()?;
    let shaped = ShapedHost::start().context("a test host behind a shaped veth link")?;
    let data = work.join("data-egress");
    let server = start_server_with(
        exe,
        &data,
        cpu,
        &format!(
            "network:\n  private_allow: ['127.0.0.0/8', '{}']\n  hosts:\n    bench.test: ['127.0.0.1']\n    \
             shaped.test: ['{}']\n",
            shaped.subnet, shaped.addr
        ),
    )?;
    let mut api = Api::connect(&server.grpc).await?;
    let cb = api.codebase("egress").await?;
    let allow = format!("bench.test:{port}, shaped.test:{}", shaped.port);
    let sb = api
        .sandbox_with(
            &cb,
            &[("**", v1::Permission::Write, 0)],
            &[("agentfense.egress", allow.as_str())],
        )
        .await?;
    api.start(&sb).await?;
    let big: usize = if scale.fs_iters > 3 {
        100 << 20
    } else {
        32 << 20
    };
    let time = |host: &str, port: u16, n: usize| {
        format!("curl -sS -o /dev/null -w '%{{time_total}}' http://{host}:{port}/{n}")
    };
    let parse = |s: &str| -> anyhow::Result<f64> {
        s.trim()
            .parse::<f64>()
            .with_context(|| format!("curl printed {s:?}"))
    };
    let loopback = ("127.0.0.1".to_owned(), "bench.test", port);
    let link = (shaped.addr.clone(), "shaped.test", shaped.port);
    for (label, n, iters, (direct, name, port)) in [
        (
            format!(
                "download {} MiB over HTTP through the egress proxy, from a host behind a 1 Gbit/s link",
                big >> 20
            ),
            big,
            scale.fs_iters.max(5),
            link,
        ),
        (
            format!(
                "download {} MiB over HTTP through the egress proxy, from loopback (worst case: \
                 no link, the proxy's second TCP hop is all the difference)",
                big >> 20
            ),
            big,
            scale.fs_iters.max(5),
            loopback.clone(),
        ),
        (
            "1-byte HTTP request through the egress proxy (new connection)".to_owned(),
            1,
            scale.rtt_iters.min(100),
            loopback,
        ),
    ] {
        let (mut ours, mut base) = (vec![], vec![]);
        for _ in 0..iters {
            base.push(parse(&native_out(&time(&direct, port, n), work)?)?);
            ours.push(parse(&api.exec(&sb, &time(name, port, n)).await?.stdout)?);
        }
        let (o, b) = (stats(&ours), stats(&base));
        let (target, met) = if n == 1 {
            ("<= +1 ms".to_owned(), Some(o.median - b.median <= 0.001))
        } else if name == "bench.test" {
            // No link to wait for: CPU alone, where a proxy is a second TCP hop.
            ("none (worst case, for the record)".to_owned(), None)
        } else {
            (
                "throughput >= 0.9x (time <= 1.11x)".to_owned(),
                Some(o.median <= b.median / 0.9),
            )
        };
        rows.push(Row {
            case: label,
            ours: o,
            baseline_name: "curl on the host, direct".into(),
            baseline: Some(b),
            target,
            met,
        });
    }
    api.destroy(&sb).await?;
    drop(server);
    drop(shaped);
    ensure!(
        mounts_under(&data) == 0,
        "mounts left behind by the egress server"
    );
    Ok(())
}

/// Files the review case changes.
const REVIEW_FILES: usize = 10_000;

/// Listing and diffing an agent's changes to 10,000 files through the API (a manual-publish
/// sandbox), against `git status` and `git diff` over the same change natively.
pub(super) async fn review_case(
    scale: &Scale,
    api: &mut Api,
    server: &Server,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    use agentfense_proto::agentfense_v1 as x;
    eprintln!("case: changes and diff of {REVIEW_FILES} modified files");
    let cb = api.codebase("review").await?;
    // The base, written where the server keeps the codebase before any sandbox mounts it.
    let base = server.data.join("codebases").join(&cb);
    let native_dir = server.data.with_file_name("review-native");
    let _ = std::fs::remove_dir_all(&native_dir);
    for root in [&base, &native_dir] {
        for i in 0..REVIEW_FILES {
            let dir = root.join(format!("tree/d{}", i / 100));
            std::fs::create_dir_all(&dir)?;
            let body: String = (0..20).map(|l| format!("line {l} of file {i}\n")).collect();
            std::fs::write(dir.join(format!("f{i}.txt")), body)?;
        }
    }
    native_out(
        "git init -q && git add -A && git -c user.name=b -c user.email=b@b commit -qm base",
        &native_dir,
    )?;
    let change = "find tree -type f -exec sh -c 'for f; do echo changed >> \"$f\"; done' _ {} +";
    native_out(change, &native_dir)?;
    let sb = api
        .sandbox_with(
            &cb,
            &[("**", v1::Permission::Write, 0)],
            &[("agentfense.publish", "manual")],
        )
        .await?;
    api.start(&sb).await?;
    api.exec(&sb, change).await?;
    let (mut list, mut list_base, mut diff, mut diff_base) = (vec![], vec![], vec![], vec![]);
    for _ in 0..scale.fs_iters.max(3) {
        let t = Instant::now();
        let r = api
            .rv
            .list_changes(x::ListChangesRequest {
                sandbox_id: sb.clone(),
                paths: vec![],
                limit: REVIEW_FILES as i32,
            })
            .await?
            .into_inner();
        list.push(t.elapsed().as_secs_f64());
        ensure!(
            r.changes.len() == REVIEW_FILES && !r.truncated,
            "{} changes listed, expected {REVIEW_FILES}",
            r.changes.len()
        );
        list_base.push(native("git status --porcelain >/dev/null", &native_dir)?);
        let t = Instant::now();
        let d = api
            .rv
            .get_diff(x::GetDiffRequest {
                sandbox_id: sb.clone(),
                paths: vec![],
                max_bytes: 0,
            })
            .await?
            .into_inner();
        diff.push(t.elapsed().as_secs_f64());
        ensure!(
            d.files as usize == REVIEW_FILES && !d.truncated,
            "{} files in the diff, expected {REVIEW_FILES}",
            d.files
        );
        diff_base.push(native("git diff >/dev/null", &native_dir)?);
    }
    for (case, ours, base, bname) in [
        (
            "changes of 10,000 modified files (API, with sha256 of both sides)",
            &list,
            &list_base,
            "git status --porcelain natively",
        ),
        (
            "git-compatible diff of 10,000 modified files (API)",
            &diff,
            &diff_base,
            "git diff natively",
        ),
    ] {
        let o = stats(ours);
        rows.push(Row {
            case: case.into(),
            ours: o,
            baseline_name: bname.into(),
            baseline: Some(stats(base)),
            target: "< 1 s".into(),
            met: Some(o.median < 1.0),
        });
    }
    api.destroy(&sb).await?;
    let _ = std::fs::remove_dir_all(&native_dir);
    Ok(())
}
