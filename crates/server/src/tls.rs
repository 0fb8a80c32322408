//! TLS on the API listeners (rustls): loading `server.tls`, accepting connections (handshakes
//! run concurrently, each with a deadline, so a slow client cannot hold up others), and what
//! a verified client certificate says about its caller.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::server::TlsStream;

use crate::config::TlsConfig;

/// Longest a TLS handshake may take.
const HANDSHAKE: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; further connections wait to be accepted (a flood of slow
/// clients holds this many descriptors, not all of them).
const HANDSHAKES: usize = 256;

/// What a TLS connection tells the gate: the peer's address and, with mTLS, the tenant its
/// certificate names (its subject's common name).
#[derive(Debug, Clone, Default)]
pub struct PeerInfo {
    /// The client's address.
    pub remote: Option<SocketAddr>,
    /// The tenant of a verified client certificate.
    pub cert_tenant: Option<String>,
}

/// `server.tls` could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("server.tls: {0}")]
pub struct TlsError(String);

/// Server configurations for the two listeners (gRPC speaks h2, REST http/1.1).
#[derive(Clone)]
pub struct Tls {
    /// For the gRPC listener.
    pub grpc: TlsAcceptor,
    /// For the REST listener.
    pub rest: TlsAcceptor,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls(..)")
    }
}

/// The crypto of every TLS endpoint of the server (API listeners, PostgreSQL): ring, not
/// aws-lc-rs: no C toolchain beyond cc and a fraction of the build time. rustls deprecates it
/// only for lacking post-quantum key exchange (X25519MLKEM768); revisit when that matters to
/// deployments.
pub(crate) fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    #[allow(deprecated)]
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every PEM certificate in `path` (at least one).
pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            TlsError(format!(
                "cannot read certificates from {}: {e}",
                path.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(TlsError(format!(
            "{} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

impl Tls {
    /// Loads the configured certificate, key and (optional) client CA; `None` without TLS.
    pub fn load(cfg: &TlsConfig) -> Result<Option<Tls>, TlsError> {
        let (Some(cert), Some(key)) = (&cfg.cert, &cfg.key) else {
            return Ok(None);
        };
        let chain = read_certs(cert)?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
            TlsError(format!(
                "cannot read a private key from {}: {e}",
                key.display()
            ))
        })?;
        let provider = crypto_provider();
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(e.to_string()))?;
        let builder = match &cfg.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in read_certs(ca)? {
                    roots
                        .add(c)
                        .map_err(|e| TlsError(format!("client_ca {}: {e}", ca.display())))?;
                }
                // A certificate is optional (a key still works), but one that is presented
                // must chain to the CA.
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError(format!("client_ca {}: {e}", ca.display())))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder
            .with_single_cert(chain, key)
            .map_err(|e| TlsError(format!("certificate and key do not match: {e}")))?;
        let with_alpn = |proto: &[u8]| {
            let mut c = config.clone();
            c.alpn_protocols = vec![proto.to_vec()];
            TlsAcceptor::from(Arc::new(c))
        };
        Ok(Some(Tls {
            grpc: with_alpn(b"h2"),
            rest: with_alpn(b"http/1.1"),
        }))
    }
}

/// The tenant a verified client certificate names: its subject's common name.
fn cert_tenant(certs: Option<&[CertificateDer<'_>]>) -> Option<String> {
    let der = certs?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .trim()
        .to_owned();
    (!cn.is_empty()).then_some(cn)
}

/// An accepted TLS connection with what its handshake established.
#[derive(Debug)]
pub struct TlsConn {
    io: TlsStream<TcpStream>,
    info: PeerInfo,
}

impl TlsConn {
    /// What the gate needs of it.
    pub fn info(&self) -> &PeerInfo {
        &self.info
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

/// Accepts TCP connections and completes their handshakes in the background; finished
/// connections come out of [`TlsListener::next`] (as a `Stream` for tonic, as an axum
/// `Listener` for REST). Failed handshakes are logged and dropped.
#[derive(Debug)]
pub struct TlsListener {
    rx: mpsc::Receiver<TlsConn>,
    local: SocketAddr,
    accept_task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        // Stops accepting (closes the listening socket).
        self.accept_task.abort();
    }
}

impl TlsListener {
    /// Starts accepting on `listener` with `acceptor`.
    pub fn new(listener: TcpListener, acceptor: TlsAcceptor) -> io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let (tx, rx) = mpsc::channel(64);
        let permits = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES));
        let accept_task = tokio::spawn(async move {
            loop {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    return;
                };
                let (tcp, remote) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    let _ = tcp.set_nodelay(true);
                    match tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp)).await {
                        Ok(Ok(io)) => {
                            let info = PeerInfo {
                                remote: Some(remote),
                                cert_tenant: cert_tenant(io.get_ref().1.peer_certificates()),
                            };
                            let _ = tx.send(TlsConn { io, info }).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(peer = %remote, error = %e, "TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(peer = %remote, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener {
            rx,
            local,
            accept_task,
        })
    }

    /// The next established connection (`None` once the accept loop is gone).
    pub async fn next(&mut self) -> Option<TlsConn> {
        self.rx.recv().await
    }
}

/// As a stream of connections, for tonic.
impl tonic::codegen::tokio_stream::Stream for TlsListener {
    type Item = io::Result<TlsConn>;
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().rx.poll_recv(cx).map(|c| c.map(Ok))
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsConn;
    type Addr = PeerInfo;

    async fn accept(&mut self) -> (TlsConn, PeerInfo) {
        loop {
            if let Some(c) = self.next().await {
                let info = c.info.clone();
                return (c, info);
            }
            // The accept loop is gone (shutdown): wait to be dropped.
            std::future::pending::<()>().await;
        }
    }

    fn local_addr(&self) -> io::Result<PeerInfo> {
        Ok(PeerInfo {
            remote: Some(self.local),
            cert_tenant: None,
        })
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>>
    for PeerInfo
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}
