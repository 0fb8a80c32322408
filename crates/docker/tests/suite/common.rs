//! Fixture: a started sandbox container over a temporary workspace; the docker target of the
//! conformance suite.

use std::sync::Arc;
use std::time::Duration;

use agentfense_docker::{DockerConfig, DockerRuntime};
use agentfense_runtime::NetworkMode;
use agentfense_runtime::conformance::{self, Options, Sandbox, Target};
use tokio::sync::{Mutex, MutexGuard, mpsc};

pub use agentfense_runtime::conformance::{req, unique_suffix as rand_suffix};

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
    let missing = missing_prerequisite().await;
    (!conformance::skip_unless_ci(test, missing)).then_some(g)
}

/// The docker runtime as a conformance target.
pub fn target() -> Target {
    Target {
        start: |o| {
            Box::pin(async move {
                let mut cfg = config();
                if o.network == NetworkMode::Host {
                    // Networking must be enabled server-wide; `host` reaches the host's loopback.
                    cfg.enable_networking = true;
                    cfg.network_mode = "host".into();
                }
                start_with(o, cfg).await.into_dyn()
            })
        },
        // The container's main process is `sleep infinity`.
        idle_sleeps: 1,
        // docker-init, `sleep infinity`, sh, ps, wc.
        processes_at_rest: 5,
        reap_grace: Duration::ZERO,
        read_only_root_is_erofs: true,
        command_bounding_set: 0,
        // Set by dockerd in every exec.
        extra_env: &["HOSTNAME"],
    }
}

pub type Fixture = Sandbox<DockerRuntime>;

pub async fn start() -> Fixture {
    start_with(Options::default(), config()).await
}

/// A started sandbox on a runtime with configuration `cfg` (its output cap from `opts`).
pub async fn start_with(opts: Options, mut cfg: DockerConfig) -> Fixture {
    let ws = tempfile::tempdir().unwrap();
    cfg.output_cap = opts.output_cap;
    let (tx, events) = mpsc::channel(64);
    let rt = Arc::new(DockerRuntime::connect(cfg, tx).await.unwrap());
    let workspace = ws.path().to_path_buf();
    Sandbox::create_and_start(rt, events, workspace, opts.limits, opts.network, ws).await
}

/// Whether a container with this name exists.
pub async fn container_exists(rt: &DockerRuntime, name: &str) -> bool {
    rt.client().inspect_container(name, None).await.is_ok()
}
