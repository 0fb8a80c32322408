//! `sandbox.v1.CodebaseService`.

use std::io::Read;
use std::pin::Pin;
use std::sync::Arc;

use agentfense_proto::v1::{self, codebase_service_server::CodebaseService, upload_chunk::Content};
use tonic::codegen::tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};

use super::{CHUNK, wire};
use crate::error::ServiceError;
use crate::service::Service;

/// The CodebaseService implementation.
#[derive(Debug, Clone)]
pub struct CodebaseApi(pub Arc<Service>);

type ChunkStream = Pin<Box<dyn Stream<Item = Result<v1::FileChunk, Status>> + Send>>;

#[tonic::async_trait]
impl CodebaseService for CodebaseApi {
    async fn create_codebase(
        &self,
        req: Request<v1::CreateCodebaseRequest>,
    ) -> Result<Response<v1::Codebase>, Status> {
        let caller = crate::auth::caller_of(&req)?;
        let r = req.into_inner();
        let c = self.0.create_codebase(&caller, r.name, r.owner_id).await?;
        Ok(Response::new(wire::codebase(&c)))
    }

    async fn get_codebase(
        &self,
        req: Request<v1::GetCodebaseRequest>,
    ) -> Result<Response<v1::Codebase>, Status> {
        let caller = crate::auth::caller_of(&req)?;
        let c = self
            .0
            .get_codebase(&caller, &req.into_inner().codebase_id)
            .await?;
        Ok(Response::new(wire::codebase(&c)))
    }

    async fn list_codebases(
        &self,
        req: Request<v1::ListCodebasesRequest>,
    ) -> Result<Response<v1::ListCodebasesResponse>, Status> {
        let caller = crate::auth::caller_of(&req)?;
        let r = req.into_inner();
        let page = self
            .0
            .list_codebases(&caller, r.owner_id, r.page_size, r.page_token)
            .await?;
        Ok(Response::new(v1::ListCodebasesResponse {
            codebases: page.items.iter().map(wire::codebase).collect(),
            next_page_token: page.next_token,
        }))
    }

    async fn delete_codebase(
        &self,
        req: Request<v1::DeleteCodebaseRequest>,
    ) -> Result<Response<v1::Empty>, Status> {
        let caller = crate::auth::caller_of(&req)?;
        self.0
            .delete_codebase(&caller, &req.into_inner().codebase_id)
            .await?;
        Ok(Response::new(v1::Empty {}))
    }

    async fn upload_files(
        &self,
        req: Request<Streaming<v1::UploadChunk>>,
    ) -> Result<Response<v1::UploadResult>, Status> {
        let caller = crate::auth::caller_of(&req)?;
        let mut stream = req.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("no metadata received"))?;
        let meta = match first.content {
            Some(Content::Metadata(m)) => m,
            Some(Content::Data(_)) => {
                return Err(Status::invalid_argument("metadata must be sent first"));
            }
            None => return Err(Status::invalid_argument("no metadata received")),
        };
        let mut sink = self
            .0
            .begin_upload(&caller, &meta.codebase_id, &meta.file_path, meta.total_size)
            .await?;
        // Chunks are written as they arrive (never buffered whole in memory); on any error the
        // sink is dropped, which removes the staged file.
        while let Some(msg) = stream.message().await? {
            match msg.content {
                Some(Content::Data(data)) => {
                    sink = tokio::task::spawn_blocking(move || sink.write(&data).map(|()| sink))
                        .await
                        .map_err(|e| ServiceError::internal("upload", e))??;
                }
                Some(Content::Metadata(_)) => {
                    return Err(Status::invalid_argument("metadata already received"));
                }
                None => {}
            }
        }
        let (cb, path, done) = self.0.commit_upload(sink).await?;
        Ok(Response::new(v1::UploadResult {
            codebase_id: cb.to_string(),
            file_path: if meta.file_path.is_empty() {
                path.relative().to_owned()
            } else {
                meta.file_path
            },
            size: i64::try_from(done.size).unwrap_or(i64::MAX),
            checksum: done.md5,
        }))
    }

    type DownloadFileStream = ChunkStream;

    async fn download_file(
        &self,
        req: Request<v1::DownloadFileRequest>,
    ) -> Result<Response<Self::DownloadFileStream>, Status> {
        let caller = crate::auth::caller_of(&req)?;
        let r = req.into_inner();
        let mut file = self
            .0
            .open_download(&caller, &r.codebase_id, &r.file_path)
            .await?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let path = r.file_path;
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; CHUNK];
            loop {
                match file.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        let chunk = v1::FileChunk {
                            data: buf[..n].to_vec(),
                        };
                        if tx.blocking_send(Ok(chunk)).is_err() {
                            break; // client went away
                        }
                    }
                    Err(e) => {
                        let _ = tx.blocking_send(Err(Status::from(ServiceError::internal(
                            format!("reading {path}"),
                            e,
                        ))));
                        break;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_files(
        &self,
        req: Request<v1::ListFilesRequest>,
    ) -> Result<Response<v1::ListFilesResponse>, Status> {
        let caller = crate::auth::caller_of(&req)?;
        let r = req.into_inner();
        let files = self
            .0
            .list_files(&caller, &r.codebase_id, &r.path, r.recursive)
            .await?;
        Ok(Response::new(v1::ListFilesResponse {
            files: files.iter().map(wire::file_info).collect(),
        }))
    }
}
