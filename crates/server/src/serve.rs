//! Process-level wiring: open state, bind both ports, serve until shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use agentfense_proto::v1::codebase_service_server::CodebaseServiceServer;
use agentfense_proto::v1::sandbox_service_server::SandboxServiceServer;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

use crate::audit::{Audit, AuditWriter};
use crate::auth::Gate;
use crate::auth::keys::ServerSecret;
use crate::config::Settings;
use crate::files::CodebaseFiles;
use crate::grpc::{CodebaseApi, SandboxApi};
use crate::host::bwrap_runtime;
use crate::rest::{RestState, router};
use crate::service::{Engine, Service};
use crate::store::Beat;

/// Startup failed; each variant says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The data directory could not be created.
    #[error("cannot create data directory {path}")]
    DataDir {
        /// The directory.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Another server process uses this data directory (or mount directory).
    #[error(
        "{path} is in use by another AgentFense server (it holds a lock on the directory; \
         `fuser -v {path}` shows which process); two servers on one data directory would detach \
         each other's mounts: give each its own storage.data_dir (and storage.mount_path)"
    )]
    DirInUse {
        /// The directory.
        path: std::path::PathBuf,
    },
    /// The metadata store could not be opened.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// Another server uses the metadata database.
    #[error(
        "another AgentFense server (not {holder}) is using this metadata database; a server runs \
         every sandbox it records, so each server needs its own database (or wait {ttl:?} after \
         it stopped uncleanly)"
    )]
    DatabaseInUse {
        /// Who we are.
        holder: String,
        /// How long a dead server's claim lasts.
        ttl: Duration,
    },
    /// The claim on the metadata database was lost while serving (another server took it,
    /// or it could not be renewed in time): the server stopped, as it must.
    #[error(
        "stopped: this server lost its claim on the metadata database (another server took it, or \
         the database was unreachable for too long); its sandboxes were stopped, not destroyed"
    )]
    ClaimLost,
    /// This server's node was declared lost by another server while it was away (paused,
    /// or cut off from the database for longer than `nodes.lost_after`).
    #[error(
        "stopped: this server's node was declared lost at {at} (another server saw no heartbeat \
         from it for nodes.lost_after): its sandboxes are in ERROR and what still ran of them \
         here was stopped; their unpublished changes are discarded at the next start, which \
         serves as a fresh node"
    )]
    NodeLost {
        /// When (RFC 3339).
        at: String,
    },
    /// Another process started as this node.
    #[error(
        "stopped: another process registered as this server's node (its data directory started \
         on another machine or boot, e.g. a restored VM or a copied disk); what still ran here was \
         stopped. Give each server its own data directory"
    )]
    Superseded,
    /// Codebase storage could not be opened.
    #[error(transparent)]
    Files(#[from] crate::files::FilesError),
    /// The audit log could not be opened.
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    /// A port could not be bound.
    #[error(
        "cannot listen on {addr} ({what}); is another server running? choose another address with --{what}-addr"
    )]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// `grpc` or `http`.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A runtime or the policy filesystem cannot work on this host.
    #[error("{0}")]
    Host(String),
    /// The gRPC server failed.
    #[error("gRPC server failed")]
    Grpc(#[source] tonic::transport::Error),
    /// The REST server failed.
    #[error("REST server failed")]
    Http(#[source] std::io::Error),
    /// `server.metrics_addr` is unusable.
    #[error("{0}")]
    Metrics(String),
    /// The unix socket could not be set up.
    #[error("cannot listen on unix socket {path}: {detail}")]
    Unix {
        /// The socket path.
        path: std::path::PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// Authentication could not be set up.
    #[error("{0}")]
    Auth(String),
}

/// A server with its state open and its ports bound, not yet serving.
#[derive(Debug)]
pub struct Bound {
    service: Arc<Service>,
    /// Locks on the data and mount directories, held until serving has ended.
    locks: Vec<std::fs::File>,
    claim: Kept,
    gate: Arc<Gate>,
    audit_writer: AuditWriter,
    grpc: TcpListener,
    http: Option<TcpListener>,
    unix: Option<tokio::net::UnixListener>,
    tls: Option<crate::tls::Tls>,
    metrics: Option<TcpListener>,
}

/// Opens the data directory, the metadata store, codebase storage and the audit log, and binds
/// the listening sockets (so that port 0 resolves before anything is served).
pub async fn bind(settings: Settings) -> Result<Bound, ServeError> {
    let paths = settings.paths.clone();
    std::fs::create_dir_all(&paths.data_dir).map_err(|source| ServeError::DataDir {
        path: paths.data_dir.clone(),
        source,
    })?;
    {
        use std::os::unix::fs::PermissionsExt;
        // State holds every codebase: keep it private to the service's user.
        let _ = std::fs::set_permissions(&paths.data_dir, std::fs::Permissions::from_mode(0o700));
    }
    if let Some(dir) = paths.db.parent() {
        std::fs::create_dir_all(dir).map_err(|source| ServeError::DataDir {
            path: dir.to_owned(),
            source,
        })?;
    }
    // Before anything else touches them: a second server here would detach this one's mounts
    // at its start (stale-mount cleanup) and share its node identity.
    let mut locks = vec![lock_dir(&paths.data_dir)?];
    // Once per directory: two locks of one process on one directory would conflict. (A mount
    // directory that does not exist yet is not the data directory; locking makes it.)
    if std::fs::canonicalize(&paths.mounts).ok() != std::fs::canonicalize(&paths.data_dir).ok() {
        locks.push(lock_dir(&paths.mounts)?);
    }
    // Opening may connect to PostgreSQL, whose client must not run on an async worker.
    let store = {
        let settings = settings.clone();
        tokio::task::spawn_blocking(move || crate::store::open(&settings))
            .await
            .map_err(|e| {
                ServeError::Store(crate::store::StoreError::Open {
                    target: "metadata database".into(),
                    source: Box::new(e),
                })
            })??
    };
    let claim = Claim::take(store.clone(), &paths).await?;
    let files = CodebaseFiles::open(&paths.codebases)?;
    let (audit, audit_writer) = Audit::open_alerting(
        &paths.audit,
        settings.config.logging.trail_options(),
        Some(settings.config.alerts.clone()),
    )?;

    let grpc = TcpListener::bind(settings.grpc_addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: settings.grpc_addr,
            what: "grpc",
            source,
        })?;
    let http = match settings.http_addr {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Bind {
                    addr,
                    what: "http",
                    source,
                })?,
        ),
        None => None,
    };
    let metrics = match settings.config.server.metrics_addr.trim() {
        "" => None,
        a => {
            let addr: SocketAddr = a.parse().map_err(|_| {
                ServeError::Metrics(format!("server.metrics_addr {a:?} is not IP:PORT"))
            })?;
            if !addr.ip().is_loopback() {
                return Err(ServeError::Metrics(format!(
                    "server.metrics_addr {addr} is not a loopback address: metrics carry no \
                     authentication; listen on 127.0.0.1 and let the scraper reach it there \
                     (or through a proxy that authenticates)"
                )));
            }
            Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| ServeError::Bind {
                        addr,
                        what: "metrics",
                        source,
                    })?,
            )
        }
    };
    let tls = crate::tls::Tls::load(&settings.config.server.tls)
        .map_err(|e| ServeError::Auth(e.to_string()))?;
    let unix = match &settings.unix_socket {
        Some(path) => Some(bind_unix(
            path,
            settings.config.server.unix_socket_group.as_deref(),
        )?),
        None => None,
    };
    let secret = ServerSecret::load_or_create(&ServerSecret::path_in(&paths.data_dir))
        .map_err(|e| ServeError::Auth(e.to_string()))?;
    let gate = Arc::new(
        Gate::new(
            store.clone(),
            secret.clone(),
            settings.config.auth.clone(),
            audit.clone(),
        )
        .map_err(ServeError::Auth)?,
    );
    let engine = build_engine(&settings, &audit).await?;
    let service = Arc::new(
        Service::new(settings, store, files, audit, engine)
            .with_secret(secret)
            .with_node(claim.claim.node.id.clone())
            .with_fence(claim.fence.clone()),
    );
    Ok(Bound {
        service,
        locks,
        claim,
        gate,
        audit_writer,
        grpc,
        http,
        unix,
        tls,
        metrics,
    })
}

/// This server's claim on the metadata database (the `server` lease): a server runs every
/// sandbox its database records (it restarts them at startup, reaps them, enforces blocks),
/// so two servers on one database would run each other's sandboxes. The claim is renewed
/// from the moment it is taken until shutdown has finished, and released after a clean stop.
/// Its holder is the host name and an instance id kept in the data directory: the same server
/// restarting after a crash takes it back at once, while any other is refused until the
/// claim has expired (by the database's clock). A server that cannot renew it in time, or
/// finds it taken, stops: it can no longer know that it is the only one.
#[derive(Debug, Clone)]
struct Claim {
    store: Arc<dyn crate::store::Store>,
    holder: String,
    /// This server as a node: registered with the claim, its heartbeat sent with each
    /// renewal.
    node: crate::store::NodeRecord,
}

/// A claim being kept: the renewing task, how to stop it, and whether it was lost.
#[derive(Debug)]
struct Kept {
    claim: Claim,
    task: tokio::task::JoinHandle<()>,
    stop: tokio::sync::watch::Sender<bool>,
    lost: tokio::sync::watch::Receiver<Option<Loss>>,
    /// Closed when the claim is lost, and on its age: publishes check it.
    fence: Arc<crate::service::Fence>,
}

/// Why a kept claim ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loss {
    /// Another server took it, or it could not be renewed in time.
    Claim,
    /// This node was declared lost (at that time).
    Node(std::time::SystemTime),
    /// Another process registered as this node (the same data directory started on another
    /// machine or boot: a restored VM, a copied disk) and holds the claim under the same id.
    Superseded,
}

impl Loss {
    fn error(self) -> ServeError {
        match self {
            Loss::Claim => ServeError::ClaimLost,
            Loss::Node(at) => ServeError::NodeLost {
                at: humantime::format_rfc3339_seconds(at).to_string(),
            },
            Loss::Superseded => ServeError::Superseded,
        }
    }

    /// Whether the claim may be released at shutdown: not when another server took it, nor
    /// when another process holds it under this server's own id.
    fn releases(loss: Option<Loss>) -> bool {
        matches!(loss, None | Some(Loss::Node(_)))
    }
}

impl Claim {
    const NAME: &'static str = crate::store::SERVER_LEASE;
    const TTL: Duration = Duration::from_secs(60);
    const RENEW_EVERY: Duration = Duration::from_secs(10);

    /// Takes the claim and keeps renewing it.
    async fn take(
        store: Arc<dyn crate::store::Store>,
        paths: &crate::config::Paths,
    ) -> Result<Kept, ServeError> {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let instance = instance_id(&paths.data_dir).map_err(|source| ServeError::DataDir {
            path: paths.data_dir.join(INSTANCE_FILE),
            source,
        })?;
        let now = std::time::SystemTime::now();
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|b| b.trim().to_owned())
            .unwrap_or_default();
        let claim = Claim {
            store,
            // The instance, where it runs, and from which directory: this server restarting
            // (same boot, same directory) takes its claim back at once, while a copy of its
            // data directory (another path, a restored VM, a copied disk) is another holder
            // and is refused, although it carries the same node id.
            holder: format!("{instance}@{boot_id}:{}", paths.data_dir.display()),
            node: crate::store::NodeRecord {
                id: instance,
                host: host.trim().to_owned(),
                boot_id,
                cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
                memory_bytes: memory_total(),
                draining: false,
                registered_at: now,
                heartbeat_at: now,
                lost_at: None,
            },
        };
        if !claim.try_take().await? {
            return Err(ServeError::DatabaseInUse {
                holder: claim.holder,
                ttl: Claim::TTL,
            });
        }
        {
            let (store, node) = (claim.store.clone(), claim.node.clone());
            tokio::task::spawn_blocking(move || store.register_node(&node))
                .await
                .map_err(|e| ServeError::Host(format!("registering this node: {e}")))??;
        }
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let (lost_tx, lost) = tokio::sync::watch::channel(None);
        // Half the TTL without a renewal: the server stops (below), and publishes stop first.
        let fence = Arc::new(crate::service::Fence::new(
            claim.store.shared().then_some(Claim::TTL / 2),
            claim.holder.clone(),
        ));
        let renewing = claim.clone();
        let fenced = fence.clone();
        let lose = move |why: Loss| {
            fenced.close();
            let _ = lost_tx.send(Some(why));
        };
        let fenced = fence.clone();
        let task = tokio::spawn(async move {
            // When the last renewal that succeeded was sent: the database stamped its expiry
            // at or after this instant, so the claim is ours until at least this + TTL.
            let mut last = tokio::time::Instant::now();
            let mut tick = tokio::time::interval(Claim::RENEW_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    biased;
                    _ = stopped.wait_for(|v| *v) => return,
                    _ = tick.tick() => {}
                }
                let sent = tokio::time::Instant::now();
                let renewed = tokio::time::timeout(Claim::RENEW_EVERY, renewing.try_take()).await;
                match renewed {
                    Ok(Ok(true)) => {
                        last = sent;
                        match renewing.heartbeat().await {
                            Some(Beat::Lost(at)) => {
                                tracing::error!(node = %renewing.node.id, "this node was declared lost by another server while it was away: stopping its sandboxes");
                                lose(Loss::Node(at));
                                return;
                            }
                            Some(Beat::Superseded) => {
                                tracing::error!(node = %renewing.node.id, "another process registered as this node: stopping");
                                lose(Loss::Superseded);
                                return;
                            }
                            _ => fenced.renewed(sent.into_std()),
                        }
                    }
                    Ok(Ok(false)) => {
                        tracing::error!(holder = %renewing.holder, "another server has claimed this metadata database: stopping");
                        // Its node may have been declared lost as it took over: say so (a
                        // read, not a heartbeat, which would put that off).
                        lose(match renewing.lost_at().await {
                            Some(at) => Loss::Node(at),
                            None => Loss::Claim,
                        });
                        return;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "cannot renew the claim on the metadata database")
                    }
                    Err(_) => {
                        tracing::warn!("renewing the claim on the metadata database timed out")
                    }
                }
                // Half the TTL without a renewal: stop while the claim is surely still ours,
                // leaving the other half for the sandboxes to be stopped. (Only where another
                // machine could take it: an SQLite file this process cannot write, another
                // cannot either.)
                if renewing.store.shared() && last.elapsed() >= Claim::TTL / 2 {
                    tracing::error!(
                        "the claim on the metadata database could not be renewed in time: stopping"
                    );
                    lose(Loss::Claim);
                    return;
                }
            }
        });
        Ok(Kept {
            claim,
            task,
            stop,
            lost,
            fence,
        })
    }

    async fn try_take(&self) -> Result<bool, ServeError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            this.store.try_lease(Claim::NAME, &this.holder, Claim::TTL)
        })
        .await
        .map_err(|e| ServeError::Host(format!("claiming the metadata database: {e}")))?
        .map_err(ServeError::Store)
    }

    /// When this node was declared lost, if it was (and the store answers in time).
    async fn lost_at(&self) -> Option<std::time::SystemTime> {
        let this = self.clone();
        let node = tokio::time::timeout(
            Claim::RENEW_EVERY,
            tokio::task::spawn_blocking(move || this.store.get_node(&this.node.id)),
        )
        .await;
        match node {
            Ok(Ok(Ok(Some(n)))) => n.lost_at,
            _ => None,
        }
    }

    /// Records that this node is alive (for `agentfense nodes list`, and so that no other
    /// server declares it lost): what the store answered, `None` if it did not in time.
    async fn heartbeat(&self) -> Option<Beat> {
        let this = self.clone();
        let beat = tokio::time::timeout(
            Claim::RENEW_EVERY,
            tokio::task::spawn_blocking(move || {
                this.store.heartbeat_node(&this.node.id, &this.node.boot_id)
            }),
        )
        .await;
        match beat {
            Ok(Ok(Ok(b))) => Some(b),
            _ => {
                tracing::warn!(node = %self.node.id, "cannot record this node's heartbeat");
                None
            }
        }
    }
}

impl Drop for Kept {
    /// A claim dropped without [`Kept::release`] (startup failed after taking it) stops being
    /// renewed; it expires, or this server takes it back when it starts again.
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Total memory of this machine, bytes (0 if unknown).
fn memory_total() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

impl Kept {
    /// Stops renewing; gives the claim up unless it was lost.
    async fn release(mut self) {
        let _ = self.stop.send(true);
        let _ = (&mut self.task).await;
        if !Loss::releases(*self.lost.borrow()) {
            return;
        }
        let claim = self.claim.clone();
        let _ = tokio::task::spawn_blocking(move || {
            claim.store.release_lease(Claim::NAME, &claim.holder)
        })
        .await;
    }
}

/// Takes the lock of a server directory: an exclusive `flock` on the directory itself (no
/// lock file that could be deleted from under it), which the kernel releases when the
/// process dies, so a crash leaves nothing to clean. Creates the directory if needed.
fn lock_dir(dir: &std::path::Path) -> Result<std::fs::File, ServeError> {
    use rustix::fs::{FlockOperation, flock};
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| ServeError::DataDir {
        path: dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    // A data directory that is a symlink (to another disk) is the operator's choice: followed.
    let handle = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::DIRECTORY.bits() as i32)
        .open(dir)
        .map_err(io)?;
    match flock(&handle, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(handle),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(ServeError::DirInUse {
            path: dir.to_owned(),
        }),
        Err(e) => Err(io(e.into())),
    }
}

/// The file in the data directory naming this server instance (for its database claim).
const INSTANCE_FILE: &str = "instance-id";

/// This data directory's instance id: made (random) at its first start, then kept.
fn instance_id(data_dir: &std::path::Path) -> std::io::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join(INSTANCE_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(std::io::Error::other)?;
    let id: String = b.iter().map(|x| format!("{x:02x}")).collect();
    let tmp = data_dir.join(format!(".{INSTANCE_FILE}.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(id.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(id)
}

/// Binds the API's unix socket: a stale socket file is replaced (a live server on it is
/// refused), the socket is mode 0660 and, when configured, owned by `group`.
fn bind_unix(
    path: &std::path::Path,
    group: Option<&str>,
) -> Result<tokio::net::UnixListener, ServeError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let err = |detail: String| ServeError::Unix {
        path: path.to_owned(),
        detail,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(err("a file that is not a socket is in the way".into()));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(err("another server is listening on it".into()));
        }
        std::fs::remove_file(path).map_err(|e| err(e.to_string()))?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        // Anyone who may create or replace names in the directory could swap the socket for
        // a symlink between our bind and chmod, or bind the path first and collect keys.
        let meta = std::fs::metadata(dir).map_err(|e| err(e.to_string()))?;
        let mode = meta.permissions().mode();
        let sticky = mode & 0o1000 != 0;
        let foreign_owner = std::os::unix::fs::MetadataExt::uid(&meta)
            != rustix::process::geteuid().as_raw()
            && std::os::unix::fs::MetadataExt::uid(&meta) != 0;
        if (mode & 0o022 != 0 && !sticky) || foreign_owner {
            return Err(err(format!(
                "its directory {} is writable by others or owned by another user; use a \
                 directory only root (or the server's user) can write, e.g. /run/agentfense",
                dir.display()
            )));
        }
    }
    let gid = match group {
        None => None,
        Some(g) => Some(gid_of(g).ok_or_else(|| err(format!("no group named {g:?}")))?),
    };
    // Created 0600 (umask) and only then opened up: no window in which anyone else connects.
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let listener = tokio::net::UnixListener::bind(path);
    rustix::process::umask(old);
    let listener = listener.map_err(|e| err(e.to_string()))?;
    if let Some(gid) = gid {
        std::os::unix::fs::lchown(path, None, Some(gid)).map_err(|e| err(e.to_string()))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| err(e.to_string()))?;
    Ok(listener)
}

/// A group's gid from the group database (or a numeric gid).
fn gid_of(name: &str) -> Option<u32> {
    if let Ok(n) = name.parse() {
        return Some(n);
    }
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then(|| f.nth(1)?.parse().ok())?
    })
}

/// The Docker runtime configured by `runtime.docker` (feature `docker`).
#[cfg(feature = "docker")]
async fn docker_runtime(
    settings: &Settings,
    tx: tokio::sync::mpsc::Sender<agentfense_runtime::RuntimeEvent>,
) -> Result<Arc<dyn agentfense_runtime::Runtime>, ServeError> {
    let rt = &settings.config.runtime;
    let d = &rt.docker;
    let cfg = agentfense_docker::DockerConfig {
        host: d.host.clone(),
        default_image: d.default_image.clone(),
        network_mode: d.network_mode.clone(),
        enable_networking: d.enable_networking && rt.allow_network,
        default_timeout: rt.default_timeout,
        max_timeout: rt.max_timeout,
        output_cap: usize::try_from(rt.output_limit_bytes).unwrap_or(usize::MAX),
        // Containers are labelled with the data directory, so two servers sharing one
        // daemon never clean up each other's.
        instance: settings.paths.data_dir.display().to_string(),
        ..agentfense_docker::DockerConfig::default()
    };
    let docker = agentfense_docker::DockerRuntime::connect(cfg, tx)
        .await
        .map_err(|e| {
            ServeError::Host(format!(
                "runtime.type is docker but the Docker daemon is unusable ({}); start dockerd \
                 or use --runtime bwrap",
                crate::error::chain(&e)
            ))
        })?;
    Ok(Arc::new(docker))
}

/// Without the `docker` feature, `runtime.type: docker` says how to get it.
#[cfg(not(feature = "docker"))]
async fn docker_runtime(
    _settings: &Settings,
    _tx: tokio::sync::mpsc::Sender<agentfense_runtime::RuntimeEvent>,
) -> Result<Arc<dyn agentfense_runtime::Runtime>, ServeError> {
    Err(ServeError::Host(
        "runtime.type is docker but this build has no Docker runtime: build with the `docker` \
         feature (on by default), or use --runtime bwrap"
            .into(),
    ))
}

/// Builds the runtimes this server offers and forwards their events to the audit log.
async fn build_engine(settings: &Settings, audit: &Audit) -> Result<Engine, ServeError> {
    use agentfense_core::RuntimeKind;
    use agentfense_runtime::RuntimeEvent;

    let rt = &settings.config.runtime;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<RuntimeEvent>(1024);
    let runtime = bwrap_runtime(rt, &settings.paths.data_dir.join("runtime"), tx.clone())?;
    let mut engine = Engine::default();
    // Docker is offered when it is the configured type (bwrap always is): requests that name
    // a runtime the server lacks get FAILED_PRECONDITION naming what is available.
    if rt.kind == RuntimeKind::Docker {
        engine
            .runtimes
            .insert(RuntimeKind::Docker, docker_runtime(settings, tx).await?);
    }
    let audit = audit.clone();
    let tenants = engine.tenants.clone();
    tokio::spawn(async move {
        while let Some(ev) = rx.recv().await {
            match ev {
                RuntimeEvent::ResourceLimitExceeded {
                    sandbox_id,
                    session_id,
                    limit,
                    command,
                } => audit.record_as(
                    crate::audit::Actor {
                        tenant: tenants
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get(&sandbox_id)
                            .cloned(),
                        key_id: None,
                    },
                    crate::audit::AuditEvent::ResourceLimitExceeded {
                        sandbox_id,
                        limit: limit.as_str().to_owned(),
                        command,
                        detail: session_id
                            .map(|s| format!("in session {s}"))
                            .unwrap_or_default(),
                    },
                ),
            }
        }
    });
    engine.runtimes.insert(
        RuntimeKind::Bwrap,
        Arc::new(runtime) as Arc<dyn agentfense_runtime::Runtime>,
    );
    let mut kinds: Vec<&str> = engine.runtimes.keys().map(|k| k.as_str()).collect();
    kinds.sort_unstable();
    tracing::info!(default = %rt.kind, available = %kinds.join(","), "runtimes ready");
    Ok(engine)
}

impl Bound {
    /// The bound gRPC address.
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc.local_addr().ok()
    }

    /// The bound REST address, if REST is enabled.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The bound metrics address, if metrics are served.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The unix socket's path, if the server listens on one.
    pub fn unix_socket(&self) -> Option<std::path::PathBuf> {
        self.unix
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .and_then(|a| a.as_pathname().map(|p| p.to_owned()))
    }

    /// The service (for in-process use).
    pub fn service(&self) -> &Arc<Service> {
        &self.service
    }

    /// Serves both protocols until `shutdown` resolves, then stops accepting, lets in-flight
    /// requests finish (up to a grace period) and flushes the audit log.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let Bound {
            service,
            locks,
            claim,
            gate,
            audit_writer,
            grpc,
            http,
            unix,
            tls,
            metrics,
        } = self;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|v| *v).await;
        };

        // Sandboxes of nodes long gone show ERROR from the start.
        service.mark_lost_nodes().await;
        service.recover().await;
        let reaper = {
            let svc = service.clone();
            let every = svc.settings().config.sandbox.cleanup_interval;
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        biased;
                        _ = async { let _ = stop.wait_for(|v| *v).await; } => break,
                        _ = tick.tick() => {
                            let n = svc.reap_expired().await;
                            if n > 0 {
                                tracing::info!(count = n, "destroyed expired sandboxes");
                            }
                        }
                    }
                }
            })
        };

        // Long-running sessions: no event marks them, so they are looked for.
        let sessions = {
            let svc = service.clone();
            let rule = svc.settings().config.alerts.long_sessions.clone();
            let every = (rule.after / 2).clamp(Duration::from_secs(1), Duration::from_secs(60));
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                if !rule.enabled {
                    return;
                }
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        biased;
                        _ = async { let _ = stop.wait_for(|v| *v).await; } => break,
                        _ = tick.tick() => { svc.alert_long_sessions().await; }
                    }
                }
            })
        };

        // Tenant blocks are written by `agentfense tenants block` (another process): act on
        // them within a second.
        let blocks = {
            let svc = service.clone();
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        biased;
                        _ = async { let _ = stop.wait_for(|v| *v).await; } => break,
                        _ = tick.tick() => { svc.enforce_blocks().await; }
                    }
                }
            })
        };

        // Other nodes sharing the database: one silent for nodes.lost_after is declared lost
        // (checked as often as heartbeats are sent).
        let lost_nodes = {
            let svc = service.clone();
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Claim::RENEW_EVERY);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick.tick().await;
                loop {
                    tokio::select! {
                        biased;
                        _ = async { let _ = stop.wait_for(|v| *v).await; } => break,
                        _ = tick.tick() => { svc.mark_lost_nodes().await; }
                    }
                }
            })
        };

        let (health, health_svc) = tonic_health::server::health_reporter();
        health
            .set_serving::<CodebaseServiceServer<CodebaseApi>>()
            .await;
        health
            .set_serving::<SandboxServiceServer<SandboxApi>>()
            .await;
        let codebases = CodebaseApi(service.clone());
        let sandboxes = SandboxApi(service.clone());
        let config = &service.settings().config;
        let request_timeout = config.server.request_timeout(&config.runtime);
        let grpc_routes =
            crate::grpc::routes(service.clone(), gate.clone()).add_service(health_svc);
        let grpc_builder = || {
            tonic::transport::Server::builder()
                .timeout(request_timeout)
                .trace_fn(|req| tracing::info_span!("grpc", path = %req.uri().path()))
        };
        let grpc_task = match &tls {
            None => tokio::spawn(
                grpc_builder()
                    .add_routes(grpc_routes.clone())
                    .serve_with_incoming_shutdown(
                        // Responses go out in several small writes (headers, message,
                        // trailers): with Nagle on, the client's delayed ACK held the later ones
                        // back ~40 ms, on creates and starts.
                        TcpIncoming::from(grpc).with_nodelay(Some(true)),
                        wait(stop_rx.clone()),
                    ),
            ),
            Some(tls) => {
                let incoming = crate::tls::TlsListener::new(grpc, tls.grpc.clone())
                    .map_err(ServeError::Http)?;
                tokio::spawn(
                    grpc_builder()
                        .add_routes(grpc_routes.clone())
                        .serve_with_incoming_shutdown(incoming, wait(stop_rx.clone())),
                )
            }
        };
        let unix_task = unix.map(|listener| {
            use tonic::codegen::tokio_stream::StreamExt;
            let fix = Arc::new(crate::uds::AuthorityFix::for_socket(
                listener
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_pathname().map(|p| p.to_owned()))
                    .unwrap_or_default()
                    .as_path(),
            ));
            let incoming =
                tonic::codegen::tokio_stream::wrappers::UnixListenerStream::new(listener)
                    .map(move |conn| conn.map(|s| crate::uds::UdsConn::new(s, fix.clone())));
            tokio::spawn(
                grpc_builder()
                    .add_routes(grpc_routes)
                    .serve_with_incoming_shutdown(incoming, wait(stop_rx.clone())),
            )
        });

        let guard = Arc::new(crate::rest::Guard {
            gate: gate.clone(),
            allowed_hosts: config.server.allowed_hosts.clone(),
            cors_origins: config.server.cors_origins.clone(),
        });
        let http_task = http.map(|listener| {
            let app = router(RestState { codebases, sandboxes }, guard)
                .layer(tower_http::timeout::TimeoutLayer::with_status_code(
                    axum::http::StatusCode::REQUEST_TIMEOUT,
                    request_timeout,
                ))
                .layer(tower_http::trace::TraceLayer::new_for_http().make_span_with(
                    |req: &axum::http::Request<_>| {
                        tracing::info_span!("http", method = %req.method(), path = %req.uri().path())
                    },
                ));
            let rx = stop_rx.clone();
            match &tls {
                None => tokio::spawn(async move {
                    use axum::serve::ListenerExt;
                    // As on the gRPC port: a streamed response (MCP) must not wait for the
                    // client's delayed ACK.
                    let listener = listener.tap_io(|tcp| {
                        let _ = tcp.set_nodelay(true);
                    });
                    axum::serve(
                        listener,
                        app.into_make_service_with_connect_info::<crate::rest::RestPeer>(),
                    )
                    .with_graceful_shutdown(wait(rx))
                    .await
                }),
                Some(tls) => {
                    let acceptor = tls.rest.clone();
                    tokio::spawn(async move {
                        let listener = crate::tls::TlsListener::new(listener, acceptor)?;
                        axum::serve(
                            listener,
                            app.into_make_service_with_connect_info::<crate::tls::PeerInfo>(),
                        )
                        .with_graceful_shutdown(wait(rx))
                        .await
                    })
                }
            }
        });

        let metrics_task = metrics.map(|listener| {
            let app = axum::Router::new()
                .route("/metrics", axum::routing::get(scrape))
                .with_state(service.clone());
            tokio::spawn(
                axum::serve(listener, app)
                    .with_graceful_shutdown(wait(stop_rx.clone()))
                    .into_future(),
            )
        });

        let mut lost = claim.lost.clone();
        let claim_lost = tokio::select! {
            _ = shutdown => None,
            // A renewing task that died without a word also means the claim is not kept.
            r = lost.wait_for(|v| v.is_some()) => Some(r.ok().and_then(|v| *v).unwrap_or(Loss::Claim)),
        };
        tracing::info!("shutting down: no new requests accepted");
        let _ = stop_tx.send(true);
        if claim_lost.is_some() {
            // Another server may run these sandboxes any moment now: stop them before
            // waiting for requests in flight.
            service.shutdown().await;
        }
        let grace = Duration::from_secs(10);
        let grpc_res = tokio::time::timeout(grace, grpc_task).await;
        let http_res = match http_task {
            Some(t) => Some(tokio::time::timeout(grace, t).await),
            None => None,
        };
        let _ = reaper.await;
        let _ = blocks.await;
        let _ = lost_nodes.await;
        let _ = sessions.await;
        if let Some(t) = metrics_task {
            let _ = tokio::time::timeout(grace, t).await;
        }
        if let Some(t) = unix_task {
            let _ = tokio::time::timeout(grace, t).await;
        }
        // Kill what runs inside sandboxes and unmount every FUSE mount; their RUNNING status
        // stays in the store so the next start brings them back.
        service.shutdown().await;
        // Every handle on the audit log must go before the writer can finish (the gate
        // records failed authentications).
        drop(service);
        drop(gate);
        claim.release().await;
        // Flush the audit trail last, after every request that could record an event.
        tokio::task::spawn_blocking(move || audit_writer.close())
            .await
            .ok();
        // Everything under the directories is stopped and unmounted: another server may come.
        drop(locks);
        if let Some(loss) = claim_lost {
            return Err(loss.error());
        }
        if let Ok(Ok(Err(e))) = grpc_res {
            return Err(ServeError::Grpc(e));
        }
        if let Some(Ok(Ok(Err(e)))) = http_res {
            return Err(ServeError::Http(e));
        }
        Ok(())
    }
}

/// `GET /metrics`: gauges read at scrape time, then every metric in the text format.
/// OpenMetrics when the scraper asks for it (Prometheus does), else the classic text format.
async fn scrape(
    axum::extract::State(svc): axum::extract::State<Arc<Service>>,
    headers: axum::http::HeaderMap,
) -> impl axum::response::IntoResponse {
    let s = svc.clone();
    let _ = tokio::task::spawn_blocking(move || s.observe_gauges()).await;
    let open = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    let m = crate::metrics::metrics();
    if open {
        (
            [(
                axum::http::header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            m.encode(),
        )
    } else {
        (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            m.encode_prometheus(),
        )
    }
}
