//! `agentfense serve`: the service on an embedded default (no config file needed).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use agentfense_core::RuntimeKind;
use agentfense_server::config::{Config, LogFormat, Overrides};
use anyhow::Context;
use clap::Args;

/// Options of `agentfense serve`; flags override the config file.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// YAML config file (see config/agentfense.example.yaml); without one, built-in defaults.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Where all state lives (default: /var/lib/agentfense as root, else
    /// $XDG_DATA_HOME/agentfense or ~/.local/share/agentfense).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// gRPC listen address (default 127.0.0.1:9000).
    #[arg(long, value_name = "ADDR")]
    pub grpc_addr: Option<String>,
    /// REST listen address (default 127.0.0.1:8080; "" disables REST).
    #[arg(long, value_name = "ADDR")]
    pub http_addr: Option<String>,
    /// Runtime for commands.
    #[arg(long, value_name = "bwrap|docker")]
    pub runtime: Option<RuntimeKind>,
}

/// The default data directory, from the environment (only the binary reads it).
pub fn default_data_dir() -> PathBuf {
    if rustix_is_root() {
        return PathBuf::from("/var/lib/agentfense");
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return Path::new(&x).join("agentfense");
    }
    match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        Some(h) => Path::new(&h).join(".local/share/agentfense"),
        None => PathBuf::from("agentfense-data"),
    }
}

/// This executable, which doubles as the sandbox init. Always the running binary, never a
/// separately installed one, so the init and the server speak the same protocol version.
pub(crate) fn default_init_path() -> Option<PathBuf> {
    std::env::current_exe().ok()
}

fn config_bwrap(config: &Option<PathBuf>) -> anyhow::Result<PathBuf> {
    Ok(match config {
        Some(p) => Config::load(p)?.runtime.bwrap_path,
        None => Config::default().runtime.bwrap_path,
    })
}

/// A bare program name is looked up in `PATH` (only the binary reads the environment).
pub(crate) fn resolve_in_path(name: &Path) -> Option<PathBuf> {
    if name.components().count() > 1 || name.is_absolute() {
        return Some(name.to_owned());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .or_else(|| Some(name.to_owned()))
}

fn rustix_is_root() -> bool {
    rustix::process::geteuid().is_root()
}

pub(crate) fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    let settings = config.resolve(
        Overrides {
            data_dir: args.data_dir,
            grpc_addr: args.grpc_addr,
            http_addr: args.http_addr,
            runtime: args.runtime,
            init_path: default_init_path(),
            bwrap_path: resolve_in_path(&config_bwrap(&args.config)?),
        },
        &default_data_dir(),
    )?;
    init_logging(
        &settings.config.logging.level,
        settings.config.logging.format,
    )?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("agentfense")
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let auth = settings.config.auth.enabled;
        let scheme = if settings.config.server.tls.enabled() {
            "https"
        } else {
            "http"
        };
        let data_dir = settings.paths.data_dir.clone();
        // Handlers first: a SIGTERM during startup (or right after the banner, which a
        // supervisor may take as "ready") is a clean shutdown, never the default death that
        // leaves mounts behind.
        let shutdown = shutdown_signal();
        let bound = agentfense_server::serve::bind(settings).await?;
        if !auth {
            tracing::info!(
                "authentication is off (auth.enabled: false): every local client is an admin"
            );
        }
        // One stable line per port, for people and for scripts that start the server.
        if let Some(a) = bound.grpc_addr() {
            println!("agentfense: gRPC listening on {a}");
        }
        if let Some(a) = bound.http_addr() {
            println!("agentfense: REST listening on {scheme}://{a}");
        }
        if let Some(a) = bound.metrics_addr() {
            println!("agentfense: metrics on http://{a}/metrics");
        }
        if let Some(p) = bound.unix_socket() {
            // unix:///path is also the endpoint to give the Python SDK.
            println!("agentfense: gRPC listening on unix://{}", p.display());
        }
        println!("agentfense: data in {}", data_dir.display());
        bound.run(shutdown).await?;
        tracing::info!("stopped");
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Installs the SIGTERM and SIGINT handlers now; the future completes at the first signal
/// (including one that arrived before it was first polled).
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            // Without signal handlers we can only run until killed.
            std::future::pending::<()>().await;
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
}

fn init_logging(level: &str, format: LogFormat) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::try_new(v).context("invalid RUST_LOG")?,
        _ => {
            EnvFilter::try_new(level).with_context(|| format!("invalid logging.level {level:?}"))?
        }
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let res = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
    res.map_err(|e| anyhow::anyhow!("cannot install the logger: {e}"))
}
