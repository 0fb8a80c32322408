//! Conformance suite of the [`Runtime`] trait (feature `conformance`): the behaviour every
//! backend must have, written once against the trait and run by each backend's integration
//! tests on its own runtime.
//!
//! A backend's tests provide a [`Target`] (how to start a sandbox, plus the few facts in which
//! backends genuinely differ) and a probe that decides whether the tests can run on this
//! machine, then instantiate every case with [`conformance_tests!`](crate::conformance_tests):
//!
//! ```text
//! agentfense_runtime::conformance_tests!(crate::suite::common::prepare, crate::suite::common::target());
//! ```
//!
//! `prepare(test: &str)` is awaited first: `None` skips the test (the probe prints
//! `SKIPPED <test>: <reason>`, and panics instead under `CI`); `Some(guard)` is held for the
//! test's duration.

// Test code: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod exec;
pub mod isolation;
pub mod limits;
pub mod sessions;

use std::any::Any;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::runtime::{BoxFuture, Runtime};
use crate::types::{
    ExecRequest, ExecResult, NetworkMode, ResourceLimits, RuntimeEvent, SandboxSpec,
};

/// What a case asks of the sandbox it starts.
#[derive(Debug, Clone)]
pub struct Options {
    /// Resource limits of the sandbox.
    pub limits: ResourceLimits,
    /// Network mode; [`NetworkMode::Host`] must be allowed by the target's configuration.
    pub network: NetworkMode,
    /// Cap of captured stdout and of stderr (each).
    pub output_cap: usize,
}

impl Options {
    /// Default options with `limits`.
    pub fn limited(limits: ResourceLimits) -> Self {
        Options {
            limits,
            ..Options::default()
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            limits: ResourceLimits::default(),
            network: NetworkMode::None,
            output_cap: 1 << 20,
        }
    }
}

/// A started sandbox over a temporary workspace (which the sandbox user, uid 1000, may write).
/// Whatever must live as long as the sandbox (temporary directories) is kept in it.
pub struct Sandbox<R: ?Sized = dyn Runtime> {
    /// The runtime the sandbox runs in (one runtime per sandbox in the tests).
    pub rt: Arc<R>,
    /// The sandbox's id.
    pub id: String,
    /// The host directory bound at `/workspace`.
    pub workspace: PathBuf,
    /// The runtime's event channel.
    pub events: mpsc::Receiver<RuntimeEvent>,
    keep: Box<dyn Any + Send + Sync>,
}

impl<R: Runtime + ?Sized> Sandbox<R> {
    /// Wraps a started sandbox; `keep` is dropped with it.
    pub fn new(
        rt: Arc<R>,
        id: String,
        workspace: PathBuf,
        events: mpsc::Receiver<RuntimeEvent>,
        keep: impl Any + Send + Sync,
    ) -> Self {
        Sandbox {
            rt,
            id,
            workspace,
            events,
            keep: Box::new(keep),
        }
    }

    /// Runs `cmd` with [`req`]'s defaults; an error fails the test.
    pub async fn sh(&self, cmd: &str) -> ExecResult {
        self.rt
            .exec(&self.id, req(cmd))
            .await
            .unwrap_or_else(|e| panic!("exec {cmd:?} failed: {e:?}"))
    }

    /// The next runtime event, within 5 s.
    pub async fn next_event(&mut self) -> RuntimeEvent {
        tokio::time::timeout(Duration::from_secs(5), self.events.recv())
            .await
            .expect("no runtime event within 5 s")
            .expect("event channel closed")
    }

    /// Destroys the sandbox (which must succeed).
    pub async fn destroy(self) {
        self.rt.destroy(&self.id).await.unwrap();
    }
}

impl<R: Runtime + ?Sized> Sandbox<R> {
    /// Creates a sandbox over `workspace` with a fresh id (`t<pid>-<n>`) on `rt`, whose event
    /// channel is `events`, gives `workspace` to the sandbox user (its host uid, which the
    /// runtime picks: per sandbox with a user namespace, else 1000), and starts it. `keep`
    /// (e.g. the temporary workspace) lives as long as the sandbox.
    pub async fn create_and_start(
        rt: Arc<R>,
        events: mpsc::Receiver<RuntimeEvent>,
        workspace: PathBuf,
        limits: ResourceLimits,
        network: NetworkMode,
        keep: impl Any + Send + Sync,
    ) -> Self {
        let id = format!("t{}", unique_suffix());
        let spec = SandboxSpec {
            image: None,
            workspace: workspace.clone(),
            limits,
            network,
            tmp_size: None,
            workspace_path: None,
            home: None,
        };
        rt.create(&id, spec).await.unwrap();
        let (uid, gid) = rt.sandbox_owner(&id).unwrap_or((1000, 1000));
        std::os::unix::fs::chown(&workspace, Some(uid), Some(gid)).unwrap();
        rt.start(&id).await.unwrap();
        Sandbox::new(rt, id, workspace, events, keep)
    }
}

impl<R: Runtime + 'static> Sandbox<R> {
    /// The same sandbox behind `dyn Runtime`.
    pub fn into_dyn(self) -> Sandbox {
        Sandbox {
            rt: self.rt,
            id: self.id,
            workspace: self.workspace,
            events: self.events,
            keep: self.keep,
        }
    }
}

/// A backend under test.
pub struct Target {
    /// Creates and starts a sandbox.
    pub start: fn(Options) -> BoxFuture<'static, Sandbox>,
    /// `sleep` processes the environment itself runs (docker: the container's
    /// `sleep infinity`), seen by `ps` beside the commands' own.
    pub idle_sleeps: usize,
    /// Processes `ps -e` shows at most while one `sh -c '… ps -e | wc -l'` runs in an idle
    /// sandbox (the environment's own, plus sh, ps and wc).
    pub processes_at_rest: usize,
    /// How long a killed process may linger as a zombie before the sandbox's init reaps it
    /// (waited before counting processes after a kill).
    pub reap_grace: Duration,
    /// Whether `touch` on the read-only root reports `Read-only file system` (else only its
    /// failure is checked).
    pub read_only_root_is_erofs: bool,
    /// The capability bounding set of commands (`CapBnd` in `/proc/self/status`; their
    /// permitted, effective and ambient sets are always empty).
    pub command_bounding_set: u64,
    /// Variables the backend sets in commands' environment beyond the clean default
    /// (`PATH`, `HOME`, `LANG`, `TERM`, `USER`) and what `sh` adds (`PWD`).
    pub extra_env: &'static [&'static str],
}

impl Target {
    /// Starts a sandbox with default options.
    pub async fn start(&self) -> Sandbox {
        (self.start)(Options::default()).await
    }

    /// Starts a sandbox with `opts`.
    pub async fn start_with(&self, opts: Options) -> Sandbox {
        (self.start)(opts).await
    }

    /// `sleep <reap_grace>; ` (or nothing), to prefix a process count with.
    pub fn settle(&self) -> String {
        self.settle_times(1)
    }

    /// [`Self::settle`] with `n` times the reap grace.
    pub fn settle_times(&self, n: u32) -> String {
        if self.reap_grace.is_zero() {
            String::new()
        } else {
            format!("sleep {}; ", (self.reap_grace * n).as_secs_f64())
        }
    }
}

/// An exec request for `cmd` with no stdin, no extra environment, `/workspace` and a 20 s
/// deadline.
pub fn req(cmd: &str) -> ExecRequest {
    ExecRequest {
        command: cmd.to_owned(),
        stdin: Vec::new(),
        env: BTreeMap::new(),
        workdir: String::new(),
        timeout: Some(Duration::from_secs(20)),
    }
}

/// How a probe must be refused: failing for any reason would also pass a probe that breaks
/// for the wrong one (a missing tool, a typo).
#[derive(Debug, Clone, Copy)]
pub enum Refused {
    /// Non-zero exit with one of these in stderr (the errno's text, as the tool prints it).
    Saying(&'static [&'static str]),
    /// Exit status 1 and no error output: the probe tests a system call itself and exits 1
    /// exactly when the call was refused the way it expects.
    Exit1,
}

/// The error texts of EPERM and EACCES.
pub const DENIED: Refused = Refused::Saying(&["Operation not permitted", "Permission denied"]);

/// Runs each probe in `fx`; every one must be refused as it says.
pub async fn assert_all_refused<R: Runtime + ?Sized>(fx: &Sandbox<R>, probes: &[(&str, Refused)]) {
    for (cmd, how) in probes {
        let r = fx.sh(cmd).await;
        assert_ne!(r.exit_code, 0, "{cmd} succeeded: {r:?}");
        match how {
            Refused::Saying(texts) => assert!(
                texts.iter().any(|t| r.stderr.contains(t)),
                "{cmd} failed, but not saying any of {texts:?}: {r:?}"
            ),
            Refused::Exit1 => assert_eq!(
                (r.exit_code, r.stderr.as_str()),
                (1, ""),
                "{cmd} did not fail the expected way: {r:?}"
            ),
        }
    }
}

/// Processes on the host whose command line is exactly `cmdline` (space separated).
pub fn count_host_processes(cmdline: &str) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(c) = std::fs::read(e.path().join("cmdline")) {
            let c: Vec<String> = c
                .split(|b| *b == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect();
            if c.join(" ") == cmdline {
                n += 1;
            }
        }
    }
    n
}

/// A fresh suffix for sandbox ids: `<pid>-<counter>`.
pub fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// Awaits `f`, failing the test if it is still pending after 50 s: long before `what` (a
/// background job, a long command) could end on its own. A guard that the call does not
/// *wait* for `what`, not a measure of how fast it is.
pub async fn without_waiting_for<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(std::time::Duration::from_secs(50), f)
        .await
        .unwrap_or_else(|_| panic!("still waiting for {what} after 50 s"))
}

/// Polls `probe` until it holds (at most 10 s): for a state another process reaches
/// asynchronously (a command started, a process reaped).
pub async fn eventually(what: &str, mut probe: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !probe() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// The workspace's one skip rule (see `agentfense_testsupport`): `true` means skip.
pub use agentfense_testsupport::{require, skip_unless_ci};

/// Generates one `#[tokio::test]` per conformance case, in modules named after the case
/// groups (`conformance::exec::echo_round_trip`, …).
///
/// `$prepare` is an async fn `(test: &str) -> Option<G>` (`None`: skip; `Some`: held for the
/// test), `$target` an expression of type [`Target`]; both as paths valid anywhere in the
/// calling crate (e.g. `crate::suite::common::prepare`).
#[macro_export]
macro_rules! conformance_tests {
    ($prepare:path, $target:expr) => {
        $crate::conformance_tests!(@group $prepare, $target, exec: [
            echo_round_trip,
            stdin_env_and_workdir,
            environment_is_clean,
            timeout_kills_the_whole_tree_promptly,
            background_job_does_not_hold_the_result,
            output_is_capped_with_a_marker_and_lossy_utf8,
            exec_stream_tags_chunks_and_ends_with_the_exit_code,
            dropping_the_stream_kills_the_command,
            concurrent_execs,
            stop_kills_everything_and_start_again_works,
        ]);
        $crate::conformance_tests!(@group $prepare, $target, isolation: [
            workspace_is_shared_with_the_host,
            root_filesystem_is_read_only,
            commands_run_unprivileged,
            commands_inherit_only_stdio,
            seccomp_is_an_allow_list,
            everyday_tools_work,
            no_network_by_default,
        ]);
        $crate::conformance_tests!(@group $prepare, $target, limits: [
            memory_limit_oom_kills_with_137_and_reports,
            fork_bomb_is_contained_by_the_pids_limit,
            cpu_quota_throttles,
        ]);
        $crate::conformance_tests!(@group $prepare, $target, sessions: [
            state_persists_between_calls,
            output_is_exact_whatever_the_command_prints,
            timeout_interrupts_only_the_command,
            exit_closes_the_session,
            concurrent_calls_are_serialised,
            destroy_kills_all_session_processes,
            session_limits_and_stop,
            bash_keeps_bangs_literal_and_big_commands_work,
            redirecting_the_shell_for_good_does_not_break_the_session,
            exit_with_background_jobs_returns_promptly_and_kills_them,
            session_with_a_missing_workdir_is_invalid,
            processes_of_a_session_cannot_reach_into_its_shell,
            session_output_streams_as_it_comes,
        ]);
    };
    (@group $prepare:path, $target:expr, $group:ident: [$($case:ident),* $(,)?]) => {
        mod $group {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let Some(_guard) = $prepare(stringify!($case)).await else {
                        return;
                    };
                    $crate::conformance::$group::$case(&$target).await;
                }
            )*
        }
    };
}
