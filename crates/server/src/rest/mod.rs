//! The REST gateway: the same routes and JSON conventions as the original's grpc-gateway
//! (reference 1.5), implemented by transcoding each request into the gRPC request message
//! (protojson via pbjson: either field-name case accepted, unknown fields discarded, path
//! parameters override body fields) and calling the very same gRPC service implementation.
//! So both protocols share one code path and one error mapping; errors come back as
//! `{code, message, details}` with grpc-gateway's HTTP status per code.

use std::collections::HashMap;

use std::future::Future;

use agentfense_proto::v1::{
    self, codebase_service_server::CodebaseService, sandbox_service_server::SandboxService,
};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::auth::Caller;
use crate::grpc::{CodebaseApi, SandboxApi};

mod guard;
mod review;

pub use guard::{Guard, RestPeer};
pub use review::{TRUNCATED_HEADER, change_json, checkpoint_json};

/// What the REST handlers need.
#[derive(Clone, Debug)]
pub struct RestState {
    /// The codebase gRPC implementation.
    pub codebases: CodebaseApi,
    /// The sandbox gRPC implementation.
    pub sandboxes: SandboxApi,
}

/// An error response in grpc-gateway's shape.
#[derive(Debug)]
pub struct RestError(tonic::Status);

impl From<tonic::Status> for RestError {
    fn from(s: tonic::Status) -> Self {
        RestError(s)
    }
}

/// grpc-gateway's HTTP status for a gRPC code.
pub fn http_status(code: tonic::Code) -> StatusCode {
    use tonic::Code::*;
    match code {
        Ok => StatusCode::OK,
        Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        InvalidArgument | FailedPrecondition | OutOfRange => StatusCode::BAD_REQUEST,
        DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        NotFound => StatusCode::NOT_FOUND,
        AlreadyExists | Aborted => StatusCode::CONFLICT,
        PermissionDenied => StatusCode::FORBIDDEN,
        Unauthenticated => StatusCode::UNAUTHORIZED,
        ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Unknown | Internal | DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for RestError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "code": self.0.code() as i32,
            "message": self.0.message(),
            "details": [],
        });
        let mut r = (http_status(self.0.code()), axum::Json(body)).into_response();
        r.extensions_mut().insert(self.0.code());
        r
    }
}

fn bad_request(msg: String) -> RestError {
    RestError(tonic::Status::invalid_argument(msg))
}

/// [`agentfense_proto::rest::transcode`], answering 400 with its message.
fn transcode<T: DeserializeOwned>(
    body: &[u8],
    query: HashMap<String, String>,
    path: &[(&str, String)],
) -> Result<T, RestError> {
    agentfense_proto::rest::transcode(body, query, path).map_err(bad_request)
}

fn reply<T: Serialize>(
    r: Result<tonic::Response<T>, tonic::Status>,
) -> Result<Response, RestError> {
    let msg = r?.into_inner();
    Ok(axum::Json(msg).into_response())
}

type Q = Query<HashMap<String, String>>;

/// Transcodes, calls one gRPC method, and serialises its answer.
async fn call<Req, Resp, F, Fut>(
    caller: Caller,
    body: &[u8],
    query: HashMap<String, String>,
    path: &[(&str, String)],
    method: F,
) -> Result<Response, RestError>
where
    Req: DeserializeOwned,
    Resp: Serialize,
    F: FnOnce(tonic::Request<Req>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
{
    let req: Req = transcode(body, query, path)?;
    reply(method(with_caller(req, caller)).await)
}

/// A gRPC request carrying the caller the gate admitted.
fn with_caller<T>(msg: T, caller: Caller) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.extensions_mut().insert(caller);
    r
}

type S = State<RestState>;
type E = Extension<Caller>;
type Id = Path<String>;

fn none() -> HashMap<String, String> {
    HashMap::new()
}

/// Sandbox and session routes (same paths as the original's `google.api.http` annotations).
fn sandbox_routes() -> Router<RestState> {
    Router::new()
        .route(
            "/v1/sandboxes",
            get(|State(s): S, Extension(c): E, Query(q): Q| async move {
                call(c, b"", q, &[], |r| async move {
                    s.sandboxes.list_sandboxes(r).await
                })
                .await
            })
            .post(|State(s): S, Extension(c): E, body: Bytes| async move {
                call(c, &body, none(), &[], |r| async move {
                    s.sandboxes.create_sandbox(r).await
                })
                .await
            }),
        )
        .route(
            "/v1/sandboxes/{sandbox_id}",
            get(|State(s): S, Extension(c): E, Path(id): Id| async move {
                call(c, b"", none(), &[("sandbox_id", id)], |r| async move {
                    s.sandboxes.get_sandbox(r).await
                })
                .await
            })
            .delete(|State(s): S, Extension(c): E, Path(id): Id| async move {
                call(c, b"", none(), &[("sandbox_id", id)], |r| async move {
                    s.sandboxes.destroy_sandbox(r).await
                })
                .await
            }),
        )
        .route(
            "/v1/sandboxes/{sandbox_id}/start",
            post(|State(s): S, Extension(c): E, Path(id): Id| async move {
                call(c, b"", none(), &[("sandbox_id", id)], |r| async move {
                    s.sandboxes.start_sandbox(r).await
                })
                .await
            }),
        )
        .route(
            "/v1/sandboxes/{sandbox_id}/stop",
            post(|State(s): S, Extension(c): E, Path(id): Id| async move {
                call(c, b"", none(), &[("sandbox_id", id)], |r| async move {
                    s.sandboxes.stop_sandbox(r).await
                })
                .await
            }),
        )
        .route(
            "/v1/sandboxes/{sandbox_id}/exec",
            post(|State(s): S, Extension(c): E, Path(id): Id, body: Bytes| async move {
                call(c, &body, none(), &[("sandbox_id", id)], |r| async move {
                    s.sandboxes.exec(r).await
                })
                .await
            }),
        )
        .route(
            "/v1/sandboxes/{sandbox_id}/sessions",
            get(|State(s): S, Extension(c): E, Path(id): Id| async move {
                call(c, b"", none(), &[("sandbox_id", id)], |r| async move {
                    s.sandboxes.list_sessions(r).await
                })
                .await
            })
            .post(|State(s): S, Extension(c): E, Path(id): Id, body: Bytes| async move {
                call(c, &body, none(), &[("sandbox_id", id)], |r| async move {
                    s.sandboxes.create_session(r).await
                })
                .await
            }),
        )
        .route(
            "/v1/sessions/{session_id}",
            get(|State(s): S, Extension(c): E, Path(id): Id| async move {
                call(c, b"", none(), &[("session_id", id)], |r| async move {
                    s.sandboxes.get_session(r).await
                })
                .await
            })
            .delete(|State(s): S, Extension(c): E, Path(id): Id| async move {
                call(c, b"", none(), &[("session_id", id)], |r| async move {
                    s.sandboxes.destroy_session(r).await
                })
                .await
            }),
        )
        .route(
            "/v1/sessions/{session_id}/exec",
            post(|State(s): S, Extension(c): E, Path(id): Id, body: Bytes| async move {
                call(c, &body, none(), &[("session_id", id)], |r| async move {
                    s.sandboxes.session_exec(r).await
                })
                .await
            }),
        )
        // Our extension (no equivalent in the SDK's protocol): publish the pending changes of
        // a sandbox labelled agentfense.publish=manual.
        .route(
            "/v1/sandboxes/{sandbox_id}/publish",
            post(|State(s): S, Extension(c): E, Path(id): Id| async move {
                let report = s
                    .sandboxes
                    .0
                    .publish(&c, &id)
                    .await
                    .map_err(tonic::Status::from)?;
                let paths = |v: &[std::path::PathBuf]| {
                    v.iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                };
                let conflicts: Vec<String> = report
                    .conflicts
                    .iter()
                    .map(|c| c.path.display().to_string())
                    .collect();
                Ok::<_, RestError>(
                    axum::Json(serde_json::json!({
                        "written": paths(&report.written),
                        "deleted": paths(&report.deleted),
                        "conflicts": conflicts,
                        "failed": report
                            .failed
                            .iter()
                            .map(|(p, why)| format!("{}: {why}", p.display()))
                            .collect::<Vec<_>>(),
                    }))
                    .into_response(),
                )
            }),
        )
        // Our extension: a running sandbox's resource use.
        .route(
            "/v1/sandboxes/{sandbox_id}/metrics",
            get(|State(s): S, Extension(c): E, Path(id): Id| async move {
                let m = s
                    .sandboxes
                    .0
                    .sandbox_metrics(&c, &id)
                    .await
                    .map_err(tonic::Status::from)?;
                Ok::<_, RestError>(
                    axum::Json(serde_json::json!({
                        "sandboxId": m.sandbox_id,
                        "cpuUsec": m.cpu_usec,
                        "memoryBytes": m.memory_bytes,
                        "pids": m.pids,
                        "diskBytes": m.disk_bytes,
                        "diskEntries": m.disk_entries,
                        "denials": m.denials,
                    }))
                    .into_response(),
                )
            }),
        )
        // Our extension: replace a sandbox's egress policy. Body: `{"egress": "entries"}`.
        .route(
            "/v1/sandboxes/{sandbox_id}/egress",
            axum::routing::put(
                |State(s): S, Extension(c): E, Path(id): Id, body: Bytes| async move {
                    #[derive(serde::Deserialize)]
                    #[serde(deny_unknown_fields)]
                    struct Body {
                        egress: String,
                    }
                    let b: Body = serde_json::from_slice(&body)
                        .map_err(|e| bad_request(format!("body: {e}")))?;
                    s.sandboxes
                        .0
                        .set_egress(&c, &id, &b.egress)
                        .await
                        .map_err(tonic::Status::from)?;
                    Ok::<_, RestError>(
                        axum::Json(serde_json::json!({ "sandboxId": id, "egress": b.egress }))
                            .into_response(),
                    )
                },
            ),
        )
        // Our extension: a token for one sandbox (its commands and sessions only), for an
        // agent harness to hand to an agent. Body: `{"ttl": "1h"}` (optional).
        .route(
            "/v1/sandboxes/{sandbox_id}/tokens",
            post(
                |State(s): S, Extension(c): E, Path(id): Id, body: Bytes| async move {
                    #[derive(serde::Deserialize)]
                    #[serde(deny_unknown_fields)]
                    struct Body {
                        #[serde(default, with = "humantime_serde")]
                        ttl: Option<std::time::Duration>,
                    }
                    let b: Body = if body.is_empty() {
                        Body { ttl: None }
                    } else {
                        serde_json::from_slice(&body)
                            .map_err(|e| bad_request(format!("body: {e}")))?
                    };
                    let t = s
                        .sandboxes
                        .0
                        .mint_sandbox_token(&c, &id, b.ttl)
                        .await
                        .map_err(tonic::Status::from)?;
                    Ok::<_, RestError>(
                        axum::Json(serde_json::json!({
                            "token": t.token,
                            "tokenId": t.id,
                            "sandboxId": id,
                            "expiresAt": t.expires_at.map(|e| humantime::format_rfc3339_millis(e).to_string()),
                        }))
                        .into_response(),
                    )
                },
            ),
        )
}

/// `/mcp`: MCP over streamable HTTP, each request bound to the one sandbox its credentials
/// name (checked here, before the MCP layer, so that a request for no sandbox or for one the
/// caller may not see is an HTTP error).
fn mcp_route(state: &RestState) -> Router<RestState> {
    let service = state.sandboxes.0.clone();
    let mcp = agentfense_mcp::http_service(agentfense_mcp::Server::new(
        std::sync::Arc::new(crate::mcp::ServerBinder(service.clone())),
        agentfense_mcp::Toolbox::default(),
    ));
    Router::new()
        .route_service("/mcp", mcp)
        .route_layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                let service = service.clone();
                async move {
                    let Some(caller) = req.extensions().get::<Caller>().cloned() else {
                        return RestError(tonic::Status::unauthenticated("not authenticated"))
                            .into_response();
                    };
                    let id = match crate::mcp::bound_sandbox(&caller, req.uri().query()) {
                        Ok(id) => id,
                        Err(e) => return bad_request(e).into_response(),
                    };
                    if let Err(e) = service.get_sandbox(&caller, &id).await {
                        return RestError(tonic::Status::from(e)).into_response();
                    }
                    next.run(req).await
                }
            },
        ))
}

/// The REST router: every `/v1` route behind the gate (`guard::authenticate`), the whole router behind
/// the cross-site checks (Host, Origin, Content-Type).
pub fn router(state: RestState, guard: std::sync::Arc<Guard>) -> Router {
    Router::new()
        .route(
            "/v1/codebases",
            get(|State(s): S, Extension(c): E, Query(q): Q| async move {
                let req: v1::ListCodebasesRequest = transcode(b"", q, &[])?;
                reply(s.codebases.list_codebases(with_caller(req, c)).await)
            })
            .post(|State(s): S, Extension(c): E, body: Bytes| async move {
                let req: v1::CreateCodebaseRequest = transcode(&body, HashMap::new(), &[])?;
                reply(s.codebases.create_codebase(with_caller(req, c)).await)
            }),
        )
        .route(
            "/v1/codebases/{codebase_id}",
            get(
                |State(s): S, Extension(c): E, Path(id): Path<String>, Query(q): Q| async move {
                    let req: v1::GetCodebaseRequest = transcode(b"", q, &[("codebase_id", id)])?;
                    reply(s.codebases.get_codebase(with_caller(req, c)).await)
                },
            )
            .delete(
                |State(s): S, Extension(c): E, Path(id): Path<String>| async move {
                    let req: v1::DeleteCodebaseRequest =
                        transcode(b"", HashMap::new(), &[("codebase_id", id)])?;
                    reply(s.codebases.delete_codebase(with_caller(req, c)).await)
                },
            ),
        )
        .route(
            "/v1/codebases/{codebase_id}/files",
            get(
                |State(s): S, Extension(c): E, Path(id): Path<String>, Query(q): Q| async move {
                    let req: v1::ListFilesRequest = transcode(b"", q, &[("codebase_id", id)])?;
                    reply(s.codebases.list_files(with_caller(req, c)).await)
                },
            ),
        )
        .merge(sandbox_routes())
        .merge(review::routes())
        .merge(mcp_route(&state))
        .route_layer(axum::middleware::from_fn_with_state(
            guard.clone(),
            guard::authenticate,
        ))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(
            guard,
            guard::cross_site,
        ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transcoding_precedence_and_cases() {
        let req: v1::ListFilesRequest = transcode(
            br#"{"codebaseId": "from-body", "path": "src"}"#,
            HashMap::from([("recursive".into(), "true".into())]),
            &[("codebase_id", "from-path".into())],
        )
        .unwrap();
        assert_eq!(req.codebase_id, "from-path");
        assert_eq!(req.path, "src");
        assert!(req.recursive);
        let req: v1::ListCodebasesRequest = transcode(
            b"",
            HashMap::from([
                ("page_size".into(), "5".into()),
                ("ownerId".into(), "u".into()),
            ]),
            &[],
        )
        .unwrap();
        assert_eq!((req.page_size, req.owner_id.as_str()), (5, "u"));
        assert!(transcode::<v1::ListCodebasesRequest>(b"[1]", HashMap::new(), &[]).is_err());
        assert!(transcode::<v1::ListCodebasesRequest>(b"{", HashMap::new(), &[]).is_err());
    }

    #[test]
    fn status_mapping_matches_grpc_gateway() {
        assert_eq!(
            http_status(tonic::Code::InvalidArgument),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            http_status(tonic::Code::FailedPrecondition),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(http_status(tonic::Code::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(
            http_status(tonic::Code::DeadlineExceeded),
            StatusCode::GATEWAY_TIMEOUT
        );
        assert_eq!(
            http_status(tonic::Code::ResourceExhausted),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(
            http_status(tonic::Code::Unimplemented),
            StatusCode::NOT_IMPLEMENTED
        );
        assert_eq!(
            http_status(tonic::Code::Unavailable),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            http_status(tonic::Code::PermissionDenied),
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            http_status(tonic::Code::Internal),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
}
