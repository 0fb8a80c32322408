//! `sandbox.v1.SandboxService`.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use agentfense_core::{ResourceLimits, RuntimeKind};
use agentfense_proto::convert::{duration_from_wire, rules_from_wire};
use agentfense_proto::pbjson_types;
use agentfense_proto::v1::{self, exec_output::OutputType, sandbox_service_server::SandboxService};
use tonic::codegen::tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Response, Status};

use super::wire;
use crate::error::ServiceError;
use crate::service::{CreateSandbox, ExecOutcome, ExecParams, Service, StreamItem};

/// Trailing-metadata key carrying the exit code at the end of an ExecStream.
pub const EXIT_CODE_TRAILER: &str = "x-exit-code";

/// The SandboxService implementation.
#[derive(Debug, Clone)]
pub struct SandboxApi(pub Arc<Service>);

impl SandboxApi {
    /// The server's mandatory policy floor, shown with every sandbox's rules.
    fn floor(&self) -> &[agentfense_core::PermissionRule] {
        &self.0.settings.config.policy.mandatory
    }
}

type OutputStream = Pin<Box<dyn Stream<Item = Result<v1::ExecOutput, Status>> + Send>>;

fn opt_duration(
    d: Option<&pbjson_types::Duration>,
    field: &str,
) -> Result<Option<Duration>, Status> {
    match d {
        None => Ok(None),
        Some(d) => Ok(Some(duration_from_wire(d, field)?)),
    }
}

fn resources(r: Option<&v1::ResourceLimits>) -> Result<ResourceLimits, Status> {
    let Some(r) = r else {
        return Ok(ResourceLimits::default());
    };
    let field = |name: &str, v: i64| {
        u64::try_from(v).map_err(|_| {
            Status::invalid_argument(format!("resources.{name} must not be negative (got {v})"))
        })
    };
    Ok(ResourceLimits {
        memory_bytes: field("memory_bytes", r.memory_bytes)?,
        cpu_quota: field("cpu_quota", r.cpu_quota)?,
        cpu_shares: field("cpu_shares", r.cpu_shares)?,
        pids_limit: field("pids_limit", r.pids_limit)?,
        // Not on the wire: the label `agentfense.disk_bytes` or the server's default.
        ..ResourceLimits::default()
    })
}

fn exec_result(o: ExecOutcome) -> v1::ExecResult {
    v1::ExecResult {
        stdout: o.stdout,
        stderr: o.stderr,
        exit_code: o.exit_code,
        duration: Some(o.duration.into()),
    }
}

fn exec_params(r: v1::ExecRequest) -> Result<ExecParams, Status> {
    Ok(ExecParams {
        timeout: opt_duration(r.timeout.as_ref(), "timeout")?,
        command: r.command,
        stdin: r.stdin.into_bytes(),
        env: r.env.into_iter().collect(),
        workdir: r.workdir,
    })
}

/// Turns service stream items into wire messages. The stream ends OK for every exit code,
/// with the code in the `x-exit-code` trailer; a timeout ends it with DEADLINE_EXCEEDED.
fn output_stream(mut rx: tokio::sync::mpsc::Receiver<StreamItem>) -> OutputStream {
    let (tx, out) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        while let Some(item) = rx.recv().await {
            let (msg, last) = match item {
                StreamItem::Stdout(s) => (
                    Ok(v1::ExecOutput {
                        r#type: OutputType::Stdout as i32,
                        data: s.into_bytes(),
                    }),
                    false,
                ),
                StreamItem::Stderr(s) => (
                    Ok(v1::ExecOutput {
                        r#type: OutputType::Stderr as i32,
                        data: s.into_bytes(),
                    }),
                    false,
                ),
                StreamItem::Exit { exit_code, .. } => {
                    let mut md = MetadataMap::new();
                    if let Ok(v) = exit_code.to_string().parse() {
                        md.insert(EXIT_CODE_TRAILER, v);
                    }
                    // A status with code OK as the last item becomes the trailers of a
                    // successful stream.
                    (Err(Status::with_metadata(Code::Ok, "", md)), true)
                }
                StreamItem::Error(e) => (Err(Status::from(e)), true),
            };
            if tx.send(msg).await.is_err() || last {
                break;
            }
        }
    });
    Box::pin(ReceiverStream::new(out))
}

#[tonic::async_trait]
impl SandboxService for SandboxApi {
    async fn create_sandbox(
        &self,
        req: Request<v1::CreateSandboxRequest>,
    ) -> Result<Response<v1::Sandbox>, Status> {
        let caller = crate::auth::caller_of(&req)?;
        let r = req.into_inner();
        let runtime = match v1::RuntimeType::try_from(r.runtime) {
            Ok(v1::RuntimeType::Unspecified) => None,
            Ok(v1::RuntimeType::Bwrap) => Some(RuntimeKind::Bwrap),
            Ok(v1::RuntimeType::Docker) => Some(RuntimeKind::Docker),
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "runtime: unknown value {}",
                    r.runtime
                )));
            }
        };
        let create = CreateSandbox {
            codebase_id: r.codebase_id,
            rules: rules_from_wire(&r.permissions)?,
            expires_in: opt_duration(r.expires_in.as_ref(), "expires_in")?,
            labels: r.labels.into_iter().collect(),
            runtime,
            image: r.image,
            resources: resources(r.resources.as_ref())?,
        };
        let rec = self.0.create_sandbox(&caller, create).await?;
        Ok(Response::new(wire::sandbox(&rec, self.floor())))
    }

    async fn get_sandbox(
        &self,
        req: Request<v1::GetSandboxRequest>,
    ) -> Result<Response<v1::Sandbox>, Status> {
        let caller = crate::auth::caller_of(&req)?;
        let rec = self
            .0
            .get_sandbox(&caller, &req.into_inner().sandbox_id)
            .await?;
        Ok(Response::new(wire::sandbox(&rec, self.floor())))
    }

    async fn list_sandboxes(
        &self,
        req: Request<v1::ListSandboxesRequest>,
    ) -> Result<Response<v1::ListSandboxesResponse>, Status> {
        let caller = crate::auth::caller_of(&req)?;
        let r = req.into_inner();
        let page = self
            .0
            .list_sandboxes(&caller, &r.codebase_id, r.page_size, &r.page_token)
            .await?;
        Ok(Response::new(v1::ListSandboxesResponse {
            sandboxes: page
                .items
                .iter()
                .map(|s| wire::sandbox(s, self.floor()))
                .collect(),
            next_page_token: page.next_token,
        }))
    }

    async fn start_sandbox(
        &self,
        req: Request<v1::StartSandboxRequest>,
    ) -> Result<Response<v1::Sandbox>, Status> {
        let caller = crate::auth::caller_of(&req)?;
        let rec = self
            .0
            .start_sandbox(&caller, &req.into_inner().sandbox_id)
            .await?;
        Ok(Response::new(wire::sandbox(&rec, self.floor())))
    }

    async fn stop_sandbox(
        &self,
        req: Request<v1::StopSandboxRequest>,
    ) -> Result<Response<v1::Sandbox>, Status> {
        let caller = crate::auth::caller_of(&req)?;
        let rec = self
            .0
            .stop_sandbox(&caller, &req.into_inner().sandbox_id)
            .await?;
        Ok(Response::new(wire::sandbox(&rec, self.floor())))
    }

    async fn destroy_sandbox(
        &self,
        req: Request<v1::DestroySandboxRequest>,
    ) -> Result<Response<v1::Empty>, Status> {
        let caller = crate::auth::caller_of(&req)?;
        self.0
            .destroy_sandbox(&caller, &req.into_inner().sandbox_id)
            .await?;
        Ok(Response::new(v1::Empty {}))
    }

    async fn exec(
        &self,
        req: Request<v1::ExecRequest>,
    ) -> Result<Response<v1::ExecResult>, Status> {
        let caller = crate::auth::caller_of(&req)?;
        let r = req.into_inner();
        if r.sandbox_id.is_empty() {
            return Err(ServiceError::required("sandbox_id").into());
        }
        let id = r.sandbox_id.clone();
        let out = self.0.exec(&caller, &id, exec_params(r)?).await?;
        Ok(Response::new(exec_result(out)))
    }

    type ExecStreamStream = OutputStream;

    async fn exec_stream(
        &self,
        req: Request<v1::ExecRequest>,
    ) -> Result<Response<Self::ExecStreamStream>, Status> {
        let caller = crate::auth::caller_of(&req)?;
        let r = req.into_inner();
        let id = r.sandbox_id.clone();
        let rx = self.0.exec_stream(&caller, &id, exec_params(r)?).await?;
        Ok(Response::new(output_stream(rx)))
    }

    async fn create_session(
        &self,
        req: Request<v1::CreateSessionRequest>,
    ) -> Result<Response<v1::Session>, Status> {
        let caller = crate::auth::caller_of(&req)?;
        let r = req.into_inner();
        let s = self
            .0
            .create_session(&caller, &r.sandbox_id, r.shell, r.env.into_iter().collect())
            .await?;
        Ok(Response::new(wire::session(&s)))
    }

    async fn get_session(
        &self,
        req: Request<v1::GetSessionRequest>,
    ) -> Result<Response<v1::Session>, Status> {
        let caller = crate::auth::caller_of(&req)?;
        let s = self
            .0
            .get_session(&caller, &req.into_inner().session_id)
            .await?;
        Ok(Response::new(wire::session(&s)))
    }

    async fn list_sessions(
        &self,
        req: Request<v1::ListSessionsRequest>,
    ) -> Result<Response<v1::ListSessionsResponse>, Status> {
        let caller = crate::auth::caller_of(&req)?;
        let list = self
            .0
            .list_sessions(&caller, &req.into_inner().sandbox_id)
            .await?;
        Ok(Response::new(v1::ListSessionsResponse {
            sessions: list.iter().map(wire::session).collect(),
        }))
    }

    async fn destroy_session(
        &self,
        req: Request<v1::DestroySessionRequest>,
    ) -> Result<Response<v1::Empty>, Status> {
        let caller = crate::auth::caller_of(&req)?;
        self.0
            .destroy_session(&caller, &req.into_inner().session_id)
            .await?;
        Ok(Response::new(v1::Empty {}))
    }

    async fn session_exec(
        &self,
        req: Request<v1::SessionExecRequest>,
    ) -> Result<Response<v1::ExecResult>, Status> {
        let caller = crate::auth::caller_of(&req)?;
        let r = req.into_inner();
        let timeout = opt_duration(r.timeout.as_ref(), "timeout")?;
        let out = self
            .0
            .session_exec(&caller, &r.session_id, r.command, timeout)
            .await?;
        Ok(Response::new(exec_result(out)))
    }

    type SessionExecStreamStream = OutputStream;

    async fn session_exec_stream(
        &self,
        req: Request<v1::SessionExecRequest>,
    ) -> Result<Response<Self::SessionExecStreamStream>, Status> {
        let caller = crate::auth::caller_of(&req)?;
        let r = req.into_inner();
        let timeout = opt_duration(r.timeout.as_ref(), "timeout")?;
        let rx = self
            .0
            .session_exec_stream(&caller, &r.session_id, r.command, timeout)
            .await?;
        Ok(Response::new(output_stream(rx)))
    }
}
