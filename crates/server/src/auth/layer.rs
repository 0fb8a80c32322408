//! The gRPC side of the gate: a tower layer that authorizes each call by its path before any
//! handler runs, and attaches the [`Caller`](super::Caller).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, UdsConnectInfo};

use super::{Credentials, Gate, Peer};

/// Wraps the gRPC routes with [`Gate::authorize`].
#[derive(Debug, Clone)]
pub struct AuthLayer(pub Arc<Gate>);

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService {
            inner,
            gate: self.0.clone(),
        }
    }
}

/// See [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    gate: Arc<Gate>,
}

/// The credentials a gRPC request carries (header, peer, verified client certificate).
pub(crate) fn grpc_credentials<B>(req: &http::Request<B>) -> Credentials {
    let ext = req.extensions();
    let peer = if let Some(u) = ext.get::<UdsConnectInfo>() {
        Peer::Unix(u.peer_cred.map(|c| c.uid()))
    } else if let Some(t) = ext.get::<TcpConnectInfo>() {
        Peer::Tcp(t.remote_addr)
    } else if let Some(t) = ext.get::<crate::tls::PeerInfo>() {
        Peer::Tcp(t.remote)
    } else {
        Peer::Tcp(None)
    };
    Credentials {
        authorization: req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        peer,
        cert_tenant: ext
            .get::<crate::tls::PeerInfo>()
            .and_then(|t| t.cert_tenant.clone()),
    }
}

impl<S, B, RB> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send,
    B: Send + 'static,
    RB: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // The clone may not be ready: call the one that was polled, keep the clone.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let gate = self.gate.clone();
        Box::pin(async move {
            let creds = grpc_credentials(&req);
            let method = req.uri().path().to_owned();
            let resp = match gate.authorize(&creds, &method).await {
                Ok(caller) => {
                    req.extensions_mut().insert(caller);
                    inner.call(req).await
                }
                Err(e) => Ok(tonic::Status::from(e).into_http::<RB>()),
            };
            if let Ok(r) = &resp {
                // A unary error comes as a trailers-only response (the status in the
                // headers); a success, or a stream, counts as OK when it starts.
                let code = r
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map_or(tonic::Code::Ok, tonic::Code::from);
                count_request("grpc", &method, code);
            }
            resp
        })
    }
}

/// Counts one API request (methods nobody declared count as `unknown`: bounded labels).
pub(crate) fn count_request(protocol: &str, method: &str, code: tonic::Code) {
    let method = if super::requirement(method).is_some() {
        method.trim_start_matches('/')
    } else {
        "unknown"
    };
    crate::metrics::metrics()
        .requests_total
        .get_or_create(&crate::metrics::RequestLabels {
            protocol: protocol.to_owned(),
            method: method.to_owned(),
            code: crate::metrics::code_name(code).to_owned(),
        })
        .inc();
}
