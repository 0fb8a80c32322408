//! Record → wire message conversions.

use agentfense_core::{RuntimeKind, SandboxStatus, SessionStatus};
use agentfense_proto::convert::{rules_to_wire, timestamp_from_system_time};
use agentfense_proto::v1;

use crate::files::FileEntry;
use crate::store::{CodebaseRecord, SandboxRecord, SessionRecord};

pub(crate) fn codebase(c: &CodebaseRecord) -> v1::Codebase {
    v1::Codebase {
        id: c.id.to_string(),
        name: c.name.clone(),
        owner_id: c.owner_id.clone(),
        size: c.size,
        file_count: i32::try_from(c.file_count).unwrap_or(i32::MAX),
        created_at: Some(timestamp_from_system_time(c.created_at)),
        updated_at: Some(timestamp_from_system_time(c.updated_at)),
    }
}

pub(crate) fn file_info(e: &FileEntry) -> v1::FileInfo {
    v1::FileInfo {
        path: e.path.clone(),
        name: e.name.clone(),
        is_dir: e.is_dir,
        size: i64::try_from(e.size).unwrap_or(i64::MAX),
        modified_at: Some(timestamp_from_system_time(e.modified)),
    }
}

pub(crate) fn sandbox_status(s: SandboxStatus) -> v1::SandboxStatus {
    match s {
        SandboxStatus::Pending => v1::SandboxStatus::Pending,
        SandboxStatus::Running => v1::SandboxStatus::Running,
        SandboxStatus::Stopped => v1::SandboxStatus::Stopped,
        SandboxStatus::Error => v1::SandboxStatus::Error,
    }
}

pub(crate) fn runtime(r: RuntimeKind) -> v1::RuntimeType {
    match r {
        RuntimeKind::Bwrap => v1::RuntimeType::Bwrap,
        RuntimeKind::Docker => v1::RuntimeType::Docker,
    }
}

/// A sandbox as the API shows it. Its permissions are its own rules followed by the server's
/// mandatory `floor` (`policy.mandatory`), which ranks above them all: shown as a trailing
/// group with priority `i32::MAX`, so a client reading them sees what applies.
pub(crate) fn sandbox(s: &SandboxRecord, floor: &[agentfense_core::PermissionRule]) -> v1::Sandbox {
    let r = s.resources;
    let mut rules = s.rules.clone();
    rules.extend(floor.iter().map(|f| agentfense_core::PermissionRule {
        priority: i32::MAX,
        ..f.clone()
    }));
    v1::Sandbox {
        id: s.id.to_string(),
        codebase_id: s.codebase_id.to_string(),
        permissions: rules_to_wire(&rules),
        status: sandbox_status(s.status) as i32,
        labels: s.labels.clone().into_iter().collect(),
        created_at: Some(timestamp_from_system_time(s.created_at)),
        started_at: s.started_at.map(timestamp_from_system_time),
        stopped_at: s.stopped_at.map(timestamp_from_system_time),
        expires_at: s.expires_at.map(timestamp_from_system_time),
        runtime: runtime(s.runtime) as i32,
        image: s.image.clone(),
        resources: (!r.is_unlimited()).then(|| v1::ResourceLimits {
            memory_bytes: to_i64(r.memory_bytes),
            cpu_quota: to_i64(r.cpu_quota),
            cpu_shares: to_i64(r.cpu_shares),
            pids_limit: to_i64(r.pids_limit),
        }),
    }
}

pub(crate) fn session(s: &SessionRecord) -> v1::Session {
    v1::Session {
        id: s.id.to_string(),
        sandbox_id: s.sandbox_id.to_string(),
        status: match s.status {
            SessionStatus::Active => v1::SessionStatus::Active,
            SessionStatus::Closed => v1::SessionStatus::Closed,
        } as i32,
        shell: s.shell.clone(),
        created_at: Some(timestamp_from_system_time(s.created_at)),
        closed_at: s.closed_at.map(timestamp_from_system_time),
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
