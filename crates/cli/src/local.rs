//! Local sandboxes without a server, shared by `agentfense run` and `agentfense shell`.
//!
//! The directory is the read-only lower layer (nothing is copied); writes go to a delta kept
//! under the data directory, so that several runs over the same directory build on each other.
//! [`LocalSandbox::mount`] puts the policy filesystem over it, [`LocalSandbox::with_sandbox`]
//! runs something in a bubblewrap sandbox on that mount, and [`LocalSandbox::finish`] prints
//! what changed and applies or discards it.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use agentfense_core::ResourceLimits;
use agentfense_fs::{FsConfig, IoMode, MountHandle, PublishMode};
use agentfense_runtime::{BwrapRuntime, NetworkMode, Runtime, SandboxSpec};
use agentfense_server::config::RuntimeConfig;
use anyhow::Context;
use clap::Args;

use crate::PolicyArgs;
use crate::serve_cmd::{default_data_dir, default_init_path, resolve_in_path};

/// Options of every local sandbox command (`run`, `shell`).
#[derive(Debug, Args)]
pub struct LocalArgs {
    /// Policy options.
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// Write the changes into DIR afterwards.
    #[arg(long, conflicts_with = "discard")]
    pub apply: bool,
    /// Drop the changes afterwards (and any kept from earlier runs).
    #[arg(long)]
    pub discard: bool,
    /// Environment variable `KEY=VALUE` inside the sandbox (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Give the sandbox the host's network, bypassing every network control (default: none).
    /// Prefer --egress.
    #[arg(long, conflicts_with = "egress")]
    pub network: bool,
    /// Let the sandbox reach this destination through an egress proxy of its own (repeatable;
    /// `pypi.org`, `*.pythonhosted.org`, `host:port`, `10.0.0.0/8:5432`,
    /// `preset:registries`): its only way out, with a resolver that answers only these names.
    #[arg(long = "egress", value_name = "ENTRY")]
    pub egress: Vec<String>,
    /// How the filesystem serves opened files: `no-open` (the default: cheap opens, best for
    /// source trees) or `passthrough` (native read speed for large files, a round trip per
    /// open; needs Linux >= 6.9, else it falls back to daemon-served I/O).
    #[arg(
        long,
        value_name = "MODE",
        default_value = "no-open",
        value_parser = clap::value_parser!(IoMode)
    )]
    pub io_mode: IoMode,
    /// Memory limit in MiB (default 2048).
    #[arg(long, value_name = "MIB")]
    pub memory_mib: Option<u64>,
    /// Process limit (default 1024).
    #[arg(long)]
    pub pids: Option<u64>,
    /// Disk quota: what the sandbox's writes may take, its delta, `/tmp` and `$HOME` together
    /// (e.g. `512M`, `10G`; default 10G). Past it, writes fail with ENOSPC.
    #[arg(long, value_name = "SIZE", value_parser = agentfense_core::parse_size)]
    pub disk_limit: Option<u64>,
    /// CPU limit in CPUs, e.g. 0.5.
    #[arg(long)]
    pub cpus: Option<f64>,
    /// Size of the sandbox's `/tmp` (e.g. `2G`; default and ceiling: the disk quota, which it
    /// counts against).
    #[arg(long, value_name = "SIZE", value_parser = agentfense_core::parse_size)]
    pub tmp_size: Option<u64>,
    /// Start with an empty `$HOME`. By default each directory has a home of its own that
    /// persists across runs (caches of pip, npm, cargo; tool state), kept beside its changes.
    #[arg(long)]
    pub fresh_home: bool,
    /// Where deltas of local runs are kept (default: the server's data directory).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

/// Where a directory's delta and mountpoint live: one folder per directory, named after it,
/// and the tag that tells two folders of the same name apart.
fn work_dir(data_dir: &Path, dir: &Path) -> (PathBuf, u32) {
    let canon = dir.to_string_lossy();
    // FNV-1a: a short tag for the full path that stays the same across builds (kept deltas
    // are found again after an upgrade), so that two `src` folders differ.
    let hash = agentfense_runtime::stable_hash(canon.as_bytes()) as u32;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "root".into());
    (
        data_dir.join("local").join(format!("{name}-{hash:08x}")),
        hash,
    )
}

/// Most runs on one directory at the same time.
const MAX_SLOTS: u32 = 32;

/// A run's claim on one slot of a directory: slot 1 is `base` itself, slot n its sibling
/// `base.n`. Each slot has its own delta, mount and sandbox, and is held with an exclusive
/// lock on its `lock` file for the life of the run (the kernel drops it when the process
/// dies, however it dies). A run takes the lowest free slot, so runs one after another keep
/// building on slot 1; a run started while another is going gets a slot of its own.
struct Slot {
    work: PathBuf,
    number: u32,
    _lock: std::fs::File,
}

fn claim_slot(base: &Path) -> anyhow::Result<Slot> {
    use std::os::unix::fs::PermissionsExt;
    for number in 1..=MAX_SLOTS {
        let work = if number == 1 {
            base.to_path_buf()
        } else {
            let mut name = base.file_name().unwrap_or_default().to_owned();
            name.push(format!(".{number}"));
            base.with_file_name(name)
        };
        std::fs::create_dir_all(&work)
            .with_context(|| format!("cannot create {}", work.display()))?;
        std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o700))?;
        let lock_path = work.join("lock");
        let lock = std::fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("cannot open {}", lock_path.display()))?;
        match lock.try_lock() {
            Ok(()) => {
                return Ok(Slot {
                    work,
                    number,
                    _lock: lock,
                });
            }
            Err(std::fs::TryLockError::WouldBlock) => continue,
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", lock_path.display()));
            }
        }
    }
    anyhow::bail!("{MAX_SLOTS} runs on this directory are already going: wait for one to finish")
}

/// File in a slot naming the rules of its last run: a later `agentfense apply` of the kept
/// changes judges each path by them, as `run --apply` would have.
const RULES_FILE: &str = "rules.json";

fn save_rules(work: &Path, policy: &agentfense_core::Policy) -> anyhow::Result<()> {
    let v = serde_json::json!({
        "rules": policy.client_rules(),
        "floor": policy.floor(),
    });
    let p = work.join(RULES_FILE);
    std::fs::write(&p, serde_json::to_vec_pretty(&v)?)
        .with_context(|| format!("cannot write {}", p.display()))
}

/// The delta `agentfense run` keeps for `dir` (slot 1, where consecutive runs build), held
/// with the slot's lock so that no run changes it meanwhile. `None` when nothing is kept.
pub(crate) struct KeptDelta {
    /// The project directory (canonical).
    pub dir: PathBuf,
    /// Its delta directory.
    pub delta: PathBuf,
    /// The rules of the run that last used it.
    pub policy: Option<agentfense_core::Policy>,
    _lock: std::fs::File,
}

/// Finds and locks the kept delta of `dir` (see [`KeptDelta`]).
pub(crate) fn kept_delta(dir: &Path, data_dir: Option<&Path>) -> anyhow::Result<Option<KeptDelta>> {
    let dir = dir
        .canonicalize()
        .with_context(|| format!("cannot open project directory {}", dir.display()))?;
    anyhow::ensure!(dir.is_dir(), "{} is not a directory", dir.display());
    let data = data_dir.map_or_else(default_data_dir, Path::to_path_buf);
    let (work, _) = work_dir(&data, &dir);
    let delta = work.join("delta");
    if !delta.join("upper").is_dir() {
        return Ok(None);
    }
    let lock_path = work.join("lock");
    let lock = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("cannot open {}", lock_path.display()))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "a run on {} is going on and may still change its delta: try again when it ends",
            dir.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("cannot lock {}", lock_path.display()));
        }
    }
    let policy = match std::fs::read(work.join(RULES_FILE)) {
        Ok(bytes) => {
            #[derive(serde::Deserialize)]
            struct Saved {
                rules: Vec<agentfense_core::PermissionRule>,
                floor: Vec<agentfense_core::PermissionRule>,
            }
            let saved: Saved = serde_json::from_slice(&bytes)
                .with_context(|| format!("cannot read {}", work.join(RULES_FILE).display()))?;
            Some(agentfense_core::Policy::compile_with_floor(
                saved.rules,
                saved.floor,
            )?)
        }
        Err(_) => None,
    };
    Ok(Some(KeptDelta {
        dir,
        delta,
        policy,
        _lock: lock,
    }))
}

fn kv(list: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    list.iter()
        .map(|s| {
            s.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .with_context(|| format!("--env {s:?} is not KEY=VALUE"))
        })
        .collect()
}

/// A project directory with the policy filesystem mounted over it (unmounted on drop).
pub(crate) struct LocalSandbox {
    dir: PathBuf,
    /// The rules the mount enforces.
    policy: agentfense_core::Policy,
    /// This run's slot of the directory (held until the run ends).
    slot: Slot,
    /// The sandbox id: unique per directory and slot, so that concurrent runs never share a
    /// cgroup, a user-namespace lease or a runtime entry.
    id: String,
    delta: PathBuf,
    mnt: PathBuf,
    mount: MountHandle,
    /// `--tmp-size` (0: `/tmp` may take what the disk quota leaves).
    tmp_cap: u64,
    /// The persistent `$HOME`'s own mount (every path writable), over the slot's `home`.
    home: MountHandle,
    /// Created (not started) before the mount: it decides the sandbox user's host uid, which
    /// the mount shows as the files' owner.
    runtime: BwrapRuntime,
    events: std::sync::Mutex<tokio::sync::mpsc::Receiver<agentfense_runtime::RuntimeEvent>>,
    apply: bool,
    discard: bool,
    /// `--network`: the host's network.
    network: bool,
    /// The `--env` variables (and, with `--egress`, the proxy's).
    pub env: BTreeMap<String, String>,
    /// The `--egress` allow-list, if any.
    egress: Option<agentfense_egress::EgressPolicy>,
}

impl LocalSandbox {
    /// Checks the options and mounts the policy filesystem over project directory `dir`.
    /// Commands may run up to `max_timeout`.
    pub fn mount(args: &LocalArgs, dir: &Path, max_timeout: Duration) -> anyhow::Result<Self> {
        let identity = GitIdentity::start();
        let policy = args.policy.policy()?;
        let project = dir;
        let dir = project
            .canonicalize()
            .with_context(|| format!("cannot open project directory {}", project.display()))?;
        anyhow::ensure!(dir.is_dir(), "{} is not a directory", dir.display());
        let mut env = kv(&args.env)?;
        let egress = if args.egress.is_empty() {
            None
        } else {
            let presets = agentfense_server::config::NetworkConfig::default().presets;
            let p = agentfense_egress::EgressPolicy::parse(&args.egress.join(","), &presets)
                .map_err(|e| anyhow::anyhow!("--egress: {e}"))?;
            for (k, v) in agentfense_egress::proxy_env() {
                env.entry(k).or_insert(v);
            }
            Some(p)
        };
        let (base, tag) = work_dir(
            &args.data_dir.clone().unwrap_or_else(default_data_dir),
            &dir,
        );
        let slot = claim_slot(&base)?;
        let work = slot.work.clone();
        save_rules(&work, &policy)?;
        let id = format!("sb_local_{tag:08x}_{}", slot.number);
        let (delta, mnt, state) = (work.join("delta"), work.join("mnt"), work.join("runtime"));
        // $HOME: a delta of its own over an empty base, kept in the slot across runs.
        let (home, home_base, home_mnt) = (
            work.join("home"),
            work.join("home-base"),
            work.join("home-mnt"),
        );
        if args.fresh_home {
            match std::fs::remove_dir_all(&home) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("cannot remove {}", home.display()));
                }
                _ => {}
            }
        }
        // A run killed with SIGKILL in this slot leaves its mounts behind, dead (no live run
        // holds them: the slot's lock is ours): unmount them before anything looks at their
        // mountpoints, which fail with ENOTCONN or EEXIST until then.
        let _ = agentfense_fs::cleanup_stale_mounts(&work);
        for d in [&delta, &mnt, &home_base, &home_mnt] {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
        }
        {
            use std::os::unix::fs::PermissionsExt;
            // The home's root is its delta's: private to the sandbox user.
            let root = home.join("upper");
            std::fs::create_dir_all(&root)
                .with_context(|| format!("cannot create {}", root.display()))?;
            std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))?;
        }

        let mut rt_cfg = RuntimeConfig {
            allow_network: args.network,
            init_path: default_init_path(),
            ..RuntimeConfig::default()
        };
        if let Some(b) = resolve_in_path(&rt_cfg.bwrap_path) {
            rt_cfg.bwrap_path = b;
        }
        rt_cfg.max_timeout = max_timeout;
        let defaults = rt_cfg.default_resources;
        let limits = ResourceLimits {
            memory_bytes: args.memory_mib.map_or(defaults.memory_bytes, |m| m << 20),
            pids_limit: args.pids.unwrap_or(defaults.pids_limit),
            cpu_quota: args.cpus.map_or(0, |c| (c * 100_000.0) as u64),
            cpu_shares: 0,
            disk_bytes: args.disk_limit.unwrap_or(defaults.disk_bytes),
            disk_inodes: defaults.disk_inodes,
        };
        anyhow::ensure!(limits.disk_bytes > 0, "--disk-limit must be more than 0");
        anyhow::ensure!(args.tmp_size != Some(0), "--tmp-size must be more than 0");
        let tmp_size = args
            .tmp_size
            .map_or(limits.disk_bytes, |t| t.min(limits.disk_bytes));
        let (tx, events) = tokio::sync::mpsc::channel(64);
        let runtime = agentfense_server::host::bwrap_runtime(&rt_cfg, &state, tx)?;
        let spec = SandboxSpec {
            image: None,
            workspace: mnt.clone(),
            limits: (&limits).into(),
            network: if args.network {
                NetworkMode::Host
            } else {
                NetworkMode::None
            },
            tmp_size: Some(tmp_size),
            // The project at its own path too (venvs, shebangs and messages name real
            // paths), unless that path is one the sandbox's system occupies.
            workspace_path: Some(dir.to_string_lossy().into_owned())
                .filter(|p| agentfense_runtime::check_workspace_path(p).is_ok()),
            home: Some(home_mnt.clone()),
        };
        tokio::runtime::Builder::new_current_thread()
            .build()?
            .block_on(runtime.create(&id, spec))
            .context("cannot create the sandbox")?;

        let owner = runtime
            .host_user(&id)
            .unwrap_or(agentfense_runtime::SANDBOX_OWNER);
        let mut cfg = FsConfig::new("local", &dir, &delta, &mnt, policy.clone());
        cfg.publish_mode = PublishMode::Explicit;
        cfg.io_mode = args.io_mode;
        cfg.owner = Some(owner);
        cfg.disk_bytes = limits.disk_bytes;
        cfg.disk_inodes = limits.disk_inodes;
        let mount = agentfense_fs::mount(cfg).context("cannot mount the policy filesystem")?;
        // The home is the sandbox's own: every path writable, nothing published (its delta is
        // the storage), under the same disk quota. A mount rather than a bind, so that its
        // size is bounded and its host path appears nowhere inside.
        let mut home_cfg = FsConfig::new(
            "home",
            &home_base,
            &home,
            &home_mnt,
            agentfense_core::Policy::compile(vec![agentfense_core::PermissionRule::glob(
                "**",
                agentfense_core::Level::Write,
                0,
            )])?,
        );
        home_cfg.publish_mode = PublishMode::Explicit;
        home_cfg.owner = Some(owner);
        home_cfg.disk_bytes = limits.disk_bytes;
        home_cfg.disk_inodes = limits.disk_inodes;
        let home = agentfense_fs::mount(home_cfg).context("cannot mount the sandbox's home")?;
        for (k, v) in identity.vars() {
            env.entry(k.to_owned()).or_insert(v);
        }
        Ok(LocalSandbox {
            dir,
            policy,
            slot,
            id,
            delta,
            mnt,
            mount,
            home,
            tmp_cap: args.tmp_size.unwrap_or(0),
            runtime,
            events: std::sync::Mutex::new(events),
            apply: args.apply,
            discard: args.discard,
            network: args.network,
            env,
            egress,
        })
    }

    /// The project directory (canonical).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The sandbox's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The runtime the sandbox runs in.
    pub fn runtime(&self) -> &BwrapRuntime {
        &self.runtime
    }

    /// The policy filesystem over the project.
    pub fn mount_handle(&self) -> &MountHandle {
        &self.mount
    }

    /// The rules the mount enforces.
    pub fn policy(&self) -> &agentfense_core::Policy {
        &self.policy
    }

    /// The network the sandbox has, as the MCP policy resource shows it.
    pub fn network_json(&self) -> serde_json::Value {
        match (&self.egress, self.network) {
            (Some(p), _) => serde_json::json!({
                "mode": "egress",
                "allow": p.entries().iter().map(|e| e.source.as_str()).collect::<Vec<_>>(),
            }),
            (None, true) => serde_json::json!({"mode": "host"}),
            (None, false) => serde_json::json!({"mode": "none"}),
        }
    }

    /// Starts a bubblewrap sandbox over the mount, runs `body` with the runtime and the
    /// sandbox id, and destroys the sandbox again (also when `body` fails). Resource limit
    /// hits are reported on stderr. `body` handles signals itself (`agentfense shell`).
    pub async fn with_sandbox<T>(
        &self,
        body: impl AsyncFnOnce(&BwrapRuntime, &str) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        self.with_sandbox_until(body, false).await
    }

    /// [`Self::with_sandbox`], also stopped (the sandbox destroyed, the error [`Interrupted`])
    /// when SIGINT, SIGTERM or SIGHUP arrives: a killed `agentfense run` leaves no process and,
    /// after [`Self::finish_interrupted`], no mount behind.
    pub async fn with_sandbox_interruptible<T>(
        &self,
        body: impl AsyncFnOnce(&BwrapRuntime, &str) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        self.with_sandbox_until(body, true).await
    }

    async fn with_sandbox_until<T>(
        &self,
        body: impl AsyncFnOnce(&BwrapRuntime, &str) -> anyhow::Result<T>,
        on_signals: bool,
    ) -> anyhow::Result<T> {
        let runtime = &self.runtime;
        let id = self.id.as_str();
        let work = async {
            runtime
                .start(id)
                .await
                .context("cannot start the sandbox")?;
            if let Some(tmp) = runtime.scratch(id) {
                self.mount.count_scratch(tmp, self.tmp_cap);
            }
            // Serves until the command is done (dropped with this scope).
            let _egress = match &self.egress {
                Some(policy) => Some(serve_egress(runtime, id, policy.clone())?),
                None => None,
            };
            body(runtime, id).await
        };
        let stop = async {
            if on_signals {
                termination_signal().await
            } else {
                std::future::pending().await
            }
        };
        let result = tokio::select! {
            r = work => r,
            signal = stop => Err(anyhow::Error::new(Interrupted(signal))),
        };
        let _ = runtime.destroy(id).await;
        let mut events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        while let Ok(ev) = events.try_recv() {
            let agentfense_runtime::RuntimeEvent::ResourceLimitExceeded { limit, .. } = ev;
            eprintln!("agentfense: the command hit the {} limit", limit.as_str());
        }
        result
    }

    /// After [`Interrupted`]: nothing is applied (the command did not finish), the rest as
    /// [`Self::finish`].
    pub fn finish_interrupted(mut self, signal: i32) -> anyhow::Result<ExitCode> {
        eprintln!("agentfense: interrupted by signal {signal}: the command was stopped");
        self.apply = false;
        self.finish()?;
        Ok(ExitCode::from(u8::try_from(128 + signal).unwrap_or(255)))
    }

    /// Prints what the sandbox changed (judged against the directory), applies or discards
    /// it as asked, and unmounts.
    pub fn finish(self) -> anyhow::Result<()> {
        let (dir, mnt) = (&self.dir, &self.mnt);
        let mut changes: Vec<(char, String)> = self
            .mount
            .pending()
            .into_iter()
            .filter_map(|p| {
                let view = std::fs::symlink_metadata(mnt.join(&p)).ok();
                let host = std::fs::symlink_metadata(dir.join(&p)).ok();
                let kind = |m: &std::fs::Metadata| {
                    let t = m.file_type();
                    if t.is_dir() {
                        "directory"
                    } else if t.is_symlink() {
                        "symlink"
                    } else {
                        "file"
                    }
                };
                let (tag, mut shown) = match (&host, &view) {
                    // Created and removed again (a lock file): nothing to report.
                    (None, None) => return None,
                    (None, Some(_)) => ('A', p.display().to_string()),
                    (Some(h), Some(v)) if kind(h) != kind(v) => {
                        ('T', format!("{} ({} → {})", p.display(), kind(h), kind(v)))
                    }
                    (Some(_), Some(_)) => ('M', p.display().to_string()),
                    (Some(_), None) => ('D', p.display().to_string()),
                };
                if view.as_ref().is_some_and(|v| v.file_type().is_symlink())
                    && let Ok(target) = std::fs::read_link(mnt.join(&p))
                {
                    let bytes = target.as_os_str().as_encoded_bytes();
                    shown.push_str(&format!(" -> {}", target.display()));
                    if agentfense_fs::link_escapes(&p, bytes) {
                        shown.push_str(" (leaves the project: never applied)");
                    }
                }
                Some((tag, shown))
            })
            .collect();
        changes.sort_by(|a, b| a.1.cmp(&b.1));
        let mut err = std::io::stderr();
        if changes.is_empty() {
            writeln!(err, "agentfense: no changes")?;
        } else {
            writeln!(err, "agentfense: {} change(s):", changes.len())?;
            for (tag, p) in &changes {
                writeln!(err, "  {tag} {}", crate::terminal::escape(p))?;
            }
        }
        if self.apply {
            let report = self.mount.publish().context("cannot apply the changes")?;
            writeln!(
                err,
                "agentfense: applied to {}: {} written, {} deleted{}",
                dir.display(),
                report.written.len(),
                report.deleted.len(),
                if report.failed.is_empty() {
                    String::new()
                } else {
                    format!(", {} failed", report.failed.len())
                }
            )?;
            for (p, target) in &report.refused {
                writeln!(
                    err,
                    "agentfense: not applied: {} -> {}: a symlink leaving the project",
                    crate::terminal::escape(&p.display().to_string()),
                    crate::terminal::escape(target)
                )?;
            }
        }
        self.mount.unmount().context("cannot unmount")?;
        self.home.unmount().context("cannot unmount the home")?;
        if self.discard {
            // The slot's lock file stays (and stays held until this run exits), and so does
            // its home (`--fresh-home` drops that).
            for sub in ["delta", "mnt", "runtime"] {
                let p = self.slot.work.join(sub);
                match std::fs::remove_dir_all(&p) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(e).with_context(|| format!("cannot remove {}", p.display()));
                    }
                    _ => {}
                }
            }
            writeln!(err, "agentfense: changes discarded")?;
        } else if !self.apply && !changes.is_empty() {
            writeln!(
                err,
                "agentfense: changes kept in {} (use --apply to write them into {}, --discard to drop them)",
                self.delta.display(),
                self.dir.display()
            )?;
            if self.slot.number > 1 {
                writeln!(
                    err,
                    "agentfense: this run ran beside another on the same directory, in slot {}: \
                     a later run sees these changes only when it gets that slot",
                    self.slot.number
                )?;
            }
        }
        Ok(())
    }
}

/// The invoking user's git identity (`user.name`, `user.email` only: never credentials or
/// helpers), asked of `git config` in one process started early, so that it runs while the
/// sandbox is set up. Under sudo, the identity of the user who ran sudo.
struct GitIdentity(Option<std::process::Child>);

impl GitIdentity {
    fn start() -> GitIdentity {
        let home = std::env::var("SUDO_USER")
            .ok()
            .filter(|u| !u.is_empty() && u != "root")
            .and_then(|u| {
                let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
                passwd.lines().find_map(|l| {
                    let f: Vec<&str> = l.split(':').collect();
                    (f.len() > 5 && f[0] == u).then(|| f[5].to_owned())
                })
            });
        let mut cmd = std::process::Command::new("git");
        cmd.args([
            "config",
            "--global",
            "-z",
            "--get-regexp",
            r"^user\.(name|email)$",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
        if let Some(h) = &home {
            cmd.env("HOME", h).env_remove("XDG_CONFIG_HOME");
        }
        GitIdentity(cmd.spawn().ok())
    }

    /// The identity as the variables git reads (none where git or the setting is missing).
    fn vars(mut self) -> Vec<(&'static str, String)> {
        let Some(out) = self
            .0
            .take()
            .and_then(|c| c.wait_with_output().ok())
            .filter(|o| o.status.success())
        else {
            return Vec::new();
        };
        git_identity_vars(&out.stdout)
    }
}

impl Drop for GitIdentity {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The variables for the output of `git config -z --get-regexp` (`key\nvalue\0` records; the
/// last value of a key wins, as `git config --get` has it).
fn git_identity_vars(out: &[u8]) -> Vec<(&'static str, String)> {
    let (mut name, mut email) = (None, None);
    for record in out.split(|&b| b == 0) {
        let Some((key, value)) = std::str::from_utf8(record)
            .ok()
            .and_then(|r| r.split_once('\n'))
        else {
            continue;
        };
        let value = value.trim();
        if value.is_empty() || value.chars().any(char::is_control) {
            continue;
        }
        match key {
            "user.name" => name = Some(value.to_owned()),
            "user.email" => email = Some(value.to_owned()),
            _ => {}
        }
    }
    let mut vars = Vec::new();
    if let Some(name) = name {
        vars.push(("GIT_AUTHOR_NAME", name.clone()));
        vars.push(("GIT_COMMITTER_NAME", name));
    }
    if let Some(email) = email {
        vars.push(("GIT_AUTHOR_EMAIL", email.clone()));
        vars.push(("GIT_COMMITTER_EMAIL", email));
    }
    vars
}

/// A sandboxed program's exit code as ours (`-1` becomes 255, `256 + n` wraps like a shell).
pub(crate) fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(if code < 0 { 255 } else { (code % 256) as u8 }))
}

/// A local run ended by a signal (its number): the sandbox is destroyed, the mount still there
/// for [`LocalSandbox::finish_interrupted`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Interrupted(pub i32);

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "interrupted by signal {}", self.0)
    }
}

impl std::error::Error for Interrupted {}

/// Signal numbers (the same on every Linux architecture).
const SIGHUP: i32 = 1;
const SIGINT: i32 = 2;
const SIGTERM: i32 = 15;

/// The first of SIGINT, SIGTERM and SIGHUP to arrive (never, for one that cannot be watched).
/// Starts the egress proxy inside the running sandbox `id`; each refused destination is
/// said once on stderr.
fn serve_egress(
    runtime: &BwrapRuntime,
    id: &str,
    policy: agentfense_egress::EgressPolicy,
) -> anyhow::Result<agentfense_egress::Serving> {
    let netns = runtime
        .network_namespace(id)
        .context("cannot find the sandbox's network namespace for --egress")?;
    // The user is the operator here: an address block they allow inside private space (a
    // database on the LAN) is reachable; loopback, link-local, metadata and the host's own
    // addresses never are implicitly, and a wide block (`0.0.0.0/0`) exempts nothing.
    let private_allow = policy
        .entries()
        .iter()
        .filter_map(|e| match e.target {
            agentfense_core::egress::Target::Block(b) => Some(b),
            _ => None,
        })
        .filter(agentfense_egress::wholly_private)
        .collect();
    let cfg = agentfense_egress::EgressConfig {
        private_allow,
        upstream: agentfense_egress::Upstream::system(),
        ..Default::default()
    };
    // Each refused destination once, and not without bound (random names).
    let said = std::sync::Mutex::new(std::collections::HashSet::new());
    let proxy =
        agentfense_egress::Proxy::new(policy, cfg, move |ev: agentfense_egress::ConnEvent| {
            let mut said = said.lock().unwrap_or_else(|p| p.into_inner());
            if !ev.allowed && said.len() < 64 && said.insert((ev.host.clone(), ev.port)) {
                eprintln!(
                    "agentfense: egress refused {} {}:{}: {}",
                    ev.protocol, ev.host, ev.port, ev.detail
                );
            }
        });
    proxy
        .serve_sandbox(netns)
        .context("cannot start the egress proxy in the sandbox")
}

async fn termination_signal() -> i32 {
    use tokio::signal::unix::{SignalKind, signal};
    let watch = |kind: SignalKind| async move {
        match signal(kind) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = watch(SignalKind::interrupt()) => SIGINT,
        () = watch(SignalKind::terminate()) => SIGTERM,
        () = watch(SignalKind::hangup()) => SIGHUP,
    }
}

#[cfg(test)]
mod tests {
    use super::git_identity_vars;

    #[test]
    fn git_identity_takes_the_last_value_of_each_key_and_nothing_else() {
        let out = b"user.name\nOld Name\0user.email\na@example.org\0user.name\nAda Lovelace\0\
user.signingkey\nABC\0";
        assert_eq!(
            git_identity_vars(out),
            vec![
                ("GIT_AUTHOR_NAME", "Ada Lovelace".to_owned()),
                ("GIT_COMMITTER_NAME", "Ada Lovelace".to_owned()),
                ("GIT_AUTHOR_EMAIL", "a@example.org".to_owned()),
                ("GIT_COMMITTER_EMAIL", "a@example.org".to_owned()),
            ]
        );
    }

    #[test]
    fn git_identity_refuses_control_characters_and_empty_values() {
        assert!(git_identity_vars(b"user.name\nbad\x1b[31m\0user.email\n \0").is_empty());
        assert!(git_identity_vars(b"").is_empty());
        assert!(git_identity_vars(b"garbage without newline\0").is_empty());
    }
}
