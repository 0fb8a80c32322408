//! REST routes of `agentfense.v1.Review` (see `proto/agentfense.proto`): the same gRPC
//! implementation, with JSON in protojson's camelCase and diffs as plain `text/x-diff`.

use agentfense_proto::agentfense_v1::{self as x, review_server::Review};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{E, RestError, RestState, S, bad_request, with_caller};
use crate::grpc::ReviewApi;

/// Header set on a diff response when whole files were left out past the size cap.
pub const TRUNCATED_HEADER: &str = "x-agentfense-truncated";

/// `(key, value)` pairs of a query string, repeated keys kept (`?path=a&path=b`).
fn query_pairs(q: Option<String>) -> Vec<(String, String)> {
    form_urlencoded::parse(q.unwrap_or_default().as_bytes())
        .into_owned()
        .collect()
}

/// Query parameters as `(key, value)` pairs.
type Pairs = Vec<(String, String)>;

/// The query's repeated `path` values, and the other keys checked against `known`.
fn query(q: Option<String>, known: &[&str]) -> Result<(Vec<String>, Pairs), RestError> {
    let mut paths = Vec::new();
    let mut rest = Vec::new();
    for (k, v) in query_pairs(q) {
        match k.as_str() {
            "path" | "paths" => paths.push(v),
            k2 if known.contains(&k2) => rest.push((k, v)),
            other => return Err(bad_request(format!("unknown query parameter {other:?}"))),
        }
    }
    Ok((paths, rest))
}

fn number(rest: &[(String, String)], key: &str) -> Result<i64, RestError> {
    match rest.iter().rev().find(|(k, _)| k == key) {
        None => Ok(0),
        Some((_, v)) => v
            .parse()
            .map_err(|_| bad_request(format!("{key}={v:?}: expected a non-negative number"))),
    }
}

fn text(rest: &[(String, String)], key: &str) -> String {
    rest.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .unwrap_or_default()
}

fn body<T: for<'de> Deserialize<'de> + Default>(b: &[u8]) -> Result<T, RestError> {
    if b.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(b).map_err(|e| bad_request(format!("body: {e}")))
}

/// A change in the REST API's JSON (protojson's camelCase).
pub fn change_json(c: &x::PathChange) -> Value {
    json!({
        "path": c.path,
        "status": c.status,
        "kind": c.kind,
        "oldKind": c.old_kind,
        "size": c.size,
        "mode": c.mode,
        "oldMode": c.old_mode,
        "sha256": c.sha256,
        "baseSha256": c.base_sha256,
        "binary": c.binary,
        "baseMoved": c.base_moved,
        "hidden": c.hidden,
        "oldSize": c.old_size,
    })
}

/// A checkpoint in the REST API's JSON.
pub fn checkpoint_json(c: &x::Checkpoint) -> Value {
    json!({
        "id": c.id,
        "label": c.label,
        "createdAt": c.created_at.as_ref().map(|t| {
            let st = std::time::UNIX_EPOCH
                + std::time::Duration::new(
                    u64::try_from(t.seconds).unwrap_or(0),
                    u32::try_from(t.nanos).unwrap_or(0),
                );
            humantime::format_rfc3339_millis(st).to_string()
        }),
        "paths": c.paths,
        "bytes": c.bytes,
        "byAgent": c.by_agent,
    })
}

fn diff_response(diff: Vec<u8>, truncated: bool) -> Response {
    let mut r = ([(header::CONTENT_TYPE, "text/x-diff; charset=utf-8")], diff).into_response();
    if truncated {
        r.headers_mut()
            .insert(TRUNCATED_HEADER, header::HeaderValue::from_static("true"));
    }
    r
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PathsBody {
    #[serde(default)]
    paths: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ApplyBody {
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default)]
    expected: std::collections::BTreeMap<String, String>,
    #[serde(default, alias = "expected_content", rename = "expectedContent")]
    expected_content: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LabelBody {
    #[serde(default)]
    label: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RestoreBody {
    #[serde(default, alias = "dry_run", rename = "dryRun")]
    dry_run: bool,
}

fn api(s: &RestState) -> ReviewApi {
    ReviewApi(s.sandboxes.0.clone())
}

type Id = Path<String>;

/// The review routes.
pub(super) fn routes() -> Router<RestState> {
    Router::new()
        .route(
            "/v1/sandboxes/{sandbox_id}/changes",
            get(|State(s): S, Extension(c): E, Path(id): Id, RawQuery(q): RawQuery| async move {
                let (paths, rest) = query(q, &["limit"])?;
                let limit = i32::try_from(number(&rest, "limit")?)
                    .map_err(|_| bad_request("limit: too large".into()))?;
                let r = api(&s)
                    .list_changes(with_caller(
                        x::ListChangesRequest {
                            sandbox_id: id,
                            paths,
                            limit,
                        },
                        c,
                    ))
                    .await?
                    .into_inner();
                Ok::<_, RestError>(
                    axum::Json(json!({
                        "changes": r.changes.iter().map(change_json).collect::<Vec<_>>(),
                        "truncated": r.truncated,
                        "total": r.total,
                    }))
                    .into_response(),
                )
            }),
        )
        .route(
            "/v1/sandboxes/{sandbox_id}/diff",
            get(|State(s): S, Extension(c): E, Path(id): Id, RawQuery(q): RawQuery| async move {
                let (paths, rest) = query(q, &["max_bytes", "maxBytes"])?;
                let max_bytes = number(&rest, "max_bytes")?.max(number(&rest, "maxBytes")?);
                let r = api(&s)
                    .get_diff(with_caller(
                        x::GetDiffRequest {
                            sandbox_id: id,
                            paths,
                            max_bytes,
                        },
                        c,
                    ))
                    .await?
                    .into_inner();
                Ok::<_, RestError>(diff_response(r.diff, r.truncated))
            }),
        )
        .route(
            "/v1/sandboxes/{sandbox_id}/changes:apply",
            post(|State(s): S, Extension(c): E, Path(id): Id, b: Bytes| async move {
                let b: ApplyBody = body(&b)?;
                let r = api(&s)
                    .apply_changes(with_caller(
                        x::ApplyChangesRequest {
                            sandbox_id: id,
                            paths: b.paths,
                            expected: b.expected.into_iter().collect(),
                            expected_content: b.expected_content.into_iter().collect(),
                        },
                        c,
                    ))
                    .await?
                    .into_inner();
                Ok::<_, RestError>(
                    axum::Json(json!({
                        "written": r.written,
                        "deleted": r.deleted,
                        "failed": r.failed,
                    }))
                    .into_response(),
                )
            }),
        )
        .route(
            "/v1/sandboxes/{sandbox_id}/changes:discard",
            post(|State(s): S, Extension(c): E, Path(id): Id, b: Bytes| async move {
                let b: PathsBody = body(&b)?;
                let r = api(&s)
                    .discard_changes(with_caller(
                        x::DiscardChangesRequest {
                            sandbox_id: id,
                            paths: b.paths,
                        },
                        c,
                    ))
                    .await?
                    .into_inner();
                Ok::<_, RestError>(axum::Json(json!({ "discarded": r.discarded })).into_response())
            }),
        )
        .route(
            "/v1/sandboxes/{sandbox_id}/checkpoints",
            get(|State(s): S, Extension(c): E, Path(id): Id| async move {
                let r = api(&s)
                    .list_checkpoints(with_caller(x::ListCheckpointsRequest { sandbox_id: id }, c))
                    .await?
                    .into_inner();
                Ok::<_, RestError>(
                    axum::Json(json!({
                        "checkpoints": r.checkpoints.iter().map(checkpoint_json).collect::<Vec<_>>(),
                    }))
                    .into_response(),
                )
            })
            .post(|State(s): S, Extension(c): E, Path(id): Id, b: Bytes| async move {
                let b: LabelBody = body(&b)?;
                let r = api(&s)
                    .create_checkpoint(with_caller(
                        x::CreateCheckpointRequest {
                            sandbox_id: id,
                            label: b.label,
                        },
                        c,
                    ))
                    .await?
                    .into_inner();
                Ok::<_, RestError>(axum::Json(checkpoint_json(&r)).into_response())
            }),
        )
        // `POST .../checkpoints/{checkpoint_id}:restore`: the router cannot split a segment,
        // so the handler does.
        .route(
            "/v1/sandboxes/{sandbox_id}/checkpoints/{checkpoint_id}",
            post(
                |State(s): S, Extension(c): E, Path((id, cp)): Path<(String, String)>, b: Bytes| async move {
                    let Some(cp) = cp.strip_suffix(":restore") else {
                        return Err(RestError(tonic::Status::not_found(format!(
                            "no such action on checkpoint {cp:?}: expected {cp}:restore"
                        ))));
                    };
                    let b: RestoreBody = body(&b)?;
                    let r = api(&s)
                        .restore_checkpoint(with_caller(
                            x::RestoreCheckpointRequest {
                                sandbox_id: id,
                                checkpoint_id: cp.to_owned(),
                                dry_run: b.dry_run,
                            },
                            c,
                        ))
                        .await?
                        .into_inner();
                    Ok::<_, RestError>(
                        axum::Json(json!({
                            "changes": r.changes.iter().map(change_json).collect::<Vec<_>>(),
                            "restored": r.restored,
                        }))
                        .into_response(),
                    )
                },
            )
            .delete(
                |State(s): S, Extension(c): E, Path((id, cp)): Path<(String, String)>| async move {
                    api(&s)
                        .delete_checkpoint(with_caller(
                            x::DeleteCheckpointRequest {
                                sandbox_id: id,
                                checkpoint_id: cp,
                            },
                            c,
                        ))
                        .await?;
                    Ok::<_, RestError>(axum::Json(json!({})).into_response())
                },
            ),
        )
        .route(
            "/v1/sandboxes/{sandbox_id}/checkpoints/{checkpoint_id}/diff",
            get(
                |State(s): S,
                 Extension(c): E,
                 Path((id, cp)): Path<(String, String)>,
                 RawQuery(q): RawQuery| async move {
                    let (paths, rest) = query(q, &["to", "max_bytes", "maxBytes", "format"])?;
                    let max_bytes = number(&rest, "max_bytes")?.max(number(&rest, "maxBytes")?);
                    let format = text(&rest, "format");
                    let r = api(&s)
                        .diff_checkpoints(with_caller(
                            x::DiffCheckpointsRequest {
                                sandbox_id: id,
                                checkpoint_id: cp,
                                to: text(&rest, "to"),
                                paths,
                                max_bytes,
                            },
                            c,
                        ))
                        .await?
                        .into_inner();
                    match format.as_str() {
                        "" | "diff" => Ok::<_, RestError>(diff_response(r.diff, r.truncated)),
                        "json" => Ok(axum::Json(json!({
                            "changes": r.changes.iter().map(change_json).collect::<Vec<_>>(),
                            "diff": String::from_utf8_lossy(&r.diff),
                            "truncated": r.truncated,
                        }))
                        .into_response()),
                        other => Err(bad_request(format!(
                            "format={other:?}: expected diff or json"
                        ))),
                    }
                },
            ),
        )
}
