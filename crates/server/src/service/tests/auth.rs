//! Authentication, tenants, scopes, tokens, quotas and the REST cross-site checks, through the
//! REST router and the gRPC routes in process (the same gate a real server runs).

use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

use super::Fixture;
use crate::auth::Scope;
use crate::auth::keys::{KeyKind, generate};
use crate::store::KeyRecord;

const AUTH: &str = "auth:\n  enabled: true\n";

/// Creates a key for `tenant` with `scopes` (as `agentfense keys create` does).
fn key(f: &Fixture, tenant: &str, scopes: &[Scope], expires: Option<SystemTime>) -> String {
    let new = generate(KeyKind::Key).unwrap();
    let rec = KeyRecord {
        id: new.id.clone(),
        tenant: tenant.into(),
        scopes: scopes.iter().map(|s| s.as_str().to_owned()).collect(),
        sandbox_id: None,
        parent_id: None,
        created_at: SystemTime::now(),
        expires_at: expires,
        last_used_at: None,
        revoked_at: None,
    };
    let hash = f.svc.secret.hash(&new.secret);
    f.db(move |s| s.insert_key(&rec, &hash)).unwrap();
    new.secret
}

struct Rest {
    app: axum::Router,
}

impl Rest {
    async fn send(&self, req: Request<Body>) -> (StatusCode, Value) {
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or_default())
    }

    /// A JSON call from a well-behaved client, with `key` if any.
    async fn call(
        &self,
        key: Option<&str>,
        method: &str,
        uri: &str,
        body: &str,
    ) -> (StatusCode, Value) {
        let mut b = Request::builder()
            .method(method)
            .uri(uri)
            .header("host", "127.0.0.1:8080");
        if !body.is_empty() {
            b = b.header("content-type", "application/json");
        }
        if let Some(k) = key {
            b = b.header("authorization", format!("Bearer {k}"));
        }
        self.send(b.body(Body::from(body.to_owned())).unwrap())
            .await
    }
}

/// Creates a codebase and a running sandbox (with one session) as `key`; returns their ids.
async fn setup(rest: &Rest, key: &str) -> (String, String, String) {
    let (st, cb) = rest
        .call(
            Some(key),
            "POST",
            "/v1/codebases",
            r#"{"name": "p", "ownerId": "x"}"#,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{cb}");
    let cb = cb["id"].as_str().unwrap().to_owned();
    let body = format!(
        r#"{{"codebaseId": "{cb}", "permissions": [{{"pattern": "**/*", "permission": "PERMISSION_READ"}}]}}"#
    );
    let (st, sb) = rest.call(Some(key), "POST", "/v1/sandboxes", &body).await;
    assert_eq!(st, StatusCode::OK, "{sb}");
    let sb = sb["id"].as_str().unwrap().to_owned();
    let (st, _) = rest
        .call(Some(key), "POST", &format!("/v1/sandboxes/{sb}/start"), "")
        .await;
    assert_eq!(st, StatusCode::OK);
    let (st, sess) = rest
        .call(
            Some(key),
            "POST",
            &format!("/v1/sandboxes/{sb}/sessions"),
            "{}",
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{sess}");
    (cb, sb, sess["id"].as_str().unwrap().to_owned())
}

on_both_stores! {
    /// The attacker is a web page the developer visits: it can make the browser send a request
    /// with its own Origin, a `text/plain` body (no preflight), or, after DNS rebinding, with a
    /// Host of its own name. Each is refused before anything runs, even with auth off.
    async fn cross_site_and_rebinding_probes_run_nothing() {
        let f = Fixture::new("");
        let rest = Rest { app: f.rest() };
        let id = f.sandbox("alice", &[]).await;
        f.svc
            .start_sandbox(&crate::auth::Caller::local(), &id)
            .await
            .unwrap();
        let exec = format!("/v1/sandboxes/{id}/exec");
        let probe = |host: &str, origin: Option<&str>, ct: &str| {
            let mut b = Request::builder()
                .method("POST")
                .uri(&exec)
                .header("host", host)
                .header("content-type", ct);
            if let Some(o) = origin {
                b = b.header("origin", o);
            }
            b.body(Body::from(r#"{"command": "touch /workspace/pwned"}"#))
                .unwrap()
        };
        let cases = [
            // The issue's probe: all three at once.
            (
                probe(
                    "rebind.evil.example",
                    Some("http://evil.example"),
                    "text/plain",
                ),
                StatusCode::MISDIRECTED_REQUEST,
            ),
            (
                probe(
                    "127.0.0.1:8080",
                    Some("http://evil.example"),
                    "application/json",
                ),
                StatusCode::FORBIDDEN,
            ),
            (
                probe("127.0.0.1:8080", Some("null"), "application/json"),
                StatusCode::FORBIDDEN,
            ),
            (
                probe("rebind.evil.example:8080", None, "application/json"),
                StatusCode::MISDIRECTED_REQUEST,
            ),
            (
                probe("localhost:8080", None, "text/plain"),
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ),
            (
                probe("localhost:8080", None, "application/x-www-form-urlencoded"),
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ),
            (
                probe("localhost:8080", None, "multipart/form-data; boundary=x"),
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ),
        ];
        for (req, want) in cases {
            let (st, body) = rest.send(req).await;
            assert_eq!(st, want, "{body}");
        }
        // A body without any Content-Type is refused too.
        let req = Request::builder()
            .method("POST")
            .uri(&exec)
            .header("host", "localhost")
            .header("content-length", "40")
            .body(Body::from(r#"{"command": "touch /workspace/pwned2"}  "#))
            .unwrap();
        assert_eq!(rest.send(req).await.0, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        // A cross-site navigation without Origin (Sec-Fetch-Site) is refused.
        let req = Request::builder()
            .method("GET")
            .uri("/v1/codebases")
            .header("host", "localhost")
            .header("sec-fetch-site", "cross-site")
            .body(Body::empty())
            .unwrap();
        assert_eq!(rest.send(req).await.0, StatusCode::FORBIDDEN);
        assert_eq!(f.rt.count("exec", &id), 0, "nothing may have run");
        // The same request from a well-behaved client runs.
        let (st, out) = rest
            .call(None, "POST", &exec, r#"{"command": "true"}"#)
            .await;
        assert_eq!(
            (st, out["stdout"].as_str()),
            (StatusCode::OK, Some("ran: true"))
        );
        assert_eq!(f.rt.count("exec", &id), 1);
    }
}

on_both_stores! {
    /// Configured names and origins are accepted, with CORS headers for the origin.
    async fn configured_hosts_and_origins_are_accepted() {
        let f = Fixture::new(
            "server:\n  allowed_hosts: [agentfense.internal]\n  cors_origins: ['https://console.example']\n",
        );
        let rest = Rest { app: f.rest() };
        let req = Request::builder()
            .method("OPTIONS")
            .uri("/v1/codebases")
            .header("host", "agentfense.internal:8080")
            .header("origin", "https://console.example")
            .header("access-control-request-method", "POST")
            .body(Body::empty())
            .unwrap();
        let resp = rest.app.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
        assert_eq!(
            resp.headers()["access-control-allow-origin"],
            "https://console.example"
        );
        let req = Request::builder()
            .method("GET")
            .uri("/v1/codebases")
            .header("host", "AgentFense.Internal")
            .header("origin", "https://console.example")
            .body(Body::empty())
            .unwrap();
        let resp = rest.app.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(resp.headers().contains_key("access-control-allow-origin"));
    }
}

on_both_stores! {
    /// Tenant B can neither see nor touch anything of tenant A's, by any id, over REST or gRPC:
    /// every answer is the one an unknown id gets.
    async fn tenants_are_isolated() {
        let f = Fixture::new(AUTH);
        let rest = Rest { app: f.rest() };
        let a = key(&f, "a", &Scope::defaults(), None);
        let b = key(&f, "b", &Scope::defaults(), None);
        let (cb, sb, sess) = setup(&rest, &a).await;
        let execs_before = f.rt.count("exec", &sb);

        let probes: Vec<(&str, String, String)> = vec![
            ("GET", format!("/v1/codebases/{cb}"), String::new()),
            ("GET", format!("/v1/codebases/{cb}/files"), String::new()),
            ("DELETE", format!("/v1/codebases/{cb}"), String::new()),
            ("GET", format!("/v1/sandboxes/{sb}"), String::new()),
            (
                "POST",
                format!("/v1/sandboxes/{sb}/exec"),
                r#"{"command": "id"}"#.into(),
            ),
            ("POST", format!("/v1/sandboxes/{sb}/stop"), String::new()),
            ("POST", format!("/v1/sandboxes/{sb}/start"), String::new()),
            ("POST", format!("/v1/sandboxes/{sb}/publish"), String::new()),
            ("POST", format!("/v1/sandboxes/{sb}/tokens"), String::new()),
            ("POST", format!("/v1/sandboxes/{sb}/sessions"), "{}".into()),
            ("GET", format!("/v1/sessions/{sess}"), String::new()),
            (
                "POST",
                format!("/v1/sessions/{sess}/exec"),
                r#"{"command": "id"}"#.into(),
            ),
            ("DELETE", format!("/v1/sessions/{sess}"), String::new()),
            ("DELETE", format!("/v1/sandboxes/{sb}"), String::new()),
            (
                "POST",
                "/v1/sandboxes".into(),
                format!(
                    r#"{{"codebaseId": "{cb}", "permissions": [{{"pattern": "**", "permission": "PERMISSION_WRITE"}}]}}"#
                ),
            ),
        ];
        for (method, uri, body) in &probes {
            let (st, resp) = rest.call(Some(&b), method, uri, body).await;
            assert_eq!(st, StatusCode::NOT_FOUND, "{method} {uri}: {resp}");
            // The same answer as for an id that never existed.
            let msg = resp["message"].as_str().unwrap_or_default();
            assert!(msg.contains("not found"), "{method} {uri}: {msg}");
        }
        // Listings show only B's own (none), whatever filter B writes.
        for uri in [
            "/v1/codebases".to_owned(),
            "/v1/codebases?ownerId=a".to_owned(),
            "/v1/sandboxes".to_owned(),
            format!("/v1/sandboxes?codebaseId={cb}"),
        ] {
            let (st, resp) = rest.call(Some(&b), "GET", &uri, "").await;
            assert_eq!(st, StatusCode::OK);
            let items = resp
                .as_object()
                .unwrap()
                .values()
                .find_map(|v| v.as_array().cloned())
                .unwrap_or_default();
            assert!(items.is_empty(), "{uri}: {resp}");
        }
        let (_, resp) = rest
            .call(Some(&b), "GET", &format!("/v1/sandboxes/{sb}/sessions"), "")
            .await;
        assert!(
            resp["sessions"].as_array().is_none_or(|v| v.is_empty()),
            "{resp}"
        );
        // Nothing of A's moved.
        assert_eq!(f.rt.count("exec", &sb), execs_before);
        assert_eq!(f.rt.state(&sb), Some(true));
        let (st, _) = rest
            .call(Some(&a), "GET", &format!("/v1/sessions/{sess}"), "")
            .await;
        assert_eq!(st, StatusCode::OK);
        // A sees its own; an admin sees everyone's.
        let (_, list) = rest.call(Some(&a), "GET", "/v1/sandboxes", "").await;
        assert_eq!(list["sandboxes"].as_array().unwrap().len(), 1);
        let admin = key(&f, "ops", &[Scope::Admin], None);
        let (st, got) = rest
            .call(Some(&admin), "GET", &format!("/v1/sandboxes/{sb}"), "")
            .await;
        assert_eq!(st, StatusCode::OK, "{got}");

        // The same over gRPC, every method that takes an id of A's.
        let routes = crate::grpc::routes(f.svc.clone(), f.gate());
        let grpc = Grpc { routes };
        use agentfense_proto::v1;
        use v1::upload_chunk::{Content, Metadata};
        let cbid = || cb.clone();
        let sbid = || sb.clone();
        let calls: Vec<(&str, Vec<u8>)> = vec![
            (
                "CodebaseService/GetCodebase",
                enc(&v1::GetCodebaseRequest {
                    codebase_id: cbid(),
                }),
            ),
            (
                "CodebaseService/DeleteCodebase",
                enc(&v1::DeleteCodebaseRequest {
                    codebase_id: cbid(),
                }),
            ),
            (
                "CodebaseService/ListFiles",
                enc(&v1::ListFilesRequest {
                    codebase_id: cbid(),
                    ..Default::default()
                }),
            ),
            (
                "CodebaseService/DownloadFile",
                enc(&v1::DownloadFileRequest {
                    codebase_id: cbid(),
                    file_path: "a".into(),
                }),
            ),
            (
                "CodebaseService/UploadFiles",
                enc(&v1::UploadChunk {
                    content: Some(Content::Metadata(Metadata {
                        codebase_id: cbid(),
                        file_path: "x".into(),
                        total_size: 1,
                    })),
                }),
            ),
            (
                "SandboxService/CreateSandbox",
                enc(&v1::CreateSandboxRequest {
                    codebase_id: cbid(),
                    ..Default::default()
                }),
            ),
            (
                "SandboxService/GetSandbox",
                enc(&v1::GetSandboxRequest { sandbox_id: sbid() }),
            ),
            (
                "SandboxService/StartSandbox",
                enc(&v1::StartSandboxRequest { sandbox_id: sbid() }),
            ),
            (
                "SandboxService/StopSandbox",
                enc(&v1::StopSandboxRequest { sandbox_id: sbid() }),
            ),
            (
                "SandboxService/DestroySandbox",
                enc(&v1::DestroySandboxRequest { sandbox_id: sbid() }),
            ),
            (
                "SandboxService/Exec",
                enc(&v1::ExecRequest {
                    sandbox_id: sbid(),
                    command: "id".into(),
                    ..Default::default()
                }),
            ),
            (
                "SandboxService/ExecStream",
                enc(&v1::ExecRequest {
                    sandbox_id: sbid(),
                    command: "id".into(),
                    ..Default::default()
                }),
            ),
            (
                "SandboxService/CreateSession",
                enc(&v1::CreateSessionRequest {
                    sandbox_id: sbid(),
                    ..Default::default()
                }),
            ),
            (
                "SandboxService/GetSession",
                enc(&v1::GetSessionRequest {
                    session_id: sess.clone(),
                }),
            ),
            (
                "SandboxService/SessionExec",
                enc(&v1::SessionExecRequest {
                    session_id: sess.clone(),
                    command: "id".into(),
                    timeout: None,
                }),
            ),
            (
                "SandboxService/SessionExecStream",
                enc(&v1::SessionExecRequest {
                    session_id: sess.clone(),
                    command: "id".into(),
                    timeout: None,
                }),
            ),
            (
                "SandboxService/DestroySession",
                enc(&v1::DestroySessionRequest {
                    session_id: sess.clone(),
                }),
            ),
        ];
        for (method, body) in &calls {
            assert_eq!(
                grpc.status(method, body, &b).await.as_deref(),
                Some("5"),
                "{method}: NOT_FOUND"
            );
        }
        for method in [
            "CodebaseService/ListCodebases",
            "SandboxService/ListSandboxes",
            "SandboxService/ListSessions",
        ] {
            let body = if method.ends_with("ListSessions") {
                enc(&v1::ListSessionsRequest { sandbox_id: sbid() })
            } else {
                Vec::new()
            };
            assert_eq!(
                grpc.status(method, &body, &b).await.as_deref(),
                Some("0"),
                "{method}"
            );
        }
        assert_eq!(
            f.rt.count("exec", &sb),
            execs_before,
            "nothing ran for B over gRPC"
        );
        assert_eq!(f.rt.state(&sb), Some(true));
        let get = enc(&v1::GetSandboxRequest { sandbox_id: sbid() });
        assert_eq!(
            grpc.status("SandboxService/GetSandbox", &get, &a)
                .await
                .as_deref(),
            Some("0")
        );
        assert_eq!(
            grpc.status("SandboxService/GetSandbox", &get, "afk_nope")
                .await
                .as_deref(),
            Some("16"),
            "UNAUTHENTICATED"
        );
    }
}

fn enc<M: prost::Message>(m: &M) -> Vec<u8> {
    m.encode_to_vec()
}

/// The gRPC routes in process.
struct Grpc {
    routes: tonic::service::Routes,
}

impl Grpc {
    /// Calls `/sandbox.v1.{method}` with one framed message as `key`; the grpc-status.
    async fn status(&self, method: &str, msg: &[u8], key: &str) -> Option<String> {
        let mut framed = vec![0u8];
        framed.extend_from_slice(&u32::try_from(msg.len()).unwrap().to_be_bytes());
        framed.extend_from_slice(msg);
        let req = Request::builder()
            .method("POST")
            .uri(format!("/sandbox.v1.{method}"))
            .header("content-type", "application/grpc")
            .header("authorization", format!("Bearer {key}"))
            .body(tonic::body::Body::new(http_body_util::Full::new(
                axum::body::Bytes::from(framed),
            )))
            .unwrap();
        let resp = self.routes.clone().oneshot(req).await.unwrap();
        let headers = resp.headers().clone();
        let collected = resp.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().unwrap_or_default();
        headers
            .get("grpc-status")
            .or_else(|| trailers.get("grpc-status"))
            .map(|v| v.to_str().unwrap().to_owned())
    }
}

on_both_stores! {
    /// Missing, malformed, unknown, expired and revoked keys are UNAUTHENTICATED; a missing scope
    /// is PERMISSION_DENIED naming it; `owner_id` cannot move a codebase to another tenant.
    async fn credentials_and_scopes() {
        let f = Fixture::new(AUTH);
        let rest = Rest { app: f.rest() };
        let reader = key(&f, "a", &[Scope::CodebasesRead, Scope::SandboxesRead], None);
        let writer = key(&f, "a", &Scope::defaults(), None);
        let expired = key(
            &f,
            "a",
            &Scope::defaults(),
            Some(SystemTime::now() - Duration::from_secs(1)),
        );
        let (st, e) = rest.call(None, "GET", "/v1/codebases", "").await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{e}");
        assert!(e["message"].as_str().unwrap().contains("Bearer"), "{e}");
        // The right id with one secret digit changed (to another digit, whatever it was).
        let last = if writer.ends_with('0') { '1' } else { '0' };
        let tampered = format!("{}{last}", &writer[..writer.len() - 1]);
        for bad in ["afk_123", &tampered, &expired] {
            let (st, e) = rest.call(Some(bad), "GET", "/v1/codebases", "").await;
            assert_eq!(st, StatusCode::UNAUTHORIZED, "{bad}: {e}");
        }
        let (st, e) = rest
            .call(
                Some(&reader),
                "POST",
                "/v1/codebases",
                r#"{"name": "p", "ownerId": "b"}"#,
            )
            .await;
        assert_eq!(st, StatusCode::FORBIDDEN, "{e}");
        assert!(
            e["message"].as_str().unwrap().contains("codebases:write"),
            "{e}"
        );
        // owner_id is the tenant for a non-admin caller, whatever it wrote.
        let (st, cb) = rest
            .call(
                Some(&writer),
                "POST",
                "/v1/codebases",
                r#"{"name": "p", "ownerId": "b"}"#,
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{cb}");
        assert_eq!(cb["ownerId"], "a");
        // Health stays open, whatever name a probe uses.
        let req = Request::builder()
            .uri("/healthz")
            .header("host", "agentfense.svc.cluster.local")
            .body(Body::empty())
            .unwrap();
        assert_eq!(rest.send(req).await.0, StatusCode::OK);
        // Revoked: refused by a gate that has not cached the key (a running gate re-reads keys
        // at least twice a second; the end-to-end test covers that).
        let id = crate::auth::keys::parse_id(&writer).unwrap();
        assert!(f.db(move |s| s.revoke_key(&id, SystemTime::now())).unwrap());
        let rest = Rest { app: f.rest() };
        let (st, e) = rest.call(Some(&writer), "GET", "/v1/codebases", "").await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{e}");
        assert!(e["message"].as_str().unwrap().contains("revoked"), "{e}");
    }
}

on_both_stores! {
    /// Failed authentications are counted per source: past the limit they answer 429, while a
    /// valid key from the same source still works (no lockout of neighbours on loopback).
    async fn failed_authentications_are_rate_limited_without_locking_out_valid_keys() {
        let f = Fixture::new("auth:\n  enabled: true\n  max_failures_per_minute: 3\n");
        let rest = Rest { app: f.rest() };
        let good = key(&f, "a", &Scope::defaults(), None);
        for _ in 0..3 {
            assert_eq!(
                rest.call(Some("afk_bad"), "GET", "/v1/codebases", "")
                    .await
                    .0,
                StatusCode::UNAUTHORIZED
            );
        }
        assert_eq!(
            rest.call(Some("afk_bad"), "GET", "/v1/codebases", "")
                .await
                .0,
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(
            rest.call(None, "GET", "/v1/codebases", "").await.0,
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(
            rest.call(Some(&good), "GET", "/v1/codebases", "").await.0,
            StatusCode::OK
        );
    }
}

on_both_stores! {
    /// A sandbox token works on its sandbox's commands and sessions and nothing else, and dies
    /// with the sandbox.
    async fn sandbox_tokens_are_bound_to_one_sandbox() {
        let f = Fixture::new(AUTH);
        let rest = Rest { app: f.rest() };
        let a = key(&f, "a", &Scope::defaults(), None);
        let (cb, sb, _) = setup(&rest, &a).await;
        let (_, other, _) = setup(&rest, &a).await;
        let (st, t) = rest
            .call(
                Some(&a),
                "POST",
                &format!("/v1/sandboxes/{sb}/tokens"),
                r#"{"ttl": "1h"}"#,
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{t}");
        let token = t["token"].as_str().unwrap().to_owned();
        assert!(token.starts_with("aft_"));
        let exec = r#"{"command": "ls"}"#;
        let (st, out) = rest
            .call(
                Some(&token),
                "POST",
                &format!("/v1/sandboxes/{sb}/exec"),
                exec,
            )
            .await;
        assert_eq!(
            (st, out["stdout"].as_str()),
            (StatusCode::OK, Some("ran: ls"))
        );
        let (st, _) = rest
            .call(
                Some(&token),
                "POST",
                &format!("/v1/sandboxes/{sb}/sessions"),
                "{}",
            )
            .await;
        assert_eq!(st, StatusCode::OK);
        let (_, list) = rest.call(Some(&token), "GET", "/v1/sandboxes", "").await;
        assert_eq!(list["sandboxes"].as_array().unwrap().len(), 1, "{list}");
        // Another sandbox of the same tenant does not exist for it.
        let (st, _) = rest
            .call(
                Some(&token),
                "POST",
                &format!("/v1/sandboxes/{other}/exec"),
                exec,
            )
            .await;
        assert_eq!(st, StatusCode::NOT_FOUND);
        // Nor do codebases, lifecycle calls or more tokens.
        for (m, uri) in [
            ("GET", format!("/v1/codebases/{cb}")),
            ("GET", "/v1/codebases".to_owned()),
            ("DELETE", format!("/v1/sandboxes/{sb}")),
            ("POST", format!("/v1/sandboxes/{sb}/stop")),
            ("POST", format!("/v1/sandboxes/{sb}/tokens")),
        ] {
            let (st, e) = rest.call(Some(&token), m, &uri, "").await;
            assert_eq!(st, StatusCode::FORBIDDEN, "{m} {uri}: {e}");
        }
        // A key that may not run commands cannot mint a token that can.
        let lifecycle_only = key(&f, "a", &[Scope::SandboxesWrite], None);
        let (st, e) = rest
            .call(
                Some(&lifecycle_only),
                "POST",
                &format!("/v1/sandboxes/{other}/tokens"),
                "",
            )
            .await;
        assert_eq!(st, StatusCode::FORBIDDEN, "{e}");
        assert!(
            e["message"]
                .as_str()
                .unwrap()
                .contains("minting one needs scope"),
            "{e}"
        );
        // A token dies with the key that minted it.
        let minter = key(&f, "a", &Scope::defaults(), None);
        let (_, t2) = rest
            .call(
                Some(&minter),
                "POST",
                &format!("/v1/sandboxes/{other}/tokens"),
                "",
            )
            .await;
        let token2 = t2["token"].as_str().unwrap().to_owned();
        let on_other = format!("/v1/sandboxes/{other}/exec");
        assert_eq!(
            rest.call(Some(&token2), "POST", &on_other, exec).await.0,
            StatusCode::OK
        );
        let minter_id = crate::auth::keys::parse_id(&minter).unwrap();
        f.db(move |s| s.revoke_key(&minter_id, SystemTime::now()))
            .unwrap();
        let fresh = Rest { app: f.rest() };
        let (st, e) = fresh.call(Some(&token2), "POST", &on_other, exec).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{e}");
        assert!(
            e["message"].as_str().unwrap().contains("minted by a key"),
            "{e}"
        );
        // Destroying the sandbox deletes its tokens.
        let (st, _) = rest
            .call(Some(&a), "DELETE", &format!("/v1/sandboxes/{sb}"), "")
            .await;
        assert_eq!(st, StatusCode::OK);
        let rest = Rest { app: f.rest() };
        let (st, _) = rest
            .call(Some(&token), "GET", &format!("/v1/sandboxes/{sb}"), "")
            .await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
    }
}

on_both_stores! {
    /// Per-tenant quotas answer RESOURCE_EXHAUSTED (429) naming the quota; other tenants are
    /// unaffected.
    async fn tenant_quotas() {
        let f = Fixture::new(
            "auth:\n  enabled: true\nquotas:\n  default:\n    sandboxes: 2\n    running_sandboxes: 1\n    creations_per_hour: 3\n  tenants:\n    big: {}\n",
        );
        let rest = Rest { app: f.rest() };
        let a = key(&f, "a", &Scope::defaults(), None);
        let big = key(&f, "big", &Scope::defaults(), None);
        let (_, cb) = rest
            .call(Some(&a), "POST", "/v1/codebases", r#"{"name": "p"}"#)
            .await;
        let cb = cb["id"].as_str().unwrap().to_owned();
        let create = format!(r#"{{"codebaseId": "{cb}"}}"#);
        let (_, s1) = rest.call(Some(&a), "POST", "/v1/sandboxes", &create).await;
        let (_, s2) = rest.call(Some(&a), "POST", "/v1/sandboxes", &create).await;
        let (st, e) = rest.call(Some(&a), "POST", "/v1/sandboxes", &create).await;
        assert_eq!(st, StatusCode::TOO_MANY_REQUESTS, "{e}");
        assert!(
            e["message"].as_str().unwrap().contains("quotas.sandboxes"),
            "{e}"
        );
        let (s1, s2) = (s1["id"].as_str().unwrap(), s2["id"].as_str().unwrap());
        let (st, _) = rest
            .call(Some(&a), "POST", &format!("/v1/sandboxes/{s1}/start"), "")
            .await;
        assert_eq!(st, StatusCode::OK);
        let (st, e) = rest
            .call(Some(&a), "POST", &format!("/v1/sandboxes/{s2}/start"), "")
            .await;
        assert_eq!(st, StatusCode::TOO_MANY_REQUESTS, "{e}");
        assert!(
            e["message"]
                .as_str()
                .unwrap()
                .contains("quotas.running_sandboxes"),
            "{e}"
        );
        // Destroying frees a slot, but the hourly creation count remembers.
        rest.call(Some(&a), "DELETE", &format!("/v1/sandboxes/{s2}"), "")
            .await;
        let (st, _) = rest.call(Some(&a), "POST", "/v1/sandboxes", &create).await;
        assert_eq!(st, StatusCode::OK);
        rest.call(Some(&a), "DELETE", &format!("/v1/sandboxes/{s1}"), "")
            .await;
        let (st, e) = rest.call(Some(&a), "POST", "/v1/sandboxes", &create).await;
        assert_eq!(st, StatusCode::TOO_MANY_REQUESTS, "{e}");
        assert!(
            e["message"]
                .as_str()
                .unwrap()
                .contains("quotas.creations_per_hour"),
            "{e}"
        );
        // A tenant with its own (unlimited) quota is not held by the default.
        let (_, cb2) = rest
            .call(Some(&big), "POST", "/v1/codebases", r#"{"name": "p"}"#)
            .await;
        let create2 = format!(r#"{{"codebaseId": "{}"}}"#, cb2["id"].as_str().unwrap());
        for _ in 0..4 {
            let (st, e) = rest
                .call(Some(&big), "POST", "/v1/sandboxes", &create2)
                .await;
            assert_eq!(st, StatusCode::OK, "{e}");
        }
    }
}

on_both_stores! {
    /// Codebase bytes: an upload that would pass the tenant's quota is refused before a byte is
    /// stored.
    async fn codebase_bytes_quota() {
        let f = Fixture::new("quotas:\n  default:\n    codebase_bytes: 100\n");
        let me = crate::auth::Caller::local();
        let cb = f
            .svc
            .create_codebase(&me, "p".into(), "o".into())
            .await
            .unwrap();
        let id = cb.id.to_string();
        let mut sink = f.svc.begin_upload(&me, &id, "a.txt", 60).await.unwrap();
        sink.write(&[b'x'; 60]).unwrap();
        f.svc.commit_upload(sink).await.unwrap();
        let e = f.svc.begin_upload(&me, &id, "b.txt", 41).await.unwrap_err();
        assert!(e.to_string().contains("quotas.codebase_bytes"), "{e}");
        f.svc.begin_upload(&me, &id, "b.txt", 40).await.unwrap();
    }
}

on_both_stores! {
    /// Blocking a tenant: its keys are refused at once, and the server stops its running
    /// sandboxes (other tenants' keep running).
    async fn blocking_a_tenant_refuses_its_keys_and_stops_its_sandboxes() {
        let f = Fixture::new(AUTH);
        let rest = Rest { app: f.rest() };
        let a = key(&f, "a", &Scope::defaults(), None);
        let b = key(&f, "b", &Scope::defaults(), None);
        let (_, sa, _) = setup(&rest, &a).await;
        let (_, sb, _) = setup(&rest, &b).await;
        assert!(
            f.db(|s| s.block_tenant("a", "leaked key", SystemTime::now()))
                .unwrap()
        );
        assert_eq!(
            f.svc.enforce_blocks().await,
            1,
            "a's running sandbox stopped"
        );
        assert_eq!(f.svc.enforce_blocks().await, 0, "nothing more to stop");
        // A sandbox that comes up after the block (a request admitted just before it) is
        // stopped at the next pass.
        f.svc
            .start_sandbox(&crate::auth::Caller::local(), &sa)
            .await
            .unwrap();
        assert_eq!(f.svc.enforce_blocks().await, 1);
        assert_eq!(f.rt.state(&sa), Some(false), "a's sandbox stopped");
        assert_eq!(f.rt.state(&sb), Some(true), "b's untouched");
        let rest = Rest { app: f.rest() };
        let (st, e) = rest.call(Some(&a), "GET", "/v1/codebases", "").await;
        assert_eq!(st, StatusCode::FORBIDDEN, "{e}");
        assert!(e["message"].as_str().unwrap().contains("blocked"), "{e}");
        assert_eq!(
            rest.call(Some(&b), "GET", "/v1/codebases", "").await.0,
            StatusCode::OK
        );
    }
}
