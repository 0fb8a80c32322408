//! [`DockerRuntime`]: lifecycle (create/start/stop/destroy), orphan cleanup, and the
//! [`Runtime`] trait wiring.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use agentfense_runtime::cgroup::LimitCounters;
use agentfense_runtime::{
    BoxFuture, ExecRequest, ExecResult, ExecStream, LimitKind, NetworkMode, ResourceLimits, Result,
    Runtime, RuntimeError, RuntimeEvent, SandboxSpec, SessionSpec,
};
use bollard::Docker;
use bollard::models::ImageInspect;
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, ListContainersOptionsBuilder,
    RemoveContainerOptionsBuilder,
};
use futures_util::StreamExt;
use tokio::sync::{Mutex, mpsc};

use crate::config::DockerConfig;
use crate::error::invalid;
use crate::error::{DockerError, into_runtime, is_conflict, is_not_found};
use crate::limits::CounterFiles;
use session::Session;

mod exec;
mod session;
use crate::spec::{self, ContainerPlan, SandboxUser};

/// Label on every container this runtime creates.
pub const LABEL_MANAGED: &str = "agentfense.managed";
/// Label carrying the sandbox id.
pub const LABEL_SANDBOX_ID: &str = "agentfense.sandbox-id";
/// Label carrying [`DockerConfig::instance`].
pub const LABEL_INSTANCE: &str = "agentfense.instance";

/// The Docker runtime: one container per started sandbox.
#[derive(Debug)]
pub struct DockerRuntime {
    pub(crate) docker: Docker,
    pub(crate) cfg: DockerConfig,
    events: mpsc::Sender<RuntimeEvent>,
    sandboxes: StdMutex<HashMap<String, Arc<Mutex<Entry>>>>,
}

#[derive(Debug)]
struct Entry {
    spec: SandboxSpec,
    image: String,
    running: Option<Arc<Container>>,
}

/// A running sandbox container.
#[derive(Debug)]
pub(crate) struct Container {
    pub(crate) sandbox_id: String,
    /// Docker's container id (also what its processes' cgroup paths contain).
    pub(crate) id: String,
    pub(crate) docker: Docker,
    /// The base environment every command starts from.
    pub(crate) env: BTreeMap<String, String>,
    /// The user commands run as.
    pub(crate) user: SandboxUser,
    counter_files: CounterFiles,
    counters: StdMutex<LimitCounters>,
    pub(crate) sessions: StdMutex<HashMap<String, Arc<Session>>>,
    pub(crate) closed: AtomicBool,
    events: mpsc::Sender<RuntimeEvent>,
    /// The container's `/tmp` (a tmpfs), seen through its first process, when the daemon is
    /// local (see [`Runtime::scratch`]).
    scratch: Option<Arc<std::os::fd::OwnedFd>>,
    /// The container's network namespace when it has no network (only loopback) and the
    /// daemon is local: where the egress proxy listens (see [`Runtime::network_namespace`]).
    netns: Option<Arc<std::os::fd::OwnedFd>>,
}

/// The network namespace of process `pid` if it is in container `id`.
fn container_netns(pid: u32, id: &str) -> Option<std::os::fd::OwnedFd> {
    use rustix::fs::{Mode, OFlags};
    let dir = rustix::fs::open(
        format!("/proc/{pid}"),
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    let cgroup = rustix::fs::openat(
        &dir,
        "cgroup",
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    let text = std::io::read_to_string(std::fs::File::from(cgroup)).ok()?;
    if !crate::kill::cgroup_in_container(&text, id) {
        return None;
    }
    rustix::fs::openat(
        &dir,
        "ns/net",
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()
}

impl Container {
    /// Compares the cgroup counters with the last seen values; reports and returns increases.
    pub(crate) fn check_limits(&self, command: &str, session_id: Option<&str>) -> Vec<LimitKind> {
        agentfense_runtime::cgroup::report_limit_hits(
            &self.counters,
            self.counter_files.read(),
            &self.events,
            &self.sandbox_id,
            command,
            session_id,
        )
    }
}

impl DockerRuntime {
    /// Connects to the daemon (negotiating the API version, then a ping); fails with
    /// [`DockerError::Connect`] / [`DockerError::Unreachable`] (startup errors for the server).
    /// `events` receives [`RuntimeEvent`]s (never blocks: dropped with a warning when full).
    pub async fn connect(
        cfg: DockerConfig,
        events: mpsc::Sender<RuntimeEvent>,
    ) -> std::result::Result<Self, DockerError> {
        let host = cfg.host_or_default().to_owned();
        let docker = Docker::connect_with_host(&host)
            .map_err(|source| DockerError::Connect {
                host: host.clone(),
                source,
            })?
            .with_timeout(cfg.api_timeout);
        let docker =
            docker
                .negotiate_version()
                .await
                .map_err(|source| DockerError::Unreachable {
                    host: host.clone(),
                    source,
                })?;
        docker
            .ping()
            .await
            .map_err(|source| DockerError::Unreachable { host, source })?;
        Ok(DockerRuntime {
            docker,
            cfg,
            events,
            sandboxes: StdMutex::new(HashMap::new()),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &DockerConfig {
        &self.cfg
    }

    /// The Docker client (for diagnostics and benchmarks).
    pub fn client(&self) -> &Docker {
        &self.docker
    }

    /// The container id of a running sandbox.
    pub async fn container_id(&self, sandbox_id: &str) -> Result<String> {
        Ok(self.running(sandbox_id).await?.id.clone())
    }

    /// The user (docker `User` value) a running sandbox's commands run as.
    pub async fn sandbox_user(&self, sandbox_id: &str) -> Result<String> {
        Ok(self.running(sandbox_id).await?.user.spec.clone())
    }

    /// Like [`Runtime::create`], with the sandbox's image (`None` = the configured default).
    /// Checks that the image exists (pulling it when configured), so a missing image fails
    /// here with FAILED_PRECONDITION naming it.
    pub async fn create_with_image(
        &self,
        sandbox_id: &str,
        spec: SandboxSpec,
        image: Option<&str>,
    ) -> Result<()> {
        validate_id(sandbox_id)?;
        if let Some(p) = &spec.workspace_path {
            return Err(RuntimeError::InvalidArgument {
                message: format!(
                    "workspace path {p:?}: the docker runtime serves the workspace at /workspace only"
                ),
            });
        }
        let meta =
            std::fs::metadata(&spec.workspace).map_err(|source| RuntimeError::Workspace {
                path: spec.workspace.clone(),
                source,
            })?;
        if !meta.is_dir() {
            return Err(RuntimeError::Workspace {
                path: spec.workspace.clone(),
                source: std::io::Error::from(std::io::ErrorKind::NotADirectory),
            });
        }
        if spec.network == NetworkMode::Host && !self.cfg.enable_networking {
            return Err(invalid(
                "networking is disabled for sandboxes on this server",
            ));
        }
        validate_limits(&spec.limits)?;
        let image = image
            .map(str::trim)
            .filter(|i| !i.is_empty())
            .unwrap_or(&self.cfg.default_image)
            .to_owned();
        validate_image(&image)?;
        if self.entry(sandbox_id).is_ok() {
            return Err(RuntimeError::SandboxExists {
                sandbox_id: sandbox_id.to_owned(),
            });
        }
        // No lock held here: a pull only delays this sandbox.
        self.ensure_image(sandbox_id, &image)
            .await
            .map_err(|e| into_runtime(sandbox_id, e))?;
        let mut map = self
            .sandboxes
            .lock()
            .map_err(|_| invalid("runtime state poisoned"))?;
        if map.contains_key(sandbox_id) {
            return Err(RuntimeError::SandboxExists {
                sandbox_id: sandbox_id.to_owned(),
            });
        }
        map.insert(
            sandbox_id.to_owned(),
            Arc::new(Mutex::new(Entry {
                spec,
                image,
                running: None,
            })),
        );
        Ok(())
    }

    /// Removes every container labelled as ours (managed, same [`DockerConfig::instance`]) whose
    /// sandbox id is not in `keep` and that this runtime is not running (call it at server start with the sandboxes the server still
    /// knows). Returns the sandbox ids whose containers were removed.
    pub async fn cleanup_orphans(
        &self,
        keep: &[String],
    ) -> std::result::Result<Vec<String>, DockerError> {
        let filters = HashMap::from([(
            "label",
            vec![
                format!("{LABEL_MANAGED}=true"),
                format!("{LABEL_INSTANCE}={}", self.cfg.instance),
            ],
        )]);
        let list = self
            .docker
            .list_containers(Some(
                ListContainersOptionsBuilder::new()
                    .all(true)
                    .filters(&filters)
                    .build(),
            ))
            .await
            .map_err(DockerError::api("list containers", "*"))?;
        let ours: Vec<String> = self
            .sandboxes
            .lock()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        let mut removed = Vec::new();
        for c in list {
            let sid = c
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_SANDBOX_ID))
                .cloned()
                .unwrap_or_default();
            if keep.contains(&sid) || ours.contains(&sid) {
                continue;
            }
            let Some(id) = c.id else { continue };
            match self.remove_container(&id).await {
                Ok(()) => {
                    tracing::info!(sandbox_id = %sid, container = %id, "removed orphaned sandbox container");
                    removed.push(sid);
                }
                Err(e) => {
                    tracing::warn!(sandbox_id = %sid, container = %id, error = %e, "removing orphaned container failed")
                }
            }
        }
        Ok(removed)
    }

    fn entry(&self, sandbox_id: &str) -> Result<Arc<Mutex<Entry>>> {
        self.sandboxes
            .lock()
            .ok()
            .and_then(|m| m.get(sandbox_id).cloned())
            .ok_or_else(|| RuntimeError::SandboxNotFound {
                sandbox_id: sandbox_id.to_owned(),
            })
    }

    pub(crate) async fn running(&self, sandbox_id: &str) -> Result<Arc<Container>> {
        let entry = self.entry(sandbox_id)?;
        let e = entry.lock().await;
        match &e.running {
            Some(c) if !c.closed.load(Ordering::SeqCst) => Ok(c.clone()),
            _ => Err(RuntimeError::NotRunning {
                sandbox_id: sandbox_id.to_owned(),
            }),
        }
    }

    pub(crate) fn timeout(&self, t: Option<Duration>) -> Duration {
        t.filter(|d| !d.is_zero())
            .unwrap_or(self.cfg.default_timeout)
            .min(self.cfg.max_timeout)
    }

    fn container_name(&self, sandbox_id: &str) -> String {
        format!("{}{sandbox_id}", self.cfg.name_prefix)
    }

    /// Inspects the image; pulls it when missing and configured to (with a timeout).
    async fn ensure_image(
        &self,
        sandbox_id: &str,
        image: &str,
    ) -> std::result::Result<ImageInspect, DockerError> {
        match self.docker.inspect_image(image).await {
            Ok(i) => return Ok(i),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(DockerError::api("inspect image", sandbox_id)(e)),
        }
        if !self.cfg.pull_missing {
            return Err(DockerError::ImageMissing {
                image: image.to_owned(),
                pull: None,
            });
        }
        tracing::info!(sandbox_id, image, "pulling missing image");
        let opts = CreateImageOptionsBuilder::new().from_image(image).build();
        let pull = async {
            let mut s = self.docker.create_image(Some(opts), None, None);
            while let Some(item) = s.next().await {
                item.map_err(|e| e.to_string())?;
            }
            Ok::<(), String>(())
        };
        let failed = match tokio::time::timeout(self.cfg.pull_timeout, pull).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some(format!("timed out after {:?}", self.cfg.pull_timeout)),
        };
        match self.docker.inspect_image(image).await {
            Ok(i) => Ok(i),
            Err(_) => Err(DockerError::ImageMissing {
                image: image.to_owned(),
                pull: failed.or(Some("image still missing".into())),
            }),
        }
    }

    async fn remove_container(&self, name_or_id: &str) -> std::result::Result<(), DockerError> {
        let opts = RemoveContainerOptionsBuilder::new()
            .force(true)
            .v(true)
            .build();
        match self.docker.remove_container(name_or_id, Some(opts)).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(DockerError::api("remove container", name_or_id)(e)),
        }
    }

    /// Removes a leftover container with our name, but only if it carries our labels.
    async fn remove_stale(
        &self,
        sandbox_id: &str,
        name: &str,
    ) -> std::result::Result<(), DockerError> {
        let ours = match self.docker.inspect_container(name, None).await {
            Ok(c) => c
                .config
                .and_then(|c| c.labels)
                .is_some_and(|l| l.get(LABEL_MANAGED).is_some_and(|v| v == "true")),
            Err(e) if is_not_found(&e) => return Ok(()),
            Err(e) => return Err(DockerError::api("inspect container", sandbox_id)(e)),
        };
        if !ours {
            return Err(DockerError::Protocol {
                step: "create container",
                sandbox_id: sandbox_id.to_owned(),
                message: format!(
                    "a container named {name} exists and is not managed by agentfense"
                ),
            });
        }
        tracing::info!(sandbox_id, name, "removing leftover sandbox container");
        self.remove_container(name).await
    }

    async fn do_start(&self, sandbox_id: &str) -> Result<()> {
        let entry = self.entry(sandbox_id)?;
        let mut e = entry.lock().await;
        if let Some(c) = &e.running {
            if !c.closed.load(Ordering::SeqCst) && self.container_running(&c.id).await {
                return Err(RuntimeError::AlreadyRunning {
                    sandbox_id: sandbox_id.to_owned(),
                });
            }
            // Stopped behind our back (or its init died): clean up, then start afresh.
            if let Some(c) = e.running.take() {
                self.shutdown(c).await;
            }
        }
        let started = Instant::now();
        let c = self
            .launch(sandbox_id, &e.spec, &e.image)
            .await
            .map_err(|err| into_runtime(sandbox_id, err))?;
        tracing::info!(sandbox_id, container = %c.id, elapsed = ?started.elapsed(), "sandbox container started");
        e.running = Some(Arc::new(c));
        Ok(())
    }

    async fn launch(
        &self,
        sandbox_id: &str,
        spec: &SandboxSpec,
        image: &str,
    ) -> std::result::Result<Container, DockerError> {
        let info = self.ensure_image(sandbox_id, image).await?;
        let image_cfg = info.config.unwrap_or_default();
        let user = spec::resolve_user(self.cfg.user.as_deref(), image_cfg.user.as_deref());
        let env = spec::base_env(image_cfg.env.as_deref().unwrap_or_default(), &user);
        let workspace =
            std::fs::canonicalize(&spec.workspace).unwrap_or_else(|_| spec.workspace.clone());
        let propagates = std::fs::read_to_string("/proc/self/mountinfo")
            .is_ok_and(|mi| spec::mount_propagates(&mi, &workspace));
        let spec = SandboxSpec {
            image: None,
            workspace,
            ..spec.clone()
        };
        let body = spec::container_body(&ContainerPlan {
            cfg: &self.cfg,
            sandbox_id,
            spec: &spec,
            image,
            user: &user,
            env: &env,
            propagates,
        });
        let name = self.container_name(sandbox_id);
        let opts = CreateContainerOptionsBuilder::new().name(&name).build();
        let created = match self
            .docker
            .create_container(Some(opts.clone()), body.clone())
            .await
        {
            Ok(c) => c,
            Err(err) if is_conflict(&err) => {
                // Left over by a crashed server (Stop removes its container, so not by us).
                self.remove_stale(sandbox_id, &name).await?;
                self.docker
                    .create_container(Some(opts), body)
                    .await
                    .map_err(|e| map_create_error(sandbox_id, image, e))?
            }
            Err(err) => return Err(map_create_error(sandbox_id, image, err)),
        };
        let id = created.id;
        let r = self.start_and_inspect(sandbox_id, &id).await;
        let pid = match r {
            Ok(pid) => pid,
            Err(err) => {
                let _ = self.remove_container(&id).await;
                return Err(err);
            }
        };
        let counter_files = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .map(|c| CounterFiles::locate(Path::new("/sys/fs/cgroup"), &c))
            .unwrap_or_default();
        if counter_files == CounterFiles::default() {
            tracing::warn!(
                sandbox_id,
                "container cgroup counters not found: limit events will not be reported"
            );
        }
        let counters = counter_files.read();
        let scratch = rustix::fs::open(
            format!("/proc/{pid}/root/tmp"),
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .ok()
        .map(Arc::new);
        // Opened through the container's first process, checked to be this container's (a
        // pid is only a number: the daemon may be remote, or the process gone and the number
        // reused). Both reads go through one handle on that process's /proc directory, which
        // stays that process's whatever happens to the number.
        let netns = (spec::network_mode(&self.cfg, spec.network) == "none")
            .then(|| container_netns(pid, &id))
            .flatten()
            .map(Arc::new);
        Ok(Container {
            sandbox_id: sandbox_id.to_owned(),
            id,
            docker: self.docker.clone(),
            env,
            user,
            counter_files,
            counters: StdMutex::new(counters),
            sessions: StdMutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            events: self.events.clone(),
            scratch,
            netns,
        })
    }

    async fn start_and_inspect(
        &self,
        sandbox_id: &str,
        id: &str,
    ) -> std::result::Result<u32, DockerError> {
        self.docker
            .start_container(id, None)
            .await
            .map_err(DockerError::api("start container", sandbox_id))?;
        let info = self
            .docker
            .inspect_container(id, None)
            .await
            .map_err(DockerError::api("inspect container", sandbox_id))?;
        let state = info.state.unwrap_or_default();
        match state.pid {
            Some(pid) if pid > 0 && state.running == Some(true) => Ok(pid as u32),
            _ => Err(DockerError::Protocol {
                step: "start container",
                sandbox_id: sandbox_id.to_owned(),
                message: format!(
                    "container is not running after start (exit code {:?}, error {:?})",
                    state.exit_code, state.error
                ),
            }),
        }
    }

    /// Whether the daemon reports the container running (errors count as running, so a
    /// flaky daemon never makes us replace a live container).
    async fn container_running(&self, id: &str) -> bool {
        match self.docker.inspect_container(id, None).await {
            Ok(c) => c.state.and_then(|s| s.running).unwrap_or(false),
            Err(e) => !is_not_found(&e),
        }
    }

    /// Kills everything of a running container and removes it.
    async fn shutdown(&self, c: Arc<Container>) {
        c.closed.store(true, Ordering::SeqCst);
        let sessions: Vec<Arc<Session>> = c
            .sessions
            .lock()
            .map(|mut m| m.drain().map(|(_, s)| s).collect())
            .unwrap_or_default();
        for s in sessions {
            s.close(&c).await;
        }
        if let Err(e) = self.remove_container(&c.id).await {
            tracing::warn!(sandbox_id = %c.sandbox_id, error = %e, "removing sandbox container failed");
        }
    }

    async fn do_stop(&self, sandbox_id: &str) -> Result<()> {
        let entry = self.entry(sandbox_id)?;
        let mut e = entry.lock().await;
        match e.running.take() {
            Some(c) => {
                self.shutdown(c).await;
                Ok(())
            }
            None => Err(RuntimeError::NotRunning {
                sandbox_id: sandbox_id.to_owned(),
            }),
        }
    }

    async fn do_destroy(&self, sandbox_id: &str) -> Result<()> {
        let entry = self.entry(sandbox_id)?;
        {
            let mut e = entry.lock().await;
            if let Some(c) = e.running.take() {
                self.shutdown(c).await;
            }
        }
        if let Ok(mut m) = self.sandboxes.lock() {
            m.remove(sandbox_id);
        }
        Ok(())
    }
}

fn map_create_error(sandbox_id: &str, image: &str, e: bollard::errors::Error) -> DockerError {
    if is_not_found(&e) {
        DockerError::ImageMissing {
            image: image.to_owned(),
            pull: None,
        }
    } else {
        DockerError::api("create container", sandbox_id)(e)
    }
}

fn validate_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && !id.starts_with('-')
        && !id.starts_with('_');
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "sandbox id {id:?} must be 1-128 characters of [A-Za-z0-9_-]"
        )))
    }
}

/// An image reference: `[registry[:port]/]name[:tag][@digest]` characters only (it becomes part
/// of API URLs).
fn validate_image(image: &str) -> Result<()> {
    let ok = !image.is_empty()
        && image.len() <= 512
        && !image.starts_with(['-', '/', '.', ':', '@'])
        && !image.contains("..")
        && image
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-/:@".contains(c));
    if ok {
        Ok(())
    } else {
        Err(invalid(format!("invalid image reference {image:?}")))
    }
}

/// Limits below what a container with a shell can live with are refused up front (same bounds
/// as the bwrap runtime; docker itself needs at least 6 MiB).
fn validate_limits(l: &ResourceLimits) -> Result<()> {
    let too_small = |what: &str, min: u64, v: Option<u64>| match v {
        Some(v) if v > 0 && v < min => Err(invalid(format!(
            "{what} must be at least {min} (or 0 for no limit), got {v}"
        ))),
        _ => Ok(()),
    };
    too_small("memory_bytes", 16 << 20, l.memory_bytes)?;
    too_small("pids_limit", 8, l.pids_limit)?;
    too_small("cpu_quota_us", 1_000, l.cpu_quota_us)?;
    too_small("cpu_shares", 2, l.cpu_shares)?;
    Ok(())
}

impl Runtime for DockerRuntime {
    fn scratch(&self, sandbox_id: &str) -> Option<std::os::fd::OwnedFd> {
        let entry = self.sandboxes.lock().ok()?.get(sandbox_id)?.clone();
        let e = entry.try_lock().ok()?;
        let fd = e.running.as_ref()?.scratch.clone()?;
        fd.try_clone().ok()
    }

    fn network_namespace(&self, sandbox_id: &str) -> Option<std::os::fd::OwnedFd> {
        let entry = self.sandboxes.lock().ok()?.get(sandbox_id)?.clone();
        let e = entry.try_lock().ok()?;
        let fd = e.running.as_ref()?.netns.clone()?;
        fd.try_clone().ok()
    }

    fn cleanup_stale(&self) -> BoxFuture<'_, Result<usize>> {
        Box::pin(async move {
            // At startup nothing of ours is running yet: every container we own is a leftover.
            self.cleanup_orphans(&[])
                .await
                .map(|v| v.len())
                .map_err(|e| RuntimeError::Io {
                    op: "removing leftover containers",
                    source: std::io::Error::other(e.to_string()),
                })
        })
    }
    fn create<'a>(&'a self, sandbox_id: &'a str, spec: SandboxSpec) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let image = spec.image.clone();
            self.create_with_image(sandbox_id, spec, image.as_deref())
                .await
        })
    }
    fn start<'a>(&'a self, sandbox_id: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.do_start(sandbox_id))
    }
    fn exec<'a>(
        &'a self,
        sandbox_id: &'a str,
        req: ExecRequest,
    ) -> BoxFuture<'a, Result<ExecResult>> {
        Box::pin(self.do_exec(sandbox_id, req))
    }
    fn exec_stream<'a>(
        &'a self,
        sandbox_id: &'a str,
        req: ExecRequest,
    ) -> BoxFuture<'a, Result<ExecStream>> {
        Box::pin(self.do_exec_stream(sandbox_id, req))
    }
    fn session_create<'a>(
        &'a self,
        sandbox_id: &'a str,
        spec: SessionSpec,
    ) -> BoxFuture<'a, Result<String>> {
        Box::pin(self.do_session_create(sandbox_id, spec))
    }
    fn session_exec<'a>(
        &'a self,
        sandbox_id: &'a str,
        session_id: &'a str,
        command: &'a str,
        timeout: Option<Duration>,
    ) -> BoxFuture<'a, Result<ExecResult>> {
        Box::pin(self.do_session_exec(sandbox_id, session_id, command, timeout))
    }
    fn session_exec_stream<'a>(
        &'a self,
        sandbox_id: &'a str,
        session_id: &'a str,
        command: &'a str,
        timeout: Option<Duration>,
    ) -> BoxFuture<'a, Result<ExecStream>> {
        Box::pin(self.do_session_exec_stream(sandbox_id, session_id, command, timeout))
    }
    fn session_destroy<'a>(
        &'a self,
        sandbox_id: &'a str,
        session_id: &'a str,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.do_session_destroy(sandbox_id, session_id))
    }
    fn stop<'a>(&'a self, sandbox_id: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.do_stop(sandbox_id))
    }
    fn destroy<'a>(&'a self, sandbox_id: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.do_destroy(sandbox_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_limits_are_validated() {
        assert!(validate_id("sb_1-a").is_ok());
        for bad in ["", "../x", "a/b", "-x", "_x", "a b"] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
        for good in [
            "python:3.11-slim",
            "ghcr.io/a/b:1@sha256:00ff",
            "localhost:5000/x",
        ] {
            assert!(validate_image(good).is_ok(), "{good:?}");
        }
        for bad in ["", "a b", "x?y", "../x", "x#y", "-x"] {
            assert!(validate_image(bad).is_err(), "{bad:?}");
        }
        assert!(validate_limits(&ResourceLimits::default()).is_ok());
        assert!(
            validate_limits(&ResourceLimits {
                pids_limit: Some(2),
                ..Default::default()
            })
            .is_err()
        );
    }
}
