//! `agentfense.v1.Extensions`: our own API next to `sandbox.v1` (the same service calls as the
//! REST-only routes it mirrors).

use std::sync::Arc;

use agentfense_proto::agentfense_v1::{self as x, extensions_server::Extensions};
use agentfense_proto::convert::{duration_from_wire, timestamp_from_system_time};
use tonic::{Request, Response, Status};

use crate::service::Service;

/// The Extensions implementation.
#[derive(Debug, Clone)]
pub struct ExtensionsApi(pub Arc<Service>);

fn paths(v: &[std::path::PathBuf]) -> Vec<String> {
    v.iter().map(|p| p.display().to_string()).collect()
}

#[tonic::async_trait]
impl Extensions for ExtensionsApi {
    async fn publish_sandbox(
        &self,
        req: Request<x::PublishSandboxRequest>,
    ) -> Result<Response<x::PublishSandboxResponse>, Status> {
        let caller = crate::auth::caller_of(&req)?;
        let report = self.0.publish(&caller, &req.get_ref().sandbox_id).await?;
        Ok(Response::new(x::PublishSandboxResponse {
            written: paths(&report.written),
            deleted: paths(&report.deleted),
            conflicts: paths(
                &report
                    .conflicts
                    .iter()
                    .map(|c| c.path.clone())
                    .collect::<Vec<_>>(),
            ),
            failed: report
                .failed
                .iter()
                .map(|(p, why)| format!("{}: {why}", p.display()))
                .collect(),
        }))
    }

    async fn create_sandbox_token(
        &self,
        req: Request<x::CreateSandboxTokenRequest>,
    ) -> Result<Response<x::CreateSandboxTokenResponse>, Status> {
        let caller = crate::auth::caller_of(&req)?;
        let r = req.get_ref();
        let ttl = r
            .ttl
            .as_ref()
            .map(|d| duration_from_wire(d, "ttl"))
            .transpose()?;
        let t = self
            .0
            .mint_sandbox_token(&caller, &r.sandbox_id, ttl)
            .await?;
        Ok(Response::new(x::CreateSandboxTokenResponse {
            token: t.token,
            token_id: t.id,
            sandbox_id: r.sandbox_id.clone(),
            expires_at: t.expires_at.map(timestamp_from_system_time),
        }))
    }

    async fn set_sandbox_egress(
        &self,
        req: Request<x::SetSandboxEgressRequest>,
    ) -> Result<Response<x::SetSandboxEgressResponse>, Status> {
        let caller = crate::auth::caller_of(&req)?;
        let r = req.into_inner();
        self.0.set_egress(&caller, &r.sandbox_id, &r.egress).await?;
        Ok(Response::new(x::SetSandboxEgressResponse {
            sandbox_id: r.sandbox_id,
            egress: r.egress,
        }))
    }

    async fn get_sandbox_metrics(
        &self,
        req: Request<x::GetSandboxMetricsRequest>,
    ) -> Result<Response<x::SandboxMetrics>, Status> {
        let caller = crate::auth::caller_of(&req)?;
        let m = self
            .0
            .sandbox_metrics(&caller, &req.get_ref().sandbox_id)
            .await?;
        Ok(Response::new(x::SandboxMetrics {
            sandbox_id: m.sandbox_id,
            cpu_usec: m.cpu_usec,
            memory_bytes: m.memory_bytes,
            pids: m.pids,
            disk_bytes: m.disk_bytes,
            disk_entries: m.disk_entries,
            denials: m.denials,
        }))
    }
}
