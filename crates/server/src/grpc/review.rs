//! `agentfense.v1.Review`: a sandbox's changes, diff, apply, discard and checkpoints (the
//! same service calls as the REST routes in `rest::review`).

use std::sync::Arc;

use agentfense_fs::{ChangeSet, CheckpointInfo, EntryKind, PathChange, hex_digest};
use agentfense_proto::agentfense_v1::{self as x, review_server::Review};
use agentfense_proto::convert::timestamp_from_system_time;
use tonic::{Request, Response, Status};

use crate::service::Service;
use crate::service::StateRef;

/// The Review implementation.
#[derive(Debug, Clone)]
pub struct ReviewApi(pub Arc<Service>);

/// The wire name of an object type.
pub fn kind_name(k: EntryKind) -> &'static str {
    match k {
        EntryKind::Dir => "directory",
        EntryKind::File => "file",
        EntryKind::Symlink => "symlink",
        EntryKind::Fifo => "fifo",
        EntryKind::Socket => "socket",
        EntryKind::Other => "other",
    }
}

/// The wire form of a change.
pub fn path_change(c: &PathChange) -> x::PathChange {
    x::PathChange {
        path: c.path.display().to_string(),
        status: c.status.as_str().to_owned(),
        kind: kind_name(c.kind).to_owned(),
        old_kind: c.old_kind.map(kind_name).unwrap_or_default().to_owned(),
        size: c.size,
        mode: c.mode.unwrap_or(0),
        old_mode: c.old_mode.unwrap_or(0),
        sha256: c.sha256.as_ref().map(hex_digest).unwrap_or_default(),
        base_sha256: c.base_sha256.as_ref().map(hex_digest).unwrap_or_default(),
        binary: c.binary,
        base_moved: c.base_moved,
        hidden: c.hidden,
        old_size: c.old_size,
    }
}

fn changes(set: &ChangeSet) -> Vec<x::PathChange> {
    set.changes.iter().map(path_change).collect()
}

/// The wire form of a checkpoint.
pub fn checkpoint(c: &CheckpointInfo) -> x::Checkpoint {
    x::Checkpoint {
        id: c.id.clone(),
        label: c.label.clone(),
        created_at: Some(timestamp_from_system_time(c.created)),
        paths: i32::try_from(c.paths).unwrap_or(i32::MAX),
        bytes: c.bytes,
        by_agent: c.by_agent,
    }
}

fn count(n: i64, field: &str) -> Result<usize, Status> {
    usize::try_from(n)
        .map_err(|_| Status::invalid_argument(format!("{field} must not be negative")))
}

fn paths(v: &[std::path::PathBuf]) -> Vec<String> {
    v.iter().map(|p| p.display().to_string()).collect()
}

#[tonic::async_trait]
impl Review for ReviewApi {
    async fn list_changes(
        &self,
        req: Request<x::ListChangesRequest>,
    ) -> Result<Response<x::ListChangesResponse>, Status> {
        let caller = crate::auth::caller_of(&req)?;
        let r = req.into_inner();
        let limit = count(r.limit.into(), "limit")?;
        let set = self
            .0
            .list_changes(&caller, &r.sandbox_id, r.paths, limit)
            .await?;
        Ok(Response::new(x::ListChangesResponse {
            changes: changes(&set),
            truncated: set.truncated,
            total: i32::try_from(set.total).unwrap_or(i32::MAX),
        }))
    }

    async fn get_diff(
        &self,
        req: Request<x::GetDiffRequest>,
    ) -> Result<Response<x::GetDiffResponse>, Status> {
        let caller = crate::auth::caller_of(&req)?;
        let r = req.into_inner();
        let max = count(r.max_bytes, "max_bytes")?;
        let (patch, _) = self
            .0
            .diff_states(
                &caller,
                &r.sandbox_id,
                StateRef::Base,
                StateRef::Current,
                r.paths,
                max,
            )
            .await?;
        Ok(Response::new(x::GetDiffResponse {
            diff: patch.text,
            truncated: patch.truncated,
            files: i32::try_from(patch.files).unwrap_or(i32::MAX),
        }))
    }

    async fn apply_changes(
        &self,
        req: Request<x::ApplyChangesRequest>,
    ) -> Result<Response<x::ApplyChangesResponse>, Status> {
        let caller = crate::auth::caller_of(&req)?;
        let r = req.into_inner();
        let report = self
            .0
            .apply_changes(
                &caller,
                &r.sandbox_id,
                r.paths,
                r.expected.into_iter().collect(),
                r.expected_content.into_iter().collect(),
            )
            .await?;
        Ok(Response::new(x::ApplyChangesResponse {
            written: paths(&report.written),
            deleted: paths(&report.deleted),
            failed: report
                .failed
                .iter()
                .map(|(p, why)| format!("{}: {why}", p.display()))
                .collect(),
        }))
    }

    async fn discard_changes(
        &self,
        req: Request<x::DiscardChangesRequest>,
    ) -> Result<Response<x::DiscardChangesResponse>, Status> {
        let caller = crate::auth::caller_of(&req)?;
        let r = req.into_inner();
        let gone = self
            .0
            .discard_changes(&caller, &r.sandbox_id, r.paths)
            .await?;
        Ok(Response::new(x::DiscardChangesResponse {
            discarded: paths(&gone),
        }))
    }

    async fn create_checkpoint(
        &self,
        req: Request<x::CreateCheckpointRequest>,
    ) -> Result<Response<x::Checkpoint>, Status> {
        let caller = crate::auth::caller_of(&req)?;
        let r = req.into_inner();
        let info = self
            .0
            .create_checkpoint(&caller, &r.sandbox_id, r.label)
            .await?;
        Ok(Response::new(checkpoint(&info)))
    }

    async fn list_checkpoints(
        &self,
        req: Request<x::ListCheckpointsRequest>,
    ) -> Result<Response<x::ListCheckpointsResponse>, Status> {
        let caller = crate::auth::caller_of(&req)?;
        let all = self
            .0
            .list_checkpoints(&caller, &req.get_ref().sandbox_id)
            .await?;
        Ok(Response::new(x::ListCheckpointsResponse {
            checkpoints: all.iter().map(checkpoint).collect(),
        }))
    }

    async fn restore_checkpoint(
        &self,
        req: Request<x::RestoreCheckpointRequest>,
    ) -> Result<Response<x::RestoreCheckpointResponse>, Status> {
        let caller = crate::auth::caller_of(&req)?;
        let r = req.into_inner();
        let set = self
            .0
            .restore_checkpoint(&caller, &r.sandbox_id, r.checkpoint_id, r.dry_run)
            .await?;
        Ok(Response::new(x::RestoreCheckpointResponse {
            changes: changes(&set),
            restored: !r.dry_run,
        }))
    }

    async fn delete_checkpoint(
        &self,
        req: Request<x::DeleteCheckpointRequest>,
    ) -> Result<Response<x::DeleteCheckpointResponse>, Status> {
        let caller = crate::auth::caller_of(&req)?;
        let r = req.into_inner();
        self.0
            .delete_checkpoint(&caller, &r.sandbox_id, r.checkpoint_id)
            .await?;
        Ok(Response::new(x::DeleteCheckpointResponse {}))
    }

    async fn diff_checkpoints(
        &self,
        req: Request<x::DiffCheckpointsRequest>,
    ) -> Result<Response<x::DiffCheckpointsResponse>, Status> {
        let caller = crate::auth::caller_of(&req)?;
        let r = req.into_inner();
        let from = match StateRef::parse(&r.checkpoint_id)? {
            StateRef::Current if r.checkpoint_id.is_empty() => {
                return Err(Status::invalid_argument("checkpoint_id is required"));
            }
            s => s,
        };
        let to = StateRef::parse(&r.to)?;
        let max = count(r.max_bytes, "max_bytes")?;
        let (patch, set) = self
            .0
            .diff_states(&caller, &r.sandbox_id, from, to, r.paths, max)
            .await?;
        Ok(Response::new(x::DiffCheckpointsResponse {
            diff: patch.text,
            changes: changes(&set),
            truncated: patch.truncated || set.truncated,
        }))
    }
}
