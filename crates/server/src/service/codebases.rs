//! Codebases: metadata, uploads, downloads and listings.

use std::fs::File;
use std::sync::Arc;
use std::time::SystemTime;

use agentfense_core::SandboxPath;

use super::{Service, blocking, page_args};
use crate::audit::{Actor, AuditEvent};
use crate::auth::Caller;
use crate::error::ServiceError;
use crate::files::{FileEntry, Upload, Uploaded};
use crate::ids::CodebaseId;
use crate::store::{CodebaseRecord, Page};

/// Longest accepted codebase name and owner id.
const MAX_NAME: usize = 256;

/// An upload in progress, bound to its codebase.
#[derive(Debug)]
pub struct UploadSink {
    codebase: CodebaseId,
    /// Held until the upload is counted in the store (or dropped).
    _reserved: Option<super::quota::Bytes>,
    actor: Actor,
    path: SandboxPath,
    announced: u64,
    upload: Upload,
}

impl UploadSink {
    /// Appends a chunk (blocking I/O; chunks are ≤ 4 MiB).
    pub fn write(&mut self, data: &[u8]) -> Result<(), ServiceError> {
        Ok(self.upload.write(data)?)
    }
}

fn parse_file_path(raw: &str, field: &str) -> Result<SandboxPath, ServiceError> {
    if raw.is_empty() {
        return Err(ServiceError::required(field));
    }
    let p = SandboxPath::parse(raw)
        .map_err(|e| ServiceError::InvalidArgument(format!("{field}: {e}")))?;
    if p.is_root() {
        return Err(ServiceError::InvalidArgument(format!(
            "{field} {raw:?} names the codebase root, not a file"
        )));
    }
    Ok(p)
}

impl Service {
    pub(crate) fn codebase_id(raw: &str) -> Result<CodebaseId, ServiceError> {
        if raw.is_empty() {
            return Err(ServiceError::required("codebase_id"));
        }
        Ok(CodebaseId::parse(raw)?)
    }

    /// The codebase, or NOT_FOUND: also when it belongs to a tenant the caller cannot see
    /// (the answer never reveals that it exists).
    pub(crate) async fn codebase(
        self: &Arc<Self>,
        caller: &Caller,
        id: &CodebaseId,
    ) -> Result<CodebaseRecord, ServiceError> {
        let store = self.store.clone();
        let id2 = id.clone();
        blocking(move || Ok(store.get_codebase(&id2)?))
            .await?
            .filter(|c| caller.sees_tenant(&c.tenant))
            .ok_or_else(|| ServiceError::NotFound(format!("codebase {id} not found")))
    }

    /// CreateCodebase. The codebase belongs to the caller's tenant; a non-admin caller's
    /// `owner_id` is replaced by its tenant (so no quota or listing can be escaped by naming
    /// another owner).
    pub async fn create_codebase(
        self: &Arc<Self>,
        caller: &Caller,
        name: String,
        owner_id: String,
    ) -> Result<CodebaseRecord, ServiceError> {
        let owner_id = if caller.is_admin() {
            owner_id
        } else {
            caller.tenant.clone()
        };
        for (field, v) in [("name", &name), ("owner_id", &owner_id)] {
            if v.trim().is_empty() {
                return Err(ServiceError::required(field));
            }
            if v.len() > MAX_NAME || v.contains('\0') {
                return Err(ServiceError::InvalidArgument(format!(
                    "{field} must be at most {MAX_NAME} bytes without NUL"
                )));
            }
        }
        let now = SystemTime::now();
        let rec = CodebaseRecord {
            id: CodebaseId::generate(),
            name,
            owner_id,
            tenant: caller.tenant.clone(),
            size: 0,
            file_count: 0,
            created_at: now,
            updated_at: now,
        };
        let this = self.clone();
        let r = rec.clone();
        blocking(move || {
            this.files.create(&r.id)?;
            if let Err(e) = this.store.insert_codebase(&r) {
                let _ = this.files.delete(&r.id);
                return Err(e.into());
            }
            Ok(())
        })
        .await?;
        self.audit.record_as(
            caller.actor(),
            AuditEvent::CodebaseCreated {
                codebase_id: rec.id.to_string(),
                name: rec.name.clone(),
                owner_id: rec.owner_id.clone(),
            },
        );
        Ok(rec)
    }

    /// GetCodebase.
    pub async fn get_codebase(
        self: &Arc<Self>,
        caller: &Caller,
        id: &str,
    ) -> Result<CodebaseRecord, ServiceError> {
        let id = Service::codebase_id(id)?;
        self.codebase(caller, &id).await
    }

    /// ListCodebases (real pagination; an empty owner lists everyone's the caller may see).
    pub async fn list_codebases(
        self: &Arc<Self>,
        caller: &Caller,
        owner_id: String,
        page_size: i32,
        page_token: String,
    ) -> Result<Page<CodebaseRecord>, ServiceError> {
        let (size, after) = page_args(page_size, &page_token)?;
        let store = self.store.clone();
        let tenant = caller.list_tenant().map(str::to_owned);
        blocking(move || {
            let owner = (!owner_id.is_empty()).then_some(owner_id.as_str());
            Ok(store.list_codebases(tenant.as_deref(), owner, after, size)?)
        })
        .await
    }

    /// DeleteCodebase: refused while any sandbox uses it, so that no sandbox (running or with
    /// unpublished changes) loses its files.
    pub async fn delete_codebase(
        self: &Arc<Self>,
        caller: &Caller,
        id: &str,
    ) -> Result<(), ServiceError> {
        let id = Service::codebase_id(id)?;
        self.codebase(caller, &id).await?;
        let this = self.clone();
        let id2 = id.clone();
        blocking(move || {
            let users = this.store.sandboxes_of_codebase(&id2)?;
            if !users.is_empty() {
                return Err(ServiceError::FailedPrecondition(format!(
                    "codebase {id2} is used by sandbox(es) {}; destroy them first",
                    users.join(", ")
                )));
            }
            // Metadata first: a crash between the two leaves an orphan directory (removed at
            // startup), never a codebase whose files are gone.
            this.store.delete_codebase(&id2)?;
            this.files.delete(&id2)?;
            Ok(())
        })
        .await?;
        self.audit.record_as(
            caller.actor(),
            AuditEvent::CodebaseDeleted {
                codebase_id: id.to_string(),
            },
        );
        Ok(())
    }

    /// Starts an upload from the stream's first (metadata) message.
    pub async fn begin_upload(
        self: &Arc<Self>,
        caller: &Caller,
        codebase_id: &str,
        file_path: &str,
        total_size: i64,
    ) -> Result<UploadSink, ServiceError> {
        if codebase_id.is_empty() {
            return Err(ServiceError::InvalidArgument(
                "codebase_id is required in metadata".into(),
            ));
        }
        if file_path.is_empty() {
            return Err(ServiceError::InvalidArgument(
                "file_path is required in metadata".into(),
            ));
        }
        let id = Service::codebase_id(codebase_id)?;
        let path = parse_file_path(file_path, "file_path")?;
        let limit = self.settings.config.max_upload_bytes();
        if total_size < 0 {
            return Err(ServiceError::InvalidArgument(format!(
                "total_size {total_size} is negative"
            )));
        }
        if total_size as u64 > limit {
            return Err(ServiceError::InvalidArgument(format!(
                "{file_path}: total_size {total_size} exceeds the upload limit of {limit} bytes"
            )));
        }
        let cb = self.codebase(caller, &id).await?;
        let quota = self.settings.config.quotas.of(&cb.tenant);
        let reserved = if quota.codebase_bytes > 0 {
            // Reserved before usage is read: concurrent uploads see each other.
            let (bytes, in_progress) = self.quota.reserve_bytes(&cb.tenant, total_size as u64);
            let store = self.store.clone();
            let t = cb.tenant.clone();
            let usage = blocking(move || Ok(store.tenant_usage(&t)?)).await?;
            super::quota::check_codebase_bytes(&cb.tenant, &usage, in_progress, &quota)?;
            Some(bytes)
        } else {
            None
        };
        let this = self.clone();
        let (id2, p2) = (id.clone(), path.clone());
        let upload = blocking(move || Ok(this.files.begin_upload(&id2, &p2, limit)?)).await?;
        Ok(UploadSink {
            codebase: id,
            _reserved: reserved,
            actor: caller.actor(),
            path,
            announced: total_size as u64,
            upload,
        })
    }

    /// Finishes an upload: size check, atomic rename, incremental stats, audit.
    pub async fn commit_upload(
        self: &Arc<Self>,
        sink: UploadSink,
    ) -> Result<(CodebaseId, SandboxPath, Uploaded), ServiceError> {
        let this = self.clone();
        let UploadSink {
            codebase,
            _reserved: reserved,
            actor,
            path,
            announced,
            upload,
        } = sink;
        let (cb, p) = (codebase.clone(), path.clone());
        let p_closure = p.clone();
        let done = blocking(move || {
            let p = p_closure;
            // The SDK always announces the exact length (0 for empty files).
            let up = upload.commit(Some(announced))?;
            let (size_delta, count_delta) = match up.replaced {
                Some(old) => (up.size as i64 - old as i64, 0),
                None => (up.size as i64, 1),
            };
            this.store
                .adjust_codebase_stats(&cb, size_delta, count_delta, SystemTime::now())?;
            // Running sandboxes of this codebase see the new content at once, not after
            // their kernel cache expires.
            this.engine.mounts.codebase_changed(
                &this.files.dir(&cb),
                &[std::path::PathBuf::from(p.relative())],
            );
            Ok(up)
        })
        .await?;
        // Counted in the store now: the reservation goes.
        drop(reserved);
        self.audit.record_as(
            actor,
            AuditEvent::FileUploaded {
                codebase_id: codebase.to_string(),
                path: p.relative().to_owned(),
                size: done.size,
                checksum: done.md5.clone(),
            },
        );
        Ok((codebase, p, done))
    }

    /// Opens a codebase file for DownloadFile.
    pub async fn open_download(
        self: &Arc<Self>,
        caller: &Caller,
        codebase_id: &str,
        file_path: &str,
    ) -> Result<File, ServiceError> {
        let id = Service::codebase_id(codebase_id)?;
        let path = parse_file_path(file_path, "file_path")?;
        self.codebase(caller, &id).await?;
        let this = self.clone();
        blocking(move || Ok(this.files.open_file(&id, &path)?)).await
    }

    /// ListFiles.
    pub async fn list_files(
        self: &Arc<Self>,
        caller: &Caller,
        codebase_id: &str,
        path: &str,
        recursive: bool,
    ) -> Result<Vec<FileEntry>, ServiceError> {
        let id = Service::codebase_id(codebase_id)?;
        let dir = SandboxPath::parse(path)
            .map_err(|e| ServiceError::InvalidArgument(format!("path: {e}")))?;
        self.codebase(caller, &id).await?;
        let this = self.clone();
        blocking(move || Ok(this.files.list(&id, &dir, recursive)?)).await
    }
}
