//! The REST gateway: the same routes and JSON conventions as the original's grpc-gateway
//! (reference 1.5), implemented by transcoding each request into the gRPC request message
//! (protojson via pbjson: either field-name case accepted, unknown fields discarded, path
//! parameters override body fields) and calling the very same gRPC service implementation.
//! So both protocols share one code path and one error mapping; errors come back as
//! `{code, message, details}` with grpc-gateway's HTTP status per code.

use std::collections::HashMap;

use agentfense_proto::v1::{self, codebase_service_server::CodebaseService};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::grpc::CodebaseApi;

/// What the REST handlers need.
#[derive(Clone, Debug)]
pub struct RestState {
    /// The codebase gRPC implementation.
    pub codebases: CodebaseApi,
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
        (http_status(self.0.code()), axum::Json(body)).into_response()
    }
}

fn bad_request(msg: String) -> RestError {
    RestError(tonic::Status::invalid_argument(msg))
}

/// Builds a request message from a JSON body (may be empty), query parameters and path
/// parameters, in increasing precedence.
fn transcode<T: DeserializeOwned>(
    body: &[u8],
    query: HashMap<String, String>,
    path: &[(&str, String)],
) -> Result<T, RestError> {
    let mut obj = if body.iter().all(u8::is_ascii_whitespace) {
        Map::new()
    } else {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(m)) => m,
            Ok(_) => return Err(bad_request("request body must be a JSON object".into())),
            Err(e) => return Err(bad_request(format!("request body is not valid JSON: {e}"))),
        }
    };
    for (k, v) in query {
        let value = match v.as_str() {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => Value::String(v),
        };
        obj.insert(k, value);
    }
    for (k, v) in path {
        // A path parameter wins over the same field in either spelling.
        obj.remove(&camel(k));
        obj.insert((*k).to_owned(), Value::String(v.clone()));
    }
    serde_json::from_value(Value::Object(obj))
        .map_err(|e| bad_request(format!("invalid request: {e}")))
}

fn camel(snake: &str) -> String {
    let mut out = String::with_capacity(snake.len());
    let mut up = false;
    for c in snake.chars() {
        if c == '_' {
            up = true;
        } else if up {
            out.extend(c.to_uppercase());
            up = false;
        } else {
            out.push(c);
        }
    }
    out
}

fn reply<T: Serialize>(
    r: Result<tonic::Response<T>, tonic::Status>,
) -> Result<Response, RestError> {
    let msg = r?.into_inner();
    Ok(axum::Json(msg).into_response())
}

type Q = Query<HashMap<String, String>>;

/// The REST router (codebase routes; sandbox routes are added by [`router`]).
pub fn router(state: RestState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/v1/codebases",
            get(|State(s): State<RestState>, Query(q): Q| async move {
                let req: v1::ListCodebasesRequest = transcode(b"", q, &[])?;
                reply(s.codebases.list_codebases(tonic::Request::new(req)).await)
            })
            .post(|State(s): State<RestState>, body: Bytes| async move {
                let req: v1::CreateCodebaseRequest = transcode(&body, HashMap::new(), &[])?;
                reply(s.codebases.create_codebase(tonic::Request::new(req)).await)
            }),
        )
        .route(
            "/v1/codebases/{codebase_id}",
            get(
                |State(s): State<RestState>, Path(id): Path<String>, Query(q): Q| async move {
                    let req: v1::GetCodebaseRequest = transcode(b"", q, &[("codebase_id", id)])?;
                    reply(s.codebases.get_codebase(tonic::Request::new(req)).await)
                },
            )
            .delete(
                |State(s): State<RestState>, Path(id): Path<String>| async move {
                    let req: v1::DeleteCodebaseRequest =
                        transcode(b"", HashMap::new(), &[("codebase_id", id)])?;
                    reply(s.codebases.delete_codebase(tonic::Request::new(req)).await)
                },
            ),
        )
        .route(
            "/v1/codebases/{codebase_id}/files",
            get(
                |State(s): State<RestState>, Path(id): Path<String>, Query(q): Q| async move {
                    let req: v1::ListFilesRequest = transcode(b"", q, &[("codebase_id", id)])?;
                    reply(s.codebases.list_files(tonic::Request::new(req)).await)
                },
            ),
        )
        .with_state(state)
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
