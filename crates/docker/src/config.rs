//! [`DockerConfig`]: plain values the server builds from `runtime.docker.*`.

use std::time::Duration;

/// Configuration of the Docker runtime.
#[derive(Debug, Clone)]
pub struct DockerConfig {
    /// Docker daemon address (`unix:///var/run/docker.sock`, `tcp://127.0.0.1:2375`). `None`
    /// means `unix:///var/run/docker.sock`. The daemon must run on the same host as the server:
    /// the workspace is a host path, and timeouts kill processes by their host pid.
    pub host: Option<String>,
    /// Image of sandboxes that ask for none.
    pub default_image: String,
    /// Docker network mode for sandboxes that ask for networking (`bridge`, `host`, a user
    /// network) when [`enable_networking`](Self::enable_networking) is true.
    pub network_mode: String,
    /// Server-wide switch: without it every sandbox gets network mode `none`, and a sandbox
    /// asking for networking is refused (INVALID_ARGUMENT), as in the bwrap runtime.
    pub enable_networking: bool,
    /// The user commands run as (`uid:gid` or a name known to the image). `None`: the image's
    /// configured user when it is not root, else `1000:1000`.
    pub user: Option<String>,
    /// Mount the image's root filesystem read-only (default true; images that must write
    /// outside `/tmp`, `HOME` and `/workspace` need false).
    pub read_only_rootfs: bool,
    /// Size of the container's `/tmp` tmpfs in bytes.
    pub tmp_size: u64,
    /// Deadline when a request gives none.
    pub default_timeout: Duration,
    /// Upper bound for any deadline.
    pub max_timeout: Duration,
    /// Cap of captured stdout and of stderr (each) for unary results.
    pub output_cap: usize,
    /// Try to pull a missing image (only where a registry is reachable). Off by default.
    pub pull_missing: bool,
    /// Limit of one pull.
    pub pull_timeout: Duration,
    /// Timeout of one Docker API request (seconds granularity).
    pub api_timeout: Duration,
    /// Container names are `<prefix><sandbox id>`.
    pub name_prefix: String,
    /// Hostname inside sandboxes.
    pub hostname: String,
    /// Name of this server instance, recorded in the `agentfense.instance` label: orphan
    /// cleanup only touches containers of the same instance, so two servers (or a test run)
    /// sharing one daemon leave each other alone.
    pub instance: String,
}

impl Default for DockerConfig {
    /// The original's defaults (`ubuntu:22.04`, network `none`, networking disabled), plus ours:
    /// read-only root, 512 MiB `/tmp`, 30 s default and 10 min maximum timeouts, 1 MiB output
    /// cap, no pulls.
    fn default() -> Self {
        DockerConfig {
            host: None,
            default_image: "ubuntu:22.04".into(),
            network_mode: "none".into(),
            enable_networking: false,
            user: None,
            read_only_rootfs: true,
            tmp_size: 512 << 20,
            default_timeout: Duration::from_secs(30),
            max_timeout: Duration::from_secs(600),
            output_cap: 1 << 20,
            pull_missing: false,
            pull_timeout: Duration::from_secs(300),
            api_timeout: Duration::from_secs(120),
            name_prefix: "agentfense-".into(),
            hostname: "sandbox".into(),
            instance: "default".into(),
        }
    }
}

impl DockerConfig {
    /// The daemon address in use.
    pub fn host_or_default(&self) -> &str {
        self.host
            .as_deref()
            .filter(|h| !h.is_empty())
            .unwrap_or("unix:///var/run/docker.sock")
    }
}
