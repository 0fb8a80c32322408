//! What every REST request passes before any handler runs: the cross-site checks that keep
//! web pages from driving the API (CSRF, DNS rebinding), then the gate.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::RestError;
use crate::auth::{Credentials, Gate, Peer, ext};
use crate::tls::PeerInfo;

/// The REST listener's policy: accepted Host names and Origins, and the gate.
#[derive(Debug)]
pub struct Guard {
    /// Authenticates and authorizes each call.
    pub gate: Arc<Gate>,
    /// Host names accepted besides loopback names and IP literals (lower case).
    pub allowed_hosts: Vec<String>,
    /// Origins whose (browser) requests are accepted, with CORS headers.
    pub cors_origins: Vec<String>,
}

/// The REST peer address of a plain TCP connection (`ConnectInfo<RestPeer>`).
pub type RestPeer = SocketAddr;

/// The gRPC method each REST route calls: the gate decides REST calls by the same table as
/// gRPC ones. A route missing here is refused.
pub const ROUTES: &[(&str, &str, &str)] = &[
    (
        "GET",
        "/v1/codebases",
        "/sandbox.v1.CodebaseService/ListCodebases",
    ),
    (
        "POST",
        "/v1/codebases",
        "/sandbox.v1.CodebaseService/CreateCodebase",
    ),
    (
        "GET",
        "/v1/codebases/{codebase_id}",
        "/sandbox.v1.CodebaseService/GetCodebase",
    ),
    (
        "DELETE",
        "/v1/codebases/{codebase_id}",
        "/sandbox.v1.CodebaseService/DeleteCodebase",
    ),
    (
        "GET",
        "/v1/codebases/{codebase_id}/files",
        "/sandbox.v1.CodebaseService/ListFiles",
    ),
    (
        "GET",
        "/v1/sandboxes",
        "/sandbox.v1.SandboxService/ListSandboxes",
    ),
    (
        "POST",
        "/v1/sandboxes",
        "/sandbox.v1.SandboxService/CreateSandbox",
    ),
    (
        "GET",
        "/v1/sandboxes/{sandbox_id}",
        "/sandbox.v1.SandboxService/GetSandbox",
    ),
    (
        "DELETE",
        "/v1/sandboxes/{sandbox_id}",
        "/sandbox.v1.SandboxService/DestroySandbox",
    ),
    (
        "POST",
        "/v1/sandboxes/{sandbox_id}/start",
        "/sandbox.v1.SandboxService/StartSandbox",
    ),
    (
        "POST",
        "/v1/sandboxes/{sandbox_id}/stop",
        "/sandbox.v1.SandboxService/StopSandbox",
    ),
    (
        "POST",
        "/v1/sandboxes/{sandbox_id}/exec",
        "/sandbox.v1.SandboxService/Exec",
    ),
    (
        "GET",
        "/v1/sandboxes/{sandbox_id}/sessions",
        "/sandbox.v1.SandboxService/ListSessions",
    ),
    (
        "POST",
        "/v1/sandboxes/{sandbox_id}/sessions",
        "/sandbox.v1.SandboxService/CreateSession",
    ),
    (
        "GET",
        "/v1/sessions/{session_id}",
        "/sandbox.v1.SandboxService/GetSession",
    ),
    (
        "DELETE",
        "/v1/sessions/{session_id}",
        "/sandbox.v1.SandboxService/DestroySession",
    ),
    (
        "POST",
        "/v1/sessions/{session_id}/exec",
        "/sandbox.v1.SandboxService/SessionExec",
    ),
    ("POST", "/v1/sandboxes/{sandbox_id}/publish", ext::PUBLISH),
    ("POST", "/v1/sandboxes/{sandbox_id}/tokens", ext::MINT_TOKEN),
    ("PUT", "/v1/sandboxes/{sandbox_id}/egress", ext::SET_EGRESS),
    (
        "GET",
        "/v1/sandboxes/{sandbox_id}/metrics",
        ext::SANDBOX_METRICS,
    ),
    (
        "GET",
        "/v1/sandboxes/{sandbox_id}/changes",
        "/agentfense.v1.Review/ListChanges",
    ),
    (
        "GET",
        "/v1/sandboxes/{sandbox_id}/diff",
        "/agentfense.v1.Review/GetDiff",
    ),
    (
        "POST",
        "/v1/sandboxes/{sandbox_id}/changes:apply",
        "/agentfense.v1.Review/ApplyChanges",
    ),
    (
        "POST",
        "/v1/sandboxes/{sandbox_id}/changes:discard",
        "/agentfense.v1.Review/DiscardChanges",
    ),
    (
        "GET",
        "/v1/sandboxes/{sandbox_id}/checkpoints",
        "/agentfense.v1.Review/ListCheckpoints",
    ),
    (
        "POST",
        "/v1/sandboxes/{sandbox_id}/checkpoints",
        "/agentfense.v1.Review/CreateCheckpoint",
    ),
    (
        "POST",
        "/v1/sandboxes/{sandbox_id}/checkpoints/{checkpoint_id}",
        "/agentfense.v1.Review/RestoreCheckpoint",
    ),
    (
        "DELETE",
        "/v1/sandboxes/{sandbox_id}/checkpoints/{checkpoint_id}",
        "/agentfense.v1.Review/DeleteCheckpoint",
    ),
    (
        "GET",
        "/v1/sandboxes/{sandbox_id}/checkpoints/{checkpoint_id}/diff",
        "/agentfense.v1.Review/DiffCheckpoints",
    ),
    ("POST", "/mcp", ext::MCP),
    ("GET", "/mcp", ext::MCP),
    ("DELETE", "/mcp", ext::MCP),
];

fn refuse(status: StatusCode, code: tonic::Code, msg: String) -> Response {
    let body = serde_json::json!({ "code": code as i32, "message": msg, "details": [] });
    (status, axum::Json(body)).into_response()
}

/// The host part of a `Host` header value (`name`, `name:port`, `[v6]:port`), lower case.
fn host_name(value: &str) -> Option<String> {
    let v = value.trim();
    let host = if let Some(rest) = v.strip_prefix('[') {
        rest.split_once(']')?.0
    } else {
        match v.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => v,
        }
    };
    (!host.is_empty()).then(|| host.trim_end_matches('.').to_ascii_lowercase())
}

impl Guard {
    /// Whether a `Host` is one this server answers to: an IP literal (a rebinding attack
    /// needs a name the attacker controls), a loopback name, or a configured name.
    fn host_ok(&self, headers: &HeaderMap) -> bool {
        let Some(host) = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .and_then(host_name)
        else {
            return false;
        };
        host.parse::<IpAddr>().is_ok()
            || host == "localhost"
            || host.ends_with(".localhost")
            || self
                .allowed_hosts
                .iter()
                .any(|h| h.eq_ignore_ascii_case(&host))
    }

    fn origin_allowed(&self, origin: &str) -> bool {
        self.cors_origins
            .iter()
            .any(|o| o.trim_end_matches('/').eq_ignore_ascii_case(origin))
    }
}

fn cors_headers(resp: &mut Response, origin: &HeaderValue) {
    let h = resp.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    h.insert(header::VARY, HeaderValue::from_static("Origin"));
}

/// Host, Origin and Content-Type checks, before routing and before any work: a web page
/// the developer visits can neither send the API a command (CSRF: foreign `Origin`, or a
/// form/`text/plain` body) nor read its answers after DNS rebinding (foreign `Host`).
pub async fn cross_site(State(g): State<Arc<Guard>>, req: Request, next: Next) -> Response {
    // The health check answers "ok" to anyone (load balancers and probes use whatever name
    // they know the server by); it reveals nothing and does nothing.
    if req.uri().path() == "/healthz" && req.method() == Method::GET {
        return next.run(req).await;
    }
    let headers = req.headers();
    if !g.host_ok(headers) {
        return refuse(
            StatusCode::MISDIRECTED_REQUEST,
            tonic::Code::PermissionDenied,
            format!(
                "Host {:?} is not a name this server answers to (add it to server.allowed_hosts)",
                headers
                    .get(header::HOST)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
            ),
        );
    }
    let origin = headers.get(header::ORIGIN).cloned();
    if let Some(o) = &origin {
        let allowed = o.to_str().is_ok_and(|s| g.origin_allowed(s));
        if !allowed {
            return refuse(
                StatusCode::FORBIDDEN,
                tonic::Code::PermissionDenied,
                format!(
                    "cross-origin request from {:?} refused (server.cors_origins)",
                    o.to_str().unwrap_or("?")
                ),
            );
        }
        if req.method() == Method::OPTIONS {
            let mut resp = StatusCode::NO_CONTENT.into_response();
            cors_headers(&mut resp, o);
            let h = resp.headers_mut();
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, POST, PUT, DELETE"),
            );
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static("authorization, content-type"),
            );
            h.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static("600"),
            );
            return resp;
        }
    } else if headers
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"cross-site"))
    {
        return refuse(
            StatusCode::FORBIDDEN,
            tonic::Code::PermissionDenied,
            "cross-site request refused".to_owned(),
        );
    }
    // A body must be JSON, declared as such: forms and text/plain (what a page may send
    // without a preflight) are refused.
    let has_body = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| v.trim() != "0")
        && (headers.contains_key(header::CONTENT_LENGTH)
            || headers.contains_key(header::TRANSFER_ENCODING));
    let content_type = headers.get(header::CONTENT_TYPE);
    let json = content_type
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim())
        .is_some_and(|m| m.eq_ignore_ascii_case("application/json"));
    if (content_type.is_some() || has_body) && !json {
        return refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            tonic::Code::InvalidArgument,
            "request bodies must be Content-Type: application/json".to_owned(),
        );
    }
    let mut resp = next.run(req).await;
    if let Some(o) = &origin {
        cors_headers(&mut resp, o);
    }
    resp
}

/// The gate for a REST call: the gRPC method of the matched route, the credentials of the
/// request; the admitted caller goes into the request's extensions.
pub async fn authenticate(State(g): State<Arc<Guard>>, mut req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let method = ROUTES
        .iter()
        .find(|(m, p, _)| *p == route && req.method().as_str() == *m)
        .map_or("", |(_, _, grpc)| *grpc);
    let peer = if let Some(ConnectInfo(p)) = req.extensions().get::<ConnectInfo<PeerInfo>>() {
        (Peer::Tcp(p.remote), p.cert_tenant.clone())
    } else {
        let addr = req.extensions().get::<ConnectInfo<RestPeer>>().map(|c| c.0);
        (Peer::Tcp(addr), None)
    };
    let creds = Credentials {
        authorization: req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        peer: peer.0,
        cert_tenant: peer.1,
    };
    let resp = match g.gate.authorize(&creds, method).await {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(e) => RestError(tonic::Status::from(e)).into_response(),
    };
    let code =
        resp.extensions()
            .get::<tonic::Code>()
            .copied()
            .unwrap_or(if resp.status().is_success() {
                tonic::Code::Ok
            } else {
                tonic::Code::Unknown
            });
    crate::auth::count_request("rest", method, code);
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_parse() {
        assert_eq!(host_name("LocalHost:8080").as_deref(), Some("localhost"));
        assert_eq!(host_name("[::1]:8080").as_deref(), Some("::1"));
        assert_eq!(host_name("127.0.0.1").as_deref(), Some("127.0.0.1"));
        assert_eq!(
            host_name("rebind.evil.example.:80").as_deref(),
            Some("rebind.evil.example")
        );
        assert_eq!(host_name(""), None);
    }

    /// Every REST route calls a method with a declared requirement.
    #[test]
    fn every_rest_route_names_a_declared_method() {
        for (_, path, method) in ROUTES {
            assert!(
                crate::auth::requirement(method).is_some(),
                "{path} → {method}"
            );
        }
    }
}
