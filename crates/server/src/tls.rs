//! TLS on the API listeners (rustls): the acceptor, and what a verified client certificate
//! says about its caller.

use std::net::SocketAddr;

/// What a TLS connection tells the gate: the peer's address and, with mTLS, the tenant its
/// certificate names (its subject's common name).
#[derive(Debug, Clone, Default)]
pub struct PeerInfo {
    /// The client's address.
    pub remote: Option<SocketAddr>,
    /// The tenant of a verified client certificate.
    pub cert_tenant: Option<String>,
}
