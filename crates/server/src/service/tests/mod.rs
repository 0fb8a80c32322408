//! The sandbox lifecycle without root: every state transition, failures and their cleanup,
//! restart recovery, reaping and quotas, with a fake runtime and a fake filesystem
//! ([`fakes`]). Milliseconds each; the real runtime and filesystem have their own suites.

/// Defines a test twice, as `<name>::sqlite` and `<name>::postgres`: the service over each
/// metadata backend (a throwaway PostgreSQL cluster for the second; see [`OnPostgres`]).
/// PostgreSQL's client panics when called on an async worker, so this also checks that the
/// store calls these tests reach run on blocking threads (a panic inside a detached task, such
/// as the gate's `touch_key`, would go unseen: those calls were checked by reading).
macro_rules! on_both_stores {
    ($(#[$meta:meta])* async fn $name:ident() $body:block) => {
        $(#[$meta])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[tokio::test]
            async fn sqlite() $body

            #[tokio::test]
            async fn postgres() {
                let Some(_on) = crate::service::tests::OnPostgres::start(module_path!()) else {
                    return;
                };
                $body
            }
        }
    };
}

mod auth;
mod fakes;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use agentfense_core::{Level, PermissionRule, ResourceLimits, RuntimeKind, SandboxStatus};

use super::{CreateSandbox, Engine, ExecParams, Service};
use crate::audit::{Audit, AuditWriter};
use crate::config::{Config, Overrides};
use crate::error::ServiceError;
use crate::files::CodebaseFiles;
use crate::store::{PgStore, SqliteStore, Store};
use agentfense_testsupport::postgres::Postgres;
use fakes::{FakeMounter, FakeRuntime};

thread_local! {
    /// The cluster `Fixture::new` makes its database in, while an [`OnPostgres`] lives on
    /// this (the test's) thread.
    static POSTGRES: std::cell::RefCell<Option<Arc<Postgres>>> = const { std::cell::RefCell::new(None) };
}

/// While alive, fixtures made on this thread keep their metadata in a new database of a
/// throwaway PostgreSQL cluster instead of an in-memory SQLite.
struct OnPostgres;

impl OnPostgres {
    fn start(test: &str) -> Option<OnPostgres> {
        let pg = Arc::new(Postgres::start(test)?);
        POSTGRES.with(|p| *p.borrow_mut() = Some(pg));
        Some(OnPostgres)
    }
}

impl Drop for OnPostgres {
    fn drop(&mut self) {
        POSTGRES.with(|p| p.borrow_mut().take());
    }
}

/// A service over a temporary data directory, an in-memory store, and the fakes.
struct Fixture {
    svc: Arc<Service>,
    rt: Arc<FakeRuntime>,
    fs: Arc<FakeMounter>,
    store: Arc<dyn Store>,
    dir: tempfile::TempDir,
    _writer: AuditWriter,
    /// The cluster holding `store`, if it is PostgreSQL: kept up as long as the fixture.
    pg: Option<Arc<Postgres>>,
}

impl Fixture {
    fn new(config_yaml: &str) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let pg = POSTGRES.with(|p| p.borrow().clone());
        let store: Arc<dyn Store> = match &pg {
            // Connecting blocks: off the test's runtime thread.
            Some(pg) => {
                let url = pg.database();
                let connect = || PgStore::connect(&url, None).unwrap();
                Arc::new(std::thread::scope(|s| s.spawn(connect).join().unwrap()))
            }
            None => Arc::new(SqliteStore::open_in_memory().unwrap()),
        };
        Fixture::with(config_yaml, dir, store, pg)
    }

    /// Runs `f` on the store from a plain thread, as the service's blocking threads do.
    fn db<T: Send>(&self, f: impl FnOnce(&dyn Store) -> T + Send) -> T {
        let store = self.store.clone();
        std::thread::scope(|s| s.spawn(move || f(&*store)).join().unwrap())
    }

    fn with(
        config_yaml: &str,
        dir: tempfile::TempDir,
        store: Arc<dyn Store>,
        pg: Option<Arc<Postgres>>,
    ) -> Fixture {
        let settings = Config::from_yaml(config_yaml, Path::new("test.yaml"))
            .unwrap()
            .resolve(
                Overrides {
                    data_dir: Some(dir.path().to_owned()),
                    ..Overrides::default()
                },
                dir.path(),
            )
            .unwrap();
        let files = CodebaseFiles::open(&dir.path().join("codebases")).unwrap();
        let (audit, writer) = Audit::open(&dir.path().join("audit.jsonl")).unwrap();
        let rt = Arc::new(FakeRuntime::default());
        let fs = Arc::new(FakeMounter::default());
        let mut engine = Engine::default();
        engine.mounter = fs.clone();
        engine.runtimes.insert(RuntimeKind::Bwrap, rt.clone());
        let svc = Arc::new(Service::new(settings, store.clone(), files, audit, engine));
        Fixture {
            svc,
            rt,
            fs,
            store,
            dir,
            _writer: writer,
            pg,
        }
    }

    /// The gate over this fixture's store, with its `auth` config.
    fn gate(&self) -> Arc<crate::auth::Gate> {
        Arc::new(
            crate::auth::Gate::new(
                self.store.clone(),
                self.svc.secret.clone(),
                self.svc.settings.config.auth.clone(),
                self.svc.audit.clone(),
            )
            .unwrap(),
        )
    }

    /// The REST router over this fixture, behind its gate.
    fn rest(&self) -> axum::Router {
        crate::rest::router(
            crate::rest::RestState {
                codebases: crate::grpc::CodebaseApi(self.svc.clone()),
                sandboxes: crate::grpc::SandboxApi(self.svc.clone()),
            },
            Arc::new(crate::rest::Guard {
                gate: self.gate(),
                allowed_hosts: self.svc.settings.config.server.allowed_hosts.clone(),
                cors_origins: self.svc.settings.config.server.cors_origins.clone(),
            }),
        )
    }

    /// The same data directory and store, as a restarted server sees them.
    fn restart(self) -> Fixture {
        let Fixture { dir, store, pg, .. } = self;
        Fixture::with("", dir, store, pg)
    }

    async fn sandbox(&self, owner: &str, labels: &[(&str, &str)]) -> String {
        let cb = self
            .svc
            .create_codebase(
                &crate::auth::Caller::local(),
                "project".into(),
                owner.into(),
            )
            .await
            .unwrap();
        self.svc
            .create_sandbox(
                &crate::auth::Caller::local(),
                CreateSandbox {
                    labels: labels
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect::<BTreeMap<_, _>>(),
                    ..create(
                        &cb.id.to_string(),
                        vec![PermissionRule::glob("**/*", Level::Read, 0)],
                    )
                },
            )
            .await
            .unwrap()
            .id
            .to_string()
    }

    async fn status(&self, id: &str) -> SandboxStatus {
        self.svc
            .get_sandbox(&crate::auth::Caller::local(), id)
            .await
            .unwrap()
            .status
    }

    async fn exec(&self, id: &str, command: &str) -> Result<String, ServiceError> {
        self.svc
            .exec(
                &crate::auth::Caller::local(),
                id,
                ExecParams {
                    command: command.into(),
                    ..ExecParams::default()
                },
            )
            .await
            .map(|o| o.stdout)
    }
}

/// A CreateSandbox request for codebase `cb` with `rules`; the rest defaulted.
fn create(cb: &str, rules: Vec<PermissionRule>) -> CreateSandbox {
    CreateSandbox {
        codebase_id: cb.to_owned(),
        rules,
        expires_in: None,
        labels: BTreeMap::new(),
        runtime: None,
        image: String::new(),
        resources: ResourceLimits::default(),
    }
}

fn is_not_found(e: &ServiceError) -> bool {
    matches!(e, ServiceError::NotFound(_))
}

fn is_precondition(e: &ServiceError) -> bool {
    matches!(e, ServiceError::FailedPrecondition(_))
}

on_both_stores! {
    async fn create_start_exec_stop_start_destroy() {
        let f = Fixture::new("");
        let id = f.sandbox("alice", &[]).await;
        assert_eq!(f.status(&id).await, SandboxStatus::Pending);
        assert!(is_precondition(&f.exec(&id, "ls").await.unwrap_err()));

        f.svc
            .start_sandbox(&crate::auth::Caller::local(), &id)
            .await
            .unwrap();
        assert_eq!(f.status(&id).await, SandboxStatus::Running);
        assert_eq!(f.fs.live(), vec![id.clone()]);
        assert_eq!(f.rt.state(&id), Some(true));
        // Starting a running sandbox is refused.
        assert!(is_precondition(
            &f.svc
                .start_sandbox(&crate::auth::Caller::local(), &id)
                .await
                .unwrap_err()
        ));

        // A command runs and its writes are published after it (publish-after-each mode).
        assert_eq!(f.exec(&id, "ls").await.unwrap(), "ran: ls");
        assert_eq!(f.fs.publishes.load(Ordering::SeqCst), 1);

        f.svc
            .stop_sandbox(&crate::auth::Caller::local(), &id)
            .await
            .unwrap();
        assert_eq!(f.status(&id).await, SandboxStatus::Stopped);
        assert!(f.fs.live().is_empty(), "stop unmounts");
        assert_eq!(f.rt.state(&id), Some(false));
        assert!(is_precondition(&f.exec(&id, "ls").await.unwrap_err()));

        f.svc
            .start_sandbox(&crate::auth::Caller::local(), &id)
            .await
            .unwrap();
        assert_eq!(f.status(&id).await, SandboxStatus::Running);
        assert_eq!(f.rt.count("start", &id), 2);

        f.svc
            .destroy_sandbox(&crate::auth::Caller::local(), &id)
            .await
            .unwrap();
        assert!(is_not_found(
            &f.svc
                .get_sandbox(&crate::auth::Caller::local(), &id)
                .await
                .unwrap_err()
        ));
        assert!(f.fs.live().is_empty());
        assert_eq!(f.rt.state(&id), None);
        // Destroying again, or anything on the id, is NOT_FOUND.
        assert!(is_not_found(
            &f.svc
                .destroy_sandbox(&crate::auth::Caller::local(), &id)
                .await
                .unwrap_err()
        ));
        assert!(is_not_found(
            &f.svc
                .start_sandbox(&crate::auth::Caller::local(), &id)
                .await
                .unwrap_err()
        ));
    }
}

on_both_stores! {
    async fn manual_publish_publishes_only_when_asked() {
        let f = Fixture::new("");
        let id = f
            .sandbox("alice", &[(crate::service::LABEL_PUBLISH, "manual")])
            .await;
        f.svc
            .start_sandbox(&crate::auth::Caller::local(), &id)
            .await
            .unwrap();
        f.exec(&id, "make").await.unwrap();
        assert_eq!(f.fs.publishes.load(Ordering::SeqCst), 0);
        f.svc
            .publish(&crate::auth::Caller::local(), &id)
            .await
            .unwrap();
        assert_eq!(f.fs.publishes.load(Ordering::SeqCst), 1);
    }
}

on_both_stores! {
    async fn a_failed_start_is_an_error_state_and_leaves_nothing_running() {
        let f = Fixture::new("");
        let id = f.sandbox("alice", &[]).await;
        f.rt.fail_start.store(true, Ordering::SeqCst);
        f.svc
            .start_sandbox(&crate::auth::Caller::local(), &id)
            .await
            .unwrap_err();
        let rec = f
            .svc
            .get_sandbox(&crate::auth::Caller::local(), &id)
            .await
            .unwrap();
        assert_eq!(rec.status, SandboxStatus::Error);
        assert!(
            rec.status_reason.as_deref().unwrap_or("").contains("fake"),
            "{rec:?}"
        );
        assert!(f.fs.live().is_empty(), "the mount is undone");
        assert_eq!(f.rt.state(&id), None, "the runtime's sandbox is destroyed");
        // ERROR → RUNNING once the cause is gone.
        f.rt.fail_start.store(false, Ordering::SeqCst);
        f.svc
            .start_sandbox(&crate::auth::Caller::local(), &id)
            .await
            .unwrap();
        assert_eq!(f.status(&id).await, SandboxStatus::Running);
    }
}

on_both_stores! {
    async fn a_failed_mount_starts_nothing() {
        let f = Fixture::new("");
        let id = f.sandbox("alice", &[]).await;
        f.fs.fail.store(true, Ordering::SeqCst);
        f.svc
            .start_sandbox(&crate::auth::Caller::local(), &id)
            .await
            .unwrap_err();
        assert_eq!(f.status(&id).await, SandboxStatus::Error);
        assert_eq!(f.rt.count("start", &id), 0);
        assert_eq!(f.rt.state(&id), None);
    }
}

on_both_stores! {
    async fn a_restart_brings_running_sandboxes_back_and_leaves_stopped_ones() {
        let f = Fixture::new("");
        let running = f.sandbox("alice", &[]).await;
        let stopped = f.sandbox("alice", &[]).await;
        f.svc
            .start_sandbox(&crate::auth::Caller::local(), &running)
            .await
            .unwrap();
        // A server that died with a sandbox running: the store still says RUNNING.
        let f = f.restart();
        assert!(f.fs.live().is_empty());
        f.svc.recover().await;
        assert_eq!(f.fs.live(), vec![running.clone()]);
        assert_eq!(f.status(&running).await, SandboxStatus::Running);
        assert_eq!(f.status(&stopped).await, SandboxStatus::Pending);
        assert_eq!(f.exec(&running, "pwd").await.unwrap(), "ran: pwd");
    }
}

on_both_stores! {
    async fn expired_sandboxes_are_reaped_and_others_kept() {
        let f = Fixture::new("");
        let keep = f.sandbox("alice", &[]).await;
        let cb = f
            .svc
            .create_codebase(&crate::auth::Caller::local(), "p".into(), "alice".into())
            .await
            .unwrap();
        let gone = f
            .svc
            .create_sandbox(
                &crate::auth::Caller::local(),
                CreateSandbox {
                    expires_in: Some(Duration::from_nanos(1)),
                    ..create(&cb.id.to_string(), vec![])
                },
            )
            .await
            .unwrap()
            .id
            .to_string();
        f.svc
            .start_sandbox(&crate::auth::Caller::local(), &gone)
            .await
            .unwrap();
        assert_eq!(f.svc.reap_expired().await, 1);
        assert!(is_not_found(
            &f.svc
                .get_sandbox(&crate::auth::Caller::local(), &gone)
                .await
                .unwrap_err()
        ));
        assert_eq!(f.rt.state(&gone), None);
        assert!(f.fs.live().is_empty());
        assert_eq!(f.status(&keep).await, SandboxStatus::Pending);
    }
}

on_both_stores! {
    async fn the_per_owner_quota_counts_live_sandboxes() {
        let f = Fixture::new("sandbox:\n  max_per_user: 1\n");
        let first = f.sandbox("alice", &[]).await;
        let cb = f
            .svc
            .create_codebase(&crate::auth::Caller::local(), "p".into(), "alice".into())
            .await
            .unwrap();
        let req = || create(&cb.id.to_string(), vec![]);
        let e = f
            .svc
            .create_sandbox(&crate::auth::Caller::local(), req())
            .await
            .unwrap_err();
        assert!(matches!(e, ServiceError::ResourceExhausted(_)), "{e:?}");
        // Another owner is not affected; destroying frees the slot.
        f.sandbox("bob", &[]).await;
        f.svc
            .destroy_sandbox(&crate::auth::Caller::local(), &first)
            .await
            .unwrap();
        f.svc
            .create_sandbox(&crate::auth::Caller::local(), req())
            .await
            .unwrap();
    }
}

on_both_stores! {
    async fn requests_name_what_is_wrong() {
        let f = Fixture::new("");
        // Unknown ids of any shape are NOT_FOUND; a missing one is INVALID_ARGUMENT.
        for id in ["sb_nope", "nope", "sb_0123456789abcdef", "../x"] {
            let e = f
                .svc
                .get_sandbox(&crate::auth::Caller::local(), id)
                .await
                .unwrap_err();
            assert!(is_not_found(&e), "{id:?}: {e:?}");
        }
        let e = f
            .svc
            .get_sandbox(&crate::auth::Caller::local(), "")
            .await
            .unwrap_err();
        assert!(matches!(e, ServiceError::InvalidArgument(_)), "{e:?}");
        // A runtime the server lacks is FAILED_PRECONDITION naming what it has.
        let cb = f
            .svc
            .create_codebase(&crate::auth::Caller::local(), "p".into(), "alice".into())
            .await
            .unwrap();
        let e = f
            .svc
            .create_sandbox(
                &crate::auth::Caller::local(),
                CreateSandbox {
                    runtime: Some(RuntimeKind::Docker),
                    ..create(&cb.id.to_string(), vec![])
                },
            )
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ServiceError::FailedPrecondition(m) if m.contains("available: bwrap")),
            "{e:?}"
        );
        // A bad pattern is INVALID_ARGUMENT at create, not a failed start later.
        let e = f
            .svc
            .create_sandbox(
                &crate::auth::Caller::local(),
                create(
                    &cb.id.to_string(),
                    vec![PermissionRule::glob("a/**.md", Level::Read, 0)],
                ),
            )
            .await
            .unwrap_err();
        assert!(matches!(e, ServiceError::InvalidArgument(_)), "{e:?}");
    }
}

on_both_stores! {
    /// The REST router, driven in process over the same fakes: create, start, exec, errors.
    async fn the_rest_router_drives_the_lifecycle_in_process() {
        use axum::body::Body;
        use axum::http::{Request, StatusCode};
        use http_body_util::BodyExt;
        use tower::ServiceExt;

        let f = Fixture::new("");
        let app = f.rest();
        let call = |method: &str, uri: String, body: &str| {
            let app = app.clone();
            let req = Request::builder()
                .method(method)
                .uri(uri)
                .header("host", "localhost:8080")
                .header("content-type", "application/json")
                .body(Body::from(body.to_owned()))
                .unwrap();
            async move {
                let resp = app.oneshot(req).await.unwrap();
                let status = resp.status();
                let bytes = resp.into_body().collect().await.unwrap().to_bytes();
                let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
                (status, json)
            }
        };
        let (st, cb) = call(
            "POST",
            "/v1/codebases".into(),
            r#"{"name": "p", "ownerId": "alice"}"#,
        )
        .await;
        assert_eq!(st, StatusCode::OK, "{cb}");
        let body = format!(
            r#"{{"codebaseId": "{}", "permissions": [{{"pattern": "**/*", "permission": "PERMISSION_READ"}}]}}"#,
            cb["id"].as_str().unwrap()
        );
        let (st, sb) = call("POST", "/v1/sandboxes".into(), &body).await;
        assert_eq!(st, StatusCode::OK, "{sb}");
        let id = sb["id"].as_str().unwrap().to_owned();
        let (st, _) = call("POST", format!("/v1/sandboxes/{id}/start"), "").await;
        assert_eq!(st, StatusCode::OK);
        let (st, out) = call(
            "POST",
            format!("/v1/sandboxes/{id}/exec"),
            r#"{"command": "ls"}"#,
        )
        .await;
        assert_eq!(
            (st, out["stdout"].as_str()),
            (StatusCode::OK, Some("ran: ls"))
        );
        let (st, err) = call("GET", "/v1/sandboxes/sb_nope".into(), "").await;
        assert_eq!(st, StatusCode::NOT_FOUND, "{err}");
        let (st, err) = call("POST", "/v1/sandboxes".into(), "{").await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{err}");
        assert!(
            err["message"].as_str().unwrap().contains("not valid JSON"),
            "{err}"
        );
    }
}

on_both_stores! {
    /// The gRPC routes, driven in process: a framed request in, a status out.
    async fn the_grpc_routes_answer_in_process() {
        use axum::http::Request;
        use http_body_util::BodyExt;
        use prost::Message;
        use tower::ServiceExt;

        let f = Fixture::new("");
        let id = f.sandbox("alice", &[]).await;
        let routes = crate::grpc::routes(f.svc.clone(), f.gate());
        let frame = |msg: &agentfense_proto::v1::GetSandboxRequest| {
            let body = msg.encode_to_vec();
            let mut framed = vec![0u8];
            framed.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
            framed.extend_from_slice(&body);
            framed
        };
        let get = |sandbox_id: String| {
            let routes = routes.clone();
            let req = Request::builder()
                .method("POST")
                .uri("/sandbox.v1.SandboxService/GetSandbox")
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(tonic::body::Body::new(http_body_util::Full::new(
                    axum::body::Bytes::from(frame(&agentfense_proto::v1::GetSandboxRequest {
                        sandbox_id,
                    })),
                )))
                .unwrap();
            async move {
                let resp = routes.oneshot(req).await.unwrap();
                let headers = resp.headers().clone();
                let collected = resp.into_body().collect().await.unwrap();
                let trailers = collected.trailers().cloned().unwrap_or_default();
                let status = headers
                    .get("grpc-status")
                    .or_else(|| trailers.get("grpc-status"))
                    .map(|v| v.to_str().unwrap().to_owned());
                let bytes = collected.to_bytes();
                let msg = (bytes.len() > 5)
                    .then(|| agentfense_proto::v1::Sandbox::decode(&bytes[5..]).unwrap());
                (status, msg)
            }
        };
        let (status, msg) = get(id.clone()).await;
        assert_eq!(status.as_deref(), Some("0"));
        assert_eq!(msg.unwrap().id, id);
        let (status, _) = get("sb_nope".into()).await;
        assert_eq!(status.as_deref(), Some("5"), "NOT_FOUND");
    }
}

on_both_stores! {
    /// `agentfense nodes drain`: no new sandboxes on the node, with a message saying why and
    /// how to lift it; its sandboxes keep working; undraining lets creations in again.
    async fn a_draining_node_takes_no_new_sandboxes() {
        let f = Fixture::new("");
        let node = crate::store::NodeRecord {
            id: "local".into(),
            host: "h".into(),
            boot_id: "b".into(),
            cpus: 2,
            memory_bytes: 1 << 30,
            draining: false,
            registered_at: std::time::SystemTime::now(),
            lost_at: None,
            heartbeat_at: std::time::SystemTime::now(),
        };
        f.db(move |s| s.register_node(&node)).unwrap();
        let running = f.sandbox("alice", &[]).await;
        f.svc
            .start_sandbox(&crate::auth::Caller::local(), &running)
            .await
            .unwrap();
        assert!(f.db(|s| s.set_node_draining("local", true)).unwrap());
        let cb = f
            .svc
            .create_codebase(&crate::auth::Caller::local(), "p".into(), "alice".into())
            .await
            .unwrap();
        let err = f
            .svc
            .create_sandbox(&crate::auth::Caller::local(), create(&cb.id.to_string(), vec![]))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ServiceError::Unavailable(m) if m.contains("draining") && m.contains("undrain")),
            "{err:?}"
        );
        assert_eq!(f.exec(&running, "pwd").await.unwrap(), "ran: pwd");
        assert!(f.db(|s| s.set_node_draining("local", false)).unwrap());
        f.svc
            .create_sandbox(&crate::auth::Caller::local(), create(&cb.id.to_string(), vec![]))
            .await
            .unwrap();
    }
}

on_both_stores! {
    /// At startup a server runs only its own node's sandboxes. One of another node is left
    /// alone (its record untouched), and starting, running or reviewing it here is refused
    /// saying where it lives: never run with an empty delta. One made before nodes existed
    /// is taken over when nothing is lost (its delta is here, or it never ran), else refused
    /// the same way.
    async fn sandboxes_of_another_node_are_never_run_here() {
        let f = Fixture::new("");
        let mut ids = vec![];
        for _ in 0..5 {
            ids.push(f.sandbox("alice", &[]).await);
        }
        let [foreign, foreign_unrun, legacy_here, legacy_gone, legacy_unrun] =
            [&ids[0], &ids[1], &ids[2], &ids[3], &ids[4]];
        for id in [foreign, legacy_here, legacy_gone] {
            f.svc
                .start_sandbox(&crate::auth::Caller::local(), id)
                .await
                .unwrap();
        }
        let sid = |id: &str| crate::ids::SandboxId::parse(id).unwrap();
        for (id, node) in [
            (foreign, "elsewhere"),
            (foreign_unrun, "elsewhere"),
            (legacy_here, ""),
            (legacy_gone, ""),
            (legacy_unrun, ""),
        ] {
            let (id, node) = (sid(id), node.to_owned());
            f.db(move |s| s.set_sandbox_node(&id, &node)).unwrap();
        }
        // The fake mounter makes no directories: the delta that is here is made by hand.
        std::fs::create_dir_all(f.dir.path().join("mounts/delta").join(legacy_here.as_str()))
            .unwrap();
        let f = f.restart();
        f.svc.recover().await;
        assert_eq!(f.fs.live(), vec![legacy_here.clone()], "only what is here runs");
        let node_of = |id: &str| {
            let id = sid(id);
            f.db(move |s| s.get_sandbox(&id)).unwrap().unwrap().node
        };
        assert_eq!(node_of(foreign), "elsewhere");
        assert_eq!(f.status(foreign).await, SandboxStatus::Running, "record untouched");
        assert_eq!(node_of(foreign_unrun), "elsewhere");
        assert_eq!(node_of(legacy_here), "local");
        assert_eq!(node_of(legacy_unrun), "local");
        assert_eq!(node_of(legacy_gone), "");
        let caller = crate::auth::Caller::local();
        for (id, says) in [
            (foreign, "lives on node elsewhere"),
            (foreign_unrun, "lives on node elsewhere"),
            (legacy_gone, "made before nodes"),
        ] {
            let err = f.svc.stop_sandbox(&caller, id).await.unwrap_err();
            assert!(
                matches!(&err, ServiceError::FailedPrecondition(m) if m.contains(says)),
                "{id}: {err:?}"
            );
            let err = f.svc.start_sandbox(&caller, id).await.unwrap_err();
            assert!(
                matches!(&err, ServiceError::FailedPrecondition(m) if m.contains(says)),
                "{id}: {err:?}"
            );
            let err = f.exec(id, "true").await.unwrap_err();
            assert!(
                matches!(&err, ServiceError::FailedPrecondition(m) if m.contains(says)),
                "{id}: {err:?}"
            );
        }
        // What is this node's works; another node's can still be destroyed.
        f.svc.start_sandbox(&caller, legacy_unrun).await.unwrap();
        f.svc.destroy_sandbox(&caller, foreign).await.unwrap();
        assert_eq!(f.exec(legacy_here, "pwd").await.unwrap(), "ran: pwd");
    }
}

/// A node registered long ago that has sent no heartbeat since.
fn silent_node(id: &str) -> crate::store::NodeRecord {
    crate::store::NodeRecord {
        id: id.into(),
        host: format!("host-{id}"),
        boot_id: "b".into(),
        cpus: 2,
        memory_bytes: 1 << 30,
        draining: false,
        registered_at: std::time::UNIX_EPOCH,
        heartbeat_at: std::time::UNIX_EPOCH,
        lost_at: None,
    }
}

on_both_stores! {
    /// A node silent for `nodes.lost_after` is declared lost by the server: its sandboxes are
    /// in ERROR saying why, cannot be started, run or reviewed anywhere, and can be destroyed;
    /// one that never started there moves to this node and works. Nodes that beat are kept.
    async fn a_silent_node_is_lost_with_its_sandboxes() {
        let f = Fixture::new("");
        let caller = crate::auth::Caller::local();
        let (ran, unrun) = (f.sandbox("alice", &[]).await, f.sandbox("alice", &[]).await);
        f.svc.start_sandbox(&caller, &ran).await.unwrap();
        f.svc.stop_sandbox(&caller, &ran).await.unwrap();
        f.db(|s| s.register_node(&silent_node("gone"))).unwrap();
        f.db(|s| s.register_node(&silent_node("alive"))).unwrap();
        f.db(|s| s.heartbeat_node("alive", "b")).unwrap();
        let sid = |id: &str| crate::ids::SandboxId::parse(id).unwrap();
        for id in [&ran, &unrun] {
            let id = sid(id);
            f.db(move |s| s.set_sandbox_node(&id, "gone")).unwrap();
        }
        if !f.store.shared() {
            // An SQLite file has no other live node: nothing is ever declared lost there.
            assert_eq!(f.svc.mark_lost_nodes().await, 0);
            return;
        }
        // Only while this server holds its claim.
        assert_eq!(f.svc.mark_lost_nodes().await, 0);
        assert!(f.db(|s| s.try_lease(crate::store::SERVER_LEASE, "local", Duration::from_secs(60))).unwrap());
        assert_eq!(f.svc.mark_lost_nodes().await, 1);
        assert_eq!(f.svc.mark_lost_nodes().await, 0, "once");
        let rec = f.svc.get_sandbox(&caller, &ran).await.unwrap();
        assert_eq!(rec.status, SandboxStatus::Error);
        let reason = rec.status_reason.clone().unwrap();
        assert!(reason.contains("lost with its node gone on host host-gone"), "{reason}");
        for err in [
            f.svc.start_sandbox(&caller, &ran).await.unwrap_err(),
            f.exec(&ran, "true").await.unwrap_err(),
            f.svc.list_changes(&caller, &ran, vec![], 0).await.unwrap_err(),
        ] {
            assert!(
                matches!(&err, ServiceError::FailedPrecondition(m) if m.contains("lost with its node gone")),
                "{err:?}"
            );
        }
        assert!(f.db(|s| s.get_node("alive")).unwrap().unwrap().lost_at.is_none());
        // Nothing of the one that never ran was lost: it is this node's now.
        f.svc.start_sandbox(&caller, &unrun).await.unwrap();
        assert_eq!(f.exec(&unrun, "pwd").await.unwrap(), "ran: pwd");
        f.svc.destroy_sandbox(&caller, &ran).await.unwrap();
    }
}

on_both_stores! {
    /// A server whose node was declared lost while it was away starts again as a fresh node:
    /// the lost sandboxes' leftovers in its data directory are discarded, never run again.
    async fn a_node_back_from_lost_discards_what_it_held() {
        let f = Fixture::new("");
        let caller = crate::auth::Caller::local();
        let id = f.sandbox("alice", &[]).await;
        f.svc.start_sandbox(&caller, &id).await.unwrap();
        // The fake mounter makes no directories: the delta left behind is made by hand.
        let delta = f.dir.path().join("mounts/delta").join(&id);
        std::fs::create_dir_all(delta.join("src")).unwrap();
        f.db(|s| s.register_node(&silent_node("local"))).unwrap();
        assert!(f.db(|s| s.try_lease(crate::store::SERVER_LEASE, "another", Duration::from_secs(60))).unwrap());
        let lost = f
            .db(|s| s.mark_lost_nodes(Duration::from_secs(60), "another", "another"))
            .unwrap();
        assert_eq!(lost.len(), 1);
        // Until it stops, the stale server makes no new sandboxes either.
        let cb = f.svc.create_codebase(&caller, "p".into(), "alice".into()).await.unwrap();
        let err = f
            .svc
            .create_sandbox(&caller, create(&cb.id.to_string(), vec![]))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ServiceError::Unavailable(m) if m.contains("declared lost")),
            "{err:?}"
        );
        let f = f.restart();
        f.db(|s| s.register_node(&silent_node("local"))).unwrap();
        f.svc.recover().await;
        assert!(f.fs.live().is_empty(), "nothing lost runs again");
        assert!(!delta.exists(), "its delta is moved aside");
        assert!(
            f.dir.path().join("mounts/lost").join(&id).join("src").is_dir(),
            "kept for salvage"
        );
        assert_eq!(f.status(&id).await, SandboxStatus::Error);
        let err = f.svc.start_sandbox(&caller, &id).await.unwrap_err();
        assert!(
            matches!(&err, ServiceError::FailedPrecondition(m) if m.contains("lost")),
            "{err:?}"
        );
        // Destroying it removes what was kept of it too.
        f.svc.destroy_sandbox(&caller, &id).await.unwrap();
        assert!(!f.dir.path().join("mounts/lost").join(&id).exists());
    }
}

on_both_stores! {
    /// The database's answer does not latch: a server whose claim merely expired (the machine
    /// slept) publishes nothing until its claim is renewed, then publishes again.
    async fn a_server_without_its_claim_publishes_once_it_has_it_again() {
        let mut f = Fixture::new("");
        let fence = crate::service::Fence::new(Some(Duration::from_secs(3600)), "me@boot:/d".into());
        Arc::get_mut(&mut f.svc).unwrap().fence = Some(Arc::new(fence));
        let caller = crate::auth::Caller::local();
        let id = f.sandbox("alice", &[]).await;
        f.svc.start_sandbox(&caller, &id).await.unwrap();
        let err = f.exec(&id, "make").await.unwrap_err();
        assert!(
            crate::error::chain(&err).contains("does not hold its claim"),
            "{}",
            crate::error::chain(&err)
        );
        assert_eq!(f.fs.publishes.load(Ordering::SeqCst), 0);
        assert!(f.db(|s| s.try_lease(crate::store::SERVER_LEASE, "me@boot:/d", Duration::from_secs(60))).unwrap());
        assert_eq!(f.exec(&id, "make").await.unwrap(), "ran: make");
        assert_eq!(f.fs.publishes.load(Ordering::SeqCst), 1);
    }
}

on_both_stores! {
    /// Publishing checks the claim's fence just before writing: a server that was lost, or
    /// has not renewed its claim in time, publishes nothing (a paused server resuming with a
    /// request in flight).
    async fn a_fenced_server_publishes_nothing() {
        for fence in [
            {
                let f = crate::service::Fence::new(Some(Duration::from_secs(3600)), "local".into());
                f.close();
                f
            },
            crate::service::Fence::new(Some(Duration::ZERO), "local".into()),
        ] {
            let mut f = Fixture::new("");
            Arc::get_mut(&mut f.svc).unwrap().fence = Some(Arc::new(fence));
            let caller = crate::auth::Caller::local();
            let auto = f.sandbox("alice", &[]).await;
            let manual = f
                .sandbox("alice", &[(crate::service::LABEL_PUBLISH, "manual")])
                .await;
            for id in [&auto, &manual] {
                f.svc.start_sandbox(&caller, id).await.unwrap();
            }
            let err = f.exec(&auto, "make").await.unwrap_err();
            assert!(
                crate::error::chain(&err).contains("nothing more is published")
                    || crate::error::chain(&err).contains("nothing is published"),
                "{}",
                crate::error::chain(&err)
            );
            f.exec(&manual, "make").await.unwrap();
            let err = f.svc.publish(&caller, &manual).await.unwrap_err();
            assert!(matches!(&err, ServiceError::Unavailable(_)), "{err:?}");
            assert_eq!(f.fs.publishes.load(Ordering::SeqCst), 0);
        }
    }
}
