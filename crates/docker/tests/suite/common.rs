//! Fixture: a started sandbox container over a temporary workspace.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use agentfense_docker::{DockerConfig, DockerRuntime};
use agentfense_runtime::{
    ExecRequest, ExecResult, NetworkMode, ResourceLimits, Runtime, RuntimeEvent, SandboxSpec,
};
use tokio::sync::{Mutex, MutexGuard, mpsc};

pub const SOCKET: &str = "/var/run/docker.sock";

pub fn image() -> String {
    std::env::var("AGENTFENSE_DOCKER_IMAGE").unwrap_or_else(|_| "agentfense-test-base".into())
}

/// Docker tests run one at a time: they measure timeouts to the second on a 2-core machine.
static SERIAL: Mutex<()> = Mutex::const_new(());

pub fn config() -> DockerConfig {
    DockerConfig {
        host: Some(format!("unix://{SOCKET}")),
        default_image: image(),
        // Orphan cleanup in the tests never touches a real server's containers.
        instance: format!("test-{}", std::process::id()),
        ..Default::default()
    }
}

/// Why the tests cannot run here, if they cannot.
async fn missing_prerequisite() -> Option<String> {
    if !std::path::Path::new(SOCKET).exists() {
        return Some(format!(
            "no docker daemon socket at {SOCKET} (run scripts/docker-setup.sh)"
        ));
    }
    let (tx, _rx) = mpsc::channel(1);
    let rt = match DockerRuntime::connect(config(), tx).await {
        Ok(rt) => rt,
        Err(e) => return Some(format!("docker daemon not reachable: {e}")),
    };
    if let Err(e) = rt.client().inspect_image(&image()).await {
        return Some(format!(
            "image {} missing (run scripts/docker-setup.sh): {e}",
            image()
        ));
    }
    None
}

/// Probe: `None` means skip (after printing why); panics under CI. Holds the serialisation
/// lock for the test's duration.
pub async fn guard(test: &str) -> Option<MutexGuard<'static, ()>> {
    let g = SERIAL.lock().await;
    match missing_prerequisite().await {
        None => Some(g),
        Some(reason) => {
            if std::env::var_os("CI").is_some() {
                panic!("{test}: prerequisite missing under CI: {reason}");
            }
            eprintln!("SKIPPED {test}: {reason}");
            None
        }
    }
}

pub struct Fixture {
    pub rt: Arc<DockerRuntime>,
    pub id: String,
    pub ws: tempfile::TempDir,
    pub events: mpsc::Receiver<RuntimeEvent>,
}

pub struct Opts {
    pub limits: ResourceLimits,
    pub network: NetworkMode,
    pub cap: usize,
    pub cfg: DockerConfig,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            limits: ResourceLimits::default(),
            network: NetworkMode::None,
            cap: 1 << 20,
            cfg: config(),
        }
    }
}

impl Fixture {
    pub async fn start() -> Fixture {
        Self::with(Opts::default()).await
    }

    pub async fn with(opts: Opts) -> Fixture {
        let ws = tempfile::tempdir().unwrap();
        // The sandbox user (uid 1000) must be able to write its workspace.
        std::os::unix::fs::chown(ws.path(), Some(1000), Some(1000)).unwrap();
        let mut cfg = opts.cfg;
        cfg.output_cap = opts.cap;
        let (tx, events) = mpsc::channel(64);
        let rt = Arc::new(DockerRuntime::connect(cfg, tx).await.unwrap());
        let id = format!("t{}", rand_suffix());
        rt.create(
            &id,
            SandboxSpec {
                image: None,
                workspace: ws.path().to_path_buf(),
                limits: opts.limits,
                network: opts.network,
            },
        )
        .await
        .unwrap();
        rt.start(&id).await.unwrap();
        Fixture { rt, id, ws, events }
    }

    pub async fn sh(&self, cmd: &str) -> ExecResult {
        self.rt
            .exec(&self.id, req(cmd))
            .await
            .unwrap_or_else(|e| panic!("exec {cmd:?} failed: {e:?}"))
    }

    pub async fn destroy(self) {
        self.rt.destroy(&self.id).await.unwrap();
    }
}

pub fn req(cmd: &str) -> ExecRequest {
    ExecRequest {
        command: cmd.to_owned(),
        stdin: Vec::new(),
        env: BTreeMap::new(),
        workdir: String::new(),
        timeout: Some(Duration::from_secs(20)),
    }
}

pub fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// Whether a container with this name exists.
pub async fn container_exists(rt: &DockerRuntime, name: &str) -> bool {
    rt.client().inspect_container(name, None).await.is_ok()
}
